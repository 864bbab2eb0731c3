//! Dynamic plugins: a third-party plugin built outside the workspace loads and runs in a
//! pipeline; incompatible, foreign and panicking libraries are refused or contained.

use recfuse::config::{ConfigSources, LoadedConfig};
use recfuse::pipeline::{run, RunOptions};
use recfuse::registry::{Origin, Registry};
use recfuse_e2e::*;
use recfuse_sdk::ffi::ComponentKind;
use std::path::Path;

fn load(path: &Path) -> LoadedConfig {
    LoadedConfig::load(&ConfigSources { base: path.to_path_buf(), ..Default::default() }).expect("config loads")
}

#[test]
fn third_party_plugin_loads_and_runs_in_a_pipeline() {
    let lib = recency_plugin();
    let d = tempfile::tempdir().unwrap();
    let cfg = ml100k_config(
        d.path(),
        "recency",
        &format!("[plugins]\npaths = [\"{}\"]\n\n[ranker]\nkind = \"recency\"\nhalf_life_days = 30\n", lib.display()),
    );
    let outcome = run(&load(&cfg), &RunOptions::default()).expect("pipeline with a dynamic ranker runs");
    let report = outcome.reports.into_iter().next().expect("evaluated");
    assert_eq!(report.model, "recency");
    let all = &report.segments["all"];
    assert_eq!(all.users, 943);
    let hr10 = all.metrics["HR@10"];
    // Better than a random ranking of ~1600 items (HR@10 ≈ 0.006), and a plausible figure.
    assert!(hr10 > 0.03 && hr10 < 0.5, "HR@10 {hr10}");

    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(outcome.run_dir.join("manifest.json")).unwrap()).unwrap();
    let ranker = manifest["components"].as_array().unwrap().iter().find(|c| c["kind"] == "ranker").unwrap();
    assert_eq!(ranker["plugin"], "recency-ranker");
    assert_eq!(ranker["version"], "0.3.1");
    assert_eq!(ranker["abi"]["major"], 1);
    assert!(ranker["origin"].as_str().unwrap().ends_with("librecency_ranker.so"));
}

/// A rebuilt plugin with an unchanged version is a different plugin: its library's sha256 is
/// in the manifest and in the stage keys, so nothing it computed before is reused.
#[test]
fn a_changed_plugin_library_reruns_its_stages() {
    let d = tempfile::tempdir().unwrap();
    // Each build in its own directory: a loaded library is never unloaded, so this process
    // must not see the same path change under it (a new `recfuse` process would).
    let build = |name: &str, extra: &[u8]| -> std::path::PathBuf {
        let dir = d.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let lib = dir.join("librecency_ranker.so");
        let mut bytes = std::fs::read(recency_plugin()).unwrap();
        bytes.extend_from_slice(extra); // trailing bytes leave an ELF loadable
        std::fs::write(&lib, bytes).unwrap();
        lib
    };
    let run_with = |lib: &std::path::Path| {
        let extra = format!("[plugins]\npaths = [\"{}\"]\n\n[ranker]\nkind = \"recency\"\nhalf_life_days = 30\n", lib.display());
        run(&load(&ml100k_config(d.path(), "rebuilt", &extra)), &RunOptions::default()).unwrap()
    };
    let sha = |outcome: &recfuse::pipeline::RunOutcome| -> String {
        let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(outcome.run_dir.join("manifest.json")).unwrap()).unwrap();
        m["components"].as_array().unwrap().iter().find(|c| c["kind"] == "ranker").unwrap()["sha256"].as_str().unwrap().to_string()
    };
    let original = build("a", b"");
    let first = sha(&run_with(&original)); // the run directory is shared: read each manifest at once
    assert_eq!(first, recfuse::runstore::hash_file(&original).unwrap());
    // The same bytes elsewhere: nothing reruns.
    let same = run_with(&build("b", b""));
    assert_eq!(same.stage("evaluate.recency"), Some(recfuse::runstore::StageStart::Skip));
    // "Rebuilt": same name and version, different bytes.
    let rebuilt = run_with(&build("c", b"rebuilt"));
    assert_eq!(rebuilt.stage("evaluate.recency"), Some(recfuse::runstore::StageStart::Fresh));
    assert_ne!(sha(&rebuilt), first);
}

#[test]
fn plugins_command_lists_dynamic_components_with_origin_and_abi() {
    let lib = recency_plugin();
    let (code, out) = cli(&["plugins", "--path", lib.to_str().unwrap()]);
    assert_eq!(code, Ok(0), "{out}");
    let line = out.lines().find(|l| l.starts_with("ranker") && l.contains("recency ")).expect(&out);
    let abi = recfuse_sdk::SDK_ABI_VERSION.to_string();
    assert!(line.contains("recency-ranker") && line.contains("0.3.1") && line.contains(&abi), "{line}");
    assert!(line.contains("librecency_ranker.so"), "{line}");
    // The component's description follows its line.
    let next = out.lines().skip_while(|l| *l != line).nth(1).unwrap_or_default();
    assert_eq!(next.trim(), "time-decayed popularity: what is hot at the end of train", "{out}");
    // Built-ins are listed too, one per kind at least.
    for kind in ["source", "fuser", "instructions", "tuner", "ranker"] {
        assert!(out.lines().any(|l| l.starts_with(kind) && l.ends_with("builtin")), "no builtin {kind}:\n{out}");
    }
}

#[test]
fn incompatible_sdk_abi_is_refused_naming_both_versions() {
    let lib = future_abi_plugin();
    let mut reg = Registry::empty();
    let err = format!("{:#}", reg.load_library(&lib).err().expect("refused"));
    let host = format!("SDK ABI {}", recfuse_sdk::SDK_ABI_VERSION);
    assert!(err.contains("SDK ABI 2.0") && err.contains(&host), "{err}");
    assert!(err.contains("libfuture_abi_plugin.so"), "{err}");
    assert!(reg.plugins().is_empty());
}

#[test]
fn files_that_are_not_plugins_give_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let text = d.path().join("notes.so");
    std::fs::write(&text, "just text").unwrap();
    let mut reg = Registry::empty();
    let err = format!("{:#}", reg.load_library(&text).err().unwrap());
    assert!(err.contains("notes.so") && err.contains("is not a loadable plugin library"), "{err}");

    let missing = format!("{:#}", reg.load_library(&d.path().join("absent.so")).err().unwrap());
    assert!(missing.contains("absent.so") && missing.contains("not found"), "{missing}");

    // A real shared library that is not a recfuse plugin.
    let libm = ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib64/libm.so.6", "/lib64/libm.so.6"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("libm present");
    let err = format!("{:#}", reg.load_library(libm).err().unwrap());
    assert!(err.contains("not a recfuse plugin") && err.contains("recfuse_plugin_abi"), "{err}");

    // In a plugin directory, the bad file is reported and the good plugin still loads.
    let dir = d.path().join("plugins");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(recency_plugin(), dir.join("librecency_ranker.so")).unwrap();
    std::fs::write(dir.join("libbroken.so"), "junk").unwrap();
    let mut reg = Registry::empty();
    let errors = reg.load_dir(&dir).unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(format!("{:#}", errors[0]).contains("libbroken.so"));
    assert!(reg.find(ComponentKind::Ranker, "recency").is_ok());
    assert!(matches!(reg.plugins()[0].origin, Origin::Dynamic(_)));
}

#[test]
fn a_panicking_plugin_gives_an_error_and_the_host_goes_on() {
    let lib = panicky_plugin();
    let d = tempfile::tempdir().unwrap();
    // A panic while starting the component is a configuration error: nothing runs.
    let cfg = ml100k_config(
        d.path(),
        "panic-new",
        &format!("[plugins]\npaths = [\"{}\"]\n\n[ranker]\nkind = \"panicky\"\npanic_in = \"new\"\n", lib.display()),
    );
    let err = format!("{:#}", run(&load(&cfg), &RunOptions::default()).err().expect("the panic is an error"));
    assert!(err.contains("plugin panicked") && err.contains("told to panic in new"), "{err}");
    // A model that panics in fit or score is reported as failed, beside a healthy model that
    // is still evaluated and reported; the CLI's exit status says a model failed.
    for (where_, expect) in [("fit", "index out of bounds"), ("score", "told to panic in score")] {
        let name = format!("panic-{where_}");
        let cfg = ml100k_config(
            d.path(),
            &name,
            &format!(
                "[plugins]\npaths = [\"{}\"]\n\n[[rankers]]\nkind = \"panicky\"\npanic_in = \"{where_}\"\n\n[[rankers]]\nkind = \"popularity\"\n",
                lib.display()
            ),
        );
        let outcome = run(&load(&cfg), &RunOptions::default()).expect("the run finishes");
        assert_eq!(outcome.failed(), ["panicky"]);
        let failed = outcome.report("panicky").unwrap().error.clone().unwrap();
        assert!(failed.contains("plugin panicked") && failed.contains(expect), "{where_}: {failed}");
        assert!(outcome.report("popularity").unwrap().segments["all"].metrics["HR@10"] > 0.0);
        let md = std::fs::read_to_string(outcome.run_dir.join("report.md")).unwrap();
        assert!(md.contains("## failed models") && md.contains("| panicky |") && md.contains("| popularity |"), "{md}");
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(outcome.run_dir.join("report.json")).unwrap()).unwrap();
        assert!(json[0]["error"].as_str().unwrap().contains(expect));
        let (code, _) = cli(&["run", cfg.to_str().unwrap(), "--quiet"]);
        assert_eq!(code, Ok(recfuse::cli::EXIT_MODEL_FAILED));
    }
    // The same process goes on and runs a healthy pipeline.
    let cfg = ml100k_config(d.path(), "healthy", "[ranker]\nkind = \"popularity\"\n");
    let outcome = run(&load(&cfg), &RunOptions::default()).expect("host still works");
    assert!(outcome.reports[0].segments["all"].metrics["HR@10"] > 0.0);
    assert!(outcome.failed().is_empty());
}

#[test]
fn host_services_reach_the_plugin_logging_and_cancellation() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();

    let lib = recency_plugin();
    let d = tempfile::tempdir().unwrap();
    let extra = format!("[plugins]\npaths = [\"{}\"]\n\n[ranker]\nkind = \"recency\"\nhalf_life_days = 7\n", lib.display());
    let cfg = load(&ml100k_config(d.path(), "services", &extra));
    tracing::subscriber::with_default(subscriber, || {
        run(&cfg, &RunOptions::default()).expect("runs");
    });
    let logs = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    let line = logs.lines().find(|l| l.contains("recency fitted on")).unwrap_or_else(|| panic!("plugin log missing:\n{logs}"));
    assert!(line.contains("recfuse::plugin") && line.contains("component=\"ranker\""), "{line}");

    // A cancelled run stops inside the plugin's fit, with an error, and the next run finishes.
    let cancel = Arc::new(AtomicBool::new(true));
    let opts = RunOptions { cancel: cancel.clone(), run_dir: Some(d.path().join("cancelled")), ..Default::default() };
    let err = format!("{:#}", run(&cfg, &opts).err().expect("cancelled"));
    assert!(err.contains("cancelled"), "{err}");
    cancel.store(false, Ordering::Relaxed);
    let outcome = run(&cfg, &opts).expect("resumes");
    assert_eq!(outcome.reports.len(), 1);
}
