//! The five component traits a plugin implements, in ordinary safe Rust.
//!
//! Each component is built from its own config table (`Config`, deserialized by the SDK with
//! unknown keys rejected when the struct says `#[serde(deny_unknown_fields)]`) and a [`Host`]
//! handle it may keep for logging, progress, cancellation, the run directory and its seed.
//! Every method works on a batch; the host decides batch sizes.

use crate::host::Host;
use crate::records::*;
use serde::de::DeserializeOwned;
use std::path::Path;

pub use anyhow::Result;

/// Yields the catalog (items, users) and heterogeneous behaviour events.
pub trait BehaviorSource: Send + Sync + 'static {
    type Config: DeserializeOwned;
    /// One line shown by `recfuse plugins`.
    const DESCRIPTION: &'static str;
    fn new(config: Self::Config, host: Host) -> Result<Self>
    where
        Self: Sized;
    fn load(&mut self) -> Result<Dataset>;
}

/// Turns users' train-period behaviour into knowledge: text and/or vectors.
pub trait KnowledgeFuser: Send + Sync + 'static {
    type Config: DeserializeOwned;
    const DESCRIPTION: &'static str;
    fn new(config: Self::Config, host: Host) -> Result<Self>
    where
        Self: Sized;
    /// Called once before the first `fuse`, with the whole train view (a CF fuser trains here).
    fn prepare(&mut self, _view: &TrainView<'_>) -> Result<()> {
        Ok(())
    }
    /// Knowledge for each user of `users`, in any order; users left out are recorded as failed.
    fn fuse(&mut self, view: &TrainView<'_>, users: &[UserIdx]) -> Result<Vec<Knowledge>>;
    /// Knowledge about items (ABI 1.1): called after `prepare`, for every item of the catalog in
    /// batches. Items left out simply have no knowledge from this fuser. Default: none.
    fn fuse_items(&mut self, _view: &TrainView<'_>, _items: &[ItemIdx]) -> Result<Vec<ItemKnowledge>> {
        Ok(Vec::new())
    }
}

/// Builds instruction examples (instruction, input, output) for a task.
///
/// The same builder renders the prompts a ranker scores (through [`Host::instructions`]), so
/// training and scoring prompts cannot drift: `build` must be a pure function of the view and
/// the requests (no randomness, no state carried between calls).
pub trait InstructionBuilder: Send + Sync + 'static {
    type Config: DeserializeOwned;
    const DESCRIPTION: &'static str;
    fn new(config: Self::Config, host: Host) -> Result<Self>
    where
        Self: Sized;
    /// One or more examples per request and target, each tagged with `request.task`.
    fn build(&mut self, view: &TrainView<'_>, requests: &[InstructionRequest]) -> Result<Vec<Instruction>>;
}

/// Trains adapters from instruction examples and leaves an [`Artifact`] in `out_dir`.
/// A tuner interrupted mid-way should resume from what it already wrote in `out_dir`.
pub trait Tuner: Send + Sync + 'static {
    type Config: DeserializeOwned;
    const DESCRIPTION: &'static str;
    fn new(config: Self::Config, host: Host) -> Result<Self>
    where
        Self: Sized;
    /// Trains on `inputs.train` (every task of the run, tagged), may select on `inputs.valid`.
    fn tune(&mut self, view: &TrainView<'_>, inputs: &TuneInputs<'_>, out_dir: &Path) -> Result<Artifact>;
}

/// Scores candidate items for users. Every model, baselines included, is a ranker, so every
/// model is evaluated by the same code.
pub trait Ranker: Send + Sync + 'static {
    type Config: DeserializeOwned;
    const DESCRIPTION: &'static str;
    fn new(config: Self::Config, host: Host) -> Result<Self>
    where
        Self: Sized;
    fn fit(&mut self, view: &TrainView<'_>, inputs: &FitInputs<'_>) -> Result<()>;
    /// Writes `batch.out_len()` scores into `out`, row-major by user; higher is better.
    ///
    /// Called on one thread at a time per ranker (the host never calls `score` concurrently on
    /// the same instance); parallelise inside if you like. Already-seen items are among the
    /// candidates under full ranking: the host masks them, so do not. Candidates are valid item
    /// indices, never [`NONE`].
    fn score(&self, batch: &ScoreBatch<'_>, out: &mut [f32]) -> Result<()>;

    /// Saves the fitted model into `dir` (ABI 1.1) so that [`Ranker::load`] can restore it
    /// without refitting. Returns `false` when the ranker does not support saving (the default):
    /// the host then refits it whenever it is needed.
    fn save(&self, _dir: &Path) -> Result<bool> {
        Ok(false)
    }
    /// Restores what [`Ranker::save`] wrote into `dir`, instead of `fit`, given the same inputs
    /// `fit` would get (ABI 1.1). `false` = not supported (the default) and the host calls `fit`.
    fn load(&mut self, _view: &TrainView<'_>, _inputs: &FitInputs<'_>, _dir: &Path) -> Result<bool> {
        Ok(false)
    }
    /// Rough cost of scoring one (user, candidate) pair, in wall-clock seconds as `score` runs
    /// it (ABI 1.1). `recfuse validate` multiplies it by the work a config asks for, compares
    /// that with `eval.max_ranker_seconds`, and refuses a costly ranker asked to score the whole
    /// catalog without `rerank`. Default: 0 (cheap).
    fn seconds_per_candidate(&self) -> f64 {
        0.0
    }
}
