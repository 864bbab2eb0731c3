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
//!
//! Model selection (SDK 1.1): after every epoch, validation NDCG@`select_k` with the host's
//! metric code; the best epoch is kept, training stops after `patience` epochs without
//! improvement. Persistence: `model.safetensors` (weights) for save/load; each epoch leaves
//! `checkpoint.safetensors` (weights, best weights, AdamW moments, RNG state, window order,
//! early-stopping state) in the model directory, and an interrupted fit resumes from it exactly.

use candle_core::{DType, Device, Tensor, Var, D};
use recfuse_sdk::metrics::Verdict;
use recfuse_sdk::prelude::*;
use std::collections::HashMap;
use std::path::Path;

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
    /// Early stopping: epochs without a better validation NDCG@`select_k` before stopping, the
    /// best epoch kept (0 = train all `epochs`, keep the last).
    #[serde(default = "d_patience")]
    pub patience: usize,
    #[serde(default = "d_select_k")]
    pub select_k: usize,
    /// Behaviour kinds that form the sequence (all item events when empty).
    #[serde(default)]
    pub kinds: Vec<String>,
    #[serde(default)]
    pub seed: Option<u64>,
}
fn d_patience() -> usize {
    10
}
fn d_select_k() -> usize {
    10
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
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// Every parameter with a stable name, for checkpoints and saved models.
    fn named_vars(&self) -> Vec<(String, Var)> {
        let mut v = vec![
            ("item_emb".to_string(), self.item_emb.clone()),
            ("pos_emb".to_string(), self.pos_emb.clone()),
            ("ln_g".to_string(), self.ln_g.clone()),
            ("ln_b".to_string(), self.ln_b.clone()),
        ];
        for (i, b) in self.blocks.iter().enumerate() {
            let parts = [
                ("wq", &b.wq), ("wk", &b.wk), ("wv", &b.wv), ("wo", &b.wo), ("bq", &b.bq), ("bk", &b.bk), ("bv", &b.bv), ("bo", &b.bo),
                ("ln1_g", &b.ln1_g), ("ln1_b", &b.ln1_b), ("w1", &b.w1), ("b1", &b.b1), ("w2", &b.w2), ("b2", &b.b2),
                ("ln2_g", &b.ln2_g), ("ln2_b", &b.ln2_b),
            ];
            v.extend(parts.into_iter().map(|(n, x)| (format!("blocks.{i}.{n}"), x.clone())));
        }
        v
    }

    /// Copies of the current weights, by name.
    fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        self.named_vars().into_iter().map(|(n, v)| Ok((n, v.as_tensor().copy()?))).collect()
    }

    /// Sets every weight from `tensors[prefix + name]`, checking shapes (`file` for messages).
    fn restore(&self, tensors: &HashMap<String, Tensor>, prefix: &str, file: &Path) -> Result<()> {
        for (name, var) in self.named_vars() {
            let key = format!("{prefix}{name}");
            let t = tensors.get(&key).with_context(|| format!("{}: no tensor `{key}`", file.display()))?;
            ensure!(
                t.dims() == var.dims(),
                "{}: `{key}` has shape {:?}, the model needs {:?} (another dataset or config?)",
                file.display(),
                t.dims(),
                var.dims()
            );
            var.set(&t.to_dtype(self.dtype)?)?;
        }
        Ok(())
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
            // One matmul for the projections read from every position (K and V, and Q unless
            // only the last position is queried): fewer passes over `x`.
            let cat_w = |ws: &[&Var]| Tensor::cat(&ws.iter().map(|w| w.as_tensor()).collect::<Vec<_>>(), 1);
            let cat_b = |bs: &[&Var]| Tensor::cat(&bs.iter().map(|b| b.as_tensor()).collect::<Vec<_>>(), 0);
            let (q, k, v) = if rows == 1 {
                let kv = x.matmul(&cat_w(&[&blk.wk, &blk.wv])?)?.broadcast_add(&cat_b(&[&blk.bk, &blk.bv])?)?;
                (heads(linear(&xq, &blk.wq, &blk.bq)?, rows)?, heads(kv.narrow(1, 0, d)?, l)?, heads(kv.narrow(1, d, d)?, l)?)
            } else {
                let qkv = x.matmul(&cat_w(&[&blk.wq, &blk.wk, &blk.wv])?)?.broadcast_add(&cat_b(&[&blk.bq, &blk.bk, &blk.bv])?)?;
                (heads(qkv.narrow(1, 0, d)?, l)?, heads(qkv.narrow(1, d, d)?, l)?, heads(qkv.narrow(1, 2 * d, d)?, l)?)
            };
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

/// Scores of every item (in catalog order) for `users`, from their windowed `sequences`.
fn score_shared(model: &Model, sequences: &[Vec<u32>], users: &[u32], n_items: usize, out: &mut [f32]) -> Result<()> {
    let l = model.cfg.max_len;
    let empty = vec![0u32; l];
    let tokens: Vec<u32> = users.iter().flat_map(|&u| sequences.get(u as usize).unwrap_or(&empty).iter().copied()).collect();
    let parts = tokens.chunks(SCORE_CHUNK * l).map(|t| model.encode_last(t, t.len() / l)).collect::<Result<Vec<_>>>()?;
    let last = Tensor::cat(&parts, 0)?;
    let emb = model.item_emb.as_tensor().narrow(0, 1, n_items)?; // row 0 is padding
    let scores = last.matmul(&emb.t()?)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    out.copy_from_slice(&scores);
    Ok(())
}

/// Writes tensors (all f32) and string metadata as safetensors, atomically (temp file, sync,
/// rename), in one pass (candle's own writer has no metadata).
fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>, meta: HashMap<String, String>) -> Result<()> {
    let data = tensors
        .iter()
        .map(|(k, t)| {
            let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            Ok((k.as_str(), t.dims().to_vec(), values.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()))
        })
        .collect::<Result<Vec<_>>>()?;
    let views = data
        .iter()
        .map(|(k, shape, bytes)| Ok((*k, safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let out = safetensors::serialize(views, (!meta.is_empty()).then_some(meta))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, out).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).with_context(|| format!("{} is not safetensors", path.display()))?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// Users encoded together when scoring (see `score`).
const SCORE_CHUNK: usize = 64;

/// AdamW with decoupled weight decay, as `candle_nn::AdamW` computes it, with its moments in
/// the open so a checkpoint can hold them and a resumed fit continue exactly.
struct AdamW {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    lr: f64,
    weight_decay: f64,
}

impl AdamW {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Self> {
        let zeros = vars.iter().map(|v| Ok(v.as_tensor().zeros_like()?)).collect::<Result<Vec<_>>>()?;
        Ok(Self { m: zeros.clone(), v: zeros, vars, step: 0, lr, weight_decay })
    }

    fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step += 1;
        let (c1, c2) = (1.0 - Self::B1.powi(self.step as i32), 1.0 - Self::B2.powi(self.step as i32));
        for ((var, m), v) in self.vars.iter().zip(self.m.iter_mut()).zip(self.v.iter_mut()) {
            let Some(g) = grads.get(var) else { continue };
            // detach: gradients derive from the variables, so without it every moment would
            // keep the whole history of computations alive (memory grows each step).
            *m = ((&*m * Self::B1)? + (g * (1.0 - Self::B1))?)?.detach();
            *v = ((&*v * Self::B2)? + (g.sqr()? * (1.0 - Self::B2))?)?.detach();
            let decayed = (var.as_tensor() * (1.0 - self.lr * self.weight_decay))?;
            let update = ((&*m / c1)? / ((&*v / c2)?.sqrt()? + Self::EPS)?)?;
            var.set(&(decayed - (update * self.lr)?)?)?;
        }
        Ok(())
    }
}

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
        let mut opt = AdamW::new(model.vars(), self.cfg.learning_rate, self.cfg.weight_decay)?;
        let mut order: Vec<usize> = (0..windows.len()).collect();
        let select = self.cfg.patience > 0 && !inputs.validation.is_empty();
        let mut stopping = EarlyStopping::new(self.cfg.patience);
        let mut best = model.snapshot()?;
        let checkpoint = inputs.model_dir.map(|dir| dir.join("checkpoint.safetensors"));
        let mut first_epoch = 0;
        if let Some(path) = checkpoint.as_deref().filter(|p| p.exists()) {
            let tensors = candle_core::safetensors::load(path, &Device::Cpu).with_context(|| format!("reading {}", path.display()))?;
            model.restore(&tensors, "model.", path)?;
            best = model.named_vars().into_iter().map(|(n, _)| Ok((n.clone(), tensors.get(&format!("best.{n}")).context("best weights missing")?.clone()))).collect::<Result<_>>()?;
            for (i, (name, _)) in model.named_vars().iter().enumerate() {
                opt.m[i] = tensors.get(&format!("adam_m.{name}")).context("AdamW moments missing")?.clone();
                opt.v[i] = tensors.get(&format!("adam_v.{name}")).context("AdamW moments missing")?.clone();
            }
            let meta = read_metadata(path)?;
            let field = |k: &str| meta.get(k).with_context(|| format!("{}: metadata `{k}` missing", path.display()));
            first_epoch = field("epochs_done")?.parse()?;
            opt.step = field("adam_step")?.parse()?;
            rng = SeededRng::new(field("rng_state")?.parse()?);
            order = serde_json::from_str(field("order")?)?;
            stopping = serde_json::from_str(field("stopping")?)?;
            self.host.info(format!("sasrec resumes after epoch {first_epoch} from {}", path.display()));
        }
        // Validation conditions on the train sequences (the validation item follows them).
        let train_sequences: Vec<Vec<u32>> = self.item_sequences(view).iter().map(|s| window(s, l)).collect();
        let progress = self.host.progress("sasrec epochs", self.cfg.epochs as u64);
        progress.inc(first_epoch as u64);
        for epoch in first_epoch..self.cfg.epochs {
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
            let mut line = format!("sasrec epoch {}: mean loss {:.4} over {} windows", epoch + 1, total / batches as f64, windows.len());
            let mut stop = false;
            if select {
                let v = inputs.validation.evaluate(view, self.cfg.select_k, 256, |users, out| {
                    score_shared(&model, &train_sequences, users, view.n_items(), out)
                })?;
                line.push_str(&format!(", validation NDCG@{} {:.4}", self.cfg.select_k, v.ndcg));
                match stopping.observe(epoch + 1, v.ndcg) {
                    Verdict::Improved => best = model.snapshot()?,
                    Verdict::Continue => {}
                    Verdict::Stop => stop = true,
                }
            }
            self.host.debug(line);
            if let Some(path) = &checkpoint {
                let mut tensors: HashMap<String, Tensor> = HashMap::new();
                for (i, (name, var)) in model.named_vars().into_iter().enumerate() {
                    tensors.insert(format!("model.{name}"), var.as_tensor().clone());
                    tensors.insert(format!("best.{name}"), best[&name].clone());
                    tensors.insert(format!("adam_m.{name}"), opt.m[i].clone());
                    tensors.insert(format!("adam_v.{name}"), opt.v[i].clone());
                }
                let meta = HashMap::from([
                    ("epochs_done".to_string(), (epoch + 1).to_string()),
                    ("adam_step".to_string(), opt.step.to_string()),
                    ("rng_state".to_string(), rng.state().to_string()),
                    ("order".to_string(), serde_json::to_string(&order)?),
                    ("stopping".to_string(), serde_json::to_string(&stopping)?),
                ]);
                write_tensors(path, &tensors, meta)?;
            }
            progress.inc(1);
            if stop {
                break;
            }
        }
        if select {
            model.restore(&best.iter().map(|(k, v)| (k.clone(), v.clone())).collect(), "", Path::new("best epoch"))?;
            self.host.info(format!(
                "sasrec kept epoch {} (validation NDCG@{} {:.4}) of {} windows",
                stopping.best_epoch, self.cfg.select_k, stopping.best, windows.len()
            ));
        } else {
            self.host.info(format!("sasrec trained {} epochs on {} windows", self.cfg.epochs, windows.len()));
        }
        // Predict from what is known at prediction time.
        let context = inputs.context.unwrap_or(*view);
        self.sequences = self.item_sequences(&context).iter().map(|s| window(s, l)).collect();
        self.model = Some(model);
        Ok(())
    }

    fn save(&self, dir: &Path) -> Result<bool> {
        let model = self.model.as_ref().context("sasrec saved before fit")?;
        let tensors: HashMap<String, Tensor> = model.named_vars().into_iter().map(|(n, v)| (format!("model.{n}"), v.as_tensor().clone())).collect();
        write_tensors(&dir.join("model.safetensors"), &tensors, HashMap::new())?;
        Ok(true)
    }

    fn load(&mut self, view: &TrainView, inputs: &FitInputs, dir: &Path) -> Result<bool> {
        let path = dir.join("model.safetensors");
        if !path.exists() {
            return Ok(false);
        }
        let model = Model::new(&self.cfg, view.n_items(), &mut SeededRng::new(0), DType::F32)?;
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).with_context(|| format!("reading {}", path.display()))?;
        model.restore(&tensors, "model.", &path)?;
        let context = inputs.context.unwrap_or(*view);
        self.sequences = self.item_sequences(&context).iter().map(|s| window(s, self.cfg.max_len)).collect();
        self.model = Some(model);
        Ok(true)
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
    /// The optimizer's moments keep no computation history (else memory grows every step: a
    /// one-epoch ML-1M fit was OOM-killed before they were detached).
    #[test]
    fn adamw_moments_keep_no_graph() {
        let cfg: SasRecConfig = serde_json::from_value(serde_json::json!({
            "dim": 4, "layers": 1, "heads": 1, "inner": 6, "max_len": 3, "dropout": 0.0, "epochs": 1, "seed": 5
        }))
        .unwrap();
        let model = Model::new(&cfg, 5, &mut SeededRng::new(1), DType::F32).unwrap();
        let mut opt = AdamW::new(model.vars(), 0.01, 0.0).unwrap();
        for _ in 0..2 {
            let loss = model.loss(&[0, 1, 2, 3, 4, 1], &[1, 2, 3, 4, 1, 2], 2, None).unwrap();
            opt.backward_step(&loss).unwrap();
        }
        assert!(opt.m.iter().chain(&opt.v).all(|t| !t.track_op()));
    }

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
        let (catalog, events, offsets) = cycle_data(n_items, 16, 12);
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

    /// A small cyclic dataset: user u's sequence is u, u+1, ... (mod `n_items`).
    fn cycle_data(n_items: u32, users: u32, len: u32) -> (Catalog, Vec<Event>, Vec<u32>) {
        let catalog = Catalog {
            items: (0..n_items).map(|i| Item { id: i.to_string(), ..Default::default() }).collect(),
            users: (0..users).map(|i| User { id: i.to_string(), ..Default::default() }).collect(),
            kinds: vec!["click".into()],
            ..Default::default()
        };
        let (mut events, mut offsets) = (Vec::new(), vec![0u32]);
        for u in 0..users {
            for t in 0..len {
                events.push(Event { user: u, item: (u + t) % n_items, kind: 0, scenario: 0, subject: NONE, value: 1.0, timestamp: t as i64 });
            }
            offsets.push(events.len() as u32);
        }
        (catalog, events, offsets)
    }

    fn all_scores(m: &SasRec, users: u32, n_items: u32) -> Vec<f32> {
        let items: Vec<u32> = (0..n_items).collect();
        let users: Vec<u32> = (0..users).collect();
        let mut out = vec![0f32; users.len() * n_items as usize];
        m.score(&ScoreBatch { users: &users, items: &items, shared: true }, &mut out).unwrap();
        out
    }

    /// A fit stopped after some epochs resumes from its checkpoint to exactly the result of an
    /// uninterrupted fit; save + load gives the same scores; validation selection stops early.
    #[test]
    fn resumes_saves_and_selects_on_validation() {
        let (catalog, events, offsets) = cycle_data(8, 10, 9);
        let view = TrainView { catalog: &catalog, events: &events, offsets: &offsets };
        let make = |epochs: usize, patience: usize| {
            let cfg: SasRecConfig = serde_json::from_value(serde_json::json!({
                "dim": 8, "layers": 1, "heads": 1, "inner": 16, "max_len": 4, "dropout": 0.1,
                "epochs": epochs, "batch_size": 4, "learning_rate": 0.01, "seed": 2, "patience": patience
            }))
            .unwrap();
            SasRec::new(cfg, Host::standalone(std::env::temp_dir(), 0)).unwrap()
        };
        let straight_dir = tempfile::tempdir().unwrap();
        let mut straight = make(6, 0);
        straight.fit(&view, &FitInputs { model_dir: Some(straight_dir.path()), ..Default::default() }).unwrap();
        let dir = tempfile::tempdir().unwrap();
        make(2, 0).fit(&view, &FitInputs { model_dir: Some(dir.path()), ..Default::default() }).unwrap();
        let mut resumed = make(6, 0);
        resumed.fit(&view, &FitInputs { model_dir: Some(dir.path()), ..Default::default() }).unwrap();
        assert_eq!(all_scores(&straight, 10, 8), all_scores(&resumed, 10, 8));

        assert!(resumed.save(dir.path()).unwrap());
        let mut loaded = make(6, 0);
        assert!(loaded.load(&view, &FitInputs::default(), dir.path()).unwrap());
        assert_eq!(all_scores(&loaded, 10, 8), all_scores(&resumed, 10, 8));

        // Selection: validation items are each user's next cycle item.
        let (vu, vi): (Vec<u32>, Vec<u32>) = (0..10u32).map(|u| (u, (u + 9) % 8)).unzip();
        let validation = Validation { users: &vu, items: &vi };
        let sel_dir = tempfile::tempdir().unwrap();
        let mut sel = make(200, 2);
        sel.fit(&view, &FitInputs { model_dir: Some(sel_dir.path()), validation, ..Default::default() }).unwrap();
        let meta = read_metadata(&sel_dir.path().join("checkpoint.safetensors")).unwrap();
        let done: usize = meta["epochs_done"].parse().unwrap();
        let stopping: EarlyStopping = serde_json::from_str(&meta["stopping"]).unwrap();
        assert!(done < 200 && done == stopping.best_epoch + 2, "stopped after {done}, best {}", stopping.best_epoch);
        let model = sel.model.as_ref().unwrap();
        let seqs: Vec<Vec<u32>> = sel.item_sequences(&view).iter().map(|s| window(s, 4)).collect();
        let kept = validation.evaluate(&view, 10, 4, |users, out| score_shared(model, &seqs, users, 8, out)).unwrap();
        assert_eq!(kept.ndcg, stopping.best, "the best epoch's weights are the ones kept");
    }
}
