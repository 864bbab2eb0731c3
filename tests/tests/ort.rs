//! `[embed]` and the `ort` ranker in a pipeline on MovieLens-100K, through real ONNX Runtime
//! (library and MiniLM fetched by scripts/fetch-data.sh): every user's knowledge and every movie
//! get a unit MiniLM vector; the feature MLP is trained, exported, checked and evaluated; a
//! rerun with another fuser setting encodes only new texts; `recfuse serve`'s recommender answers
//! 1000 candidates with it; bad `[embed]` settings name their key.

use recfuse::knowledge::KnowledgeBase;
use recfuse_e2e::*;
use std::path::{Path, PathBuf};

fn library() -> PathBuf {
    root().join(".cache/data/onnxruntime/libonnxruntime.so.1.31.1")
}

fn embed_section() -> String {
    format!("[embed]\ndir = \"{}\"\nruntime_library = \"{}\"\nmax_tokens = 128\n", root().join(".cache/data/minilm").display(), library().display())
}

fn config(dir: &Path, max_per_kind: usize) -> PathBuf {
    let extra = format!(
        "[[fusers]]\nkind = \"template\"\nmax_per_kind = {max_per_kind}\n\n{}\n\
         [[rankers]]\nkind = \"popularity\"\n\n[[rankers]]\nkind = \"ort\"\nsessions = 2\nruntime_library = \"{lib}\"\n\
         [rankers.train]\nepochs = 3\nid_dim = 8\nhidden = 16\n\n[eval]\nmax_users = 200\n",
        embed_section(),
        lib = library().display()
    );
    ml100k_config(dir, "ort", &extra)
}

/// Vectors in the run's embedding cache.
fn cached(run: &Path) -> usize {
    let dir = std::fs::read_dir(run.join("embeddings")).unwrap().next().unwrap().unwrap().path();
    recfuse::knowledge::read_vectors(&dir).unwrap().len()
}

#[test]
fn embeddings_and_the_ort_ranker_in_a_pipeline_and_served() {
    let d = tempfile::tempdir().unwrap();
    let cfg = config(d.path(), 5);
    let (code, out) = cli(&["run", cfg.to_str().unwrap(), "--set", "run.sample_users=150", "--quiet"]);
    assert_eq!(code, Ok(0), "{out}");
    let run = d.path().join("runs/ort");

    // Knowledge vectors: every fused user and every movie (from its title and attributes).
    let kb = KnowledgeBase::load(&run).unwrap();
    assert_eq!(kb.users.len(), 150);
    assert_eq!(kb.items.len(), 1682, "every movie has an embedded text");
    for v in kb.users.iter().map(|k| &k.vectors).chain(kb.items.iter().map(|k| &k.vectors)) {
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].name, "minilm");
        assert_eq!(v[0].values.len(), 384);
        let norm: f32 = v[0].values.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "norm {norm}");
    }
    assert_ne!(kb.items[0].vectors[0].values, kb.items[1].vectors[0].values);

    // The ranker: evaluated, saved with its export check.
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("report.json")).unwrap()).unwrap();
    let text = report.to_string();
    assert!(text.contains("\"ort\""), "{text}");
    let saved = std::fs::read_dir(run.join("rankers")).unwrap().map(|e| e.unwrap().path()).find(|p| p.join("model.onnx").is_file()).expect("a saved ONNX model");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(saved.join("ort-ranker.json")).unwrap()).unwrap();
    assert!(meta["export_check"]["max_abs_diff"].as_f64().unwrap() <= 1e-5, "{meta}");

    // Served: 1000 candidates for a known user, best first, only candidates.
    let rec = recfuse::serve::Recommender::load(&run, Some("ort")).unwrap();
    let candidates: Vec<u32> = (0..1000).collect();
    let top = rec.recommend(Some(0), Some(&candidates), 20, false).unwrap();
    assert_eq!(top.len(), 20);
    assert!(top.windows(2).all(|w| w[0].1 >= w[1].1), "{top:?}");
    assert!(top.iter().all(|(i, _)| *i < 1000));

    // Another fuser setting reruns fusion: the users' texts change and are encoded; the movies'
    // texts do not and come from the cache.
    let before = cached(&run);
    // One per distinct text: at most one per user and movie (a few movies share a title).
    let distinct_users = kb.users.iter().map(|k| &k.text).collect::<std::collections::HashSet<_>>().len();
    assert!(before <= distinct_users + 1682 && before > distinct_users + 1600, "{before} cached");
    let cfg = config(d.path(), 3);
    let (code, out) = cli(&["run", cfg.to_str().unwrap(), "--set", "run.sample_users=150", "--quiet"]);
    assert_eq!(code, Ok(0), "{out}");
    let after = cached(&run);
    assert!(after > before && after <= before + 150, "{before} -> {after}: only new user texts encoded");
}

#[test]
fn bad_embed_settings_name_their_key() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ml100k_config(d.path(), "bad", "[[fusers]]\nkind = \"template\"\n\n[embed]\ndir = \"/nowhere\"\n\n[ranker]\nkind = \"popularity\"\n");
    let (code, out) = cli(&["validate", cfg.to_str().unwrap()]);
    let err = code.err().unwrap_or(out);
    assert!(err.contains("`embed`") && err.contains("/nowhere/model.onnx not found") && err.contains("fetch-data.sh minilm"), "{err}");
    let cfg = ml100k_config(d.path(), "typo", "[[fusers]]\nkind = \"template\"\n\n[embed]\nnmae = \"x\"\n\n[ranker]\nkind = \"popularity\"\n");
    let (code, out) = cli(&["validate", cfg.to_str().unwrap()]);
    let err = code.err().unwrap_or(out);
    assert!(err.contains("embed.nmae"), "{err}");
    let cfg = ml100k_config(d.path(), "nofuser", "[embed]\n\n[ranker]\nkind = \"popularity\"\n");
    let (code, out) = cli(&["validate", cfg.to_str().unwrap()]);
    let err = code.err().unwrap_or(out);
    assert!(err.contains("`embed`") && err.contains("needs `[[fusers]]`"), "{err}");
}
