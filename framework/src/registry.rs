//! The registry: every component the host can build, from built-in plugins (linked into the
//! binary and found through `inventory`) and dynamic plugins (abi_stable over libloading).
//!
//! Loading a dynamic plugin goes through three gates, each with its own clear refusal:
//! 1. the file must be a loadable shared library;
//! 2. it must export `recfuse_plugin_abi`, and that SDK ABI version must pass
//!    [`SdkAbiVersion::can_load`] (checked before any layout is touched);
//! 3. abi_stable's layout check of the root module must pass.
//!
//! Libraries are never unloaded (their code may still be referenced by trait objects).

use anyhow::{anyhow, bail, Context, Result};
use abi_stable::library::{lib_header_from_raw_library, RawLibrary};
use recfuse_sdk::abi::{SdkAbiVersion, ABI_SYMBOL, SDK_ABI_VERSION};
use abi_stable::std_types::RStr;
use recfuse_sdk::ffi::{BuiltinPlugin, ComponentKind, FfiResult, FuserBox, HostFfiBox, InstructionsBox, PluginModuleRef, RankerBox, SourceBox, TunerBox};
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where a plugin came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Builtin,
    Dynamic(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin => f.write_str("builtin"),
            Origin::Dynamic(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ComponentInfo {
    pub kind: ComponentKind,
    pub name: String,
    pub description: String,
}

/// One plugin library (or built-in crate) and what it offers.
#[derive(Clone)]
pub struct Plugin {
    pub name: String,
    pub version: String,
    pub abi: SdkAbiVersion,
    pub origin: Origin,
    /// sha256 of a dynamic plugin's library file: a rebuilt library with an unchanged version
    /// is a different plugin to stage keys.
    pub sha256: Option<String>,
    pub components: Vec<ComponentInfo>,
    pub module: Module,
}

/// A plugin's root module: current, or of an older ABI minor driven through adapters.
#[derive(Clone, Copy)]
pub enum Module {
    Current(PluginModuleRef),
    V1_0(crate::compat_1_0::Module),
}

macro_rules! constructors {
    ($(($kind:ident, $name:ident, $create:ident, $boxed:ident, $safe:ident, $shim:ident)),* $(,)?) => {
        impl Module {
            $(pub fn $create(&self, name: RStr<'_>, config: RStr<'_>, host: HostFfiBox) -> FfiResult<$boxed> {
                match self {
                    Module::Current(m) => (m.$create())(name, config, host),
                    Module::V1_0(m) => m.$create(name, config, host),
                }
            })*
        }
    };
}
recfuse_sdk::__for_each_component_kind!(constructors);

impl Plugin {
    fn from_module(module: PluginModuleRef, origin: Origin) -> Result<Plugin> {
        let info = (module.info())();
        let abi = (module.abi_version())();
        Ok(Plugin {
            name: info.name.to_string(),
            version: info.version.to_string(),
            abi,
            origin,
            sha256: None,
            components: info
                .components
                .iter()
                .map(|c| ComponentInfo { kind: c.kind, name: c.name.to_string(), description: c.description.to_string() })
                .collect(),
            module: Module::Current(module),
        })
    }

    fn from_v1_0(module: crate::compat_1_0::Module, abi: SdkAbiVersion, origin: Origin) -> Plugin {
        let (name, version, components) = module.info();
        Plugin {
            name,
            version,
            abi,
            origin,
            sha256: None,
            components: components.into_iter().map(|(kind, name, description)| ComponentInfo { kind, name, description }).collect(),
            module: Module::V1_0(module),
        }
    }
}

/// A component found in the registry: which plugin provides `kind = name`.
#[derive(Clone)]
pub struct Found<'a> {
    pub plugin: &'a Plugin,
    pub name: &'a str,
}

#[derive(Default, Clone)]
pub struct Registry {
    plugins: Vec<Plugin>,
}

/// File names that look like shared libraries on this platform.
fn is_shared_library(path: &Path) -> bool {
    let ext = std::env::consts::DLL_EXTENSION;
    path.extension().is_some_and(|e| e == ext)
}

impl Registry {
    /// An empty registry (no built-ins), for tests and embedding.
    pub fn empty() -> Self {
        Self::default()
    }

    /// All built-in plugins linked into this binary.
    pub fn with_builtins() -> Result<Self> {
        let mut r = Self::default();
        let mut modules: Vec<_> = recfuse_sdk::__private::inventory::iter::<BuiltinPlugin>.into_iter().map(|b| (b.module)()).collect();
        modules.sort_by_key(|m| (m.info())().name.to_string());
        for m in modules {
            r.add(Plugin::from_module(m, Origin::Builtin)?)?;
        }
        Ok(r)
    }

    pub fn plugins(&self) -> &[Plugin] {
        &self.plugins
    }

    fn add(&mut self, plugin: Plugin) -> Result<()> {
        for c in &plugin.components {
            if let Ok(existing) = self.find(c.kind, &c.name) {
                bail!(
                    "{} `{}` from plugin `{}` ({}) is already provided by plugin `{}` ({})",
                    c.kind,
                    c.name,
                    plugin.name,
                    plugin.origin,
                    existing.plugin.name,
                    existing.plugin.origin
                );
            }
        }
        self.plugins.push(plugin);
        Ok(())
    }

    /// Loads one dynamic plugin library. Loading the same file twice is a no-op.
    pub fn load_library(&mut self, path: &Path) -> Result<&Plugin> {
        let canonical = path.canonicalize().with_context(|| format!("plugin library {} not found", path.display()))?;
        if let Some(i) = self.plugins.iter().position(|p| p.origin == Origin::Dynamic(canonical.clone())) {
            return Ok(&self.plugins[i]);
        }
        let plugin = load_dynamic(&canonical)?;
        self.add(plugin)?;
        Ok(self.plugins.last().expect("just added"))
    }

    /// Loads every shared library in `dir`. Returns the errors of libraries that failed, so one
    /// bad file in a plugin directory does not hide the others.
    pub fn load_dir(&mut self, dir: &Path) -> Result<Vec<anyhow::Error>> {
        let entries = std::fs::read_dir(dir).with_context(|| format!("plugin directory {} cannot be read", dir.display()))?;
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_shared_library(p)).collect();
        paths.sort();
        let mut errors = Vec::new();
        for p in paths {
            if let Err(e) = self.load_library(&p) {
                errors.push(e);
            }
        }
        Ok(errors)
    }

    /// Loads the directories listed in `RECFUSE_PLUGIN_PATH` (`:`-separated).
    pub fn load_env_path(&mut self) -> Result<Vec<anyhow::Error>> {
        let mut errors = Vec::new();
        if let Some(v) = std::env::var_os("RECFUSE_PLUGIN_PATH") {
            for dir in std::env::split_paths(&v).filter(|d| !d.as_os_str().is_empty()) {
                match self.load_dir(&dir) {
                    Ok(mut e) => errors.append(&mut e),
                    Err(e) => errors.push(e.context("in RECFUSE_PLUGIN_PATH")),
                }
            }
        }
        Ok(errors)
    }

    /// Finds the plugin providing `kind = name`; the error lists what is available.
    pub fn find(&self, kind: ComponentKind, name: &str) -> Result<Found<'_>> {
        for p in &self.plugins {
            if let Some(c) = p.components.iter().find(|c| c.kind == kind && c.name == name) {
                return Ok(Found { plugin: p, name: &c.name });
            }
        }
        let available: BTreeSet<&str> = self.names(kind).collect();
        let list = if available.is_empty() { "none".to_string() } else { available.into_iter().collect::<Vec<_>>().join(", ") };
        Err(anyhow!("unknown {kind} `{name}`; available {kind}s: {list}"))
    }

    pub fn names(&self, kind: ComponentKind) -> impl Iterator<Item = &str> {
        self.plugins.iter().flat_map(move |p| p.components.iter().filter(move |c| c.kind == kind).map(|c| c.name.as_str()))
    }
}

/// Opens, checks and initialises a dynamic plugin library.
fn load_dynamic(path: &Path) -> Result<Plugin> {
    let raw = RawLibrary::load_at(path).map_err(|e| anyhow!("{} is not a loadable plugin library: {e}", path.display()))?;
    // SAFETY: the ABI symbol's signature is fixed for all SDK versions (see `recfuse_sdk::abi`).
    let abi = unsafe {
        let symbol = format!("{ABI_SYMBOL}\0");
        match raw.get::<extern "C" fn() -> SdkAbiVersion>(symbol.as_bytes()) {
            Ok(f) => f(),
            Err(_) => bail!(
                "{} is a shared library but not a recfuse plugin: it does not export `{ABI_SYMBOL}` \
                 (plugins are built as a cdylib with `recfuse_sdk::export_plugin!`)",
                path.display()
            ),
        }
    };
    if !SDK_ABI_VERSION.can_load(abi) {
        bail!("refusing {}: {}", path.display(), SDK_ABI_VERSION.refusal(abi));
    }
    // SAFETY: abi_stable checks its own version and the root module's layout before use.
    let header = unsafe { lib_header_from_raw_library(&raw) }
        .map_err(|e| anyhow!("{}: no valid recfuse root module: {e}", path.display()))?;
    let layout_error = |e| anyhow!("{}: the plugin's types do not match this host's (layout check failed): {e}", path.display());
    let origin = Origin::Dynamic(path.to_path_buf());
    // A 1.0 plugin is checked against the 1.0 layouts it was built with (abi_stable cannot
    // check it against the current, longer vtables) and driven through adapters.
    // Every older minor needs its frozen layouts here: bumping the ABI minor means vendoring the
    // previous SDK too (as sdk/vendor/recfuse-sdk-1.0) and routing it like 1.0.
    const _: () = assert!(SDK_ABI_VERSION.major == 1 && SDK_ABI_VERSION.minor == 1, "vendor the SDK of the previous minor");
    let plugin = if abi.minor == 0 {
        let module = header.init_root_module::<crate::compat_1_0::ModuleRef>().map_err(layout_error)?;
        Plugin::from_v1_0(crate::compat_1_0::Module(module), abi, origin)
    } else {
        Plugin::from_module(header.init_root_module::<PluginModuleRef>().map_err(layout_error)?, origin)?
    };
    // Never unloaded: trait objects created by the plugin point into its code.
    std::mem::forget(raw);
    Ok(Plugin { sha256: Some(crate::runstore::hash_file(path)?), ..plugin })
}
