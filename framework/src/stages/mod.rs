//! The stages of a run, one module each; the runner they share decides whether a stage runs,
//! resumes or is skipped (by its key and outputs) and keeps the manifest.
//!
//! A stage is: a name, a key (a hash of everything its outputs depend on), its outputs (files
//! or directories of the run), and a body that writes them, resuming from what is there.

pub mod fuse;
pub mod instructions;
pub mod rank;
pub mod tune;

use crate::config::LoadedConfig;
use crate::host::Progress;
use crate::pipeline::{Manifest, RunOptions};
use crate::runstore::*;
use anyhow::{bail, Context, Result};
use std::sync::atomic::Ordering;
use std::time::Instant;

pub struct Runner<'a> {
    pub cfg: &'a LoadedConfig,
    pub run: RunDir,
    pub opts: &'a RunOptions,
    pub progress: Progress,
    pub manifest: Manifest,
    pub stages: Vec<(String, StageStart)>,
    /// For a shard: the run directory `prepare` left its global outputs in (the shard's own
    /// outputs go to `run`).
    pub prepared: Option<std::path::PathBuf>,
}

impl Runner<'_> {
    pub fn check_cancel(&self) -> Result<()> {
        if self.opts.cancel.load(Ordering::Relaxed) {
            bail!("cancelled; rerun the same command to resume from {}", self.run.root.display());
        }
        Ok(())
    }

    /// Copies each component's `usage.json` into the manifest.
    pub fn record_usage(&mut self) -> Result<()> {
        let Ok(dirs) = std::fs::read_dir(self.run.path("components")) else { return Ok(()) };
        for dir in dirs.flatten() {
            let path = dir.path().join("usage.json");
            if let Ok(text) = std::fs::read_to_string(&path) {
                let v = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
                self.manifest.usage.insert(dir.file_name().to_string_lossy().into_owned(), v);
            }
        }
        self.save_manifest()
    }

    pub fn save_manifest(&self) -> Result<()> {
        write_atomic(&self.run.path("manifest.json"), serde_json::to_string_pretty(&self.manifest)?.as_bytes())
    }

    /// Runs `body` as stage `name` unless its key says it is already done.
    pub fn stage(&mut self, name: &str, key: &str, artifacts: &[&str], body: impl FnOnce(&mut Self, StageStart) -> Result<()>) -> Result<()> {
        let start = self.run.begin(name, key, artifacts)?;
        self.stages.push((name.to_string(), start));
        let t = Instant::now();
        match start {
            StageStart::Skip => tracing::info!(stage = name, "inputs unchanged, skipped"),
            StageStart::Resume => tracing::info!(stage = name, "resuming"),
            StageStart::Fresh => tracing::info!(stage = name, "running"),
        }
        if start != StageStart::Skip {
            body(self, start).with_context(|| format!("stage `{name}`"))?;
            self.run.finish(name, key, t.elapsed().as_secs_f64())?;
        }
        let state = self.run.state(name);
        self.manifest.stages.insert(
            name.to_string(),
            serde_json::json!({"key": key, "ran": format!("{start:?}").to_lowercase(), "seconds": state.map(|s| s.seconds)}),
        );
        self.save_manifest()
    }
}

