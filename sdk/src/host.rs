//! What the host offers a plugin: logging into the host's `tracing`, progress reporting,
//! cancellation, the run directory and a seed. A plugin keeps the [`Host`] it was built with.

use crate::ffi::{HostFfi, HostFfiBox, InstructionFfi, LogLevel, TaskRequestFfi};
use crate::records::{Instruction, InstructionRequest};
use abi_stable::std_types::{RArc, RSlice, RStr, RString};
use abi_stable::sabi_trait::TD_Opaque;
use std::fmt::Display;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The host's services, as seen by a plugin. Cheap to clone.
#[derive(Clone)]
pub struct Host {
    ffi: HostFfiBox,
}

/// The error a plugin returns when the host asked it to stop.
#[derive(Debug)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled by the host")
    }
}
impl std::error::Error for Cancelled {}

impl Host {
    #[doc(hidden)]
    pub fn from_ffi(ffi: HostFfiBox) -> Self {
        Self { ffi }
    }

    pub fn debug(&self, message: impl Display) {
        self.log(LogLevel::Debug, message)
    }
    pub fn info(&self, message: impl Display) {
        self.log(LogLevel::Info, message)
    }
    pub fn warn(&self, message: impl Display) {
        self.log(LogLevel::Warn, message)
    }
    pub fn error(&self, message: impl Display) {
        self.log(LogLevel::Error, message)
    }
    fn log(&self, level: LogLevel, message: impl Display) {
        let text = message.to_string();
        self.ffi.log(level, RStr::from_str(&text));
    }

    /// Starts a progress bar of `total` steps, finished when the returned handle is dropped.
    pub fn progress(&self, label: &str, total: u64) -> Progress {
        let id = self.ffi.progress_begin(RStr::from_str(label), total);
        Progress { host: self.clone(), id }
    }

    /// Whether the host asked the run to stop (Ctrl-C). Long loops should check it.
    pub fn is_cancelled(&self) -> bool {
        self.ffi.cancelled()
    }

    /// `Err(Cancelled)` when the host asked the run to stop; use with `?` in loops.
    pub fn check_cancelled(&self) -> anyhow::Result<()> {
        if self.is_cancelled() {
            Err(Cancelled.into())
        } else {
            Ok(())
        }
    }

    /// This component's own directory inside the run directory (created by the host).
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from(self.ffi.run_dir().as_str())
    }

    /// The seed this component should use for any randomness (derived from the run seed).
    pub fn seed(&self) -> u64 {
        self.ffi.seed()
    }

    /// The instruction tasks of the run, one per `[[instructions]]` builder (ABI 1.1).
    pub fn tasks(&self) -> Vec<String> {
        self.ffi.tasks().into_iter().map(|t| t.into_string()).collect()
    }

    /// Renders `requests` with the run's instruction builder of `task` (ABI 1.1), exactly as the
    /// instructions stage rendered the examples a tuner learned from: a ranker that scores
    /// prompts builds them here, so training and scoring prompts cannot drift. Requests for
    /// scoring carry `label = 0` and `value = None` (the answer is what is predicted).
    pub fn instructions(&self, task: &str, requests: &[InstructionRequest]) -> anyhow::Result<Vec<Instruction>> {
        let reqs: Vec<TaskRequestFfi> = requests.iter().map(TaskRequestFfi::from_request).collect();
        let out = self.ffi.render_instructions(RStr::from_str(task), RSlice::from_slice(&reqs)).into_result().map_err(|e| e.into_anyhow())?;
        Ok(out.iter().map(InstructionFfi::to_instruction).collect())
    }

    /// A host for a plugin's own unit tests or tools: logs to stderr, no progress bars,
    /// cancelled when `cancel` is set.
    pub fn standalone(run_dir: impl Into<PathBuf>, seed: u64) -> Self {
        Self::standalone_with_cancel(run_dir, seed, Arc::new(AtomicBool::new(false)))
    }

    pub fn standalone_with_cancel(run_dir: impl Into<PathBuf>, seed: u64, cancel: Arc<AtomicBool>) -> Self {
        let services = StandaloneHost {
            run_dir: run_dir.into().to_string_lossy().into_owned(),
            seed,
            cancel,
            next_progress: Arc::new(AtomicU64::new(0)),
        };
        Self { ffi: HostFfiBox::from_ptr(RArc::new(services), TD_Opaque) }
    }
}

/// A progress bar owned by a plugin; finished on drop.
pub struct Progress {
    host: Host,
    id: u64,
}

impl Progress {
    pub fn inc(&self, delta: u64) {
        self.host.ffi.progress_advance(self.id, delta);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.host.ffi.progress_end(self.id);
    }
}

#[derive(Clone)]
struct StandaloneHost {
    run_dir: String,
    seed: u64,
    cancel: Arc<AtomicBool>,
    next_progress: Arc<AtomicU64>,
}

impl HostFfi for StandaloneHost {
    fn log(&self, level: LogLevel, message: RStr<'_>) {
        eprintln!("[{level:?}] {message}");
    }
    fn progress_begin(&self, _label: RStr<'_>, _total: u64) -> u64 {
        self.next_progress.fetch_add(1, Ordering::Relaxed)
    }
    fn progress_advance(&self, _id: u64, _delta: u64) {}
    fn progress_end(&self, _id: u64) {}
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
    fn run_dir(&self) -> RString {
        RString::from(self.run_dir.as_str())
    }
    fn seed(&self) -> u64 {
        self.seed
    }
}
