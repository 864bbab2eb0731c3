//! The pipeline runner: builds every component from config first (so errors surface before any
//! work), then runs the stages source → split → fuse → instructions → tune → rank/evaluate
//! (each a module of [`crate::stages`]), writing its artifacts into the run directory. A stage
//! whose inputs are unchanged is skipped; an interrupted stage resumes from its journal.

use crate::config::{locate, ComponentSpec, ConfigErrors, LoadedConfig, PipelineConfig};
use crate::eval::{self, Report};
use crate::handles::*;
use crate::host::{HostServices, Progress, TaskTable, Tasks};
use crate::knowledge::KnowledgeBase;
use crate::registry::Registry;
use crate::runstore::*;
use crate::shard::{self, Plan, PlannedRanker, ShardSpec};
use crate::eval::RerankInfo;
use crate::split::split_dataset;
use crate::stages::{self, Runner};
use anyhow::{bail, Context, Result};
use recfuse_sdk::ffi::{ComponentKind, HostFfiBox};
use recfuse_sdk::records::*;
use recfuse_sdk::SeededRng;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How to run, besides the config.
#[derive(Clone)]
pub struct RunOptions {
    /// Overrides `run.dir/run.name`.
    pub run_dir: Option<PathBuf>,
    pub show_progress: bool,
    /// Set to ask the run to stop at the next batch boundary (Ctrl-C).
    pub cancel: Arc<AtomicBool>,
    /// The whole run, or a part of a sharded one ([`crate::shard`]).
    pub role: Role,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { run_dir: None, show_progress: false, cancel: Arc::new(AtomicBool::new(false)), role: Role::Whole }
    }
}

/// What a process does of a run (docs/scale-out.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Every stage, every user.
    Whole,
    /// The per-user stages for the users of one shard: fusion, and once the run is prepared,
    /// evaluation.
    Shard(ShardSpec),
    /// The global stages: merge the shards' knowledge, build instructions, tune, fit rankers.
    Prepare,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Whole => f.write_str("whole"),
            Role::Shard(s) => write!(f, "shard {s}"),
            Role::Prepare => f.write_str("prepare"),
        }
    }
}

/// What a run did.
#[derive(Debug)]
pub struct RunOutcome {
    pub run_dir: PathBuf,
    /// One report per ranker, in config order (a failed model's has `error` set).
    pub reports: Vec<Report>,
    /// Each stage and whether it ran afresh, resumed or was skipped.
    pub stages: Vec<(String, StageStart)>,
    /// Rankers this process needed, and whether each was fitted or restored from its save.
    pub models: Vec<(String, stages::rank::ModelStart)>,
    /// What to do next, for the parts of a sharded run.
    pub note: Option<String>,
}

impl RunOutcome {
    /// The report of the ranker labelled `label`.
    pub fn report(&self, label: &str) -> Option<&Report> {
        self.reports.iter().find(|r| r.model == label)
    }
    /// Labels of the models that failed.
    pub fn failed(&self) -> Vec<&str> {
        self.reports.iter().filter(|r| r.error.is_some()).map(|r| r.model.as_str()).collect()
    }
    pub fn stage(&self, name: &str) -> Option<StageStart> {
        self.stages.iter().find(|(n, _)| n == name).map(|(_, s)| *s)
    }
    pub fn model(&self, label: &str) -> Option<stages::rank::ModelStart> {
        self.models.iter().find(|(n, _)| n == label).map(|(_, s)| *s)
    }
}

/// The registry a config asks for: built-ins, its plugin paths and directories, and
/// `RECFUSE_PLUGIN_PATH`. An explicit path that fails is an error; a bad file in a directory is
/// a warning (one broken library should not hide the others).
pub fn registry_for(cfg: &PipelineConfig) -> Result<Registry> {
    let mut r = Registry::with_builtins()?;
    for p in &cfg.plugins.paths {
        r.load_library(p).with_context(|| format!("config key `plugins.paths`: {}", p.display()))?;
    }
    let mut problems = Vec::new();
    for d in &cfg.plugins.dirs {
        problems.extend(r.load_dir(d)?);
    }
    problems.extend(r.load_env_path()?);
    for e in problems {
        tracing::warn!("skipped plugin library: {e:#}");
    }
    Ok(r)
}

/// Turns a component's start-up error into a config error naming the key and its file.
fn component_error(cfg: &LoadedConfig, spec: &ComponentSpec, err: &anyhow::Error) -> String {
    for cause in err.chain() {
        let msg = cause.to_string();
        if let Some(rest) = msg.strip_prefix("invalid config at key `") {
            if let Some((path, inner)) = rest.split_once("`: ") {
                let (key, m) = locate(&spec.key, path, inner);
                return cfg.key_error(&key, m);
            }
        }
        if let Some(inner) = msg.strip_prefix("invalid config: ") {
            let (key, m) = locate(&spec.key, "", inner);
            return cfg.key_error(&key, m);
        }
        if msg.starts_with("unknown ") && msg.contains("available") {
            return cfg.key_error(&format!("{}.kind", spec.key), msg);
        }
    }
    cfg.key_error(&spec.key, format!("{err:#}"))
}

/// All components of a pipeline, built.
pub struct Components {
    pub source: SourceHandle,
    pub fusers: Vec<FuserHandle>,
    /// `[embed]`'s text encoder.
    pub embedder: Option<crate::embed::Embedder>,
    /// One builder per task, shared with the host service that renders prompts for rankers.
    pub instructions: Vec<(String, Arc<Mutex<InstructionsHandle>>)>,
    pub tuner: Option<TunerHandle>,
    pub rankers: Vec<RankerHandle>,
}

impl Components {
    pub fn provenance(&self) -> Vec<Provenance> {
        let mut v = vec![self.source.provenance.clone()];
        v.extend(self.fusers.iter().map(|f| f.provenance.clone()));
        v.extend(self.instructions.iter().map(|(_, b)| b.lock().expect("builder lock").provenance.clone()));
        v.extend(self.tuner.iter().map(|f| f.provenance.clone()));
        v.extend(self.rankers.iter().map(|f| f.provenance.clone()));
        v
    }
}

/// Builds every component, collecting every error (for `recfuse validate` and before a run).
pub fn build_components(
    cfg: &LoadedConfig,
    registry: &Registry,
    host_for: &dyn Fn(&str) -> HostFfiBox,
) -> std::result::Result<Components, ConfigErrors> {
    let p = &cfg.pipeline;
    let mut errors = Vec::new();
    macro_rules! make {
        ($spec:expr, $kind:expr, $method:ident) => {{
            let spec: &ComponentSpec = $spec;
            match registry.find($kind, &spec.kind) {
                Err(e) => {
                    errors.push(cfg.key_error(&format!("{}.kind", spec.key), e));
                    None
                }
                Ok(_) => match registry.$method(&spec.kind, &spec.settings, host_for(&spec.key)) {
                    Ok(h) => Some(h),
                    Err(e) => {
                        errors.push(component_error(cfg, spec, &e));
                        None
                    }
                },
            }
        }};
    }
    let source = make!(&p.source, ComponentKind::Source, source);
    let fusers: Vec<Option<FuserHandle>> = p.fusers.iter().map(|f| make!(f, ComponentKind::Fuser, fuser)).collect();
    let instructions: Vec<Option<InstructionsHandle>> = p.instructions.iter().map(|s| make!(s, ComponentKind::Instructions, instructions)).collect();
    let tuner = p.tuner.as_ref().map(|s| make!(s, ComponentKind::Tuner, tuner));
    let rankers: Vec<Option<RankerHandle>> = p.rankers.iter().map(|r| make!(r, ComponentKind::Ranker, ranker)).collect();
    let embedder = p.embed.as_ref().and_then(|e| match crate::embed::Embedder::load(e) {
        Ok(e) => Some(e),
        Err(err) => {
            errors.push(cfg.key_error("embed", format!("{err:#}")));
            None
        }
    });
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Components {
        source: source.expect("checked"),
        fusers: fusers.into_iter().map(|f| f.expect("checked")).collect(),
        embedder,
        instructions: p
            .instructions
            .iter()
            .zip(instructions)
            .map(|(s, i)| (s.label.clone(), Arc::new(Mutex::new(i.expect("checked")))))
            .collect(),
        tuner: tuner.map(|i| i.expect("checked")),
        rankers: rankers.into_iter().map(|r| r.expect("checked")).collect(),
    })
}

/// The errors of every component a partly valid config names (see
/// [`LoadedConfig::load_partial`]): host-level errors do not hide them.
pub fn component_errors(cfg: &LoadedConfig) -> Vec<String> {
    let registry = match registry_for(&cfg.pipeline) {
        Ok(r) => r,
        Err(e) => return vec![format!("{e:#}")],
    };
    let Ok(scratch) = tempfile_dir() else { return vec![] };
    let tasks = TaskTable::declared(cfg.pipeline.instructions.iter().map(|s| s.label.clone()).collect());
    let (progress, cancel) = (Progress::new(false), Arc::new(AtomicBool::new(false)));
    let host_for = |key: &str| {
        HostServices { component: Arc::from(key), run_dir: scratch.clone(), seed: 0, cancel: cancel.clone(), progress: progress.clone(), tasks: tasks.clone() }
            .into_ffi()
    };
    match build_components(cfg, &registry, &host_for) {
        Ok(_) => vec![],
        // A section that failed to parse left a placeholder with no kind: already reported.
        Err(ConfigErrors(errors)) => errors.into_iter().filter(|e| !e.contains("config key `source.kind`") || !cfg.pipeline.source.kind.is_empty()).collect(),
    }
}

/// `recfuse validate`: the config parses and every component accepts its table.
pub fn validate(cfg: &LoadedConfig) -> Result<Vec<Provenance>> {
    let registry = registry_for(&cfg.pipeline)?;
    let scratch = tempfile_dir()?;
    let progress = Progress::new(false);
    let cancel = Arc::new(AtomicBool::new(false));
    let tasks = TaskTable::declared(cfg.pipeline.instructions.iter().map(|s| s.label.clone()).collect());
    let host_for = |key: &str| HostServices {
        component: Arc::from(key),
        run_dir: scratch.clone(),
        seed: 0,
        cancel: cancel.clone(),
        progress: progress.clone(),
        tasks: tasks.clone(),
    }
    .into_ffi();
    let mut c = build_components(cfg, &registry, &host_for)?;
    // The data too: a source that cannot read its files, and the work the rankers would do.
    let dataset = load_dataset(&mut c.source, &cfg.pipeline).map_err(|e| ConfigErrors(vec![cfg.key_error("source", format!("{e:#}"))]))?;
    let split = split_dataset(&dataset, &cfg.pipeline.split);
    check_costs(cfg, &c.rankers, eval::pick_users(&split, cfg.pipeline.eval.max_users).len(), dataset.catalog.items.len())?;
    Ok(c.provenance())
}

/// Refuses costly rankers asked to score more than the budget allows (`eval.max_ranker_seconds`),
/// with the estimate, before any work starts.
pub fn check_costs(cfg: &LoadedConfig, rankers: &[RankerHandle], users: usize, items: usize) -> std::result::Result<(), ConfigErrors> {
    let p = &cfg.pipeline;
    let mut errors = Vec::new();
    for (spec, ranker) in p.rankers.iter().zip(rankers) {
        let per_pair = ranker.seconds_per_candidate();
        let per_user = match (&spec.rerank, p.eval.protocol) {
            (Some(rr), _) => rr.top,
            (None, crate::config::Protocol::Full) => items,
            (None, crate::config::Protocol::Sampled) => p.eval.negatives + 1,
        };
        let seconds = per_pair * (users * per_user) as f64;
        if seconds > p.eval.max_ranker_seconds {
            let fix = if spec.rerank.is_none() {
                format!("rerank another ranker's top candidates instead, e.g. `rerank = {{ from = \"popularity\", top = 50 }}` (≈ {:.0} s)", per_pair * (users * 50) as f64)
            } else {
                "lower `rerank.top` or `eval.max_users`".to_string()
            };
            errors.push(cfg.key_error(
                &spec.key,
                format!(
                    "ranker `{}` would score {users} users × {per_user} candidates at ≈ {per_pair:.2e} s each: ≈ {:.1} h, over `eval.max_ranker_seconds` = {}; {fix}",
                    spec.label,
                    seconds / 3600.0,
                    p.eval.max_ranker_seconds
                ),
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("recfuse-validate-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// A per-component seed derived from the run seed, so components do not share streams.
pub fn derive_seed(seed: u64, what: &str) -> u64 {
    let h = hash_parts(&[&seed.to_le_bytes(), what.as_bytes()]);
    u64::from_str_radix(&h[..16], 16).expect("hex")
}

fn hash_dataset(d: &Dataset) -> String {
    let mut bytes = Vec::with_capacity(d.events.len() * 32);
    for e in &d.events {
        for x in [e.user, e.item, e.kind, e.scenario, e.subject] {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        bytes.extend_from_slice(&e.value.to_le_bytes());
        bytes.extend_from_slice(&e.timestamp.to_le_bytes());
    }
    let catalog = serde_json::to_vec(&d.catalog).expect("catalog serializes");
    hash_parts(&[&catalog, &bytes])
}

pub use crate::knowledge::KnowledgeRecord;
pub use crate::stages::instructions::InstructionRecord;

#[derive(Serialize, Debug, Clone)]
pub struct FileHash {
    path: String,
    sha256: String,
}

#[derive(Serialize, Debug, Clone, Default)]
pub struct DatasetSummary {
    users: usize,
    items: usize,
    events: usize,
    kinds: Vec<String>,
    skipped_lines: u64,
    evaluable_users: usize,
    sha256: String,
}

#[derive(Serialize, Debug, Clone)]
pub struct Manifest {
    recfuse_version: &'static str,
    sdk_abi: String,
    run: String,
    /// `whole`, `prepare` or `shard i/n`.
    role: String,
    seed: u64,
    config_files: Vec<FileHash>,
    inputs: Vec<FileHash>,
    dataset: DatasetSummary,
    components: Vec<Provenance>,
    pub stages: BTreeMap<String, serde_json::Value>,
    /// The tuner's artifact (kind, path, and its metadata: base model and sha256, adapters,
    /// tasks, training figures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tuner: Option<serde_json::Value>,
    /// Token usage and cost of components that report it (`usage.json` in their run directory,
    /// e.g. the LLM fusers), by component directory.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub usage: BTreeMap<String, serde_json::Value>,
}

/// Runs a pipeline end to end.
pub fn run(cfg: &LoadedConfig, opts: &RunOptions) -> Result<RunOutcome> {
    let registry = registry_for(&cfg.pipeline)?;
    run_with(cfg, &registry, opts)
}

/// The key of every stage of a run: a hash of everything its outputs depend on, chained, so a
/// change reruns that stage and every stage after it. Computed before any stage runs, so a
/// shard can tell whether the run was prepared with its own config.
struct StageKeys {
    fuse: Option<String>,
    instructions: Option<String>,
    tune: Option<String>,
    /// Per ranker, in config order.
    fit: Vec<String>,
    evaluate: Vec<String>,
    /// All of the above.
    plan: String,
}

impl StageKeys {
    fn compute(p: &PipelineConfig, c: &Components, dataset_sha: &str) -> Result<Self> {
        let version_of = |prov: &Provenance| prov.code_identity();
        let spec_json = |s: &ComponentSpec| serde_json::to_string(&(&s.kind, &s.settings)).unwrap_or_default();
        let split_json = serde_json::to_string(&p.split)?;
        // Every stage's key chains from this one, so a new seed (negatives, sampling, training)
        // reruns everything after the split.
        let mut key = hash_parts(&[dataset_sha.as_bytes(), split_json.as_bytes(), &p.run.seed.to_le_bytes()]);
        let mut fuse = None;
        if !c.fusers.is_empty() {
            let mut parts: Vec<String> = p.fusers.iter().zip(&c.fusers).map(|(s, f)| format!("{}|{}", spec_json(s), version_of(&f.provenance))).collect();
            parts.extend(c.embedder.as_ref().map(|e| format!("embed|{}", e.fingerprint())));
            key = hash_parts(&[key.as_bytes(), b"fuse", parts.join("\n").as_bytes()]);
            fuse = Some(key.clone());
        }
        let mut instructions = None;
        if !c.instructions.is_empty() {
            let parts: Vec<String> = p
                .instructions
                .iter()
                .zip(&c.instructions)
                .map(|(s, (task, b))| format!("{task}|{}|{}", spec_json(s), version_of(&b.lock().expect("builder lock").provenance)))
                .collect();
            key = hash_parts(&[key.as_bytes(), b"instructions", parts.join("\n").as_bytes(), &p.run.seed.to_le_bytes()]);
            instructions = Some(key.clone());
        }
        let mut tune = None;
        if let (Some(spec), Some(tuner)) = (&p.tuner, c.tuner.as_ref()) {
            key = hash_parts(&[key.as_bytes(), b"tune", spec_json(spec).as_bytes(), version_of(&tuner.provenance).as_bytes()]);
            tune = Some(key.clone());
        }
        let fit: Vec<String> = p
            .rankers
            .iter()
            .zip(&c.rankers)
            .map(|(spec, handle)| {
                hash_parts(&[key.as_bytes(), b"fit", spec_json(spec).as_bytes(), version_of(&handle.provenance).as_bytes(), &p.run.seed.to_le_bytes()])
            })
            .collect();
        let eval_json = serde_json::to_string(&p.eval)?;
        let evaluate: Vec<String> = p
            .rankers
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let first_key = spec
                    .rerank
                    .as_ref()
                    .map(|rr| {
                        let f = p.rankers.iter().position(|s| s.label == rr.from).expect("checked by config");
                        format!("{}|{}", fit[f], rr.top)
                    })
                    .unwrap_or_default();
                hash_parts(&[fit[i].as_bytes(), b"evaluate", eval_json.as_bytes(), first_key.as_bytes()])
            })
            .collect();
        let all: Vec<&str> = fuse.iter().chain(&instructions).chain(&tune).chain(&fit).chain(&evaluate).map(|s| s.as_str()).collect();
        let plan = hash_parts(&[key.as_bytes(), all.join("|").as_bytes()]);
        Ok(Self { fuse, instructions, tune, fit, evaluate, plan })
    }
}

pub fn run_with(cfg: &LoadedConfig, registry: &Registry, opts: &RunOptions) -> Result<RunOutcome> {
    let p = &cfg.pipeline;
    let root = opts.run_dir.clone().unwrap_or_else(|| p.run.dir.join(&p.run.name));
    let shard = match opts.role {
        Role::Shard(s) => Some(s),
        _ => None,
    };
    // A shard works in its own directory (its journals, components and manifest), and reads
    // what `prepare` left in the run directory.
    let main = RunDir::create(root.clone())?;
    let run = match shard {
        Some(s) => RunDir::create(s.dir(&root))?,
        None => RunDir::create(root.clone())?,
    };
    let redacted = cfg.redacted();
    let resolved = toml::to_string_pretty(&redacted).unwrap_or_else(|_| serde_json::to_string_pretty(&redacted).unwrap_or_default());
    write_atomic(&run.path("config.resolved.toml"), resolved.as_bytes())?;

    let progress = Progress::new(opts.show_progress);
    let tasks = TaskTable::declared(p.instructions.iter().map(|s| s.label.clone()).collect());
    let host_for = |key: &str| {
        let dir = run.root.join("components").join(key.replace(['[', ']'], ""));
        let _ = std::fs::create_dir_all(&dir);
        HostServices {
            component: Arc::from(key),
            run_dir: dir,
            seed: derive_seed(p.run.seed, key),
            cancel: opts.cancel.clone(),
            progress: progress.clone(),
            tasks: tasks.clone(),
        }
        .into_ffi()
    };
    let mut c = build_components(cfg, registry, &host_for)?;

    let config_files = cfg
        .files
        .iter()
        .map(|f| Ok(FileHash { path: f.display().to_string(), sha256: hash_file(f)? }))
        .collect::<Result<Vec<_>>>()?;
    let manifest = Manifest {
        recfuse_version: env!("CARGO_PKG_VERSION"),
        sdk_abi: recfuse_sdk::SDK_ABI_VERSION.to_string(),
        run: p.run.name.clone(),
        role: opts.role.to_string(),
        seed: p.run.seed,
        config_files,
        inputs: vec![],
        dataset: DatasetSummary::default(),
        components: c.provenance(),
        stages: BTreeMap::new(),
        tuner: None,
        usage: BTreeMap::new(),
    };
    let prepared_dir = shard.map(|_| main.root.clone());
    let mut r = Runner { cfg, run, opts, progress, manifest, stages: vec![], prepared: prepared_dir };

    // Source: always read (cheap next to the stages after it); its content hash keys the rest.
    let t = Instant::now();
    let dataset = load_dataset(&mut c.source, p)?;
    for input in &dataset.inputs {
        let path = Path::new(input);
        if path.is_file() {
            r.manifest.inputs.push(FileHash { path: input.clone(), sha256: hash_file(path)? });
        }
    }
    let split = split_dataset(&dataset, &p.split);
    r.manifest.dataset = DatasetSummary {
        users: dataset.catalog.users.len(),
        items: dataset.catalog.items.len(),
        events: dataset.events.len(),
        kinds: dataset.catalog.kinds.clone(),
        skipped_lines: dataset.skipped,
        evaluable_users: split.evaluable_users().len(),
        sha256: hash_dataset(&dataset),
    };
    tracing::info!(
        users = r.manifest.dataset.users,
        items = r.manifest.dataset.items,
        events = r.manifest.dataset.events,
        seconds = t.elapsed().as_secs_f64(),
        "loaded dataset"
    );
    let all_users = eval::pick_users(&split, p.eval.max_users);
    let users: Vec<UserIdx> = match shard {
        Some(s) => all_users.iter().copied().filter(|&u| s.owns(&dataset.catalog.users[u as usize].id)).collect(),
        None => all_users.clone(),
    };
    check_costs(cfg, &c.rankers, users.len(), dataset.catalog.items.len())?;
    // From here on rankers may ask the host to render their task's prompts.
    tasks.set(Tasks::new(c.instructions.clone(), split.history.clone()));
    let keys = StageKeys::compute(p, &c, &r.manifest.dataset.sha256)?;

    if let Some(key) = &keys.fuse {
        let batch = p.run.batch_size;
        match opts.role {
            Role::Whole => r.stage("fuse", key, &stages::fuse::OUTPUTS, |r, _| stages::fuse::run(r, &mut c.fusers, c.embedder.as_mut(), &split.history, batch, None))?,
            Role::Shard(s) if !main.is_done("fuse", key) => {
                r.stage("fuse", key, &stages::fuse::OUTPUTS, |r, _| stages::fuse::run(r, &mut c.fusers, c.embedder.as_mut(), &split.history, batch, Some(s)))?
            }
            Role::Shard(_) => tracing::info!(stage = "fuse", "merged into the run directory by `prepare`, skipped"),
            Role::Prepare if !main.is_done("fuse", key) => {
                shard::merge_knowledge(&r.run, key, batch).context(
                    "prepare merges the knowledge the shards fused: run `recfuse run CONFIG --shard i/n` for every shard first (or the whole run unsharded: `recfuse run CONFIG`)",
                )?;
            }
            Role::Prepare => tracing::info!(stage = "fuse", "shards already merged, skipped"),
        }
        r.record_usage()?;
    }
    // A shard goes past fusion only once `prepare` has run the global stages with its keys.
    if let Some(s) = shard {
        match Plan::read(&main.root)? {
            Some(plan) if plan.key == keys.plan => {}
            // Prepared for this run's knowledge but with other settings after it: refuse. A plan
            // older than the knowledge this shard just fused is simply not this run's yet.
            Some(_) if keys.fuse.as_ref().is_none_or(|k| main.is_done("fuse", k)) => bail!(
                "{} was prepared with another config or dataset than shard {s} runs with: run `recfuse prepare` with this config again (or use another run directory)",
                main.root.display()
            ),
            _ => {
                r.save_manifest()?;
                let note = format!("shard {s} is done until the run is prepared: next `recfuse prepare CONFIG` (once every shard is here), then this command again to evaluate");
                return Ok(RunOutcome { run_dir: r.run.root.clone(), reports: vec![], stages: r.stages, models: vec![], note: Some(note) });
            }
        }
    }
    // Read at most once, and only if a stage after fusion runs.
    let knowledge_cell = std::cell::OnceCell::new();
    let knowledge = || -> Result<&KnowledgeBase> {
        if knowledge_cell.get().is_none() {
            let _ = knowledge_cell.set(KnowledgeBase::load(&main.root)?);
        }
        Ok(knowledge_cell.get().expect("just set"))
    };

    if let (Some(key), None) = (&keys.instructions, shard) {
        let seed = derive_seed(p.run.seed, "negatives");
        r.stage("instructions", key, &[stages::instructions::OUTPUT], |r, _| {
            stages::instructions::run(r, &c.instructions, &split, &dataset, knowledge()?, seed)
        })?;
    }

    let mut artifact: Option<Artifact> = None;
    if let (Some(key), Some(tuner)) = (&keys.tune, c.tuner.as_mut()) {
        if shard.is_none() {
            r.stage("tune", key, &stages::tune::OUTPUTS, |r, _| stages::tune::run(r, tuner, &split.history, knowledge()?))?;
        }
        let a = stages::tune::artifact(&main.root)?;
        let meta: serde_json::Value = serde_json::from_str(&a.meta).unwrap_or(serde_json::Value::String(a.meta.clone()));
        r.manifest.tuner = Some(serde_json::json!({"kind": a.kind, "path": a.path, "meta": meta}));
        r.save_manifest()?;
        artifact = Some(a);
    }

    let valid = split.validation_targets();
    let mut slots: Vec<stages::rank::RankerSlot> = p
        .rankers
        .iter()
        .zip(std::mem::take(&mut c.rankers))
        .zip(&keys.fit)
        .map(|((spec, handle), fit_key)| stages::rank::RankerSlot { label: spec.label.clone(), fit_key: fit_key.clone(), handle, obtained: None })
        .collect();
    if opts.role == Role::Prepare {
        // Every ranker fitted and saved once, for the shards to restore (one saved under its
        // key by an earlier prepare is left as it is).
        for slot in slots.iter_mut().filter(|s| !stages::rank::saved_under(&stages::rank::model_dir(&r, &s.label), &s.fit_key)) {
            let fit_data = FitData::of_run(&split, knowledge()?, artifact.as_ref(), &valid);
            stages::rank::ensure_fitted(&r, slot, &fit_data).with_context(|| format!("ranker `{}`", slot.label))?;
        }
        let plan = Plan {
            key: keys.plan.clone(),
            frame: eval::ReportFrame::new(&split, &p.eval),
            users: all_users.len(),
            users_sha256: Plan::users_hash(&all_users),
            rankers: p
                .rankers
                .iter()
                .zip(&keys.evaluate)
                .map(|(spec, key)| PlannedRanker {
                    label: spec.label.clone(),
                    key: key.clone(),
                    reranked: spec.rerank.as_ref().map(|rr| RerankInfo { from: rr.from.clone(), top: rr.top }),
                })
                .collect(),
            skipped_lines: dataset.skipped,
        };
        plan.write(&r.run.root)?;
        let models = slots.iter().filter_map(|s| Some((s.label.clone(), s.obtained?))).collect();
        r.save_manifest()?;
        let note = "prepared: next `recfuse run CONFIG --shard i/n` for every shard, then `recfuse merge RUN_DIR`".to_string();
        return Ok(RunOutcome { run_dir: r.run.root.clone(), reports: vec![], stages: r.stages, models, note: Some(note) });
    }

    // Rank and evaluate, one stage per ranker, on the same users and negatives.
    let mut reports = Vec::new();
    let mut models = Vec::new();
    if !slots.is_empty() {
        let negatives = eval::sample_negatives(&split, &dataset, &users, &p.eval, derive_seed(p.run.seed, "eval"));
        let ctx = eval::EvalContext { split: &split, cfg: &p.eval, users: &users, negatives: &negatives, batch_size: p.run.batch_size };
        let frame = eval::ReportFrame::new(&split, &p.eval);
        std::fs::create_dir_all(r.run.path("reports"))?;
        for (i, spec) in p.rankers.iter().enumerate() {
            let first = spec.rerank.as_ref().map(|rr| (slots.iter().position(|s| s.label == rr.from).expect("checked by config"), rr.top));
            let stage = format!("evaluate.{}", spec.label);
            let json_name = format!("reports/{}.json", spec.label);
            let outcomes_name = format!("reports/{}.outcomes.jsonl", spec.label);
            let evaluated = r.stage(&stage, &keys.evaluate[i], &[&json_name, &outcomes_name], |r, _| {
                // Knowledge is read only when an evaluation runs (a rerun that skips them all
                // reads nothing).
                let fit_data = FitData::of_run(&split, knowledge()?, artifact.as_ref(), &valid);
                let rep = stages::rank::evaluate(r, &mut slots, i, first, &fit_data, &ctx, &r.run.path(&outcomes_name))?;
                write_atomic(&r.run.path(&json_name), serde_json::to_string_pretty(&rep)?.as_bytes())
            });
            // A model that fails (or panics) is reported as failed; the others still run.
            // Cancellation is not a model failure: it stops the run.
            if let Err(e) = evaluated {
                r.check_cancel()?;
                tracing::error!(ranker = spec.label.as_str(), "model failed: {e:#}");
                let failed = frame.failed(&spec.label, format!("{e:#}"));
                if shard.is_some() {
                    // For `merge`, which reports the model as failed with the shard's reason.
                    write_atomic(&r.run.path(&json_name), serde_json::to_string_pretty(&failed)?.as_bytes())?;
                }
                reports.push(failed);
                continue;
            }
            let text = std::fs::read_to_string(r.run.path(&json_name)).with_context(|| format!("reading {json_name}"))?;
            reports.push(serde_json::from_str::<Report>(&text).with_context(|| json_name.clone())?);
        }
        models = slots.iter().filter_map(|s| Some((s.label.clone(), s.obtained?))).collect();
        match shard {
            None => write_run_reports(&r.run, &reports, dataset.skipped)?,
            Some(s) => {
                r.save_manifest()?;
                let note = format!("shard {s} evaluated {} users: `recfuse merge {}` once every shard is done", users.len(), main.root.display());
                return Ok(RunOutcome { run_dir: r.run.root.clone(), reports, stages: r.stages, models, note: Some(note) });
            }
        }
    }

    r.save_manifest()?;
    Ok(RunOutcome { run_dir: r.run.root.clone(), reports, stages: r.stages, models, note: None })
}

/// The run's `report.json`, `report.md` and `report.png` from every ranker's report.
pub fn write_run_reports(run: &RunDir, reports: &[Report], skipped_lines: u64) -> Result<()> {
    write_atomic(&run.path("report.json"), serde_json::to_string_pretty(reports)?.as_bytes())?;
    let mut md = eval::markdown(reports);
    if skipped_lines > 0 {
        md.push_str(&format!("\nThe source skipped {skipped_lines} malformed line(s) (lenient mode); see the log.\n"));
    }
    write_atomic(&run.path("report.md"), md.as_bytes())?;
    if let Err(e) = crate::plot::comparison_chart(reports, &run.path("report.png")) {
        tracing::warn!("no chart: {e:#}");
    }
    Ok(())
}

/// The source's dataset as the run uses it: the seeded user sample (`run.sample_users`), and
/// never empty.
pub fn load_dataset(source: &mut SourceHandle, p: &PipelineConfig) -> Result<Dataset> {
    let mut dataset = source.load()?;
    if let Some(n) = p.run.sample_users.filter(|&n| n > 0) {
        dataset = sample_users(dataset, n, p.run.seed);
    }
    if dataset.events.is_empty() {
        bail!("source `{}` yielded no events", p.source.kind);
    }
    Ok(dataset)
}

/// A seeded random sample of `n` users with all their events (users renumbered in their
/// original order; items untouched).
fn sample_users(mut d: Dataset, n: usize, seed: u64) -> Dataset {
    let total = d.catalog.users.len();
    if n >= total {
        return d;
    }
    let mut order: Vec<usize> = (0..total).collect();
    SeededRng::new(seed ^ 0x5A3F_11E5).shuffle(&mut order);
    let mut keep = vec![false; total];
    order[..n].iter().for_each(|&u| keep[u] = true);
    let mut new_index = vec![u32::MAX; total];
    let mut users = Vec::with_capacity(n);
    for (u, info) in std::mem::take(&mut d.catalog.users).into_iter().enumerate() {
        if keep[u] {
            new_index[u] = users.len() as u32;
            users.push(info);
        }
    }
    d.catalog.users = users;
    d.events.retain(|e| keep[e.user as usize]);
    d.events.iter_mut().for_each(|e| e.user = new_index[e.user as usize]);
    d
}

