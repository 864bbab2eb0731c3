//! The root module every plugin library exports, the component kinds and their listings, and
//! the symbols the host looks up.

use super::traits::*;
use super::FfiResult;
use crate::abi::{SdkAbiVersion, SDK_ABI_VERSION};
use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RStr, RString, RVec};
use abi_stable::{declare_root_module_statics, StableAbi};

/// The one table of component kinds: calls `$callback!` with, per kind, its `ComponentKind`
/// variant, config name, root-module constructor, FFI box, safe trait and shim constructor.
/// Code that does the same thing for every kind (host constructors, handles, the 1.0 adapters)
/// is generated from it, so a new kind or constructor is one edit here.
#[macro_export]
#[doc(hidden)]
macro_rules! __for_each_component_kind {
    ($callback:ident) => {
        $callback! {
            (Source, source, create_source, SourceBox, BehaviorSource, new_source),
            (Fuser, fuser, create_fuser, FuserBox, KnowledgeFuser, new_fuser),
            (Instructions, instructions, create_instructions, InstructionsBox, InstructionBuilder, new_instructions),
            (Tuner, tuner, create_tuner, TunerBox, Tuner, new_tuner),
            (Ranker, ranker, create_ranker, RankerBox, Ranker, new_ranker),
        }
    };
}

/// The five component kinds, as named in configs and listings.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ComponentKind {
    Source,
    Fuser,
    Instructions,
    Tuner,
    Ranker,
}

impl ComponentKind {
    pub const ALL: [ComponentKind; 5] = [
        ComponentKind::Source,
        ComponentKind::Fuser,
        ComponentKind::Instructions,
        ComponentKind::Tuner,
        ComponentKind::Ranker,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Source => "source",
            ComponentKind::Fuser => "fuser",
            ComponentKind::Instructions => "instructions",
            ComponentKind::Tuner => "tuner",
            ComponentKind::Ranker => "ranker",
        }
    }
}

impl std::fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct ComponentInfoFfi {
    pub kind: ComponentKind,
    pub name: RString,
    pub description: RString,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct PluginInfoFfi {
    pub name: RString,
    pub version: RString,
    pub components: RVec<ComponentInfoFfi>,
}

/// The root module every plugin library exports. A prefix type: fields may be appended after
/// `create_ranker` in a minor ABI version; older plugins then lack them and the host checks.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    pub abi_version: extern "C" fn() -> SdkAbiVersion,
    pub info: extern "C" fn() -> PluginInfoFfi,
    pub create_source: extern "C" fn(
        name: RStr<'_>,
        config_json: RStr<'_>,
        host: HostFfiBox,
    ) -> FfiResult<SourceBox>,
    pub create_fuser: extern "C" fn(
        name: RStr<'_>,
        config_json: RStr<'_>,
        host: HostFfiBox,
    ) -> FfiResult<FuserBox>,
    pub create_instructions: extern "C" fn(
        name: RStr<'_>,
        config_json: RStr<'_>,
        host: HostFfiBox,
    ) -> FfiResult<InstructionsBox>,
    pub create_tuner: extern "C" fn(
        name: RStr<'_>,
        config_json: RStr<'_>,
        host: HostFfiBox,
    ) -> FfiResult<TunerBox>,
    #[sabi(last_prefix_field)]
    pub create_ranker: extern "C" fn(
        name: RStr<'_>,
        config_json: RStr<'_>,
        host: HostFfiBox,
    ) -> FfiResult<RankerBox>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "recfuse_plugin";
    const NAME: &'static str = "recfuse_plugin";
    /// Tied to the SDK ABI version, not to the crate version: abi_stable refuses a library whose
    /// version strings differ in major (for 0.x: in minor), so strings that followed the crate
    /// would make every plugin unloadable at the next crate release. Our own rule
    /// ([`SdkAbiVersion::can_load`]) decides compatibility before this is consulted; this value
    /// only has to stay the same for every minor of one ABI major. ABI 1.x shipped with
    /// "0.1.0" (the crate version of the time), so 1.x keeps it.
    const VERSION_STRINGS: VersionStrings = abi_version_strings();
}

/// The symbol abi_stable looks up for the root module (checked against abi_stable in a test).
pub const ROOT_MODULE_SYMBOL: &str = "_1as_0lib_1header_0root_bmodule_bloader";

#[doc(hidden)]
pub extern "C" fn abi_version() -> SdkAbiVersion {
    SDK_ABI_VERSION
}

#[doc(hidden)]
pub const fn lib_header(
    constructor: extern "C" fn() -> abi_stable::library::RootModuleResult,
) -> abi_stable::library::LibHeader {
    // SAFETY: `constructor` is generated by `export_plugin!` and returns a `PluginModuleRef`.
    unsafe {
        abi_stable::library::LibHeader::from_constructor::<PluginModuleRef>(
            constructor,
            abi_stable::library::CheckTypeLayout::Yes,
        )
    }
}

/// A plugin linked into the host at build time, registered with `inventory`.
pub struct BuiltinPlugin {
    pub module: fn() -> PluginModuleRef,
}
inventory::collect!(BuiltinPlugin);

/// abi_stable's version strings for this ABI major (see `VERSION_STRINGS`).
pub const fn abi_version_strings() -> VersionStrings {
    match SDK_ABI_VERSION.major {
        1 => VersionStrings::new("0.1.0"),
        _ => panic!("choose abi_stable version strings for the new ABI major"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_module_symbol_matches_abi_stable() {
        assert_eq!(
            ROOT_MODULE_SYMBOL,
            abi_stable::library::ROOT_MODULE_LOADER_NAME
        );
    }

    #[test]
    fn version_strings_follow_the_abi_not_the_crate() {
        let v = <PluginModuleRef as RootModule>::VERSION_STRINGS;
        assert_eq!(v.version.as_str(), "0.1.0", "ABI 1.x libraries carry 0.1.0");
        assert_eq!(v, abi_version_strings());
        // abi_stable also stamps each type's layout with this crate's version and refuses a
        // 0.y mismatch: the SDK crate must stay 0.1.z while the ABI is 1.x.
        assert_eq!(SDK_ABI_VERSION.major, 1);
        assert!(
            env!("CARGO_PKG_VERSION").starts_with("0.1."),
            "SDK crate version {} breaks ABI 1.x layouts",
            env!("CARGO_PKG_VERSION")
        );
    }
}
