//! Full-ranking evaluation speed on MovieLens-1M (ratings ≥ 3, leave-one-out, 6,040 users ×
//! 3,706 items, 512 users per batch): popularity, BPR and SASRec, each fitted briefly (speed
//! does not depend on accuracy), then `eval::evaluate` timed, median of `RUNS`. Prints one JSON
//! line per model; `scripts/bench-eval.sh` runs RecBole 1.2.1's evaluation of the same models
//! in the same session and writes the comparison.
//!
//! Run: `cargo bench -p recfuse --bench eval` (needs `scripts/fetch-data.sh ml-1m`).

mod common;

use common::{host, timed};
use recfuse::config::{EvalSection, SplitSection};
use recfuse::eval;
use recfuse::handles::FitData;
use recfuse::registry::Registry;
use recfuse::split::split_dataset;

// The allocator the `recfuse` binary uses: glibc's returns candle's large tensors to the OS and
// page-faults them back on every op.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUNS: usize = 5;
const USERS_PER_BATCH: usize = 512;

fn main() {
    let dir = common::root().join(".cache/data/ml-1m");
    assert!(dir.join(".complete").exists(), "run scripts/fetch-data.sh ml-1m first");
    let reg = Registry::with_builtins().unwrap();
    let cfg = serde_json::json!({"dir": dir, "name": "ml-1m", "min_rating": 3.0});
    let ds = reg.source("recbole-atomic", &cfg, host("source", 1)).unwrap().load().unwrap();
    let split = split_dataset(&ds, &SplitSection::default());
    let eval_cfg = EvalSection::default();
    let users = eval::pick_users(&split, 0);
    let negatives = eval::sample_negatives(&split, &ds, &users, &eval_cfg, 1);
    let models = [
        ("popularity", serde_json::json!({})),
        ("bpr", serde_json::json!({"dim": 64, "epochs": 2, "patience": 0, "seed": 1})),
        (
            "sasrec",
            serde_json::json!({"dim": 64, "layers": 2, "heads": 1, "inner": 256, "max_len": 50, "epochs": 1, "batch_size": 256, "seed": 1}),
        ),
    ];
    // Optional model names on the command line (`cargo bench --bench eval -- sasrec`).
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    for (kind, settings) in models.into_iter().filter(|(k, _)| only.is_empty() || only.iter().any(|o| o == k)) {
        let mut ranker = reg.ranker(kind, &settings, host(kind, 1)).unwrap();
        ranker.fit(&FitData::views(&split.train, &split.context)).unwrap();
        let (seconds, rep) = timed(RUNS, || {
            {
                let ctx = eval::EvalContext { split: &split, cfg: &eval_cfg, users: &users, negatives: &negatives, batch_size: USERS_PER_BATCH };
                eval::evaluate(&ranker, None, kind, &ctx, |_| Ok(())).unwrap()
            }
        });
        println!(
            "{{\"model\": \"{kind}\", \"users\": {}, \"items\": {}, \"users_per_batch\": {USERS_PER_BATCH}, \"seconds\": {seconds:.4}, \"ndcg10\": {:.4}}}",
            users.len(),
            ds.catalog.items.len(),
            rep.segments["all"].metrics["NDCG@10"]
        );
    }
}
