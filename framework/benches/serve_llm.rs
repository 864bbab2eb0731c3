//! `recfuse serve-llm` under load against llama.cpp's own `llama-server`, on the same GGUF
//! (SmolLM2-135M-Instruct Q4_1) and machine, side by side in one run: oha sends OpenAI chat
//! completions (a prompt that makes the model write, `max_tokens` 32, greedy) with 1, 8 and 32
//! concurrent clients, alternating the servers level by level:
//! - `recfuse`: defaults (the int8 kernel where the CPU has it, the prefix cache);
//! - `recfuse-no-prefix-cache`: the same with `--prefix-cache-mb 0`;
//! - `llama-server` (built by `scripts/build-llama-cpp.sh`; caches prompts per slot by default).
//!
//! All get 2 threads and room for 32 parallel requests. Prints a table; writes
//! `target/bench-results/serve-llm-load.json` (rows, load average, the recfuse servers'
//! `/metrics`) and the chart `serve-llm-load.png`. Exits non-zero if a server answered no
//! request at some level (after writing what it measured).
//!
//! `scripts/bench-serve-llm.sh [SECONDS]` installs oha and builds llama-server, then runs
//! `cargo bench -p recfuse --bench serve_llm -- --seconds 20`.

mod common;

use common::{arg, root};
use recfuse::plot::{grouped_bars, Panel};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A server process, stopped when dropped (also when the bench panics).
struct Server {
    name: &'static str,
    port: u16,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `program args` with `--port`-style arguments filled in by `with_port`, and waits
/// until `/health` answers 200.
fn start(name: &'static str, program: &PathBuf, with_port: impl Fn(u16) -> Vec<String>) -> Server {
    let port = free_port();
    let log = std::fs::File::create(root().join(format!("target/bench-results/{name}.log"))).unwrap();
    let child = Command::new(program).args(with_port(port)).stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null()).spawn().expect("server starts");
    let mut server = Server { name, port, child };
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if ureq::get(&format!("http://127.0.0.1:{port}/health")).call().is_ok() {
            return server;
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("{name} exited ({status}) before it was healthy: see target/bench-results/{name}.log");
        }
        assert!(Instant::now() < deadline, "{name} never became healthy");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds: u64 = arg("--seconds", 20);
    let oha = common::oha_path("scripts/bench-serve-llm.sh");
    let model = root().join(".cache/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.exists(), "SmolLM2 missing: run scripts/fetch-data.sh smollm2");
    let llama = root().join(arg("--llama-server", ".cache/llama.cpp/build/bin/llama-server".to_string()));
    let out_dir = root().join("target/bench-results");
    std::fs::create_dir_all(&out_dir).unwrap();

    let recfuse = PathBuf::from(env!("CARGO_BIN_EXE_recfuse"));
    let model_arg = model.to_str().unwrap().to_string();
    let serve_llm = |extra: &'static [&'static str]| {
        let model_arg = model_arg.clone();
        move |port: u16| {
            let mut a: Vec<String> = ["serve-llm", "--model", &model_arg, "--addr", &format!("127.0.0.1:{port}"), "--batch", "32"].map(String::from).to_vec();
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        }
    };
    let mut servers = vec![start("recfuse", &recfuse, serve_llm(&[])), start("recfuse-no-prefix-cache", &recfuse, serve_llm(&["--prefix-cache-mb", "0"]))];
    if llama.exists() {
        servers.push(start("llama-server", &llama, |port| {
            ["-m", &model_arg, "--host", "127.0.0.1", "--port", &port.to_string(), "-t", "2", "-tb", "2", "-np", "32", "-c", "8192", "--no-webui"].map(String::from).to_vec()
        }));
    } else {
        eprintln!("llama-server not built (scripts/build-llama-cpp.sh): recfuse alone");
    }

    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 32, "temperature": 0,
        "messages": [{"role": "system", "content": "You are a helpful assistant who answers at length."},
                     {"role": "user", "content": "Write a detailed paragraph about the history of cinema, from the first silent films to today."}],
    })
    .to_string();
    let clients = [1usize, 8, 32];
    let mut rows = Vec::new();
    for &c in &clients {
        for s in &servers {
            eprintln!("{}, {c} clients", s.name);
            let load = common::oha(&oha, &format!("http://127.0.0.1:{}/v1/chat/completions", s.port), &body, c, seconds);
            rows.push(serde_json::json!({"server": s.name, "clients": c, "seconds": seconds, "codes": load.codes,
                "requests_per_s": load.requests_per_s, "p50_s": load.p50, "p99_s": load.p99}));
        }
    }
    let metrics = |name: &str| -> serde_json::Value {
        let s = servers.iter().find(|s| s.name == name).expect("started");
        ureq::get(&format!("http://127.0.0.1:{}/metrics", s.port)).call().ok().and_then(|r| r.into_json().ok()).unwrap_or_default()
    };
    let (load1, load5, load15) = load_average();
    let result = serde_json::json!({
        "command": format!("scripts/bench-serve-llm.sh {seconds}"), "load": [load1, load5, load15], "rows": rows,
        "recfuse_metrics": metrics("recfuse"), "recfuse_no_prefix_cache_metrics": metrics("recfuse-no-prefix-cache"),
    });
    drop(servers);
    std::fs::write(out_dir.join("serve-llm-load.json"), serde_json::to_string_pretty(&result).unwrap()).unwrap();

    println!("\n| server | clients | requests/s | tokens/s (32 per answer) | p50 s | p99 s | non-200 |\n|---|---:|---:|---:|---:|---:|---:|");
    let secs = |v: &serde_json::Value| v.as_f64().map_or("–".to_string(), |x| format!("{x:.2}"));
    for r in &rows {
        let bad: u64 = r["codes"].as_object().unwrap().iter().filter(|(k, _)| k.as_str() != "200").filter_map(|(_, v)| v.as_u64()).sum();
        let rate = r["requests_per_s"].as_f64().unwrap();
        println!("| {} | {} | {rate:.2} | {:.0} | {} | {} | {bad} |", r["server"].as_str().unwrap(), r["clients"], 32.0 * rate, secs(&r["p50_s"]), secs(&r["p99_s"]));
    }

    let names: Vec<&str> = {
        let mut n: Vec<&str> = rows.iter().map(|r| r["server"].as_str().unwrap()).collect();
        n.dedup();
        n.truncate(rows.len() / clients.len());
        n
    };
    let categories: Vec<String> = clients.iter().map(|c| format!("{c} client{}", if *c == 1 { "" } else { "s" })).collect();
    let series = |field: &str| -> Vec<(String, Vec<f64>)> {
        names
            .iter()
            .map(|&n| (n.to_string(), rows.iter().filter(|r| r["server"] == n).map(|r| r[field].as_f64().unwrap_or(0.0)).collect()))
            .collect()
    };
    let panels = [
        Panel { title: "throughput (32 tokens per answer, loopback, 2 cores)".into(), y_label: "requests per second".into(), categories: categories.clone(), series: series("requests_per_s") },
        Panel { title: "p50 latency".into(), y_label: "seconds".into(), categories: categories.clone(), series: series("p50_s") },
        Panel { title: "p99 latency".into(), y_label: "seconds".into(), categories, series: series("p99_s") },
    ];
    match grouped_bars(&panels, &out_dir.join("serve-llm-load.png")) {
        Ok(()) => println!("\nchart: {}", out_dir.join("serve-llm-load.png").display()),
        Err(e) => eprintln!("no chart: {e:#}"),
    }
    let failed: Vec<String> = rows.iter().filter(|r| r["codes"]["200"].as_u64().unwrap_or(0) == 0).map(|r| format!("{} at {} clients", r["server"], r["clients"])).collect();
    assert!(failed.is_empty(), "no successful answers: {}", failed.join(", "));
}

/// The 1, 5 and 15 minute load averages (the machine is shared: say how busy it was).
fn load_average() -> (f64, f64, f64) {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<f64> = text.split_whitespace().take(3).filter_map(|x| x.parse().ok()).collect();
    (v.first().copied().unwrap_or(0.0), v.get(1).copied().unwrap_or(0.0), v.get(2).copied().unwrap_or(0.0))
}
