//! Shims: safe components wrapped as FFI trait objects (used by `export_plugin!`). Each shim
//! converts records, runs the component under [`guard`] and implements every method of the
//! current ABI, so a plugin built against this SDK answers 1.1 calls natively.

use super::records::*;
use super::traits::*;
use super::module::ComponentKind;
use super::{guard, FfiResult};
use crate::component::*;
use crate::host::Host;
use crate::records::*;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{ROption, RSlice, RSliceMut, RStr, RVec};
use std::path::Path;

fn parse_config<C: serde::de::DeserializeOwned>(json: &str) -> anyhow::Result<C> {
    let de = &mut serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        // serde_json appends "at line 1 column 12" of the JSON the host built from the config
        // table: meaningless to the user, whose config is TOML. The key path says where.
        let inner = e.into_inner().to_string();
        let inner = match inner.rfind(" at line ") {
            Some(i) => inner[..i].to_string(),
            None => inner,
        };
        if path == "." || path.is_empty() {
            anyhow::anyhow!("invalid config: {inner}")
        } else {
            anyhow::anyhow!("invalid config at key `{path}`: {inner}")
        }
    })
}

fn view_from_ffi<'a>(v: &TrainViewFfi<'a>, catalog: &'a Catalog) -> TrainView<'a> {
    TrainView { catalog, events: v.events.as_slice(), offsets: v.offsets.as_slice() }
}

/// Caches the plugin-side copy of the host's catalog, which is the same for a whole run.
#[derive(Default)]
struct CatalogCache {
    key: Option<(usize, usize, usize)>,
    catalog: Catalog,
}

impl CatalogCache {
    fn get(&mut self, c: &CatalogFfi) -> &Catalog {
        let key = (c as *const CatalogFfi as usize, c.items.len(), c.users.len());
        if self.key != Some(key) {
            self.catalog = c.to_catalog();
            self.key = Some(key);
        }
        &self.catalog
    }
}

struct SourceShim<T>(T);
impl<T: BehaviorSource> SourceFfi for SourceShim<T> {
    fn load(&mut self) -> FfiResult<DatasetFfi> {
        guard(|| self.0.load().map(DatasetFfi::from_dataset))
    }
}

struct FuserShim<T> {
    inner: T,
    cache: CatalogCache,
}
impl<T: KnowledgeFuser> FuserFfi for FuserShim<T> {
    fn prepare(&mut self, view: TrainViewFfi<'_>) -> FfiResult<()> {
        guard(|| {
            let catalog = self.cache.get(view.catalog);
            self.inner.prepare(&view_from_ffi(&view, catalog))
        })
    }
    fn fuse(&mut self, view: TrainViewFfi<'_>, users: RSlice<'_, u32>) -> FfiResult<RVec<KnowledgeFfi>> {
        guard(|| {
            let catalog = self.cache.get(view.catalog);
            let out = self.inner.fuse(&view_from_ffi(&view, catalog), users.as_slice())?;
            Ok(out.iter().map(KnowledgeFfi::from_knowledge).collect())
        })
    }
    fn fuse_items(&mut self, view: TrainViewFfi<'_>, items: RSlice<'_, u32>) -> FfiResult<RVec<ItemKnowledgeFfi>> {
        guard(|| {
            let catalog = self.cache.get(view.catalog);
            let out = self.inner.fuse_items(&view_from_ffi(&view, catalog), items.as_slice())?;
            Ok(out.iter().map(ItemKnowledgeFfi::from_knowledge).collect())
        })
    }
}

struct InstructionsShim<T> {
    inner: T,
    cache: CatalogCache,
}
impl<T: InstructionBuilder> InstructionsShim<T> {
    fn run(&mut self, view: TrainViewFfi<'_>, reqs: Vec<InstructionRequest>) -> FfiResult<RVec<InstructionFfi>> {
        guard(|| {
            let catalog = self.cache.get(view.catalog);
            let out = self.inner.build(&view_from_ffi(&view, catalog), &reqs)?;
            Ok(out.iter().map(InstructionFfi::from_instruction).collect())
        })
    }
}
impl<T: InstructionBuilder> InstructionsFfi for InstructionsShim<T> {
    fn build(&mut self, view: TrainViewFfi<'_>, requests: RSlice<'_, InstructionRequestFfi>) -> FfiResult<RVec<InstructionFfi>> {
        self.run(view, requests.iter().map(InstructionRequestFfi::to_request).collect())
    }
    fn build_tasks(&mut self, view: TrainViewFfi<'_>, requests: RSlice<'_, TaskRequestFfi>) -> FfiResult<RVec<InstructionFfi>> {
        self.run(view, requests.iter().map(TaskRequestFfi::to_request).collect())
    }
}

struct TunerShim<T>(T);
impl<T: Tuner> TunerShim<T> {
    fn run(&mut self, view: TrainViewFfi<'_>, inputs: TuneInputsFfi<'_>, out_dir: RStr<'_>) -> FfiResult<ArtifactFfi> {
        guard(|| {
            let catalog = view.catalog.to_catalog();
            let train: Vec<Instruction> = inputs.train.iter().map(InstructionFfi::to_instruction).collect();
            let valid: Vec<Instruction> = inputs.valid.iter().map(InstructionFfi::to_instruction).collect();
            let knowledge: Vec<Knowledge> = inputs.knowledge.iter().map(KnowledgeFfi::to_knowledge).collect();
            let item_knowledge: Vec<ItemKnowledge> = inputs.item_knowledge.iter().map(ItemKnowledgeFfi::to_knowledge).collect();
            let inputs = TuneInputs { train: &train, valid: &valid, knowledge: &knowledge, item_knowledge: &item_knowledge };
            let a = self.0.tune(&view_from_ffi(&view, &catalog), &inputs, Path::new(out_dir.as_str()))?;
            Ok(ArtifactFfi::from_artifact(&a))
        })
    }
}
impl<T: Tuner> TunerFfi for TunerShim<T> {
    fn tune(
        &mut self,
        view: TrainViewFfi<'_>,
        train: RSlice<'_, InstructionFfi>,
        valid: RSlice<'_, InstructionFfi>,
        out_dir: RStr<'_>,
    ) -> FfiResult<ArtifactFfi> {
        let inputs = TuneInputsFfi { train, valid, knowledge: RSlice::EMPTY, item_knowledge: RSlice::EMPTY };
        self.run(view, inputs, out_dir)
    }
    fn tune_with(&mut self, view: TrainViewFfi<'_>, inputs: TuneInputsFfi<'_>, out_dir: RStr<'_>) -> FfiResult<ArtifactFfi> {
        self.run(view, inputs, out_dir)
    }
}

/// Runs `f` with the safe form of a ranker's fit inputs.
fn with_fit_inputs<R>(inputs: &FitInputsFfi<'_>, f: impl FnOnce(&TrainView<'_>, &FitInputs<'_>) -> anyhow::Result<R>) -> anyhow::Result<R> {
    let catalog = inputs.view.catalog.to_catalog();
    let knowledge: Vec<Knowledge> = inputs.knowledge.iter().map(KnowledgeFfi::to_knowledge).collect();
    let item_knowledge: Vec<ItemKnowledge> = inputs.item_knowledge.iter().map(ItemKnowledgeFfi::to_knowledge).collect();
    let artifact = inputs.artifact.as_ref().into_option().map(ArtifactFfi::to_artifact);
    let dir = inputs.model_dir.as_str();
    let fit = FitInputs {
        knowledge: &knowledge,
        item_knowledge: &item_knowledge,
        artifact: artifact.as_ref(),
        context: Some(view_from_ffi(&inputs.context, &catalog)),
        model_dir: (!dir.is_empty()).then(|| Path::new(dir)),
        validation: crate::metrics::Validation { users: inputs.valid_users.as_slice(), items: inputs.valid_items.as_slice() },
    };
    f(&view_from_ffi(&inputs.view, &catalog), &fit)
}

struct RankerShim<T>(T);
impl<T: Ranker> RankerFfi for RankerShim<T> {
    fn fit(
        &mut self,
        view: TrainViewFfi<'_>,
        context: TrainViewFfi<'_>,
        knowledge: RSlice<'_, KnowledgeFfi>,
        artifact: ROption<ArtifactFfi>,
    ) -> FfiResult<()> {
        let inputs = FitInputsFfi {
            view,
            context,
            knowledge,
            item_knowledge: RSlice::EMPTY,
            artifact,
            model_dir: RStr::from_str(""),
            valid_users: RSlice::EMPTY,
            valid_items: RSlice::EMPTY,
        };
        self.fit_with(inputs)
    }
    fn score(&self, users: RSlice<'_, u32>, items: RSlice<'_, u32>, shared: bool, mut out: RSliceMut<'_, f32>) -> FfiResult<()> {
        guard(|| {
            let batch = ScoreBatch { users: users.as_slice(), items: items.as_slice(), shared };
            anyhow::ensure!(
                out.len() == batch.out_len(),
                "score buffer has {} slots, the batch needs {}",
                out.len(),
                batch.out_len()
            );
            self.0.score(&batch, out.as_mut_slice())
        })
    }
    fn fit_with(&mut self, inputs: FitInputsFfi<'_>) -> FfiResult<()> {
        guard(|| with_fit_inputs(&inputs, |view, fit| self.0.fit(view, fit)))
    }
    fn save(&self, dir: RStr<'_>) -> FfiResult<bool> {
        guard(|| self.0.save(Path::new(dir.as_str())))
    }
    fn load(&mut self, inputs: FitInputsFfi<'_>, dir: RStr<'_>) -> FfiResult<bool> {
        guard(|| with_fit_inputs(&inputs, |view, fit| self.0.load(view, fit, Path::new(dir.as_str()))))
    }
    fn seconds_per_candidate(&self) -> f64 {
        // A panic here must not cross either; an unknown cost counts as cheap.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.seconds_per_candidate())).unwrap_or(0.0)
    }
}



#[doc(hidden)]
pub fn new_source<T: BehaviorSource>(config: &str, host: HostFfiBox) -> anyhow::Result<SourceBox> {
    let c = parse_config::<T::Config>(config)?;
    Ok(SourceBox::from_value(SourceShim(T::new(c, Host::from_ffi(host))?), TD_Opaque))
}
#[doc(hidden)]
pub fn new_fuser<T: KnowledgeFuser>(config: &str, host: HostFfiBox) -> anyhow::Result<FuserBox> {
    let c = parse_config::<T::Config>(config)?;
    let inner = T::new(c, Host::from_ffi(host))?;
    Ok(FuserBox::from_value(FuserShim { inner, cache: CatalogCache::default() }, TD_Opaque))
}
#[doc(hidden)]
pub fn new_instructions<T: InstructionBuilder>(config: &str, host: HostFfiBox) -> anyhow::Result<InstructionsBox> {
    let c = parse_config::<T::Config>(config)?;
    let inner = T::new(c, Host::from_ffi(host))?;
    Ok(InstructionsBox::from_value(InstructionsShim { inner, cache: CatalogCache::default() }, TD_Opaque))
}
#[doc(hidden)]
pub fn new_tuner<T: Tuner>(config: &str, host: HostFfiBox) -> anyhow::Result<TunerBox> {
    let c = parse_config::<T::Config>(config)?;
    Ok(TunerBox::from_value(TunerShim(T::new(c, Host::from_ffi(host))?), TD_Opaque))
}
#[doc(hidden)]
pub fn new_ranker<T: Ranker>(config: &str, host: HostFfiBox) -> anyhow::Result<RankerBox> {
    let c = parse_config::<T::Config>(config)?;
    Ok(RankerBox::from_value(RankerShim(T::new(c, Host::from_ffi(host))?), TD_Opaque))
}

#[doc(hidden)]
pub fn unknown_component(plugin: &str, kind: ComponentKind, name: &str, known: &[&str]) -> anyhow::Error {
    anyhow::anyhow!("plugin `{plugin}` has no {kind} named `{name}` (it has: {})", known.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_key_without_json_positions() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct C {
            inner: Inner,
        }
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Inner {
            alpha: f32,
        }
        let e = parse_config::<C>(r#"{"inner": {"alpha": "x"}}"#).unwrap_err().to_string();
        assert!(e.contains("`inner.alpha`"), "{e}");
        assert!(!e.contains("line 1") && !e.contains("column"), "{e}");
        let e = parse_config::<C>(r#"{"inner": {"alpha": 1, "beta": 2}}"#).unwrap_err().to_string();
        assert!(e.contains("unknown field `beta`"), "{e}");
        assert!(!e.contains("column"), "{e}");
    }
}
