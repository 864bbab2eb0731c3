//! FFI forms of the SDK records. Types marked "1.0" keep their layout forever (1.0 plugins
//! were compiled against it); what ABI 1.1 adds is new types, reached through new methods.

use crate::records::*;
use abi_stable::std_types::{ROption, RSlice, RStr, RString, RVec, Tuple2};
use abi_stable::StableAbi;
use std::collections::BTreeMap;

pub type AttrsFfi = RVec<Tuple2<RString, RString>>;

fn attrs_to_ffi(a: &BTreeMap<String, String>) -> AttrsFfi {
    a.iter().map(|(k, v)| Tuple2(RString::from(k.as_str()), RString::from(v.as_str()))).collect()
}
fn attrs_from_ffi(a: &AttrsFfi) -> BTreeMap<String, String> {
    a.iter().map(|Tuple2(k, v)| (k.to_string(), v.to_string())).collect()
}
fn strings_to_ffi(v: &[String]) -> RVec<RString> {
    v.iter().map(|s| RString::from(s.as_str())).collect()
}
fn strings_from_ffi(v: &RVec<RString>) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct ItemFfi {
    pub id: RString,
    pub title: RString,
    pub attrs: AttrsFfi,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct UserFfi {
    pub id: RString,
    pub attrs: AttrsFfi,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct CatalogFfi {
    pub items: RVec<ItemFfi>,
    pub users: RVec<UserFfi>,
    pub kinds: RVec<RString>,
    pub scenarios: RVec<RString>,
    pub subjects: RVec<RString>,
}

impl CatalogFfi {
    pub fn from_catalog(c: &Catalog) -> Self {
        CatalogFfi {
            items: c
                .items
                .iter()
                .map(|i| ItemFfi { id: i.id.as_str().into(), title: i.title.as_str().into(), attrs: attrs_to_ffi(&i.attrs) })
                .collect(),
            users: c.users.iter().map(|u| UserFfi { id: u.id.as_str().into(), attrs: attrs_to_ffi(&u.attrs) }).collect(),
            kinds: strings_to_ffi(&c.kinds),
            scenarios: strings_to_ffi(&c.scenarios),
            subjects: strings_to_ffi(&c.subjects),
        }
    }
    pub fn to_catalog(&self) -> Catalog {
        Catalog {
            items: self
                .items
                .iter()
                .map(|i| Item { id: i.id.to_string(), title: i.title.to_string(), attrs: attrs_from_ffi(&i.attrs) })
                .collect(),
            users: self.users.iter().map(|u| User { id: u.id.to_string(), attrs: attrs_from_ffi(&u.attrs) }).collect(),
            kinds: strings_from_ffi(&self.kinds),
            scenarios: strings_from_ffi(&self.scenarios),
            subjects: strings_from_ffi(&self.subjects),
        }
    }
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct DatasetFfi {
    pub catalog: CatalogFfi,
    pub events: RVec<Event>,
    pub inputs: RVec<RString>,
    pub skipped: u64,
}

impl DatasetFfi {
    pub fn from_dataset(d: Dataset) -> Self {
        DatasetFfi {
            catalog: CatalogFfi::from_catalog(&d.catalog),
            events: d.events.into(),
            inputs: strings_to_ffi(&d.inputs),
            skipped: d.skipped,
        }
    }
    pub fn into_dataset(self) -> Dataset {
        Dataset {
            catalog: self.catalog.to_catalog(),
            events: self.events.into_vec(),
            inputs: strings_from_ffi(&self.inputs),
            skipped: self.skipped,
        }
    }
}

/// The train view as it crosses the boundary: borrowed from the host, never copied.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct TrainViewFfi<'a> {
    pub catalog: &'a CatalogFfi,
    pub events: RSlice<'a, Event>,
    pub offsets: RSlice<'a, u32>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct NamedVectorFfi {
    pub name: RString,
    pub values: RVec<f32>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct KnowledgeFfi {
    pub user: u32,
    pub text: RString,
    pub vectors: RVec<NamedVectorFfi>,
}

impl KnowledgeFfi {
    pub fn from_knowledge(k: &Knowledge) -> Self {
        KnowledgeFfi {
            user: k.user,
            text: k.text.as_str().into(),
            vectors: vectors_to_ffi(&k.vectors),
        }
    }
    pub fn to_knowledge(&self) -> Knowledge {
        Knowledge {
            user: self.user,
            text: self.text.to_string(),
            vectors: vectors_from_ffi(&self.vectors),
        }
    }
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct InstructionRequestFfi {
    pub user: u32,
    pub split: Split,
    pub knowledge: RString,
    pub targets: RVec<LabeledItem>,
}

impl InstructionRequestFfi {
    /// A 1.0 request as the 1.1 safe record: no task, no values, no item knowledge.
    pub fn to_request(&self) -> InstructionRequest {
        InstructionRequest {
            user: self.user,
            split: self.split,
            task: String::new(),
            knowledge: self.knowledge.to_string(),
            targets: self.targets.iter().map(|t| Target { item: t.item, label: t.label, ..Target::default() }).collect(),
        }
    }
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct InstructionFfi {
    pub user: u32,
    pub item: u32,
    pub split: Split,
    pub task: RString,
    pub instruction: RString,
    pub input: RString,
    pub output: RString,
    pub label: f32,
}

impl InstructionFfi {
    pub fn from_instruction(i: &Instruction) -> Self {
        InstructionFfi {
            user: i.user,
            item: i.item,
            split: i.split,
            task: i.task.as_str().into(),
            instruction: i.instruction.as_str().into(),
            input: i.input.as_str().into(),
            output: i.output.as_str().into(),
            label: i.label,
        }
    }
    pub fn to_instruction(&self) -> Instruction {
        Instruction {
            user: self.user,
            item: self.item,
            split: self.split,
            task: self.task.to_string(),
            instruction: self.instruction.to_string(),
            input: self.input.to_string(),
            output: self.output.to_string(),
            label: self.label,
        }
    }
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct ArtifactFfi {
    pub kind: RString,
    pub path: RString,
    pub meta: RString,
}

impl ArtifactFfi {
    pub fn from_artifact(a: &Artifact) -> Self {
        ArtifactFfi { kind: a.kind.as_str().into(), path: a.path.as_str().into(), meta: a.meta.as_str().into() }
    }
    pub fn to_artifact(&self) -> Artifact {
        Artifact { kind: self.kind.to_string(), path: self.path.to_string(), meta: self.meta.to_string() }
    }
}


// ---------------------------------------------------------------------------------------------
// Added in ABI 1.1

fn vectors_to_ffi(v: &[NamedVector]) -> RVec<NamedVectorFfi> {
    v.iter().map(|v| NamedVectorFfi { name: v.name.as_str().into(), values: v.values.as_slice().into() }).collect()
}
fn vectors_from_ffi(v: &RVec<NamedVectorFfi>) -> Vec<NamedVector> {
    v.iter().map(|v| NamedVector { name: v.name.to_string(), values: v.values.to_vec() }).collect()
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct ItemKnowledgeFfi {
    pub item: u32,
    pub text: RString,
    pub vectors: RVec<NamedVectorFfi>,
}

impl ItemKnowledgeFfi {
    pub fn from_knowledge(k: &ItemKnowledge) -> Self {
        ItemKnowledgeFfi { item: k.item, text: k.text.as_str().into(), vectors: vectors_to_ffi(&k.vectors) }
    }
    pub fn to_knowledge(&self) -> ItemKnowledge {
        ItemKnowledge { item: self.item, text: self.text.to_string(), vectors: vectors_from_ffi(&self.vectors) }
    }
}

/// A [`Target`]; `value` is NaN for "none".
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct TargetFfi {
    pub item: u32,
    pub label: f32,
    pub value: f32,
    pub knowledge: RString,
}

/// An [`InstructionRequest`] as ABI 1.1 passes it (task, target values, item knowledge).
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct TaskRequestFfi {
    pub user: u32,
    pub split: Split,
    pub task: RString,
    pub knowledge: RString,
    pub targets: RVec<TargetFfi>,
}

impl TaskRequestFfi {
    pub fn from_request(r: &InstructionRequest) -> Self {
        TaskRequestFfi {
            user: r.user,
            split: r.split,
            task: r.task.as_str().into(),
            knowledge: r.knowledge.as_str().into(),
            targets: r
                .targets
                .iter()
                .map(|t| TargetFfi {
                    item: t.item,
                    label: t.label,
                    value: t.value.unwrap_or(f32::NAN),
                    knowledge: t.knowledge.as_str().into(),
                })
                .collect(),
        }
    }
    pub fn to_request(&self) -> InstructionRequest {
        InstructionRequest {
            user: self.user,
            split: self.split,
            task: self.task.to_string(),
            knowledge: self.knowledge.to_string(),
            targets: self
                .targets
                .iter()
                .map(|t| Target {
                    item: t.item,
                    label: t.label,
                    value: (!t.value.is_nan()).then_some(t.value),
                    knowledge: t.knowledge.to_string(),
                })
                .collect(),
        }
    }
    /// The 1.0 form, for a 1.0 builder (no task, no values, no item knowledge).
    pub fn to_v1_0(&self) -> InstructionRequestFfi {
        InstructionRequestFfi {
            user: self.user,
            split: self.split,
            knowledge: self.knowledge.clone(),
            targets: self.targets.iter().map(|t| LabeledItem { item: t.item, label: t.label }).collect(),
        }
    }
}

/// What a ranker's `fit` and `load` get (ABI 1.1).
#[repr(C)]
#[derive(StableAbi, Clone)]
pub struct FitInputsFfi<'a> {
    pub view: TrainViewFfi<'a>,
    pub context: TrainViewFfi<'a>,
    pub knowledge: RSlice<'a, KnowledgeFfi>,
    pub item_knowledge: RSlice<'a, ItemKnowledgeFfi>,
    pub artifact: ROption<ArtifactFfi>,
    /// Empty: none.
    pub model_dir: RStr<'a>,
    /// Validation targets: `valid_items[i]` is the validation item of `valid_users[i]`.
    pub valid_users: RSlice<'a, u32>,
    pub valid_items: RSlice<'a, u32>,
}

/// What a tuner's `tune` gets (ABI 1.1).
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct TuneInputsFfi<'a> {
    pub train: RSlice<'a, InstructionFfi>,
    pub valid: RSlice<'a, InstructionFfi>,
    pub knowledge: RSlice<'a, KnowledgeFfi>,
    pub item_knowledge: RSlice<'a, ItemKnowledgeFfi>,
}
