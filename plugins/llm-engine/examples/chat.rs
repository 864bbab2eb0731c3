//! `cargo run --release -p recfuse-llm-engine --example chat -- MODEL.gguf "question" [batch]`
use recfuse_llm_engine::{GenParams, Llm, Message};
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let llm = Llm::load(args[1].as_ref(), std::env::var("SPARSE").is_err())?;
    let n: usize = args.get(3).map_or(1, |s| s.parse().unwrap());
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|i| llm.encode_chat(&[Message { role: "user".into(), content: format!("{} {}", args[2], "?".repeat(i % 3)) }]))
        .collect::<anyhow::Result<_>>()?;
    println!("prompt tokens {:?}", prompts[0]);
    let params = vec![GenParams { max_new_tokens: 64, ..Default::default() }; n];
    let t = std::time::Instant::now();
    let mut toks = 0;
    llm.generate(&prompts, &params, n, |i, c| {
        toks += c.completion_tokens;
        println!("[{i}] {:?} {:?} {}", c.finish, c.text, c.completion_tokens);
        Ok(())
    })?;
    println!("{toks} tokens in {:.2}s = {:.1} tok/s", t.elapsed().as_secs_f64(), toks as f64 / t.elapsed().as_secs_f64());
    Ok(())
}
