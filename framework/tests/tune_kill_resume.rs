//! `kill -9` in the middle of LoRA tuning: the `recfuse` binary is killed after its first
//! checkpoint, run again, and ends with exactly the adapters (and loss curve) of a run that was
//! never interrupted. Uses a tiny random ChatGLM checkpoint the test writes, so it runs in
//! seconds; the tuner code path is the one SmolLM2 takes.
#![cfg(feature = "lora")]

use recfuse_llm_engine::tunable::chatglm::{write_random_checkpoint, ChatGlmConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn recfuse(config: &Path, run: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_recfuse"));
    c.arg("run").arg(config).arg("--quiet").args(["--set", &format!("run.name=\"{run}\"")]);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c
}

#[test]
fn kill_dash_nine_mid_tuning_resumes_to_the_uninterrupted_adapters() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/data/ml-100k");
    assert!(data.join(".complete").exists(), "MovieLens-100K missing: run scripts/fetch-data.sh");
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny-chatglm");
    let words = ["Liked", "Disliked", "movies", "Candidate", "item:", "Yes", "No", "1", "2", "3", "4", "5"];
    write_random_checkpoint(&model, &ChatGlmConfig::tiny(64), &words, 3).unwrap();
    let config = d.path().join("tune.toml");
    std::fs::write(
        &config,
        format!(
            r#"[run]
dir = "{runs}"
sample_users = 16

[source]
kind = "recbole-atomic"
dir = "{data}"
name = "ml-100k"

[[fusers]]
kind = "template"
max_per_kind = 3

[[instructions]]
kind = "ctr"
[[instructions]]
kind = "rating"

[tuner]
kind = "lora"
model = "{model}"
target_modules = ["query_key_value", "dense_4h_to_h"]
epochs = 12
batch_size = 4
micro_batch = 2
learning_rate = 0.01
checkpoint_every = 3
valid_examples = 8
"#,
            runs = d.path().join("runs").display(),
            data = data.display(),
            model = model.display()
        ),
    )
    .unwrap();

    assert!(recfuse(&config, "whole").status().unwrap().success());
    let part = d.path().join("runs/part");
    let mut child = recfuse(&config, "part").spawn().unwrap();
    let t = Instant::now();
    while !part.join("tuner/checkpoint.json").exists() {
        assert!(t.elapsed() < Duration::from_secs(300), "no checkpoint written");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!part.join("tuner/lora.json").exists(), "the kill came too late to test anything");
    // Rerun, with its log: it must continue from the checkpoint, not start over (a fresh
    // deterministic run would also end with the same adapters).
    let out = recfuse(&config, "part").env("RECFUSE_LOG", "info").stderr(Stdio::piped()).output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("lora: resuming from the checkpoint at step"), "{log}");

    let adapter = |run: &str| std::fs::read(d.path().join(format!("runs/{run}/tuner/adapters/default/adapter_model.safetensors"))).unwrap();
    assert_eq!(adapter("part"), adapter("whole"), "resumed adapters differ from the uninterrupted run's");
    let manifest = |run: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.path().join(format!("runs/{run}/manifest.json"))).unwrap()).unwrap()
    };
    let (whole, resumed) = (manifest("whole"), manifest("part"));
    let train = &resumed["tuner"]["meta"]["train"];
    assert_eq!(train["loss_curve"], whole["tuner"]["meta"]["train"]["loss_curve"]);
    assert!(train["steps"].as_u64().unwrap() > 3, "{train}");
    assert_eq!(resumed["tuner"]["kind"], "lora");
    assert!(part.join("tuner/loss.png").exists(), "loss chart");
    assert_eq!(resumed["tuner"]["meta"]["base_model"]["family"], "chatglm");
    assert_eq!(resumed["tuner"]["meta"]["base_model"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(resumed["tuner"]["meta"]["tasks"], serde_json::json!(["ctr", "rating"]));
}
