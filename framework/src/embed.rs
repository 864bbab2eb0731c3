//! `[embed]`: text embeddings of the fused knowledge (see [`EmbedSection`]), computed in the
//! fuse stage so they are journaled with the knowledge they belong to, and cached by text hash
//! in the run (`embeddings/<encoder>/`): a fuse stage rerun for another reason (a new fuser
//! setting, a failed user asked again) encodes only texts it has not seen.
//!
//! Without the `onnx` feature, [`Embedder`] is an empty type whose `load` explains why.

use crate::config::EmbedSection;
use anyhow::Result;
use std::path::Path;

#[cfg(feature = "onnx")]
pub use with_onnx::Embedder;
#[cfg(not(feature = "onnx"))]
pub use without_onnx::Embedder;

#[cfg(feature = "onnx")]
mod with_onnx {
    use super::*;
    use crate::knowledge::{read_vectors, write_batch_vectors};
    use crate::runstore::hash_parts;
    use recfuse_plugin_ort_ranker::{embed::TextEncoder, runtime::SessionOptions};
    use recfuse_sdk::records::NamedVector;
    use std::collections::{HashMap, HashSet};
    use std::path::PathBuf;

    /// The encoder of a run, with its cache.
    pub struct Embedder {
        /// The knowledge vector's name.
        pub name: String,
        encoder: TextEncoder,
        cache: HashMap<String, Vec<f32>>,
        cache_dir: PathBuf,
        /// Batch files in `cache_dir`: the next one's sequence number.
        cache_files: usize,
    }

    impl Embedder {
        pub fn load(section: &EmbedSection) -> Result<Self> {
            let opts = SessionOptions { sessions: section.sessions, runtime_library: section.runtime_library.clone(), ..Default::default() };
            let encoder = TextEncoder::load(&section.dir, section.max_tokens, &opts)?;
            Ok(Self { name: section.name.clone(), encoder, cache: HashMap::new(), cache_dir: PathBuf::new(), cache_files: 0 })
        }

        /// What identifies the vectors (name, model, tokenizer, truncation), for stage keys.
        pub fn fingerprint(&self) -> String {
            format!("{}|{}", self.name, self.encoder.fingerprint)
        }

        /// Opens the run's cache for this encoder (`run_root/embeddings/<encoder>/`).
        pub fn open_cache(&mut self, run_root: &Path) -> Result<()> {
            self.cache_dir = run_root.join("embeddings").join(&self.encoder.fingerprint);
            self.cache = read_vectors(&self.cache_dir)?.into_iter().map(|((_, hash), v)| (hash, v)).collect();
            self.cache_files = std::fs::read_dir(&self.cache_dir).map(|d| d.count()).unwrap_or(0);
            tracing::debug!(cached = self.cache.len(), "embedding cache");
            Ok(())
        }

        /// One vector per text: from the cache, or encoded and cached (written before they are
        /// returned, so a journal never refers to a vector the cache lost).
        pub fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
            let hashes: Vec<String> = texts.iter().map(|t| hash_parts(&[t.as_bytes()])).collect();
            let mut asked = HashSet::new();
            let missing: Vec<usize> = (0..texts.len()).filter(|&i| !self.cache.contains_key(&hashes[i]) && asked.insert(&hashes[i])).collect();
            if !missing.is_empty() {
                let fresh = self.encoder.embed(&missing.iter().map(|&i| texts[i]).collect::<Vec<_>>())?;
                let named: Vec<NamedVector> = missing.iter().zip(fresh).map(|(&i, values)| NamedVector { name: hashes[i].clone(), values }).collect();
                let refs: Vec<(u32, &NamedVector)> = named.iter().map(|v| (0, v)).collect();
                write_batch_vectors(&self.cache_dir, self.cache_files, &refs)?;
                self.cache_files += 1;
                self.cache.extend(named.into_iter().map(|v| (v.name, v.values)));
            }
            Ok(hashes.iter().map(|h| self.cache[h].clone()).collect())
        }
    }
}

#[cfg(not(feature = "onnx"))]
mod without_onnx {
    use super::*;

    /// Never constructed: `load` explains that the feature is missing.
    pub enum Embedder {}

    impl Embedder {
        pub fn load(_section: &EmbedSection) -> Result<Self> {
            anyhow::bail!("this recfuse was built without the `onnx` feature, which `[embed]` needs")
        }
        pub fn fingerprint(&self) -> String {
            match *self {}
        }
        pub fn open_cache(&mut self, _run_root: &Path) -> Result<()> {
            match *self {}
        }
        pub fn embed(&mut self, _texts: &[&str]) -> Result<Vec<Vec<f32>>> {
            match *self {}
        }
    }
}
