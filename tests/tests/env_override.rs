//! `RECFUSE__SECTION__KEY` environment overrides (own test binary: it sets process env).

use recfuse::config::{ConfigSources, LoadedConfig};
use recfuse_e2e::*;

#[test]
fn environment_overrides_config_and_is_named_as_origin() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ml100k_config(d.path(), "env", "[ranker]\nkind = \"popularity\"\n");
    std::env::set_var("RECFUSE__RANKER__KIND", "recency");
    std::env::set_var("RECFUSE__RUN__SEED", "99");
    let loaded = LoadedConfig::load(&ConfigSources { base: cfg, ..Default::default() }).unwrap();
    std::env::remove_var("RECFUSE__RANKER__KIND");
    std::env::remove_var("RECFUSE__RUN__SEED");
    assert_eq!(loaded.pipeline.rankers[0].kind, "recency");
    assert_eq!(loaded.pipeline.run.seed, 99);
    assert!(loaded.origin_of("run.seed").contains("environment"), "{}", loaded.origin_of("run.seed"));
}
