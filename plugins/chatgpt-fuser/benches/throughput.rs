//! Fuser throughput against a loopback server that answers every request after a fixed latency:
//! with `concurrency` requests in flight the ideal is concurrency ÷ latency requests per second;
//! the target is ≥ 90% of it (the rest is HTTP, JSON, the limiter, and the per-answer cache sync).
//!
//! Each concurrency level fuses `WAVES × concurrency` users, so every level runs the same
//! number of full waves and the ramp-up/tail cost the same share.
//!
//! `cargo bench -p recfuse-plugin-chatgpt-fuser --bench throughput [-- WAVES LATENCY_MS]`

use recfuse_plugin_chatgpt_fuser::ChatGptFuser;
use recfuse_sdk::prelude::*;
use std::net::TcpListener;
use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

fn serve(latency: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                if support::read_body(&stream).is_some() {
                    std::thread::sleep(latency);
                    support::reply(&mut stream, "200 OK", "", &support::completion("likes films", 120, 40));
                }
            });
        }
    });
    url
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let waves: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(15);
    let levels = [1usize, 4, 16, 32, 64];
    let users = waves * levels[levels.len() - 1];
    let latency = Duration::from_millis(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200));
    let url = serve(latency);
    let catalog = Catalog {
        items: vec![Item { id: "1".into(), title: "Heat".into(), ..Default::default() }],
        users: (0..users).map(|u| User { id: format!("u{u}"), ..Default::default() }).collect(),
        kinds: vec!["like".into()],
        scenarios: vec!["".into()],
        ..Default::default()
    };
    let events: Vec<Event> = (0..users as u32)
        .map(|u| Event { user: u, item: 0, kind: 0, scenario: 0, subject: NONE, value: 5.0, timestamp: 1 })
        .collect();
    let offsets: Vec<u32> = (0..=users as u32).collect();
    let view = TrainView { catalog: &catalog, events: &events, offsets: &offsets };
    let all: Vec<u32> = (0..users as u32).collect();
    println!("{waves} waves of `concurrency` users, server latency {} ms", latency.as_millis());
    println!("| concurrency | seconds | requests/s | ideal (c ÷ latency) | achieved |");
    println!("|---:|---:|---:|---:|---:|");
    for concurrency in levels {
        let n = waves * concurrency;
        let dir = tempfile::tempdir().unwrap();
        let cfg = serde_json::json!({
            "base_url": url, "model": "bench", "concurrency": concurrency,
            "requests_per_minute": 1_000_000, "tokens_per_minute": 1_000_000_000,
        });
        let mut fuser = ChatGptFuser::new(serde_json::from_value(cfg).unwrap(), Host::standalone(dir.path(), 1)).unwrap();
        let t = Instant::now();
        let out = fuser.fuse(&view, &all[..n]).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(out.len(), n, "every user answered");
        let rate = n as f64 / secs;
        let ideal = concurrency as f64 / latency.as_secs_f64();
        println!("| {concurrency} | {secs:.2} | {rate:.1} | {ideal:.1} | {:.1}% |", 100.0 * rate / ideal);
    }
}
