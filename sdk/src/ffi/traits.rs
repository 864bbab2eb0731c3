//! The sabi traits that cross the boundary: the host's services (implemented by the host,
//! called by plugins) and the five components (implemented by plugins, called by the host).
//!
//! Methods above `#[sabi(last_prefix_field)]` are ABI 1.0 and never move. Methods below it were
//! added in 1.1; each has a default body, which abi_stable runs when the other side was built
//! against 1.0 and its vtable lacks the method: a 1.0 component answers the 1.1 call through
//! its 1.0 method, or says "not supported".

use super::records::*;
use super::{ErrorFfi, FfiResult};
use abi_stable::sabi_trait;
use abi_stable::std_types::{RArc, RBox, ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec};
use abi_stable::StableAbi;

#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

#[sabi_trait]
pub trait HostFfi: Clone + Send + Sync {
    fn log(&self, level: LogLevel, message: RStr<'_>);
    fn progress_begin(&self, label: RStr<'_>, total: u64) -> u64;
    fn progress_advance(&self, id: u64, delta: u64);
    fn progress_end(&self, id: u64);
    fn cancelled(&self) -> bool;
    fn run_dir(&self) -> RString;
    #[sabi(last_prefix_field)]
    fn seed(&self) -> u64;

    /// 1.1: the instruction tasks of the run (one per `[[instructions]]` builder).
    fn tasks(&self) -> RVec<RString> {
        RVec::new()
    }
    /// 1.1: renders `requests` with the run's builder of `task`, exactly as the instructions
    /// stage did, so a ranker scores the prompts the tuner trained on.
    fn render_instructions(&self, task: RStr<'_>, _requests: RSlice<'_, TaskRequestFfi>) -> FfiResult<RVec<InstructionFfi>> {
        RResult::RErr(ErrorFfi::msg(format!("this host cannot render instructions of task `{task}`")))
    }
}

pub type HostFfiBox = HostFfi_TO<'static, RArc<()>>;

#[sabi_trait]
pub trait SourceFfi: Send + Sync {
    #[sabi(last_prefix_field)]
    fn load(&mut self) -> FfiResult<DatasetFfi>;
}

#[sabi_trait]
pub trait FuserFfi: Send + Sync {
    fn prepare(&mut self, view: TrainViewFfi<'_>) -> FfiResult<()>;
    #[sabi(last_prefix_field)]
    fn fuse(&mut self, view: TrainViewFfi<'_>, users: RSlice<'_, u32>) -> FfiResult<RVec<KnowledgeFfi>>;

    /// 1.1: knowledge about items. A 1.0 fuser knows none.
    fn fuse_items(&mut self, _view: TrainViewFfi<'_>, _items: RSlice<'_, u32>) -> FfiResult<RVec<ItemKnowledgeFfi>> {
        RResult::ROk(RVec::new())
    }
}

#[sabi_trait]
pub trait InstructionsFfi: Send + Sync {
    #[sabi(last_prefix_field)]
    fn build(&mut self, view: TrainViewFfi<'_>, requests: RSlice<'_, InstructionRequestFfi>) -> FfiResult<RVec<InstructionFfi>>;

    /// 1.1: requests with their task, target values and item knowledge. A 1.0 builder gets the
    /// 1.0 form of the same requests.
    fn build_tasks(&mut self, view: TrainViewFfi<'_>, requests: RSlice<'_, TaskRequestFfi>) -> FfiResult<RVec<InstructionFfi>> {
        let old: Vec<InstructionRequestFfi> = requests.iter().map(TaskRequestFfi::to_v1_0).collect();
        self.build(view, RSlice::from_slice(&old))
    }
}

#[sabi_trait]
pub trait TunerFfi: Send + Sync {
    #[sabi(last_prefix_field)]
    fn tune(
        &mut self,
        view: TrainViewFfi<'_>,
        train: RSlice<'_, InstructionFfi>,
        valid: RSlice<'_, InstructionFfi>,
        out_dir: RStr<'_>,
    ) -> FfiResult<ArtifactFfi>;

    /// 1.1: with user and item knowledge. A 1.0 tuner gets the examples only.
    fn tune_with(&mut self, view: TrainViewFfi<'_>, inputs: TuneInputsFfi<'_>, out_dir: RStr<'_>) -> FfiResult<ArtifactFfi> {
        self.tune(view, inputs.train, inputs.valid, out_dir)
    }
}

#[sabi_trait]
pub trait RankerFfi: Send + Sync {
    fn fit(
        &mut self,
        view: TrainViewFfi<'_>,
        context: TrainViewFfi<'_>,
        knowledge: RSlice<'_, KnowledgeFfi>,
        artifact: ROption<ArtifactFfi>,
    ) -> FfiResult<()>;
    #[sabi(last_prefix_field)]
    fn score(&self, users: RSlice<'_, u32>, items: RSlice<'_, u32>, shared: bool, out: RSliceMut<'_, f32>) -> FfiResult<()>;

    /// 1.1: fit with item knowledge and a model directory. A 1.0 ranker gets its 1.0 `fit`.
    fn fit_with(&mut self, inputs: FitInputsFfi<'_>) -> FfiResult<()> {
        self.fit(inputs.view, inputs.context, inputs.knowledge, inputs.artifact)
    }
    /// 1.1: saves the fitted model into `dir`; `false` = not supported (1.0 rankers).
    fn save(&self, _dir: RStr<'_>) -> FfiResult<bool> {
        RResult::ROk(false)
    }
    /// 1.1: restores a saved model instead of fitting; `false` = not supported.
    fn load(&mut self, _inputs: FitInputsFfi<'_>, _dir: RStr<'_>) -> FfiResult<bool> {
        RResult::ROk(false)
    }
    /// 1.1: seconds to score one (user, candidate) pair; 0 = cheap (1.0 rankers).
    fn seconds_per_candidate(&self) -> f64 {
        0.0
    }
}

pub type SourceBox = SourceFfi_TO<'static, RBox<()>>;
pub type FuserBox = FuserFfi_TO<'static, RBox<()>>;
pub type InstructionsBox = InstructionsFfi_TO<'static, RBox<()>>;
pub type TunerBox = TunerFfi_TO<'static, RBox<()>>;
pub type RankerBox = RankerFfi_TO<'static, RBox<()>>;
