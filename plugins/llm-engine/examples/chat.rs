//! Ask the local model something, `batch` times at once, and see the answers and the speed:
//! `cargo run --release -p recfuse-llm-engine --example chat -- MODEL.gguf "question" [batch]`
//! (`KERNEL=int8|candle`, default `auto`; `SPARSE=1`: with candle, quantized weights only).
use recfuse_llm_engine::{GenParams, Kernel, Llm, Message};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() >= 3, "usage: chat MODEL.gguf QUESTION [BATCH]");
    let kernel = Kernel::named(&std::env::var("KERNEL").unwrap_or_else(|_| "auto".into()), std::env::var("SPARSE").is_err())?;
    let llm = Llm::load(args[1].as_ref(), kernel)?;
    let n: usize = args.get(3).map_or(Ok(1), |s| s.parse())?;
    // Slightly different prompts, so batched rows are padded as in real use.
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|i| llm.encode_chat(&[Message { role: "user".into(), content: format!("{}{}", args[2], "?".repeat(i % 3)) }]))
        .collect::<anyhow::Result<_>>()?;
    let params = vec![GenParams { max_new_tokens: 64, ..Default::default() }; n];
    let t = std::time::Instant::now();
    let mut tokens = 0;
    llm.generate(&prompts, &params, n, |i, c| {
        tokens += c.completion_tokens;
        println!("[{i}] {:?} ({} tokens): {}", c.finish, c.completion_tokens, c.text);
        Ok(())
    })?;
    let secs = t.elapsed().as_secs_f64();
    println!("{tokens} tokens in {secs:.2}s = {:.1} tok/s", tokens as f64 / secs);
    Ok(())
}
