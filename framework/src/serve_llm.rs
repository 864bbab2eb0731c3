//! `recfuse serve-llm`: an OpenAI-compatible Chat Completions server on loopback, backed by the
//! in-process LLM (`recfuse-llm-engine`). It lets the `chatgpt` fuser (and any other OpenAI
//! client) run against a real server speaking the protocol, with no API key and no network.
//!
//! Requests are queued to one generation thread, which takes everything waiting (up to
//! `batch`) and generates it as one batch: concurrent clients share decoding steps.
//!
//! Endpoints: `POST /v1/chat/completions` (whole answers, or `stream: true` as server-sent
//! `chat.completion.chunk` events ending in `data: [DONE]`, with a usage chunk if
//! `stream_options.include_usage`), `GET /v1/models`, `GET /health`, `GET /metrics` (requests,
//! tokens, batches, as JSON). Not supported (answered with a 400 naming the field): `n > 1`, tools.

use anyhow::Result;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use recfuse_llm_engine::{Completion, Decoding, FinishReason, GenParams, Kernel, Llm, Message, OnText};
use std::collections::HashMap;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub model: PathBuf,
    pub addr: SocketAddr,
    /// Most requests generated together.
    pub batch: usize,
    /// How long the generation thread waits for more requests to fill a batch.
    pub gather: Duration,
    /// How the model multiplies by its weights ([`Kernel::best`] unless asked otherwise).
    pub kernel: Kernel,
    /// Required on `/v1/*` and `/metrics` when set.
    pub api_key: crate::http::ApiKey,
    /// Admission: most requests waiting or generating, and most KV-cache memory they may
    /// reserve together (prompt + max_tokens each); beyond either, 503 with Retry-After.
    pub max_queue: usize,
    pub kv_budget_bytes: u64,
    /// Keys and values of recent prompts kept for prompts that begin the same way (0: off).
    pub prefix_cache_bytes: usize,
}

#[derive(Default, Serialize)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    /// Generations stopped because their client went away.
    pub cancelled: AtomicU64,
    /// Requests refused with 503 because the queue or the KV budget was full.
    pub overloaded: AtomicU64,
    pub batches: AtomicU64,
    /// Requests that joined a running batch (continuous batching).
    pub joined: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens taken from the prefix cache instead of computed.
    pub cached_prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
}

struct Job {
    prompt: Vec<u32>,
    params: GenParams,
    sink: Sink,
    /// Its place in the queue and its share of the KV budget, given back when it is done.
    ticket: Ticket,
}

/// What admitted requests hold: how many wait or generate, and the KV memory they reserved.
struct Admission {
    jobs: std::sync::atomic::AtomicUsize,
    kv_bytes: AtomicU64,
    max_jobs: usize,
    budget: u64,
}

/// One admitted request's reservation; released when dropped.
struct Ticket {
    admission: Arc<Admission>,
    kv_bytes: u64,
}

impl Admission {
    /// Reserves a place and `kv_bytes`, or `None` when either is full.
    fn admit(self: &Arc<Self>, kv_bytes: u64) -> Option<Ticket> {
        if self.jobs.fetch_add(1, Ordering::SeqCst) >= self.max_jobs {
            self.jobs.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let mut used = self.kv_bytes.load(Ordering::SeqCst);
        loop {
            if used + kv_bytes > self.budget {
                self.jobs.fetch_sub(1, Ordering::SeqCst);
                return None;
            }
            match self.kv_bytes.compare_exchange(used, used + kv_bytes, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Some(Ticket { admission: self.clone(), kv_bytes }),
                Err(now) => used = now,
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.jobs.fetch_sub(1, Ordering::SeqCst);
        self.admission.kv_bytes.fetch_sub(self.kv_bytes, Ordering::SeqCst);
    }
}

/// Where a job's answer goes: whole, or piece by piece as it is generated.
enum Sink {
    Whole(oneshot::Sender<Result<Completion, String>>),
    Stream(tokio::sync::mpsc::UnboundedSender<Piece>),
}

enum Piece {
    Delta(String),
    Done(Completion),
    Failed(String),
}

impl Sink {
    /// The client went away: nobody will read the answer.
    fn is_closed(&self) -> bool {
        match self {
            Sink::Whole(tx) => tx.is_closed(),
            Sink::Stream(tx) => tx.is_closed(),
        }
    }

    fn finish(self, r: Result<Completion, String>) {
        match self {
            Sink::Whole(tx) => {
                let _ = tx.send(r);
            }
            Sink::Stream(tx) => {
                let _ = tx.send(match r {
                    Ok(c) => Piece::Done(c),
                    Err(e) => Piece::Failed(e),
                });
            }
        }
    }
}

struct AppState {
    jobs: mpsc::Sender<Job>,
    admission: Arc<Admission>,
    llm: Arc<Llm>,
    model_id: String,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
}

/// What a running `recfuse serve-llm` tells its owner.
pub struct LlmServed {
    pub metrics: Arc<Metrics>,
    pub model_id: String,
}

/// A running server; dropping it does not stop it, `shutdown` or Ctrl-C do.
pub type ServerHandle = crate::http::Running<LlmServed>;

/// Loads the model, binds `opts.addr` (port 0 picks a free port) and serves in the background.
pub fn spawn(opts: ServeOptions) -> Result<ServerHandle> {
    anyhow::ensure!(opts.batch > 0, "--batch must be at least 1");
    let llm = Arc::new(Llm::load(&opts.model, opts.kernel)?.with_prefix_cache(opts.prefix_cache_bytes));
    let model_id = opts.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| llm.name.clone());
    let metrics = Arc::new(Metrics::default());
    let (tx, rx) = mpsc::channel::<Job>();
    {
        let (llm, metrics, opts) = (llm.clone(), metrics.clone(), opts.clone());
        std::thread::Builder::new().name("llm-generate".into()).spawn(move || generation_loop(&llm, rx, &opts, &metrics))?;
    }
    let admission = Arc::new(Admission { jobs: Default::default(), kv_bytes: AtomicU64::new(0), max_jobs: opts.max_queue.max(1), budget: opts.kv_budget_bytes });
    let state = Arc::new(AppState { jobs: tx, admission, llm, model_id: model_id.clone(), metrics: metrics.clone(), next_id: AtomicU64::new(1) });
    let protected = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics_json))
        .layer(axum::middleware::from_fn_with_state(opts.api_key.clone(), crate::http::require_key));
    let app = Router::new().route("/health", get(|| async { "ok" })).merge(protected);
    let app = crate::http::json_errors(app, "POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics").with_state(state);
    crate::http::Running::spawn(opts.addr, app, "llm-http", 2, LlmServed { metrics, model_id })
}

/// Continuous batching: requests start together (after waiting `gather` for more when the
/// server is idle), then join the running batch between decoding steps while it has room (up to
/// `batch` rows and the KV budget), and leave it as they finish.
///
/// A request whose prompt is longer than the running batch cannot join it (rows cannot be moved
/// right); it waits at the head of the queue, and nothing overtakes it, so the batch drains and
/// it starts the next one (or the batch grows long enough first).
fn generation_loop(llm: &Llm, rx: mpsc::Receiver<Job>, opts: &ServeOptions, metrics: &Metrics) {
    let per_token = llm.kv_bytes_per_token() as u64;
    let mut waiting: std::collections::VecDeque<Job> = Default::default();
    let mut running: Option<Decoding> = None;
    // The sink and ticket of every row of the running batch, by row id.
    let live: std::cell::RefCell<HashMap<usize, (Sink, Ticket)>> = Default::default();
    let mut next_id = 0usize;
    loop {
        if running.is_none() && waiting.is_empty() {
            match rx.recv() {
                Ok(j) => waiting.push_back(j),
                Err(_) => return,
            }
            let deadline = std::time::Instant::now() + opts.gather;
            while waiting.len() < opts.batch {
                match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
                    Ok(j) => waiting.push_back(j),
                    Err(_) => break,
                }
            }
        }
        while let Ok(j) = rx.try_recv() {
            waiting.push_back(j);
        }
        // A client that left while waiting is not prefilled (its ticket goes back as it drops).
        let before = waiting.len();
        waiting.retain(|j| !j.sink.is_closed());
        metrics.cancelled.fetch_add((before - waiting.len()) as u64, Ordering::Relaxed);
        if waiting.is_empty() && running.is_none() {
            continue;
        }
        let mut admitted: Vec<(usize, Job)> = Vec::new();
        match running.as_mut() {
            None => {
                // A new batch: the waiting requests, in order, while its cache (every row at the
                // longest prompt plus the largest max_tokens) stays within the budget.
                let (mut longest, mut most_new) = (0, 0);
                while let Some(j) = waiting.front() {
                    let (l, m) = (longest.max(j.prompt.len()), most_new.max(j.params.max_new_tokens));
                    if !admitted.is_empty() && (admitted.len() >= opts.batch || (admitted.len() as u64 + 1) * (l + m) as u64 * per_token > opts.kv_budget_bytes) {
                        break;
                    }
                    (longest, most_new) = (l, m);
                    admitted.push((next_id, waiting.pop_front().expect("front")));
                    next_id += 1;
                }
                let jobs: Vec<(usize, &[u32], GenParams)> = admitted.iter().map(|(id, j)| (*id, j.prompt.as_slice(), j.params.clone())).collect();
                metrics.batches.fetch_add(1, Ordering::Relaxed);
                match llm.start(&jobs) {
                    Ok(batch) => running = Some(batch),
                    Err(e) => {
                        for (_, j) in admitted.drain(..) {
                            j.sink.finish(Err(format!("generation failed: {e:#}")));
                        }
                    }
                }
            }
            Some(batch) => {
                while let Some(j) = waiting.front() {
                    let rows = batch.rows() as u64 + 1;
                    let bytes = rows * (batch.len() + batch.most_remaining().max(j.params.max_new_tokens)) as u64 * per_token;
                    if batch.rows() >= opts.batch || !batch.can_join(j.prompt.len()) || bytes > opts.kv_budget_bytes {
                        break;
                    }
                    let j = waiting.pop_front().expect("front");
                    let id = next_id;
                    next_id += 1;
                    match llm.join(batch, id, &j.prompt, j.params.clone()) {
                        Ok(()) => admitted.push((id, j)),
                        Err(e) => j.sink.finish(Err(format!("generation failed: {e:#}"))),
                    }
                }
                if !admitted.is_empty() {
                    metrics.joined.fetch_add(admitted.len() as u64, Ordering::Relaxed);
                }
            }
        }
        live.borrow_mut().extend(admitted.into_iter().map(|(id, j)| (id, (j.sink, j.ticket))));
        let Some(batch) = running.as_mut() else { continue };
        let mut delta = |id: usize, text: &str| {
            if let Some((Sink::Stream(tx), _)) = live.borrow().get(&id) {
                let _ = tx.send(Piece::Delta(text.to_string()));
            }
        };
        let mut done = |id: usize, c: Completion| {
            if c.finish == FinishReason::Cancelled {
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            // Its place and KV reservation go back with the ticket.
            if let Some((sink, _ticket)) = live.borrow_mut().remove(&id) {
                sink.finish(Ok(c));
            }
            Ok(())
        };
        // A client that went away (closed its stream, timed out) leaves the batch at once.
        let cancelled = |id: usize| live.borrow().get(&id).is_some_and(|(sink, _)| sink.is_closed());
        let mut on_text: OnText<'_> = Some(&mut delta);
        if let Err(e) = llm.step(batch, &mut on_text, &mut done, &cancelled) {
            for (_, (sink, _)) in live.borrow_mut().drain() {
                sink.finish(Err(format!("generation failed: {e:#}")));
            }
            running = None;
            continue;
        }
        if batch.is_empty() {
            running = None;
        }
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    /// Parsed by [`parse_messages`]: content may be a string, `null` (assistant) or an array of
    /// text parts.
    messages: Vec<Value>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    response_format: Option<Value>,
}

/// The most a request body may hold.
const MAX_BODY_BYTES: usize = 4 << 20;

/// The roles a chat may use (`developer` is OpenAI's newer name for `system`).
const ROLES: [&str; 4] = ["system", "developer", "user", "assistant"];

/// Messages as the engine takes them, or a 400 naming the message and field.
fn parse_messages(raw: &[Value]) -> Result<Vec<Message>, Response> {
    raw.iter()
        .enumerate()
        .map(|(i, m)| {
            let bad = |field: &str, message: String| error(StatusCode::BAD_REQUEST, message, Some(&format!("messages[{i}]{field}")), None);
            let role = match m.get("role").and_then(Value::as_str) {
                Some(r) if ROLES.contains(&r) => if r == "developer" { "system" } else { r },
                Some("tool") => return Err(bad(".role", "tool messages are not supported (tools are not)".into())),
                Some(r) => return Err(bad(".role", format!("unknown role `{r}` (roles: {})", ROLES.join(", ")))),
                None => return Err(bad(".role", "every message needs a `role`".into())),
            };
            let content = match m.get("content") {
                Some(Value::String(t)) => t.clone(),
                Some(Value::Null) | None if role == "assistant" => String::new(),
                Some(Value::Array(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for (j, part) in parts.iter().enumerate() {
                        match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => texts.push(t),
                            (kind, _) => {
                                return Err(bad(
                                    &format!(".content[{j}]"),
                                    format!("only text content parts (`{{\"type\": \"text\", \"text\": ...}}`) are supported, got {}", kind.unwrap_or("a part without a type")),
                                ))
                            }
                        }
                    }
                    texts.join("\n")
                }
                _ => return Err(bad(".content", "`content` must be a string or an array of text parts".into())),
            };
            Ok(Message { role: role.to_string(), content })
        })
        .collect()
}

/// OpenAI's `stop`: a string or an array of up to 4 strings.
fn parse_stop(stop: Option<&Value>) -> Result<Vec<String>, Response> {
    let bad = || error(StatusCode::BAD_REQUEST, "`stop` must be a string or an array of up to 4 strings", Some("stop"), None);
    match stop {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![s.clone()].into_iter().filter(|s| !s.is_empty()).collect()),
        Some(Value::Array(a)) if a.len() <= 4 => a.iter().map(|v| v.as_str().map(str::to_string).ok_or_else(bad)).filter(|s| !matches!(s, Ok(t) if t.is_empty())).collect(),
        Some(_) => Err(bad()),
    }
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

use crate::http::error;

async fn chat_completions(State(s): State<Arc<AppState>>, body: axum::body::Body) -> Response {
    s.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let reject = |r: Response| {
        s.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        r
    };
    let body = match crate::http::read_body(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(r) => return reject(r),
    };
    let req: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return reject(error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}"), None, None)),
    };
    if req.n.unwrap_or(1) != 1 {
        return reject(error(StatusCode::BAD_REQUEST, "only n = 1 is supported", Some("n"), None));
    }
    if req.tools.is_some() {
        return reject(error(StatusCode::BAD_REQUEST, "tools are not supported", Some("tools"), None));
    }
    if let Some(m) = req.model.as_deref().filter(|m| *m != s.model_id) {
        return reject(error(
            StatusCode::NOT_FOUND,
            format!("The model `{m}` does not exist: this server serves `{}` (GET /v1/models)", s.model_id),
            Some("model"),
            Some("model_not_found"),
        ));
    }
    if let Some(kind) = req.response_format.as_ref().map(|f| f.get("type").and_then(Value::as_str).unwrap_or("?")).filter(|k| *k != "text") {
        return reject(error(
            StatusCode::BAD_REQUEST,
            format!("response_format `{kind}` is not supported: this server does not constrain decoding (only `text`)"),
            Some("response_format"),
            None,
        ));
    }
    if req.messages.is_empty() {
        return reject(error(StatusCode::BAD_REQUEST, "messages must not be empty", Some("messages"), None));
    }
    let messages = match parse_messages(&req.messages) {
        Ok(m) => m,
        Err(r) => return reject(r),
    };
    let stop = match parse_stop(req.stop.as_ref()) {
        Ok(s) => s,
        Err(r) => return reject(r),
    };
    let temperature = req.temperature.unwrap_or(1.0);
    let top_p = req.top_p.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return reject(error(StatusCode::BAD_REQUEST, "temperature must be in [0, 2]", Some("temperature"), None));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return reject(error(StatusCode::BAD_REQUEST, "top_p must be in (0, 1]", Some("top_p"), None));
    }
    for (name, v) in [("max_tokens", req.max_tokens), ("max_completion_tokens", req.max_completion_tokens)] {
        if v == Some(0) {
            return reject(error(StatusCode::BAD_REQUEST, format!("{name} must be at least 1"), Some(name), None));
        }
    }
    let (frequency_penalty, presence_penalty) = (req.frequency_penalty.unwrap_or(0.0), req.presence_penalty.unwrap_or(0.0));
    for (name, v) in [("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)] {
        if !(-2.0..=2.0).contains(&v) {
            return reject(error(StatusCode::BAD_REQUEST, format!("{name} must be in [-2, 2]"), Some(name), None));
        }
    }
    let prompt = match s.llm.encode_chat(&messages) {
        Ok(p) => p,
        Err(e) => return reject(error(StatusCode::BAD_REQUEST, format!("{e:#}"), Some("messages"), None)),
    };
    let context = s.llm.hyper().context;
    let max_new = req.max_completion_tokens.or(req.max_tokens).unwrap_or(256).min(context.saturating_sub(prompt.len()));
    if prompt.len() >= context || max_new == 0 {
        return reject(error(
            StatusCode::BAD_REQUEST,
            format!("the prompt has {} tokens; this model's context is {context}", prompt.len()),
            Some("messages"),
            Some("context_length_exceeded"),
        ));
    }
    // Admission: a place in the queue and the KV memory this request may take.
    let kv_bytes = (prompt.len() + max_new) as u64 * s.llm.kv_bytes_per_token() as u64;
    if kv_bytes > s.admission.budget {
        return reject(error(
            StatusCode::BAD_REQUEST,
            format!("prompt + max_tokens ({} tokens) need more KV memory than the server's budget allows ({} tokens)", prompt.len() + max_new, s.admission.budget / s.llm.kv_bytes_per_token() as u64),
            Some("max_tokens"),
            None,
        ));
    }
    let Some(ticket) = s.admission.admit(kv_bytes) else {
        s.metrics.overloaded.fetch_add(1, Ordering::Relaxed);
        let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "the server is at capacity (queue or KV memory budget full): retry later", None, Some("server_overloaded"));
        r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        return reject(r);
    };
    let id = s.next_id.fetch_add(1, Ordering::Relaxed);
    let params = GenParams {
        max_new_tokens: max_new,
        temperature,
        top_p,
        seed: req.seed.unwrap_or(id),
        frequency_penalty,
        presence_penalty,
        stop,
        ..Default::default()
    };
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let model = req.model.clone().unwrap_or_else(|| s.model_id.clone());
    if req.stream == Some(true) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if s.jobs.send(Job { prompt, params, sink: Sink::Stream(tx), ticket }).is_err() {
            return error(StatusCode::SERVICE_UNAVAILABLE, "the generation thread has stopped", None, None);
        }
        let chunk = ChunkHeader { id: format!("chatcmpl-{id}"), created, model };
        let usage = req.stream_options.unwrap_or_default().include_usage;
        return stream_response(s.clone(), chunk, usage, rx);
    }
    let (tx, rx) = oneshot::channel();
    if s.jobs.send(Job { prompt, params, sink: Sink::Whole(tx), ticket }).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the generation thread has stopped", None, None);
    }
    let c = match rx.await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e, None, None),
        Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "generation was dropped", None, None),
    };
    s.metrics.count(&c);
    Json(json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish}],
        "usage": usage_json(&c),
    }))
    .into_response()
}

impl Metrics {
    fn count(&self, c: &Completion) {
        self.prompt_tokens.fetch_add(c.prompt_tokens as u64, Ordering::Relaxed);
        self.cached_prompt_tokens.fetch_add(c.cached_tokens as u64, Ordering::Relaxed);
        self.completion_tokens.fetch_add(c.completion_tokens as u64, Ordering::Relaxed);
    }
}

fn usage_json(c: &Completion) -> Value {
    json!({"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
           "total_tokens": c.prompt_tokens + c.completion_tokens,
           "prompt_tokens_details": {"cached_tokens": c.cached_tokens}})
}

/// What every chunk of one streamed answer repeats.
struct ChunkHeader {
    id: String,
    created: u64,
    model: String,
}

impl ChunkHeader {
    fn event(&self, choices: Value, usage: Option<Value>) -> String {
        let mut v = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        format!("data: {v}\n\n")
    }
}

/// Server-sent events: a role chunk, one chunk per piece of text, a chunk with the finish
/// reason, optionally a usage chunk, then `data: [DONE]`.
fn stream_response(
    s: Arc<AppState>,
    head: ChunkHeader,
    include_usage: bool,
    rx: tokio::sync::mpsc::UnboundedReceiver<Piece>,
) -> Response {
    use futures_util::StreamExt;
    let first = head.event(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]), None);
    let rest = futures_util::stream::unfold(Some((rx, head)), move |state| {
        let s = s.clone();
        async move {
            let (mut rx, head) = state?;
            let event = match rx.recv().await {
                Some(Piece::Delta(text)) => {
                    let e = head.event(json!([{"index": 0, "delta": {"content": text}, "finish_reason": null}]), None);
                    return Some((e, Some((rx, head))));
                }
                Some(Piece::Done(c)) => {
                    s.metrics.count(&c);
                    let mut e = head.event(json!([{"index": 0, "delta": {}, "finish_reason": c.finish}]), None);
                    if include_usage {
                        e += &head.event(json!([]), Some(usage_json(&c)));
                    }
                    e
                }
                Some(Piece::Failed(msg)) => format!("data: {}\n\n", json!({"error": {"message": msg, "type": "server_error"}})),
                None => format!("data: {}\n\n", json!({"error": {"message": "generation was dropped", "type": "server_error"}})),
            };
            Some((event + "data: [DONE]\n\n", None))
        }
    });
    let body = futures_util::stream::once(async move { first }).chain(rest).map(Ok::<_, std::convert::Infallible>);
    Response::builder()
        .header("Content-Type", "text/event-stream")
        .header("Cache-Control", "no-cache")
        .body(axum::body::Body::from_stream(body))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "building the stream", None, None))
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": s.model_id, "object": "model", "created": 0, "owned_by": "recfuse"}]}))
}

async fn metrics_json(State(s): State<Arc<AppState>>) -> Json<Value> {
    Json(serde_json::to_value(&*s.metrics).unwrap_or(Value::Null))
}
