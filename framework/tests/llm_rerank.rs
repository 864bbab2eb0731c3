//! The `llm` ranker through the `recfuse` binary, as users run it: LoRA-tune, then rerank the
//! BPR ranker's top 10 with the tuned model. A tiny random ChatGLM checkpoint keeps it
//! to seconds (SmolLM2 takes the same code path in the quickstart and in the engine's tests).
//!
//! * Reranking permutes the first stage's top N only: every other item keeps its place, so
//!   HR@k for k ≥ N equals the first stage's.
//! * `kill -9` mid-scoring: the rerun takes the journaled scores and computes only the rest,
//!   and reports exactly what an uninterrupted run reports.
//! * A missing, foreign or mismatched tuner artifact is a clear error naming what is wrong, and
//!   `validate` refuses a task the run does not have.
#![cfg(feature = "lora")]

use recfuse_llm_engine::tunable::chatglm::{write_random_checkpoint, ChatGlmConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const WORDS: [&str; 12] = ["Liked", "Disliked", "movies", "Candidate", "item:", "Yes", "No", "Drama", "Comedy", "Action", "1995", "user"];

fn recfuse(config: &Path, run: &str, sets: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_recfuse"));
    c.arg("run").arg(config).arg("--quiet").args(["--set", &format!("run.name=\"{run}\"")]);
    for s in sets {
        c.args(["--set", s]);
    }
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c
}

fn logged(mut c: Command) -> (Output, String) {
    let out = c.env("RECFUSE_LOG", "info").stderr(Stdio::piped()).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, log)
}

/// Writes the config: template knowledge, CTR instructions, a short LoRA tuning of `model`,
/// BPR, and the `llm` ranker reranking its top 10 (`ranker_extra` appended to its table).
fn config(dir: &Path, model: &Path, tuner: &str, ranker_extra: &str) -> PathBuf {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/data/ml-100k");
    assert!(data.join(".complete").exists(), "MovieLens-100K missing: run scripts/fetch-data.sh");
    let tuner = match tuner {
        "lora" => format!(
            "[tuner]\nkind = \"lora\"\nmodel = \"{}\"\ntarget_modules = [\"query_key_value\"]\nmax_steps = 2\nbatch_size = 4\nmicro_batch = 4\nlearning_rate = 0.01\nvalid_examples = 4\n",
            model.display()
        ),
        "none" => String::new(),
        other => format!("[tuner]\nkind = \"{other}\"\n"),
    };
    let path = dir.join("rerank.toml");
    std::fs::write(
        &path,
        format!(
            r#"[run]
dir = "{runs}"
sample_users = 300
batch_size = 64

[source]
kind = "recbole-atomic"
dir = "{data}"
name = "ml-100k"
kind_rules = [{{ min = 4.0, kind = "like" }}, {{ max = 2.0, kind = "dislike" }}]

[[fusers]]
kind = "template"
max_per_kind = 4

[instructions]
kind = "ctr"
item_attrs = ["class", "release_year"]

{tuner}
[[rankers]]
kind = "bpr"
dim = 16

[[rankers]]
kind = "llm"
rerank = {{ from = "bpr", top = 10 }}
batch_tokens = 512
{ranker_extra}
"#,
            runs = dir.join("runs").display(),
            data = data.display(),
        ),
    )
    .unwrap();
    path
}

fn tiny_model(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let model = dir.join(name);
    write_random_checkpoint(&model, &ChatGlmConfig::tiny(64), &WORDS, seed).unwrap();
    model
}

fn reports(dir: &Path, run: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join(format!("runs/{run}/report.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn metric(report: &Value, name: &str) -> f64 {
    report["segments"]["all"]["metrics"][name].as_f64().unwrap_or_else(|| panic!("no {name} in {report}"))
}

#[test]
fn reranks_the_top_only_and_a_killed_scoring_resumes_from_its_journal() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny_model(d.path(), "tiny-chatglm", 3);
    let cfg = config(d.path(), &model, "lora", "");

    let (out, log) = logged(recfuse(&cfg, "whole", &[]));
    assert!(out.status.success(), "{log}");
    let whole = reports(d.path(), "whole");
    let (bpr, llm) = (&whole[0], &whole[1]);
    assert_eq!(llm["reranked"], serde_json::json!({"from": "bpr", "top": 10}));
    let users = llm["segments"]["all"]["users"].as_u64().unwrap();
    assert!(users > 200, "{users} users evaluated");
    // Only the top 10 moved: the same items are in every user's top 10, below it nothing changed.
    assert_eq!(metric(llm, "HR@10"), metric(bpr, "HR@10"));
    assert_ne!(metric(llm, "NDCG@10"), metric(bpr, "NDCG@10"), "the LLM reordered nothing");
    assert!(llm["seconds_per_user"].as_f64().unwrap() > 0.0);
    let md = std::fs::read_to_string(d.path().join("runs/whole/report.md")).unwrap();
    assert!(md.contains("| llm (top 10 of bpr) |") && md.contains("## scoring time") && md.contains("| llm | "), "{md}");
    assert!(log.contains("candidates/s"), "scoring reports its speed: {log}");
    // One journaled score per (user, candidate) prompt.
    let journal = d.path().join("runs/whole/rankers/llm/scores.bin");
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 32 + 20 * 10 * users);

    // Killed while scoring.
    let part = d.path().join("runs/part");
    let scores = part.join("rankers/llm/scores.bin");
    let mut child = recfuse(&cfg, "part", &[]).spawn().unwrap();
    let t = Instant::now();
    while std::fs::metadata(&scores).map(|m| m.len()).unwrap_or(0) < 32 + 20 * 10 * 20 {
        assert!(t.elapsed() < Duration::from_secs(600), "scoring never started");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!part.join("report.json").exists(), "the kill came too late to test anything");
    let journaled = (std::fs::metadata(&scores).unwrap().len() - 32) / 20;
    assert!(journaled < 10 * users, "everything was scored before the kill");

    let (out, log) = logged(recfuse(&cfg, "part", &[]));
    assert!(out.status.success(), "{log}");
    assert!(log.contains("scores journaled by an earlier process are reused"), "{log}");
    let resumed = reports(d.path(), "part");
    for r in [&resumed[1], &whole[1]] {
        assert!(r["error"].is_null(), "{r}");
    }
    assert_eq!(resumed[1]["segments"], whole[1]["segments"], "resumed scoring reports differently");

    // The sampled protocol: the same tuned model reranks the top 10 of 101 sampled candidates.
    let (out, log) = logged(recfuse(&cfg, "whole", &["eval.protocol=\"sampled\""]));
    assert!(out.status.success(), "{log}");
    let sampled = reports(d.path(), "whole");
    assert!(sampled[1]["protocol"].as_str().unwrap().contains("sampled"), "{}", sampled[1]);
    assert_eq!(metric(&sampled[1], "HR@10"), metric(&sampled[0], "HR@10"));
    assert!(log.contains("restored saved model") || log.contains("ranker fitted"), "{log}");
}

#[test]
fn a_missing_foreign_or_mismatched_artifact_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let model = tiny_model(d.path(), "tiny-chatglm", 3);
    let other = tiny_model(d.path(), "other-chatglm", 4);
    let run = |tuner: &str, extra: &str, name: &str| -> String {
        let cfg = config(d.path(), &model, tuner, extra);
        let (out, log) = logged(recfuse(&cfg, name, &[]));
        // A failed model: the run goes on, reports it, and exits 2.
        assert_eq!(out.status.code(), Some(2), "{name}: {log}");
        let r = reports(d.path(), name);
        assert!(r[0]["error"].is_null(), "the other model is still evaluated");
        r[1]["error"].as_str().unwrap_or_else(|| panic!("{name}: no error in {}", r[1])).to_string()
    };
    let e = run("none", "", "no-tuner");
    assert!(e.contains("this run has no tuner artifact"), "{e}");
    let e = run("identity", "", "identity-tuner");
    assert!(e.contains("artifact is of kind `identity`"), "{e}");
    let e = run("lora", &format!("model = \"{}\"", other.display()), "other-base");
    assert!(e.contains("adapters for another base model") && e.contains("other-chatglm"), "{e}");
    // A task the run does not have is a config error, caught by `validate` before any work.
    let cfg = config(d.path(), &model, "lora", "task = \"rating\"");
    let out = Command::new(env!("CARGO_BIN_EXE_recfuse")).arg("validate").arg(&cfg).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("rankers[1]") && err.contains("`task`: the run has no instruction task `rating` (it has: ctr)"), "{err}");
}
