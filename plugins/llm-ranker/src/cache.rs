//! The journal of computed scores: `scores.bin` in the ranker's directory, a 32-byte header
//! (sha256 of what is being scored: base model, adapters, rule, task) then fixed 20-byte
//! records (16-byte prompt key, f32 score), appended and synced as each user finishes. A torn
//! last record (a kill mid-write) is dropped on open; a header for another model starts afresh.

use recfuse_sdk::prelude::{Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

pub type Key = [u8; 16];
const RECORD: usize = 20;

/// The key of a prompt: a hash of its parts.
pub fn key(parts: &[&str]) -> Key {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    let mut k = [0u8; 16];
    k.copy_from_slice(&d[..16]);
    k
}

pub struct ScoreCache {
    scores: HashMap<Key, f32>,
    file: Option<File>,
}

impl ScoreCache {
    pub fn in_memory() -> Self {
        Self { scores: HashMap::new(), file: None }
    }

    /// Opens (or starts) the journal at `path` for scores of `identity`.
    pub fn open(path: &Path, identity: &str) -> Result<Self> {
        let header: [u8; 32] = Sha256::digest(identity.as_bytes()).into();
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
        let mut scores = HashMap::new();
        let keep = if bytes.len() >= 32 && bytes[..32] == header {
            let whole = (bytes.len() - 32) / RECORD;
            for r in bytes[32..32 + whole * RECORD].chunks_exact(RECORD) {
                let mut k = [0u8; 16];
                k.copy_from_slice(&r[..16]);
                scores.insert(k, f32::from_le_bytes([r[16], r[17], r[18], r[19]]));
            }
            32 + whole * RECORD
        } else {
            0
        };
        file.set_len(keep as u64)?;
        file.seek(SeekFrom::Start(keep as u64))?;
        if keep == 0 {
            file.write_all(&header)?;
            file.sync_data()?;
        }
        Ok(Self { scores, file: Some(file) })
    }

    pub fn len(&self) -> usize {
        self.scores.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    pub fn get(&self, k: &Key) -> Option<f32> {
        self.scores.get(k).copied()
    }

    /// Records scores, synced to disk before returning.
    pub fn append(&mut self, fresh: &[(Key, f32)]) -> Result<()> {
        if let Some(f) = &mut self.file {
            let mut buf = Vec::with_capacity(fresh.len() * RECORD);
            for (k, s) in fresh {
                buf.extend_from_slice(k);
                buf.extend_from_slice(&s.to_le_bytes());
            }
            f.write_all(&buf).context("journaling scores")?;
            f.sync_data().context("journaling scores")?;
        }
        self.scores.extend(fresh.iter().copied());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_survives_reopen_drops_a_torn_record_and_another_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scores.bin");
        let (a, b) = (key(&["a"]), key(&["b"]));
        {
            let mut c = ScoreCache::open(&path, "model 1").unwrap();
            c.append(&[(a, 1.5), (b, -2.0)]).unwrap();
        }
        // A kill in the middle of a record.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[7u8; 9]).unwrap();
        drop(f);
        let c = ScoreCache::open(&path, "model 1").unwrap();
        assert_eq!((c.get(&a), c.get(&b), c.len()), (Some(1.5), Some(-2.0), 2));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 32 + 2 * 20);
        let other = ScoreCache::open(&path, "model 2").unwrap();
        assert!(other.is_empty());
        assert_ne!(key(&["ab", "c"]), key(&["a", "bc"]));
    }
}
