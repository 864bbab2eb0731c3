//! Config-driven pipelines: errors that name key and file, overlays that swap components,
//! skipped and resumed stages.

use recfuse::config::{ConfigSources, LoadedConfig};
use recfuse::pipeline::{run, validate, RunOptions};
use recfuse::runstore::StageStart;
use recfuse_e2e::*;
use std::path::{Path, PathBuf};

const FULL: &str = r#"
[[fusers]]
kind = "template"
max_per_kind = 5

[instructions]
kind = "ctr"

[tuner]
kind = "identity"

[ranker]
kind = "popularity"
"#;

fn load(base: &Path, overlays: &[PathBuf], sets: &[&str]) -> anyhow::Result<LoadedConfig> {
    LoadedConfig::load(&ConfigSources {
        base: base.to_path_buf(),
        overlays: overlays.to_vec(),
        sets: sets.iter().map(|s| s.to_string()).collect(),
    })
}

#[test]
fn unknown_component_lists_the_available_ones() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ml100k_config(d.path(), "unknown", "[ranker]\nkind = \"sasrek\"\n");
    let err = format!("{:#}", validate(&load(&cfg, &[], &[]).unwrap()).err().unwrap());
    assert!(err.contains("config key `ranker.kind`"), "{err}");
    assert!(err.contains("unknown ranker `sasrek`; available rankers: bpr, llm, ort, popularity, sasrec"), "{err}");
    assert!(err.contains("unknown.toml"), "{err}");
}

#[test]
fn bad_config_names_key_and_file_and_reports_every_error() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ml100k_config(d.path(), "bad", FULL);
    let overlay = d.path().join("market.toml");
    std::fs::write(&overlay, "[ranker]\nhalf_life_dayz = 3\n\n[[fusers]]\nkind = \"template\"\nmax_per_kind = \"many\"\n").unwrap();
    let err = format!("{:#}", validate(&load(&cfg, &[overlay], &[]).unwrap()).err().unwrap());
    // The plugin rejects its own unknown key; the host names the full key and the overlay file.
    assert!(err.contains("config key `ranker.half_life_dayz` (from") && err.contains("market.toml"), "{err}");
    assert!(err.contains("unknown field `half_life_dayz`"), "{err}");
    assert!(err.contains("config key `fusers[0].max_per_kind`"), "{err}");
    assert!(err.contains("2 configuration error(s)"), "{err}");

    // A host-level key, through the CLI, from --set.
    let (r, _) = cli(&["validate", cfg.to_str().unwrap(), "--set", "eval.ks=[0]"]);
    let err = r.err().unwrap();
    assert!(err.contains("config key `eval.ks` (from --set)"), "{err}");

    // A file that does not parse names itself.
    let broken = d.path().join("broken.toml");
    std::fs::write(&broken, "[run\nname = 1").unwrap();
    let err = format!("{:#}", load(&broken, &[], &[]).err().unwrap());
    assert!(err.contains("broken.toml"), "{err}");
}

#[test]
fn overlay_swaps_a_component() {
    let lib = recency_plugin();
    let d = tempfile::tempdir().unwrap();
    let cfg = ml100k_config(d.path(), "market", "[ranker]\nkind = \"popularity\"\n");
    let overlay = d.path().join("de.toml");
    std::fs::write(
        &overlay,
        format!("[plugins]\npaths = [\"{}\"]\n\n[ranker]\nkind = \"recency\"\nhalf_life_days = 14\n", lib.display()),
    )
    .unwrap();
    let base = run(&load(&cfg, &[], &[]).unwrap(), &RunOptions::default()).unwrap();
    let swapped = run(
        &load(&cfg, &[overlay], &["run.name=market-de"]).unwrap(),
        &RunOptions::default(),
    )
    .unwrap();
    let (b, s) = (&base.reports[0], &swapped.reports[0]);
    assert_eq!(b.model, "popularity");
    assert_eq!(s.model, "recency");
    assert_ne!(b.segments["all"].metrics, s.segments["all"].metrics, "a different ranker gives different figures");
    let resolved = std::fs::read_to_string(swapped.run_dir.join("config.resolved.toml")).unwrap();
    assert!(resolved.contains("recency") && resolved.contains("half_life_days = 14"), "{resolved}");
}

#[test]
fn unchanged_stages_are_skipped_and_a_changed_one_reruns() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ml100k_config(d.path(), "cache", FULL);
    let first = run(&load(&cfg, &[], &[]).unwrap(), &RunOptions::default()).unwrap();
    assert!(first.stages.iter().all(|(_, s)| *s == StageStart::Fresh), "{:?}", first.stages);

    let again = run(&load(&cfg, &[], &[]).unwrap(), &RunOptions::default()).unwrap();
    assert!(again.stages.iter().all(|(_, s)| *s == StageStart::Skip), "{:?}", again.stages);
    assert_eq!(first.reports, again.reports);

    // Only the ranker changes: upstream stages are reused.
    let changed = run(&load(&cfg, &[], &["ranker.half_life_days=20"]).unwrap(), &RunOptions::default()).unwrap();
    assert_eq!(changed.stage("fuse"), Some(StageStart::Skip));
    assert_eq!(changed.stage("instructions"), Some(StageStart::Skip));
    assert_eq!(changed.stage("tune"), Some(StageStart::Skip));
    assert_eq!(changed.stage("evaluate.popularity"), Some(StageStart::Fresh));

    // A fuser change invalidates everything downstream of it.
    let refused = run(&load(&cfg, &[], &["fusers[0].max_per_kind=2"]).unwrap(), &RunOptions::default()).unwrap();
    assert!(refused.stages.iter().all(|(_, s)| *s == StageStart::Fresh), "{:?}", refused.stages);

    // A new seed (negatives, sampling, training) reruns every stage: no old figures survive.
    let reseeded = run(&load(&cfg, &[], &["fusers[0].max_per_kind=2", "run.seed=7"]).unwrap(), &RunOptions::default()).unwrap();
    assert!(reseeded.stages.iter().all(|(_, s)| *s == StageStart::Fresh), "{:?}", reseeded.stages);
}

#[test]
fn an_interrupted_stage_resumes_from_its_journal() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ml100k_config(d.path(), "resume", FULL);
    let loaded = load(&cfg, &[], &[]).unwrap();
    let full = run(&loaded, &RunOptions::default()).unwrap();
    let knowledge = full.run_dir.join("knowledge.jsonl");
    let complete = std::fs::read_to_string(&knowledge).unwrap();
    let lines: Vec<&str> = complete.lines().collect();
    assert_eq!(lines.len(), 943);

    // Simulate `kill -9` half-way through fusing: the stage is not marked done, half the users
    // are written and the last line is torn.
    let state_path = full.run_dir.join("stages/fuse.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["done"] = serde_json::Value::Bool(false);
    std::fs::write(&state_path, state.to_string()).unwrap();
    let kept = lines[..400].join("\n") + "\n" + &lines[400][..20];
    std::fs::write(&knowledge, kept).unwrap();

    let resumed = run(&loaded, &RunOptions::default()).unwrap();
    assert_eq!(resumed.stage("fuse"), Some(StageStart::Resume));
    assert_eq!(std::fs::read_to_string(&knowledge).unwrap(), complete, "resumed knowledge equals a clean run's");
    assert_eq!(resumed.reports, full.reports);
}

#[test]
fn cli_run_and_validate() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ml100k_config(d.path(), "cli", FULL);
    let (code, out) = cli(&["validate", cfg.to_str().unwrap()]);
    assert_eq!(code, Ok(0), "{out}");
    assert!(out.contains("ranker") && out.contains("popularity-ranker"), "{out}");
    let (code, out) = cli(&["run", cfg.to_str().unwrap(), "--quiet"]);
    assert_eq!(code, Ok(0), "{out}");
    assert!(out.contains("## all (943 users)") && out.contains("| popularity | "), "{out}");
    let run_dir = d.path().join("runs/cli");
    for f in ["config.resolved.toml", "manifest.json", "knowledge.jsonl", "instructions.jsonl", "artifact.json", "report.json", "report.md", "report.png", "reports/popularity.json"] {
        assert!(run_dir.join(f).exists(), "{f} missing");
    }
    let (code, out) = cli(&["frobnicate"]);
    assert_eq!(code, Ok(2));
    assert!(out.contains("unrecognized subcommand"), "{out}");
}

/// Every dataset overlay applies to the quickstart as the per-market swap it is meant for: a
/// source of another kind replaces the quickstart's table (no `recbole-atomic` key survives
/// under a `table` source), one of the same kind merges. Likewise a ranker swapped by overlay.
#[test]
fn dataset_overlays_swap_the_quickstart_source() {
    let root = recfuse_e2e::root();
    let quickstart = root.join("configs/quickstart.toml");
    let mut checked = 0;
    for entry in std::fs::read_dir(root.join("configs/datasets")).unwrap() {
        let overlay = entry.unwrap().path();
        let text = std::fs::read_to_string(&overlay).unwrap();
        let own: toml::Table = toml::from_str(&text).unwrap();
        let own_source = own["source"].as_table().unwrap();
        let loaded = load(&quickstart, &[overlay.clone()], &[]).unwrap_or_else(|e| panic!("{}: {e:#}", overlay.display()));
        let source = &loaded.pipeline.source;
        assert_eq!(source.kind, own_source["kind"].as_str().unwrap(), "{}", overlay.display());
        let keys: Vec<&String> = source.settings.as_object().unwrap().keys().collect();
        if own_source["kind"].as_str() != Some("recbole-atomic") {
            assert!(keys.iter().all(|k| own_source.contains_key(k.as_str())), "{}: leftover keys {keys:?}", overlay.display());
        }
        checked += 1;
    }
    assert!(checked >= 4);
    // A market overlay that swaps the ranker's kind drops the old kind's keys.
    let d = tempfile::tempdir().unwrap();
    let market = d.path().join("bpr-market.toml");
    std::fs::write(&market, "[ranker]\nkind = \"bpr\"\ndim = 16\n").unwrap();
    let base = ml100k_config(d.path(), "base", "[ranker]\nkind = \"popularity\"\nhalf_life_days = 30\n");
    let loaded = load(&base, &[market], &[]).unwrap();
    assert_eq!(loaded.pipeline.rankers[0].kind, "bpr");
    assert_eq!(loaded.pipeline.rankers[0].settings, serde_json::json!({"dim": 16}));
    // The quickstart's market overlay lists its models in full (an overlay's array replaces
    // the base's): decayed popularity, reranked by the tuned LLM.
    let trending = load(&quickstart, &[root.join("configs/markets/trending.toml")], &[]).unwrap();
    let kinds: Vec<&str> = trending.pipeline.rankers.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["popularity", "llm"]);
    assert_eq!(trending.pipeline.rankers[0].settings, serde_json::json!({"half_life_days": 30}));
}

/// A host-level error (here `run.batch_size = 0`) does not hide a component's error (an
/// unknown ranker key): `validate` and `run` say both at once.
#[test]
fn host_and_component_errors_are_reported_together() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ml100k_config(d.path(), "both", "[ranker]\nkind = \"popularity\"\nbogus_key = 1\n");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("batch_size = 128", "batch_size = 0");
    std::fs::write(&cfg, text).unwrap();
    for command in ["validate", "run"] {
        let (result, _) = cli(&[command, cfg.to_str().unwrap()]);
        let err = result.expect_err("errors");
        assert!(err.contains("run.batch_size") && err.contains("bogus_key") && err.contains("2 configuration error(s)"), "{command}: {err}");
    }
}
