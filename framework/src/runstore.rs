//! The run directory's memory: which stage ran with which inputs, and append-only journals
//! that survive a crash or `kill -9`.
//!
//! A stage is keyed by a hash of everything it depends on. On start:
//! * same key, finished → skipped;
//! * same key, unfinished → resumed (its journal's complete lines are kept);
//! * other key → started afresh (its artifacts are removed first).

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// sha256 of the parts, hex.
pub fn hash_parts(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

pub fn hash_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Writes a file atomically (temp file + rename), so readers never see half of it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    // The rename is durable only once the directory entry is on disk.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    }
    Ok(())
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct StageState {
    pub key: String,
    pub done: bool,
    pub seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageStart {
    Skip,
    Resume,
    Fresh,
}

pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn create(root: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(root.join("stages")).with_context(|| format!("cannot create run directory {}", root.display()))?;
        Ok(Self { root })
    }

    /// An existing run directory.
    pub fn open(root: PathBuf) -> Result<Self> {
        anyhow::ensure!(root.is_dir(), "{} is not a run directory", root.display());
        Ok(Self { root })
    }

    /// Whether `stage` finished under `key`.
    pub fn is_done(&self, stage: &str, key: &str) -> bool {
        self.state(stage).is_some_and(|s| s.done && s.key == key)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn state_path(&self, stage: &str) -> PathBuf {
        self.root.join("stages").join(format!("{stage}.json"))
    }

    pub fn state(&self, stage: &str) -> Option<StageState> {
        let text = std::fs::read_to_string(self.state_path(stage)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Decides whether `stage` runs, and removes stale `artifacts` when it starts afresh.
    pub fn begin(&self, stage: &str, key: &str, artifacts: &[&str]) -> Result<StageStart> {
        // A finished stage whose outputs have since gone (deleted, disk trouble) runs again.
        let outputs_present = artifacts.iter().all(|a| self.path(a).exists());
        let start = match self.state(stage) {
            Some(s) if s.key == key && s.done && outputs_present => return Ok(StageStart::Skip),
            Some(s) if s.key == key => StageStart::Resume,
            _ => StageStart::Fresh,
        };
        if start == StageStart::Fresh {
            for a in artifacts {
                let p = self.path(a);
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)?;
                } else if p.exists() {
                    std::fs::remove_file(&p)?;
                }
            }
        }
        let state = StageState { key: key.to_string(), done: false, seconds: 0.0 };
        write_atomic(&self.state_path(stage), serde_json::to_string_pretty(&state)?.as_bytes())?;
        Ok(start)
    }

    pub fn finish(&self, stage: &str, key: &str, seconds: f64) -> Result<()> {
        let state = StageState { key: key.to_string(), done: true, seconds };
        write_atomic(&self.state_path(stage), serde_json::to_string_pretty(&state)?.as_bytes())
    }
}

/// An append-only JSONL file of records. Each append is flushed and synced, so after a crash
/// every complete line is there; a torn last line is cut off on reopen.
pub struct Journal {
    file: File,
    path: PathBuf,
}

impl Journal {
    /// Opens (creating) the journal and returns the records already in it.
    pub fn open<T: DeserializeOwned>(path: &Path) -> Result<(Journal, Vec<T>)> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut records = Vec::new();
        let mut good_len = 0u64;
        {
            let mut reader = BufReader::new(&mut file);
            let mut line = String::new();
            let mut n = 0;
            loop {
                line.clear();
                let read = reader.read_line(&mut line)?;
                if read == 0 {
                    break;
                }
                n += 1;
                if !line.ends_with('\n') {
                    break; // torn write at the end: dropped, recomputed
                }
                match serde_json::from_str::<T>(line.trim_end()) {
                    Ok(r) => records.push(r),
                    Err(e) => bail!("{}:{n}: corrupt journal line ({e}); delete the file to recompute the stage", path.display()),
                }
                good_len += read as u64;
            }
        }
        file.set_len(good_len)?;
        file.seek(SeekFrom::End(0))?;
        Ok((Journal { file, path: path.to_path_buf() }, records))
    }

    pub fn append<T: Serialize>(&mut self, records: &[T]) -> Result<()> {
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf).with_context(|| format!("appending to {}", self.path.display()))?;
        self.file.sync_data()?;
        Ok(())
    }
}

/// Reads every record of a finished journal.
pub fn read_journal<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    Ok(Journal::open(path)?.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_keeps_complete_lines_and_drops_a_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("j.jsonl");
        let (mut j, old) = Journal::open::<u32>(&p).unwrap();
        assert!(old.is_empty());
        j.append(&[1u32, 2]).unwrap();
        drop(j);
        // Simulate a kill in the middle of a write.
        OpenOptions::new().append(true).open(&p).unwrap().write_all(b"3").unwrap();
        let (mut j, old) = Journal::open::<u32>(&p).unwrap();
        assert_eq!(old, vec![1, 2]);
        j.append(&[4u32]).unwrap();
        assert_eq!(read_journal::<u32>(&p).unwrap(), vec![1, 2, 4]);
    }

    #[test]
    fn stage_skip_resume_fresh() {
        let d = tempfile::tempdir().unwrap();
        let run = RunDir::create(d.path().join("r")).unwrap();
        std::fs::write(run.path("a.jsonl"), "x").unwrap();
        assert_eq!(run.begin("s", "k1", &["a.jsonl"]).unwrap(), StageStart::Fresh);
        assert!(!run.path("a.jsonl").exists());
        std::fs::write(run.path("a.jsonl"), "x").unwrap();
        assert_eq!(run.begin("s", "k1", &["a.jsonl"]).unwrap(), StageStart::Resume);
        assert!(run.path("a.jsonl").exists());
        run.finish("s", "k1", 1.0).unwrap();
        assert_eq!(run.begin("s", "k1", &["a.jsonl"]).unwrap(), StageStart::Skip);
        assert_eq!(run.begin("s", "k2", &["a.jsonl"]).unwrap(), StageStart::Fresh);
    }
}
