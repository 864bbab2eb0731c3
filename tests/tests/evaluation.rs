//! A small end-to-end evaluation on MovieLens-100K: three baselines side by side under both
//! protocols, reports in JSON, Markdown and PNG.

use recfuse::config::{ConfigSources, LoadedConfig};
use recfuse::pipeline::{run, RunOptions};
use recfuse_e2e::*;

const RANKERS: &str = r#"
[[rankers]]
kind = "popularity"

[[rankers]]
kind = "bpr"
epochs = 8
dim = 32

[[rankers]]
kind = "sasrec"
dim = 32
max_len = 20
epochs = 3
learning_rate = 0.005
"#;

#[test]
fn baselines_on_ml100k_full_and_sampled() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ml100k_config(d.path(), "baselines", RANKERS);
    let full = run(&LoadedConfig::load(&ConfigSources { base: cfg.clone(), ..Default::default() }).unwrap(), &RunOptions::default())
        .unwrap();
    let hr = |o: &recfuse::pipeline::RunOutcome, m: &str, k: &str| o.report(m).unwrap().segments["all"].metrics[k];
    assert_eq!(full.reports.len(), 3);
    for m in ["popularity", "bpr", "sasrec"] {
        let r = full.report(m).unwrap();
        assert_eq!(r.segments["all"].users, 943);
        let auc = r.segments["all"].metrics["AUC"];
        assert!(auc > 0.6 && auc < 1.0, "{m}: AUC {auc}");
    }
    // Personalised models beat popularity on this data (popularity HR@10 ≈ 0.086).
    assert!(hr(&full, "bpr", "HR@10") > hr(&full, "popularity", "HR@10"), "bpr");
    assert!(hr(&full, "sasrec", "HR@10") > hr(&full, "popularity", "HR@10"), "sasrec");
    for f in ["report.json", "report.md", "report.png"] {
        assert!(full.run_dir.join(f).metadata().unwrap().len() > 100, "{f}");
    }
    let md = std::fs::read_to_string(full.run_dir.join("report.md")).unwrap();
    assert!(md.contains("| sasrec |") && md.contains("NDCG@10"), "{md}");

    // Sampled protocol (100 popularity-sampled negatives): same models, easier task, the
    // upstream stages and fitted data unchanged.
    let sampled = run(
        &LoadedConfig::load(&ConfigSources {
            base: cfg,
            sets: vec!["eval.protocol=sampled".into(), "eval.sampling=popularity".into()],
            ..Default::default()
        })
        .unwrap(),
        &RunOptions::default(),
    )
    .unwrap();
    assert!(sampled.report("popularity").unwrap().protocol.contains("100 popularity-sampled"));
    for m in ["popularity", "bpr"] {
        assert!(hr(&sampled, m, "HR@10") > hr(&full, m, "HR@10"), "{m}: sampled ranking is easier");
    }
}
