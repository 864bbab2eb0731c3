//! `recfuse serve` under load: oha (a maintained HTTP load generator from crates.io, installed
//! into `.cache/tools` by `scripts/bench-serve.sh`) against the server on loopback. Each
//! request asks for the top 10 of 1000 candidates for one ML-100K user, with 1, 8 and 32
//! connections, for BPR, SASRec and the `ort` feature MLP (MiniLM embeddings of template
//! knowledge and movie texts, through ONNX Runtime) fitted on all of ML-100K.
//!
//! Reports throughput and p50/p99 latency as oha measures them (client side, including HTTP and
//! JSON). Prints a table and JSON lines (also `target/bench-results/serve-load.jsonl`), and the
//! chart `target/bench-results/serve-load.png`.
//!
//! `cargo bench -p recfuse --bench serve -- --seconds 15 --oha .cache/tools/bin/oha`

mod common;

use common::{arg, root};
use recfuse::plot::{grouped_bars, Panel};
use std::process::Command;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds: u64 = arg("--seconds", 15);
    let oha = common::oha_path("scripts/bench-serve.sh");
    let data = root().join(".cache/data/ml-100k");
    assert!(data.join(".complete").exists(), "MovieLens-100K missing: run scripts/fetch-data.sh");
    // The run to serve: fitted once, kept in target/ for reruns of the bench.
    let runs = root().join("target/bench-serve");
    let config = runs.join("serve.toml");
    std::fs::create_dir_all(&runs).unwrap();
    std::fs::write(
        &config,
        format!(
            "[run]\nname = \"served\"\ndir = \"{}\"\n\n[source]\nkind = \"recbole-atomic\"\ndir = \"{}\"\nname = \"ml-100k\"\n\n\
             [eval]\nmax_users = 100\n\n[[rankers]]\nkind = \"bpr\"\n\n[[rankers]]\nkind = \"sasrec\"\n\n\
             [[fusers]]\nkind = \"template\"\n\n[embed]\ndir = \"{minilm}\"\nruntime_library = \"{lib}\"\n\n\
             [[rankers]]\nkind = \"ort\"\nruntime_library = \"{lib}\"\n[rankers.train]\nepochs = 24\n",
            runs.display(),
            data.display(),
            minilm = root().join(".cache/data/minilm").display(),
            lib = root().join(".cache/data/onnxruntime/libonnxruntime.so.1.31.1").display(),
        ),
    )
    .unwrap();
    let ran = Command::new(env!("CARGO_BIN_EXE_recfuse")).args(["run", config.to_str().unwrap(), "--quiet"]).status().unwrap();
    assert!(ran.success(), "the run to serve failed");

    let candidates: Vec<String> = (1..=1000).map(|i| i.to_string()).collect();
    let body = serde_json::json!({"user": "196", "k": 10, "candidates": candidates}).to_string();
    let connections = [1usize, 8, 32];
    let mut lines = Vec::new();
    let mut panels = Vec::new();
    println!("\n| ranker | connections | requests/s | p50 ms | p99 ms |\n|---|---:|---:|---:|---:|");
    for ranker in ["bpr", "sasrec", "ort"] {
        let server = recfuse::serve::spawn(recfuse::serve::ServeOptions {
            run_dir: runs.join("served"),
            addr: "127.0.0.1:0".parse().unwrap(),
            ranker: Some(ranker.into()),
            api_key: Default::default(),
            limits: Default::default(),
        })
        .unwrap();
        let url = format!("http://{}/v1/recommend", server.addr);
        let (mut p50s, mut p99s, mut rates) = (Vec::new(), Vec::new(), Vec::new());
        for &c in &connections {
            let load = common::oha(&oha, &url, &body, c, seconds);
            let total = load.ok() + load.not_ok();
            assert_eq!(load.not_ok(), 0, "non-200 answers under load: {:?}", load.codes);
            let (p50, p99) = (load.p50.expect("answers") * 1e3, load.p99.expect("answers") * 1e3);
            let rate = load.requests_per_s;
            println!("| {ranker} | {c} | {rate:.0} | {p50:.2} | {p99:.2} |");
            let line = serde_json::json!({"bench": "serve-load", "ranker": ranker, "connections": c, "seconds": seconds,
                "candidates": 1000, "k": 10, "requests": total, "requests_per_s": rate, "p50_ms": p50, "p99_ms": p99});
            println!("{line}");
            lines.push(line.to_string());
            p50s.push(p50);
            p99s.push(p99);
            rates.push(rate);
        }
        server.shutdown().unwrap();
        let categories: Vec<String> = connections.iter().map(|c| format!("{c} connection{}", if *c == 1 { "" } else { "s" })).collect();
        panels.push(Panel {
            title: format!("{ranker}: latency, top 10 of 1000 candidates (oha, loopback, 2 cores)"),
            y_label: "milliseconds".into(),
            categories: categories.clone(),
            series: vec![("p50".into(), p50s), ("p99".into(), p99s)],
        });
        panels.push(Panel { title: format!("{ranker}: throughput"), y_label: "requests per second".into(), categories, series: vec![("requests/s".into(), rates)] });
    }
    let out_dir = root().join("target/bench-results");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("serve-load.jsonl"), lines.join("\n") + "\n").unwrap();
    if let Err(e) = grouped_bars(&panels, &out_dir.join("serve-load.png")) {
        eprintln!("no chart: {e:#}");
    }
}
