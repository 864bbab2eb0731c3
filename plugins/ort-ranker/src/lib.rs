//! ONNX Runtime in recfuse: the `ort` ranker, the MiniLM text encoder, and the ONNX export of the
//! feature model the ranker trains.

pub mod embed;
pub mod export;
pub mod mlp;
pub mod ranker;
pub mod runtime;

recfuse_sdk::export_plugin! {
    name: "ort-ranker",
    rankers: { "ort" => ranker::OrtRanker },
}
