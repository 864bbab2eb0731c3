//! The Llama family (SmolLM2, Llama, ...) for training: the GGUF's weights dequantized to f32 and
//! put back into Hugging Face's layout (llama.cpp permutes the Q and K rows for its interleaved
//! rotary embedding; transformers un-permutes them on load, and so do we), so adapters trained
//! here are PEFT adapters of the Hugging Face model.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};

use super::lora::LoraStack;
use super::ops;
use super::{Attend, CausalLm, Kv, ModuleInfo};
use crate::tokenizer::meta;

struct Layer {
    attn_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    ffn_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

pub struct Llama {
    layers: Vec<Layer>,
    embedding: Tensor,
    norm: Tensor,
    /// `None`: tied to the embedding (SmolLM2).
    output: Option<Tensor>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    context: usize,
    cos: Tensor,
    sin: Tensor,
    modules: Vec<ModuleInfo>,
}

/// Undoes llama.cpp's `permute` of a Q or K weight (`[heads·hd, in]`): GGUF row order is
/// `(head, hd/2, 2)`, Hugging Face's is `(head, 2, hd/2)`.
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((heads, out / heads / 2, 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?
        .contiguous()?)
}

/// LoRA-targetable modules of every layer, as PEFT names them.
pub const MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The shape of a Llama model, for [`Llama::random`].
#[derive(Clone, Debug)]
pub struct LlamaDims {
    pub layers: usize,
    pub dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub context: usize,
}

impl Llama {
    /// A model with random weights (tests, benchmarks of shapes without a file).
    pub fn random(d: &LlamaDims, rng: &mut recfuse_sdk::SeededRng) -> Result<Self> {
        let mut w = |rows: usize, cols: usize, scale: f64| -> Result<Tensor> {
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| (rng.normal() * scale) as f32)
                .collect();
            Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
        };
        let hd = d.dim / d.heads;
        let s = 1.0 / (d.dim as f64).sqrt();
        let mut layers = Vec::new();
        for _ in 0..d.layers {
            layers.push(Layer {
                attn_norm: (w(1, d.dim, 0.1)?.squeeze(0)? + 1.0)?,
                q: w(d.dim, d.dim, s)?,
                k: w(d.kv_heads * hd, d.dim, s)?,
                v: w(d.kv_heads * hd, d.dim, s)?,
                o: w(d.dim, d.dim, s)?,
                ffn_norm: (w(1, d.dim, 0.1)?.squeeze(0)? + 1.0)?,
                gate: w(d.ffn, d.dim, s)?,
                up: w(d.ffn, d.dim, s)?,
                down: w(d.dim, d.ffn, 1.0 / (d.ffn as f64).sqrt())?,
            });
        }
        let embedding = w(d.vocab, d.dim, 1.0)?;
        let norm = (w(1, d.dim, 0.1)?.squeeze(0)? + 1.0)?;
        Self::assemble(
            layers, embedding, norm, None, d.heads, d.kv_heads, 1e-5, d.context, 10_000.0,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        layers: Vec<Layer>,
        embedding: Tensor,
        norm: Tensor,
        output: Option<Tensor>,
        heads: usize,
        kv_heads: usize,
        eps: f64,
        context: usize,
        rope_base: f64,
    ) -> Result<Self> {
        let dim = embedding.dim(1)?;
        let head_dim = dim / heads;
        let ffn = layers[0].gate.dim(0)?;
        let kv = kv_heads * head_dim;
        let m = |name, inputs, outputs| ModuleInfo {
            name,
            inputs,
            outputs,
        };
        let modules = vec![
            m("q_proj", dim, dim),
            m("k_proj", dim, kv),
            m("v_proj", dim, kv),
            m("o_proj", dim, dim),
            m("gate_proj", dim, ffn),
            m("up_proj", dim, ffn),
            m("down_proj", ffn, dim),
        ];
        let (cos, sin) = ops::rope_tables(context, head_dim / 2, head_dim, rope_base)?;
        Ok(Self {
            layers,
            embedding,
            norm,
            output,
            heads,
            kv_heads,
            head_dim,
            eps,
            context,
            cos,
            sin,
            modules,
        })
    }

    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        content: &Content,
        reader: &mut R,
    ) -> Result<Self> {
        let arch = meta(content, "general.architecture")?.to_string()?.clone();
        if arch != "llama" {
            bail!(
                "general.architecture = {arch:?}: only llama-architecture GGUF models can be tuned"
            );
        }
        let u = |key: &str| -> Result<usize> {
            Ok(meta(content, &format!("llama.{key}"))?
                .to_u32()
                .with_context(|| key.to_string())? as usize)
        };
        let (heads, kv_heads) = (u("attention.head_count")?, u("attention.head_count_kv")?);
        let context = u("context_length")?;
        let rope_base = content
            .metadata
            .get("llama.rope.freq_base")
            .map(|v| v.to_f32())
            .transpose()?
            .unwrap_or(10_000.0);
        let eps = meta(content, "llama.attention.layer_norm_rms_epsilon")?.to_f32()? as f64;
        let mut t = |name: &str| -> Result<Tensor> {
            let q = content
                .tensor(reader, name, &Device::Cpu)
                .with_context(|| format!("GGUF tensor `{name}`"))?;
            Ok(q.dequantize(&Device::Cpu)?)
        };
        let embedding = t("token_embd.weight")?;
        let output = if content.tensor_infos.contains_key("output.weight") {
            Some(t("output.weight")?)
        } else {
            None
        };
        let norm = t("output_norm.weight")?;
        let mut layers = Vec::new();
        for i in 0..u("block_count")? {
            let mut w = |name: &str| t(&format!("blk.{i}.{name}.weight"));
            layers.push(Layer {
                attn_norm: w("attn_norm")?,
                q: unpermute(&w("attn_q")?, heads)?,
                k: unpermute(&w("attn_k")?, kv_heads)?,
                v: w("attn_v")?,
                o: w("attn_output")?,
                ffn_norm: w("ffn_norm")?,
                gate: w("ffn_gate")?,
                up: w("ffn_up")?,
                down: w("ffn_down")?,
            });
        }
        Self::assemble(
            layers,
            embedding,
            norm,
            output,
            heads,
            kv_heads,
            eps,
            context,
            rope_base as f64,
        )
    }
}

impl CausalLm for Llama {
    fn family(&self) -> &'static str {
        "llama"
    }
    fn layers(&self) -> usize {
        self.layers.len()
    }
    fn modules(&self) -> &[ModuleInfo] {
        &self.modules
    }
    fn peft_key(&self, layer: usize, module: &str) -> String {
        let block = if matches!(module, "gate_proj" | "up_proj" | "down_proj") {
            "mlp"
        } else {
            "self_attn"
        };
        format!("base_model.model.model.layers.{layer}.{block}.{module}")
    }
    fn context(&self) -> usize {
        self.context
    }
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.embedding.dim(1)?))?)
    }

    fn layer_kv(&self, i: usize, x: &Tensor, attend: Attend, lora: &LoraStack) -> Result<(Tensor, Kv)> {
        let (b, t, _) = x.dims3()?;
        let (cos, sin) = attend.rotary(&self.cos, &self.sin, t, self.context)?;
        let hd = self.head_dim;
        let l = &self.layers[i];
        let lin =
            |x: &Tensor, w: &Tensor, name: &str| lora.apply(i, name, x, ops::linear(x, w, None)?);
        let n = ops::rms_norm(x, &l.attn_norm, self.eps)?;
        let heads = |w: &Tensor, name: &str, count: usize| -> Result<Tensor> {
            Ok(lin(&n, w, name)?
                .reshape((b, t, count, hd))?
                .transpose(1, 2)?)
        };
        let q = ops::rope_half(&heads(&l.q, "q_proj", self.heads)?, &cos, &sin)?;
        let k = ops::rope_half(&heads(&l.k, "k_proj", self.kv_heads)?, &cos, &sin)?;
        let v = heads(&l.v, "v_proj", self.kv_heads)?;
        let attn = attend.attention(&q, &k, &v)?;
        let x = (x + lin(&attn, &l.o, "o_proj")?)?;
        let n = ops::rms_norm(&x, &l.ffn_norm, self.eps)?;
        let mlp = ops::swiglu(&lin(&n, &l.gate, "gate_proj")?, &lin(&n, &l.up, "up_proj")?)?;
        Ok(((x + lin(&mlp, &l.down, "down_proj")?)?, Kv { k, v }))
    }

    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::rms_norm(x, &self.norm, self.eps)?)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(ops::linear(
            hidden,
            self.output.as_ref().unwrap_or(&self.embedding),
            None,
        )?)
    }
}
