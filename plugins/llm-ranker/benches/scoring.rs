//! Candidate scoring throughput of the `llm` ranker's model path on SmolLM2-135M-Instruct,
//! with each user's prompt prefix run once (prefix reuse) against every prompt in full, side
//! by side on the same prompts, interleaved rounds, medians.
//!
//! Prompts are ML-100K CTR prompts as the default `ctr` template writes them: the user's
//! knowledge from a run's `knowledge.jsonl` (`--run`, e.g. the quickstart's), then
//! "Candidate item: <title> (class: ...; release_year: ...)" for `--candidates` items drawn
//! from `.cache/data/ml-100k/ml-100k.item`, read at the answer position ("Yes" vs "No").
//! Prints one JSON line per mode with the medians.
//!
//! cargo bench -p recfuse-plugin-llm-ranker --bench scoring -- --run runs/quickstart --users 4 --candidates 50 --rounds 3

use recfuse_llm_engine::tunable::lora::LoraStack;
use recfuse_llm_engine::tunable::score::{log_probs, Query};
use recfuse_llm_engine::tunable::Base;
use recfuse_sdk::SeededRng;
use std::path::PathBuf;
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    // As the `recfuse` binary sets it (framework/src/main.rs): mimalloc without purging.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let model = PathBuf::from(arg("--model", root.join(".cache/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").display().to_string()));
    let run = PathBuf::from(arg("--run", root.join("runs/quickstart").display().to_string()));
    let (users, candidates, rounds, batch_tokens) = (arg("--users", 4usize), arg("--candidates", 50usize), arg("--rounds", 3usize), arg("--batch-tokens", 2048usize));
    let base = Base::load(&model)?;
    let knowledge: Vec<String> = std::fs::read_to_string(run.join("knowledge.jsonl"))
        .map_err(|e| anyhow::anyhow!("{}: {e} (run the quickstart first, or pass --run)", run.join("knowledge.jsonl").display()))?
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
    let mut seconds = [vec![], vec![]];
    let mut tokens = [0usize; 2];
    let mut prefix = 0;
    for round in 0..rounds {
        // `--only-reuse 1`: the prefix-reuse path alone (profiling).
        let modes: &[bool] = if arg("--only-reuse", 0u8) == 1 { &[true] } else { &[true, false] };
        for (m, &reuse) in modes.iter().enumerate() {
            let t = Instant::now();
            let mut n = 0;
            for qs in &per_user {
                let (_, work) = log_probs(base.model.as_ref(), &lora, qs, reuse, batch_tokens)?;
                n += work.tokens;
                if reuse {
                    prefix += work.prefix;
                }
            }
            seconds[m].push(t.elapsed().as_secs_f64());
            tokens[m] = n;
            eprintln!("round {round}: prefix_reuse={reuse}: {:.1} s, {n} tokens", seconds[m].last().unwrap());
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let pairs = users * candidates;
    if seconds[1].is_empty() {
        println!("{}", serde_json::json!({"mode": "prefix-reuse", "median_seconds": median(seconds[0].clone()), "tokens_per_second": tokens[0] as f64 / median(seconds[0].clone())}));
        return Ok(());
    }
    let s = [median(seconds[0].clone()), median(seconds[1].clone())];
    for (m, name) in ["prefix-reuse", "full-prompts"].iter().enumerate() {
        println!(
            "{}",
            serde_json::json!({
                "mode": name, "users": users, "candidates_per_user": candidates, "rounds": rounds,
                "median_seconds": s[m], "candidates_per_second": pairs as f64 / s[m],
                "tokens": tokens[m], "tokens_per_second": tokens[m] as f64 / s[m],
                "mean_prefix_tokens": prefix as f64 / (rounds * users) as f64,
                "speedup_of_prefix_reuse": s[1] / s[0], "loadavg": load.trim(),
            })
        );
    }
    Ok(())
}
