//! The feature model the `ort` ranker trains: an MLP over the user's knowledge embedding, the
//! item's text embedding and the product of collaborative (ID) embeddings, plus an item bias,
//! trained with BPR in candle and exported to ONNX with the same arithmetic.
//!
//! score(u, i) = w2 · relu(W1 · [t_u ; t_i ; e_u ⊙ e_i] + b1) + b2 + bias_i

use crate::export::{Attr, Dim, Elem, Graph};
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use recfuse_sdk::rng::SeededRng;
use serde::{Deserialize, Serialize};

/// The exported model's input and output names.
pub const USER_VECTOR: &str = "user_vector";
pub const ITEM_VECTOR: &str = "item_vector";
pub const USER_INDEX: &str = "user_index";
pub const ITEM_INDEX: &str = "item_index";
pub const SCORE: &str = "score";

/// How the model is shaped and trained (the ranker's `train` table).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Width of the collaborative (ID) embeddings.
    pub id_dim: usize,
    /// Width of the hidden layer.
    pub hidden: usize,
    pub epochs: usize,
    /// (user, positive, negative) triples per optimizer step.
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self { id_dim: 32, hidden: 64, epochs: 8, batch_size: 1024, learning_rate: 2e-3, weight_decay: 1e-4 }
    }
}

/// The frozen features: one row per user and per item (zeros where a vector is missing).
pub struct Features {
    pub user: Vec<f32>,
    pub item: Vec<f32>,
    pub user_dim: usize,
    pub item_dim: usize,
}

impl Features {
    pub fn n_users(&self) -> usize {
        self.user.len() / self.user_dim.max(1)
    }
    pub fn n_items(&self) -> usize {
        self.item.len() / self.item_dim.max(1)
    }
}

/// The model's weights.
pub struct FeatureMlp {
    user_emb: Var,
    item_emb: Var,
    item_bias: Var,
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
    user_dim: usize,
    item_dim: usize,
}

fn normal(rng: &mut SeededRng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

impl FeatureMlp {
    pub fn new(n_users: usize, n_items: usize, user_dim: usize, item_dim: usize, cfg: &TrainConfig, rng: &mut SeededRng) -> Result<Self> {
        let dev = Device::Cpu;
        let (d, h) = (cfg.id_dim, cfg.hidden);
        let f = user_dim + item_dim + d;
        let var = |v: Vec<f32>, shape: &[usize]| -> Result<Var> { Ok(Var::from_tensor(&Tensor::from_vec(v, shape, &dev)?)?) };
        Ok(Self {
            user_emb: var(normal(rng, n_users * d, 0.1), &[n_users, d])?,
            item_emb: var(normal(rng, n_items * d, 0.1), &[n_items, d])?,
            item_bias: var(vec![0.0; n_items], &[n_items])?,
            // He initialisation for the ReLU layer.
            w1: var(normal(rng, h * f, (2.0 / f as f64).sqrt()), &[h, f])?,
            b1: var(vec![0.0; h], &[h])?,
            w2: var(normal(rng, h, (1.0 / h as f64).sqrt()), &[1, h])?,
            b2: var(vec![0.0; 1], &[1])?,
            user_dim,
            item_dim,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.user_emb.clone(), self.item_emb.clone(), self.item_bias.clone(), self.w1.clone(), self.b1.clone(), self.w2.clone(), self.b2.clone()]
    }

    /// Scores of pairs: `user_vec` [N, du], `item_vec` [N, di], indices [N] (u32).
    fn forward(&self, user_vec: &Tensor, item_vec: &Tensor, users: &Tensor, items: &Tensor) -> Result<Tensor> {
        let inter = (self.user_emb.as_tensor().index_select(users, 0)? * self.item_emb.as_tensor().index_select(items, 0)?)?;
        let x = Tensor::cat(&[user_vec, item_vec, &inter], 1)?;
        let h = x.matmul(&self.w1.as_tensor().t()?)?.broadcast_add(self.b1.as_tensor())?.relu()?;
        let s = h.matmul(&self.w2.as_tensor().t()?)?.broadcast_add(self.b2.as_tensor())?.squeeze(1)?;
        Ok((s + self.item_bias.as_tensor().index_select(items, 0)?)?)
    }

    /// The pairs' feature rows gathered from the tables, as tensors.
    fn gather(&self, features: &Features, users: &[u32], items: &[u32]) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let dev = Device::Cpu;
        let (du, di) = (self.user_dim, self.item_dim);
        let mut uv = Vec::with_capacity(users.len() * du);
        let mut iv = Vec::with_capacity(items.len() * di);
        for (&u, &i) in users.iter().zip(items) {
            uv.extend_from_slice(&features.user[u as usize * du..(u as usize + 1) * du]);
            iv.extend_from_slice(&features.item[i as usize * di..(i as usize + 1) * di]);
        }
        let n = users.len();
        Ok((Tensor::from_vec(uv, (n, du), &dev)?, Tensor::from_vec(iv, (n, di), &dev)?, Tensor::from_slice(users, n, &dev)?, Tensor::from_slice(items, n, &dev)?))
    }

    /// The training-side scores of (user, item) pairs.
    pub fn score_pairs(&self, features: &Features, users: &[u32], items: &[u32]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(users.len());
        const CHUNK: usize = 16_384;
        for (u, i) in users.chunks(CHUNK).zip(items.chunks(CHUNK)) {
            let (uv, iv, ut, it) = self.gather(features, u, i)?;
            out.extend(self.forward(&uv, &iv, &ut, &it)?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// One epoch of BPR over `positives` (user, item) in a seeded order, each with a sampled
    /// negative the user has not interacted with. Returns the mean loss.
    pub fn train_epoch(&self, opt: &mut AdamW, features: &Features, positives: &[(u32, u32)], seen: &dyn Fn(u32, u32) -> bool, cfg: &TrainConfig, rng: &mut SeededRng) -> Result<f64> {
        let n_items = features.n_items();
        let mut order: Vec<usize> = (0..positives.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let (mut total, mut steps) = (0f64, 0usize);
        for chunk in order.chunks(cfg.batch_size.max(1)) {
            let users: Vec<u32> = chunk.iter().map(|&k| positives[k].0).collect();
            let pos: Vec<u32> = chunk.iter().map(|&k| positives[k].1).collect();
            let neg: Vec<u32> = users
                .iter()
                .map(|&u| loop {
                    let j = rng.below(n_items) as u32;
                    if !seen(u, j) {
                        break j;
                    }
                })
                .collect();
            let (uv, pv, ut, pt) = self.gather(features, &users, &pos)?;
            let (_, nv, _, nt) = self.gather(features, &users, &neg)?;
            let diff = (self.forward(&uv, &pv, &ut, &pt)? - self.forward(&uv, &nv, &ut, &nt)?)?;
            // −log σ(d) = softplus(−d), written with differentiable ops.
            let loss = (diff.neg()?.exp()? + 1.0)?.log()?.mean(D::Minus1)?;
            opt.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()? as f64;
            steps += 1;
        }
        Ok(total / steps.max(1) as f64)
    }

    pub fn optimizer(&self, cfg: &TrainConfig) -> Result<AdamW> {
        Ok(AdamW::new(self.vars(), ParamsAdamW { lr: cfg.learning_rate, weight_decay: cfg.weight_decay, ..Default::default() })?)
    }

    fn values(v: &Var) -> Result<Vec<f32>> {
        Ok(v.as_tensor().flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    /// The model as ONNX: inputs [`USER_VECTOR`] [batch, du], [`ITEM_VECTOR`] [batch, di],
    /// [`USER_INDEX`] and [`ITEM_INDEX`] [batch] (int64); output [`SCORE`] [batch].
    pub fn to_onnx(&self, metadata: &[(&str, String)]) -> Result<Vec<u8>> {
        let dims = |v: &Var| v.as_tensor().dims().iter().map(|&d| d as i64).collect::<Vec<i64>>();
        let batch = Dim::Named("batch");
        let mut g = Graph::new("recfuse_feature_mlp");
        g.input(USER_VECTOR, Elem::F32, &[batch, Dim::Fixed(self.user_dim as i64)])
            .input(ITEM_VECTOR, Elem::F32, &[batch, Dim::Fixed(self.item_dim as i64)])
            .input(USER_INDEX, Elem::I64, &[batch])
            .input(ITEM_INDEX, Elem::I64, &[batch])
            .output(SCORE, Elem::F32, &[batch]);
        for (name, v) in [("user_emb", &self.user_emb), ("item_emb", &self.item_emb), ("item_bias", &self.item_bias), ("w1", &self.w1), ("b1", &self.b1), ("w2", &self.w2), ("b2", &self.b2)] {
            g.weight(name, &dims(v), &Self::values(v)?);
        }
        g.ints("flat", &[-1])
            .node("Gather", &["user_emb", USER_INDEX], "eu", &[("axis", Attr::Int(0))])
            .node("Gather", &["item_emb", ITEM_INDEX], "ei", &[("axis", Attr::Int(0))])
            .node("Mul", &["eu", "ei"], "inter", &[])
            .node("Concat", &[USER_VECTOR, ITEM_VECTOR, "inter"], "x", &[("axis", Attr::Int(1))])
            .node("Gemm", &["x", "w1", "b1"], "h_pre", &[("transB", Attr::Int(1))])
            .node("Relu", &["h_pre"], "h", &[])
            .node("Gemm", &["h", "w2", "b2"], "s2", &[("transB", Attr::Int(1))])
            .node("Reshape", &["s2", "flat"], "s", &[])
            .node("Gather", &["item_bias", ITEM_INDEX], "bias", &[("axis", Attr::Int(0))])
            .node("Add", &["s", "bias"], SCORE, &[]);
        g.to_model_bytes(metadata)
    }

    /// Checks that the features fit the model.
    pub fn check(&self, features: &Features) -> Result<()> {
        ensure!(features.user_dim == self.user_dim && features.item_dim == self.item_dim, "feature widths changed since the model was built");
        Ok(())
    }
}
