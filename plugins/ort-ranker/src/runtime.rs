//! ONNX Runtime, loaded at run time (ort's `load-dynamic`): finding the library, choosing the
//! execution provider (never silently falling back to the CPU), checking a model's inputs against
//! what the caller will feed, and a pool of sessions so batches run concurrently
//! (`Session::run` takes `&mut self`).

use anyhow::{anyhow, bail, ensure, Context, Result};
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

/// Where `scripts/fetch-data.sh onnxruntime` puts the library, relative to the working directory.
pub const DEFAULT_LIBRARY: &str = ".cache/data/onnxruntime/libonnxruntime.so.1.31.1";

/// The process's ONNX Runtime once loaded (the library can be loaded once per process). A failed
/// load is not kept: a later call with a corrected path tries again.
static RUNTIME: Mutex<Option<(PathBuf, ort::environment::Environment)>> = Mutex::new(None);

/// The library to load: `configured` (a config's `runtime_library`), else `ORT_DYLIB_PATH`, else
/// [`DEFAULT_LIBRARY`]; with where the choice came from, for error messages.
fn library_path(configured: Option<&Path>) -> (PathBuf, &'static str) {
    if let Some(p) = configured {
        return (p.to_path_buf(), "the config's `runtime_library`");
    }
    match std::env::var_os("ORT_DYLIB_PATH") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), "ORT_DYLIB_PATH"),
        _ => (PathBuf::from(DEFAULT_LIBRARY), "the default location"),
    }
}

/// Loads ONNX Runtime (once per process) and returns its environment. A missing or broken library
/// is an error naming the path and how to get it, never a panic.
pub fn environment(configured: Option<&Path>) -> Result<ort::environment::Environment> {
    let (path, origin) = library_path(configured);
    let mut runtime = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((loaded, env)) = runtime.as_ref() {
        if configured.is_some_and(|c| c != loaded) {
            tracing::warn!(loaded = %loaded.display(), asked = %path.display(), "ONNX Runtime is already loaded in this process; using it");
        }
        return Ok(env.clone());
    }
    ensure!(
        path.is_file(),
        "ONNX Runtime library not found at {} ({origin}): run `scripts/fetch-data.sh onnxruntime`, or point `runtime_library` or ORT_DYLIB_PATH at libonnxruntime.so",
        path.display()
    );
    let env = ort::init_from(&path)
        .map_err(|e| anyhow!("loading ONNX Runtime from {} ({origin}): {e}", path.display()))?
        .with_name("recfuse")
        .build()
        .map_err(|e| anyhow!("starting ONNX Runtime from {}: {e}", path.display()))?;
    *runtime = Some((path, env.clone()));
    Ok(env)
}

/// Where a model runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    #[default]
    Cpu,
    /// The CUDA execution provider; its absence is an error, not a fallback.
    Cuda,
}

/// How sessions are made.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub provider: Provider,
    pub cuda_device: i32,
    /// Sessions in the pool (batches scored at once).
    pub sessions: usize,
    /// Threads each session uses inside an operator; 0 = the cores divided among the sessions.
    pub threads: usize,
    pub runtime_library: Option<PathBuf>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self { provider: Provider::Cpu, cuda_device: 0, sessions: 1, threads: 0, runtime_library: None }
    }
}

/// One session of `model` (the file, for messages) from `bytes`.
fn session(bytes: &[u8], model: &Path, opts: &SessionOptions) -> Result<Session> {
    let env = environment(opts.runtime_library.as_deref())?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = if opts.threads > 0 { opts.threads } else { (cores / opts.sessions.max(1)).max(1) };
    fn err(what: &'static str) -> impl Fn(ort::Error<ort::session::builder::SessionBuilder>) -> anyhow::Error {
        move |e| anyhow!("{what}: {e}")
    }
    let mut builder = Session::builder(&env)
        .map_err(|e| anyhow!("creating an ONNX Runtime session: {e}"))?
        .with_intra_threads(threads)
        .map_err(err("setting session threads"))?
        .with_inter_threads(1)
        .map_err(err("setting session threads"))?;
    if opts.provider == Provider::Cuda {
        let cuda = ort::ep::CUDA::default().with_device_id(opts.cuda_device).build().error_on_failure();
        builder = builder.with_execution_providers([cuda]).map_err(|e| {
            anyhow!(
                "`provider = \"cuda\"`: the CUDA execution provider is not available ({e}). The onnxruntime wheel fetched by scripts/fetch-data.sh is CPU-only: point `runtime_library` at onnxruntime-gpu's libonnxruntime.so (CUDA 13, cuDNN 9), or use `provider = \"cpu\"`"
            )
        })?;
    }
    builder.commit_from_memory(bytes).map_err(|e| anyhow!("{}: not a model ONNX Runtime can load: {e}", model.display()))
}

/// An input or output a caller will feed or read: its name, element type and shape, with -1 for
/// a dimension that varies (the batch).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub ty: TensorElementType,
    pub shape: Vec<i64>,
}

fn describe(ty: &ValueType) -> String {
    match ty {
        ValueType::Tensor { ty, shape, .. } => format!("{ty:?} {:?}", shape.iter().copied().collect::<Vec<i64>>()),
        other => format!("{other:?}"),
    }
}

/// Checks one side (inputs or outputs) of a model against what the caller expects: the same
/// names, each with the expected element type and rank, and every fixed dimension equal (a
/// dimension left free by either side, -1, matches anything).
fn check_side(model: &Path, side: &str, got: &[ort::value::Outlet], want: &[TensorSpec]) -> Result<()> {
    let names = |v: Vec<&str>| v.join(", ");
    let got_names: Vec<&str> = got.iter().map(|o| o.name()).collect();
    for w in want {
        let Some(o) = got.iter().find(|o| o.name() == w.name) else {
            bail!("{}: the model has no {side} `{}` (its {side}s: {})", model.display(), w.name, names(got_names));
        };
        let ok = match o.dtype() {
            ValueType::Tensor { ty, shape, .. } => {
                *ty == w.ty && shape.len() == w.shape.len() && shape.iter().zip(&w.shape).all(|(&g, &e)| g < 0 || e < 0 || g == e)
            }
            _ => false,
        };
        ensure!(
            ok,
            "{}: {side} `{}` is {} in the model, but {:?} {:?} is expected",
            model.display(),
            w.name,
            describe(o.dtype()),
            w.ty,
            w.shape
        );
    }
    if side == "input" {
        let extra: Vec<&str> = got_names.iter().copied().filter(|n| !want.iter().any(|w| w.name == *n)).collect();
        ensure!(extra.is_empty(), "{}: the model also wants input(s) {} that nothing feeds", model.display(), names(extra));
    }
    Ok(())
}

/// Sessions of one model, each used by one batch at a time. Waiting callers are served first
/// come, first served, so a burst of requests does not starve one of them.
pub struct SessionPool {
    state: Mutex<PoolState>,
    changed: Condvar,
    size: usize,
    pub model: PathBuf,
}

struct PoolState {
    free: Vec<Session>,
    /// The next ticket to hand out, and the oldest ticket still waiting to be served.
    next_ticket: u64,
    serving: u64,
}

impl SessionPool {
    /// Loads `model` into `opts.sessions` sessions after checking its inputs and outputs.
    pub fn load(model: &Path, inputs: &[TensorSpec], outputs: &[TensorSpec], opts: &SessionOptions) -> Result<Self> {
        let bytes = std::fs::read(model).with_context(|| format!("reading the ONNX model {}", model.display()))?;
        Self::from_bytes(&bytes, model, inputs, outputs, opts)
    }

    /// As [`SessionPool::load`], from the model's bytes (`model` names it in messages).
    pub fn from_bytes(bytes: &[u8], model: &Path, inputs: &[TensorSpec], outputs: &[TensorSpec], opts: &SessionOptions) -> Result<Self> {
        let size = opts.sessions.max(1);
        let first = session(bytes, model, opts)?;
        check_side(model, "input", first.inputs(), inputs)?;
        check_side(model, "output", first.outputs(), outputs)?;
        let mut free = vec![first];
        for _ in 1..size {
            free.push(session(bytes, model, opts)?);
        }
        let state = PoolState { free, next_ticket: 0, serving: 0 };
        Ok(Self { state: Mutex::new(state), changed: Condvar::new(), size, model: model.to_path_buf() })
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs `job(0..jobs)` on up to one thread per session (each job takes a session with
    /// [`SessionPool::with`]), and returns the results in job order. The first error wins.
    pub fn parallel<T: Send>(&self, jobs: usize, job: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done: Vec<Result<Vec<(usize, T)>>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..self.size.min(jobs))
                .map(|_| {
                    let (next, job) = (&next, &job);
                    scope.spawn(move || {
                        let mut done = Vec::new();
                        loop {
                            let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if j >= jobs {
                                return Ok(done);
                            }
                            done.push((j, job(j)?));
                        }
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap_or_else(|_| Err(anyhow!("an ONNX Runtime worker panicked")))).collect()
        });
        let mut results: Vec<(usize, T)> = Vec::with_capacity(jobs);
        for d in done {
            results.extend(d?);
        }
        results.sort_by_key(|(j, _)| *j);
        Ok(results.into_iter().map(|(_, t)| t).collect())
    }

    /// Runs `f` with a session of the pool, waiting (in arrival order) for one to be free.
    pub fn with<T>(&self, f: impl FnOnce(&mut Session) -> Result<T>) -> Result<T> {
        let session = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let ticket = st.next_ticket;
            st.next_ticket += 1;
            loop {
                if st.serving == ticket {
                    if let Some(s) = st.free.pop() {
                        st.serving += 1;
                        // The next in line may find a session free too.
                        self.changed.notify_all();
                        break s;
                    }
                }
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        // Returned even when `f` fails or panics, so the pool never shrinks.
        struct Return<'a>(&'a SessionPool, Option<Session>);
        impl Drop for Return<'_> {
            fn drop(&mut self) {
                if let Some(s) = self.1.take() {
                    self.0.state.lock().unwrap_or_else(|p| p.into_inner()).free.push(s);
                    self.0.changed.notify_all();
                }
            }
        }
        let mut lent = Return(self, Some(session));
        f(lent.1.as_mut().expect("lent session"))
    }
}
