//! The host side of the services a plugin may call: its log lines go into the host's `tracing`
//! (target `recfuse::plugin`, with the component as a field), its progress bars into the host's
//! progress display, and it sees the run's cancellation flag, its directory and its seed.

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RStr, RString};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use recfuse_sdk::ffi::{HostFfi, HostFfiBox, LogLevel};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Progress bars of a run, host stages and plugins alike. Hidden when stderr is not a terminal.
#[derive(Clone)]
pub struct Progress {
    multi: MultiProgress,
    bars: Arc<Mutex<HashMap<u64, ProgressBar>>>,
    next: Arc<AtomicU64>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new(true)
    }
}

impl Progress {
    pub fn new(visible: bool) -> Self {
        let target = if visible { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        Self { multi: MultiProgress::with_draw_target(target), bars: Default::default(), next: Default::default() }
    }

    /// A bar for `total` steps (a spinner when `total` is 0).
    pub fn bar(&self, label: &str, total: u64) -> ProgressBar {
        let bar = if total == 0 { ProgressBar::new_spinner() } else { ProgressBar::new(total) };
        let style = ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bar = self.multi.add(bar.with_style(style).with_prefix(label.to_string()));
        bar
    }

    fn begin(&self, label: &str, total: u64) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.bars.lock().expect("progress lock").insert(id, self.bar(label, total));
        id
    }
    fn advance(&self, id: u64, delta: u64) {
        if let Some(b) = self.bars.lock().expect("progress lock").get(&id) {
            b.inc(delta);
        }
    }
    fn end(&self, id: u64) {
        if let Some(b) = self.bars.lock().expect("progress lock").remove(&id) {
            b.finish_and_clear();
        }
    }
}

/// Services for one component instance.
#[derive(Clone)]
pub struct HostServices {
    pub component: Arc<str>,
    pub run_dir: PathBuf,
    pub seed: u64,
    pub cancel: Arc<AtomicBool>,
    pub progress: Progress,
}

impl HostServices {
    pub fn into_ffi(self) -> HostFfiBox {
        HostFfiBox::from_ptr(RArc::new(self), TD_Opaque)
    }
}

impl HostFfi for HostServices {
    fn log(&self, level: LogLevel, message: RStr<'_>) {
        let c = &*self.component;
        let m = message.as_str();
        match level {
            LogLevel::Error => tracing::error!(target: "recfuse::plugin", component = c, "{m}"),
            LogLevel::Warn => tracing::warn!(target: "recfuse::plugin", component = c, "{m}"),
            LogLevel::Info => tracing::info!(target: "recfuse::plugin", component = c, "{m}"),
            LogLevel::Debug => tracing::debug!(target: "recfuse::plugin", component = c, "{m}"),
        }
    }
    fn progress_begin(&self, label: RStr<'_>, total: u64) -> u64 {
        self.progress.begin(label.as_str(), total)
    }
    fn progress_advance(&self, id: u64, delta: u64) {
        self.progress.advance(id, delta)
    }
    fn progress_end(&self, id: u64) {
        self.progress.end(id)
    }
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
    fn run_dir(&self) -> RString {
        RString::from(self.run_dir.to_string_lossy().as_ref())
    }
    fn seed(&self) -> u64 {
        self.seed
    }
}
