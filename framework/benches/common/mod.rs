//! Helpers shared by the benchmark harnesses.
#![allow(dead_code)] // each bench uses its own subset

use recfuse::host::HostServices;
use std::path::PathBuf;
use std::time::Instant;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// Host services for a component driven by a bench.
pub fn host(component: &str, seed: u64) -> recfuse_sdk::ffi::HostFfiBox {
    HostServices::detached(component, std::env::temp_dir(), seed).into_ffi()
}

/// The value after `--name` on the command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The median of some measurements.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `f` `runs` times; the median seconds and the last result.
pub fn timed<T>(runs: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed().as_secs_f64());
    }
    (median(times), last.expect("at least one run"))
}

/// What oha measured at one load level (client side: HTTP, JSON and all).
pub struct Load {
    /// Answers by HTTP status.
    pub codes: serde_json::Map<String, serde_json::Value>,
    pub requests_per_s: f64,
    /// Seconds; `None` when no request finished.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

impl Load {
    pub fn ok(&self) -> u64 {
        self.codes.get("200").and_then(|v| v.as_u64()).unwrap_or(0)
    }

    pub fn not_ok(&self) -> u64 {
        self.codes.iter().filter(|(code, _)| code.as_str() != "200").filter_map(|(_, n)| n.as_u64()).sum()
    }
}

/// oha's path (`--oha`, default `.cache/tools/bin/oha`), which `script` installs.
pub fn oha_path(script: &str) -> PathBuf {
    let oha = root().join(arg("--oha", ".cache/tools/bin/oha".to_string()));
    assert!(oha.exists(), "oha missing at {}: run {script} (it installs oha)", oha.display());
    oha
}

/// `connections` clients POSTing the JSON `body` to `url` for `seconds` with oha (a maintained
/// load generator from crates.io, installed into `.cache/tools` by the bench scripts).
pub fn oha(oha: &std::path::Path, url: &str, body: &str, connections: usize, seconds: u64) -> Load {
    let out = std::process::Command::new(oha)
        .args(["-z", &format!("{seconds}s"), "-c", &connections.to_string(), "-m", "POST", "-H", "Content-Type: application/json", "-d", body])
        .args(["--no-tui", "--output-format", "json", url])
        .output()
        .expect("oha runs");
    assert!(out.status.success(), "oha failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("oha JSON");
    Load {
        codes: v["statusCodeDistribution"].as_object().cloned().unwrap_or_default(),
        requests_per_s: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50: v["latencyPercentiles"]["p50"].as_f64(),
        p99: v["latencyPercentiles"]["p99"].as_f64(),
    }
}
