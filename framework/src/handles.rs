//! Host-side handles on plugin components: safe Rust over the FFI trait objects, converting
//! records and turning plugin errors back into `anyhow` errors with their cause chain.
//! Built-in and dynamic plugins are driven through exactly the same handles.

use crate::registry::{Origin, Registry};
use anyhow::{Context, Result};
use abi_stable::std_types::{ROption, RSlice, RSliceMut, RStr};
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

pub struct SourceHandle {
    pub provenance: Provenance,
    inner: SourceBox,
}
pub struct FuserHandle {
    pub provenance: Provenance,
    inner: FuserBox,
}
pub struct InstructionsHandle {
    pub provenance: Provenance,
    inner: InstructionsBox,
}
pub struct TunerHandle {
    pub provenance: Provenance,
    inner: TunerBox,
}
pub struct RankerHandle {
    pub provenance: Provenance,
    inner: RankerBox,
}

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
}

impl InstructionsHandle {
    pub fn build(&mut self, data: &ViewData, requests: &[InstructionRequest]) -> Result<Vec<Instruction>> {
        let reqs: Vec<InstructionRequestFfi> = requests.iter().map(InstructionRequestFfi::from_request).collect();
        let out = ok(self.inner.build(data.ffi(), RSlice::from_slice(&reqs)), &self.provenance, "build instructions")?;
        Ok(out.iter().map(InstructionFfi::to_instruction).collect())
    }
}

impl TunerHandle {
    pub fn tune(&mut self, data: &ViewData, train: &[Instruction], valid: &[Instruction], out_dir: &Path) -> Result<Artifact> {
        let train: Vec<InstructionFfi> = train.iter().map(InstructionFfi::from_instruction).collect();
        let valid: Vec<InstructionFfi> = valid.iter().map(InstructionFfi::from_instruction).collect();
        let dir = out_dir.to_string_lossy();
        let a = ok(
            self.inner.tune(data.ffi(), RSlice::from_slice(&train), RSlice::from_slice(&valid), RStr::from_str(&dir)),
            &self.provenance,
            "tune",
        )?;
        Ok(a.to_artifact())
    }
}

impl RankerHandle {
    /// Fits on `data` (train); `context` is what is known at prediction time (see `FitInputs`).
    pub fn fit(&mut self, data: &ViewData, context: &ViewData, knowledge: &[Knowledge], artifact: Option<&Artifact>) -> Result<()> {
        let k: Vec<KnowledgeFfi> = knowledge.iter().map(KnowledgeFfi::from_knowledge).collect();
        let a = match artifact {
            Some(a) => ROption::RSome(ArtifactFfi::from_artifact(a)),
            None => ROption::RNone,
        };
        ok(self.inner.fit(data.ffi(), context.ffi(), RSlice::from_slice(&k), a), &self.provenance, "fit")
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
    fn provenance(&self, kind: ComponentKind, name: &str) -> Result<(Provenance, PluginModuleRef)> {
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
        constructor: impl FnOnce(PluginModuleRef) -> extern "C" fn(RStr<'_>, RStr<'_>, HostFfiBox) -> FfiResult<T>,
    ) -> Result<(Provenance, T)> {
        let (provenance, module) = self.provenance(kind, name)?;
        let json = config.to_string();
        let inner = ok(constructor(module)(RStr::from_str(name), RStr::from_str(&json), host), &provenance, "start")?;
        Ok((provenance, inner))
    }

    pub fn source(&self, name: &str, config: &serde_json::Value, host: HostFfiBox) -> Result<SourceHandle> {
        let (provenance, inner) = self.create(ComponentKind::Source, name, config, host, |m| m.create_source())?;
        Ok(SourceHandle { provenance, inner })
    }
    pub fn fuser(&self, name: &str, config: &serde_json::Value, host: HostFfiBox) -> Result<FuserHandle> {
        let (provenance, inner) = self.create(ComponentKind::Fuser, name, config, host, |m| m.create_fuser())?;
        Ok(FuserHandle { provenance, inner })
    }
    pub fn instructions(&self, name: &str, config: &serde_json::Value, host: HostFfiBox) -> Result<InstructionsHandle> {
        let (provenance, inner) = self.create(ComponentKind::Instructions, name, config, host, |m| m.create_instructions())?;
        Ok(InstructionsHandle { provenance, inner })
    }
    pub fn tuner(&self, name: &str, config: &serde_json::Value, host: HostFfiBox) -> Result<TunerHandle> {
        let (provenance, inner) = self.create(ComponentKind::Tuner, name, config, host, |m| m.create_tuner())?;
        Ok(TunerHandle { provenance, inner })
    }
    pub fn ranker(&self, name: &str, config: &serde_json::Value, host: HostFfiBox) -> Result<RankerHandle> {
        let (provenance, inner) = self.create(ComponentKind::Ranker, name, config, host, |m| m.create_ranker())?;
        Ok(RankerHandle { provenance, inner })
    }
}
