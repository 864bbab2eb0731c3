//! `kind = "sasrec"`: SASRec (Kang & McAuley 2018), self-attentive sequential recommendation,
//! trained with candle on the CPU.
//!
//! Architecture as in RecBole's SASRec: item + position embeddings, layer norm and dropout,
//! `layers` post-norm transformer blocks with causal single/multi-head self-attention and a ReLU
//! feed-forward, the item embeddings reused as the output layer, cross-entropy over all items at
//! every position. Training sequences are each user's train items cut into windows of `max_len`
//! (every item is a target once per epoch); scoring conditions on the prediction-time context
//! (train plus validation) when the host gives one.
//!
//! candle 0.11's fused softmax and layer norm have no backward pass (their gradients are
//! silently zero), so this file writes both from differentiable primitives, and a
//! finite-difference test guards the gradients. candle's CPU RNG cannot be seeded: weights and
//! dropout masks come from our own seeded generator, so training is reproducible.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use recfuse_sdk::prelude::*;

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct SasRecConfig {
    #[serde(default = "d_dim")]
    pub dim: usize,
    #[serde(default = "d_layers")]
    pub layers: usize,
    #[serde(default = "d_heads")]
    pub heads: usize,
    /// Feed-forward width.
    #[serde(default = "d_inner")]
    pub inner: usize,
    #[serde(default = "d_max_len")]
    pub max_len: usize,
    #[serde(default = "d_dropout")]
    pub dropout: f32,
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Behaviour kinds that form the sequence (all item events when empty).
    #[serde(default)]
    pub kinds: Vec<String>,
    #[serde(default)]
    pub seed: Option<u64>,
}
fn d_dim() -> usize {
    64
}
fn d_layers() -> usize {
    2
}
fn d_heads() -> usize {
    1
}
fn d_inner() -> usize {
    256
}
fn d_max_len() -> usize {
    50
}
fn d_dropout() -> f32 {
    0.2
}
fn d_epochs() -> usize {
    20
}
fn d_batch() -> usize {
    128
}
fn d_lr() -> f64 {
    1e-3
}

struct Block {
    wq: Var,
    wk: Var,
    wv: Var,
    wo: Var,
    bq: Var,
    bk: Var,
    bv: Var,
    bo: Var,
    ln1_g: Var,
    ln1_b: Var,
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
    ln2_g: Var,
    ln2_b: Var,
}

/// The model's parameters and forward pass.
struct Model {
    cfg: SasRecConfig,
    dtype: DType,
    item_emb: Var, // (n_items + 1, dim); row 0 is padding
    pos_emb: Var,  // (max_len, dim)
    ln_g: Var,
    ln_b: Var,
    blocks: Vec<Block>,
}

fn layer_norm(x: &Tensor, g: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    // Written out: candle's fused layer norm has no backward.
    let mu = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + 1e-12)?.sqrt()?)?;
    y.broadcast_mul(g)?.broadcast_add(b)
}

fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    // Written out: candle's fused softmax has no backward. The max is a constant shift.
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// log-softmax over the last dimension, differentiable.
fn log_softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

impl Model {
    fn new(cfg: &SasRecConfig, n_items: usize, rng: &mut SeededRng, dtype: DType) -> Result<Self> {
        let dev = Device::Cpu;
        let d = cfg.dim;
        let mut normal = |rows: usize, cols: usize, std: f64| -> Result<Var> {
            let v: Vec<f64> = (0..rows * cols).map(|_| rng.normal() * std).collect();
            Ok(Var::from_tensor(&Tensor::from_vec(v, (rows, cols), &dev)?.to_dtype(dtype)?)?)
        };
        let item_emb = normal(n_items + 1, d, 0.02)?;
        let pos_emb = normal(cfg.max_len, d, 0.02)?;
        let mut blocks = Vec::new();
        let constant = |n: usize, v: f64| -> Result<Var> { Ok(Var::from_tensor(&Tensor::full(v, n, &dev)?.to_dtype(dtype)?)?) };
        for _ in 0..cfg.layers {
            blocks.push(Block {
                wq: normal(d, d, 0.02)?,
                wk: normal(d, d, 0.02)?,
                wv: normal(d, d, 0.02)?,
                wo: normal(d, d, 0.02)?,
                bq: constant(d, 0.0)?,
                bk: constant(d, 0.0)?,
                bv: constant(d, 0.0)?,
                bo: constant(d, 0.0)?,
                ln1_g: constant(d, 1.0)?,
                ln1_b: constant(d, 0.0)?,
                w1: normal(d, cfg.inner, 0.02)?,
                b1: constant(cfg.inner, 0.0)?,
                w2: normal(cfg.inner, d, 0.02)?,
                b2: constant(d, 0.0)?,
                ln2_g: constant(d, 1.0)?,
                ln2_b: constant(d, 0.0)?,
            });
        }
        Ok(Model {
            cfg: cfg.clone(),
            dtype,
            item_emb,
            pos_emb,
            ln_g: constant(d, 1.0)?,
            ln_b: constant(d, 0.0)?,
            blocks,
        })
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.item_emb.clone(), self.pos_emb.clone(), self.ln_g.clone(), self.ln_b.clone()];
        for b in &self.blocks {
            v.extend([&b.wq, &b.wk, &b.wv, &b.wo, &b.bq, &b.bk, &b.bv, &b.bo, &b.ln1_g, &b.ln1_b, &b.w1, &b.b1, &b.w2, &b.b2, &b.ln2_g, &b.ln2_b].map(|x| x.clone()));
        }
        v
    }

    /// Dropout with a mask from our seeded generator (identity when `rng` is None).
    fn dropout(&self, x: &Tensor, rng: &mut Option<&mut SeededRng>) -> Result<Tensor> {
        let p = self.cfg.dropout as f64;
        match rng {
            Some(r) if p > 0.0 => {
                let keep = 1.0 / (1.0 - p);
                let mask: Vec<f32> = (0..x.elem_count()).map(|_| if r.unit() < p { 0.0 } else { keep as f32 }).collect();
                let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(self.dtype)?;
                Ok(x.mul(&mask)?)
            }
            _ => Ok(x.clone()),
        }
    }

    /// Hidden states (B, L, d) of left-padded item sequences `tokens` (B, L; 0 = padding).
    fn forward(&self, tokens: &[u32], batch: usize, mut rng: Option<&mut SeededRng>) -> Result<Tensor> {
        let (l, d, h) = (self.cfg.max_len, self.cfg.dim, self.cfg.heads);
        let dev = Device::Cpu;
        let ids = Tensor::from_slice(tokens, batch * l, &dev)?;
        let x = self.item_emb.as_tensor().index_select(&ids, 0)?.reshape((batch, l, d))?;
        let x = x.broadcast_add(self.pos_emb.as_tensor())?;
        let x = layer_norm(&x, self.ln_g.as_tensor(), self.ln_b.as_tensor())?;
        let x = self.dropout(&x, &mut rng)?;
        // Attention bias: causal, and padding keys masked. (B, 1, L, L)
        let mut bias = vec![0f64; batch * l * l];
        for b in 0..batch {
            for i in 0..l {
                for j in 0..l {
                    if j > i || tokens[b * l + j] == 0 {
                        bias[(b * l + i) * l + j] = -1e9;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (batch, 1, l, l), &dev)?.to_dtype(self.dtype)?;
        let hd = d / h;
        let scale = 1.0 / (hd as f64).sqrt();
        // Projections and feed-forward work on (B·L, d): one large matmul, not B small ones.
        let mut x = x.reshape((batch * l, d))?;
        let linear = |x: &Tensor, w: &Var, b: &Var| -> Result<Tensor> { Ok(x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?) };
        for blk in &self.blocks {
            let heads = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((batch, l, h, hd))?.transpose(1, 2)?.contiguous()?) };
            let q = heads(linear(&x, &blk.wq, &blk.bq)?)?;
            let k = heads(linear(&x, &blk.wk, &blk.bk)?)?;
            let v = heads(linear(&x, &blk.wv, &blk.bv)?)?;
            let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale)?.broadcast_add(&bias)?;
            let attn = self.dropout(&softmax_last(&scores)?, &mut rng)?;
            let ctx = attn.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((batch * l, d))?;
            let out = self.dropout(&linear(&ctx, &blk.wo, &blk.bo)?, &mut rng)?;
            let a = layer_norm(&(x + out)?, blk.ln1_g.as_tensor(), blk.ln1_b.as_tensor())?;
            let f = linear(&linear(&a, &blk.w1, &blk.b1)?.relu()?, &blk.w2, &blk.b2)?;
            let f = self.dropout(&f, &mut rng)?;
            x = layer_norm(&(a + f)?, blk.ln2_g.as_tensor(), blk.ln2_b.as_tensor())?;
        }
        let x = x.reshape((batch, l, d))?;
        Ok(x)
    }

    /// The last position's hidden state (B, d), for scoring: the same function as
    /// `forward(..).narrow(1, L - 1, 1)` without dropout, computed for inference only. It uses
    /// candle's fused softmax and layer norm (no backward needed here) and, in the last block,
    /// attends and feeds forward from the last position only (the others are not read).
    fn encode_last(&self, tokens: &[u32], batch: usize) -> Result<Tensor> {
        use candle_nn::ops::{layer_norm, softmax_last_dim};
        let (l, d, h) = (self.cfg.max_len, self.cfg.dim, self.cfg.heads);
        let hd = d / h;
        let dev = Device::Cpu;
        let ln = |x: &Tensor, g: &Var, b: &Var| -> Result<Tensor> { Ok(layer_norm(&x.contiguous()?, g.as_tensor(), b.as_tensor(), 1e-12)?) };
        let ids = Tensor::from_slice(tokens, batch * l, &dev)?;
        let x = self.item_emb.as_tensor().index_select(&ids, 0)?.reshape((batch, l, d))?;
        let x = ln(&x.broadcast_add(self.pos_emb.as_tensor())?, &self.ln_g, &self.ln_b)?;
        // Padding keys masked; the causal mask matters for every query but the last.
        let mut causal = vec![0f32; batch * l * l];
        let mut last_row = vec![0f32; batch * l];
        for b in 0..batch {
            for j in 0..l {
                let pad = tokens[b * l + j] == 0;
                if pad {
                    last_row[b * l + j] = -1e9;
                }
                for i in 0..l {
                    if j > i || pad {
                        causal[(b * l + i) * l + j] = -1e9;
                    }
                }
            }
        }
        let causal = Tensor::from_vec(causal, (batch, 1, l, l), &dev)?.to_dtype(self.dtype)?;
        let last_row = Tensor::from_vec(last_row, (batch, 1, 1, l), &dev)?.to_dtype(self.dtype)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let linear = |x: &Tensor, w: &Var, b: &Var| -> Result<Tensor> { Ok(x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?) };
        let mut x = x.reshape((batch * l, d))?;
        let n = self.blocks.len();
        for (at, blk) in self.blocks.iter().enumerate() {
            let rows = if at + 1 == n { 1 } else { l }; // queries kept: the last block needs one
            let heads = |t: Tensor, rows: usize| -> Result<Tensor> { Ok(t.reshape((batch, rows, h, hd))?.transpose(1, 2)?.contiguous()?) };
            let xq = if rows == 1 { x.reshape((batch, l, d))?.narrow(1, l - 1, 1)?.reshape((batch, d))? } else { x.clone() };
            let q = heads(linear(&xq, &blk.wq, &blk.bq)?, rows)?;
            let k = heads(linear(&x, &blk.wk, &blk.bk)?, l)?;
            let v = heads(linear(&x, &blk.wv, &blk.bv)?, l)?;
            let bias = if rows == 1 { &last_row } else { &causal };
            let scores = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale)?.broadcast_add(bias)?;
            let ctx = softmax_last_dim(&scores)?.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((batch * rows, d))?;
            let a = ln(&(xq + linear(&ctx, &blk.wo, &blk.bo)?)?, &blk.ln1_g, &blk.ln1_b)?;
            let f = linear(&linear(&a, &blk.w1, &blk.b1)?.relu()?, &blk.w2, &blk.b2)?;
            x = ln(&(a + f)?, &blk.ln2_g, &blk.ln2_b)?;
        }
        Ok(x.reshape((batch, d))?)
    }

    /// Mean cross-entropy over all items at every non-padding target position.
    fn loss(&self, tokens: &[u32], targets: &[u32], batch: usize, rng: Option<&mut SeededRng>) -> Result<Tensor> {
        let (l, d) = (self.cfg.max_len, self.cfg.dim);
        let hidden = self.forward(tokens, batch, rng)?.reshape((batch * l, d))?;
        let logits = hidden.matmul(&self.item_emb.as_tensor().t()?)?; // (B·L, n_items + 1)
        let logp = log_softmax_last(&logits)?;
        let idx = Tensor::from_slice(targets, (batch * l, 1), &Device::Cpu)?;
        let picked = logp.gather(&idx, D::Minus1)?.squeeze(D::Minus1)?;
        let valid: Vec<f64> = targets.iter().map(|&t| (t != 0) as u8 as f64).collect();
        let count = valid.iter().sum::<f64>().max(1.0);
        let valid = Tensor::from_vec(valid, batch * l, &Device::Cpu)?.to_dtype(self.dtype)?;
        Ok((picked.mul(&valid)?.sum_all()? * (-1.0 / count))?)
    }
}

/// Users encoded together when scoring (see `score`).
const SCORE_CHUNK: usize = 64;

/// Left-pads (or keeps the last `len` of) a sequence of 1-based item ids.
fn window(seq: &[u32], len: usize) -> Vec<u32> {
    let tail = &seq[seq.len().saturating_sub(len)..];
    let mut out = vec![0u32; len - tail.len()];
    out.extend_from_slice(tail);
    out
}

pub struct SasRec {
    cfg: SasRecConfig,
    host: Host,
    model: Option<Model>,
    /// Each user's last `max_len` items at prediction time (1-based ids, left-padded).
    sequences: Vec<Vec<u32>>,
}

impl SasRec {
    fn item_sequences(&self, view: &TrainView) -> Vec<Vec<u32>> {
        let kinds: Vec<u32> = self.cfg.kinds.iter().filter_map(|k| view.catalog.kind(k)).collect();
        (0..view.n_users() as u32)
            .map(|u| {
                view.history(u)
                    .iter()
                    .filter(|e| e.item != NONE && (self.cfg.kinds.is_empty() || kinds.contains(&e.kind)))
                    .map(|e| e.item + 1)
                    .collect()
            })
            .collect()
    }
}

impl Ranker for SasRec {
    type Config = SasRecConfig;
    const DESCRIPTION: &'static str = "SASRec: self-attentive sequential recommendation (candle, CPU)";

    fn new(cfg: SasRecConfig, host: Host) -> Result<Self> {
        ensure!(cfg.dim > 0 && cfg.heads > 0 && cfg.dim % cfg.heads == 0, "dim must be a positive multiple of heads");
        ensure!(cfg.max_len >= 2 && cfg.epochs > 0 && cfg.batch_size > 0, "max_len ≥ 2, epochs and batch_size > 0");
        ensure!((0.0..1.0).contains(&cfg.dropout), "dropout must be in [0, 1)");
        Ok(Self { cfg, host, model: None, sequences: vec![] })
    }

    fn fit(&mut self, view: &TrainView, inputs: &FitInputs) -> Result<()> {
        let l = self.cfg.max_len;
        let mut rng = SeededRng::new(self.cfg.seed.unwrap_or_else(|| self.host.seed()));
        let model = Model::new(&self.cfg, view.n_items(), &mut rng, DType::F32)?;
        // Training windows: every item of every user's train sequence is a target once.
        let mut windows: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
        for seq in self.item_sequences(view) {
            let mut end = seq.len();
            while end >= 2 {
                let start = end.saturating_sub(l + 1);
                let chunk = &seq[start..end];
                windows.push((window(&chunk[..chunk.len() - 1], l), window(&chunk[1..], l)));
                end = start + 1;
                if start == 0 {
                    break;
                }
            }
        }
        ensure!(!windows.is_empty(), "no user has two or more train items to learn a sequence from");
        let params = ParamsAdamW { lr: self.cfg.learning_rate, weight_decay: self.cfg.weight_decay, ..Default::default() };
        let mut opt = AdamW::new(model.vars(), params)?;
        let progress = self.host.progress("sasrec epochs", self.cfg.epochs as u64);
        let mut order: Vec<usize> = (0..windows.len()).collect();
        for epoch in 0..self.cfg.epochs {
            rng.shuffle(&mut order);
            let (mut total, mut batches) = (0f64, 0usize);
            for chunk in order.chunks(self.cfg.batch_size) {
                self.host.check_cancelled()?;
                let tokens: Vec<u32> = chunk.iter().flat_map(|&i| windows[i].0.iter().copied()).collect();
                let targets: Vec<u32> = chunk.iter().flat_map(|&i| windows[i].1.iter().copied()).collect();
                let loss = model.loss(&tokens, &targets, chunk.len(), Some(&mut rng))?;
                opt.backward_step(&loss)?;
                total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                batches += 1;
            }
            self.host.debug(format!("sasrec epoch {}: mean loss {:.4} over {} windows", epoch + 1, total / batches as f64, windows.len()));
            progress.inc(1);
        }
        // Predict from what is known at prediction time.
        let context = inputs.context.unwrap_or(*view);
        self.sequences = self.item_sequences(&context).iter().map(|s| window(s, l)).collect();
        self.model = Some(model);
        self.host.info(format!("sasrec trained {} epochs on {} windows", self.cfg.epochs, windows.len()));
        Ok(())
    }

    fn score(&self, batch: &ScoreBatch, out: &mut [f32]) -> Result<()> {
        let model = self.model.as_ref().context("sasrec scored before fit")?;
        let (l, d) = (self.cfg.max_len, self.cfg.dim);
        let b = batch.users.len();
        let empty = vec![0u32; l];
        let tokens: Vec<u32> =
            batch.users.iter().flat_map(|&u| self.sequences.get(u as usize).unwrap_or(&empty).iter().copied()).collect();
        // Encoded SCORE_CHUNK users at a time: the activations stay small enough to be reused
        // by the allocator (large fresh allocations cost page clearing on every op).
        let parts = tokens
            .chunks(SCORE_CHUNK * l)
            .map(|t| model.encode_last(t, t.len() / l))
            .collect::<Result<Vec<_>>>()?;
        let last = Tensor::cat(&parts, 0)?; // (B, d)
        let n = batch.per_user();
        if batch.shared {
            let ids: Vec<u32> = batch.items.iter().map(|&i| i + 1).collect();
            let emb = model.item_emb.as_tensor().index_select(&Tensor::from_vec(ids, n, &Device::Cpu)?, 0)?;
            let scores = last.matmul(&emb.t()?)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            out.copy_from_slice(&scores);
        } else {
            let ids: Vec<u32> = batch.items.iter().map(|&i| i + 1).collect();
            let emb = model.item_emb.as_tensor().index_select(&Tensor::from_vec(ids, b * n, &Device::Cpu)?, 0)?.reshape((b, n, d))?;
            let scores = emb.matmul(&last.reshape((b, d, 1))?)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            out.copy_from_slice(&scores);
        }
        Ok(())
    }
}

export_plugin! {
    name: "sasrec-ranker",
    rankers: { "sasrec" => SasRec },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_cfg() -> SasRecConfig {
        serde_json::from_value(serde_json::json!({
            "dim": 4, "layers": 1, "heads": 2, "inner": 6, "max_len": 3, "dropout": 0.0, "epochs": 1, "seed": 5
        }))
        .unwrap()
    }

    /// Autograd gradients against central finite differences, in f64, for every parameter
    /// tensor (a few entries each): guards against ops whose backward is silently zero.
    /// The inference path (fused ops, last position only) equals the training forward.
    #[test]
    fn encode_last_equals_the_training_forward() {
        let cfg: SasRecConfig = serde_json::from_value(serde_json::json!({
            "dim": 8, "layers": 2, "heads": 2, "inner": 12, "max_len": 5, "dropout": 0.0, "epochs": 1, "seed": 5
        }))
        .unwrap();
        let mut rng = SeededRng::new(3);
        let model = Model::new(&cfg, 9, &mut rng, DType::F32).unwrap();
        let tokens = [0, 0, 3, 1, 7, 2, 4, 6, 8, 9, 0, 0, 0, 0, 5];
        let full = model.forward(&tokens, 3, None).unwrap().narrow(1, 4, 1).unwrap().reshape((3, 8)).unwrap();
        let fast = model.encode_last(&tokens, 3).unwrap();
        let diff = (full - fast).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{diff}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let cfg = tiny_cfg();
        let mut rng = SeededRng::new(11);
        let model = Model::new(&cfg, 5, &mut rng, DType::F64).unwrap();
        let tokens = [0u32, 1, 2, 3, 4, 5];
        let targets = [0u32, 2, 3, 4, 5, 1];
        let loss = model.loss(&tokens, &targets, 2, None).unwrap();
        let grads = loss.backward().unwrap();
        let eps = 1e-6;
        for (k, var) in model.vars().iter().enumerate() {
            let g = grads.get(var.as_tensor()).expect("every parameter gets a gradient").flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let base = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for idx in [0, base.len() / 2, base.len() - 1] {
                let bumped = |delta: f64| {
                    let mut v = base.clone();
                    v[idx] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                    let l = model.loss(&tokens, &targets, 2, None).unwrap().to_scalar::<f64>().unwrap();
                    var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                    l
                };
                let numeric = (bumped(eps) - bumped(-eps)) / (2.0 * eps);
                let tol = 1e-5 + 1e-3 * numeric.abs();
                assert!((g[idx] - numeric).abs() < tol, "param {k} entry {idx}: autograd {} vs numeric {numeric}", g[idx]);
            }
        }
    }

    /// On a deterministic cycle 0→1→2→…, the trained model ranks the true next item first.
    #[test]
    fn learns_a_cycle() {
        let n_items = 8u32;
        let catalog = Catalog {
            items: (0..n_items).map(|i| Item { id: i.to_string(), ..Default::default() }).collect(),
            users: (0..16).map(|i| User { id: i.to_string(), ..Default::default() }).collect(),
            kinds: vec!["click".into()],
            ..Default::default()
        };
        let mut events = Vec::new();
        let mut offsets = vec![0u32];
        for u in 0..16u32 {
            for t in 0..12u32 {
                let item = (u + t) % n_items;
                events.push(Event { user: u, item, kind: 0, scenario: 0, subject: NONE, value: 1.0, timestamp: t as i64 });
            }
            offsets.push(events.len() as u32);
        }
        let view = TrainView { catalog: &catalog, events: &events, offsets: &offsets };
        let cfg: SasRecConfig = serde_json::from_value(serde_json::json!({
            "dim": 16, "layers": 1, "heads": 1, "inner": 32, "max_len": 5, "dropout": 0.0,
            "epochs": 60, "batch_size": 16, "learning_rate": 0.01, "seed": 1
        }))
        .unwrap();
        let mut m = SasRec::new(cfg, Host::standalone(std::env::temp_dir(), 0)).unwrap();
        m.fit(&view, &FitInputs::default()).unwrap();
        let items: Vec<u32> = (0..n_items).collect();
        let users: Vec<u32> = (0..16).collect();
        let mut out = vec![0f32; 16 * n_items as usize];
        m.score(&ScoreBatch { users: &users, items: &items, shared: true }, &mut out).unwrap();
        for u in 0..16u32 {
            let row = &out[(u * n_items) as usize..((u + 1) * n_items) as usize];
            let best = (0..n_items as usize).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
            assert_eq!(best, (u + 12) % n_items, "user {u}: {row:?}");
        }
        // The per-user layout gives the same scores.
        let cands: Vec<u32> = users.iter().flat_map(|_| [3u32, 5]).collect();
        let mut out2 = vec![0f32; 32];
        m.score(&ScoreBatch { users: &users, items: &cands, shared: false }, &mut out2).unwrap();
        assert!((out2[0] - out[3]).abs() < 1e-4 && (out2[1] - out[5]).abs() < 1e-4);
    }
}

