//! Sentence embeddings with all-MiniLM-L6-v2 through ONNX Runtime, as sentence-transformers
//! computes them: WordPiece tokens (truncated), the encoder's last hidden states averaged over
//! the real tokens (attention mask), then L2-normalised. 384 dimensions.

use crate::runtime::{SessionOptions, SessionPool, TensorSpec};
use anyhow::{anyhow, ensure, Context, Result};
use ort::value::{Tensor, TensorElementType};
use std::path::{Path, PathBuf};

/// Where `scripts/fetch-data.sh minilm` puts the model and its tokenizer.
pub const DEFAULT_DIR: &str = ".cache/data/minilm";
/// The encoder's width.
pub const DIM: usize = 384;

/// The MiniLM text encoder.
pub struct TextEncoder {
    pool: SessionPool,
    tokenizer: tokenizers::Tokenizer,
    max_tokens: usize,
    /// Identifies the encoder (model file and tokenizer hashes, truncation) for cache keys.
    pub fingerprint: String,
}

impl TextEncoder {
    /// Loads `dir/model.onnx` and `dir/tokenizer.json`; texts are cut to `max_tokens` tokens.
    pub fn load(dir: &Path, max_tokens: usize, opts: &SessionOptions) -> Result<Self> {
        use sha2::{Digest, Sha256};
        let model = dir.join("model.onnx");
        let tok_path = dir.join("tokenizer.json");
        let hint = "run `scripts/fetch-data.sh minilm`";
        ensure!(model.is_file(), "text encoder: {} not found ({hint})", model.display());
        ensure!(tok_path.is_file(), "text encoder: {} not found ({hint})", tok_path.display());
        let tok_bytes = std::fs::read(&tok_path).with_context(|| format!("reading {}", tok_path.display()))?;
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(&tok_bytes).map_err(|e| anyhow!("{}: {e}", tok_path.display()))?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams { max_length: max_tokens, ..Default::default() }))
            .map_err(|e| anyhow!("{}: {e}", tok_path.display()))?;
        tokenizer.with_padding(None);
        let bytes = std::fs::read(&model).with_context(|| format!("reading {}", model.display()))?;
        let ids = |name: &str| TensorSpec { name: name.into(), ty: TensorElementType::Int64, shape: vec![-1, -1] };
        let inputs = [ids("input_ids"), ids("attention_mask"), ids("token_type_ids")];
        let outputs = [TensorSpec { name: "last_hidden_state".into(), ty: TensorElementType::Float32, shape: vec![-1, -1, DIM as i64] }];
        let pool = SessionPool::from_bytes(&bytes, &model, &inputs, &outputs, opts)?;
        let mut h = Sha256::new();
        h.update(&bytes);
        h.update(&tok_bytes);
        h.update(max_tokens.to_le_bytes());
        Ok(Self { pool, tokenizer, max_tokens, fingerprint: hex::encode(&h.finalize()[..8]) })
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// One unit vector per text, in order. Texts are run in batches of similar length, the
    /// batches spread over the session pool.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| anyhow!("tokenizing: {e}"))?;
        // Sorted by length so a batch pads little.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| encodings[i].get_ids().len());
        const BATCH: usize = 32;
        let batches: Vec<&[usize]> = order.chunks(BATCH).collect();
        let vectors = self.pool.parallel(batches.len(), |b| {
            let rows: Vec<&tokenizers::Encoding> = batches[b].iter().map(|&i| &encodings[i]).collect();
            self.run(&rows)
        })?;
        let mut out = vec![Vec::new(); texts.len()];
        for (batch, vs) in batches.iter().zip(vectors) {
            for (&i, v) in batch.iter().zip(vs) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Mean-pooled, normalised embeddings of one padded batch.
    fn run(&self, rows: &[&tokenizers::Encoding]) -> Result<Vec<Vec<f32>>> {
        let len = rows.iter().map(|e| e.get_ids().len()).max().unwrap_or(0).max(1);
        let n = rows.len();
        let mut ids = vec![0i64; n * len];
        let mut mask = vec![0i64; n * len];
        for (r, e) in rows.iter().enumerate() {
            for (j, &t) in e.get_ids().iter().enumerate() {
                ids[r * len + j] = t as i64;
                mask[r * len + j] = 1;
            }
        }
        let types = vec![0i64; n * len];
        let shape = [n as i64, len as i64];
        let hidden = self.pool.with(|s| {
            let outputs = s.run(ort::inputs! {
                "input_ids" => Tensor::from_array((shape, ids))?,
                "attention_mask" => Tensor::from_array((shape, mask.clone()))?,
                "token_type_ids" => Tensor::from_array((shape, types))?,
            })?;
            let (_, h) = outputs["last_hidden_state"].try_extract_tensor::<f32>()?;
            Ok(h.to_vec())
        })?;
        Ok((0..n)
            .map(|r| {
                let mut v = vec![0f32; DIM];
                let mut count = 0f32;
                for j in 0..len {
                    if mask[r * len + j] == 1 {
                        count += 1.0;
                        for (acc, x) in v.iter_mut().zip(&hidden[(r * len + j) * DIM..(r * len + j + 1) * DIM]) {
                            *acc += x;
                        }
                    }
                }
                let mean: Vec<f32> = v.iter().map(|x| x / count.max(1.0)).collect();
                let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                mean.into_iter().map(|x| x / norm).collect()
            })
            .collect())
    }
}

/// The default model directory, resolved against the working directory.
pub fn default_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DIR)
}
