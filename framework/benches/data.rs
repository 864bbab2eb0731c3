//! Data-path benchmarks on MovieLens-1M (issue 4): loading through the source plugin, the
//! leave-one-out split, full-ranking evaluation of given scores, and BPR seconds per epoch.
//! Prints one JSON line per measurement (median of `RUNS`), for scripts/bench-data.sh, which
//! runs the Python peers (pandas, numpy) in the same session and writes the comparison.
//!
//! Run: `cargo bench -p recfuse --bench data` (needs `scripts/fetch-data.sh ml-1m`).

mod common;

use common::timed;
use recfuse::config::{EvalSection, SplitSection};
use recfuse::eval;
use recfuse::handles::FitData;
use recfuse::registry::Registry;
use recfuse::split::split_dataset;
use std::time::Instant;

const RUNS: usize = 5;

fn host(name: &str) -> recfuse_sdk::ffi::HostFfiBox {
    common::host(name, 7)
}

fn median<T>(f: impl FnMut() -> T) -> (f64, T) {
    timed(RUNS, f)
}

fn main() {
    let dir = common::root().join(".cache/data/ml-1m");
    assert!(dir.join(".complete").exists(), "run scripts/fetch-data.sh ml-1m first");
    let reg = Registry::with_builtins().unwrap();
    let cfg = serde_json::json!({"dir": dir, "name": "ml-1m", "kind_rules": [{"min": 4.0, "kind": "like"}]});

    let (load_s, ds) = median(|| reg.source("recbole-atomic", &cfg, host("source")).unwrap().load().unwrap());
    println!("{{\"what\": \"load ml-1m (recbole-atomic source)\", \"seconds\": {load_s:.4}, \"events\": {}}}", ds.events.len());

    let (split_s, split) = median(|| split_dataset(&ds, &SplitSection::default()));
    println!("{{\"what\": \"leave-one-out split\", \"seconds\": {split_s:.4}, \"users\": {}}}", split.evaluable_users().len());

    let eval_cfg = EvalSection::default();
    let users = eval::pick_users(&split, 0);
    let negatives = eval::sample_negatives(&split, &ds, &users, &eval_cfg, 1);
    let mut pop = reg.ranker("popularity", &serde_json::json!({}), host("ranker")).unwrap();
    pop.fit(&FitData::views(&split.train, &split.context)).unwrap();
    let (eval_s, rep) = median(|| {
        let ctx = eval::EvalContext { split: &split, cfg: &eval_cfg, users: &users, negatives: &negatives, batch_size: 512 };
        eval::evaluate(&pop, None, "popularity", &ctx, |_| Ok(())).unwrap()
    });
    println!(
        "{{\"what\": \"full-ranking evaluation ({} users x {} items, popularity scores)\", \"seconds\": {eval_s:.4}, \"hr10\": {:.4}}}",
        users.len(),
        ds.catalog.items.len(),
        rep.segments["all"].metrics["HR@10"]
    );

    let epochs = 3;
    let bpr_cfg = serde_json::json!({"dim": 64, "epochs": epochs, "seed": 1, "patience": 0});
    let mut bpr = reg.ranker("bpr", &bpr_cfg, host("bpr")).unwrap();
    let t = Instant::now();
    bpr.fit(&FitData::views(&split.train, &split.context)).unwrap();
    let per_epoch = t.elapsed().as_secs_f64() / epochs as f64;
    println!("{{\"what\": \"bpr epoch (dim 64, {} positives)\", \"seconds\": {per_epoch:.4}}}", split.train.events.len());

    // Peak resident memory of this whole process (loading, split, evaluation, BPR).
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak = status.lines().find(|l| l.starts_with("VmHWM")).unwrap_or("VmHWM: ? kB").to_string();
    println!("{{\"what\": \"peak RSS\", \"value\": \"{}\"}}", peak.trim_start_matches("VmHWM:").trim());
}
