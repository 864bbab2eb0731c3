//! Candidate scoring of the `llm` ranker's model path on SmolLM2-135M-Instruct against PyTorch +
//! transformers on the same CPU, model and prompts, each with prefix reuse and with full
//! prompts; rounds interleaved (the machine is shared: medians and ratios).
//!
//! Prompts are ML-100K CTR prompts as the default `ctr` template writes them: each user's
//! knowledge from a run's `knowledge.jsonl` (`--run`), then "Candidate item: <title> (class:
//! ...; release_year: ...)" for `--candidates` items drawn from ML-100K's item file; the score is
//! the "Yes" against "No" log-odds at the answer position. transformers gets the same token ids
//! (scripts/bench-llm-ranker-hf.py, skipped with a note when `.cache/venv-peft` is missing) and
//! its scores are checked against ours.
//!
//! Prints a table and JSON lines; the chart goes to `target/bench-results/llm-scoring.png`.
//!
//! `cargo bench -p recfuse --bench llm_scoring -- --run runs/rerank-943 --users 4 --candidates 50 --rounds 3`

mod common;

use common::{arg, median, root};
use recfuse::plot::{grouped_bars, Panel};
use recfuse_llm_engine::tunable::lora::LoraStack;
use recfuse_llm_engine::tunable::score::{log_probs, Query};
use recfuse_llm_engine::tunable::Base;
use recfuse_sdk::SeededRng;
use std::process::Command;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MODES: [&str; 2] = ["prefix-reuse", "full-prompts"];

fn main() -> anyhow::Result<()> {
    // As the `recfuse` binary sets it (framework/src/main.rs): mimalloc without purging.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    let root = root();
    let model = root.join(".cache/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    // Relative to the repository root (cargo runs benches in the package directory).
    let run = root.join(arg("--run", "runs/rerank-943".to_string()));
    let (users, candidates, rounds, batch_tokens) = (arg("--users", 4usize), arg("--candidates", 50usize), arg("--rounds", 3usize), arg("--batch-tokens", 2048usize));
    let base = Base::load(&model)?;
    let knowledge_file = run.join("knowledge.jsonl");
    let knowledge: Vec<String> = std::fs::read_to_string(&knowledge_file)
        .map_err(|e| anyhow::anyhow!("{}: {e} (a run with knowledge: scripts/bench-llm-ranker.sh makes one)", knowledge_file.display()))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_string))
        .take(users)
        .collect();
    anyhow::ensure!(knowledge.len() == users, "{} has {} users with knowledge, {users} asked", run.display(), knowledge.len());
    let items: Vec<String> = std::fs::read_to_string(root.join(".cache/data/ml-100k/ml-100k.item"))?
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            format!("{} (class: {}; release_year: {})", f[1], f[3].replace(' ', ", "), f[2])
        })
        .collect();
    let instruction = "Given the user's behaviour and preferences, will the user interact with the candidate item next? Answer Yes or No.";
    let (yes, no) = (base.answer_ids("Yes")?[0], base.answer_ids("No")?[0]);
    let mut rng = SeededRng::new(7);
    let per_user: Vec<Vec<Query>> = knowledge
        .iter()
        .map(|k| {
            (0..candidates)
                .map(|_| {
                    let item = &items[rng.below(items.len())];
                    Ok(Query::next_token(base.prompt_ids(instruction, &format!("{k}\nCandidate item: {item}"))?, &[yes, no]))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .collect::<anyhow::Result<_>>()?;
    let lora = LoraStack::none();
    let score = |reuse: bool| -> anyhow::Result<(Vec<Vec<f32>>, usize, usize)> {
        let (mut all, mut tokens, mut prefix) = (Vec::new(), 0, 0);
        for qs in &per_user {
            let (lp, work) = log_probs(base.model.as_ref(), &lora, qs, reuse, batch_tokens)?;
            all.push(lp.iter().map(|v| v[0] - v[1]).collect());
            tokens += work.tokens;
            prefix += work.prefix;
        }
        Ok((all, tokens, prefix))
    };
    // The peer scores the same token ids and is checked against our log-odds.
    let (ours, _, prefix_tokens) = score(true)?;
    let dump = std::env::temp_dir().join(format!("recfuse-llm-scoring-{}.json", std::process::id()));
    let prompts: Vec<Vec<&Vec<u32>>> = per_user.iter().map(|qs| qs.iter().map(|q| &q.ids).collect()).collect();
    std::fs::write(&dump, serde_json::to_string(&serde_json::json!({"yes": yes, "no": no, "prompts": prompts, "log_odds": ours}))?)?;
    let python = root.join(".cache/venv-peft/bin/python");

    let (mut mine, mut theirs): ([Vec<f64>; 2], [Vec<f64>; 2]) = Default::default();
    let (mut my_tokens, mut their_tokens, mut their_diff) = ([0usize; 2], [0usize; 2], [0f64; 2]);
    for round in 0..rounds {
        for (m, reuse) in [true, false].into_iter().enumerate() {
            let t = Instant::now();
            let (_, tokens, _) = score(reuse)?;
            mine[m].push(t.elapsed().as_secs_f64());
            my_tokens[m] = tokens;
        }
        if python.exists() {
            let out = Command::new(&python)
                .current_dir(root.join("scripts"))
                .args(["bench-llm-ranker-hf.py", "--gguf", &model.display().to_string(), "--prompts", &dump.display().to_string(), "--rounds", "1", "--batch-tokens", &batch_tokens.to_string()])
                .output()?;
            anyhow::ensure!(out.status.success(), "bench-llm-ranker-hf.py: {}", String::from_utf8_lossy(&out.stderr));
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let v: serde_json::Value = serde_json::from_str(line)?;
                let m = MODES.iter().position(|&x| x == v["mode"]).expect("a known mode");
                theirs[m].push(v["median_seconds"].as_f64().unwrap_or(f64::NAN));
                their_tokens[m] = v["tokens"].as_u64().unwrap_or(0) as usize;
                their_diff[m] = v["max_abs_diff_from_recfuse"].as_f64().unwrap_or(f64::NAN);
            }
        }
        eprintln!("round {}/{rounds}: recfuse {:.1} s / {:.1} s, transformers {:?}", round + 1, mine[0][round], mine[1][round], theirs.iter().map(|t| t.last().copied()).collect::<Vec<_>>());
    }
    std::fs::remove_file(&dump).ok();

    let pairs = (users * candidates) as f64;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("{users} users × {candidates} ML-100K CTR candidates, {} tokens per prompt on average, {:.0} of them shared by a user's prompts; {rounds} rounds, medians; load {}", my_tokens[1] / (users * candidates), prefix_tokens as f64 / users as f64, load.trim());
    println!("\n| mode | recfuse s | recfuse candidates/s | transformers s | transformers candidates/s | ratio | max abs Δ log-odds |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut cps = [[0f64; 2]; 2]; // [engine][mode]
    for (m, mode) in MODES.iter().enumerate() {
        let s = median(mine[m].clone());
        cps[0][m] = pairs / s;
        let json = |engine: &str, secs: f64, tokens: usize, diff: Option<f64>| {
            serde_json::json!({"bench": "llm-scoring", "engine": engine, "mode": mode, "users": users, "candidates_per_user": candidates, "rounds": rounds,
                "median_seconds": secs, "candidates_per_second": pairs / secs, "tokens": tokens, "tokens_per_second": tokens as f64 / secs,
                "max_abs_diff_from_recfuse": diff, "loadavg": load.trim()})
        };
        if theirs[m].is_empty() {
            println!("| {mode} | {s:.1} | {:.1} | – | – | – | – |", pairs / s);
            eprintln!("{}", json("recfuse", s, my_tokens[m], None));
        } else {
            let o = median(theirs[m].clone());
            cps[1][m] = pairs / o;
            println!("| {mode} | {s:.1} | {:.1} | {o:.1} | {:.1} | {:.2} | {:.1e} |", pairs / s, pairs / o, o / s, their_diff[m]);
            eprintln!("{}\n{}", json("recfuse", s, my_tokens[m], None), json("transformers", o, their_tokens[m], Some(their_diff[m])));
        }
    }
    println!("\nprefix reuse speed-up: recfuse {:.2}×{}", cps[0][0] / cps[0][1], if cps[1][1] > 0.0 { format!(", transformers {:.2}×", cps[1][0] / cps[1][1]) } else { String::new() });
    if !python.exists() {
        println!("\n{} missing (scripts/bench-llm-ranker.sh sets it up): no comparison.", python.display());
    }
    let chart = root.join("target/bench-results/llm-scoring.png");
    std::fs::create_dir_all(chart.parent().unwrap())?;
    let panel = Panel {
        title: format!("candidate scoring, SmolLM2-135M, ML-100K CTR prompts ({users} users × {candidates} candidates)"),
        categories: vec!["prefix reuse".into(), "full prompts".into()],
        series: vec![("recfuse (candle)".into(), cps[0].to_vec()), ("PyTorch + transformers".into(), cps[1].to_vec())],
        y_label: "candidates/s".into(),
    };
    match grouped_bars(&[panel], &chart) {
        Ok(()) => println!("chart: {}", chart.display()),
        Err(e) => println!("no chart: {e:#}"),
    }
    Ok(())
}
