//! ONNX Runtime throughput of a saved `ort` model from Rust, the counterpart of
//! scripts/bench_ort.py (Python onnxruntime) on the same model, inputs, batch sizes and threads:
//! scripts/bench-ort.sh runs both alternately and compares. One session with `threads` intra-op
//! threads; the inputs are the model's export-check pairs tiled to each batch size, passed as
//! views (no copy). Prints one JSON line per batch size: the median pairs/s over `rounds` timed
//! runs of about `seconds` each.
//!
//! RECFUSE_BENCH_MODEL_DIR=runs/ort/rankers/ort cargo bench -p recfuse-plugin-ort-ranker --bench throughput

use anyhow::{Context, Result};
use ort::value::TensorRef;
use ort::value::TensorElementType;
use recfuse_plugin_ort_ranker::runtime::{SessionOptions, SessionPool, TensorSpec};
use std::path::PathBuf;
use std::time::Instant;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> Result<()> {
    let dir = PathBuf::from(std::env::var("RECFUSE_BENCH_MODEL_DIR").context("set RECFUSE_BENCH_MODEL_DIR to a saved ort ranker (model.onnx, export_check.safetensors)")?);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let threads: usize = env("RECFUSE_BENCH_THREADS", 2);
    let seconds: f64 = env("RECFUSE_BENCH_SECONDS", 1.0);
    let rounds: usize = env("RECFUSE_BENCH_ROUNDS", 5);
    let batches: Vec<usize> = std::env::var("RECFUSE_BENCH_BATCHES").unwrap_or_else(|_| "1000,16384".into()).split(',').map(|s| s.parse().expect("batch size")).collect();
    let opts = SessionOptions { sessions: 1, threads, runtime_library: Some(root.join(recfuse_plugin_ort_ranker::runtime::DEFAULT_LIBRARY)), ..Default::default() };
    let bytes = std::fs::read(dir.join("export_check.safetensors"))?;
    let saved = safetensors::SafeTensors::deserialize(&bytes)?;
    let specs: Vec<TensorSpec> = saved
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != "expected")
        .map(|(name, t)| {
            let ty = if t.dtype() == safetensors::Dtype::F32 { TensorElementType::Float32 } else { TensorElementType::Int64 };
            let shape = std::iter::once(-1).chain(t.shape()[1..].iter().map(|&d| d as i64)).collect();
            TensorSpec { name, ty, shape }
        })
        .collect();
    let pool = SessionPool::load(&dir.join("model.onnx"), &specs, &[], &opts)?;
    for &batch in &batches {
        // Every input tiled to `batch` rows.
        let mut f32s: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let mut i64s: Vec<(String, Vec<usize>, Vec<i64>)> = Vec::new();
        for (name, t) in saved.tensors() {
            if name == "expected" {
                continue;
            }
            let rows = t.shape()[0];
            let width: usize = t.shape()[1..].iter().product();
            let mut shape = t.shape().to_vec();
            shape[0] = batch;
            match t.dtype() {
                safetensors::Dtype::F32 => {
                    let v: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                    f32s.push((name, shape, (0..batch).flat_map(|r| v[(r % rows) * width..(r % rows + 1) * width].iter().copied()).collect()));
                }
                _ => {
                    let v: Vec<i64> = t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
                    i64s.push((name, shape, (0..batch).flat_map(|r| v[(r % rows) * width..(r % rows + 1) * width].iter().copied()).collect()));
                }
            }
        }
        let run = || -> Result<()> {
            pool.with(|s| {
                let mut inputs: Vec<(String, ort::session::SessionInputValue<'_>)> = Vec::new();
                for (name, shape, data) in &f32s {
                    inputs.push((name.clone(), TensorRef::from_array_view((shape.clone(), data.as_slice()))?.into()));
                }
                for (name, shape, data) in &i64s {
                    inputs.push((name.clone(), TensorRef::from_array_view((shape.clone(), data.as_slice()))?.into()));
                }
                let out = s.run(inputs)?;
                std::hint::black_box(out["score"].try_extract_tensor::<f32>()?.1[0]);
                Ok(())
            })
        };
        run()?; // warm-up
        let mut rates = Vec::new();
        for _ in 0..rounds {
            let (t, mut calls) = (Instant::now(), 0usize);
            while t.elapsed().as_secs_f64() < seconds {
                run()?;
                calls += 1;
            }
            rates.push((calls * batch) as f64 / t.elapsed().as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        println!("{}", serde_json::json!({"impl": "rust-ort", "batch": batch, "threads": threads, "pairs_per_s": rates[rates.len() / 2]}));
    }
    Ok(())
}
