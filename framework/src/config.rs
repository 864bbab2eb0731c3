//! Pipeline configuration, layered with the `config` crate:
//! base file (TOML, YAML or JSON) < overlay files, in order < `RECFUSE__SECTION__KEY` environment
//! variables < `--set section.key=value`.
//!
//! The host owns the sections `run`, `plugins`, `split` and `eval`; each component table
//! (`source`, `fusers`, `instructions`, `tuner`, `ranker`) names its plugin with `kind` and the
//! rest of the table belongs to that plugin, which deserializes and validates it itself.
//! Every error names the key and the file (or environment, or `--set`) the value came from.

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the layers come from.
#[derive(Clone, Debug, Default)]
pub struct ConfigSources {
    pub base: PathBuf,
    pub overlays: Vec<PathBuf>,
    /// `key=value` overrides; values are parsed as JSON when they parse (numbers, booleans,
    /// arrays), else taken as strings.
    pub sets: Vec<String>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Name of the run; its directory is `dir/name`.
    pub name: String,
    #[serde(default = "d_runs")]
    pub dir: PathBuf,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Users per call to a fuser, instruction builder or ranker.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Keep only this many users (a seeded random sample, with all their events) before the
    /// split: quick runs of costly pipelines (LLM fusion) on a known dataset. 0 = every user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_users: Option<usize>,
    /// Shard count of a sharded run whose index comes from `JOB_COMPLETION_INDEX` (a
    /// Kubernetes Indexed Job's `completions`); `--shards` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<usize>,
}
fn d_runs() -> PathBuf {
    PathBuf::from("runs")
}
fn d_seed() -> u64 {
    42
}
/// `run.batch_size` when the config does not set it.
pub const DEFAULT_BATCH_SIZE: usize = 256;
fn d_batch() -> usize {
    DEFAULT_BATCH_SIZE
}

/// `[embed]`: every user's fused knowledge text, and every item's text (its fused text, else its
/// catalog title and attributes), embedded with all-MiniLM-L6-v2 through ONNX Runtime and kept
/// as a knowledge vector that any ranker can read. Vectors are cached by text hash in the run.
#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct EmbedSection {
    /// The vector's name, as rankers ask for it (the `ort` ranker's `user_vector`/`item_vector`).
    #[serde(default = "d_embed_name")]
    pub name: String,
    /// The encoder's directory: `model.onnx` and `tokenizer.json`.
    #[serde(default = "d_embed_dir")]
    pub dir: PathBuf,
    /// Longer texts are cut to this many tokens.
    #[serde(default = "d_embed_tokens")]
    pub max_tokens: usize,
    /// ONNX Runtime sessions (batches encoded at once).
    #[serde(default = "d_embed_sessions")]
    pub sessions: usize,
    /// Path of libonnxruntime.so (default: ORT_DYLIB_PATH, else what scripts/fetch-data.sh fetched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_library: Option<PathBuf>,
}
fn d_embed_name() -> String {
    "minilm".into()
}
fn d_embed_dir() -> PathBuf {
    PathBuf::from(".cache/data/minilm")
}
fn d_embed_tokens() -> usize {
    256
}
fn d_embed_sessions() -> usize {
    2
}

#[derive(Deserialize, Serialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct PluginsSection {
    /// Plugin library files to load.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// Directories whose shared libraries are all loaded.
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct SplitSection {
    #[serde(default)]
    pub method: SplitMethod,
    /// Temporal split: the last `test_fraction` of the time span (by event count) is the test
    /// period, the `valid_fraction` before it the validation period.
    #[serde(default = "d_fraction")]
    pub valid_fraction: f64,
    #[serde(default = "d_fraction")]
    pub test_fraction: f64,
    /// Leave-one-out: users need at least this many target events to get a validation and a
    /// test item.
    #[serde(default = "d_min_events")]
    pub min_events: usize,
    /// Behaviour kinds that can be a target (all item events when empty).
    #[serde(default)]
    pub target_kinds: Vec<String>,
    /// Sampled negatives per positive in instruction examples.
    #[serde(default = "d_negatives")]
    pub negatives: usize,
}
/// How events are divided into train, validation and test.
#[derive(Deserialize, Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SplitMethod {
    /// Per user by time: last target event is test, the one before validation (default).
    #[default]
    LeaveOneOut,
    /// One global time line: train before the validation period, then validation, then test.
    Temporal,
}

fn d_fraction() -> f64 {
    0.1
}
fn d_min_events() -> usize {
    3
}
fn d_negatives() -> usize {
    1
}
impl Default for SplitSection {
    fn default() -> Self {
        Self {
            method: SplitMethod::LeaveOneOut,
            valid_fraction: d_fraction(),
            test_fraction: d_fraction(),
            min_events: d_min_events(),
            target_kinds: vec![],
            negatives: d_negatives(),
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    #[serde(default = "d_ks")]
    pub ks: Vec<usize>,
    /// Users with at most this many train events form the cold-start segment.
    #[serde(default = "d_cold")]
    pub cold_start_max: usize,
    /// Evaluate at most this many users (0 = all), chosen deterministically.
    #[serde(default)]
    pub max_users: usize,
    /// `full`: rank the test item among all items not seen in train/validation (default).
    /// `sampled`: rank it among `negatives` sampled items, as papers using sampled metrics do.
    #[serde(default)]
    pub protocol: Protocol,
    /// Sampled negatives per user: the candidates of the sampled protocol, and the negatives of
    /// AUC / UAUC under both protocols.
    #[serde(default = "d_eval_negatives")]
    pub negatives: usize,
    #[serde(default)]
    pub sampling: Sampling,
    /// Which items negatives (evaluation and instruction examples) are drawn from.
    #[serde(default)]
    pub negative_pool: NegativePool,
    /// Work budget of one ranker's evaluation, in seconds (from the ranker's declared cost per
    /// candidate): `validate` and `run` refuse a costly ranker whose estimate exceeds it, and
    /// ask for `rerank` instead of the whole catalog.
    #[serde(default = "d_max_ranker_seconds")]
    pub max_ranker_seconds: f64,
}
fn d_max_ranker_seconds() -> f64 {
    3600.0
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Full,
    Sampled,
}

/// The items sampled negatives come from: those with at least one event in the dataset (as
/// RecBole samples; default), or the whole catalog (items nobody interacted with included,
/// which are easy negatives and inflate sampled metrics: ~2.5% on ML-1M).
#[derive(Deserialize, Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NegativePool {
    #[default]
    Interacted,
    Catalog,
}

/// How evaluation negatives are drawn: uniformly, or in proportion to train popularity.
#[derive(Deserialize, Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    #[default]
    Uniform,
    Popularity,
}
fn d_eval_negatives() -> usize {
    100
}
fn d_ks() -> Vec<usize> {
    vec![5, 10]
}
fn d_cold() -> usize {
    5
}
impl Default for EvalSection {
    fn default() -> Self {
        Self {
            ks: d_ks(),
            cold_start_max: d_cold(),
            max_users: 0,
            protocol: Protocol::Full,
            negatives: d_eval_negatives(),
            sampling: Sampling::Uniform,
            negative_pool: NegativePool::Interacted,
            max_ranker_seconds: d_max_ranker_seconds(),
        }
    }
}

/// A component table: `kind` picks the plugin component, `settings` is the rest of the table.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentSpec {
    /// Config key of the table (`ranker`, `fusers[1]`), for messages.
    pub key: String,
    pub kind: String,
    /// Name in reports; the host-reserved key `label` of a ranker table, or `task` of an
    /// instructions table (default: `kind`).
    pub label: String,
    /// A ranker's host-reserved `rerank = { from = "...", top = N }`: it scores only the top N
    /// of another ranker of the run (two-stage ranking).
    pub rerank: Option<Rerank>,
    pub settings: Value,
}

/// Two-stage ranking: rerank the first stage's top `top` candidates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rerank {
    /// Label of the first-stage ranker (defined earlier in `[[rankers]]`).
    pub from: String,
    pub top: usize,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub run: RunSection,
    pub plugins: PluginsSection,
    pub source: ComponentSpec,
    pub fusers: Vec<ComponentSpec>,
    /// `[embed]`: text embeddings of the fused knowledge, as knowledge vectors.
    pub embed: Option<EmbedSection>,
    /// From `[instructions]` or `[[instructions]]`: one builder per task (`task`, default kind).
    pub instructions: Vec<ComponentSpec>,
    pub tuner: Option<ComponentSpec>,
    /// From `[ranker]` or `[[rankers]]`: every model evaluated in the run.
    pub rankers: Vec<ComponentSpec>,
    pub split: SplitSection,
    pub eval: EvalSection,
}

/// A loaded, layered config: the typed pipeline plus the resolved tree and where each value
/// came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub pipeline: PipelineConfig,
    pub tree: Value,
    origins: BTreeMap<String, String>,
    pub files: Vec<PathBuf>,
}

/// Several configuration errors, reported together.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} configuration error(s):", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}
impl std::error::Error for ConfigErrors {}

const TOP_LEVEL: [&str; 11] =
    ["run", "plugins", "source", "fusers", "embed", "instructions", "tuner", "ranker", "rankers", "split", "eval"];

fn to_config_value(v: Value) -> config::Value {
    use config::ValueKind as K;
    let kind = match v {
        Value::Null => K::Nil,
        Value::Bool(b) => K::Boolean(b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => K::I64(i),
            (None, Some(f)) => K::Float(f),
            _ => K::String(n.to_string()),
        },
        Value::String(s) => K::String(s),
        Value::Array(a) => K::Array(a.into_iter().map(to_config_value).collect()),
        Value::Object(o) => K::Table(o.into_iter().map(|(k, v)| (k, to_config_value(v))).collect()),
    };
    config::Value::new(Some(&"--set".to_string()), kind)
}

/// The object at a key like `source` or `fusers[2]`.
fn table<'a>(tree: &'a Value, key: &str) -> Option<&'a Map<String, Value>> {
    match key.split_once('[') {
        Some((list, index)) => tree.get(list)?.get(index.trim_end_matches(']').parse::<usize>().ok()?)?.as_object(),
        None => tree.get(key)?.as_object(),
    }
}

/// [`table`], to change.
fn table_mut<'a>(tree: &'a mut Value, key: &str) -> Option<&'a mut Map<String, Value>> {
    match key.split_once('[') {
        Some((list, index)) => tree.get_mut(list)?.get_mut(index.trim_end_matches(']').parse::<usize>().ok()?)?.as_object_mut(),
        None => tree.get_mut(key)?.as_object_mut(),
    }
}

fn from_config_value(v: &config::Value, path: &str, origins: &mut BTreeMap<String, String>) -> Value {
    use config::ValueKind as K;
    if let Some(o) = v.origin() {
        origins.insert(path.to_string(), o.to_string());
    }
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match &v.kind {
        K::Nil => Value::Null,
        K::Boolean(b) => Value::Bool(*b),
        K::I64(i) => Value::from(*i),
        K::I128(i) => Value::from(*i as f64),
        K::U64(u) => Value::from(*u),
        K::U128(u) => Value::from(*u as f64),
        K::Float(f) => Value::from(*f),
        K::String(s) => Value::String(s.clone()),
        K::Table(t) => {
            let mut keys: Vec<&String> = t.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| (k.clone(), from_config_value(&t[k], &join(k), origins))).collect())
        }
        K::Array(a) => Value::Array(
            a.iter().enumerate().map(|(i, x)| from_config_value(x, &format!("{path}[{i}]"), origins)).collect(),
        ),
    }
}

impl LoadedConfig {
    pub fn load(sources: &ConfigSources) -> Result<Self> {
        let (cfg, errors) = Self::load_partial(sources)?;
        if !errors.is_empty() {
            return Err(anyhow::Error::new(ConfigErrors(errors)));
        }
        Ok(cfg)
    }

    /// The config and its host-level errors (unknown sections, bad `[run]`, ...) without
    /// failing on them: what did parse (components included) can still be checked, so that
    /// every error is reported at once. The pipeline of a config with errors is incomplete
    /// (placeholders where a section failed); use it only to check components.
    pub fn load_partial(sources: &ConfigSources) -> Result<(Self, Vec<String>)> {
        use config::{Config, Environment, File};
        let mut files = vec![sources.base.clone()];
        files.extend(sources.overlays.iter().cloned());
        let mut builder = Config::builder();
        for f in &files {
            if !f.exists() {
                bail!("config file {} not found", f.display());
            }
            builder = builder.add_source(File::from(f.as_path()).required(true));
        }
        builder = builder.add_source(
            Environment::with_prefix("RECFUSE").prefix_separator("__").separator("__").try_parsing(true),
        );
        let mut set_keys = Vec::new();
        for s in &sources.sets {
            let (k, v) = s.split_once('=').with_context(|| format!("--set `{s}`: expected key=value"))?;
            let value = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.to_string()));
            builder = builder.set_override(k.trim(), to_config_value(value)).with_context(|| format!("--set `{s}`"))?;
            set_keys.push(k.trim().to_string());
        }
        let cfg = builder.build().map_err(|e| anyhow!("{e}"))?;
        let mut origins = BTreeMap::new();
        let tree = from_config_value(&cfg.cache, "", &mut origins);
        for k in set_keys {
            origins.insert(k, "--set".into());
        }
        let mut partial = LoadedConfig { pipeline: placeholder(), tree, origins, files };
        // Each file on its own, to tell a layer that changes a component's kind from one that
        // restates it.
        let layers: Vec<Value> = partial
            .files
            .iter()
            .map(|f| {
                let c = Config::builder().add_source(File::from(f.as_path()).required(true)).build().map_err(|e| anyhow!("{e}"))?;
                Ok(from_config_value(&c.cache, "", &mut BTreeMap::new()))
            })
            .collect::<Result<_>>()?;
        partial.replace_swapped_components(&layers);
        let (pipeline, errors) = partial.parse();
        partial.pipeline = pipeline;
        Ok((partial, errors))
    }

    /// A layer that changes a component's `kind` replaces the component's table: the keys
    /// earlier layers gave the old kind are dropped (merging them key by key would hand a
    /// `table` source the `recbole-atomic` keys of the base file). Later layers, environment
    /// variables and `--set` still apply on top.
    fn replace_swapped_components(&mut self, layers: &[Value]) {
        // The config crate names a file's values by a path of its own making (relative to the
        // working directory): compare canonical paths.
        let canonical: Vec<Option<PathBuf>> = self.files.iter().map(|f| f.canonicalize().ok()).collect();
        let rank = |origin: &str| {
            let o = Path::new(origin).canonicalize().ok()?;
            canonical.iter().position(|c| c.as_ref() == Some(&o))
        };
        let mut tables: Vec<String> = ["source", "tuner", "ranker", "instructions"].iter().map(|s| s.to_string()).collect();
        for list in ["fusers", "rankers", "instructions"] {
            if let Some(Value::Array(a)) = self.tree.get(list) {
                tables.extend((0..a.len()).map(|i| format!("{list}[{i}]")));
            }
        }
        for key in tables {
            let Some(kind_layer) = self.origins.get(&format!("{key}.kind")).and_then(|o| rank(o)) else { continue };
            let kind_in = |layer: &Value| -> Option<Value> { table(layer, &key)?.get("kind").cloned() };
            let previous = layers[..kind_layer].iter().rev().find_map(kind_in);
            if previous.is_none() || previous == layers.get(kind_layer).and_then(kind_in) {
                continue; // first definition, or the same kind restated: merge as usual
            }
            let stale: Vec<String> = self
                .origins
                .iter()
                .filter(|(k, o)| {
                    k.strip_prefix(&format!("{key}.")).is_some_and(|rest| !rest.contains(['.', '['])) && rank(o).is_some_and(|r| r < kind_layer)
                })
                .map(|(k, _)| k.clone())
                .collect();
            if let Some(table) = table_mut(&mut self.tree, &key) {
                for k in &stale {
                    table.remove(&k[key.len() + 1..]);
                }
            }
            self.origins.retain(|k, _| !stale.iter().any(|s| k == s || k.starts_with(&format!("{s}.")) || k.starts_with(&format!("{s}["))));
        }
    }

    /// Where the value at `key` (or its nearest parent) came from.
    pub fn origin_of(&self, key: &str) -> String {
        let mut k = key.to_string();
        loop {
            if let Some(o) = self.origins.get(&k) {
                return o.clone();
            }
            // A table that exists only through keys below it (`--set foo.bar=1` makes `foo`):
            // it comes from where they came from.
            if let Some((_, o)) = self.origins.iter().find(|(c, _)| c.starts_with(&format!("{k}.")) || c.starts_with(&format!("{k}["))) {
                return o.clone();
            }
            // An array element nothing set: padding created by `--set name[j]...` for a j
            // past the end.
            if let Some((array, index)) = k.rsplit_once('[').and_then(|(a, i)| Some((a, i.trim_end_matches(']').parse::<usize>().ok()?))) {
                let later = self.origins.iter().find(|(c, o)| {
                    o.as_str() == "--set"
                        && c.strip_prefix(&format!("{array}["))
                            .and_then(|rest| rest.split(']').next()?.parse::<usize>().ok())
                            .is_some_and(|j| j > index)
                });
                if let Some((c, _)) = later {
                    return format!("--set `{c}`, which padded `{array}` up to its index");
                }
            }
            match k.rfind(['.', '[']) {
                Some(i) => k.truncate(i),
                None => break,
            }
        }
        self.files.first().map(|f| f.display().to_string()).unwrap_or_default()
    }

    /// An error about one config key, naming the key and where its value came from.
    pub fn key_error(&self, key: &str, message: impl std::fmt::Display) -> String {
        format!("config key `{key}` (from {}): {message}", self.origin_of(key))
    }

    fn section<T: DeserializeOwned>(&self, key: &str, default: Option<T>, errors: &mut Vec<String>) -> Option<T> {
        match self.tree.get(key) {
            None | Some(Value::Null) => {
                if default.is_none() {
                    errors.push(format!("missing section `[{key}]` in {}", self.files[0].display()));
                }
                default
            }
            Some(v) => match serde_path_to_error::deserialize::<_, T>(v.clone()) {
                Ok(t) => Some(t),
                Err(e) => {
                    let (full, msg) = locate(key, &e.path().to_string(), &e.inner().to_string());
                    errors.push(self.key_error(&full, msg));
                    default
                }
            },
        }
    }

    fn component(&self, key: &str, value: &Value, errors: &mut Vec<String>) -> Option<ComponentSpec> {
        let Some(table) = value.as_object() else {
            errors.push(self.key_error(key, "expected a table with `kind = \"...\"`"));
            return None;
        };
        let mut settings: Map<String, Value> = table.clone();
        // Host-reserved keys, taken out before the plugin sees its table.
        let label_key = if key.starts_with("ranker") {
            Some("label")
        } else if key.starts_with("instructions") {
            Some("task")
        } else {
            None
        };
        let label = match label_key.and_then(|k| settings.remove(k).map(|v| (k, v))) {
            Some((_, Value::String(l))) if !l.is_empty() => Some(l),
            Some((k, _)) => {
                errors.push(self.key_error(&format!("{key}.{k}"), "expected a non-empty string"));
                None
            }
            None => None,
        };
        let mut rerank = None;
        if key.starts_with("ranker") {
            if let Some(v) = settings.remove("rerank") {
                match serde_path_to_error::deserialize::<_, Rerank>(v) {
                    Ok(r) if r.top == 0 => errors.push(self.key_error(&format!("{key}.rerank.top"), "must be at least 1")),
                    Ok(r) => rerank = Some(r),
                    Err(e) => {
                        let (full, msg) = locate(&format!("{key}.rerank"), &e.path().to_string(), &e.inner().to_string());
                        errors.push(self.key_error(&full, msg));
                    }
                }
            }
        }
        match settings.remove("kind") {
            Some(Value::String(kind)) => Some(ComponentSpec {
                key: key.to_string(),
                label: label.unwrap_or_else(|| kind.clone()),
                rerank,
                kind,
                settings: Value::Object(settings),
            }),
            Some(_) => {
                errors.push(self.key_error(&format!("{key}.kind"), "expected a string naming a component"));
                None
            }
            None => {
                errors.push(self.key_error(key, "missing `kind`, the name of the component to use"));
                None
            }
        }
    }

    fn component_list(&self, key: &str, errors: &mut Vec<String>) -> Vec<ComponentSpec> {
        match self.tree.get(key) {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => {
                a.iter().enumerate().filter_map(|(i, v)| self.component(&format!("{key}[{i}]"), v, errors)).collect()
            }
            Some(_) => {
                errors.push(self.key_error(key, format!("expected an array of tables (`[[{key}]]`)")));
                vec![]
            }
        }
    }

    fn optional_component(&self, key: &str, errors: &mut Vec<String>) -> Option<ComponentSpec> {
        match self.tree.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => self.component(key, v, errors),
        }
    }

    fn parse(&self) -> (PipelineConfig, Vec<String>) {
        let mut errors = Vec::new();
        if let Some(obj) = self.tree.as_object() {
            for k in obj.keys() {
                if !TOP_LEVEL.contains(&k.as_str()) {
                    errors.push(self.key_error(k, format!("unknown section; expected one of {}", TOP_LEVEL.join(", "))));
                }
            }
        }
        let run = self.section::<RunSection>("run", None, &mut errors);
        let plugins = self.section("plugins", Some(PluginsSection::default()), &mut errors).unwrap_or_default();
        let split = self.section("split", Some(SplitSection::default()), &mut errors).unwrap_or_default();
        let eval = self.section("eval", Some(EvalSection::default()), &mut errors).unwrap_or_default();
        let source = match self.tree.get("source") {
            Some(v) => self.component("source", v, &mut errors),
            None => {
                errors.push(format!("missing section `[source]` in {}", self.files[0].display()));
                None
            }
        };
        let fusers = self.component_list("fusers", &mut errors);
        let embed = match self.tree.get("embed") {
            None | Some(Value::Null) => None,
            Some(_) => self.section::<EmbedSection>("embed", None, &mut errors),
        };
        if embed.is_some() && fusers.is_empty() && self.tree.get("fusers").is_none() {
            errors.push(self.key_error("embed", "embeds the fused knowledge: it needs `[[fusers]]`"));
        }
        if embed.as_ref().is_some_and(|e| e.max_tokens == 0 || e.sessions == 0) {
            errors.push(self.key_error("embed", "`max_tokens` and `sessions` must be at least 1"));
        }
        let instructions = match self.tree.get("instructions") {
            Some(Value::Object(_)) => self.optional_component("instructions", &mut errors).into_iter().collect(),
            _ => self.component_list("instructions", &mut errors),
        };
        for (i, t) in instructions.iter().enumerate() {
            if instructions[..i].iter().any(|o| o.label == t.label) {
                errors.push(self.key_error(&t.key, format!("two instruction builders serve task `{}`; give each a distinct `task`", t.label)));
            }
        }
        let tuner = self.optional_component("tuner", &mut errors);
        let mut rankers: Vec<ComponentSpec> = self.optional_component("ranker", &mut errors).into_iter().collect();
        if self.tree.get("rankers").is_some() && !rankers.is_empty() {
            errors.push(self.key_error("rankers", "use either `[ranker]` or `[[rankers]]`, not both"));
        }
        rankers.extend(self.component_list("rankers", &mut errors));
        for (i, r) in rankers.iter().enumerate() {
            if rankers[..i].iter().any(|o| o.label == r.label) {
                errors.push(self.key_error(&r.key, format!("two rankers are labelled `{}`; give each a distinct `label`", r.label)));
            }
            if let Some(rr) = &r.rerank {
                // The first stage must be evaluated first: it is an earlier ranker of the list.
                if !rankers[..i].iter().any(|o| o.label == rr.from && o.rerank.is_none()) {
                    let earlier: Vec<&str> = rankers[..i].iter().filter(|o| o.rerank.is_none()).map(|o| o.label.as_str()).collect();
                    errors.push(self.key_error(
                        &format!("{}.rerank.from", r.key),
                        format!(
                            "`{}` is not a single-stage ranker listed before `{}` (earlier: {})",
                            rr.from,
                            r.label,
                            if earlier.is_empty() { "none".to_string() } else { earlier.join(", ") }
                        ),
                    ));
                }
            }
        }
        if tuner.is_some() && instructions.is_empty() {
            errors.push(self.key_error("tuner", "a tuner needs an `[instructions]` stage to learn from"));
        }
        if let Some(run) = &run {
            if run.batch_size == 0 {
                errors.push(self.key_error("run.batch_size", "must be at least 1"));
            }
        }
        if eval.ks.is_empty() || eval.ks.contains(&0) {
            errors.push(self.key_error("eval.ks", "needs at least one cut-off, each at least 1"));
        }
        let fractions_ok = |f: f64| f > 0.0 && f < 1.0;
        if !fractions_ok(split.valid_fraction) || !fractions_ok(split.test_fraction) || split.valid_fraction + split.test_fraction >= 1.0 {
            errors.push(self.key_error("split", "valid_fraction and test_fraction must be in (0, 1) and sum to less than 1"));
        }
        if split.min_events < 3 {
            errors.push(self.key_error("split.min_events", "leave-one-out needs at least 3 (train, validation, test)"));
        }
        let fallback = placeholder();
        let pipeline = PipelineConfig {
            run: run.unwrap_or(fallback.run),
            plugins,
            source: source.unwrap_or(fallback.source),
            fusers,
            embed,
            instructions,
            tuner,
            rankers,
            split,
            eval,
        };
        (pipeline, errors)
    }

    /// The resolved config with secrets redacted, for the run directory.
    pub fn redacted(&self) -> Value {
        fn walk(v: &Value) -> Value {
            match v {
                Value::Object(o) => Value::Object(
                    o.iter()
                        .map(|(k, v)| {
                            let secret = ["api_key", "secret", "password", "token"].iter().any(|s| k == s);
                            // `*_env` keys name variables; a value that cannot be one is most
                            // likely a secret pasted in the wrong place.
                            let pasted = k.ends_with("_env")
                                && v.as_str().is_some_and(|s| !s.is_empty() && !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                            (k.clone(), if (secret || pasted) && v.is_string() { Value::String("***redacted***".into()) } else { walk(v) })
                        })
                        .collect(),
                ),
                Value::Array(a) => Value::Array(a.iter().map(walk).collect()),
                other => other.clone(),
            }
        }
        walk(&self.tree)
    }

    pub fn base_dir(&self) -> &Path {
        self.files[0].parent().unwrap_or(Path::new("."))
    }
}

/// Joins a section key with a serde path and, for unknown fields, the field's name.
pub fn locate(section: &str, serde_path: &str, message: &str) -> (String, String) {
    let mut key = section.to_string();
    if !serde_path.is_empty() && serde_path != "." {
        key = format!("{key}.{serde_path}");
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some(end) = rest.find('`') {
            let field = &rest[..end];
            if !key.ends_with(&format!(".{field}")) {
                key = format!("{key}.{field}");
            }
        }
    }
    (key, message.to_string())
}

fn placeholder() -> PipelineConfig {
    PipelineConfig {
        run: RunSection { name: String::new(), dir: d_runs(), seed: d_seed(), batch_size: d_batch(), sample_users: None, shards: None },
        plugins: PluginsSection::default(),
        source: ComponentSpec { key: "source".into(), kind: String::new(), label: String::new(), rerank: None, settings: Value::Null },
        fusers: vec![],
        embed: None,
        instructions: vec![],
        tuner: None,
        rankers: vec![],
        split: SplitSection::default(),
        eval: EvalSection::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(body.as_bytes()).unwrap();
        p
    }

    const BASE: &str = r#"
[run]
name = "t"
[source]
kind = "jsonl"
events = "e.jsonl"
[ranker]
kind = "popularity"
"#;

    #[test]
    fn layers_overlay_and_set() {
        let d = tempfile::tempdir().unwrap();
        let base = write(d.path(), "base.toml", BASE);
        let overlay = write(d.path(), "market.yaml", "ranker:\n  kind: recency\n  half_life_days: 30\n");
        let c = LoadedConfig::load(&ConfigSources {
            base,
            overlays: vec![overlay.clone()],
            sets: vec!["run.seed=7".into(), "eval.ks=[1,20]".into()],
        })
        .unwrap();
        let r = &c.pipeline.rankers[0];
        assert_eq!(r.kind, "recency");
        assert_eq!(r.settings["half_life_days"], 30);
        assert_eq!(c.pipeline.run.seed, 7);
        assert_eq!(c.pipeline.eval.ks, vec![1, 20]);
        assert!(c.origin_of("ranker.half_life_days").contains("market.yaml"));
        assert_eq!(c.origin_of("run.seed"), "--set");
    }

    #[test]
    fn errors_name_key_and_file_and_are_all_reported() {
        let d = tempfile::tempdir().unwrap();
        let base = write(d.path(), "base.toml", BASE);
        let bad = write(d.path(), "bad.toml", "[run]\nseeed = 3\n[eval]\nks = \"five\"\n[rankr]\nkind = \"x\"\n");
        let err = LoadedConfig::load(&ConfigSources { base, overlays: vec![bad], sets: vec![] }).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("config key `run.seeed`") && msg.contains("bad.toml"), "{msg}");
        assert!(msg.contains("config key `eval.ks`"), "{msg}");
        assert!(msg.contains("config key `rankr`") && msg.contains("unknown section"), "{msg}");
    }

    #[test]
    fn missing_kind_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let base = write(d.path(), "base.json", r#"{"run": {"name": "x"}, "source": {"events": "e"}}"#);
        let msg = format!("{:#}", LoadedConfig::load(&ConfigSources { base, ..Default::default() }).unwrap_err());
        assert!(msg.contains("config key `source`") && msg.contains("missing `kind`"), "{msg}");
    }

    /// Swapping a component's kind by overlay replaces its table; keeping the kind merges.
    #[test]
    fn an_overlay_that_changes_a_kind_replaces_the_table() {
        let d = tempfile::tempdir().unwrap();
        let base = write(
            d.path(),
            "base.toml",
            "[run]\nname = \"t\"\n[source]\nkind = \"recbole-atomic\"\ndir = \"d\"\nname = \"n\"\ndefault_kind = \"rate\"\n[ranker]\nkind = \"popularity\"\nhalf_life_days = 30\n",
        );
        let swap = write(d.path(), "swap.toml", "[source]\nkind = \"jsonl\"\nevents = \"e.jsonl\"\n\n[ranker]\nkind = \"bpr\"\ndim = 8\n");
        let same = write(d.path(), "same.toml", "[ranker]\nkind = \"popularity\"\nkinds = [\"like\"]\n");
        let c = LoadedConfig::load(&ConfigSources { base: base.clone(), overlays: vec![swap], sets: vec!["ranker.epochs=3".into()] }).unwrap();
        let keys = |spec: &ComponentSpec| spec.settings.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(c.pipeline.source.kind, "jsonl");
        assert_eq!(keys(&c.pipeline.source), ["events"]);
        assert_eq!(keys(&c.pipeline.rankers[0]), ["dim", "epochs"], "--set still applies on top");
        let c = LoadedConfig::load(&ConfigSources { base, overlays: vec![same], sets: vec![] }).unwrap();
        assert_eq!(keys(&c.pipeline.rankers[0]), ["half_life_days", "kinds"]);
    }

    #[test]
    fn set_origins_are_attributed_to_set() {
        let d = tempfile::tempdir().unwrap();
        let base = write(d.path(), "base.toml", BASE);
        let load = |sets: &[&str]| {
            let sets = sets.iter().map(|s| s.to_string()).collect();
            LoadedConfig::load(&ConfigSources { base: base.clone(), sets, ..Default::default() }).unwrap_err().to_string()
        };
        let msg = load(&["bogus.key=1"]);
        assert!(msg.contains("config key `bogus` (from --set)"), "{msg}");
        let msg = load(&["fusers[2].kind=\"template\""]);
        assert!(msg.contains("config key `fusers[0]` (from --set `fusers[2].kind`, which padded `fusers` up to its index)"), "{msg}");
    }

    #[test]
    fn secrets_are_redacted() {
        let d = tempfile::tempdir().unwrap();
        let base = write(d.path(), "base.toml", &format!("{BASE}\n[[fusers]]\nkind = \"chatgpt\"\napi_key = \"sk-123\"\napi_key_env = \"OPENAI_API_KEY\"\n"));
        let c = LoadedConfig::load(&ConfigSources { base, ..Default::default() }).unwrap();
        let r = c.redacted().to_string();
        assert!(!r.contains("sk-123") && r.contains("OPENAI_API_KEY"), "{r}");
        // A key pasted into `api_key_env` (not a variable name) is redacted too.
        let sets = vec!["fusers[0].api_key_env=\"sk-proj-Abc-123\"".to_string()];
        let c = LoadedConfig::load(&ConfigSources { base: d.path().join("base.toml"), sets, ..Default::default() }).unwrap();
        let r = c.redacted().to_string();
        assert!(!r.contains("Abc-123"), "{r}");
    }
}
