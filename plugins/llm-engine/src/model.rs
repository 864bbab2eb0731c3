//! A llama-architecture decoder (SmolLM2, Llama, ...) over quantized GGUF weights, written for
//! batched generation: prompts of different lengths are left-padded into one batch, padding is
//! masked out of attention, and finished rows leave the batch and its KV cache.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;

use crate::decode_attention;
use crate::q8::{Isa, PackedQ8};
use crate::tokenizer::meta;

pub struct Hyper {
    pub layers: usize,
    pub dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub context: usize,
    pub eps: f64,
    pub rope_base: f32,
}

/// How the engine multiplies by its weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Our blocked int8 kernel ([`PackedQ8`]) for every row count, decoding and prefill alike:
    /// weights re-quantized to 8 bits in blocks of 32 (1.1 bytes each), activations quantized
    /// per row as llama.cpp does; with AVX512-VNNI, or AVX2 where that is missing.
    Int8(Isa),
    /// candle's kernels: its quantized matmul for a few rows (memory-bound: fewer bytes win)
    /// and, when `dense`, an f32 copy of the weights for prefill and batches wider than 8 rows
    /// (compute-bound: candle's quantized kernels do one dot product per row, its f32 GEMM is
    /// ~2-3× faster there), at 4 bytes per weight of extra memory.
    Candle { dense: bool },
}

impl Kernel {
    /// The fastest kernel this CPU runs: [`Kernel::Int8`] with the best instruction set it has
    /// (AVX512-VNNI, else AVX2), else candle's (`dense`: may spend memory on f32 copies).
    pub fn best(dense: bool) -> Self {
        match Isa::best() {
            Some(isa) => Kernel::Int8(isa),
            None => Kernel::Candle { dense },
        }
    }

    /// A kernel by its name in configs and flags: `auto` ([`Kernel::best`]), `int8` (the best
    /// instruction set), `int8-avx2` (AVX2 even where AVX512-VNNI exists) or `candle`.
    pub fn named(name: &str, dense: bool) -> Result<Self> {
        let int8 = |isa: Option<Isa>, needs: &str| match isa.filter(|i| i.supported()) {
            Some(isa) => Ok(Self::Int8(isa)),
            None => bail!("kernel {name:?} needs a CPU with {needs}, which this one lacks (use \"auto\" or \"candle\")"),
        };
        match name {
            "auto" => Ok(Self::best(dense)),
            "int8" => int8(Isa::best(), "AVX512-VNNI or AVX2"),
            "int8-avx2" => int8(Some(Isa::Avx2), "AVX2"),
            "candle" => Ok(Self::Candle { dense }),
            other => bail!("unknown kernel {other:?}: expected \"auto\", \"int8\", \"int8-avx2\" or \"candle\""),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Kernel::Int8(Isa::Vnni) => "int8 (AVX512-VNNI)",
            Kernel::Int8(Isa::Avx2) => "int8 (AVX2)",
            Kernel::Candle { .. } => "candle",
        }
    }
}

/// A projection in the form its [`Kernel`] multiplies.
enum Linear {
    Q8(PackedQ8),
    Candle { quantized: QMatMul, dense: Option<Tensor> },
}

/// Rows (batch × positions) above which candle's dense copy is used.
const DENSE_ROWS: usize = 8;

impl Linear {
    fn new(t: QTensor, kernel: Kernel) -> Result<Self> {
        match kernel {
            Kernel::Int8(isa) => {
                let (n, k) = t.shape().dims2()?;
                let w = t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(Self::Q8(PackedQ8::from_f32(&w, n, k, isa)?))
            }
            Kernel::Candle { dense } => {
                let t = fast_format(t)?;
                let dense = if dense { Some(t.dequantize(&Device::Cpu)?) } else { None };
                Ok(Self::Candle { quantized: QMatMul::from_qtensor(t)?, dense })
            }
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
        Ok(match self {
            Self::Q8(w) => {
                let mut dims = x.dims().to_vec();
                *dims.last_mut().expect("a matrix") = w.rows();
                let mut out = vec![0f32; rows * w.rows()];
                with_values(&x.contiguous()?, |input| w.matmul(input, rows, &mut out))?;
                Tensor::from_vec(out, dims, x.device())?
            }
            Self::Candle { dense: Some(w), .. } if rows > DENSE_ROWS => x.broadcast_matmul(&w.t()?)?,
            Self::Candle { quantized, .. } => quantized.forward(x)?,
        })
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Q8(w) => w.bytes(),
            Self::Candle { quantized: QMatMul::QTensor(t), .. } => t.storage_size_in_bytes(),
            Self::Candle { quantized: QMatMul::Tensor(t) | QMatMul::TensorF16(t), .. } => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Model {
    pub hyper: Hyper,
    embedding: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    /// Rotary frequency of each pair of a head's dimensions.
    inv_freq: Vec<f32>,
    device: Device,
}

/// Per-layer keys and values of the rows in the batch, in buffers `[rows, kv_heads, capacity,
/// head_dim]` allocated once and written in place (appending by concatenation copied the whole
/// cache every step).
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    /// Left padding of each row; keys before it are masked.
    pads: Vec<usize>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Reallocates the buffers for `capacity` columns, keeping what they hold.
    pub fn grow(&mut self, capacity: usize) -> Result<()> {
        if capacity <= self.capacity {
            return Ok(());
        }
        for layer in self.layers.iter_mut() {
            for buf in [&mut layer.0, &mut layer.1] {
                let (rows, heads, _, hd) = buf.dims4()?;
                let bigger = Tensor::zeros((rows, heads, capacity, hd), buf.dtype(), buf.device())?;
                bigger.slice_set(&buf.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                *buf = bigger;
            }
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Appends the rows of `other`, a cache of the same length and capacity (a prompt prefilled
    /// on its own to join a running batch).
    pub fn append_rows(&mut self, other: KvCache) -> Result<()> {
        anyhow::ensure!(other.len == self.len && other.capacity == self.capacity, "caches of different lengths cannot be joined");
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            mine.0 = Tensor::cat(&[&mine.0, &theirs.0], 0)?;
            mine.1 = Tensor::cat(&[&mine.1, &theirs.1], 0)?;
        }
        self.pads.extend(other.pads);
        Ok(())
    }

    /// Every layer's keys and values of row `row`, columns `cols` (`1 × kv_heads × cols × head_dim`
    /// each), copied out.
    pub fn copy_row(&self, row: usize, cols: std::ops::Range<usize>) -> Result<Vec<(Tensor, Tensor)>> {
        anyhow::ensure!(cols.end <= self.len, "columns {cols:?} past the {} filled", self.len);
        let take = |b: &Tensor| -> Result<Tensor> { Ok(b.narrow(0, row, 1)?.narrow(2, cols.start, cols.len())?.contiguous()?) };
        self.layers.iter().map(|(k, v)| Ok((take(k)?, take(v)?))).collect()
    }

    /// Writes keys and values (as [`KvCache::copy_row`] gives them) into row `row` from column `at`.
    pub fn write_row(&mut self, row: usize, at: usize, kv: &[(Tensor, Tensor)]) -> Result<()> {
        anyhow::ensure!(kv.len() == self.layers.len(), "keys and values of {} layers for a cache of {}", kv.len(), self.layers.len());
        for ((kb, vb), (k, v)) in self.layers.iter().zip(kv) {
            anyhow::ensure!(at + k.dim(2)? <= self.capacity, "writing past the cache capacity");
            kb.narrow(0, row, 1)?.slice_set(&k.contiguous()?, 2, at)?;
            vb.narrow(0, row, 1)?.slice_set(&v.contiguous()?, 2, at)?;
        }
        Ok(())
    }

    /// Declares the first `len` columns filled (by [`KvCache::write_row`], or padding that every
    /// query masks), so the next forward pass starts after them.
    pub fn skip_to(&mut self, len: usize) -> Result<()> {
        anyhow::ensure!(self.len == 0 && len <= self.capacity, "skip_to works on a fresh cache within its capacity");
        self.len = len;
        Ok(())
    }

    /// Keeps only the given rows (in that order).
    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        let index = Tensor::new(keep.iter().map(|&r| r as u32).collect::<Vec<_>>(), &Device::Cpu)?;
        for layer in self.layers.iter_mut() {
            layer.0 = layer.0.index_select(&index, 0)?;
            layer.1 = layer.1.index_select(&index, 0)?;
        }
        self.pads = keep.iter().map(|&r| self.pads[r]).collect();
        // Columns that are padding for every remaining row are dead weight: drop them (the
        // buffers keep their capacity, so the freed columns are at the end).
        let common = self.pads.iter().copied().min().unwrap_or(0);
        if common > 0 {
            for layer in self.layers.iter_mut() {
                for buf in [&mut layer.0, &mut layer.1] {
                    let live = buf.narrow(2, common, self.len - common)?;
                    let fresh = buf.zeros_like()?;
                    fresh.slice_set(&live.contiguous()?, 2, 0)?;
                    *buf = fresh;
                }
            }
            self.pads.iter_mut().for_each(|p| *p -= common);
            self.len -= common;
        }
        Ok(())
    }
}

/// Runs `f` on the values of a contiguous f32 CPU tensor, without copying them.
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    anyhow::ensure!(t.is_contiguous(), "expected a contiguous tensor");
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { bail!("the engine runs on the CPU") };
    Ok(f(&cpu.as_slice::<f32>()?[layout.start_offset()..][..t.elem_count()]))
}

/// candle has SIMD kernels for Q4_0, Q8_0 and the K-quants only; Q4_1/Q5_0/Q5_1 fall back to
/// scalar code (Q4_1: 4× slower here, docs/benchmarks.md). Re-quantizing those to Q8_0 at load
/// keeps nearly all the precision the file has and runs on the SIMD path.
fn fast_format(t: QTensor) -> Result<QTensor> {
    use candle_core::quantized::GgmlDType::*;
    match t.dtype() {
        Q4_1 | Q5_0 | Q5_1 => Ok(QTensor::quantize(&t.dequantize(&Device::Cpu)?, Q8_0)?),
        _ => Ok(t),
    }
}

impl Model {
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(content: &Content, reader: &mut R, kernel: Kernel) -> Result<Self> {
        let arch = meta(content, "general.architecture")?.to_string()?.clone();
        if arch != "llama" {
            bail!("general.architecture = {arch:?}: only llama-architecture models are supported");
        }
        let u = |key: &str| -> Result<usize> {
            Ok(meta(content, &format!("llama.{key}"))?.to_u32().with_context(|| key.to_string())? as usize)
        };
        let dim = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let hyper = Hyper {
            layers: u("block_count")?,
            dim,
            heads,
            kv_heads: u("attention.head_count_kv")?,
            head_dim: dim / heads,
            context: u("context_length")?,
            eps: meta(content, "llama.attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            rope_base: content
                .metadata
                .get("llama.rope.freq_base")
                .map(|v| v.to_f32())
                .transpose()?
                .unwrap_or(10_000.0),
        };
        let device = Device::Cpu;
        let mut qt = |name: &str| -> Result<QTensor> {
            content.tensor(reader, name, &device).with_context(|| format!("GGUF tensor `{name}`"))
        };
        let embedding = Arc::new(qt("token_embd.weight")?);
        let norm = qt("output_norm.weight")?.dequantize(&device)?;
        // Models with tied embeddings (SmolLM2) have no output.weight.
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => Linear::new(qt("output.weight")?, kernel)?,
            false => Linear::new(qt("token_embd.weight")?, kernel)?,
        };
        let mut layers = Vec::with_capacity(hyper.layers);
        for i in 0..hyper.layers {
            let mut m = |w: &str| Linear::new(qt(&format!("blk.{i}.{w}.weight"))?, kernel);
            layers.push(Layer {
                q: m("attn_q")?,
                k: m("attn_k")?,
                v: m("attn_v")?,
                o: m("attn_output")?,
                gate: m("ffn_gate")?,
                up: m("ffn_up")?,
                down: m("ffn_down")?,
                attn_norm: qt(&format!("blk.{i}.attn_norm.weight"))?.dequantize(&device)?,
                ffn_norm: qt(&format!("blk.{i}.ffn_norm.weight"))?.dequantize(&device)?,
            });
        }
        let half = hyper.head_dim / 2;
        let inv: Vec<f32> =
            (0..half).map(|i| 1.0 / hyper.rope_base.powf(2.0 * i as f32 / hyper.head_dim as f32)).collect();
        let inv_freq = inv.clone();
        let inv = Tensor::from_vec(inv, (1, half), &device)?;
        let pos = Tensor::arange(0u32, hyper.context as u32, &device)?.to_dtype(DType::F32)?.reshape((hyper.context, 1))?;
        let freqs = pos.broadcast_mul(&inv)?;
        Ok(Self { cos: freqs.cos()?, sin: freqs.sin()?, inv_freq, hyper, embedding, layers, norm, output, device })
    }

    /// A cache for rows with these left paddings, for sequences of at most `capacity` tokens.
    pub fn new_cache(&self, pads: Vec<usize>, capacity: usize) -> Result<KvCache> {
        let capacity = capacity.min(self.hyper.context);
        let shape = (pads.len(), self.hyper.kv_heads, capacity, self.hyper.head_dim);
        let layers = (0..self.hyper.layers)
            .map(|_| Ok((Tensor::zeros(shape, DType::F32, &self.device)?, Tensor::zeros(shape, DType::F32, &self.device)?)))
            .collect::<Result<_>>()?;
        Ok(KvCache { layers, pads, len: 0, capacity })
    }

    /// The first `n` columns of stored keys and values (per layer, `1 × kv_heads × cols ×
    /// head_dim`, rotary positions applied), moved `delta` positions: rotary embeddings are
    /// rotations, so a key computed at column `c` becomes the key of the same token at
    /// `c + delta` by rotating it `delta` positions further (one rotation, built once, for every
    /// layer); values do not depend on position.
    pub fn move_kv(&self, kv: &[(Tensor, Tensor)], n: usize, delta: i64) -> Result<Vec<(Tensor, Tensor)>> {
        let angles: Vec<f32> = self.inv_freq.iter().map(|f| delta as f32 * f).collect();
        let row = |f: fn(f32) -> f32| Tensor::from_vec(angles.iter().map(|&a| f(a)).collect::<Vec<_>>(), (1, angles.len()), &self.device)?.repeat((n, 1));
        let rotation = if delta == 0 { None } else { Some((row(f32::cos)?, row(f32::sin)?)) };
        kv.iter()
            .map(|(k, v)| {
                let k = k.narrow(2, 0, n)?;
                let k = match &rotation {
                    Some((cos, sin)) => candle_nn::rotary_emb::rope_i(&k.contiguous()?, cos, sin)?,
                    None => k,
                };
                Ok((k, v.narrow(2, 0, n)?))
            })
            .collect()
    }

    /// Runs `tokens` (`rows × t`, the same `t` for every row) after what the cache holds and
    /// returns the logits of each row's last position (`rows × vocab`).
    ///
    /// Positions are batch columns: a row left-padded by `p` sees its tokens at `p, p+1, ...`,
    /// which rotary embeddings make equivalent to `0, 1, ...` (only differences matter).
    pub fn forward(&self, tokens: &[Vec<u32>], cache: &mut KvCache) -> Result<Tensor> {
        let rows = tokens.len();
        let t = tokens[0].len();
        let start = cache.len;
        if start + t > cache.capacity {
            bail!("sequence of {} tokens exceeds the cache capacity of {} (model context {})", start + t, cache.capacity, self.hyper.context);
        }
        let flat: Vec<u32> = tokens.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, rows * t, &self.device)?;
        let mut x = self.embedding.embedding(&ids)?.reshape((rows, t, self.hyper.dim))?;
        // Decoding (t = 1) attends without a mask tensor (see decode_attention).
        let mask = if t > 1 { Some(self.mask(&cache.pads, start, t)?) } else { None };
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let (h, kvh, hd) = (self.hyper.heads, self.hyper.kv_heads, self.hyper.head_dim);
        for (layer, (kb, vb)) in self.layers.iter().zip(cache.layers.iter()) {
            let residual = &x;
            let n = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.hyper.eps as f32)?;
            let heads = |w: &Linear, count: usize| -> Result<Tensor> {
                Ok(w.forward(&n)?.reshape((rows, t, count, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let q = candle_nn::rotary_emb::rope_i(&heads(&layer.q, h)?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&heads(&layer.k, kvh)?, &cos, &sin)?;
            let v = heads(&layer.v, kvh)?;
            kb.slice_set(&k, 2, start)?;
            vb.slice_set(&v, 2, start)?;
            let attn = if t == 1 {
                // Decoding: one query per row, attended in place over the cache buffers.
                let shape = decode_attention::Shape { rows, heads: h, kv_heads: kvh, head_dim: hd, capacity: cache.capacity, len: start + 1 };
                let mut out = vec![0f32; rows * h * hd];
                let pads = &cache.pads;
                with_values(&q, |q| with_values(kb, |k| with_values(vb, |v| decode_attention::attend(&shape, q, k, v, pads, &mut out))))???;
                Tensor::from_vec(out, (rows, 1, h * hd), &self.device)?
            } else {
                self.prefill_attention(&q, kb, vb, mask.as_ref().expect("built when t > 1"), start, t)?
            };
            x = (residual + layer.o.forward(&attn)?)?;
            let n = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.hyper.eps as f32)?;
            let mlp = layer.down.forward(&(layer.gate.forward(&n)?.silu()? * layer.up.forward(&n)?)?)?;
            x = (x + mlp)?;
        }
        cache.len += t;
        let last = x.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, self.hyper.eps as f32)?;
        Ok(self.output.forward(&last)?)
    }

    /// Attention of `t` new positions per row over the cache's first `start + t` columns
    /// (prefill), with candle's ops; `mask` from [`Model::mask`].
    fn prefill_attention(&self, q: &Tensor, kb: &Tensor, vb: &Tensor, mask: &Tensor, start: usize, t: usize) -> Result<Tensor> {
        let (h, kvh, hd) = (self.hyper.heads, self.hyper.kv_heads, self.hyper.head_dim);
        let rows = q.dim(0)?;
        let (k, v) = (kb.narrow(2, 0, start + t)?, vb.narrow(2, 0, start + t)?);
        // Grouped-query attention: each kv head serves h / kvh query heads, so fold the
        // query groups into the row axis instead of copying keys and values.
        let group = h / kvh;
        let q = q.reshape((rows, kvh, group * t, hd))?;
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let scores = scores.reshape((rows, kvh, group, t, start + t))?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.reshape((rows, kvh, group * t, start + t))?)?;
        Ok(probs.matmul(&v)?.reshape((rows, h, t, hd))?.transpose(1, 2)?.reshape((rows, t, h * hd))?)
    }

    /// Additive mask `rows × 1 × 1 × t × (start+t)`: a query sees earlier-or-same columns that are
    /// not its row's padding. A padding query also sees itself, so that no softmax row is empty.
    fn mask(&self, pads: &[usize], start: usize, t: usize) -> Result<Tensor> {
        let total = start + t;
        let mut m = vec![0f32; pads.len() * t * total];
        for (r, &pad) in pads.iter().enumerate() {
            for i in 0..t {
                let col = start + i;
                for j in 0..total {
                    if j > col || (j < pad && j != col) {
                        m[(r * t + i) * total + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (pads.len(), 1, 1, t, total), &self.device)?)
    }

    /// Bytes of quantized weights one decoding step reads.
    pub fn weight_bytes(&self) -> usize {
        let layer = |l: &Layer| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down].iter().map(|w| w.bytes()).sum::<usize>();
        self.layers.iter().map(layer).sum::<usize>() + self.output.bytes()
    }
}
