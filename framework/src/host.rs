//! The host side of the services a plugin may call: its log lines go into the host's `tracing`
//! (target `recfuse::plugin`, with the component as a field), its progress bars into the host's
//! progress display, and it sees the run's cancellation flag, its directory and its seed.

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RStr, RString};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use abi_stable::std_types::{RResult, RSlice, RVec};
use recfuse_sdk::ffi::{ErrorFfi, FfiResult, HostFfi, HostFfiBox, InstructionFfi, LogLevel, TaskRequestFfi};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::handles::{InstructionsHandle, ViewData};

/// The run's instruction builders by task, and the view they build from: what the host needs
/// to render a task's prompts for a ranker (`Host::instructions`). Filled once the components
/// and the split exist; until then the service answers with an error.
#[derive(Default)]
pub struct Tasks {
    builders: Vec<(String, Arc<Mutex<InstructionsHandle>>)>,
    view: Option<Arc<ViewData>>,
}

impl Tasks {
    pub fn new(builders: Vec<(String, Arc<Mutex<InstructionsHandle>>)>, view: Arc<ViewData>) -> Self {
        Self { builders, view: Some(view) }
    }
    fn render(&self, task: &str, requests: RSlice<'_, TaskRequestFfi>) -> anyhow::Result<RVec<InstructionFfi>> {
        let Some((_, builder)) = self.builders.iter().find(|(t, _)| t == task) else {
            let known: Vec<&str> = self.builders.iter().map(|(t, _)| t.as_str()).collect();
            anyhow::bail!("the run has no instruction task `{task}` (tasks: {})", if known.is_empty() { "none".into() } else { known.join(", ") });
        };
        let view = self.view.as_ref().ok_or_else(|| anyhow::anyhow!("instructions are not available before the data is split"))?;
        let mut b = builder.lock().map_err(|_| anyhow::anyhow!("instruction builder of `{task}` panicked earlier"))?;
        let mut out = b.build_ffi(view, requests)?;
        // The task tag is the host's: the same builder kind may serve two tasks.
        for i in out.iter_mut() {
            i.task = task.into();
        }
        Ok(out)
    }
}

/// The run's instruction tasks, shared by every component's services: their names from the
/// config (known from construction on, so a component can check a task it is configured
/// with), and their builders with the split's view once the data is split (for rendering).
#[derive(Clone, Default)]
pub struct TaskTable {
    names: Arc<Vec<String>>,
    ready: Arc<OnceLock<Tasks>>,
}

impl TaskTable {
    pub fn declared(names: Vec<String>) -> Self {
        Self { names: Arc::new(names), ready: Arc::default() }
    }
    /// The builders and the view to render with; set once.
    pub fn set(&self, tasks: Tasks) {
        let _ = self.ready.set(tasks);
    }
}

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
    pub tasks: TaskTable,
}

impl HostServices {
    /// Services for a component used outside a run (benches, tools, tests): no progress display,
    /// never cancelled, no instruction tasks.
    pub fn detached(component: &str, run_dir: PathBuf, seed: u64) -> Self {
        Self {
            component: Arc::from(component),
            run_dir,
            seed,
            cancel: Arc::new(AtomicBool::new(false)),
            progress: Progress::new(false),
            tasks: TaskTable::default(),
        }
    }

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
    fn tasks(&self) -> RVec<abi_stable::std_types::RString> {
        self.tasks.names.iter().map(|n| n.as_str().into()).collect()
    }
    fn render_instructions(&self, task: abi_stable::std_types::RStr<'_>, requests: RSlice<'_, TaskRequestFfi>) -> FfiResult<RVec<InstructionFfi>> {
        let result = match self.tasks.ready.get() {
            Some(t) => t.render(task.as_str(), requests),
            None => Err(anyhow::anyhow!("instructions of task `{task}` are not available yet (asked before the run's data was split)")),
        };
        match result {
            Ok(v) => RResult::ROk(v),
            Err(e) => RResult::RErr(ErrorFfi::from_anyhow(&e)),
        }
    }
}
