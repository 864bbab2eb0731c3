//! Trainable causal LMs for instruction tuning: f32 models written from differentiable ops
//! ([`ops`]), LoRA adapters ([`lora`]), and the base-model bundle ([`Base`]) that renders an
//! instruction into prompt and answer tokens the same way for training and for scoring.
//!
//! Families: Llama (from a GGUF file, e.g. SmolLM2) and ChatGLM2/3 (from a Hugging Face
//! checkpoint directory). Both take input embeddings as well as token ids, so soft tokens
//! (collaborative embeddings mapped into the token space) can replace placeholder tokens.

pub mod chatglm;
pub mod fused;
pub mod llama;
pub mod lora;
pub mod ops;
pub mod score;

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor, Var};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

use crate::tokenizer::{meta, GgufTokenizer};
use crate::Message;
use lora::LoraStack;

/// A linear module LoRA can target, as PEFT names it, with its shape.
#[derive(Clone, Debug)]
pub struct ModuleInfo {
    pub name: &'static str,
    pub inputs: usize,
    pub outputs: usize,
}

/// A decoder-only LM whose forward is differentiable end to end. Base weights are plain
/// tensors (no gradient is computed for them); only adapters are variables.
pub trait CausalLm: Send + Sync {
    /// `llama` or `chatglm`.
    fn family(&self) -> &'static str;
    fn layers(&self) -> usize;
    /// The linear modules of every layer.
    fn modules(&self) -> &[ModuleInfo];
    /// PEFT's name of a module (`base_model.model.model.layers.3.self_attn.q_proj`).
    fn peft_key(&self, layer: usize, module: &str) -> String;
    fn context(&self) -> usize;
    /// Token embeddings `[b, t, dim]` of ids `[b, t]`.
    fn embed(&self, ids: &Tensor) -> Result<Tensor>;
    /// Transformer block `i` on hidden states `[b, t, dim]` at positions `0..t`.
    fn layer(&self, i: usize, x: &Tensor, lora: &LoraStack) -> Result<Tensor> {
        Ok(self.layer_kv(i, x, Attend::Causal, lora)?.0)
    }
    /// Transformer block `i` on hidden states `[b, t, dim]`, attending as `attend` says.
    /// Returns the output and this call's own keys and values (a prefix's, for later calls).
    fn layer_kv(&self, i: usize, x: &Tensor, attend: Attend, lora: &LoraStack) -> Result<(Tensor, Kv)>;
    /// The normalisation after the last block.
    fn final_norm(&self, x: &Tensor) -> Result<Tensor>;
    /// The final (normalised) hidden states `[b, t, dim]` of input embeddings `[b, t, dim]`,
    /// causally attended from position 0.
    fn hidden(&self, embeds: &Tensor, lora: &LoraStack) -> Result<Tensor> {
        check_context(self, embeds.dim(1)?)?;
        let mut x = embeds.clone();
        for i in 0..self.layers() {
            x = self.layer(i, &x, lora)?;
        }
        self.final_norm(&x)
    }
    /// Vocabulary logits of hidden states `[.., dim]`.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor>;
}

/// One block's rotated keys and values `[rows, kv_heads, positions, head_dim]`.
#[derive(Clone, Debug)]
pub struct Kv {
    pub k: Tensor,
    pub v: Tensor,
}

impl Kv {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.k.dim(2).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a block's tokens attend, and so where they sit.
#[derive(Clone, Copy)]
pub enum Attend<'a> {
    /// Each row causally over its own tokens, at positions `0..t`.
    Causal,
    /// One row of packed segments after a shared prefix whose keys and values (in this block)
    /// are `past`: see [`Packing`].
    Packed { past: &'a Kv, packing: &'a Packing },
}

/// Segments (e.g. candidates' prompt suffixes) packed into one row after a shared prefix of
/// `past` tokens: a segment's `j`-th token sits at position `past + j` and attends to the
/// prefix and to its own segment's tokens up to itself, never to another segment. No padding.
pub struct Packing {
    /// Position of every packed token `[n]`.
    pub positions: Tensor,
    /// First packed token of each token's segment.
    pub segment_start: std::sync::Arc<Vec<u32>>,
    /// The longest segment's last position + 1.
    pub end: usize,
}

impl Packing {
    pub fn new(past: usize, lengths: &[usize]) -> Result<Self> {
        let (mut positions, mut starts) = (Vec::new(), Vec::new());
        for &len in lengths {
            let start = starts.len() as u32;
            for j in 0..len {
                positions.push((past + j) as u32);
                starts.push(start);
            }
        }
        let n = positions.len();
        Ok(Self {
            positions: Tensor::from_vec(positions, n, &Device::Cpu)?,
            segment_start: std::sync::Arc::new(starts),
            end: past + lengths.iter().copied().max().unwrap_or(0),
        })
    }

    /// Rotary tables (`[positions, n]`) at the packed tokens' positions.
    fn rows(&self, table: &Tensor) -> Result<Tensor> {
        Ok(table.index_select(&self.positions, 0)?)
    }
}

impl Attend<'_> {
    /// The rotary tables for `t` tokens, checked against the context.
    fn rotary(&self, cos: &Tensor, sin: &Tensor, t: usize, context: usize) -> Result<(Tensor, Tensor)> {
        match self {
            Attend::Causal => {
                ensure!(t <= context, "{t} positions exceed the model context of {context}");
                Ok((cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?))
            }
            Attend::Packed { packing, .. } => {
                ensure!(packing.end <= context, "{} positions exceed the model context of {context}", packing.end);
                Ok((packing.rows(cos)?, packing.rows(sin)?))
            }
        }
    }

    /// The attention of `q`, `k`, `v` (as [`ops::causal_attention`] takes them).
    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Attend::Causal => ops::causal_attention(q, k, v)?,
            Attend::Packed { past, packing } => ops::packed_attention(q, k, v, past, packing)?,
        })
    }
}

/// The family of the model at `path` (`llama` or `chatglm`) and its LoRA-targetable module
/// names, read from the GGUF metadata or config.json only (no weights): lets a config be
/// checked before a run loads the model.
pub fn family_of(path: &Path) -> Result<(&'static str, &'static [&'static str])> {
    if path.is_dir() {
        let config_path = path.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("{} is a directory without config.json: not a checkpoint", path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", config_path.display()))?;
        return match config.get("model_type").and_then(|v| v.as_str()) {
            Some("chatglm") => Ok(("chatglm", &chatglm::MODULES)),
            other => bail!("{}: model_type {other:?}; checkpoint directories of `chatglm` (ChatGLM2/3) are supported, Llama-family models load from GGUF", config_path.display()),
        };
    }
    let mut file = std::fs::File::open(path).with_context(|| format!("opening model {}", path.display()))?;
    let content = Content::read(&mut file)
        .with_context(|| format!("{} is not a GGUF file (a checkpoint directory with config.json also works)", path.display()))?;
    match meta(&content, "general.architecture")?.to_string()?.as_str() {
        "llama" => Ok(("llama", &llama::MODULES)),
        other => bail!("{}: general.architecture = {other:?}: only llama-architecture GGUF models can be tuned", path.display()),
    }
}

fn check_context(model: &(impl CausalLm + ?Sized), t: usize) -> Result<()> {
    ensure!(t <= model.context(), "sequence of {t} tokens exceeds the model context of {}", model.context());
    Ok(())
}

/// A prompt followed by its answer: the model is trained (and a candidate scored) on the
/// answer tokens only.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// `ids[answer_start..]` is the answer; at least 1.
    pub answer_start: usize,
}

impl Sequence {
    pub fn answer_len(&self) -> usize {
        self.ids.len() - self.answer_start
    }

    /// Each answer token with the position that predicts it (the one before it).
    pub fn answer_picks(&self) -> impl Iterator<Item = (usize, u32)> + '_ {
        (self.answer_start..self.ids.len()).map(|p| (p - 1, self.ids[p]))
    }
}

/// Where the answer tokens of right-padded sequences are: the padded ids `[b, longest]`, the
/// flat position predicting each answer token, and that token.
struct AnswerIndex {
    ids: Tensor,
    positions: Tensor,
    targets: Tensor,
}

/// A row of ids and the (position, token) pairs to read off it.
type PickRow<'a> = (&'a [u32], Vec<(usize, u32)>);

impl AnswerIndex {
    fn new(seqs: &[Sequence]) -> Result<Self> {
        let rows: Vec<PickRow> = seqs
            .iter()
            .map(|s| {
                ensure!(
                    s.answer_start >= 1 && s.answer_start < s.ids.len(),
                    "a sequence needs a prompt and an answer"
                );
                Ok((&s.ids[..], s.answer_picks().collect()))
            })
            .collect::<Result<_>>()?;
        Self::from_rows(&rows)
    }

    /// Rows of ids, each with the (position, token) pairs to read: `log p(token | ids[..=position])`.
    fn from_rows(rows: &[PickRow]) -> Result<Self> {
        ensure!(!rows.is_empty(), "no sequences");
        let longest = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * longest);
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for (row, (r, picks)) in rows.iter().enumerate() {
            ids.extend(r.iter());
            ids.extend(std::iter::repeat_n(0u32, longest - r.len()));
            for &(p, token) in picks {
                ensure!(p < r.len(), "position {p} is beyond a sequence of {} tokens", r.len());
                positions.push((row * longest + p) as u32);
                targets.push(token);
            }
        }
        let n = positions.len();
        Ok(Self {
            ids: Tensor::from_vec(ids, (rows.len(), longest), &Device::Cpu)?,
            positions: Tensor::from_vec(positions, n, &Device::Cpu)?,
            targets: Tensor::from_vec(targets, n, &Device::Cpu)?,
        })
    }

    /// The index of `seqs` and their input embeddings (`embeds`, or the ids' own), checked
    /// against the model's context.
    fn with_embeddings(model: &dyn CausalLm, seqs: &[Sequence], embeds: Option<Tensor>) -> Result<(Self, Tensor)> {
        let index = Self::new(seqs)?;
        let embeds = match embeds {
            Some(e) => e,
            None => model.embed(&index.ids)?,
        };
        check_context(model, embeds.dim(1)?)?;
        Ok((index, embeds))
    }

    /// Log-probabilities of the answer tokens from the last block's output `[b, t, dim]`.
    /// Vocabulary logits are computed at the answer positions only: the output layer is the
    /// widest matmul of a small model (49k × 576 for SmolLM2), and prompts are most of every
    /// sequence.
    fn log_probs(&self, model: &dyn CausalLm, last: &Tensor) -> Result<Tensor> {
        let hidden = model.final_norm(last)?;
        let (b, t, dim) = hidden.dims3()?;
        let picked = hidden
            .reshape((b * t, dim))?
            .index_select(&self.positions, 0)?;
        Ok(model
            .logits(&picked)?
            .contiguous()?
            .apply_op2(&self.targets, fused::TargetLogProb)?)
    }
}

/// `log p(answer token | everything before it)` for every answer token of every sequence, in
/// order (`[Σ answer lengths]`). Rows are right-padded; causal attention keeps padding out of
/// every real position. `embeds`: input embeddings to use instead of the ids' own (soft tokens).
pub fn answer_log_probs(
    model: &dyn CausalLm,
    seqs: &[Sequence],
    embeds: Option<Tensor>,
    lora: &LoraStack,
) -> Result<Tensor> {
    let (index, embeds) = AnswerIndex::with_embeddings(model, seqs, embeds)?;
    let mut x = embeds;
    for i in 0..model.layers() {
        x = model.layer(i, &x, lora)?;
    }
    index.log_probs(model, &x)
}

/// Backpropagates `scale × Σ −log p(answer tokens)` into `grads` (added to what they hold,
/// one slot per variable of `vars`) and returns that loss.
///
/// The backward runs block by block, last first: each block's input is cut from the graph
/// as a variable, so a block's gradient store lives only while that block is processed
/// (candle keeps every node's gradient until a `backward()` returns, which doubled the peak
/// memory of one whole-model pass). The chain rule joins the blocks: block i's output
/// gradient is fed back as the weights of a surrogate `Σ out · grad`.
pub fn answer_loss_backward(
    model: &dyn CausalLm,
    seqs: &[Sequence],
    embeds: Option<Tensor>,
    lora: &LoraStack,
    scale: f64,
    vars: &[Var],
    grads: &mut [Option<Tensor>],
) -> Result<f64> {
    let (index, embeds) = AnswerIndex::with_embeddings(model, seqs, embeds)?;
    // Block i's (input variable, output); block 0's input stays as given (it may depend on
    // variables of its own, e.g. soft tokens from a trainable mapping).
    let mut blocks: Vec<(Option<Var>, Tensor)> = Vec::with_capacity(model.layers());
    let mut x = embeds;
    for i in 0..model.layers() {
        let input = if i == 0 {
            None
        } else {
            Some(Var::from_tensor(&x.detach())?)
        };
        let out = model.layer(i, input.as_ref().map_or(&x, |v| v.as_tensor()), lora)?;
        x = out.clone();
        blocks.push((input, out));
    }
    let head_input = Var::from_tensor(&x.detach())?;
    let loss = (index
        .log_probs(model, head_input.as_tensor())?
        .sum_all()?
        .neg()?
        * scale)?;
    let value = loss.to_scalar::<f32>()? as f64;
    let store = loss.backward()?;
    collect(&store, vars, grads)?;
    let mut upstream = store
        .get(head_input.as_tensor())
        .context("no gradient reaches the last block")?
        .detach();
    drop(store);
    while let Some((input, out)) = blocks.pop() {
        let store = (out * &upstream)?.sum_all()?.backward()?;
        collect(&store, vars, grads)?;
        if let Some(input) = input {
            upstream = store
                .get(input.as_tensor())
                .context("no gradient reaches a block input")?
                .detach();
        }
    }
    Ok(value)
}

fn collect(
    store: &candle_core::backprop::GradStore,
    vars: &[Var],
    grads: &mut [Option<Tensor>],
) -> Result<()> {
    for (slot, var) in grads.iter_mut().zip(vars) {
        if let Some(g) = store.get(var.as_tensor()) {
            *slot = Some(match slot.take() {
                Some(acc) => (acc + g)?.detach(),
                None => g.detach(),
            });
        }
    }
    Ok(())
}

enum TextTokenizer {
    Gguf(GgufTokenizer),
    Hf(Box<tokenizers::Tokenizer>),
}

impl TextTokenizer {
    fn encode(&self, text: &str, first: bool) -> Result<Vec<u32>> {
        match self {
            TextTokenizer::Gguf(t) if first => t.encode(text),
            TextTokenizer::Gguf(t) => t.encode_continuation(text),
            TextTokenizer::Hf(t) => Ok(t
                .encode(text, false)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
                .get_ids()
                .to_vec()),
        }
    }
}

/// A base model with its tokenizer and prompt format, identified by path and sha256.
pub struct Base {
    pub model: Box<dyn CausalLm>,
    tokenizer: TextTokenizer,
    chat: minijinja::Environment<'static>,
    /// Appended after every answer (the end-of-turn token), so the model learns to stop.
    end_of_answer: Vec<u32>,
    pub path: PathBuf,
    pub sha256: String,
    pub name: String,
}

/// ChatGLM3's conversation format, used when a checkpoint's tokenizer_config.json has no
/// `chat_template`.
const CHATGLM_TEMPLATE: &str = "[gMASK]sop{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

impl Base {
    /// A GGUF file (Llama family) or a Hugging Face checkpoint directory (ChatGLM2/3).
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Self::load_checkpoint_dir(path);
        }
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("opening model {}", path.display()))?;
        let content = Content::read(&mut file).with_context(|| {
            format!(
                "{} is not a GGUF file (a checkpoint directory with config.json also works)",
                path.display()
            )
        })?;
        let mut load = || -> Result<Self> {
            let tokenizer = GgufTokenizer::from_gguf(&content)?;
            let end = tokenizer.stop.last().copied().unwrap_or(tokenizer.eos);
            let chat = crate::generate::chat_environment(
                meta(&content, "tokenizer.chat_template")?
                    .to_string()?
                    .clone(),
            )?;
            let model = llama::Llama::from_gguf(&content, &mut file)?;
            let name = content
                .metadata
                .get("general.name")
                .and_then(|v| v.to_string().ok().cloned())
                .unwrap_or_else(|| {
                    path.file_stem()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned()
                });
            Ok(Self {
                model: Box::new(model),
                tokenizer: TextTokenizer::Gguf(tokenizer),
                chat,
                end_of_answer: vec![end],
                path: path.to_path_buf(),
                sha256: sha256_of(&[path.to_path_buf()])?,
                name,
            })
        };
        load().with_context(|| format!("loading model {}", path.display()))
    }

    fn load_checkpoint_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).with_context(|| {
            format!(
                "{} is a directory without config.json: not a checkpoint",
                dir.display()
            )
        })?;
        let config: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}", config_path.display()))?;
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if model_type != "chatglm" {
            bail!("{}: model_type {model_type:?}; checkpoint directories of `chatglm` (ChatGLM2/3) are supported, Llama-family models load from GGUF", config_path.display());
        }
        let model = chatglm::ChatGlm::load(dir)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| {
            anyhow::anyhow!(
                "reading {}: {e} (ChatGLM checkpoints need a tokenizer.json)",
                tok_path.display()
            )
        })?;
        let template = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                v.get("chat_template")
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| CHATGLM_TEMPLATE.to_string());
        let eos = match config.get("eos_token_id") {
            Some(serde_json::Value::Array(ids)) => ids.first().and_then(|v| v.as_u64()),
            Some(v) => v.as_u64(),
            None => None,
        }
        .with_context(|| format!("{}: no eos_token_id", config_path.display()))?;
        let mut files = vec![config_path.clone()];
        files.extend(chatglm::weight_shards(dir)?);
        Ok(Self {
            model: Box::new(model),
            tokenizer: TextTokenizer::Hf(Box::new(tokenizer)),
            chat: crate::generate::chat_environment(template)?,
            end_of_answer: vec![eos as u32],
            path: dir.to_path_buf(),
            sha256: sha256_of(&files)?,
            name: dir
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        })
    }

    /// The prompt of an instruction example: one user turn (`instruction`, a blank line,
    /// `input`) in the model's chat format, ending where the assistant's answer begins.
    pub fn prompt_ids(&self, instruction: &str, input: &str) -> Result<Vec<u32>> {
        let content = match (instruction.is_empty(), input.is_empty()) {
            (true, _) => input.to_string(),
            (false, true) => instruction.to_string(),
            (false, false) => format!("{instruction}\n\n{input}"),
        };
        let messages = [Message {
            role: "user".into(),
            content,
        }];
        let text = self
            .chat
            .get_template("chat")?
            .render(minijinja::context! { messages => messages, add_generation_prompt => true })
            .context("rendering the chat template")?;
        self.tokenizer.encode(&text, true)
    }

    /// The answer's tokens, ending with the end-of-turn token.
    pub fn answer_ids(&self, output: &str) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(output, false)?;
        ids.extend(&self.end_of_answer);
        Ok(ids)
    }

    /// Prompt and answer of an example as one sequence.
    pub fn sequence(&self, instruction: &str, input: &str, output: &str) -> Result<Sequence> {
        let mut ids = self.prompt_ids(instruction, input)?;
        let answer_start = ids.len();
        ids.extend(self.answer_ids(output)?);
        Ok(Sequence { ids, answer_start })
    }
}

/// sha256 over the files' bytes, in order.
fn sha256_of(files: &[PathBuf]) -> Result<String> {
    use std::io::Read;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in files {
        let mut f = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(hex::encode(h.finalize()))
}
