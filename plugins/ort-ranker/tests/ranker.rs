//! The `ort` ranker through real ONNX Runtime: the feature MLP learns, its ONNX export matches
//! the training side, a saved model restores the same scores, a model of your own is fed through
//! `inputs`, and bad models are clear errors.

use recfuse_plugin_ort_ranker::ranker::{Config, OrtRanker};
use recfuse_sdk::prelude::*;
use std::path::{Path, PathBuf};

fn library() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(recfuse_plugin_ort_ranker::runtime::DEFAULT_LIBRARY)
}

/// 20 users and 20 items in two taste groups; every user and item has a 4-d "text" vector that
/// says its group (noisily), so features and IDs both carry the signal.
struct World {
    catalog: Catalog,
    events: Vec<Event>,
    offsets: Vec<u32>,
    users: Vec<Knowledge>,
    items: Vec<ItemKnowledge>,
}

fn world() -> World {
    let catalog = Catalog {
        items: (0..20).map(|i| Item { id: i.to_string(), ..Default::default() }).collect(),
        users: (0..20).map(|i| User { id: i.to_string(), ..Default::default() }).collect(),
        kinds: vec!["click".into()],
        ..Default::default()
    };
    let (mut events, mut offsets) = (Vec::new(), vec![0u32]);
    for u in 0..20u32 {
        let base = if u < 10 { 0 } else { 10 };
        for k in 0..5u32 {
            events.push(Event { user: u, item: base + (u + k) % 10, kind: 0, scenario: 0, subject: NONE, value: 1.0, timestamp: k as i64 });
        }
        offsets.push(events.len() as u32);
    }
    let vec4 = |group: bool, i: u32| {
        let noise = (i as f32 * 0.37).sin() * 0.1;
        let v = if group { vec![1.0, 0.0, noise, 0.5] } else { vec![0.0, 1.0, noise, 0.5] };
        vec![NamedVector { name: "text".into(), values: v }]
    };
    let users = (0..20).map(|u| Knowledge { user: u, text: String::new(), vectors: vec4(u < 10, u) }).collect();
    let items = (0..20).map(|i| ItemKnowledge { item: i, text: String::new(), vectors: vec4(i < 10, i) }).collect();
    World { catalog, events, offsets, users, items }
}

fn ranker(extra: serde_json::Value, dir: &Path) -> anyhow::Result<OrtRanker> {
    let mut cfg = serde_json::json!({
        "user_vector": "text", "item_vector": "text", "seed": 7, "sessions": 2, "batch_pairs": 64,
        "runtime_library": library(),
        "train": {"epochs": 30, "id_dim": 8, "hidden": 16, "batch_size": 32, "learning_rate": 0.01}
    });
    if extra.get("model").is_some() {
        // A model of one's own: the trained model's settings do not apply.
        for k in ["user_vector", "item_vector", "train"] {
            cfg.as_object_mut().unwrap().remove(k);
        }
    }
    cfg.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let cfg: Config = serde_json::from_value(cfg)?;
    OrtRanker::new(cfg, Host::standalone(dir, 0))
}

fn all_scores(r: &OrtRanker) -> Vec<f32> {
    let items: Vec<u32> = (0..20).collect();
    let users: Vec<u32> = (0..20).collect();
    let mut out = vec![0.0; 400];
    r.score(&ScoreBatch { users: &users, items: &items, shared: true }, &mut out).unwrap();
    out
}

#[test]
fn trains_exports_matches_and_restores() {
    let w = world();
    let view = TrainView { catalog: &w.catalog, events: &w.events, offsets: &w.offsets };
    let inputs = FitInputs { knowledge: &w.users, item_knowledge: &w.items, ..Default::default() };
    let dir = tempfile::tempdir().unwrap();
    let mut r = ranker(serde_json::json!({}), dir.path()).unwrap();
    r.fit(&view, &inputs).unwrap();
    let s = all_scores(&r);
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    assert!(mean(&s[0..10]) > mean(&s[10..20]) + 0.5, "user 0 prefers its group: {:?}", &s[..20]);
    assert!(mean(&s[15 * 20 + 10..16 * 20]) > mean(&s[15 * 20..15 * 20 + 10]) + 0.5, "user 15 prefers its group");

    // Saved and loaded: the same scores, and the export check recorded.
    r.save(dir.path()).unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("ort-ranker.json")).unwrap()).unwrap();
    let diff = meta["export_check"]["max_abs_diff"].as_f64().unwrap();
    assert!(diff <= 1e-5, "export check {diff}");
    let mut restored = ranker(serde_json::json!({}), dir.path()).unwrap();
    assert!(restored.load(&view, &inputs, dir.path()).unwrap());
    assert_eq!(all_scores(&restored), s);

    // The exported model as a model of one's own, fed through `inputs`: the same scores.
    let own = serde_json::json!({"model": dir.path().join("model.onnx"), "inputs": {
        "user_vector": "user_vector:text", "item_vector": "item_vector:text", "user_index": "user_index", "item_index": "item_index"}});
    let mut mine = ranker(own, dir.path()).unwrap();
    mine.fit(&view, &inputs).unwrap();
    assert_eq!(all_scores(&mine), s);
}

#[test]
fn missing_corrupt_and_mismatched_models_are_clear_errors() {
    let w = world();
    let view = TrainView { catalog: &w.catalog, events: &w.events, offsets: &w.offsets };
    let inputs = FitInputs { knowledge: &w.users, item_knowledge: &w.items, ..Default::default() };
    let dir = tempfile::tempdir().unwrap();
    let feeds = serde_json::json!({"user_vector": "user_vector:text", "item_vector": "item_vector:text", "user_index": "user_index", "item_index": "item_index"});
    let err = |extra: serde_json::Value| -> String {
        match ranker(extra, dir.path()) {
            Err(e) => format!("{e:#}"),
            Ok(mut r) => format!("{:#}", r.fit(&view, &inputs).expect_err("fit should fail")),
        }
    };
    // Missing.
    let e = err(serde_json::json!({"model": dir.path().join("none.onnx"), "inputs": feeds}));
    assert!(e.contains("none.onnx not found"), "{e}");
    // Corrupt.
    std::fs::write(dir.path().join("bad.onnx"), b"this is not protobuf at all").unwrap();
    let e = err(serde_json::json!({"model": dir.path().join("bad.onnx"), "inputs": feeds}));
    assert!(e.contains("bad.onnx") && e.contains("not a model ONNX Runtime can load"), "{e}");
    // A real model fed the wrong way: a vector into an index input, an input that does not exist,
    // an input left unfed, a vector of the wrong width.
    let mut trained = ranker(serde_json::json!({"train": {"epochs": 1, "id_dim": 4, "hidden": 4}}), dir.path()).unwrap();
    trained.fit(&view, &inputs).unwrap();
    trained.save(dir.path()).unwrap();
    let model = dir.path().join("model.onnx");
    let e = err(serde_json::json!({"model": model, "inputs": {"user_vector": "user_vector:text", "item_vector": "item_vector:text", "user_index": "item_vector:text", "item_index": "item_index"}}));
    assert!(e.contains("input `user_index` is Int64 [-1] in the model") && e.contains("Float32 [-1, 4] is expected"), "{e}");
    let e = err(serde_json::json!({"model": model, "inputs": {"user_vector": "user_vector:text", "item_vector": "item_vector:text", "user_id": "user_index", "item_index": "item_index"}}));
    assert!(e.contains("has no input `user_id`"), "{e}");
    let e = err(serde_json::json!({"model": model, "inputs": {"user_vector": "user_vector:text", "item_vector": "item_vector:text", "item_index": "item_index"}}));
    assert!(e.contains("also wants input(s) user_index"), "{e}");
    let mut wide = w.users.clone();
    for k in &mut wide {
        k.vectors.push(NamedVector { name: "wide".into(), values: vec![0.0; 6] });
    }
    let wide_inputs = FitInputs { knowledge: &wide, item_knowledge: &w.items, ..Default::default() };
    let cfg: Config = serde_json::from_value(serde_json::json!({"model": model, "runtime_library": library(), "inputs": {"user_vector": "user_vector:wide", "item_vector": "item_vector:text", "user_index": "user_index", "item_index": "item_index"}})).unwrap();
    let e = format!("{:#}", OrtRanker::new(cfg, Host::standalone(dir.path(), 0)).unwrap().fit(&view, &wide_inputs).unwrap_err());
    assert!(e.contains("input `user_vector` is Float32 [-1, 4]") && e.contains("[-1, 6] is expected"), "{e}");
    // A vector no knowledge has, and a feed that is not one.
    let e = err(serde_json::json!({"user_vector": "minilm"}));
    assert!(e.contains("no user knowledge has a vector `minilm`"), "{e}");
    let e = err(serde_json::json!({"model": model, "inputs": {"user_vector": "user_text"}}));
    assert!(e.contains("`inputs.user_vector` = \"user_text\""), "{e}");
    // Settings of the trained model next to a model of one's own.
    let e = err(serde_json::json!({"model": model, "inputs": feeds, "train": {"epochs": 2}}));
    assert!(e.contains("`train` configures the model the ranker trains"), "{e}");
    // CUDA asked for on a CPU-only runtime: an error, not a silent CPU run.
    let e = err(serde_json::json!({"provider": "cuda"}));
    assert!(e.contains("CUDA execution provider is not available"), "{e}");
}
