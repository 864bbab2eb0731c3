//! # recfuse-sdk
//!
//! The only crate a recfuse plugin depends on. It holds the contract and nothing else:
//!
//! * [`records`]: the data that flows between stages (catalog, events, knowledge, instructions);
//! * [`component`]: the five component traits (behaviour source, knowledge fuser, instruction
//!   builder, tuner, ranker), in safe Rust;
//! * [`host`]: what the host offers a plugin (logging, progress, cancellation, run directory);
//! * [`metrics`]: the ranking metrics the host reports, for rankers that select on validation;
//! * [`abi`]: the SDK ABI version and its compatibility rule;
//! * [`export_plugin!`]: generates the stable-ABI root module, FFI shims and panic guards;
//! * `ffi` (hidden): the abi_stable types that actually cross the boundary.
//!
//! ```ignore
//! use recfuse_sdk::prelude::*;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Cfg { bias: f32 }
//! struct Mine { cfg: Cfg }
//! impl Ranker for Mine {
//!     type Config = Cfg;
//!     const DESCRIPTION: &'static str = "scores every item with a constant";
//!     fn new(cfg: Cfg, _host: Host) -> Result<Self> { Ok(Mine { cfg }) }
//!     fn fit(&mut self, _view: &TrainView, _inputs: &FitInputs) -> Result<()> { Ok(()) }
//!     fn score(&self, _batch: &ScoreBatch, out: &mut [f32]) -> Result<()> {
//!         out.fill(self.cfg.bias);
//!         Ok(())
//!     }
//! }
//! export_plugin! { name: "mine", rankers: { "constant" => Mine } }
//! ```

pub mod abi;
pub mod component;
mod export;
#[doc(hidden)]
pub mod ffi;
pub mod host;
pub mod metrics;
pub mod records;
pub mod rng;

pub use abi::{SdkAbiVersion, SDK_ABI_VERSION};
pub use component::{BehaviorSource, InstructionBuilder, KnowledgeFuser, Ranker, Tuner};
pub use host::{Cancelled, Host, Progress};
pub use records::*;
pub use rng::SeededRng;

/// The environment variable a sharded run (`recfuse run --shard i/n`) sets to `INDEX/COUNT`
/// before it builds its components. A component that spends a budget shared by the whole run,
/// such as an API's rate limits, takes its share from it ([`shard_count`]).
pub const SHARD_ENV: &str = "RECFUSE_SHARD";

/// How many processes share this run's work: the count of `RECFUSE_SHARD`, 1 when unsharded.
pub fn shard_count() -> usize {
    std::env::var(SHARD_ENV)
        .ok()
        .and_then(|v| v.split_once('/').and_then(|(_, n)| n.trim().parse::<usize>().ok()))
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// Everything a plugin usually needs.
pub mod prelude {
    pub use crate::component::{BehaviorSource, InstructionBuilder, KnowledgeFuser, Ranker, Tuner};
    pub use crate::export_plugin;
    pub use crate::host::{Host, Progress};
    pub use crate::metrics::{EarlyStopping, Validation};
    pub use crate::records::*;
    pub use crate::rng::SeededRng;
    pub use anyhow::{anyhow, bail, ensure, Context, Error, Result};
    pub use serde::{Deserialize, Serialize};
}

#[doc(hidden)]
pub mod __private {
    pub use abi_stable;
    pub use inventory;
}
