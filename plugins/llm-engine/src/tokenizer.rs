//! The tokenizer of a GGUF model, rebuilt from its `tokenizer.ggml.*` metadata (no tokenizer.json
//! needed): byte-level BPE from the vocabulary and merges, the pre-tokenizer named by
//! `tokenizer.ggml.pre`, and the control tokens as special tokens.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// GGUF token types (llama.cpp `llama_token_type`): 3 = control, 4 = user-defined.
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

pub struct GgufTokenizer {
    inner: Tokenizer,
    /// The same vocabulary with control tokens matched as plain text: for text a user wrote.
    literal: Tokenizer,
    pub bos: Option<u32>,
    pub eos: u32,
    /// Tokens that end a generation: eos and the chat end-of-turn token if there is one.
    pub stop: Vec<u32>,
}

pub(crate) fn meta<'a>(content: &'a Content, key: &str) -> Result<&'a Value> {
    content.metadata.get(key).with_context(|| format!("GGUF metadata has no `{key}`"))
}

fn strings(content: &Content, key: &str) -> Result<Vec<String>> {
    meta(content, key)?
        .to_vec()
        .with_context(|| format!("GGUF metadata `{key}` is not an array"))?
        .iter()
        .map(|v| v.to_string().cloned().with_context(|| format!("`{key}` holds a non-string")))
        .collect()
}

impl GgufTokenizer {
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let model = meta(content, "tokenizer.ggml.model")?.to_string()?;
        if model != "gpt2" {
            bail!("tokenizer.ggml.model = {model:?}: only byte-level BPE (\"gpt2\") is supported");
        }
        let tokens = strings(content, "tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings(content, "tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, m)| match m.split_once(' ') {
                Some((a, b)) => Ok((a.to_string(), b.to_string())),
                None => bail!("tokenizer.ggml.merges[{i}] = {m:?} is not `left right`"),
            })
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match content.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec()?.iter().map(|t| t.to_i32()).collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let vocab: Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow::anyhow!("building BPE from GGUF vocabulary: {e}"))?;
        let mut inner = Tokenizer::new(bpe);
        let pre = content
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("default");
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == CONTROL || t == USER_DEFINED)
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        inner.add_special_tokens(special).map_err(|e| anyhow::anyhow!("adding control tokens: {e}"))?;
        let id = |key: &str| -> Result<Option<u32>> {
            content.metadata.get(key).map(|v| v.to_u32().with_context(|| key.to_string())).transpose()
        };
        let eos = id("tokenizer.ggml.eos_token_id")?.context("GGUF metadata has no eos token id")?;
        let add_bos = content
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let bos = if add_bos { id("tokenizer.ggml.bos_token_id")? } else { None };
        let mut stop = vec![eos];
        for end_of_turn in ["<|im_end|>", "<|eot_id|>", "<|end|>"] {
            if let Some(t) = inner.token_to_id(end_of_turn) {
                if !stop.contains(&t) {
                    stop.push(t);
                }
            }
        }
        let mut literal = inner.clone();
        literal.set_encode_special_tokens(true);
        Ok(Self { inner, literal, bos, eos, stop })
    }

    /// Encodes text in which control tokens (`<|im_start|>` ...) are written literally, as a
    /// rendered chat template is.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.encode_continuation(text)?);
        Ok(ids)
    }

    /// Encodes text that continues a sequence (no beginning-of-sequence token).
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The id of a token of the vocabulary (control tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes text someone typed (a chat message): `<|im_start|>` in it is the characters
    /// `<`, `|`, ..., never the control token, so a user cannot open a turn of its own.
    pub fn encode_literal(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.literal.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow::anyhow!("detokenizing: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` value. Listed types only:
/// a wrong split silently changes every token, so an unknown one is an error.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    Ok(match pre {
        // GPT-2 regex after splitting digits one by one (llama.cpp: STARCODER/SMOLLM/REFACT).
        "smollm" | "starcoder" | "refact" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        "gpt2" | "default" => byte_level.into(),
        other => bail!(
            "tokenizer.ggml.pre = {other:?} is not supported (supported: smollm, starcoder, refact, gpt2)"
        ),
    })
}
