//! Helpers for the end-to-end tests: building plugins outside the workspace, exactly as a third
//! party would, and writing small pipeline configs over the real MovieLens-100K data.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

/// MovieLens-100K as fetched by `scripts/fetch-data.sh`.
pub fn ml100k_dir() -> PathBuf {
    let d = root().join(".cache/data/ml-100k");
    assert!(d.join(".complete").exists(), "MovieLens-100K missing: run scripts/fetch-data.sh (scripts/test.sh does)");
    d
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Builds the cargo project at `manifest_dir` (its own workspace) and returns the path of its
/// cdylib `lib<name>.so`. All external builds share one target directory so dependencies are
/// compiled once.
pub fn build_cdylib(manifest_dir: &Path, lib_name: &str) -> PathBuf {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let target = root().join("target/external");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .arg("build")
        .arg("--quiet")
        .arg("--manifest-path")
        .arg(manifest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        // Features and flags of the outer test build must not leak into the plugin's build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building {} failed", manifest_dir.display());
    let lib = target.join("debug").join(format!("{}{lib_name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX));
    assert!(lib.exists(), "{} was not produced", lib.display());
    lib
}

pub fn recency_plugin() -> PathBuf {
    build_cdylib(&root().join("examples/recency-ranker"), "recency_ranker")
}
pub fn panicky_plugin() -> PathBuf {
    build_cdylib(&root().join("tests/fixtures"), "panicky_plugin")
}
pub fn future_abi_plugin() -> PathBuf {
    build_cdylib(&root().join("tests/fixtures"), "future_abi_plugin")
}

/// A pipeline config over ML-100K with the given extra TOML appended.
pub fn ml100k_config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"[run]
name = "{name}"
dir = "{runs}"
batch_size = 128

[source]
kind = "recbole-atomic"
dir = "{data}"
name = "ml-100k"
kind_rules = [{{ min = 4.0, kind = "like" }}, {{ max = 2.0, kind = "dislike" }}]

{extra}
"#,
        runs = dir.join("runs").display(),
        data = ml100k_dir().display(),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs the CLI in-process; returns (exit code or error text, stdout).
pub fn cli(args: &[&str]) -> (Result<i32, String>, String) {
    let mut out = Vec::new();
    let argv = std::iter::once("recfuse".to_string()).chain(args.iter().map(|s| s.to_string()));
    let r = recfuse::cli::run_cli(argv, &mut out).map_err(|e| format!("{e:#}"));
    (r, String::from_utf8_lossy(&out).into_owned())
}

pub fn abi_1_0_plugin() -> PathBuf {
    build_cdylib(&root().join("tests/fixtures/abi-1-0-plugin"), "abi_1_0_plugin")
}

/// Loads a config file the way the CLI does.
pub fn load_config(path: &Path, sets: &[&str]) -> recfuse::config::LoadedConfig {
    let sources = recfuse::config::ConfigSources {
        base: path.to_path_buf(),
        overlays: vec![],
        sets: sets.iter().map(|s| s.to_string()).collect(),
    };
    recfuse::config::LoadedConfig::load(&sources).expect("config loads")
}
