//! Local generation speed: this engine against llama.cpp on the same GGUF, side by side in one
//! run, rounds interleaved (the machine is shared: report medians and ratios).
//!
//! Prompt processing (PP) and text generation (TG) tokens/s for `npl` parallel sequences of
//! `npp` prompt tokens generating `ntg` tokens each, the shape of knowledge fusion (long
//! behaviour prompt, short answer). llama.cpp's `llama-batched-bench` measures the same
//! (built by scripts/build-llama-cpp.sh; skipped with a note if absent). Also printed: the
//! memory-bandwidth bound of one stream (weight bytes read per token ÷ measured copy bandwidth).
//!
//! Writes the table to stdout and the chart to `target/bench-results/local-generation.png`.
//!
//! `cargo bench -p recfuse --bench generation [-- ROUNDS NPP NTG]` (`KERNEL=candle` for candle's
//! kernels instead of the int8 one)

mod common;

use common::median;
use recfuse::plot::{grouped_bars, Panel};
use recfuse_llm_engine::{GenParams, Kernel, Llm};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

const PARALLEL: [usize; 3] = [1, 4, 16];

/// (PP tokens/s, TG tokens/s) of this engine.
fn ours(llm: &Llm, npl: usize, npp: usize, ntg: usize, corpus: &[u32]) -> (f64, f64) {
    let prompts: Vec<Vec<u32>> = (0..npl).map(|i| corpus.iter().cycle().skip(i * 7).take(npp).copied().collect()).collect();
    let t = Instant::now();
    llm.next_token_logits(&prompts).unwrap();
    let pp = t.elapsed().as_secs_f64();
    let params = vec![GenParams { max_new_tokens: ntg, ignore_stop: true, ..Default::default() }; npl];
    let t = Instant::now();
    llm.generate(&prompts, &params, npl, |_, c| {
        assert_eq!(c.completion_tokens, ntg);
        Ok(())
    })
    .unwrap();
    let tg = t.elapsed().as_secs_f64() - pp;
    ((npl * npp) as f64 / pp, (npl * ntg) as f64 / tg)
}

/// (PP, TG) tokens/s per parallel count, from llama-batched-bench.
fn llama_cpp(bin: &PathBuf, model: &PathBuf, npp: usize, ntg: usize) -> Vec<(f64, f64)> {
    let npl: Vec<String> = PARALLEL.iter().map(|n| n.to_string()).collect();
    let out = Command::new(bin)
        .args(["-m", model.to_str().unwrap(), "-c", "8192", "-b", "2048", "-ub", "512", "-t", "2", "--output-format", "jsonl"])
        .args(["-npp", &npp.to_string(), "-ntg", &ntg.to_string(), "-npl", &npl.join(",")])
        .output()
        .expect("llama-batched-bench runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| (v["speed_pp"].as_f64().unwrap(), v["speed_tg"].as_f64().unwrap()))
        .collect()
}

/// Bytes/s of a large memory copy (the bandwidth a decoding step is bound by).
fn copy_bandwidth() -> f64 {
    let src = vec![1u8; 512 << 20];
    let mut dst = vec![0u8; 512 << 20];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    2.0 * src.len() as f64 / best // read + write
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let rounds = args.first().copied().unwrap_or(3);
    let npp = args.get(1).copied().unwrap_or(256);
    let ntg = args.get(2).copied().unwrap_or(64);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join(".cache/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.exists(), "run scripts/fetch-data.sh smollm2");
    let bin = root.join(".cache/llama.cpp/build/bin/llama-batched-bench");
    // KERNEL=candle measures candle's kernels (with f32 copies), the engine before the int8 kernel.
    let kernel = Kernel::named(&std::env::var("KERNEL").unwrap_or_else(|_| "auto".into()), true).unwrap();
    eprintln!("recfuse kernel: {}", kernel.name());
    let llm = Llm::load(&model, kernel).unwrap();
    let corpus = llm
        .tokenizer
        .encode("The user liked Toy Story, Heat and Alien, rated many dramas as average and disliked most horror films. ")
        .unwrap();

    let mut mine: Vec<Vec<(f64, f64)>> = vec![vec![]; PARALLEL.len()];
    let mut theirs: Vec<Vec<(f64, f64)>> = vec![vec![]; PARALLEL.len()];
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        for (i, &npl) in PARALLEL.iter().enumerate() {
            mine[i].push(ours(&llm, npl, npp, ntg, &corpus));
        }
        if bin.exists() {
            for (i, r) in llama_cpp(&bin, &model, npp, ntg).into_iter().enumerate() {
                theirs[i].push(r);
            }
        }
    }
    println!("{npp} prompt tokens, {ntg} generated, medians of {rounds} interleaved rounds, 2 threads\n");
    println!("| parallel | recfuse PP t/s | llama.cpp PP t/s | PP ratio | recfuse TG t/s | llama.cpp TG t/s | TG ratio |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (i, npl) in PARALLEL.iter().enumerate() {
        let (pp, tg) = (median(mine[i].iter().map(|r| r.0).collect()), median(mine[i].iter().map(|r| r.1).collect()));
        if theirs[i].is_empty() {
            println!("| {npl} | {pp:.0} | – | – | {tg:.1} | – | – |");
        } else {
            let (lpp, ltg) = (median(theirs[i].iter().map(|r| r.0).collect()), median(theirs[i].iter().map(|r| r.1).collect()));
            println!("| {npl} | {pp:.0} | {lpp:.0} | {:.2} | {tg:.1} | {ltg:.1} | {:.2} |", pp / lpp, tg / ltg);
        }
    }
    if !bin.exists() {
        println!("\nllama.cpp not built (scripts/build-llama-cpp.sh): no comparison.");
    }
    let med = |runs: &[Vec<(f64, f64)>], pick: fn(&(f64, f64)) -> f64| -> Vec<f64> {
        runs.iter().map(|r| if r.is_empty() { 0.0 } else { median(r.iter().map(pick).collect()) }).collect()
    };
    let categories: Vec<String> = PARALLEL.iter().map(|n| format!("{n} parallel")).collect();
    let panel = |title: &str, pick: fn(&(f64, f64)) -> f64| Panel {
        title: title.to_string(),
        categories: categories.clone(),
        series: vec![(format!("recfuse, {} kernel", kernel.name()), med(&mine, pick)), ("llama.cpp".into(), med(&theirs, pick))],
        y_label: "tokens/s".into(),
    };
    let chart = root.join("target/bench-results/local-generation.png");
    std::fs::create_dir_all(chart.parent().unwrap()).unwrap();
    let panels = [
        panel(&format!("prompt processing ({npp}-token prompts)"), |r| r.0),
        panel(&format!("generation ({ntg} tokens per sequence)"), |r| r.1),
    ];
    match grouped_bars(&panels, &chart) {
        Ok(()) => println!("chart: {}", chart.display()),
        Err(e) => println!("no chart: {e:#}"),
    }
    let bw = copy_bandwidth();
    let bytes = llm.weight_bytes() as f64;
    println!(
        "\nOne stream reads {:.0} MB of quantized weights per token; copy bandwidth {:.1} GB/s → bound {:.0} tokens/s.",
        bytes / 1e6,
        bw / 1e9,
        bw / bytes
    );
}
