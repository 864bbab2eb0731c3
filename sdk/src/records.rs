//! The records that flow between stages, as plugin authors see them: plain Rust types.
//!
//! Identifiers are interned: users, items, behaviour kinds, scenarios and free-text subjects are
//! stored once in a [`Catalog`] and referred to by dense `u32` indices. Events are therefore a
//! small `Copy` struct that crosses the plugin boundary without copying, and heterogeneity stays
//! data: a new behaviour kind is a new string in `Catalog::kinds`, never a new type.

use abi_stable::StableAbi;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Dense index of a user in [`Catalog::users`].
pub type UserIdx = u32;
/// Dense index of an item in [`Catalog::items`].
pub type ItemIdx = u32;
/// Marks an absent index (an event without an item, such as a search, or without a subject text).
pub const NONE: u32 = u32::MAX;

/// Something that can be recommended, with its text attributes (title, genres, shop, ...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub id: String,
    pub title: String,
    pub attrs: BTreeMap<String, String>,
}

/// A user with profile attributes (age, gender, occupation, market, ...).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub attrs: BTreeMap<String, String>,
}

/// One heterogeneous behaviour event: `user` did `kind` (click, order, rate, tag, search, ...)
/// on `item` (or [`NONE`]) in `scenario`, with a free-text `subject` (a query, a tag, a shop; or
/// [`NONE`]), a numeric `value` (rating, quantity, dwell time) and a unix `timestamp` in seconds.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub user: UserIdx,
    pub item: ItemIdx,
    /// Index into [`Catalog::kinds`].
    pub kind: u32,
    /// Index into [`Catalog::scenarios`].
    pub scenario: u32,
    /// Index into [`Catalog::subjects`], or [`NONE`].
    pub subject: u32,
    pub value: f32,
    pub timestamp: i64,
}

/// Everything about a dataset except its events: the interned tables events refer to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub items: Vec<Item>,
    pub users: Vec<User>,
    pub kinds: Vec<String>,
    pub scenarios: Vec<String>,
    pub subjects: Vec<String>,
}

impl Catalog {
    /// Index of a behaviour kind by name.
    pub fn kind(&self, name: &str) -> Option<u32> {
        self.kinds.iter().position(|k| k == name).map(|i| i as u32)
    }
    pub fn kind_name(&self, idx: u32) -> &str {
        self.kinds.get(idx as usize).map(String::as_str).unwrap_or("?")
    }
    pub fn scenario_name(&self, idx: u32) -> &str {
        self.scenarios.get(idx as usize).map(String::as_str).unwrap_or("")
    }
    pub fn subject_text(&self, idx: u32) -> Option<&str> {
        self.subjects.get(idx as usize).map(String::as_str)
    }
}

/// What a [`BehaviorSource`](crate::BehaviorSource) yields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    pub catalog: Catalog,
    pub events: Vec<Event>,
    /// Files the source read, so the host can hash them into the run manifest.
    pub inputs: Vec<String>,
    /// Lines the source skipped under a lenient setting (0 when strict).
    pub skipped: u64,
}

/// FxHash (as in rustc): interning ids is the hot loop of loading a dataset, and SipHash's
/// DoS resistance buys nothing for ids read from the user's own files.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(K);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type Interner = HashMap<String, u32, std::hash::BuildHasherDefault<FxHasher>>;

/// Builds a [`Dataset`] while interning identifiers; what most sources want.
#[derive(Default)]
pub struct DatasetBuilder {
    data: Dataset,
    items: Interner,
    users: Interner,
    kinds: Interner,
    scenarios: Interner,
    subjects: Interner,
}

fn intern(map: &mut Interner, table: &mut Vec<String>, key: &str) -> u32 {
    if let Some(&i) = map.get(key) {
        return i;
    }
    let i = table.len() as u32;
    table.push(key.to_owned());
    map.insert(key.to_owned(), i);
    i
}

impl DatasetBuilder {
    pub fn new() -> Self {
        Self::default()
    }
    /// Index of the item with this id, adding a bare item the first time it is seen.
    pub fn item(&mut self, id: &str) -> ItemIdx {
        if let Some(&i) = self.items.get(id) {
            return i;
        }
        let i = self.data.catalog.items.len() as u32;
        self.data.catalog.items.push(Item { id: id.to_owned(), ..Item::default() });
        self.items.insert(id.to_owned(), i);
        i
    }
    /// Adds or replaces an item's title and attributes.
    pub fn describe_item(&mut self, id: &str, title: &str, attrs: BTreeMap<String, String>) -> ItemIdx {
        let i = self.item(id);
        let item = &mut self.data.catalog.items[i as usize];
        item.title = title.to_owned();
        item.attrs = attrs;
        i
    }
    pub fn user(&mut self, id: &str) -> UserIdx {
        if let Some(&i) = self.users.get(id) {
            return i;
        }
        let i = self.data.catalog.users.len() as u32;
        self.data.catalog.users.push(User { id: id.to_owned(), ..User::default() });
        self.users.insert(id.to_owned(), i);
        i
    }
    pub fn describe_user(&mut self, id: &str, attrs: BTreeMap<String, String>) -> UserIdx {
        let i = self.user(id);
        self.data.catalog.users[i as usize].attrs = attrs;
        i
    }
    pub fn kind(&mut self, name: &str) -> u32 {
        intern(&mut self.kinds, &mut self.data.catalog.kinds, name)
    }
    pub fn scenario(&mut self, name: &str) -> u32 {
        intern(&mut self.scenarios, &mut self.data.catalog.scenarios, name)
    }
    pub fn subject(&mut self, text: &str) -> u32 {
        intern(&mut self.subjects, &mut self.data.catalog.subjects, text)
    }
    pub fn event(&mut self, event: Event) {
        self.data.events.push(event);
    }
    pub fn input(&mut self, path: impl Into<String>) {
        self.data.inputs.push(path.into());
    }
    pub fn skipped(&mut self, n: u64) {
        self.data.skipped += n;
    }
    /// The catalog built so far, for attributes added after the fact.
    pub fn catalog_mut(&mut self) -> &mut Catalog {
        &mut self.data.catalog
    }
    pub fn events_len(&self) -> usize {
        self.data.events.len()
    }
    pub fn finish(self) -> Dataset {
        self.data
    }
}

/// The training-period view of a dataset given to fusers, instruction builders, tuners and
/// rankers. `events` hold only train events (validation and test targets are never in it),
/// grouped by user and sorted by time within a user; `offsets[u]..offsets[u+1]` is user `u`'s
/// slice.
#[derive(Clone, Copy, Debug)]
pub struct TrainView<'a> {
    pub catalog: &'a Catalog,
    pub events: &'a [Event],
    pub offsets: &'a [u32],
}

impl<'a> TrainView<'a> {
    pub fn n_users(&self) -> usize {
        self.catalog.users.len()
    }
    pub fn n_items(&self) -> usize {
        self.catalog.items.len()
    }
    /// User `user`'s train events, oldest first.
    pub fn history(&self, user: UserIdx) -> &'a [Event] {
        let u = user as usize;
        match (self.offsets.get(u), self.offsets.get(u + 1)) {
            (Some(&a), Some(&b)) => &self.events[a as usize..b as usize],
            _ => &[],
        }
    }
}

/// A named vector of knowledge (for example a CF user embedding), to be mapped into an LLM's
/// token space by a later stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NamedVector {
    pub name: String,
    pub values: Vec<f32>,
}

/// What a [`KnowledgeFuser`](crate::KnowledgeFuser) makes of one user's behaviour.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Knowledge {
    pub user: UserIdx,
    pub text: String,
    pub vectors: Vec<NamedVector>,
}

/// What a [`KnowledgeFuser`](crate::KnowledgeFuser) knows about one item (ABI 1.1): a text (an
/// item description) and/or vectors (CF item embeddings, text embeddings).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemKnowledge {
    pub item: ItemIdx,
    pub text: String,
    pub vectors: Vec<NamedVector>,
}

/// All knowledge of a run, by user and by item, as stages after fusion receive it.
#[derive(Clone, Copy, Debug, Default)]
pub struct KnowledgeView<'a> {
    /// One record per fused user, sorted by user.
    pub users: &'a [Knowledge],
    /// One record per item a fuser described, sorted by item (empty when no fuser does).
    pub items: &'a [ItemKnowledge],
}

impl<'a> KnowledgeView<'a> {
    /// The knowledge of `user`, if it was fused.
    pub fn user(&self, user: UserIdx) -> Option<&'a Knowledge> {
        self.users.binary_search_by_key(&user, |k| k.user).ok().map(|i| &self.users[i])
    }
    /// The knowledge of `item`, if a fuser described it.
    pub fn item(&self, item: ItemIdx) -> Option<&'a ItemKnowledge> {
        self.items.binary_search_by_key(&item, |k| k.item).ok().map(|i| &self.items[i])
    }
}

/// Which part of the split an instruction example belongs to.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Valid,
    Test,
}

/// A candidate item with its label, as ABI 1.0 passed it (kept for 1.0 plugins).
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabeledItem {
    pub item: ItemIdx,
    pub label: f32,
}

/// A candidate item of an instruction request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub item: ItemIdx,
    /// 1 = the user's real next item (the split's target), 0 = a sampled negative.
    pub label: f32,
    /// The value of the target's event (a rating, a quantity), for the real target only; `None`
    /// for negatives and when the request is for scoring (the value is what is predicted).
    pub value: Option<f32>,
    /// The item's fused knowledge text (empty when no fuser describes items).
    pub knowledge: String,
}

/// What the host asks an [`InstructionBuilder`](crate::InstructionBuilder) to turn into examples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstructionRequest {
    pub user: UserIdx,
    pub split: Split,
    /// The task this builder serves in the run (its config's `task`, by default its kind);
    /// builders write it into each [`Instruction::task`].
    pub task: String,
    /// The fused knowledge text of this user, built from events before the targets.
    pub knowledge: String,
    pub targets: Vec<Target>,
}

/// One instruction-tuning example: (instruction, input, output), as in HKFR.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Instruction {
    pub user: UserIdx,
    /// The item the example is about, or [`NONE`].
    pub item: ItemIdx,
    pub split: Split,
    pub task: String,
    pub instruction: String,
    pub input: String,
    pub output: String,
    pub label: f32,
}

/// What a [`Tuner`](crate::Tuner) produces and a [`Ranker`](crate::Ranker) may load.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// What kind of artifact this is (`"lora"`, `"identity"`, ...), so a ranker can refuse one it
    /// does not understand.
    pub kind: String,
    /// Absolute path of the file or directory.
    pub path: String,
    /// Free-form JSON metadata.
    pub meta: String,
}

/// Inputs a ranker may use in `fit` (and `load`), besides the train view.
#[derive(Clone, Copy, Debug, Default)]
pub struct FitInputs<'a> {
    /// Fused knowledge per user (possibly empty when the pipeline has no fuser).
    pub knowledge: &'a [Knowledge],
    /// Fused knowledge per item (ABI 1.1; empty when no fuser describes items).
    pub item_knowledge: &'a [ItemKnowledge],
    pub artifact: Option<&'a Artifact>,
    /// What is known when a prediction is asked for: each user's events before the item to
    /// predict (train plus the validation event). Sequence models condition on it when
    /// scoring; nobody may train on it. `None` means: score from the train view.
    pub context: Option<TrainView<'a>>,
    /// This fit's own directory (ABI 1.1): where a long fit checkpoints (each epoch) and
    /// resumes from, and where [`Ranker::save`](crate::Ranker::save) will be asked to write.
    /// The host empties it when the fit's inputs or config change. `None` from a 1.0 host.
    pub model_dir: Option<&'a std::path::Path>,
    /// Validation targets (ABI 1.1), for rankers that select their best epoch and stop early
    /// with [`Validation::evaluate`](crate::metrics::Validation::evaluate). Never the test items.
    pub validation: crate::metrics::Validation<'a>,
}

impl<'a> FitInputs<'a> {
    /// User and item knowledge together.
    pub fn knowledge_view(&self) -> KnowledgeView<'a> {
        KnowledgeView { users: self.knowledge, items: self.item_knowledge }
    }
}

/// What a [`Tuner`](crate::Tuner) learns from (ABI 1.1).
#[derive(Clone, Copy, Debug, Default)]
pub struct TuneInputs<'a> {
    /// Training examples of every task, each tagged with its [`Instruction::task`].
    pub train: &'a [Instruction],
    /// Validation examples (for early stopping and model selection), same tasks.
    pub valid: &'a [Instruction],
    /// User knowledge (text and vectors, e.g. CF embeddings for soft tokens).
    pub knowledge: &'a [Knowledge],
    /// Item knowledge (text and vectors).
    pub item_knowledge: &'a [ItemKnowledge],
}

impl<'a> TuneInputs<'a> {
    pub fn knowledge_view(&self) -> KnowledgeView<'a> {
        KnowledgeView { users: self.knowledge, items: self.item_knowledge }
    }
}

/// A batch of users to score in one call.
///
/// With `shared = true`, every user is scored against the same `items` (full ranking) and the
/// output is `users.len() × items.len()`, row-major. With `shared = false`, `items` holds one
/// equally long candidate list per user, concatenated (sampled ranking).
#[derive(Clone, Copy, Debug)]
pub struct ScoreBatch<'a> {
    pub users: &'a [UserIdx],
    pub items: &'a [ItemIdx],
    pub shared: bool,
}

impl<'a> ScoreBatch<'a> {
    /// Number of candidates per user.
    pub fn per_user(&self) -> usize {
        if self.shared || self.users.is_empty() {
            self.items.len()
        } else {
            self.items.len() / self.users.len()
        }
    }
    /// Candidates of the `row`-th user of the batch.
    pub fn candidates(&self, row: usize) -> &'a [ItemIdx] {
        if self.shared {
            self.items
        } else {
            let n = self.per_user();
            &self.items[row * n..(row + 1) * n]
        }
    }
    /// Length the output slice must have.
    pub fn out_len(&self) -> usize {
        self.users.len() * self.per_user()
    }
}
