//! Fuse-stage throughput of a sharded run: 1, 2 and 4 local `recfuse run --shard i/n`
//! processes fuse ML-100K users through the `chatgpt` fuser against a loopback
//! OpenAI-compatible server that answers every request after `--delay-ms` (200 ms, a fast
//! API). Rounds interleave the shard counts (the machine is shared: medians and ratios).
//!
//! The wall time is from spawning the shards to the last one exiting (process start, dataset
//! load and split included, as an engine sees it). Each shard keeps the fuser's `concurrency`
//! and takes 1/n of the run's rate limits (set high enough not to bind here).
//!
//! Prints a table and JSON lines (also `target/bench-results/shards.jsonl`), and the chart
//! `target/bench-results/shards.png`; the request size the server saw feeds the cost estimate
//! in docs/scale-out.md.
//!
//! `cargo bench -p recfuse --bench shards -- --users 0 --rounds 3 --delay-ms 200 --concurrency 4`

mod common;

use common::{arg, median, root};
use recfuse::plot::{grouped_bars, Panel};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../../plugins/chatgpt-fuser/tests/support/mod.rs"]
mod support;

/// Requests answered and the bytes of their bodies.
#[derive(Default)]
struct Seen {
    requests: AtomicU64,
    body_bytes: AtomicU64,
}

fn serve(delay: Duration) -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    let url = support::serve_users(move |user, body, stream| {
        std::thread::sleep(delay);
        support::reply(stream, "200 OK", "", &support::likes_films(user));
        s.requests.fetch_add(1, Ordering::Relaxed);
        s.body_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    });
    (url, seen)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench` lists benches; nothing to list
    }
    let users: usize = arg("--users", 0);
    let rounds: usize = arg("--rounds", 3);
    let delay_ms: u64 = arg("--delay-ms", 200);
    let concurrency: usize = arg("--concurrency", 4);
    let counts: Vec<usize> = arg("--shards", "1,2,4".to_string()).split(',').map(|s| s.trim().parse().expect("shard counts")).collect();
    let data = root().join(".cache/data/ml-100k");
    assert!(data.join(".complete").exists(), "MovieLens-100K missing: run scripts/fetch-data.sh");
    let (url, seen) = serve(Duration::from_millis(delay_ms));
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("fuse.toml");
    std::fs::write(
        &config,
        format!(
            "[run]\nname = \"fuse\"\ndir = \"{runs}\"\nsample_users = {users}\nbatch_size = 32\n\n\
             [source]\nkind = \"recbole-atomic\"\ndir = \"{data}\"\nname = \"ml-100k\"\n\n\
             [[fusers]]\nkind = \"chatgpt\"\nbase_url = \"{url}\"\nmodel = \"m\"\nconcurrency = {concurrency}\n\
             requests_per_minute = 1000000\ntokens_per_minute = 1000000000\n",
            runs = tmp.path().join("runs").display(),
            data = data.display()
        ),
    )
    .unwrap();

    let mut walls: Vec<Vec<f64>> = vec![Vec::new(); counts.len()];
    let mut fused_users = 0usize;
    for round in 0..rounds {
        for (k, &n) in counts.iter().enumerate() {
            let run_dir = tmp.path().join(format!("runs/r{round}-n{n}"));
            let before = seen.requests.load(Ordering::Relaxed);
            let t = Instant::now();
            let children: Vec<_> = (0..n)
                .map(|i| {
                    Command::new(env!("CARGO_BIN_EXE_recfuse"))
                        .args(["run", config.to_str().unwrap(), "--quiet", "--shard", &format!("{i}/{n}"), "--run-dir", run_dir.to_str().unwrap()])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap()
                })
                .collect();
            for mut c in children {
                assert!(c.wait().unwrap().success(), "a shard failed");
            }
            let wall = t.elapsed().as_secs_f64();
            fused_users = (seen.requests.load(Ordering::Relaxed) - before) as usize;
            walls[k].push(wall);
            eprintln!("round {round}: {n} shard(s): {fused_users} users in {wall:.2} s");
        }
    }
    let requests = seen.requests.load(Ordering::Relaxed).max(1);
    let prompt_chars = seen.body_bytes.load(Ordering::Relaxed) as f64 / requests as f64;
    let one = fused_users as f64 / median(walls[0].clone());
    let out_dir = root().join("target/bench-results");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut lines = Vec::new();
    println!("\n| shards | wall s (median of {rounds}) | users/s | speed-up | of linear |\n|---:|---:|---:|---:|---:|");
    let mut measured = Vec::new();
    let mut linear = Vec::new();
    for (k, &n) in counts.iter().enumerate() {
        let wall = median(walls[k].clone());
        let rate = fused_users as f64 / wall;
        let speedup = rate / one;
        println!("| {n} | {wall:.2} | {rate:.1} | {speedup:.2}× | {:.0}% |", 100.0 * speedup / (n as f64 / counts[0] as f64));
        measured.push(rate);
        linear.push(one * n as f64 / counts[0] as f64);
        let line = serde_json::json!({
            "bench": "shards", "shards": n, "users": fused_users, "delay_ms": delay_ms, "concurrency": concurrency,
            "wall_s": walls[k], "median_wall_s": wall, "users_per_s": rate, "speedup": speedup,
            "request_body_chars": prompt_chars,
        });
        println!("{line}");
        lines.push(line.to_string());
    }
    std::fs::write(out_dir.join("shards.jsonl"), lines.join("\n") + "\n").unwrap();
    let panel = Panel {
        title: format!("fuse stage: {fused_users} ML-100K users, chatgpt fuser, {delay_ms} ms loopback API, concurrency {concurrency} per shard"),
        y_label: "users fused per second".into(),
        categories: counts.iter().map(|n| format!("{n} shard{}", if *n == 1 { "" } else { "s" })).collect(),
        series: vec![("measured (median)".into(), measured), ("linear (n × 1 shard)".into(), linear)],
    };
    if let Err(e) = grouped_bars(&[panel], &out_dir.join("shards.png")) {
        eprintln!("no chart: {e:#}");
    }
    println!("mean request body: {prompt_chars:.0} characters");
}
