//! The cost of the plugin boundary: one batched `score` call (1000 users × 1000 candidates) on
//! the popularity ranker, three ways, interleaved in one run:
//! * `static`  : the plugin crate linked in, its safe `Ranker::score` called directly;
//! * `builtin` : the same crate linked in, called through the FFI shim (how built-ins run);
//! * `dynamic` : the same crate built as a cdylib, loaded with abi_stable, called through it.
//!
//! Run: `cargo bench -p recfuse --bench boundary` (needs `scripts/fetch-data.sh`).
//! Prints medians and ratios as a Markdown table for docs/benchmarks.md.

mod common;

use common::{median, root};
use recfuse::config::SplitSection;
use recfuse::handles::FitData;
use recfuse::host::HostServices;
use recfuse::registry::Registry;
use recfuse::split::split_dataset;
use recfuse_plugin_popularity_ranker::{Popularity, PopularityConfig};
use recfuse_sdk::prelude::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

const USERS: usize = 1000;
const CANDIDATES: usize = 1000;
const ROUNDS: usize = 300;

/// Builds the popularity plugin as a stand-alone cdylib (release, SDK without the host feature).
fn build_dynamic_plugin() -> PathBuf {
    let target = root().join("target/bench-plugins");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root())
        .args(["build", "--quiet", "--release", "-p", "recfuse-plugin-popularity-ranker", "--target-dir"])
        .arg(&target)
        .status()
        .expect("cargo runs");
    assert!(status.success());
    target.join("release/librecfuse_plugin_popularity_ranker.so")
}

fn host() -> HostServices {
    HostServices::detached("ranker", std::env::temp_dir(), 1)
}

fn main() {
    let data = root().join(".cache/data/ml-100k");
    assert!(data.join(".complete").exists(), "run scripts/fetch-data.sh first");
    let lib = build_dynamic_plugin();

    // Real data: ML-100K, leave-one-out train view.
    let builtins = Registry::with_builtins().unwrap();
    let src_cfg = serde_json::json!({"dir": data, "name": "ml-100k"});
    let dataset = builtins.source("recbole-atomic", &src_cfg, host().into_ffi()).unwrap().load().unwrap();
    let split = split_dataset(&dataset, &SplitSection::default());
    let n_items = dataset.catalog.items.len() as u64;

    // Per-user candidate lists (sampled-ranking layout), deterministic.
    let users: Vec<u32> = (0..USERS as u32).map(|u| u % dataset.catalog.users.len() as u32).collect();
    let mut x = 0x2545F4914F6CDD1Du64;
    let items: Vec<u32> = (0..USERS * CANDIDATES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n_items) as u32
        })
        .collect();
    let batch = ScoreBatch { users: &users, items: &items, shared: false };

    let mut direct = Popularity::new(PopularityConfig::default(), Host::standalone(std::env::temp_dir(), 1)).unwrap();
    direct.fit(&split.train.view(), &FitInputs::default()).unwrap();
    let mut builtin = builtins.ranker("popularity", &serde_json::json!({}), host().into_ffi()).unwrap();
    builtin.fit(&FitData::views(&split.train, &split.context)).unwrap();
    let mut dynamic_reg = Registry::empty();
    dynamic_reg.load_library(&lib).unwrap();
    let mut dynamic = dynamic_reg.ranker("popularity", &serde_json::json!({}), host().into_ffi()).unwrap();
    dynamic.fit(&FitData::views(&split.train, &split.context)).unwrap();

    // All paths must agree; then all are timed writing into one buffer, so that where a buffer
    // landed in memory (huge pages or not) cannot favour one path.
    let mut check = [vec![0f32; USERS * CANDIDATES], vec![0f32; USERS * CANDIDATES], vec![0f32; USERS * CANDIDATES]];
    direct.score(&batch, &mut check[0]).unwrap();
    builtin.score(&batch, &mut check[1]).unwrap();
    dynamic.score(&batch, &mut check[2]).unwrap();
    assert!(check[0] == check[1] && check[0] == check[2], "all three paths must give the same scores");
    drop(check);
    let mut out = vec![0f32; USERS * CANDIDATES];
    let (mut t_static, mut t_builtin, mut t_dynamic) = (vec![], vec![], vec![]);
    let (mut r_builtin, mut r_dynamic) = (vec![], vec![]);
    for round in 0..ROUNDS + 20 {
        // Rotate which path goes first, so cache warmth from the previous call favours none.
        let mut times = [0f64; 3];
        for k in 0..3 {
            let path = (round + k) % 3;
            let t = Instant::now();
            match path {
                0 => direct.score(&batch, &mut out).unwrap(),
                1 => builtin.score(&batch, &mut out).unwrap(),
                _ => dynamic.score(&batch, &mut out).unwrap(),
            }
            times[path] = t.elapsed().as_secs_f64();
        }
        let [s, b, d] = times;
        if round >= 20 {
            // the first rounds warm caches and page in the library
            t_static.push(s);
            t_builtin.push(b);
            t_dynamic.push(d);
            r_builtin.push(b / s);
            r_dynamic.push(d / s);
        }
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("boundary benchmark: {USERS} users x {CANDIDATES} candidates per call, {ROUNDS} interleaved rounds");
    println!("load average at end: {}", load.trim());
    println!();
    println!("| path | median ms/call | median ratio to static (paired) |");
    println!("|---|---:|---:|");
    println!("| static (safe trait, linked) | {:.3} | 1.000 |", median(t_static.clone()) * 1e3);
    println!("| builtin (FFI shim, linked) | {:.3} | {:.3} |", median(t_builtin.clone()) * 1e3, median(r_builtin.clone()));
    println!("| dynamic (cdylib via abi_stable) | {:.3} | {:.3} |", median(t_dynamic.clone()) * 1e3, median(r_dynamic.clone()));
}
