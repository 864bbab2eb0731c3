//! `kind = "local-llm"`: HKFR's knowledge fusion by a local LLM, in-process, no API key and no
//! GPU: the embedded default. The behaviour text (`recfuse-behaviour-text`) is put into the same
//! fusion prompt the `chatgpt` fuser sends, rendered through the model's own chat template, and
//! generated in batches of similar-length prompts across users.
//!
//! Every finished generation is appended to `cache.jsonl` in the component's run directory,
//! keyed by (model file hash, messages, generation parameters), so a rerun or a restart after a
//! kill repeats none; `usage.json` counts tokens.

use recfuse_behaviour_text::fusion::{Completion, CompletionCache, FusionPrompt, Usage};
use recfuse_behaviour_text::BehaviourConfig;
use recfuse_llm_engine::{GenParams, Kernel, Llm, Message};
use recfuse_sdk::prelude::*;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::PathBuf;

/// Where `scripts/fetch-data.sh smollm2` puts SmolLM2-135M-Instruct.
pub const DEFAULT_MODEL: &str = ".cache/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct LocalLlmConfig {
    /// A llama-architecture GGUF file.
    #[serde(default = "d_model")]
    pub model: PathBuf,
    /// minijinja templates; the user prompt sees `user` (id) and `behaviour` (text).
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub user_prompt: Option<String>,
    #[serde(default)]
    pub behaviour: Option<BehaviourConfig>,
    #[serde(default = "d_max_tokens")]
    pub max_tokens: usize,
    /// 0 = greedy decoding (the same knowledge on every run).
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "d_top_p")]
    pub top_p: f32,
    /// OpenAI-style penalties on tokens already generated (small models repeat themselves).
    #[serde(default)]
    pub frequency_penalty: f32,
    #[serde(default)]
    pub presence_penalty: f32,
    /// Users generated together; larger batches give more tokens/s (docs/benchmarks.md).
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Matmul kernel: `auto` (int8 on CPUs with AVX512-VNNI or AVX2, else candle's), `int8`,
    /// `int8-avx2` or `candle`.
    #[serde(default = "d_kernel")]
    pub kernel: String,
    /// With candle's kernel, keep f32 copies of the weights for fast prefill and batches
    /// (+4 bytes per weight).
    #[serde(default = "d_true")]
    pub dense: bool,
}
fn d_kernel() -> String {
    "auto".into()
}
fn d_model() -> PathBuf {
    DEFAULT_MODEL.into()
}
fn d_max_tokens() -> usize {
    96
}
fn d_top_p() -> f32 {
    1.0
}
fn d_batch() -> usize {
    16
}
fn d_true() -> bool {
    true
}

pub struct LocalLlmFuser {
    cfg: LocalLlmConfig,
    host: Host,
    llm: Llm,
    model_sha256: String,
    prompt: FusionPrompt,
    cache: CompletionCache,
    usage: Usage,
}

fn sha256_file(path: &std::path::Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

impl KnowledgeFuser for LocalLlmFuser {
    type Config = LocalLlmConfig;
    const DESCRIPTION: &'static str = "LLM knowledge fusion with a local GGUF model (SmolLM2-135M by default), batched, in-process";

    fn new(cfg: LocalLlmConfig, host: Host) -> Result<Self> {
        ensure!(cfg.batch_size > 0, "batch_size must be at least 1");
        ensure!(cfg.max_tokens > 0, "max_tokens must be at least 1");
        ensure!(cfg.temperature >= 0.0 && cfg.top_p > 0.0 && cfg.top_p <= 1.0, "temperature must be ≥ 0 and top_p in (0, 1]");
        if !cfg.model.exists() {
            bail!(
                "model: {} not found{}",
                cfg.model.display(),
                if cfg.model == PathBuf::from(DEFAULT_MODEL) { " (run scripts/fetch-data.sh smollm2)" } else { "" }
            );
        }
        let prompt = FusionPrompt::new(cfg.system_prompt.clone(), cfg.user_prompt.clone(), cfg.behaviour.clone())?;
        let model_sha256 = sha256_file(&cfg.model)?;
        let kernel = Kernel::named(&cfg.kernel, cfg.dense).context("kernel")?;
        let llm = Llm::load(&cfg.model, kernel).with_context(|| format!("model = {}", cfg.model.display()))?;
        host.info(format!("{} loaded from {} ({} MB of quantized weights, {} kernel)", llm.name, cfg.model.display(), llm.weight_bytes() >> 20, kernel.name()));
        let cache = CompletionCache::open(&host.run_dir().join("cache.jsonl"))?;
        let usage = Usage::resume(&host, &cache)?; // a resumed run adds to what it spent before
        Ok(Self { cfg, host, llm, model_sha256, prompt, cache, usage })
    }

    fn fuse(&mut self, view: &TrainView, users: &[UserIdx]) -> Result<Vec<Knowledge>> {
        let mut out = Vec::with_capacity(users.len());
        // (user, cache key, prompt tokens) of the users not in the cache.
        let mut todo: Vec<(UserIdx, String, Vec<u32>)> = Vec::new();
        let context = self.llm.hyper().context;
        for &u in users {
            let messages: Vec<Message> = self
                .prompt
                .messages(view, u)?
                .into_iter()
                .map(|m| Message { role: m.role, content: m.content })
                .collect();
            let key = CompletionCache::key(&json!({
                "model_sha256": self.model_sha256, "messages": messages, "max_tokens": self.cfg.max_tokens,
                "temperature": self.cfg.temperature, "top_p": self.cfg.top_p,
                "frequency_penalty": self.cfg.frequency_penalty, "presence_penalty": self.cfg.presence_penalty,
                "seed": if self.cfg.temperature > 0.0 { self.host.seed() } else { 0 },
            }))?;
            if let Some(hit) = self.cache.get(&key) {
                self.usage.cache_hits += 1;
                out.push(Knowledge { user: u, text: hit.text.clone(), vectors: vec![] });
                continue;
            }
            let tokens = self.llm.encode_chat(&messages)?;
            if tokens.len() + self.cfg.max_tokens > context {
                self.usage.failures += 1;
                let id = &view.catalog.users[u as usize].id;
                self.host.warn(format!(
                    "user {id}: prompt of {} tokens + max_tokens {} exceeds the model context of {context}; lower behaviour.max_per_kind",
                    tokens.len(), self.cfg.max_tokens
                ));
                continue;
            }
            todo.push((u, key, tokens));
        }
        if !todo.is_empty() {
            let prompts: Vec<Vec<u32>> = todo.iter().map(|t| t.2.clone()).collect();
            let params: Vec<GenParams> = todo
                .iter()
                .map(|(u, _, _)| GenParams {
                    max_new_tokens: self.cfg.max_tokens,
                    temperature: self.cfg.temperature,
                    top_p: self.cfg.top_p,
                    seed: self.host.seed() ^ (*u as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    frequency_penalty: self.cfg.frequency_penalty,
                    presence_penalty: self.cfg.presence_penalty,
                    ..Default::default()
                })
                .collect();
            let bar = self.host.progress("generate", todo.len() as u64);
            let (host, cache, usage) = (&self.host, &self.cache, &mut self.usage);
            self.llm.generate(&prompts, &params, self.cfg.batch_size, |i, c| {
                host.check_cancelled()?;
                let (user, key, _) = &todo[i];
                usage.requests += 1;
                usage.prompt_tokens += c.prompt_tokens as u64;
                usage.completion_tokens += c.completion_tokens as u64;
                let text = c.text.trim().to_string();
                out.push(Knowledge { user: *user, text: text.clone(), vectors: vec![] });
                bar.inc(1);
                cache.put(Completion {
                    key: key.clone(),
                    text,
                    prompt_tokens: c.prompt_tokens as u64,
                    completion_tokens: c.completion_tokens as u64,
                })
            })?;
        }
        self.usage.save(&self.host, &self.cache)?;
        out.sort_by_key(|k| k.user);
        Ok(out)
    }
}

export_plugin! {
    name: "local-llm-fuser",
    fusers: { "local-llm" => LocalLlmFuser },
}
