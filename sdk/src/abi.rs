//! The SDK's own ABI version and the one rule that decides whether a plugin may be loaded.
//!
//! abi_stable checks type layouts; this version states intent. It is read from a plain C symbol
//! (`recfuse_plugin_abi`) *before* any layout is touched, so that a plugin built against an
//! incompatible SDK is refused with a message naming both versions instead of a layout dump.

use abi_stable::StableAbi;
use std::fmt;

/// Semver-style ABI version of the SDK contract.
///
/// * `major` changes when the contract breaks (a trait method changes, a record loses a field).
/// * `minor` changes when something is added at the end of a prefix type (a new host service,
///   a new optional component method): older plugins keep working in a newer host.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SdkAbiVersion {
    pub major: u32,
    pub minor: u32,
}

/// The ABI version of this SDK. Bump it together with any change to `ffi`.
///
/// * 1.0: the first contract.
/// * 1.1: item knowledge (`fuse_items`), multi-task instruction requests with target values
///   (`build_tasks`), tuners get knowledge (`tune_with`), rankers save/load and declare a cost
///   (`fit_with`, `save`, `load`, `seconds_per_candidate`), the host renders a task's prompts
///   for rankers (`tasks`, `render_instructions`). All appended; 1.0 plugins load unchanged.
pub const SDK_ABI_VERSION: SdkAbiVersion = SdkAbiVersion { major: 1, minor: 1 };

/// The name of the C symbol (`extern "C" fn() -> SdkAbiVersion`) every dynamic plugin exports.
/// This symbol and the layout of [`SdkAbiVersion`] never change, whatever the ABI version.
pub const ABI_SYMBOL: &str = "recfuse_plugin_abi";

impl SdkAbiVersion {
    /// The compatibility rule, in one place: may a host speaking `self` load a plugin built
    /// against `plugin`?
    ///
    /// * majors must match (for major 0, as in semver, minors must match too);
    /// * the plugin's minor must not be newer than the host's: a plugin may rely on host services
    ///   added in its minor, which an older host does not offer.
    ///
    /// An older minor is loaded by checking it against that minor's own frozen layouts
    /// (abi_stable accepts a library whose vtables have more methods than the host's, never
    /// fewer), which the host keeps for every earlier minor (`sdk/vendor/`,
    /// `framework/src/compat_1_0.rs`).
    pub fn can_load(self, plugin: SdkAbiVersion) -> bool {
        if self.major != plugin.major {
            return false;
        }
        if self.major == 0 {
            return self.minor == plugin.minor;
        }
        plugin.minor <= self.minor
    }

    /// The refusal message, naming both versions.
    pub fn refusal(self, plugin: SdkAbiVersion) -> String {
        let why = if self.major != plugin.major {
            "the major versions differ"
        } else if plugin.minor > self.minor {
            "the plugin needs a newer host"
        } else {
            "0.x versions are only compatible with the same minor"
        };
        format!(
            "plugin was built against recfuse SDK ABI {plugin}, but this host speaks SDK ABI {self} ({why}); \
             rebuild the plugin against recfuse-sdk with ABI {}.x",
            self.major
        )
    }
}

impl fmt::Display for SdkAbiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32) -> SdkAbiVersion {
        SdkAbiVersion { major, minor }
    }

    #[test]
    fn same_version_loads() {
        assert!(v(1, 0).can_load(v(1, 0)));
        assert!(v(0, 3).can_load(v(0, 3)));
    }

    #[test]
    fn older_minor_plugin_loads_in_newer_host() {
        assert!(v(1, 1).can_load(v(1, 0)));
        assert!(v(1, 4).can_load(v(1, 2)));
    }

    #[test]
    fn newer_minor_plugin_is_refused() {
        assert!(!v(1, 2).can_load(v(1, 3)));
        assert!(v(1, 2).refusal(v(1, 3)).contains("needs a newer host"));
    }

    #[test]
    fn major_mismatch_is_refused_naming_both() {
        assert!(!v(1, 0).can_load(v(2, 0)));
        assert!(!v(2, 0).can_load(v(1, 9)));
        let msg = v(1, 0).refusal(v(2, 0));
        assert!(msg.contains("SDK ABI 2.0") && msg.contains("SDK ABI 1.0"), "{msg}");
    }

    #[test]
    fn zero_major_needs_same_minor() {
        assert!(!v(0, 3).can_load(v(0, 2)));
        assert!(!v(0, 2).can_load(v(0, 3)));
    }
}
