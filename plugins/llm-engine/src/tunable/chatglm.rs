//! ChatGLM2 / ChatGLM3 for training, written from THUDM's `modeling_chatglm.py`: RMSNorm
//! pre-norm blocks, one fused `query_key_value` projection with bias, multi-query attention
//! (`multi_query_group_num` key/value groups), rotary embedding on adjacent pairs of the first
//! half of each head, SwiGLU MLP (`dense_h_to_4h` holds gate and up), untied output layer.
//! Loads a Hugging Face checkpoint directory (config.json + safetensors shards).

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

use super::lora::LoraStack;
use super::ops;
use super::{Attend, CausalLm, Kv, ModuleInfo};

/// LoRA-targetable modules of every layer, as PEFT names them.
pub const MODULES: [&str; 4] = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"];

/// The config.json fields the model reads (names as THUDM spells them).
#[derive(Deserialize, Debug, Clone)]
pub struct ChatGlmConfig {
    pub num_layers: usize,
    pub padded_vocab_size: usize,
    pub hidden_size: usize,
    pub ffn_hidden_size: usize,
    pub kv_channels: usize,
    pub num_attention_heads: usize,
    pub seq_length: usize,
    pub layernorm_epsilon: f64,
    #[serde(default = "yes")]
    pub rmsnorm: bool,
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    #[serde(default = "yes")]
    pub post_layer_norm: bool,
    #[serde(default)]
    pub add_bias_linear: bool,
    #[serde(default = "yes")]
    pub add_qkv_bias: bool,
    #[serde(default)]
    pub multi_query_attention: bool,
    #[serde(default = "one")]
    pub multi_query_group_num: usize,
    #[serde(default = "one_f")]
    pub rope_ratio: f64,
    #[serde(default = "yes")]
    pub original_rope: bool,
}
fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}

struct Norm {
    w: Tensor,
    b: Option<Tensor>,
}

struct Layer {
    input_norm: Norm,
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    dense: Tensor,
    post_norm: Norm,
    h_to_4h: Tensor,
    four_h_to_h: Tensor,
}

pub struct ChatGlm {
    cfg: ChatGlmConfig,
    groups: usize,
    embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: Option<Norm>,
    output: Tensor,
    cos: Tensor,
    sin: Tensor,
    modules: Vec<ModuleInfo>,
}

fn take(tensors: &mut HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    let t = tensors
        .remove(name)
        .with_context(|| format!("checkpoint has no tensor `{name}`"))?;
    Ok(t.to_dtype(DType::F32)?)
}

/// RMSNorm has a weight only; LayerNorm (`rmsnorm = false`) a weight and a bias.
fn norm(tensors: &mut HashMap<String, Tensor>, prefix: &str, rms: bool) -> Result<Norm> {
    let w = take(tensors, &format!("{prefix}.weight"))?;
    let b = if rms {
        None
    } else {
        Some(take(tensors, &format!("{prefix}.bias"))?)
    };
    Ok(Norm { w, b })
}

/// The checkpoint's `*.safetensors` files (one, or the shards of a large model), in order.
pub fn weight_shards(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut shards: Vec<_> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    ensure!(!shards.is_empty(), "{} has no *.safetensors weights", dir.display());
    Ok(shards)
}

impl ChatGlm {
    /// Loads `dir/config.json` and every `*.safetensors` file of `dir` (shards included).
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let cfg: ChatGlmConfig =
            serde_json::from_str(&text).with_context(|| format!("{}", cfg_path.display()))?;
        let shards = weight_shards(dir)?;
        let mut tensors = HashMap::new();
        for s in &shards {
            tensors.extend(
                candle_core::safetensors::load(s, &Device::Cpu)
                    .with_context(|| format!("reading {}", s.display()))?,
            );
        }
        Self::from_tensors(cfg, tensors)
            .with_context(|| format!("loading ChatGLM from {}", dir.display()))
    }

    pub fn from_tensors(cfg: ChatGlmConfig, mut tensors: HashMap<String, Tensor>) -> Result<Self> {
        ensure!(
            !cfg.apply_residual_connection_post_layernorm,
            "apply_residual_connection_post_layernorm = true is not supported"
        );
        ensure!(cfg.original_rope, "original_rope = false is not supported");
        let embedding = take(&mut tensors, "transformer.embedding.word_embeddings.weight")?;
        let rms = cfg.rmsnorm;
        let mut layers = Vec::new();
        for i in 0..cfg.num_layers {
            let p = format!("transformer.encoder.layers.{i}");
            let t = &mut tensors;
            layers.push(Layer {
                input_norm: norm(t, &format!("{p}.input_layernorm"), rms)?,
                post_norm: norm(t, &format!("{p}.post_attention_layernorm"), rms)?,
                qkv: take(t, &format!("{p}.self_attention.query_key_value.weight"))?,
                qkv_bias: if cfg.add_qkv_bias {
                    Some(take(
                        t,
                        &format!("{p}.self_attention.query_key_value.bias"),
                    )?)
                } else {
                    None
                },
                dense: take(t, &format!("{p}.self_attention.dense.weight"))?,
                h_to_4h: take(t, &format!("{p}.mlp.dense_h_to_4h.weight"))?,
                four_h_to_h: take(t, &format!("{p}.mlp.dense_4h_to_h.weight"))?,
            });
        }
        let final_norm = if cfg.post_layer_norm {
            Some(norm(
                &mut tensors,
                "transformer.encoder.final_layernorm",
                rms,
            )?)
        } else {
            None
        };
        let output = take(&mut tensors, "transformer.output_layer.weight")?;
        ensure!(
            !cfg.add_bias_linear,
            "add_bias_linear = true is not supported"
        );
        let groups = if cfg.multi_query_attention {
            cfg.multi_query_group_num
        } else {
            cfg.num_attention_heads
        };
        let (h, hd) = (cfg.num_attention_heads, cfg.kv_channels);
        let qkv_out = (h + 2 * groups) * hd;
        ensure!(
            layers
                .iter()
                .all(|l| l.qkv.dims() == [qkv_out, cfg.hidden_size]),
            "query_key_value does not match config.json"
        );
        let m = |name, inputs, outputs| ModuleInfo {
            name,
            inputs,
            outputs,
        };
        let modules = vec![
            m("query_key_value", cfg.hidden_size, qkv_out),
            m("dense", h * hd, cfg.hidden_size),
            m("dense_h_to_4h", cfg.hidden_size, 2 * cfg.ffn_hidden_size),
            m("dense_4h_to_h", cfg.ffn_hidden_size, cfg.hidden_size),
        ];
        // modeling_chatglm: RotaryEmbedding(kv_channels // 2) rotates the first half of a head,
        // with base 10000 · rope_ratio.
        let rot = hd / 2;
        let (cos, sin) = ops::rope_tables(cfg.seq_length, rot / 2, rot, 10_000.0 * cfg.rope_ratio)?;
        Ok(Self {
            groups,
            embedding,
            layers,
            final_norm,
            output,
            cos,
            sin,
            modules,
            cfg,
        })
    }

    fn norm(&self, x: &Tensor, n: &Norm) -> Result<Tensor> {
        Ok(match &n.b {
            None => ops::rms_norm(x, &n.w, self.cfg.layernorm_epsilon)?,
            Some(b) => ops::layer_norm(x, &n.w, Some(b), self.cfg.layernorm_epsilon)?,
        })
    }
}

impl CausalLm for ChatGlm {
    fn family(&self) -> &'static str {
        "chatglm"
    }
    fn layers(&self) -> usize {
        self.layers.len()
    }
    fn modules(&self) -> &[ModuleInfo] {
        &self.modules
    }
    fn peft_key(&self, layer: usize, module: &str) -> String {
        let block = if module.starts_with("dense_") {
            "mlp"
        } else {
            "self_attention"
        };
        format!("base_model.model.transformer.encoder.layers.{layer}.{block}.{module}")
    }
    fn context(&self) -> usize {
        self.cfg.seq_length
    }
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    fn layer_kv(&self, i: usize, x: &Tensor, attend: Attend, lora: &LoraStack) -> Result<(Tensor, Kv)> {
        let (b, t, _) = x.dims3()?;
        let (h, g, hd) = (
            self.cfg.num_attention_heads,
            self.groups,
            self.cfg.kv_channels,
        );
        let rot = hd / 2;
        let (cos, sin) = attend.rotary(&self.cos, &self.sin, t, self.cfg.seq_length)?;
        let l = &self.layers[i];
        let n = self.norm(x, &l.input_norm)?;
        let qkv = lora.apply(
            i,
            "query_key_value",
            &n,
            ops::linear(&n, &l.qkv, l.qkv_bias.as_ref())?,
        )?;
        let split = |start: usize, count: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, start * hd, count * hd)?
                .reshape((b, t, count, hd))?
                .transpose(1, 2)?)
        };
        let q = ops::rope_pairs_prefix(&split(0, h)?, &cos, &sin, rot)?;
        let k = ops::rope_pairs_prefix(&split(h, g)?, &cos, &sin, rot)?;
        let v = split(h + g, g)?;
        let attn = attend.attention(&q, &k, &v)?;
        let x = (x + lora.apply(i, "dense", &attn, ops::linear(&attn, &l.dense, None)?)?)?;
        let n = self.norm(&x, &l.post_norm)?;
        let up = lora.apply(i, "dense_h_to_4h", &n, ops::linear(&n, &l.h_to_4h, None)?)?;
        let f = self.cfg.ffn_hidden_size;
        let act = ops::swiglu(&up.narrow(2, 0, f)?, &up.narrow(2, f, f)?)?;
        let out = (x + lora.apply(
            i,
            "dense_4h_to_h",
            &act,
            ops::linear(&act, &l.four_h_to_h, None)?,
        )?)?;
        Ok((out, Kv { k, v }))
    }

    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.final_norm {
            Some(n) => self.norm(x, n)?,
            None => x.clone(),
        })
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(ops::linear(hidden, &self.output, None)?)
    }
}

/// Writes a ChatGLM checkpoint directory with random weights: config.json (`cfg`),
/// model.safetensors and a word-level tokenizer.json over `words` (id 0 `[UNK]`, id 1 `</s>`,
/// the end of every answer). For tests and for trying the tuner without a real checkpoint.
pub fn write_random_checkpoint(
    dir: &Path,
    cfg: &ChatGlmConfig,
    words: &[&str],
    seed: u64,
) -> Result<()> {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    ensure!(
        words.len() + 2 <= cfg.padded_vocab_size,
        "vocabulary larger than padded_vocab_size"
    );
    std::fs::create_dir_all(dir)?;
    let mut rng = recfuse_sdk::SeededRng::new(seed);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut add = |name: String, shape: &[usize], scale: f64, offset: f32| -> Result<()> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.normal() * scale) as f32 + offset)
            .collect();
        tensors.push((name, Tensor::from_vec(v, shape, &Device::Cpu)?));
        Ok(())
    };
    let (d, f) = (cfg.hidden_size, cfg.ffn_hidden_size);
    let groups = if cfg.multi_query_attention {
        cfg.multi_query_group_num
    } else {
        cfg.num_attention_heads
    };
    let qkv = (cfg.num_attention_heads + 2 * groups) * cfg.kv_channels;
    let s = 1.0 / (d as f64).sqrt();
    add(
        "transformer.embedding.word_embeddings.weight".into(),
        &[cfg.padded_vocab_size, d],
        1.0,
        0.0,
    )?;
    for i in 0..cfg.num_layers {
        let p = format!("transformer.encoder.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), &[d], 0.1, 1.0)?;
        add(
            format!("{p}.self_attention.query_key_value.weight"),
            &[qkv, d],
            s,
            0.0,
        )?;
        add(
            format!("{p}.self_attention.query_key_value.bias"),
            &[qkv],
            0.1,
            0.0,
        )?;
        add(
            format!("{p}.self_attention.dense.weight"),
            &[d, cfg.num_attention_heads * cfg.kv_channels],
            s,
            0.0,
        )?;
        add(
            format!("{p}.post_attention_layernorm.weight"),
            &[d],
            0.1,
            1.0,
        )?;
        add(format!("{p}.mlp.dense_h_to_4h.weight"), &[2 * f, d], s, 0.0)?;
        add(
            format!("{p}.mlp.dense_4h_to_h.weight"),
            &[d, f],
            1.0 / (f as f64).sqrt(),
            0.0,
        )?;
    }
    add(
        "transformer.encoder.final_layernorm.weight".into(),
        &[d],
        0.1,
        1.0,
    )?;
    add(
        "transformer.output_layer.weight".into(),
        &[cfg.padded_vocab_size, d],
        s,
        0.0,
    )?;
    super::lora::write_safetensors(
        &dir.join("model.safetensors"),
        &tensors,
        &[("format", "pt")],
    )?;
    let config = serde_json::json!({
        "model_type": "chatglm",
        "num_layers": cfg.num_layers,
        "padded_vocab_size": cfg.padded_vocab_size,
        "hidden_size": d,
        "ffn_hidden_size": f,
        "kv_channels": cfg.kv_channels,
        "num_attention_heads": cfg.num_attention_heads,
        "seq_length": cfg.seq_length,
        "layernorm_epsilon": cfg.layernorm_epsilon,
        "rmsnorm": cfg.rmsnorm,
        "add_qkv_bias": true,
        "multi_query_attention": cfg.multi_query_attention,
        "multi_query_group_num": cfg.multi_query_group_num,
        "rope_ratio": cfg.rope_ratio,
        "eos_token_id": 1,
        "pad_token_id": 0,
    });
    super::lora::write_file(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let mut vocab: std::collections::HashMap<String, u32> =
        [("[UNK]".to_string(), 0), ("</s>".to_string(), 1)].into();
    for w in words {
        let next = vocab.len() as u32;
        vocab.entry(w.to_string()).or_insert(next);
    }
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .map_err(anyhow::Error::msg)?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.save(dir.join("tokenizer.json"), false)
        .map_err(anyhow::Error::msg)?;
    Ok(())
}

impl ChatGlmConfig {
    /// A tiny configuration for tests: 2 layers, hidden 32, 4 heads of 8 over 2 key/value groups.
    pub fn tiny(vocab: usize) -> Self {
        Self {
            num_layers: 2,
            padded_vocab_size: vocab,
            hidden_size: 32,
            ffn_hidden_size: 48,
            kv_channels: 8,
            num_attention_heads: 4,
            seq_length: 512,
            layernorm_epsilon: 1e-5,
            rmsnorm: true,
            apply_residual_connection_post_layernorm: false,
            post_layer_norm: true,
            add_bias_linear: false,
            add_qkv_bias: true,
            multi_query_attention: true,
            multi_query_group_num: 2,
            rope_ratio: 1.0,
            original_rope: true,
        }
    }
}
