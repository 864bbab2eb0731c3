//! The MiniLM encoder through real ONNX Runtime (fetched by scripts/fetch-data.sh).

use recfuse_plugin_ort_ranker::embed::{TextEncoder, DIM};
use recfuse_plugin_ort_ranker::runtime::SessionOptions;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn options(sessions: usize) -> SessionOptions {
    SessionOptions { sessions, runtime_library: Some(root().join(recfuse_plugin_ort_ranker::runtime::DEFAULT_LIBRARY)), ..Default::default() }
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn embeddings_are_unit_vectors_that_put_similar_texts_close_and_ignore_padding() {
    let enc = TextEncoder::load(&root().join(".cache/data/minilm"), 128, &options(2)).unwrap();
    let texts = [
        "A thrilling space adventure with aliens and starships.",
        "Science fiction film about extraterrestrials travelling between planets.",
        "How to bake a moist chocolate cake with butter and sugar.",
    ];
    let v = enc.embed(&texts).unwrap();
    assert_eq!(v.len(), 3);
    for e in &v {
        assert_eq!(e.len(), DIM);
        assert!((cos(e, e) - 1.0).abs() < 1e-4);
    }
    let (near, far) = (cos(&v[0], &v[1]), cos(&v[0], &v[2]));
    assert!(near > far + 0.2, "space/sci-fi {near} should be well above space/cake {far}");
    // A short text alone and padded in a batch with a long one: the same vector (the mask works).
    let alone = enc.embed(&["Toy Story (1995)"]).unwrap();
    let long = "An animated story of toys that come alive when people leave the room, ".repeat(6);
    let padded = enc.embed(&[long.as_str(), "Toy Story (1995)"]).unwrap();
    let diff = alone[0].iter().zip(&padded[1]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-4, "padding changed the embedding by {diff}");
    // More texts than one batch, over two sessions: order kept.
    let many: Vec<String> = (0..70).map(|i| format!("movie number {i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let all = enc.embed(&refs).unwrap();
    let one = enc.embed(&[refs[41]]).unwrap();
    assert!(all[41].iter().zip(&one[0]).all(|(a, b)| (a - b).abs() < 1e-4));
}

#[test]
fn a_missing_model_or_runtime_is_a_clear_error() {
    let err = TextEncoder::load(&root().join("no/such/dir"), 128, &options(1)).err().unwrap().to_string();
    assert!(err.contains("model.onnx not found") && err.contains("fetch-data.sh minilm"), "{err}");
}
