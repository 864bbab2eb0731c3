//! LoRA training throughput on SmolLM2-135M-Instruct (the GGUF of `scripts/fetch-data.sh
//! smollm2`): random sequences of `--seq` tokens, `--batch` per optimizer step in micro-batches
//! of `--micro`, rank `--rank` on `--targets`, AdamW. Prints the median step time, tokens/s
//! and peak RSS as one JSON line (scripts/bench-lora.sh puts it beside PyTorch + PEFT).
//!
//! `--answer N`: the loss covers the last N tokens of each sequence (0 = every token, as a
//! causal-LM loss over the whole sequence computes).
//!
//! cargo bench -p recfuse-plugin-lora-tuner --bench training -- --steps 5

use candle_core::Var;
use recfuse_llm_engine::tunable::lora::{Adapter, LoraSpec, LoraStack};
use recfuse_llm_engine::tunable::{Base, Sequence};
use recfuse_plugin_lora_tuner::optim::{accumulate, clip, AdamW, MicroBatch};
use recfuse_sdk::SeededRng;
use std::time::Instant;

// The allocator setup of the `recfuse` binary (framework/src/main.rs): mimalloc, purging off.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn main() -> anyhow::Result<()> {
    unsafe {
        libmimalloc_sys::mi_option_set(15 /* purge_delay */, -1)
    };
    let model_path = std::path::PathBuf::from(arg(
        "--model",
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../.cache/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        .to_string(),
    ));
    let (steps, seq, batch, micro, rank, answer) = (
        arg("--steps", 5usize),
        arg("--seq", 256usize),
        arg("--batch", 8usize),
        arg("--micro", 8usize),
        arg("--rank", 8usize),
        arg("--answer", 0usize),
    );
    let targets: Vec<String> = arg("--targets", "q_proj,v_proj".to_string())
        .split(',')
        .map(str::to_string)
        .collect();
    let base = Base::load(&model_path)?;
    let model = base.model.as_ref();
    let spec = LoraSpec {
        r: rank,
        alpha: 2.0 * rank as f64,
        dropout: arg("--dropout", 0.05f32),
        targets: targets.clone(),
    };
    let mut rng = SeededRng::new(1);
    let adapter = Adapter::new("default", &spec, model, &mut rng)?;
    let vars: Vec<Var> = adapter
        .named_vars(model)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let mut adam = AdamW::new(&vars)?;
    let answer_start = if answer == 0 { 1 } else { seq - answer };
    let mut times = Vec::new();
    for step in 0..=steps {
        let seqs: Vec<Sequence> = (0..batch)
            .map(|_| Sequence {
                ids: (0..seq).map(|_| 100 + rng.below(40_000) as u32).collect(),
                answer_start,
            })
            .collect();
        let t = Instant::now();
        let micro_batches: Vec<MicroBatch> = seqs
            .chunks(micro)
            .enumerate()
            .map(|(m, c)| MicroBatch {
                seqs: c.to_vec(),
                lora: LoraStack::train(vec![&adapter], (step * 100 + m) as u64),
            })
            .collect();
        let (mut grads, loss) = accumulate(model, &micro_batches, &vars)?;
        clip(&mut grads, 1.0)?;
        adam.step(&vars, &grads, 2e-4, 0.0)?;
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "step {step}: loss {loss:.3}, {secs:.2} s, {:.0} tokens/s",
            (batch * seq) as f64 / secs
        );
        if step > 0 {
            times.push(secs); // step 0 warms up allocations
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "impl": "recfuse (candle)", "seq": seq, "batch": batch, "micro_batch": micro, "rank": rank, "targets": targets,
            "answer_tokens": if answer == 0 { seq - 1 } else { answer },
            "median_step_s": median, "tokens_per_s": (batch * seq) as f64 / median, "peak_rss_mib": peak_rss_mib(),
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        })
    );
    Ok(())
}
