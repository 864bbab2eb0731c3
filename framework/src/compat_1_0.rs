//! Plugins built against SDK ABI 1.0, in a 1.1 host.
//!
//! abi_stable checks a library's layouts against the host's and accepts a library whose
//! vtables have more methods than the host's, never fewer, so a 1.0 plugin cannot be checked
//! against the 1.1 types. It is checked against the 1.0 types instead (`recfuse-sdk-1-0`, the
//! SDK exactly as 1.0 shipped, vendored in `sdk/vendor/`), and each of its components is
//! wrapped in an adapter that implements the *current* FFI trait by calling the 1.0 one. The
//! rest of the host sees current objects only; the 1.1 methods a 1.0 component lacks answer
//! through the traits' default bodies (no item knowledge, `fit` without item knowledge, "cannot
//! save").
//!
//! The 1.0 and current records are the same `#[repr(C)]` definitions in two crates (the 1.0
//! ones frozen); where a record did not change, values are reinterpreted without copying
//! ([`same_layout`]), else converted field by field.

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec};
use recfuse_sdk::ffi as now;
use recfuse_sdk::ffi::FfiResult;
use recfuse_sdk_1_0::ffi as old;
use std::sync::Mutex;

pub use old::PluginModuleRef as ModuleRef;

/// Reinterprets a 1.0 record as its unchanged current twin (or back).
///
/// SAFETY (for every use below): `A` and `B` are the same `#[repr(C)]` definition, compiled
/// from the frozen 1.0 sources and from the current sources where that definition did not
/// change (abi_stable verified the plugin's layout against the 1.0 one when it loaded).
unsafe fn same_layout<A, B>(a: A) -> B {
    assert_eq!((std::mem::size_of::<A>(), std::mem::align_of::<A>()), (std::mem::size_of::<B>(), std::mem::align_of::<B>()));
    let a = std::mem::ManuallyDrop::new(a);
    unsafe { std::ptr::read(&*a as *const A as *const B) }
}

fn result<T, U>(r: old::FfiResult<T>, f: impl FnOnce(T) -> U) -> FfiResult<U> {
    match r {
        RResult::ROk(v) => RResult::ROk(f(v)),
        RResult::RErr(e) => RResult::RErr(now::ErrorFfi { message: e.message, causes: e.causes }),
    }
}

/// The catalog in 1.0 form, converted once per host catalog (the same for a whole run).
#[derive(Default)]
struct CatalogCache {
    key: Option<usize>,
    catalog: Option<Box<old::CatalogFfi>>,
}

impl CatalogCache {
    fn get(&mut self, c: &now::CatalogFfi) -> &old::CatalogFfi {
        let key = c as *const now::CatalogFfi as usize;
        if self.key != Some(key) || self.catalog.is_none() {
            // SAFETY: CatalogFfi and everything in it are unchanged since 1.0.
            self.catalog = Some(Box::new(unsafe { same_layout::<now::CatalogFfi, old::CatalogFfi>(c.clone()) }));
            self.key = Some(key);
        }
        self.catalog.as_deref().expect("just set")
    }
}

fn view<'a>(cache: &'a mut CatalogCache, v: &now::TrainViewFfi<'a>) -> old::TrainViewFfi<'a> {
    // SAFETY: Event is unchanged since 1.0.
    let events: RSlice<'a, recfuse_sdk_1_0::records::Event> = unsafe { same_layout(v.events) };
    old::TrainViewFfi { catalog: cache.get(v.catalog), events, offsets: v.offsets }
}

/// The current host services, offered to a 1.0 plugin as the 1.0 trait.
#[derive(Clone)]
struct HostAdapter(now::HostFfiBox);

impl old::HostFfi for HostAdapter {
    fn log(&self, level: old::LogLevel, message: RStr<'_>) {
        // SAFETY: LogLevel is unchanged since 1.0.
        self.0.log(unsafe { same_layout(level) }, message)
    }
    fn progress_begin(&self, label: RStr<'_>, total: u64) -> u64 {
        self.0.progress_begin(label, total)
    }
    fn progress_advance(&self, id: u64, delta: u64) {
        self.0.progress_advance(id, delta)
    }
    fn progress_end(&self, id: u64) {
        self.0.progress_end(id)
    }
    fn cancelled(&self) -> bool {
        self.0.cancelled()
    }
    fn run_dir(&self) -> RString {
        self.0.run_dir()
    }
    fn seed(&self) -> u64 {
        self.0.seed()
    }
}

fn host(h: now::HostFfiBox) -> old::HostFfiBox {
    old::HostFfiBox::from_ptr(RArc::new(HostAdapter(h)), TD_Opaque)
}

struct Source(old::SourceBox);
impl now::SourceFfi for Source {
    fn load(&mut self) -> FfiResult<now::DatasetFfi> {
        // SAFETY: DatasetFfi and everything in it are unchanged since 1.0.
        result(self.0.load(), |d| unsafe { same_layout(d) })
    }
}

struct Fuser(old::FuserBox, Mutex<CatalogCache>);
impl now::FuserFfi for Fuser {
    fn prepare(&mut self, v: now::TrainViewFfi<'_>) -> FfiResult<()> {
        let mut cache = self.1.lock().expect("catalog cache");
        let v = view(&mut cache, &v);
        result(self.0.prepare(v), |x| x)
    }
    fn fuse(&mut self, v: now::TrainViewFfi<'_>, users: RSlice<'_, u32>) -> FfiResult<RVec<now::KnowledgeFfi>> {
        let mut cache = self.1.lock().expect("catalog cache");
        let v = view(&mut cache, &v);
        // SAFETY: KnowledgeFfi is unchanged since 1.0.
        result(self.0.fuse(v, users), |k| unsafe { same_layout(k) })
    }
}

struct Instructions(old::InstructionsBox, Mutex<CatalogCache>);
impl now::InstructionsFfi for Instructions {
    fn build(&mut self, v: now::TrainViewFfi<'_>, requests: RSlice<'_, now::InstructionRequestFfi>) -> FfiResult<RVec<now::InstructionFfi>> {
        let mut cache = self.1.lock().expect("catalog cache");
        let v = view(&mut cache, &v);
        // SAFETY: InstructionRequestFfi and InstructionFfi (and Split, LabeledItem) are unchanged since 1.0.
        let requests: RSlice<'_, old::InstructionRequestFfi> = unsafe { same_layout(requests) };
        result(self.0.build(v, requests), |i| unsafe { same_layout(i) })
    }
}

struct Tuner(old::TunerBox, Mutex<CatalogCache>);
impl now::TunerFfi for Tuner {
    fn tune(
        &mut self,
        v: now::TrainViewFfi<'_>,
        train: RSlice<'_, now::InstructionFfi>,
        valid: RSlice<'_, now::InstructionFfi>,
        out_dir: RStr<'_>,
    ) -> FfiResult<now::ArtifactFfi> {
        let mut cache = self.1.lock().expect("catalog cache");
        let v = view(&mut cache, &v);
        // SAFETY: InstructionFfi and ArtifactFfi are unchanged since 1.0.
        let (train, valid) = unsafe { (same_layout(train), same_layout(valid)) };
        result(self.0.tune(v, train, valid, out_dir), |a| unsafe { same_layout(a) })
    }
}

struct Ranker(old::RankerBox, Mutex<CatalogCache>, Mutex<CatalogCache>);
impl now::RankerFfi for Ranker {
    fn fit(
        &mut self,
        v: now::TrainViewFfi<'_>,
        context: now::TrainViewFfi<'_>,
        knowledge: RSlice<'_, now::KnowledgeFfi>,
        artifact: ROption<now::ArtifactFfi>,
    ) -> FfiResult<()> {
        let (mut a, mut b) = (self.1.lock().expect("catalog cache"), self.2.lock().expect("catalog cache"));
        let (v, context) = (view(&mut a, &v), view(&mut b, &context));
        // SAFETY: KnowledgeFfi and ArtifactFfi are unchanged since 1.0.
        let (knowledge, artifact) = unsafe { (same_layout(knowledge), same_layout(artifact)) };
        result(self.0.fit(v, context, knowledge, artifact), |x| x)
    }
    fn score(&self, users: RSlice<'_, u32>, items: RSlice<'_, u32>, shared: bool, out: RSliceMut<'_, f32>) -> FfiResult<()> {
        result(self.0.score(users, items, shared, out), |x| x)
    }
}

/// Constructors of a 1.0 plugin's components, returning current FFI objects.
#[derive(Clone, Copy)]
pub struct Module(pub ModuleRef);

impl Module {
    pub fn info(&self) -> (String, String, Vec<(now::ComponentKind, String, String)>) {
        let info = (self.0.info())();
        let components = info
            .components
            .iter()
            // SAFETY: ComponentKind is unchanged since 1.0.
            .map(|c| (unsafe { same_layout::<old::ComponentKind, now::ComponentKind>(c.kind) }, c.name.to_string(), c.description.to_string()))
            .collect();
        (info.name.to_string(), info.version.to_string(), components)
    }
    pub fn create_source(&self, name: RStr<'_>, config: RStr<'_>, h: now::HostFfiBox) -> FfiResult<now::SourceBox> {
        result((self.0.create_source())(name, config, host(h)), |b| now::SourceBox::from_value(Source(b), TD_Opaque))
    }
    pub fn create_fuser(&self, name: RStr<'_>, config: RStr<'_>, h: now::HostFfiBox) -> FfiResult<now::FuserBox> {
        result((self.0.create_fuser())(name, config, host(h)), |b| now::FuserBox::from_value(Fuser(b, Default::default()), TD_Opaque))
    }
    pub fn create_instructions(&self, name: RStr<'_>, config: RStr<'_>, h: now::HostFfiBox) -> FfiResult<now::InstructionsBox> {
        result((self.0.create_instructions())(name, config, host(h)), |b| {
            now::InstructionsBox::from_value(Instructions(b, Default::default()), TD_Opaque)
        })
    }
    pub fn create_tuner(&self, name: RStr<'_>, config: RStr<'_>, h: now::HostFfiBox) -> FfiResult<now::TunerBox> {
        result((self.0.create_tuner())(name, config, host(h)), |b| now::TunerBox::from_value(Tuner(b, Default::default()), TD_Opaque))
    }
    pub fn create_ranker(&self, name: RStr<'_>, config: RStr<'_>, h: now::HostFfiBox) -> FfiResult<now::RankerBox> {
        result((self.0.create_ranker())(name, config, host(h)), |b| {
            now::RankerBox::from_value(Ranker(b, Default::default(), Default::default()), TD_Opaque)
        })
    }
}

