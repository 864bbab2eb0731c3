//! The `ort` ranker: scores (user, item) pairs with an ONNX model in ONNX Runtime. The model is
//! either one of your own (`model`, with `inputs` saying what feeds each of its inputs) or the
//! feature MLP the ranker trains in candle and exports (`train`), checked against the
//! training-side scores before it is used.

use crate::mlp::{self, FeatureMlp, Features, TrainConfig};
use crate::runtime::{Provider, SessionOptions, SessionPool, TensorSpec};
use anyhow::{bail, ensure, Context, Result};
use ort::value::{DynValue, Tensor, TensorElementType};
use recfuse_sdk::prelude::*;
use recfuse_sdk::rng::SeededRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Largest difference allowed between the exported model's scores and the training side's.
pub const EXPORT_TOLERANCE: f32 = 1e-5;
/// Pairs compared in that check.
const CHECK_PAIRS: usize = 2048;
/// Validation users scored per epoch to pick the best one.
const VALIDATION_USERS: usize = 256;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// An ONNX model of your own. Without it, the ranker trains its feature MLP (`train`).
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// With `model`: each input of the model and what feeds it, one of `user_vector:<name>`,
    /// `item_vector:<name>` (a knowledge vector, f32 [batch, dim]), `user_index`, `item_index`
    /// (int64 [batch]). Checked against the model when it loads.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// With `model`: the output holding the scores, f32 [batch] or [batch, 1].
    #[serde(default = "default_output")]
    pub output: String,
    /// The trained model's features: which user and item knowledge vectors it reads (default
    /// `minilm`, what `[embed]` writes). Without `model` only.
    #[serde(default)]
    pub user_vector: Option<String>,
    #[serde(default)]
    pub item_vector: Option<String>,
    /// How the feature MLP is shaped and trained (default: [`TrainConfig::default`]). Without
    /// `model` only.
    #[serde(default)]
    pub train: Option<TrainConfig>,
    #[serde(default)]
    pub provider: Provider,
    #[serde(default)]
    pub cuda_device: i32,
    /// Sessions in the pool: batches of pairs scored at once.
    #[serde(default = "default_sessions")]
    pub sessions: usize,
    /// Threads per session (0: the cores divided among the sessions).
    #[serde(default)]
    pub threads: usize,
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, else what scripts/fetch-data.sh fetched).
    #[serde(default)]
    pub runtime_library: Option<PathBuf>,
    /// Pairs per ONNX Runtime call.
    #[serde(default = "default_batch_pairs")]
    pub batch_pairs: usize,
    pub seed: Option<u64>,
}

fn default_output() -> String {
    mlp::SCORE.into()
}
/// The vector the trained model reads when the config names none.
const DEFAULT_VECTOR: &str = "minilm";
fn default_sessions() -> usize {
    2
}
fn default_batch_pairs() -> usize {
    4096
}

/// What feeds one input of the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feed {
    UserVector(String),
    ItemVector(String),
    UserIndex,
    ItemIndex,
}

impl Feed {
    fn parse(key: &str, s: &str) -> Result<Self> {
        Ok(match s.split_once(':') {
            Some(("user_vector", name)) if !name.is_empty() => Feed::UserVector(name.into()),
            Some(("item_vector", name)) if !name.is_empty() => Feed::ItemVector(name.into()),
            None if s == "user_index" => Feed::UserIndex,
            None if s == "item_index" => Feed::ItemIndex,
            _ => bail!("`inputs.{key}` = {s:?}: expected `user_vector:<name>`, `item_vector:<name>`, `user_index` or `item_index`"),
        })
    }
}

/// Knowledge vectors of one name, one row per user or item (zeros where missing).
struct Table {
    rows: Vec<f32>,
    dim: usize,
}

/// The table of vector `name` over `n` users or items, from `(index, vectors)` records.
fn table<'a>(side: &str, name: &str, n: usize, records: impl Iterator<Item = (u32, &'a [NamedVector])>) -> Result<Table> {
    let mut dim = 0;
    let mut found: Vec<(u32, &'a [f32])> = Vec::new();
    for (i, vs) in records {
        if let Some(v) = vs.iter().find(|v| v.name == name) {
            ensure!(dim == 0 || v.values.len() == dim, "{side} vector `{name}` has {} values for {side} {i}, {dim} for others", v.values.len());
            dim = v.values.len();
            found.push((i, &v.values));
        }
    }
    ensure!(
        dim > 0,
        "no {side} knowledge has a vector `{name}`: embed the knowledge texts (an `[embed]` section with `name = \"{name}\"`) or set `{side}_vector` to a vector the fusers produce"
    );
    let mut rows = vec![0f32; n * dim];
    for (i, v) in found {
        if (i as usize) < n {
            rows[i as usize * dim..(i as usize + 1) * dim].copy_from_slice(v);
        }
    }
    Ok(Table { rows, dim })
}

/// What `save` writes beside the model, and `load` reads back.
#[derive(Serialize, Deserialize)]
struct Saved {
    feeds: Vec<(String, Feed)>,
    output: String,
    /// For a trained model: the export check.
    export_check: Option<ExportCheck>,
}

/// The exported model against the training side.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ExportCheck {
    pub pairs: usize,
    pub max_abs_diff: f32,
}

/// The check's pairs: the model's inputs for them and the training side's scores, saved as
/// `export_check.safetensors` so another runtime (Python onnxruntime) can repeat the check.
struct CheckData {
    users: Vec<u32>,
    items: Vec<u32>,
    expected: Vec<f32>,
}

/// A loaded model with its feature tables.
struct Loaded {
    pool: SessionPool,
    bytes: Vec<u8>,
    feeds: Vec<(String, Feed)>,
    output: String,
    tables: BTreeMap<String, Table>,
    export_check: Option<ExportCheck>,
    check_data: Option<CheckData>,
}

pub struct OrtRanker {
    cfg: Config,
    host: Host,
    loaded: Option<Loaded>,
}

impl OrtRanker {
    fn session_options(&self) -> SessionOptions {
        SessionOptions { provider: self.cfg.provider, cuda_device: self.cfg.cuda_device, sessions: self.cfg.sessions, threads: self.cfg.threads, runtime_library: self.cfg.runtime_library.clone() }
    }

    fn user_vector(&self) -> &str {
        self.cfg.user_vector.as_deref().unwrap_or(DEFAULT_VECTOR)
    }
    fn item_vector(&self) -> &str {
        self.cfg.item_vector.as_deref().unwrap_or(DEFAULT_VECTOR)
    }

    /// The feeds of the configured model, or of the trained one.
    fn feeds(&self) -> Result<Vec<(String, Feed)>> {
        if self.cfg.model.is_none() {
            ensure!(self.cfg.inputs.is_empty(), "`inputs` describes a model of your own: set `model` too (without `model`, the ranker trains its own)");
            return Ok(vec![
                (mlp::USER_VECTOR.into(), Feed::UserVector(self.user_vector().into())),
                (mlp::ITEM_VECTOR.into(), Feed::ItemVector(self.item_vector().into())),
                (mlp::USER_INDEX.into(), Feed::UserIndex),
                (mlp::ITEM_INDEX.into(), Feed::ItemIndex),
            ]);
        }
        let trained_only: Vec<&str> = [("train", self.cfg.train.is_some()), ("user_vector", self.cfg.user_vector.is_some()), ("item_vector", self.cfg.item_vector.is_some())]
            .iter()
            .filter(|(_, set)| *set)
            .map(|(k, _)| *k)
            .collect();
        ensure!(trained_only.is_empty(), "`{}` configures the model the ranker trains, but `model` brings your own: remove one (your model's features go in `inputs`)", trained_only.join("`, `"));
        ensure!(!self.cfg.inputs.is_empty(), "`model` needs `inputs`: what feeds each of its inputs (`user_vector:<name>`, `item_vector:<name>`, `user_index`, `item_index`)");
        self.cfg.inputs.iter().map(|(k, v)| Ok((k.clone(), Feed::parse(k, v)?))).collect()
    }

    /// Every vector table the feeds read, from the run's knowledge.
    fn tables(feeds: &[(String, Feed)], view: &TrainView<'_>, inputs: &FitInputs<'_>) -> Result<BTreeMap<String, Table>> {
        let mut tables = BTreeMap::new();
        for (_, feed) in feeds {
            match feed {
                Feed::UserVector(name) => {
                    let t = table("user", name, view.n_users(), inputs.knowledge.iter().map(|k| (k.user, k.vectors.as_slice())))?;
                    tables.insert(format!("user:{name}"), t);
                }
                Feed::ItemVector(name) => {
                    let t = table("item", name, view.n_items(), inputs.item_knowledge.iter().map(|k| (k.item, k.vectors.as_slice())))?;
                    tables.insert(format!("item:{name}"), t);
                }
                _ => {}
            }
        }
        Ok(tables)
    }

    /// The input specs the feeds imply, for the load-time check.
    fn specs(feeds: &[(String, Feed)], tables: &BTreeMap<String, Table>) -> Vec<TensorSpec> {
        feeds
            .iter()
            .map(|(name, feed)| {
                let (ty, shape) = match feed {
                    Feed::UserVector(v) => (TensorElementType::Float32, vec![-1, tables[&format!("user:{v}")].dim as i64]),
                    Feed::ItemVector(v) => (TensorElementType::Float32, vec![-1, tables[&format!("item:{v}")].dim as i64]),
                    Feed::UserIndex | Feed::ItemIndex => (TensorElementType::Int64, vec![-1]),
                };
                TensorSpec { name: name.clone(), ty, shape }
            })
            .collect()
    }

    fn load_model(&self, bytes: Vec<u8>, path: &Path, feeds: Vec<(String, Feed)>, output: String, tables: BTreeMap<String, Table>, export_check: Option<ExportCheck>) -> Result<Loaded> {
        let specs = Self::specs(&feeds, &tables);
        // [batch] or [batch, 1]: checked after the first run; here only the name and type.
        let pool = SessionPool::from_bytes(&bytes, path, &specs, &[], &self.session_options())?;
        pool.with(|s| {
            let o = s.outputs().iter().find(|o| o.name() == output);
            let Some(o) = o else {
                bail!("{}: the model has no output `{output}` (its outputs: {})", path.display(), s.outputs().iter().map(|o| o.name().to_string()).collect::<Vec<_>>().join(", "))
            };
            ensure!(o.dtype().tensor_type() == Some(TensorElementType::Float32), "{}: output `{output}` is {:?}, not f32 scores", path.display(), o.dtype());
            let rank = o.dtype().tensor_shape().map(|s| s.len()).unwrap_or(0);
            let last = o.dtype().tensor_shape().and_then(|s| s.last().copied());
            ensure!(rank == 1 || (rank == 2 && last == Some(1)), "{}: output `{output}` must be [batch] or [batch, 1], got {:?}", path.display(), o.dtype());
            Ok(())
        })?;
        Ok(Loaded { pool, bytes, feeds, output, tables, export_check, check_data: None })
    }

    /// Trains the feature MLP, exports it, and checks the export.
    fn train(&self, view: &TrainView<'_>, inputs: &FitInputs<'_>, feeds: Vec<(String, Feed)>, tables: BTreeMap<String, Table>) -> Result<Loaded> {
        let cfg = &self.cfg.train.clone().unwrap_or_default();
        let (ut, it) = (&tables[&format!("user:{}", self.user_vector())], &tables[&format!("item:{}", self.item_vector())]);
        let features = Features { user: ut.rows.clone(), item: it.rows.clone(), user_dim: ut.dim, item_dim: it.dim };
        let mut rng = SeededRng::new(self.cfg.seed.unwrap_or_else(|| self.host.seed()));
        let model = FeatureMlp::new(view.n_users(), view.n_items(), ut.dim, it.dim, cfg, &mut rng)?;
        let mut opt = model.optimizer(cfg)?;
        let mut positives = Vec::with_capacity(view.events.len());
        let mut seen: Vec<Vec<u32>> = vec![Vec::new(); view.n_users()];
        for u in 0..view.n_users() as u32 {
            for e in view.history(u) {
                positives.push((u, e.item));
                seen[u as usize].push(e.item);
            }
            seen[u as usize].sort_unstable();
        }
        ensure!(!positives.is_empty(), "no train events to learn from");
        let is_seen = |u: u32, i: u32| seen[u as usize].binary_search(&i).is_ok();
        // Pairs the export is checked on: seeded, fixed before training.
        let check: Vec<(u32, u32)> = (0..CHECK_PAIRS).map(|_| (rng.below(view.n_users()) as u32, rng.below(view.n_items()) as u32)).collect();
        let (check_users, check_items): (Vec<u32>, Vec<u32>) = check.iter().copied().unzip();
        let validation = recfuse_sdk::metrics::Validation {
            users: &inputs.validation.users[..inputs.validation.users.len().min(VALIDATION_USERS)],
            items: &inputs.validation.items[..inputs.validation.items.len().min(VALIDATION_USERS)],
        };
        let all_items: Vec<u32> = (0..view.n_items() as u32).collect();
        let metadata = |epoch: usize| vec![("recfuse.model", "feature-mlp".to_string()), ("recfuse.epoch", epoch.to_string())];
        // The best epoch's export and training-side check scores.
        let mut best: Option<(f64, Vec<u8>, Vec<f32>)> = None;
        let bar = self.host.progress("ort: training the feature MLP (epochs)", cfg.epochs as u64);
        for epoch in 1..=cfg.epochs {
            self.host.check_cancelled()?;
            let loss = model.train_epoch(&mut opt, &features, &positives, &is_seen, cfg, &mut rng)?;
            let ndcg = if validation.is_empty() {
                epoch as f64 // no validation: the last epoch
            } else {
                validation
                    .evaluate(view, 10, 16, |users, out| {
                        let (u, i): (Vec<u32>, Vec<u32>) = users.iter().flat_map(|&u| all_items.iter().map(move |&i| (u, i))).unzip();
                        out.copy_from_slice(&model.score_pairs(&features, &u, &i)?);
                        Ok(())
                    })?
                    .ndcg
            };
            self.host.info(format!("ort feature MLP epoch {epoch}/{}: BPR loss {loss:.4}, validation NDCG@10 {ndcg:.4}", cfg.epochs));
            if best.as_ref().is_none_or(|(b, _, _)| ndcg > *b) {
                best = Some((ndcg, model.to_onnx(&metadata(epoch))?, model.score_pairs(&features, &check_users, &check_items)?));
            }
            bar.inc(1);
        }
        let (_, bytes, expected) = best.context("no epoch trained (train.epochs = 0)")?;
        let path = PathBuf::from("feature-mlp.onnx");
        let mut loaded = self.load_model(bytes, &path, feeds, self.cfg.output.clone(), tables, None)?;
        let got = Self::score_pairs(&loaded, &check_users, &check_items, self.cfg.batch_pairs)?;
        let max_abs_diff = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        ensure!(
            max_abs_diff <= EXPORT_TOLERANCE,
            "the exported ONNX model disagrees with the trained one: max |difference| {max_abs_diff:e} over {CHECK_PAIRS} pairs (tolerance {EXPORT_TOLERANCE:e})"
        );
        self.host.info(format!("ort: exported model matches training (max |difference| {max_abs_diff:e} over {CHECK_PAIRS} pairs)"));
        loaded.export_check = Some(ExportCheck { pairs: CHECK_PAIRS, max_abs_diff });
        loaded.check_data = Some(CheckData { users: check_users, items: check_items, expected });
        Ok(loaded)
    }

    /// Scores of (user, item) pairs through ONNX Runtime, `batch` pairs per call, the calls
    /// spread over the session pool.
    fn score_pairs(m: &Loaded, users: &[u32], items: &[u32], batch: usize) -> Result<Vec<f32>> {
        if users.len() <= batch {
            // One call: on this thread (a served request is one call).
            return Self::run(m, users, items);
        }
        let chunks: Vec<(usize, usize)> = (0..users.len()).step_by(batch.max(1)).map(|a| (a, (a + batch).min(users.len()))).collect();
        Ok(m.pool.parallel(chunks.len(), |c| Self::run(m, &users[chunks[c].0..chunks[c].1], &items[chunks[c].0..chunks[c].1]))?.concat())
    }

    /// One ONNX Runtime call.
    fn run(m: &Loaded, users: &[u32], items: &[u32]) -> Result<Vec<f32>> {
        let n = users.len();
        let mut values: Vec<(String, DynValue)> = Vec::with_capacity(m.feeds.len());
        for (name, feed) in &m.feeds {
            let value: DynValue = match feed {
                Feed::UserVector(v) | Feed::ItemVector(v) => {
                    let (t, idx) = match feed {
                        Feed::UserVector(_) => (&m.tables[&format!("user:{v}")], users),
                        _ => (&m.tables[&format!("item:{v}")], items),
                    };
                    let mut rows = Vec::with_capacity(n * t.dim);
                    for &i in idx {
                        rows.extend_from_slice(&t.rows[i as usize * t.dim..(i as usize + 1) * t.dim]);
                    }
                    Tensor::from_array(([n, t.dim], rows))?.into_dyn()
                }
                Feed::UserIndex => Tensor::from_array(([n], users.iter().map(|&u| u as i64).collect::<Vec<i64>>()))?.into_dyn(),
                Feed::ItemIndex => Tensor::from_array(([n], items.iter().map(|&i| i as i64).collect::<Vec<i64>>()))?.into_dyn(),
            };
            values.push((name.clone(), value));
        }
        m.pool.with(|s| {
            let outputs = s.run(values)?;
            let (shape, scores) = outputs[m.output.as_str()].try_extract_tensor::<f32>()?;
            ensure!(scores.len() == n, "{}: output `{}` has shape {shape:?} for {n} pairs", m.pool.model.display(), m.output);
            Ok(scores.to_vec())
        })
    }
}

/// Writes the check pairs' model inputs (named as the model's inputs) and `expected` scores.
fn write_check(m: &Loaded, c: &CheckData, path: &Path) -> Result<()> {
    use safetensors::{tensor::TensorView, Dtype};
    let n = c.users.len();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, feed) in &m.feeds {
        let (dtype, shape, bytes): (Dtype, Vec<usize>, Vec<u8>) = match feed {
            Feed::UserVector(v) | Feed::ItemVector(v) => {
                let (t, idx) = match feed {
                    Feed::UserVector(_) => (&m.tables[&format!("user:{v}")], &c.users),
                    _ => (&m.tables[&format!("item:{v}")], &c.items),
                };
                let bytes = idx.iter().flat_map(|&i| t.rows[i as usize * t.dim..(i as usize + 1) * t.dim].iter().flat_map(|x| x.to_le_bytes())).collect();
                (Dtype::F32, vec![n, t.dim], bytes)
            }
            Feed::UserIndex => (Dtype::I64, vec![n], c.users.iter().flat_map(|&u| (u as i64).to_le_bytes()).collect()),
            Feed::ItemIndex => (Dtype::I64, vec![n], c.items.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect()),
        };
        tensors.push((name.clone(), dtype, shape, bytes));
    }
    tensors.push(("expected".into(), Dtype::F32, vec![n], c.expected.iter().flat_map(|x| x.to_le_bytes()).collect()));
    let views = tensors.iter().map(|(name, dtype, shape, bytes)| Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?))).collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    std::fs::write(path, safetensors::serialize(views, None)?).with_context(|| format!("writing {}", path.display()))
}

impl Ranker for OrtRanker {
    type Config = Config;
    const DESCRIPTION: &'static str = "ONNX Runtime (CPU, CUDA by config): a feature MLP trained in candle and exported to ONNX, or a model of your own";

    fn new(cfg: Config, host: Host) -> Result<Self> {
        ensure!(cfg.sessions >= 1, "`sessions` must be at least 1");
        ensure!(cfg.batch_pairs >= 1, "`batch_pairs` must be at least 1");
        let r = Self { cfg, host, loaded: None };
        r.feeds()?;
        // Load the runtime now, so a missing library fails the config check, not the fit.
        crate::runtime::environment(r.cfg.runtime_library.as_deref())?;
        if let Some(p) = &r.cfg.model {
            ensure!(p.is_file(), "`model`: {} not found", p.display());
        }
        Ok(r)
    }

    fn fit(&mut self, view: &TrainView<'_>, inputs: &FitInputs<'_>) -> Result<()> {
        let feeds = self.feeds()?;
        let tables = Self::tables(&feeds, view, inputs)?;
        self.loaded = Some(match &self.cfg.model {
            Some(path) => {
                let bytes = std::fs::read(path).with_context(|| format!("reading the ONNX model {}", path.display()))?;
                self.load_model(bytes, path, feeds, self.cfg.output.clone(), tables, None)?
            }
            None => self.train(view, inputs, feeds, tables)?,
        });
        Ok(())
    }

    fn score(&self, batch: &ScoreBatch<'_>, out: &mut [f32]) -> Result<()> {
        let m = self.loaded.as_ref().context("ort scored before fit")?;
        let n = batch.per_user();
        let mut users = Vec::with_capacity(batch.out_len());
        let mut items = Vec::with_capacity(batch.out_len());
        for (row, &u) in batch.users.iter().enumerate() {
            users.extend(std::iter::repeat_n(u, n));
            items.extend_from_slice(batch.candidates(row));
        }
        out.copy_from_slice(&Self::score_pairs(m, &users, &items, self.cfg.batch_pairs)?);
        Ok(())
    }

    fn save(&self, dir: &Path) -> Result<bool> {
        let m = self.loaded.as_ref().context("ort saved before fit")?;
        std::fs::write(dir.join("model.onnx"), &m.bytes).with_context(|| format!("writing {}", dir.join("model.onnx").display()))?;
        let saved = Saved { feeds: m.feeds.clone(), output: m.output.clone(), export_check: m.export_check };
        std::fs::write(dir.join("ort-ranker.json"), serde_json::to_vec_pretty(&saved)?)?;
        if let Some(c) = &m.check_data {
            write_check(m, c, &dir.join("export_check.safetensors"))?;
        }
        Ok(true)
    }

    fn load(&mut self, view: &TrainView<'_>, inputs: &FitInputs<'_>, dir: &Path) -> Result<bool> {
        let (model, meta) = (dir.join("model.onnx"), dir.join("ort-ranker.json"));
        if !model.is_file() || !meta.is_file() {
            return Ok(false);
        }
        let saved: Saved = serde_json::from_slice(&std::fs::read(&meta)?).with_context(|| format!("reading {}", meta.display()))?;
        let tables = Self::tables(&saved.feeds, view, inputs)?;
        let bytes = std::fs::read(&model).with_context(|| format!("reading {}", model.display()))?;
        self.loaded = Some(self.load_model(bytes, &model, saved.feeds, saved.output, tables, saved.export_check)?);
        Ok(true)
    }

    fn seconds_per_candidate(&self) -> f64 {
        // A small MLP per pair: about a microsecond on one core.
        1e-6
    }
}
