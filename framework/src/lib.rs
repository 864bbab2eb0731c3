//! # recfuse: the host runtime
//!
//! * [`registry`]: built-in (inventory) and dynamic (abi_stable) plugins, version-checked;
//! * [`handles`]: safe host-side handles on plugin components;
//! * [`host`]: the services plugins call back into (logging, progress, cancellation);
//! * [`config`]: layered pipeline config with errors naming key and file;
//! * [`split`], [`eval`]: leave-one-out split and full-ranking metrics;
//! * [`runstore`]: run directory, stage keys, crash-safe journals;
//! * [`pipeline`]: the stage runner; [`cli`]: the `recfuse` command;
//! * `serve`: `recfuse serve-llm`, an OpenAI-compatible server over the local LLM.

pub mod cli;
pub mod compat_1_0;
pub mod config;
pub mod eval;
pub mod handles;
#[cfg(feature = "serve")]
pub mod http;
pub mod knowledge;
pub mod host;
pub mod pipeline;
pub mod plot;
pub mod registry;
pub mod runstore;
#[cfg(feature = "serve")]
pub mod serve;
pub mod shard;
#[cfg(feature = "local-llm")]
pub mod serve_llm;
pub mod embed;
pub mod split;
pub mod stages;

// Link the built-in plugins so their `inventory` registrations are part of the binary.
#[cfg(feature = "builtin-plugins")]
mod builtins {
    use recfuse_plugin_atomic_source as _;
    use recfuse_plugin_bpr_ranker as _;
    use recfuse_plugin_chatgpt_fuser as _;
    use recfuse_plugin_instructions as _;
    use recfuse_plugin_identity_tuner as _;
    use recfuse_plugin_jsonl_source as _;
    use recfuse_plugin_popularity_ranker as _;
    use recfuse_plugin_table_source as _;
    use recfuse_plugin_template_fuser as _;
}
#[cfg(feature = "sasrec")]
use recfuse_plugin_sasrec_ranker as _;
#[cfg(feature = "local-llm")]
use recfuse_plugin_local_llm_fuser as _;
#[cfg(feature = "lora")]
use recfuse_plugin_lora_tuner as _;
#[cfg(feature = "lora")]
use recfuse_plugin_llm_ranker as _;
#[cfg(feature = "onnx")]
use recfuse_plugin_ort_ranker as _;
