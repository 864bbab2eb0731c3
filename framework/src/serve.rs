//! `recfuse serve RUN_DIR`: recommendations from a finished run over HTTP (JSON), on loopback by
//! default.
//!
//! The server rebuilds what the run's rankers need from the run directory alone:
//! * the config (`config.resolved.toml`) and the dataset and split it names;
//! * the run's instruction builders (for rankers that score prompts);
//! * the knowledge and the tuner's artifact;
//! * the chosen ranker, restored from `rankers/<label>/` (a ranker that does not save, such as
//!   popularity, is fitted at start-up as the run fitted it), with its first stage when it
//!   reranks.
//!
//! Fusers and tuners are not built: serving needs no API key of theirs.
//!
//! * `POST /v1/recommend` takes `{"user", "k", "candidates"?, "exclude_seen"?}` and returns the
//!   top `k` items with ids, titles and scores. A user the run does not know gets the
//!   documented fallback: the most popular items of the run's training data (`"fallback":
//!   "popularity"`).
//! * `GET /health` is always open. `GET /metrics` gives Prometheus text.
//! * Errors are JSON in the OpenAI shape, naming the bad field (`param`); unknown item ids are
//!   listed.
//! * An optional bearer key ([`crate::http`]) protects `/v1/*` and `/metrics`.
//! * Ctrl-C stops the server after the requests in flight.

use crate::config::{ConfigSources, LoadedConfig, Protocol};
use crate::eval::{compose_two_stage, top_n};
use crate::handles::{FitData, RankerHandle};
use crate::host::{HostServices, Progress, TaskTable, Tasks};
use crate::http::{require_key, ApiKey};
use crate::knowledge::KnowledgeBase;
use crate::pipeline;
use crate::split::split_dataset;
use anyhow::{bail, ensure, Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use recfuse_sdk::records::*;
use serde::Serialize;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What one request may ask for.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_k: usize,
    pub max_candidates: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_body_bytes: 256 * 1024, max_k: 1000, max_candidates: 10_000 }
    }
}

#[derive(Clone)]
pub struct ServeOptions {
    pub run_dir: PathBuf,
    pub addr: SocketAddr,
    /// Label of the ranker to serve (default: the first in the config).
    pub ranker: Option<String>,
    pub api_key: ApiKey,
    pub limits: Limits,
}

/// The served model: a ranker restored from its save, and its first stage when it reranks.
pub struct Recommender {
    pub label: String,
    ranker: RankerHandle,
    first: Option<(RankerHandle, usize)>,
    catalog: Arc<Catalog>,
    users: HashMap<String, UserIdx>,
    items: HashMap<String, ItemIdx>,
    /// Items each user interacted with in the run's context (train and validation).
    seen: Vec<Vec<ItemIdx>>,
    /// Train events per item: the fallback's score.
    popularity: Vec<f32>,
}

/// The labels of a run's rankers, for error messages.
fn labels(cfg: &LoadedConfig) -> String {
    cfg.pipeline.rankers.iter().map(|r| r.label.as_str()).collect::<Vec<_>>().join(", ")
}

impl Recommender {
    /// Loads ranker `label` (default: the first) of the run in `run_dir`.
    pub fn load(run_dir: &Path, label: Option<&str>) -> Result<Self> {
        let config = run_dir.join("config.resolved.toml");
        ensure!(config.is_file(), "{} is not a run directory (no config.resolved.toml): run `recfuse run CONFIG` first", run_dir.display());
        let cfg = LoadedConfig::load(&ConfigSources { base: config, overlays: vec![], sets: vec![] })?;
        let p = &cfg.pipeline;
        let index = match label {
            Some(l) => p.rankers.iter().position(|r| r.label == l).with_context(|| format!("--ranker: the run has no ranker `{l}` (it has: {})", labels(&cfg)))?,
            None if p.rankers.is_empty() => bail!("the run has no rankers to serve"),
            None => 0,
        };
        let registry = pipeline::registry_for(p)?;
        let tasks = TaskTable::declared(p.instructions.iter().map(|s| s.label.clone()).collect());
        let cancel = Arc::new(AtomicBool::new(false));
        let host = |key: &str| {
            HostServices {
                component: Arc::from(key),
                run_dir: run_dir.join("components").join(key.replace(['[', ']'], "")),
                seed: pipeline::derive_seed(p.run.seed, key),
                cancel: cancel.clone(),
                progress: Progress::new(false),
                tasks: tasks.clone(),
            }
            .into_ffi()
        };
        let mut source = registry.source(&p.source.kind, &p.source.settings, host(&p.source.key)).context("config key `source`")?;
        let builders = p
            .instructions
            .iter()
            .map(|s| Ok((s.label.clone(), Arc::new(Mutex::new(registry.instructions(&s.kind, &s.settings, host(&s.key))?)))))
            .collect::<Result<Vec<_>>>()?;
        let dataset = pipeline::load_dataset(&mut source, p)?;
        let split = split_dataset(&dataset, &p.split);
        tasks.set(Tasks::new(builders, split.history.clone()));
        let kb = KnowledgeBase::load(run_dir)?;
        let artifact = match &p.tuner {
            Some(_) => Some(crate::stages::tune::artifact(run_dir)?),
            None => None,
        };
        let valid = split.validation_targets();
        let data = FitData::of_run(&split, &kb, artifact.as_ref(), &valid);
        let restore = |i: usize| -> Result<RankerHandle> {
            let spec = &p.rankers[i];
            let mut handle = registry.ranker(&spec.kind, &spec.settings, host(&spec.key)).with_context(|| format!("config key `{}`", spec.key))?;
            let dir = run_dir.join("rankers").join(&spec.label);
            if crate::stages::rank::saved_model(&dir) {
                ensure!(handle.load(&data, &dir)?, "ranker `{}` could not load its saved model from {}", spec.label, dir.display());
            } else {
                // A ranker that does not save (popularity, 1.0 plugins) is fitted as the run
                // fitted it: same data, same seed.
                tracing::info!(ranker = spec.label.as_str(), "no saved model in {}: fitting at start-up", dir.display());
                handle.fit(&data)?;
            }
            Ok(handle)
        };
        let ranker = restore(index)?;
        let first = match &p.rankers[index].rerank {
            Some(rr) => Some((restore(p.rankers.iter().position(|r| r.label == rr.from).expect("checked by config"))?, rr.top)),
            None => None,
        };
        if p.eval.protocol == Protocol::Sampled {
            tracing::info!("the run evaluated under sampled ranking; serving ranks the full catalog or the given candidates");
        }
        let catalog = split.history.catalog.clone();
        let context = split.context.view();
        let seen = (0..catalog.users.len() as u32)
            .map(|u| {
                let mut items: Vec<ItemIdx> = context.history(u).iter().map(|e| e.item).filter(|&i| i != NONE).collect();
                items.sort_unstable();
                items.dedup();
                items
            })
            .collect();
        let mut popularity = vec![0f32; catalog.items.len()];
        split.train.events.iter().filter(|e| e.item != NONE).for_each(|e| popularity[e.item as usize] += 1.0);
        Ok(Self {
            label: p.rankers[index].label.clone(),
            ranker,
            first,
            users: catalog.users.iter().enumerate().map(|(i, u)| (u.id.clone(), i as UserIdx)).collect(),
            items: catalog.items.iter().enumerate().map(|(i, it)| (it.id.clone(), i as ItemIdx)).collect(),
            catalog,
            seen,
            popularity,
        })
    }

    /// The top `k` of `candidates` (every item when `None`) for `user` (`None`: not in the run,
    /// ranked by popularity). Returns (item, score) best first.
    pub fn recommend(&self, user: Option<UserIdx>, candidates: Option<&[ItemIdx]>, k: usize, exclude_seen: bool) -> Result<Vec<(ItemIdx, f32)>> {
        let all: Vec<ItemIdx>;
        let items = match candidates {
            Some(c) => c,
            None => {
                all = (0..self.catalog.items.len() as ItemIdx).collect();
                &all
            }
        };
        let seen: &[ItemIdx] = match user {
            Some(u) if exclude_seen => &self.seen[u as usize],
            _ => &[],
        };
        let masked = |j: usize| seen.binary_search(&items[j]).is_ok();
        let scores: Vec<f32> = match user {
            None => items.iter().map(|&i| self.popularity[i as usize]).collect(),
            Some(u) => {
                let users = [u];
                fn batch<'a>(users: &'a [UserIdx], items: &'a [ItemIdx]) -> ScoreBatch<'a> {
                    ScoreBatch { users, items, shared: false }
                }
                let (scorer, rest) = match &self.first {
                    Some((first, top)) => (first, Some(*top)),
                    None => (&self.ranker, None),
                };
                let mut s = vec![0f32; items.len()];
                scorer.score(&batch(&users, items), &mut s)?;
                if let Some(top) = rest {
                    // Two-stage, as evaluated: the second stage reorders the first stage's top.
                    let top = top_n(&s, masked, top);
                    let picked: Vec<ItemIdx> = top.iter().map(|&j| items[j]).collect();
                    let mut second = vec![0f32; picked.len()];
                    self.ranker.score(&batch(&users, &picked), &mut second)?;
                    s = compose_two_stage(&s, masked, &top, &second);
                }
                s
            }
        };
        if let Some(bad) = scores.iter().position(|x| x.is_nan()) {
            bail!("ranker `{}` returned NaN for item {}", self.label, self.catalog.items[items[bad] as usize].id);
        }
        Ok(top_n(&scores, masked, k).into_iter().map(|j| (items[j], scores[j])).collect())
    }
}

/// Request counters and latencies, exposed as Prometheus text on `/metrics`.
#[derive(Default)]
struct Metrics {
    /// (route, status) → count.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    fallbacks: AtomicU64,
    candidates: AtomicU64,
    /// Counts per upper bound of [`BUCKETS`] (the last is +Inf), and the sum in microseconds.
    latency: Mutex<(Vec<u64>, f64)>,
}

const BUCKETS: [f64; 11] = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

impl Metrics {
    fn record(&self, route: &'static str, status: StatusCode, seconds: Option<f64>) {
        *self.requests.lock().expect("metrics lock").entry((route, status.as_u16())).or_default() += 1;
        if let Some(s) = seconds {
            let mut l = self.latency.lock().expect("metrics lock");
            if l.0.is_empty() {
                l.0 = vec![0; BUCKETS.len() + 1];
            }
            let b = BUCKETS.iter().position(|&ub| s <= ub).unwrap_or(BUCKETS.len());
            l.0[b] += 1;
            l.1 += s;
        }
    }

    fn prometheus(&self, model: &str) -> String {
        let mut out = String::from("# HELP recfuse_http_requests_total HTTP requests by route and status.\n# TYPE recfuse_http_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().expect("metrics lock").iter() {
            out.push_str(&format!("recfuse_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n"));
        }
        out.push_str(&format!(
            "# HELP recfuse_recommend_fallback_total Recommendations for users the run does not know (popularity).\n# TYPE recfuse_recommend_fallback_total counter\nrecfuse_recommend_fallback_total {}\n",
            self.fallbacks.load(Ordering::Relaxed)
        ));
        out.push_str(&format!(
            "# HELP recfuse_candidates_scored_total Candidates scored.\n# TYPE recfuse_candidates_scored_total counter\nrecfuse_candidates_scored_total{{model=\"{model}\"}} {}\n",
            self.candidates.load(Ordering::Relaxed)
        ));
        out.push_str("# HELP recfuse_recommend_seconds Time to answer a recommendation.\n# TYPE recfuse_recommend_seconds histogram\n");
        let l = self.latency.lock().expect("metrics lock");
        let counts = if l.0.is_empty() { vec![0; BUCKETS.len() + 1] } else { l.0.clone() };
        let mut cumulative = 0;
        for (i, ub) in BUCKETS.iter().map(|b| b.to_string()).chain(["+Inf".to_string()]).enumerate() {
            cumulative += counts[i];
            out.push_str(&format!("recfuse_recommend_seconds_bucket{{le=\"{ub}\"}} {cumulative}\n"));
        }
        out.push_str(&format!("recfuse_recommend_seconds_sum {}\nrecfuse_recommend_seconds_count {cumulative}\n", l.1));
        out
    }
}

struct AppState {
    model: Arc<Recommender>,
    limits: Limits,
    metrics: Metrics,
}

/// An error in the OpenAI shape ([`crate::http::error`]); `param` names the bad field, `extra`
/// adds a field to `error` (the unknown item ids).
fn error(status: StatusCode, message: impl Into<String>, param: Option<&str>, extra: Option<(&str, serde_json::Value)>) -> Response {
    let Some((key, value)) = extra else { return crate::http::error(status, message, param, None) };
    let mut body = json!({"error": {"message": message.into(), "type": "invalid_request_error", "param": param, "code": null}});
    body["error"][key] = value;
    (status, Json(body)).into_response()
}

struct RecommendRequest {
    user: String,
    k: usize,
    candidates: Option<Vec<String>>,
    exclude_seen: bool,
}

impl RecommendRequest {
    /// Parses a request body; the error names the offending field (`param`).
    fn parse(body: &[u8]) -> std::result::Result<Self, (String, Option<String>)> {
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| (format!("the body is not JSON: {e}"), None))?;
        let obj = v.as_object().ok_or_else(|| ("the body must be a JSON object".to_string(), None))?;
        if let Some(k) = obj.keys().find(|k| !["user", "k", "candidates", "exclude_seen"].contains(&k.as_str())) {
            return Err((format!("unknown field `{k}` (fields: user, k, candidates, exclude_seen)"), Some(k.clone())));
        }
        let bad = |field: &str, what: &str| (format!("`{field}` must be {what}"), Some(field.to_string()));
        let user = match obj.get("user") {
            Some(serde_json::Value::String(u)) if !u.is_empty() => u.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(), // ids that look like numbers
            None => return Err(("missing field `user`".into(), Some("user".into()))),
            Some(_) => return Err(bad("user", "a non-empty string (a user id)")),
        };
        let k = match obj.get("k") {
            None => 10,
            Some(v) => v.as_u64().ok_or_else(|| bad("k", "a positive integer"))? as usize,
        };
        let candidates = match obj.get("candidates") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Array(a)) => Some(
                a.iter()
                    .map(|x| match x {
                        serde_json::Value::String(s) => Ok(s.clone()),
                        serde_json::Value::Number(n) => Ok(n.to_string()),
                        _ => Err(bad("candidates", "an array of item ids (strings)")),
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?,
            ),
            Some(_) => return Err(bad("candidates", "an array of item ids (strings)")),
        };
        let exclude_seen = match obj.get("exclude_seen") {
            None => true,
            Some(v) => v.as_bool().ok_or_else(|| bad("exclude_seen", "true or false"))?,
        };
        Ok(Self { user, k, candidates, exclude_seen })
    }
}

#[derive(Serialize)]
struct Recommended<'a> {
    id: &'a str,
    title: &'a str,
    score: f32,
}

async fn recommend(State(s): State<Arc<AppState>>, body: axum::body::Body) -> Response {
    let t = Instant::now();
    let response = answer(&s, body).await;
    let timed = response.status().is_success().then(|| t.elapsed().as_secs_f64());
    s.metrics.record("/v1/recommend", response.status(), timed);
    response
}

async fn answer(s: &Arc<AppState>, body: axum::body::Body) -> Response {
    let body = match crate::http::read_body(body, s.limits.max_body_bytes).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let req = match RecommendRequest::parse(&body) {
        Ok(r) => r,
        Err((message, param)) => return error(StatusCode::BAD_REQUEST, message, param.as_deref(), None),
    };
    let limits = &s.limits;
    if req.k == 0 || req.k > limits.max_k {
        return error(StatusCode::BAD_REQUEST, format!("`k` must be between 1 and {}, got {}", limits.max_k, req.k), Some("k"), None);
    }
    let model = &s.model;
    let candidates = match &req.candidates {
        None => None,
        Some(c) if c.is_empty() => return error(StatusCode::BAD_REQUEST, "`candidates` is empty (leave it out to rank the whole catalog)", Some("candidates"), None),
        Some(c) if c.len() > limits.max_candidates => {
            return error(StatusCode::BAD_REQUEST, format!("at most {} candidates per request, got {}", limits.max_candidates, c.len()), Some("candidates"), None)
        }
        Some(c) => {
            let unknown: Vec<&str> = c.iter().filter(|id| !model.items.contains_key(id.as_str())).map(|id| id.as_str()).collect();
            if !unknown.is_empty() {
                let shown: Vec<&str> = unknown.iter().take(20).copied().collect();
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("{} unknown item id(s) in `candidates`: {}{}", unknown.len(), shown.join(", "), if unknown.len() > 20 { ", ..." } else { "" }),
                    Some("candidates"),
                    Some(("unknown_items", json!(unknown))),
                );
            }
            let mut ids: Vec<ItemIdx> = c.iter().map(|id| model.items[id.as_str()]).collect();
            ids.sort_unstable();
            ids.dedup();
            Some(ids)
        }
    };
    let user = model.users.get(&req.user).copied();
    let (m, k, exclude) = (model.clone(), req.k, req.exclude_seen);
    let scored = tokio::task::spawn_blocking(move || m.recommend(user, candidates.as_deref(), k, exclude)).await;
    let top = match scored {
        Ok(Ok(top)) => top,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"), None, None),
        Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "the ranker panicked", None, None),
    };
    s.metrics.candidates.fetch_add(req.candidates.as_ref().map_or(model.catalog.items.len(), |c| c.len()) as u64, Ordering::Relaxed);
    if user.is_none() {
        s.metrics.fallbacks.fetch_add(1, Ordering::Relaxed);
    }
    let items: Vec<Recommended> = top
        .iter()
        .map(|&(i, score)| {
            let item = &model.catalog.items[i as usize];
            Recommended { id: &item.id, title: &item.title, score }
        })
        .collect();
    Json(json!({
        "user": req.user,
        "model": if user.is_some() { model.label.as_str() } else { "popularity" },
        "fallback": if user.is_some() { None } else { Some("popularity") },
        "items": items,
    }))
    .into_response()
}

/// What a running `recfuse serve` tells its owner.
pub struct Served {
    /// Label of the served ranker.
    pub model: String,
}

/// A running server; `shutdown` stops it, Ctrl-C too.
pub type ServerHandle = crate::http::Running<Served>;

/// Loads the run's ranker, binds `opts.addr` (port 0 picks a free port) and serves in the
/// background until shut down or Ctrl-C.
pub fn spawn(opts: ServeOptions) -> Result<ServerHandle> {
    let model = Arc::new(Recommender::load(&opts.run_dir, opts.ranker.as_deref())?);
    let label = model.label.clone();
    let state = Arc::new(AppState { model, limits: opts.limits.clone(), metrics: Metrics::default() });
    let protected = Router::new()
        .route("/v1/recommend", post(recommend))
        .route("/metrics", get(|State(s): State<Arc<AppState>>| async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.prometheus(&s.model.label)) }))
        .layer(axum::middleware::from_fn_with_state(opts.api_key.clone(), require_key));
    let app = Router::new()
        .route("/health", get(|State(s): State<Arc<AppState>>| async move { Json(json!({"status": "ok", "model": s.model.label, "users": s.model.users.len(), "items": s.model.items.len()})) }))
        .merge(protected);
    let app = crate::http::json_errors(app, "POST /v1/recommend, GET /health, GET /metrics").with_state(state);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    crate::http::Running::spawn(opts.addr, app, "serve", cores, Served { model: label })
}
