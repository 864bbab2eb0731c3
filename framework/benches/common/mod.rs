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
