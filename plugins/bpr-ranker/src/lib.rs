//! `kind = "bpr"`: BPR-MF (Rendle et al. 2009), the classic implicit-feedback baseline.
//! Each train interaction (user, item) is a positive, paired with a sampled item the user never
//! interacted with; the loss pushes the positive's score above the negative's. Trained with
//! Adam on mini-batches (the default, as RecBole does) or with the original per-pair SGD.
//! Deterministic for a given seed (the host's per-component seed unless `seed` is set).
//!
//! Model selection (SDK 1.1): after every epoch the factors are scored on the validation targets
//! with the host's metric code (full ranking, NDCG@`select_k`); the best epoch is kept and
//! training stops after `patience` epochs without improvement.
//!
//! Scoring multiplies the batch's user factors by the item factors with a GEMM (the `gemm`
//! crate, on every core) when all users share the candidates (full ranking).
//!
//! Persistence (SDK 1.1): the fitted factors are saved as `model.safetensors`; during a fit,
//! each epoch leaves `checkpoint.safetensors` (current and best factors, RNG state, shuffle
//! order, early-stopping state) in the host's model directory, and a fit interrupted mid-way
//! resumes from the last finished epoch with the same result as an uninterrupted one.

use recfuse_sdk::metrics::Verdict;
use recfuse_sdk::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::{HashMap, HashSet};
use std::path::Path;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct BprConfig {
    #[serde(default = "d_dim")]
    pub dim: usize,
    /// Maximum epochs (training stops earlier when validation stops improving).
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Early stopping: epochs without a better validation NDCG@`select_k` before stopping; the
    /// best epoch's factors are kept. 0 = train all `epochs` and keep the last, no validation.
    #[serde(default = "d_patience")]
    pub patience: usize,
    /// Cut-off of the validation NDCG that selects the epoch.
    #[serde(default = "d_select_k")]
    pub select_k: usize,
    /// `adam` (mini-batches of `batch_size`, as RecBole trains BPR) or `sgd` (one positive at a
    /// time, Rendle et al.'s original).
    #[serde(default)]
    pub optimizer: Optimizer,
    /// Positives per Adam step.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_lr")]
    pub learning_rate: f32,
    /// L2 regularisation of the factors touched by a step.
    #[serde(default = "d_reg")]
    pub reg: f32,
    /// Behaviour kinds counted as positives (all item events when empty).
    #[serde(default)]
    pub kinds: Vec<String>,
    #[serde(default)]
    pub seed: Option<u64>,
}
fn d_dim() -> usize {
    64
}
fn d_epochs() -> usize {
    300
}
fn d_patience() -> usize {
    10
}
fn d_select_k() -> usize {
    10
}
fn d_lr() -> f32 {
    1e-3
}
fn d_reg() -> f32 {
    0.0
}
fn d_batch() -> usize {
    2048
}

#[derive(Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    #[default]
    Adam,
    Sgd,
}

/// Adam's moments for both factor matrices (dense, as PyTorch's Adam on embedding tables).
struct Adam {
    m: [Vec<f32>; 2],
    v: [Vec<f32>; 2],
    step: u64,
}

impl Adam {
    const B1: f32 = 0.9;
    const B2: f32 = 0.999;
    const EPS: f32 = 1e-8;
    fn new(users: usize, items: usize) -> Self {
        Self { m: [vec![0.0; users], vec![0.0; items]], v: [vec![0.0; users], vec![0.0; items]], step: 0 }
    }
    /// One step over both matrices with gradients `grads` (which it leaves zeroed).
    fn update(&mut self, params: [&mut Vec<f32>; 2], grads: [&mut Vec<f32>; 2], lr: f32) {
        self.step += 1;
        let (c1, c2) = (1.0 - Self::B1.powi(self.step as i32), 1.0 - Self::B2.powi(self.step as i32));
        for (k, (p, g)) in params.into_iter().zip(grads).enumerate() {
            for ((x, g), (m, v)) in p.iter_mut().zip(g.iter_mut()).zip(self.m[k].iter_mut().zip(self.v[k].iter_mut())) {
                *m = Self::B1 * *m + (1.0 - Self::B1) * *g;
                *v = Self::B2 * *v + (1.0 - Self::B2) * *g * *g;
                *x -= lr * (*m / c1) / ((*v / c2).sqrt() + Self::EPS);
                *g = 0.0;
            }
        }
    }
}

pub struct Bpr {
    cfg: BprConfig,
    host: Host,
    users: Vec<f32>,
    items: Vec<f32>,
}

impl Bpr {
    fn dot(&self, u: u32, i: u32) -> f32 {
        let d = self.cfg.dim;
        let (a, b) = (&self.users[u as usize * d..][..d], &self.items[i as usize * d..][..d]);
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
}

/// Writes named f32 matrices `[rows, dim]` (and string metadata) as safetensors, atomically.
fn write_tensors(path: &Path, tensors: &[(&str, &[f32])], dim: usize, meta: HashMap<String, String>) -> Result<()> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, v), b)| Ok((*name, TensorView::new(Dtype::F32, vec![v.len() / dim, dim], b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let data = safetensors::serialize(views, Some(meta))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// A safetensors file of f32 matrices, read whole.
struct Tensors {
    path: std::path::PathBuf,
    bytes: Vec<u8>,
    meta: HashMap<String, String>,
}

impl Tensors {
    fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).with_context(|| format!("{} is not safetensors", path.display()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        Ok(Self { path: path.to_path_buf(), bytes, meta })
    }
    /// Matrix `name`, which must be F32 `[rows, dim]`.
    fn matrix(&self, name: &str, rows: usize, dim: usize) -> Result<Vec<f32>> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes)?;
        let t = st.tensor(name).with_context(|| format!("{}: no tensor `{name}`", self.path.display()))?;
        ensure!(
            t.dtype() == Dtype::F32 && t.shape() == [rows, dim],
            "{}: `{name}` is {:?} {:?}, expected F32 [{rows}, {dim}] (another dataset or dim?)",
            self.path.display(),
            t.dtype(),
            t.shape()
        );
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    fn field<T: std::str::FromStr>(&self, key: &str) -> Result<T> {
        self.meta.get(key).and_then(|v| v.parse().ok()).with_context(|| format!("{}: metadata `{key}` missing", self.path.display()))
    }
}

/// `out[r, j] = users[r] · items[j]` for every user of `rows` and every item: one GEMM.
fn score_all(users: &[f32], items: &[f32], dim: usize, rows: &[u32], out: &mut [f32]) {
    let n = items.len() / dim;
    let lhs: Vec<f32> = rows.iter().flat_map(|&u| users[u as usize * dim..][..dim].iter().copied()).collect();
    debug_assert_eq!(out.len(), rows.len() * n);
    // SAFETY: lhs is rows × dim row-major, items is n × dim row-major (read as its transpose,
    // dim × n, through the strides), out is rows × n row-major; all in bounds.
    unsafe {
        gemm::gemm(
            rows.len(),
            n,
            dim,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            dim as isize,
            items.as_ptr(),
            dim as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl Ranker for Bpr {
    type Config = BprConfig;
    const DESCRIPTION: &'static str = "BPR-MF: matrix factorisation with Bayesian personalised ranking";

    fn new(cfg: BprConfig, host: Host) -> Result<Self> {
        ensure!(cfg.dim > 0 && cfg.epochs > 0, "dim and epochs must be positive");
        ensure!(cfg.learning_rate > 0.0, "learning_rate must be positive");
        Ok(Self { cfg, host, users: vec![], items: vec![] })
    }

    fn fit(&mut self, view: &TrainView, inputs: &FitInputs) -> Result<()> {
        let (n_users, n_items, d) = (view.n_users(), view.n_items(), self.cfg.dim);
        let kinds: Vec<u32> = self.cfg.kinds.iter().filter_map(|k| view.catalog.kind(k)).collect();
        let mut seen: Vec<HashSet<u32>> = vec![HashSet::new(); n_users];
        let mut positives: Vec<(u32, u32)> = Vec::new();
        for e in view.events {
            if e.item != NONE && (self.cfg.kinds.is_empty() || kinds.contains(&e.kind)) && seen[e.user as usize].insert(e.item) {
                positives.push((e.user, e.item));
            }
        }
        ensure!(!positives.is_empty(), "no train interactions to learn from");
        let mut rng = SeededRng::new(self.cfg.seed.unwrap_or_else(|| self.host.seed()));
        // Adam: Xavier-normal embeddings (as RecBole); SGD: N(0, 0.1²).
        let std = |rows: usize| match self.cfg.optimizer {
            Optimizer::Adam => (2.0 / (rows + d) as f64).sqrt(),
            Optimizer::Sgd => 0.1,
        };
        let (su, si) = (std(n_users), std(n_items));
        self.users = (0..n_users * d).map(|_| (rng.normal() * su) as f32).collect();
        self.items = (0..n_items * d).map(|_| (rng.normal() * si) as f32).collect();
        let mut adam = Adam::new(n_users * d, n_items * d);
        let mut grads = [vec![0f32; n_users * d], vec![0f32; n_items * d]];
        let checkpoint = inputs.model_dir.map(|dir| dir.join("checkpoint.safetensors"));
        let select = self.cfg.patience > 0 && !inputs.validation.is_empty();
        let mut stopping = EarlyStopping::new(self.cfg.patience);
        let (mut best_users, mut best_items) = (self.users.clone(), self.items.clone());
        let mut first_epoch = 0;
        if let Some(path) = checkpoint.as_deref().filter(|p| p.exists()) {
            let t = Tensors::read(path)?;
            self.users = t.matrix("users", n_users, d)?;
            self.items = t.matrix("items", n_items, d)?;
            best_users = t.matrix("best_users", n_users, d)?;
            best_items = t.matrix("best_items", n_items, d)?;
            if self.cfg.optimizer == Optimizer::Adam {
                adam.m = [t.matrix("adam_m_users", n_users, d)?, t.matrix("adam_m_items", n_items, d)?];
                adam.v = [t.matrix("adam_v_users", n_users, d)?, t.matrix("adam_v_items", n_items, d)?];
                adam.step = t.field("adam_step")?;
            }
            first_epoch = t.field("epochs_done")?;
            rng = SeededRng::new(t.field("rng_state")?);
            stopping = serde_json::from_str(t.meta.get("stopping").map(String::as_str).unwrap_or("null"))
                .with_context(|| format!("{}: metadata `stopping` missing", path.display()))?;
            // The positives' order is shuffle state too: each epoch shuffles the previous order.
            positives = serde_json::from_str(t.meta.get("order").map(String::as_str).unwrap_or("null"))
                .with_context(|| format!("{}: metadata `order` missing", path.display()))?;
            self.host.info(format!("bpr resumes after epoch {first_epoch} from {}", path.display()));
        }
        let (lr, reg) = (self.cfg.learning_rate, self.cfg.reg);
        let progress = self.host.progress("bpr epochs", self.cfg.epochs as u64);
        progress.inc(first_epoch as u64);
        let mut grad_u = vec![0f32; d];
        let mut stopped = false;
        for epoch in first_epoch..self.cfg.epochs {
            if stopped {
                break;
            }
            self.host.check_cancelled()?;
            rng.shuffle(&mut positives);
            let mut loss = 0f64;
            let batch = match self.cfg.optimizer {
                Optimizer::Adam => self.cfg.batch_size,
                Optimizer::Sgd => 1,
            };
            for chunk in positives.chunks(batch) {
                let scale = 1.0 / chunk.len() as f32; // the loss is the batch mean
                for &(u, i) in chunk {
                    let j = loop {
                        let j = rng.below(n_items) as u32;
                        if !seen[u as usize].contains(&j) {
                            break j;
                        }
                    };
                    let x = self.dot(u, i) - self.dot(u, j);
                    let g = sigmoid(-x); // d(-ln σ(x))/dx = -σ(-x)
                    loss += -(sigmoid(x).max(1e-12) as f64).ln();
                    let (ub, ib, jb) = (u as usize * d, i as usize * d, j as usize * d);
                    match self.cfg.optimizer {
                        Optimizer::Sgd => {
                            for k in 0..d {
                                let (pu, qi, qj) = (self.users[ub + k], self.items[ib + k], self.items[jb + k]);
                                grad_u[k] = g * (qi - qj) - reg * pu;
                                self.items[ib + k] += lr * (g * pu - reg * qi);
                                self.items[jb + k] += lr * (-g * pu - reg * qj);
                            }
                            for k in 0..d {
                                self.users[ub + k] += lr * grad_u[k];
                            }
                        }
                        Optimizer::Adam => {
                            // Gradients of the mean loss (descent direction is their negative).
                            let [gu, gi] = &mut grads;
                            for k in 0..d {
                                let (pu, qi, qj) = (self.users[ub + k], self.items[ib + k], self.items[jb + k]);
                                gu[ub + k] += scale * (-g * (qi - qj) + reg * pu);
                                gi[ib + k] += scale * (-g * pu + reg * qi);
                                gi[jb + k] += scale * (g * pu + reg * qj);
                            }
                        }
                    }
                }
                if self.cfg.optimizer == Optimizer::Adam {
                    let [gu, gi] = &mut grads;
                    adam.update([&mut self.users, &mut self.items], [gu, gi], lr);
                }
            }
            let mut line = format!("bpr epoch {}: mean loss {:.4}", epoch + 1, loss / positives.len() as f64);
            if select {
                let (users, items) = (&self.users, &self.items);
                let v = inputs.validation.evaluate(view, self.cfg.select_k, 256, |rows, out| {
                    score_all(users, items, d, rows, out);
                    Ok(())
                })?;
                line.push_str(&format!(", validation NDCG@{} {:.4}", self.cfg.select_k, v.ndcg));
                match stopping.observe(epoch + 1, v.ndcg) {
                    Verdict::Improved => (best_users, best_items) = (self.users.clone(), self.items.clone()),
                    Verdict::Continue => {}
                    Verdict::Stop => stopped = true,
                }
            }
            self.host.debug(line);
            if let Some(path) = &checkpoint {
                let meta = HashMap::from([
                    ("adam_step".to_string(), adam.step.to_string()),
                    ("epochs_done".to_string(), (epoch + 1).to_string()),
                    ("rng_state".to_string(), rng.state().to_string()),
                    ("stopping".to_string(), serde_json::to_string(&stopping)?),
                    ("order".to_string(), serde_json::to_string(&positives)?),
                ]);
                let t = [
                    ("users", &self.users[..]),
                    ("items", &self.items[..]),
                    ("best_users", &best_users[..]),
                    ("best_items", &best_items[..]),
                    ("adam_m_users", &adam.m[0][..]),
                    ("adam_m_items", &adam.m[1][..]),
                    ("adam_v_users", &adam.v[0][..]),
                    ("adam_v_items", &adam.v[1][..]),
                ];
                write_tensors(path, &t, d, meta)?;
            }
            progress.inc(1);
        }
        if select {
            (self.users, self.items) = (best_users, best_items);
            self.host.info(format!(
                "bpr kept epoch {} (validation NDCG@{} {:.4}) on {} positives",
                stopping.best_epoch, self.cfg.select_k, stopping.best, positives.len()
            ));
        } else {
            self.host.info(format!("bpr trained {} epochs on {} positives", self.cfg.epochs, positives.len()));
        }
        Ok(())
    }

    fn save(&self, dir: &Path) -> Result<bool> {
        ensure!(!self.users.is_empty(), "bpr saved before fit");
        let meta = HashMap::from([("dim".to_string(), self.cfg.dim.to_string())]);
        write_tensors(&dir.join("model.safetensors"), &[("users", &self.users), ("items", &self.items)], self.cfg.dim, meta)?;
        Ok(true)
    }

    fn load(&mut self, view: &TrainView, _inputs: &FitInputs, dir: &Path) -> Result<bool> {
        let path = dir.join("model.safetensors");
        if !path.exists() {
            return Ok(false);
        }
        let t = Tensors::read(&path)?;
        self.users = t.matrix("users", view.n_users(), self.cfg.dim)?;
        self.items = t.matrix("items", view.n_items(), self.cfg.dim)?;
        Ok(true)
    }

    fn score(&self, batch: &ScoreBatch, out: &mut [f32]) -> Result<()> {
        ensure!(!self.users.is_empty(), "bpr scored before fit");
        if batch.shared && batch.items.len() == self.items.len() / self.cfg.dim && batch.items.iter().enumerate().all(|(j, &i)| i as usize == j) {
            // Full ranking: every item, in catalog order.
            score_all(&self.users, &self.items, self.cfg.dim, batch.users, out);
            return Ok(());
        }
        let n = batch.per_user();
        for (row, &u) in batch.users.iter().enumerate() {
            for (slot, &item) in out[row * n..(row + 1) * n].iter_mut().zip(batch.candidates(row)) {
                *slot = self.dot(u, item);
            }
        }
        Ok(())
    }
}

export_plugin! {
    name: "bpr-ranker",
    rankers: { "bpr" => Bpr },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `items` items and `users` users with ids "0", "1", ...; one behaviour kind.
    fn catalog(items: u32, users: u32) -> Catalog {
        Catalog {
            items: (0..items).map(|i| Item { id: i.to_string(), ..Default::default() }).collect(),
            users: (0..users).map(|i| User { id: i.to_string(), ..Default::default() }).collect(),
            kinds: vec!["click".into()],
            ..Default::default()
        }
    }

    /// Two user groups with disjoint tastes: BPR must rank each group's items first.
    #[test]
    fn learns_disjoint_tastes() {
        let catalog = catalog(20, 20);
        let mut events = Vec::new();
        let mut offsets = vec![0u32];
        for u in 0..20u32 {
            let base = if u < 10 { 0 } else { 10 };
            for k in 0..6u32 {
                let item = base + (u + k) % 10;
                events.push(Event { user: u, item, kind: 0, scenario: 0, subject: NONE, value: 1.0, timestamp: k as i64 });
            }
            offsets.push(events.len() as u32);
        }
        let view = TrainView { catalog: &catalog, events: &events, offsets: &offsets };
        for opt in [
            serde_json::json!({"dim": 8, "epochs": 200, "seed": 3, "optimizer": "sgd", "learning_rate": 0.05}),
            serde_json::json!({"dim": 8, "epochs": 200, "seed": 3, "optimizer": "adam", "learning_rate": 0.05, "batch_size": 16}),
        ] {
            let cfg: BprConfig = serde_json::from_value(opt.clone()).unwrap();
            let mut bpr = Bpr::new(cfg, Host::standalone(std::env::temp_dir(), 0)).unwrap();
            bpr.fit(&view, &FitInputs::default()).unwrap();
            let items: Vec<u32> = (0..20).collect();
            let mut out = vec![0.0; 40];
            bpr.score(&ScoreBatch { users: &[0, 15], items: &items, shared: true }, &mut out).unwrap();
            let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
            assert!(mean(&out[0..10]) > mean(&out[10..20]) + 0.5, "{opt}: user 0: {:?}", &out[..20]);
            assert!(mean(&out[30..40]) > mean(&out[20..30]) + 0.5, "{opt}: user 15: {:?}", &out[20..]);
        }
    }

    /// A fit stopped after some epochs and resumed from its checkpoint ends exactly where an
    /// uninterrupted fit ends; save + load restores the same scores.
    #[test]
    fn resumes_from_epoch_checkpoint_and_round_trips() {
        let catalog = catalog(12, 6);
        let mut events = Vec::new();
        let mut offsets = vec![0u32];
        for u in 0..6u32 {
            for k in 0..4u32 {
                events.push(Event { user: u, item: (u * 2 + k) % 12, kind: 0, scenario: 0, subject: NONE, value: 1.0, timestamp: k as i64 });
            }
            offsets.push(events.len() as u32);
        }
        let view = TrainView { catalog: &catalog, events: &events, offsets: &offsets };
        let make = |epochs: usize, dir: &Path| {
            let cfg: BprConfig = serde_json::from_value(serde_json::json!({"dim": 4, "epochs": epochs, "seed": 5})).unwrap();
            Bpr::new(cfg, Host::standalone(dir, 0)).unwrap()
        };
        let scores = |b: &Bpr| {
            let items: Vec<u32> = (0..12).collect();
            let mut out = vec![0.0; 12 * 6];
            b.score(&ScoreBatch { users: &[0, 1, 2, 3, 4, 5], items: &items, shared: true }, &mut out).unwrap();
            out
        };
        let straight = tempfile::tempdir().unwrap();
        let mut full = make(8, straight.path());
        full.fit(&view, &FitInputs { model_dir: Some(straight.path()), ..Default::default() }).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let mut first = make(3, dir.path()); // "killed" after 3 epochs: its checkpoint stays
        first.fit(&view, &FitInputs { model_dir: Some(dir.path()), ..Default::default() }).unwrap();
        let mut resumed = make(8, dir.path());
        resumed.fit(&view, &FitInputs { model_dir: Some(dir.path()), ..Default::default() }).unwrap();
        assert_eq!(scores(&full), scores(&resumed));
        assert_ne!(scores(&first), scores(&resumed), "the resumed fit did train further");

        assert!(resumed.save(dir.path()).unwrap());
        let mut loaded = make(8, dir.path());
        assert!(loaded.load(&view, &FitInputs::default(), dir.path()).unwrap());
        assert_eq!(scores(&loaded), scores(&resumed));
        // A model of another shape is refused, naming the file.
        let cfg: BprConfig = serde_json::from_value(serde_json::json!({"dim": 5, "epochs": 1})).unwrap();
        let mut other = Bpr::new(cfg, Host::standalone(dir.path(), 0)).unwrap();
        let e = other.load(&view, &FitInputs::default(), dir.path()).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("[6, 5]"), "{e}");
    }

    /// With validation targets, training stops after `patience` epochs without improvement and
    /// keeps the best epoch: the kept factors score exactly the best recorded validation NDCG.
    #[test]
    fn selects_the_best_epoch_on_validation_and_stops_early() {
        let catalog = catalog(30, 12);
        let (mut events, mut offsets) = (Vec::new(), vec![0u32]);
        for u in 0..12u32 {
            for k in 0..5u32 {
                events.push(Event { user: u, item: (u * 3 + k) % 30, kind: 0, scenario: 0, subject: NONE, value: 1.0, timestamp: k as i64 });
            }
            offsets.push(events.len() as u32);
        }
        let view = TrainView { catalog: &catalog, events: &events, offsets: &offsets };
        let (vu, vi): (Vec<u32>, Vec<u32>) = (0..12u32).map(|u| (u, (u * 3 + 5) % 30)).unzip();
        let validation = Validation { users: &vu, items: &vi };
        let dir = tempfile::tempdir().unwrap();
        let cfg: BprConfig = serde_json::from_value(serde_json::json!({"dim": 4, "epochs": 400, "patience": 3, "seed": 9})).unwrap();
        let mut bpr = Bpr::new(cfg, Host::standalone(dir.path(), 0)).unwrap();
        bpr.fit(&view, &FitInputs { model_dir: Some(dir.path()), validation, ..Default::default() }).unwrap();
        let t = Tensors::read(&dir.path().join("checkpoint.safetensors")).unwrap();
        let done: usize = t.field("epochs_done").unwrap();
        let stopping: EarlyStopping = serde_json::from_str(&t.meta["stopping"]).unwrap();
        assert!(done < 400 && done == stopping.best_epoch + 3, "stopped after {done}, best {}", stopping.best_epoch);
        let kept = validation
            .evaluate(&view, 10, 5, |rows, out| bpr.score(&ScoreBatch { users: rows, items: &(0..30).collect::<Vec<_>>(), shared: true }, out))
            .unwrap();
        assert_eq!(kept.ndcg, stopping.best);
    }

    #[test]
    fn gemm_scores_equal_dot_products() {
        let cfg: BprConfig = serde_json::from_value(serde_json::json!({"dim": 3, "epochs": 1})).unwrap();
        let mut bpr = Bpr::new(cfg, Host::standalone(std::env::temp_dir(), 0)).unwrap();
        bpr.users = (0..4 * 3).map(|x| x as f32 * 0.5 - 2.0).collect();
        bpr.items = (0..5 * 3).map(|x| (x as f32).sin()).collect();
        let items: Vec<u32> = (0..5).collect();
        let mut out = vec![0.0; 2 * 5];
        bpr.score(&ScoreBatch { users: &[3, 1], items: &items, shared: true }, &mut out).unwrap();
        for (r, u) in [3u32, 1].into_iter().enumerate() {
            for j in 0..5u32 {
                assert!((out[r * 5 + j as usize] - bpr.dot(u, j)).abs() < 1e-5);
            }
        }
    }
}
