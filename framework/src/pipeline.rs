//! The pipeline runner: builds every component from config first (so errors surface before any
//! work), then runs the stages source → split → fuse → instructions → tune → rank/evaluate,
//! writing one artifact per stage into the run directory. A stage whose inputs are unchanged is
//! skipped; an interrupted stage resumes from its journal.

use crate::config::{locate, ComponentSpec, ConfigErrors, LoadedConfig, PipelineConfig, Sampling};
use crate::eval::{self, Report};
use recfuse_sdk::SeededRng;
use crate::handles::*;
use crate::host::{HostServices, Progress};
use crate::registry::Registry;
use crate::runstore::*;
use crate::split::{split_dataset, SplitData};
use anyhow::{bail, Context, Result};
use recfuse_sdk::ffi::{ComponentKind, HostFfiBox};
use recfuse_sdk::records::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How to run, besides the config.
#[derive(Clone)]
pub struct RunOptions {
    /// Overrides `run.dir/run.name`.
    pub run_dir: Option<PathBuf>,
    pub show_progress: bool,
    /// Set to ask the run to stop at the next batch boundary (Ctrl-C).
    pub cancel: Arc<AtomicBool>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { run_dir: None, show_progress: false, cancel: Arc::new(AtomicBool::new(false)) }
    }
}

/// What a run did.
#[derive(Debug)]
pub struct RunOutcome {
    pub run_dir: PathBuf,
    /// One report per ranker, in config order.
    pub reports: Vec<Report>,
    /// Each stage and whether it ran afresh, resumed or was skipped.
    pub stages: Vec<(String, StageStart)>,
}

impl RunOutcome {
    /// The report of the ranker labelled `label`.
    pub fn report(&self, label: &str) -> Option<&Report> {
        self.reports.iter().find(|r| r.model == label)
    }
    pub fn stage(&self, name: &str) -> Option<StageStart> {
        self.stages.iter().find(|(n, _)| n == name).map(|(_, s)| *s)
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
    pub instructions: Option<InstructionsHandle>,
    pub tuner: Option<TunerHandle>,
    pub rankers: Vec<RankerHandle>,
}

impl Components {
    pub fn provenance(&self) -> Vec<Provenance> {
        let mut v = vec![self.source.provenance.clone()];
        v.extend(self.fusers.iter().map(|f| f.provenance.clone()));
        v.extend(self.instructions.iter().map(|f| f.provenance.clone()));
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
    let instructions = p.instructions.as_ref().map(|s| make!(s, ComponentKind::Instructions, instructions));
    let tuner = p.tuner.as_ref().map(|s| make!(s, ComponentKind::Tuner, tuner));
    let rankers: Vec<Option<RankerHandle>> = p.rankers.iter().map(|r| make!(r, ComponentKind::Ranker, ranker)).collect();
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Components {
        source: source.expect("checked"),
        fusers: fusers.into_iter().map(|f| f.expect("checked")).collect(),
        instructions: instructions.map(|i| i.expect("checked")),
        tuner: tuner.map(|i| i.expect("checked")),
        rankers: rankers.into_iter().map(|r| r.expect("checked")).collect(),
    })
}

/// `recfuse validate`: the config parses and every component accepts its table.
pub fn validate(cfg: &LoadedConfig) -> Result<Vec<Provenance>> {
    let registry = registry_for(&cfg.pipeline)?;
    let scratch = tempfile_dir()?;
    let progress = Progress::new(false);
    let cancel = Arc::new(AtomicBool::new(false));
    let host_for = |key: &str| HostServices {
        component: Arc::from(key),
        run_dir: scratch.clone(),
        seed: 0,
        cancel: cancel.clone(),
        progress: progress.clone(),
    }
    .into_ffi();
    let c = build_components(cfg, &registry, &host_for)?;
    Ok(c.provenance())
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("recfuse-validate-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// A per-component seed derived from the run seed, so components do not share streams.
fn derive_seed(seed: u64, what: &str) -> u64 {
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

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KnowledgeRecord {
    pub user: UserIdx,
    pub id: String,
    pub text: String,
    #[serde(default)]
    pub vectors: Vec<NamedVector>,
    /// Fusers that produced nothing for this user, with why.
    #[serde(default)]
    pub errors: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct InstructionRecord {
    pub user: UserIdx,
    pub instructions: Vec<Instruction>,
}

#[derive(Serialize, Debug, Clone)]
struct FileHash {
    path: String,
    sha256: String,
}

#[derive(Serialize, Debug, Clone, Default)]
struct DatasetSummary {
    users: usize,
    items: usize,
    events: usize,
    kinds: Vec<String>,
    skipped_lines: u64,
    evaluable_users: usize,
    sha256: String,
}

#[derive(Serialize, Debug, Clone)]
struct Manifest {
    recfuse_version: &'static str,
    sdk_abi: String,
    run: String,
    seed: u64,
    config_files: Vec<FileHash>,
    inputs: Vec<FileHash>,
    dataset: DatasetSummary,
    components: Vec<Provenance>,
    stages: BTreeMap<String, serde_json::Value>,
    /// Token usage and cost of components that report it (`usage.json` in their run directory,
    /// e.g. the LLM fusers), by component directory.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    usage: BTreeMap<String, serde_json::Value>,
}

struct Runner<'a> {
    cfg: &'a LoadedConfig,
    run: RunDir,
    opts: &'a RunOptions,
    progress: Progress,
    manifest: Manifest,
    stages: Vec<(String, StageStart)>,
}

impl Runner<'_> {
    fn check_cancel(&self) -> Result<()> {
        if self.opts.cancel.load(Ordering::Relaxed) {
            bail!("cancelled; rerun the same command to resume from {}", self.run.root.display());
        }
        Ok(())
    }

    /// Copies each component's `usage.json` into the manifest.
    fn record_usage(&mut self) -> Result<()> {
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

    fn save_manifest(&self) -> Result<()> {
        write_atomic(&self.run.path("manifest.json"), serde_json::to_string_pretty(&self.manifest)?.as_bytes())
    }

    /// Runs `body` as stage `name` unless its key says it is already done.
    fn stage(&mut self, name: &str, key: &str, artifacts: &[&str], body: impl FnOnce(&mut Self, StageStart) -> Result<()>) -> Result<()> {
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

/// Runs a pipeline end to end.
pub fn run(cfg: &LoadedConfig, opts: &RunOptions) -> Result<RunOutcome> {
    let registry = registry_for(&cfg.pipeline)?;
    run_with(cfg, &registry, opts)
}

pub fn run_with(cfg: &LoadedConfig, registry: &Registry, opts: &RunOptions) -> Result<RunOutcome> {
    let p = &cfg.pipeline;
    let root = opts.run_dir.clone().unwrap_or_else(|| p.run.dir.join(&p.run.name));
    let run = RunDir::create(root)?;
    let redacted = cfg.redacted();
    let resolved = toml::to_string_pretty(&redacted).unwrap_or_else(|_| serde_json::to_string_pretty(&redacted).unwrap_or_default());
    write_atomic(&run.path("config.resolved.toml"), resolved.as_bytes())?;

    let progress = Progress::new(opts.show_progress);
    let host_for = |key: &str| {
        let dir = run.root.join("components").join(key.replace(['[', ']'], ""));
        let _ = std::fs::create_dir_all(&dir);
        HostServices {
            component: Arc::from(key),
            run_dir: dir,
            seed: derive_seed(p.run.seed, key),
            cancel: opts.cancel.clone(),
            progress: progress.clone(),
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
        seed: p.run.seed,
        config_files,
        inputs: vec![],
        dataset: DatasetSummary::default(),
        components: c.provenance(),
        stages: BTreeMap::new(),
        usage: BTreeMap::new(),
    };
    let mut r = Runner { cfg, run, opts, progress, manifest, stages: vec![] };

    // Source: always read (cheap next to the stages after it); its content hash keys the rest.
    let t = Instant::now();
    let mut dataset = c.source.load()?;
    tracing::debug!(seconds = t.elapsed().as_secs_f64(), "source returned");
    if let Some(n) = p.run.sample_users.filter(|&n| n > 0) {
        dataset = sample_users(dataset, n, p.run.seed);
    }
    if dataset.events.is_empty() {
        bail!("source `{}` yielded no events", p.source.kind);
    }
    for input in &dataset.inputs {
        let path = Path::new(input);
        if path.is_file() {
            r.manifest.inputs.push(FileHash { path: input.clone(), sha256: hash_file(path)? });
        }
    }
    tracing::debug!(seconds = t.elapsed().as_secs_f64(), "inputs hashed");
    let split = split_dataset(&dataset, &p.split);
    tracing::debug!(seconds = t.elapsed().as_secs_f64(), "split");
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
    let version_of = |prov: &Provenance| format!("{}@{}", prov.plugin, prov.version);
    let spec_json = |s: &ComponentSpec| serde_json::to_string(&(&s.kind, &s.settings)).unwrap_or_default();
    let split_json = serde_json::to_string(&p.split)?;
    let data_key = hash_parts(&[r.manifest.dataset.sha256.as_bytes(), split_json.as_bytes()]);

    // Fuse.
    let mut key = data_key.clone();
    if !c.fusers.is_empty() {
        let parts: Vec<String> =
            p.fusers.iter().zip(&c.fusers).map(|(s, f)| format!("{}|{}", spec_json(s), version_of(&f.provenance))).collect();
        key = hash_parts(&[key.as_bytes(), b"fuse", parts.join("\n").as_bytes()]);
        let batch = p.run.batch_size;
        r.stage("fuse", &key, &["knowledge.jsonl"], |r, _| fuse_stage(r, &mut c.fusers, &split, batch))?;
        r.record_usage()?;
    }

    // Instructions.
    if let (Some(spec), Some(builder)) = (&p.instructions, c.instructions.as_mut()) {
        key = hash_parts(&[key.as_bytes(), b"instructions", spec_json(spec).as_bytes(), version_of(&builder.provenance).as_bytes(), &p.run.seed.to_le_bytes()]);
        let has_knowledge = !c.fusers.is_empty();
        r.stage("instructions", &key, &["instructions.jsonl"], |r, _| {
            instructions_stage(r, builder, &split, &dataset, has_knowledge)
        })?;
    }

    // Tune.
    let mut artifact: Option<Artifact> = None;
    if let (Some(spec), Some(tuner)) = (&p.tuner, c.tuner.as_mut()) {
        key = hash_parts(&[key.as_bytes(), b"tune", spec_json(spec).as_bytes(), version_of(&tuner.provenance).as_bytes()]);
        r.stage("tune", &key, &["tuner", "artifact.json"], |r, _| {
            let records: Vec<InstructionRecord> = read_journal(&r.run.path("instructions.jsonl"))?;
            let all = records.into_iter().flat_map(|x| x.instructions);
            let (train, rest): (Vec<Instruction>, Vec<Instruction>) = all.partition(|i| i.split == Split::Train);
            let valid: Vec<Instruction> = rest.into_iter().filter(|i| i.split == Split::Valid).collect();
            let out_dir = r.run.path("tuner");
            std::fs::create_dir_all(&out_dir)?;
            let a = tuner.tune(&split.history, &train, &valid, &out_dir)?;
            write_atomic(&r.run.path("artifact.json"), serde_json::to_string_pretty(&a)?.as_bytes())
        })?;
        let text = std::fs::read_to_string(r.run.path("artifact.json")).context("reading artifact.json")?;
        artifact = Some(serde_json::from_str(&text).context("artifact.json")?);
    }

    // Rank and evaluate, one stage per ranker, on the same users and negatives.
    let mut reports = Vec::new();
    if !c.rankers.is_empty() {
        let eval_json = serde_json::to_string(&p.eval)?;
        let users = eval::pick_users(&split, p.eval.max_users);
        let negatives = eval::sample_negatives(&split, &dataset, &users, &p.eval, derive_seed(p.run.seed, "eval"));
        let has_knowledge = !c.fusers.is_empty();
        let mut knowledge: Option<Vec<Knowledge>> = None;
        std::fs::create_dir_all(r.run.path("reports"))?;
        for (spec, ranker) in p.rankers.iter().zip(c.rankers.iter_mut()) {
            let stage = format!("evaluate.{}", spec.label);
            let json_name = format!("reports/{}.json", spec.label);
            let stage_key = hash_parts(&[
                key.as_bytes(),
                b"evaluate",
                spec_json(spec).as_bytes(),
                version_of(&ranker.provenance).as_bytes(),
                eval_json.as_bytes(),
            ]);
            r.stage(&stage, &stage_key, &[&json_name], |r, _| {
                // Read once for all rankers, and only if one of them runs.
                if has_knowledge && knowledge.is_none() {
                    let records = read_journal::<KnowledgeRecord>(&r.run.path("knowledge.jsonl"))?;
                    knowledge = Some(records.into_iter().map(|k| Knowledge { user: k.user, text: k.text, vectors: k.vectors }).collect());
                }
                let t = Instant::now();
                ranker.fit(&split.train, &split.context, knowledge.as_deref().unwrap_or(&[]), artifact.as_ref())?;
                tracing::info!(ranker = spec.label.as_str(), seconds = t.elapsed().as_secs_f64(), "ranker fitted");
                let bar = r.progress.bar(&spec.label, users.len() as u64);
                let t = Instant::now();
                let rep = eval::evaluate(ranker, &spec.label, &split, &p.eval, &users, &negatives, p.run.batch_size, |n| {
                    bar.inc(n as u64);
                    r.check_cancel()
                })?;
                bar.finish_and_clear();
                tracing::info!(ranker = spec.label.as_str(), seconds = t.elapsed().as_secs_f64(), "evaluated");
                write_atomic(&r.run.path(&json_name), serde_json::to_string_pretty(&rep)?.as_bytes())
            })?;
            let text = std::fs::read_to_string(r.run.path(&json_name)).with_context(|| format!("reading {json_name}"))?;
            reports.push(serde_json::from_str::<Report>(&text).with_context(|| json_name.clone())?);
        }
        write_atomic(&r.run.path("report.json"), serde_json::to_string_pretty(&reports)?.as_bytes())?;
        let mut md = eval::markdown(&reports);
        if dataset.skipped > 0 {
            md.push_str(&format!("\nThe source skipped {} malformed line(s) (lenient mode); see the log.\n", dataset.skipped));
        }
        write_atomic(&r.run.path("report.md"), md.as_bytes())?;
        if let Err(e) = crate::plot::comparison_chart(&reports, &r.run.path("report.png")) {
            tracing::warn!("no chart: {e:#}");
        }
    }

    r.save_manifest()?;
    Ok(RunOutcome { run_dir: r.run.root.clone(), reports, stages: r.stages })
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

fn fuse_stage(r: &mut Runner, fusers: &mut [FuserHandle], split: &SplitData, batch: usize) -> Result<()> {
    let (mut journal, done) = Journal::open::<KnowledgeRecord>(&r.run.path("knowledge.jsonl"))?;
    let done: HashSet<UserIdx> = done.iter().map(|k| k.user).collect();
    let catalog = &split.history.catalog;
    let todo: Vec<UserIdx> = (0..catalog.users.len() as u32).filter(|u| !done.contains(u)).collect();
    tracing::info!(done = done.len(), todo = todo.len(), "fusing knowledge");
    for f in fusers.iter_mut() {
        f.prepare(&split.history)?;
    }
    let bar = r.progress.bar("fuse", catalog.users.len() as u64);
    bar.inc(done.len() as u64);
    for users in todo.chunks(batch) {
        r.check_cancel()?;
        let mut records: Vec<KnowledgeRecord> = users
            .iter()
            .map(|&u| KnowledgeRecord { user: u, id: catalog.users[u as usize].id.clone(), text: String::new(), vectors: vec![], errors: vec![] })
            .collect();
        for f in fusers.iter_mut() {
            let out = f.fuse(&split.history, users)?;
            let mut got: BTreeMap<UserIdx, Knowledge> = out.into_iter().map(|k| (k.user, k)).collect();
            for rec in records.iter_mut() {
                match got.remove(&rec.user) {
                    Some(k) => {
                        if !k.text.is_empty() {
                            if !rec.text.is_empty() {
                                rec.text.push('\n');
                            }
                            rec.text.push_str(&k.text);
                        }
                        rec.vectors.extend(k.vectors);
                    }
                    None => rec.errors.push(format!("fuser `{}` returned no knowledge", f.provenance.name)),
                }
            }
        }
        journal.append(&records)?;
        bar.inc(users.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

fn instructions_stage(
    r: &mut Runner,
    builder: &mut InstructionsHandle,
    split: &SplitData,
    dataset: &Dataset,
    has_knowledge: bool,
) -> Result<()> {
    let p = &r.cfg.pipeline;
    let knowledge: BTreeMap<UserIdx, String> = if has_knowledge {
        read_journal::<KnowledgeRecord>(&r.run.path("knowledge.jsonl"))?.into_iter().map(|k| (k.user, k.text)).collect()
    } else {
        BTreeMap::new()
    };
    let (mut journal, done) = Journal::open::<InstructionRecord>(&r.run.path("instructions.jsonl"))?;
    let done: HashSet<UserIdx> = done.iter().map(|k| k.user).collect();
    let users: Vec<UserIdx> = split.evaluable_users().into_iter().filter(|u| !done.contains(u)).collect();

    let sampler = eval::NegativeSampler::new(split, dataset, Sampling::Uniform);
    let seed = derive_seed(p.run.seed, "negatives");
    let bar = r.progress.bar("instructions", (users.len() + done.len()) as u64);
    bar.inc(done.len() as u64);
    for chunk in users.chunks(p.run.batch_size) {
        r.check_cancel()?;
        let mut requests = Vec::new();
        for &u in chunk {
            let t = split.targets[u as usize];
            let text = knowledge.get(&u).cloned().unwrap_or_default();
            for (which, item) in [(Split::Train, t.train), (Split::Valid, t.valid), (Split::Test, t.test)] {
                if item == NONE {
                    continue; // e.g. no validation event in the temporal split's window
                }
                let mut rng = SeededRng::new(seed ^ ((u as u64) << 8) ^ which as u64);
                let mut targets = vec![LabeledItem { item, label: 1.0 }];
                let negatives = sampler.sample(u, p.split.negatives, &mut rng);
                targets.extend(negatives.into_iter().map(|item| LabeledItem { item, label: 0.0 }));
                requests.push(InstructionRequest { user: u, split: which, knowledge: text.clone(), targets });
            }
        }
        let out = builder.build(&split.history, &requests)?;
        let mut per_user: BTreeMap<UserIdx, Vec<Instruction>> = chunk.iter().map(|&u| (u, vec![])).collect();
        for i in out {
            per_user.entry(i.user).or_default().push(i);
        }
        let records: Vec<InstructionRecord> = per_user.into_iter().map(|(user, instructions)| InstructionRecord { user, instructions }).collect();
        journal.append(&records)?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(())
}
