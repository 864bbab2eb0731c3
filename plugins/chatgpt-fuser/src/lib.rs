//! `kind = "chatgpt"`: HKFR's knowledge fusion by an LLM. A user's train-period behaviour is
//! written out through per-kind templates (`recfuse-behaviour-text`), and an OpenAI-compatible Chat
//! Completions server (OpenAI itself, or any compatible server) fuses it into one text of
//! heterogeneous knowledge.
//!
//! Built for paid APIs on flaky networks:
//! * `concurrency` requests in flight, under `requests_per_minute` and `tokens_per_minute`;
//! * retries with exponential backoff and jitter on 429, 5xx, timeouts, dropped connections and
//!   malformed JSON, honouring `Retry-After`; a per-request `timeout_secs`;
//! * a persistent cache (`cache.jsonl` in the component's run directory) keyed by
//!   (model, messages, parameters) and written as each answer arrives, so a rerun, or a restart
//!   after `kill -9`, repeats no completed call;
//! * token usage and estimated cost in `usage.json` next to the cache;
//! * the API key is read from the environment variable named by `api_key_env` and is only ever
//!   put in the `Authorization` header, never logged or written.
//!
//! A user whose request still fails after the retries gets no knowledge; the host records the
//! user as failed (and the fuse stage, resumed later, asks again).

use recfuse_behaviour_text::fusion::{ChatMessage, Completion, CompletionCache, FusionPrompt, Usage};
use recfuse_behaviour_text::BehaviourConfig;
use recfuse_sdk::prelude::*;
use serde_json::{json, Value};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ChatGptConfig {
    /// e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8080/v1".
    pub base_url: String,
    pub model: String,
    /// Name of the environment variable holding the API key (none for local servers).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// minijinja templates; the user prompt sees `user` (id) and `behaviour` (text).
    #[serde(default)]
    pub system_prompt: Option<String>,
    #[serde(default)]
    pub user_prompt: Option<String>,
    /// How behaviour is written out before fusion (the template fuser's settings).
    #[serde(default)]
    pub behaviour: Option<BehaviourConfig>,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "d_max_tokens")]
    pub max_tokens: u32,
    /// Sent only when set (so caches made without them stay valid).
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default = "d_concurrency")]
    pub concurrency: usize,
    #[serde(default = "d_rpm")]
    pub requests_per_minute: u32,
    #[serde(default = "d_tpm")]
    pub tokens_per_minute: u32,
    /// Whose limits `requests_per_minute` and `tokens_per_minute` are: the whole run's
    /// (`"run"`, default: each of n shards takes 1/n), or each process's own (`"process"`).
    #[serde(default)]
    pub rate_limits: RateScope,
    #[serde(default = "d_retries")]
    pub max_retries: u32,
    #[serde(default = "d_timeout")]
    pub timeout_secs: f64,
    /// First backoff delay; doubles per attempt, with ±50% jitter, capped at 60 s.
    #[serde(default = "d_backoff")]
    pub backoff_ms: u64,
    /// Prices for the cost estimate, per 1000 tokens.
    #[serde(default)]
    pub price_per_1k_input: f64,
    #[serde(default)]
    pub price_per_1k_output: f64,
}
#[derive(Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RateScope {
    #[default]
    Run,
    Process,
}

fn d_max_tokens() -> u32 {
    256
}
fn d_concurrency() -> usize {
    4
}
fn d_rpm() -> u32 {
    500
}
fn d_tpm() -> u32 {
    200_000
}
fn d_retries() -> u32 {
    5
}
fn d_timeout() -> f64 {
    60.0
}
fn d_backoff() -> u64 {
    500
}

/// Sliding one-minute window of requests and tokens.
struct Limiter {
    rpm: u32,
    tpm: u32,
    sent: Vec<(Instant, u32)>,
}

impl Limiter {
    /// Blocks until a request of `tokens` fits in the last minute's budget, then books it.
    fn acquire(limiter: &Mutex<Limiter>, tokens: u32) {
        loop {
            let wait = {
                let mut l = limiter.lock().expect("limiter lock");
                let now = Instant::now();
                l.sent.retain(|(t, _)| now.duration_since(*t) < Duration::from_secs(60));
                let used: u32 = l.sent.iter().map(|(_, n)| n).sum();
                let fits = (l.sent.len() as u32) < l.rpm && (used + tokens <= l.tpm || l.sent.is_empty());
                if fits {
                    l.sent.push((now, tokens));
                    return;
                }
                let oldest = l.sent.first().map(|(t, _)| *t).unwrap_or(now);
                Duration::from_secs(60).saturating_sub(now.duration_since(oldest)) + Duration::from_millis(5)
            };
            std::thread::sleep(wait.min(Duration::from_millis(500)));
        }
    }
}

pub struct ChatGptFuser {
    cfg: ChatGptConfig,
    host: Host,
    prompt: FusionPrompt,
    api_key: Option<String>,
    agent: ureq::Agent,
    cache: CompletionCache,
    usage: Usage,
    /// This process's share of the rate limits.
    rpm: u32,
    tpm: u32,
}

/// One failed attempt: whether to retry and after how long the server asked us to wait.
struct Failure {
    retry: bool,
    retry_after: Option<Duration>,
    message: String,
}

/// Whether `s` can name an environment variable (letters, digits, `_`, not starting with a
/// digit): an API key pasted into `api_key_env` cannot.
fn is_env_name(s: &str) -> bool {
    !s.is_empty() && !s.starts_with(|c: char| c.is_ascii_digit()) && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl ChatGptFuser {
    /// `text` with the API key replaced, for anything that may be logged or stored: servers
    /// echo request headers in error bodies.
    fn scrub(&self, text: &str) -> String {
        match &self.api_key {
            Some(key) if !key.is_empty() => text.replace(key.as_str(), "[redacted]"),
            _ => text.to_string(),
        }
    }

    fn request_body(&self, messages: &[ChatMessage]) -> Value {
        let mut body = json!({
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        });
        if let Some(p) = self.cfg.frequency_penalty {
            body["frequency_penalty"] = json!(p);
        }
        if let Some(p) = self.cfg.presence_penalty {
            body["presence_penalty"] = json!(p);
        }
        body
    }

    /// One HTTP attempt.
    fn attempt(&self, body: &str) -> std::result::Result<Completion, Failure> {
        let url = format!("{}/chat/completions", self.cfg.base_url.trim_end_matches('/'));
        let mut req = self.agent.post(&url).set("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            req = req.set("Authorization", &format!("Bearer {key}"));
        }
        let resp = match req.send_string(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let retry_after = r.header("Retry-After").and_then(|v| v.trim().parse::<f64>().ok()).map(Duration::from_secs_f64);
                let retry = code == 429 || code >= 500;
                let text = self.scrub(&r.into_string().unwrap_or_default());
                return Err(Failure { retry, retry_after, message: format!("HTTP {code}: {}", text.chars().take(200).collect::<String>()) });
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(Failure { retry: true, retry_after: None, message: self.scrub(&format!("transport: {t}")) });
            }
        };
        let text = resp
            .into_string()
            .map_err(|e| Failure { retry: true, retry_after: None, message: format!("reading the response: {e}") })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Failure { retry: true, retry_after: None, message: format!("malformed JSON: {e}") })?;
        let content = v["choices"][0]["message"]["content"].as_str().ok_or_else(|| Failure {
            retry: true,
            retry_after: None,
            message: "response without choices[0].message.content".into(),
        })?;
        Ok(Completion {
            key: String::new(),
            text: content.trim().to_string(),
            prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
            completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
        })
    }

    /// A request with retries; returns the answer and how many HTTP requests it took.
    fn call(&self, body: &str, tokens: u32, limiter: &Mutex<Limiter>, seed: u64) -> (std::result::Result<Completion, String>, u64) {
        let mut rng = SeededRng::new(seed);
        let mut last = String::new();
        let mut sent = 0;
        for attempt in 0..=self.cfg.max_retries {
            if self.host.is_cancelled() {
                return (Err("cancelled".into()), sent);
            }
            Limiter::acquire(limiter, tokens);
            sent += 1;
            match self.attempt(body) {
                Ok(e) => return (Ok(e), sent),
                Err(f) => {
                    last = f.message;
                    if !f.retry || attempt == self.cfg.max_retries {
                        break;
                    }
                    let backoff = (self.cfg.backoff_ms as f64 * 2f64.powi(attempt as i32) * (0.5 + rng.unit())).min(60_000.0);
                    let wait = f.retry_after.unwrap_or(Duration::from_millis(backoff as u64));
                    self.host.debug(format!("retrying in {:.1} s after: {last}", wait.as_secs_f64()));
                    std::thread::sleep(wait);
                }
            }
        }
        (Err(last), sent)
    }
}

impl KnowledgeFuser for ChatGptFuser {
    type Config = ChatGptConfig;
    const DESCRIPTION: &'static str = "LLM knowledge fusion over an OpenAI-compatible Chat Completions API";

    fn new(cfg: ChatGptConfig, host: Host) -> Result<Self> {
        ensure!(cfg.concurrency > 0 && cfg.requests_per_minute > 0 && cfg.tokens_per_minute > 0, "concurrency and rate limits must be positive");
        ensure!(cfg.timeout_secs > 0.0, "timeout_secs must be positive");
        // An empty name (e.g. `--set fusers[0].api_key_env=` to point at a local server) = no key.
        if let Some(v) = cfg.api_key_env.as_ref().filter(|v| !v.is_empty() && !is_env_name(v)) {
            // Never echo it: it is most likely the key itself.
            bail!(
                "`api_key_env` must name an environment variable (letters, digits, `_`), but holds {} characters that cannot be one \
                 (a pasted API key?): put the key in an environment variable and name it here, e.g. api_key_env = \"OPENAI_API_KEY\"",
                v.chars().count()
            );
        }
        let api_key = match cfg.api_key_env.as_ref().filter(|v| !v.is_empty()) {
            Some(var) => Some(std::env::var(var).map_err(|_| anyhow!("api_key_env: environment variable `{var}` is not set"))?),
            None => None,
        };
        let prompt = FusionPrompt::new(cfg.system_prompt.clone(), cfg.user_prompt.clone(), cfg.behaviour.clone())?;
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs_f64(cfg.timeout_secs)).build();
        let cache = CompletionCache::open(&host.run_dir().join("cache.jsonl"))?;
        let usage = Usage::resume(&host, &cache)?; // a resumed run adds to what it spent before
        // The account's limits are shared by every shard of a sharded run.
        let shards = if cfg.rate_limits == RateScope::Run { recfuse_sdk::shard_count() as u32 } else { 1 };
        let (rpm, tpm) = ((cfg.requests_per_minute / shards).max(1), (cfg.tokens_per_minute / shards).max(1));
        if shards > 1 {
            host.info(format!("chatgpt: one of {shards} shards: {rpm} requests and {tpm} tokens per minute (rate_limits = \"run\")"));
        }
        Ok(Self { cfg, host, prompt, api_key, agent, cache, usage, rpm, tpm })
    }

    fn fuse(&mut self, view: &TrainView, users: &[UserIdx]) -> Result<Vec<Knowledge>> {
        let mut out = Vec::new();
        let mut jobs: Vec<(UserIdx, String, String, u32)> = Vec::new(); // user, key, body, est. tokens
        for &u in users {
            let messages = self.prompt.messages(view, u)?;
            let body = self.request_body(&messages);
            let key = CompletionCache::key(&body)?;
            if let Some(hit) = self.cache.get(&key) {
                self.usage.cache_hits += 1;
                out.push(Knowledge { user: u, text: hit.text.clone(), vectors: vec![] });
            } else {
                let body = body.to_string();
                let tokens = (body.len() / 4) as u32 + self.cfg.max_tokens;
                jobs.push((u, key, body, tokens));
            }
        }
        let limiter = Mutex::new(Limiter { rpm: self.rpm, tpm: self.tpm, sent: vec![] });
        let queue = Mutex::new(jobs.into_iter().enumerate());
        let results = Mutex::new(Vec::new());
        let seed = self.host.seed();
        let this = &*self;
        let bar = Mutex::new(this.host.progress("chatgpt", queue.lock().expect("queue lock").len() as u64));
        std::thread::scope(|s| {
            for _ in 0..this.cfg.concurrency {
                s.spawn(|| loop {
                    let next = queue.lock().expect("queue lock").next();
                    let Some((i, (user, key, body, tokens))) = next else { break };
                    let (mut r, sent) = this.call(&body, tokens, &limiter, seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
                    // Stored the moment it arrives: a kill now loses only the calls in flight.
                    if let Ok(entry) = &mut r {
                        entry.key = key;
                        if let Err(e) = this.cache.put(entry.clone()) {
                            r = Err(format!("{e:#}"));
                        }
                    }
                    results.lock().expect("results lock").push((user, r, sent));
                    bar.lock().expect("progress lock").inc(1);
                });
            }
        });
        for (user, r, sent) in results.into_inner().expect("results") {
            self.usage.requests += sent;
            self.usage.retries += sent.saturating_sub(1);
            match r {
                Ok(entry) => {
                    self.usage.prompt_tokens += entry.prompt_tokens;
                    self.usage.completion_tokens += entry.completion_tokens;
                    out.push(Knowledge { user, text: entry.text, vectors: vec![] });
                }
                Err(e) => {
                    self.usage.failures += 1;
                    let id = &view.catalog.users[user as usize].id;
                    self.host.warn(format!("user {id}: no knowledge after {sent} request(s): {e}"));
                }
            }
        }
        self.usage.estimated_cost = self.usage.prompt_tokens as f64 / 1000.0 * self.cfg.price_per_1k_input
            + self.usage.completion_tokens as f64 / 1000.0 * self.cfg.price_per_1k_output;
        self.usage.save(&self.host, &self.cache)?;
        out.sort_by_key(|k| k.user);
        Ok(out)
    }
}

export_plugin! {
    name: "chatgpt-fuser",
    fusers: { "chatgpt" => ChatGptFuser },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn fuser(api_key_env: &str, base_url: &str) -> Result<ChatGptFuser> {
        let cfg: ChatGptConfig = serde_json::from_value(json!({"api_key_env": api_key_env, "base_url": base_url, "model": "m"}))?;
        ChatGptFuser::new(cfg, Host::standalone(std::env::temp_dir(), 0))
    }

    #[test]
    fn a_key_pasted_into_api_key_env_is_refused_without_echoing_it() {
        let err = fuser("sk-proj-Abc123-secret", "http://127.0.0.1:9").err().unwrap().to_string();
        assert!(err.contains("`api_key_env`") && !err.contains("Abc123"), "{err}");
        assert!(is_env_name("OPENAI_API_KEY") && !is_env_name("sk-x") && !is_env_name("9A"));
    }

    /// A server that echoes the request (Authorization header included) in its error body:
    /// the failure message, which is logged, never carries the key.
    #[test]
    fn error_bodies_are_scrubbed_of_the_key() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            let echoed = String::from_utf8_lossy(&buf[..n]).replace(['\r', '\n', '"'], " ");
            let body = format!("{{\"error\": \"bad request: {echoed}\"}}");
            let reply = format!("HTTP/1.1 401 Unauthorized\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            s.write_all(reply.as_bytes()).unwrap();
        });
        std::env::set_var("RECFUSE_TEST_SCRUB_KEY", "sk-test-KEY-0123456789");
        let f = fuser("RECFUSE_TEST_SCRUB_KEY", &url).unwrap();
        let failure = f.attempt("{}").err().expect("HTTP 401");
        assert!(failure.message.contains("[redacted]"), "{}", failure.message);
        assert!(!failure.message.contains("KEY-0123456789"), "{}", failure.message);
    }
}
