//! The session pool under contention, on a tiny model written with the crate's own ONNX writer:
//! every caller is served, with the right answer, and never more sessions at once than the pool has.

use ort::value::{Tensor, TensorElementType};
use recfuse_plugin_ort_ranker::export::{Dim, Elem, Graph};
use recfuse_plugin_ort_ranker::runtime::{SessionOptions, SessionPool, TensorSpec};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

#[test]
fn a_pool_serves_every_caller_within_its_size() {
    let mut g = Graph::new("relu");
    g.input("x", Elem::F32, &[Dim::Named("batch"), Dim::Fixed(2)]).output("y", Elem::F32, &[Dim::Named("batch"), Dim::Fixed(2)]);
    g.node("Relu", &["x"], "y", &[]);
    let bytes = g.to_model_bytes(&[]).unwrap();
    let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(recfuse_plugin_ort_ranker::runtime::DEFAULT_LIBRARY);
    let opts = SessionOptions { sessions: 2, threads: 1, runtime_library: Some(lib), ..Default::default() };
    let spec = |name: &str| TensorSpec { name: name.into(), ty: TensorElementType::Float32, shape: vec![-1, 2] };
    let pool = SessionPool::from_bytes(&bytes, Path::new("relu.onnx"), &[spec("x")], &[spec("y")], &opts).unwrap();
    let (busy, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
    std::thread::scope(|s| {
        for t in 0..12 {
            let (pool, busy, most) = (&pool, &busy, &most);
            s.spawn(move || {
                for k in 0..25 {
                    let v = (t * 100 + k) as f32;
                    let y = pool
                        .with(|session| {
                            let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            let out = session.run(ort::inputs! {"x" => Tensor::from_array(([1usize, 2], vec![-v, v]))?})?;
                            let y = out["y"].try_extract_tensor::<f32>()?.1.to_vec();
                            busy.fetch_sub(1, Ordering::SeqCst);
                            Ok(y)
                        })
                        .unwrap();
                    assert_eq!(y, vec![0.0, v]);
                }
            });
        }
    });
    assert!(most.load(Ordering::SeqCst) <= 2, "more sessions in use than the pool has");
    // A failing call gives its session back.
    assert!(pool.with(|_| -> anyhow::Result<()> { anyhow::bail!("boom") }).is_err());
    pool.with(|_| Ok(())).unwrap();
    pool.with(|_| Ok(())).unwrap();
}
