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
}

/// Builds instruction examples (instruction, input, output) for a task.
pub trait InstructionBuilder: Send + Sync + 'static {
    type Config: DeserializeOwned;
    const DESCRIPTION: &'static str;
    fn new(config: Self::Config, host: Host) -> Result<Self>
    where
        Self: Sized;
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
    fn tune(
        &mut self,
        view: &TrainView<'_>,
        train: &[Instruction],
        valid: &[Instruction],
        out_dir: &Path,
    ) -> Result<Artifact>;
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
    fn score(&self, batch: &ScoreBatch<'_>, out: &mut [f32]) -> Result<()>;
}
