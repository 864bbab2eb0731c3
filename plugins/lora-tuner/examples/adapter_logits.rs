//! Logits of a token sequence under a base model and optionally a PEFT adapter, written as raw
//! little-endian f32 `[positions, vocab]` for scripts/peft-check.py to compare with PyTorch +
//! PEFT.
//!
//! cargo run --release -p recfuse-plugin-lora-tuner --example adapter_logits -- \
//!     --model <gguf> [--adapter <dir>]... --ids 1,2,3 --out logits.f32

use candle_core::{Device, Tensor};
use recfuse_llm_engine::tunable::lora::{Adapter, LoraStack};
use recfuse_llm_engine::tunable::Base;
use std::io::Write;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let base = Base::load(std::path::Path::new(&value("--model").expect("--model")))?;
    let model = base.model.as_ref();
    let adapters: Vec<Adapter> = args
        .windows(2)
        .filter(|w| w[0] == "--adapter")
        .map(|w| Adapter::load_peft("adapter", std::path::Path::new(&w[1]), model))
        .collect::<anyhow::Result<_>>()?;
    let ids: Vec<u32> = value("--ids").expect("--ids").split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
    let ids = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let hidden = model.hidden(&model.embed(&ids)?, &LoraStack::eval(adapters.iter().collect()))?;
    let logits: Vec<f32> = model.logits(&hidden.squeeze(0)?)?.flatten_all()?.to_vec1()?;
    let mut out = std::fs::File::create(value("--out").expect("--out"))?;
    out.write_all(&logits.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?;
    Ok(())
}
