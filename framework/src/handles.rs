//! Host-side handles on plugin components: safe Rust over the FFI trait objects, converting
//! records and turning plugin errors back into `anyhow` errors with their cause chain.
//! Built-in and dynamic plugins are driven through exactly the same handles.

use crate::registry::{Origin, Registry};
use anyhow::{Context, Result};
use abi_stable::std_types::{ROption, RSlice, RSliceMut, RStr, RVec};
use recfuse_sdk::ffi::*;
use recfuse_sdk::records::*;
use recfuse_sdk::SdkAbiVersion;
use std::path::Path;
use std::sync::Arc;

/// Which plugin a handle came from, for manifests and error messages.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Provenance {
    pub kind: String,
    pub name: String,
    pub plugin: String,
    pub version: String,
    pub abi: SdkAbiVersion,
    pub origin: String,
    /// sha256 of a dynamic plugin's library file (None for built-ins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl Provenance {
    /// What a stage key records of a component's code: plugin, version and, for a dynamic
    /// plugin, its library's sha256 (a rebuild with an unchanged version still changes it).
    pub fn code_identity(&self) -> String {
        match &self.sha256 {
            Some(sha) => format!("{}@{}#{sha}", self.plugin, self.version),
            None => format!("{}@{}", self.plugin, self.version),
        }
    }
}

/// The host-owned data a train view borrows across the boundary. The catalog (and its FFI
/// form) is shared by all views of a split.
pub struct ViewData {
    pub catalog: Arc<Catalog>,
    pub catalog_ffi: Arc<CatalogFfi>,
    pub events: Vec<Event>,
    pub offsets: Vec<u32>,
}

impl ViewData {
    pub fn new(catalog: Arc<Catalog>, catalog_ffi: Arc<CatalogFfi>, events: Vec<Event>, offsets: Vec<u32>) -> Self {
        Self { catalog, catalog_ffi, events, offsets }
    }
    pub fn view(&self) -> TrainView<'_> {
        TrainView { catalog: &self.catalog, events: &self.events, offsets: &self.offsets }
    }
    fn ffi(&self) -> TrainViewFfi<'_> {
        TrainViewFfi {
            catalog: &self.catalog_ffi,
            events: RSlice::from_slice(&self.events),
            offsets: RSlice::from_slice(&self.offsets),
        }
    }
}

fn ok<T>(r: FfiResult<T>, what: &Provenance, action: &str) -> Result<T> {
    r.into_result().map_err(|e| e.into_anyhow()).with_context(|| format!("{} `{}` ({}) failed to {action}", what.kind, what.name, what.plugin))
}

/// A component built from a plugin: its FFI object and where it came from.
pub struct Handle<B> {
    pub provenance: Provenance,
    inner: B,
}
pub type SourceHandle = Handle<SourceBox>;
pub type FuserHandle = Handle<FuserBox>;
pub type InstructionsHandle = Handle<InstructionsBox>;
pub type TunerHandle = Handle<TunerBox>;
pub type RankerHandle = Handle<RankerBox>;

impl SourceHandle {
    pub fn load(&mut self) -> Result<Dataset> {
        Ok(ok(self.inner.load(), &self.provenance, "load")?.into_dataset())
    }
}

impl FuserHandle {
    pub fn prepare(&mut self, data: &ViewData) -> Result<()> {
        ok(self.inner.prepare(data.ffi()), &self.provenance, "prepare")
    }
    pub fn fuse(&mut self, data: &ViewData, users: &[UserIdx]) -> Result<Vec<Knowledge>> {
        let out = ok(self.inner.fuse(data.ffi(), RSlice::from_slice(users)), &self.provenance, "fuse")?;
        Ok(out.iter().map(KnowledgeFfi::to_knowledge).collect())
    }
    /// Item knowledge (ABI 1.1; a 1.0 fuser returns none).
    pub fn fuse_items(&mut self, data: &ViewData, items: &[ItemIdx]) -> Result<Vec<ItemKnowledge>> {
        let out = ok(self.inner.fuse_items(data.ffi(), RSlice::from_slice(items)), &self.provenance, "fuse items")?;
        Ok(out.iter().map(ItemKnowledgeFfi::to_knowledge).collect())
    }
}

impl InstructionsHandle {
    pub fn build(&mut self, data: &ViewData, requests: &[InstructionRequest]) -> Result<Vec<Instruction>> {
        let reqs: Vec<TaskRequestFfi> = requests.iter().map(TaskRequestFfi::from_request).collect();
        let out = self.build_ffi(data, RSlice::from_slice(&reqs))?;
        Ok(out.iter().map(InstructionFfi::to_instruction).collect())
    }
    /// Requests already in FFI form (the host service that renders prompts for rankers).
    pub fn build_ffi(&mut self, data: &ViewData, requests: RSlice<'_, TaskRequestFfi>) -> Result<RVec<InstructionFfi>> {
        ok(self.inner.build_tasks(data.ffi(), requests), &self.provenance, "build instructions")
    }
}

impl TunerHandle {
    pub fn tune(&mut self, data: &ViewData, inputs: &TuneInputs<'_>, out_dir: &Path) -> Result<Artifact> {
        let train: Vec<InstructionFfi> = inputs.train.iter().map(InstructionFfi::from_instruction).collect();
        let valid: Vec<InstructionFfi> = inputs.valid.iter().map(InstructionFfi::from_instruction).collect();
        let knowledge: Vec<KnowledgeFfi> = inputs.knowledge.iter().map(KnowledgeFfi::from_knowledge).collect();
        let items: Vec<ItemKnowledgeFfi> = inputs.item_knowledge.iter().map(ItemKnowledgeFfi::from_knowledge).collect();
        let ffi = TuneInputsFfi {
            train: RSlice::from_slice(&train),
            valid: RSlice::from_slice(&valid),
            knowledge: RSlice::from_slice(&knowledge),
            item_knowledge: RSlice::from_slice(&items),
        };
        let dir = out_dir.to_string_lossy();
        let a = ok(self.inner.tune_with(data.ffi(), ffi, RStr::from_str(&dir)), &self.provenance, "tune")?;
        Ok(a.to_artifact())
    }
}

/// What a ranker's fit (or load) is given, host-side.
#[derive(Clone, Copy)]
pub struct FitData<'a> {
    /// Train view (what it may learn from).
    pub train: &'a ViewData,
    /// What is known at prediction time (see `FitInputs::context`).
    pub context: &'a ViewData,
    pub knowledge: &'a [Knowledge],
    pub item_knowledge: &'a [ItemKnowledge],
    pub artifact: Option<&'a Artifact>,
    /// The fit's own directory (checkpoints, saved model).
    pub model_dir: Option<&'a Path>,
    /// Validation targets for model selection (users, items).
    pub valid_users: &'a [UserIdx],
    pub valid_items: &'a [ItemIdx],
}

impl<'a> FitData<'a> {
    /// A run's fit data: its split, knowledge, tuner artifact and validation targets
    /// (`SplitData::validation_targets`); no model directory yet.
    pub fn of_run(
        split: &'a crate::split::SplitData,
        knowledge: &'a crate::knowledge::KnowledgeBase,
        artifact: Option<&'a Artifact>,
        valid: &'a (Vec<UserIdx>, Vec<ItemIdx>),
    ) -> Self {
        FitData {
            train: &split.train,
            context: &split.context,
            knowledge: &knowledge.users,
            item_knowledge: &knowledge.items,
            artifact,
            model_dir: None,
            valid_users: &valid.0,
            valid_items: &valid.1,
        }
    }
}

impl<'a> FitData<'a> {
    /// Train and context views only: no knowledge, artifact, model directory or validation.
    pub fn views(train: &'a ViewData, context: &'a ViewData) -> Self {
        Self { train, context, knowledge: &[], item_knowledge: &[], artifact: None, model_dir: None, valid_users: &[], valid_items: &[] }
    }
}

impl RankerHandle {
    fn with_inputs<R>(&mut self, d: &FitData<'_>, f: impl FnOnce(&mut RankerBox, FitInputsFfi<'_>) -> FfiResult<R>, action: &str) -> Result<R> {
        let k: Vec<KnowledgeFfi> = d.knowledge.iter().map(KnowledgeFfi::from_knowledge).collect();
        let items: Vec<ItemKnowledgeFfi> = d.item_knowledge.iter().map(ItemKnowledgeFfi::from_knowledge).collect();
        let dir = d.model_dir.map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        let inputs = FitInputsFfi {
            view: d.train.ffi(),
            context: d.context.ffi(),
            knowledge: RSlice::from_slice(&k),
            item_knowledge: RSlice::from_slice(&items),
            artifact: match d.artifact {
                Some(a) => ROption::RSome(ArtifactFfi::from_artifact(a)),
                None => ROption::RNone,
            },
            model_dir: RStr::from_str(&dir),
            valid_users: RSlice::from_slice(d.valid_users),
            valid_items: RSlice::from_slice(d.valid_items),
        };
        ok(f(&mut self.inner, inputs), &self.provenance, action)
    }
    /// Fits on `d.train`; a 1.0 ranker gets its 1.0 `fit` (no item knowledge, no model dir).
    pub fn fit(&mut self, d: &FitData<'_>) -> Result<()> {
        self.with_inputs(d, |r, inputs| r.fit_with(inputs), "fit")
    }
    /// Restores a saved model from `dir`; `false` when the ranker cannot (the host then fits).
    pub fn load(&mut self, d: &FitData<'_>, dir: &Path) -> Result<bool> {
        let dir = dir.to_string_lossy().into_owned();
        self.with_inputs(d, |r, inputs| r.load(inputs, RStr::from_str(&dir)), "load its saved model")
    }
    /// Saves the fitted model into `dir`; `false` when the ranker does not support saving.
    pub fn save(&self, dir: &Path) -> Result<bool> {
        let dir = dir.to_string_lossy();
        ok(self.inner.save(RStr::from_str(&dir)), &self.provenance, "save")
    }
    /// Declared seconds per (user, candidate) pair; 0 = cheap.
    pub fn seconds_per_candidate(&self) -> f64 {
        self.inner.seconds_per_candidate()
    }
    /// Scores a batch (see [`ScoreBatch`]); `out` must hold `batch.out_len()` values.
    pub fn score(&self, batch: &ScoreBatch<'_>, out: &mut [f32]) -> Result<()> {
        ok(
            self.inner.score(RSlice::from_slice(batch.users), RSlice::from_slice(batch.items), batch.shared, RSliceMut::from_mut_slice(out)),
            &self.provenance,
            "score",
        )
    }
}

/// Builds components from the registry: finds the plugin, hands it the component's own config
/// table as JSON and a host handle.
impl Registry {
    fn provenance(&self, kind: ComponentKind, name: &str) -> Result<(Provenance, crate::registry::Module)> {
        let found = self.find(kind, name)?;
        let p = found.plugin;
        let prov = Provenance {
            kind: kind.to_string(),
            name: name.to_string(),
            plugin: p.name.clone(),
            version: p.version.clone(),
            abi: p.abi,
            origin: match &p.origin {
                Origin::Builtin => "builtin".into(),
                Origin::Dynamic(path) => path.display().to_string(),
            },
            sha256: p.sha256.clone(),
        };
        Ok((prov, p.module))
    }

    /// Finds `kind = name`, hands the plugin its config table as JSON, and wraps the result.
    fn create<T>(
        &self,
        kind: ComponentKind,
        name: &str,
        config: &serde_json::Value,
        host: HostFfiBox,
        constructor: impl FnOnce(&crate::registry::Module, RStr<'_>, RStr<'_>, HostFfiBox) -> FfiResult<T>,
    ) -> Result<(Provenance, T)> {
        let (provenance, module) = self.provenance(kind, name)?;
        let json = config.to_string();
        let inner = ok(constructor(&module, RStr::from_str(name), RStr::from_str(&json), host), &provenance, "start")?;
        Ok((provenance, inner))
    }
}

/// `registry.source(name, config, host)`, `registry.fuser(..)`, ...: one constructor per kind.
macro_rules! handle_constructors {
    ($(($kind:ident, $name:ident, $create:ident, $boxed:ident, $safe:ident, $shim:ident)),* $(,)?) => {
        impl Registry {
            $(pub fn $name(&self, name: &str, config: &serde_json::Value, host: HostFfiBox) -> Result<Handle<$boxed>> {
                let (provenance, inner) = self.create(ComponentKind::$kind, name, config, host, |m, n, c, h| m.$create(n, c, h))?;
                Ok(Handle { provenance, inner })
            })*
        }
    };
}
recfuse_sdk::__for_each_component_kind!(handle_constructors);
