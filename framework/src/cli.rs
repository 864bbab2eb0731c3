//! The `recfuse` command line: thin glue over the library.

use crate::config::{ConfigSources, LoadedConfig};
use crate::pipeline::{self, Role, RunOptions};
use crate::shard::ShardSpec;
use crate::registry::Registry;
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(name = "recfuse", version, about = "LLM-powered recommendation from plugins, wired by config")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArgs {
    /// Pipeline config (TOML, YAML or JSON).
    pub config: PathBuf,
    /// Overlay files applied in order on top of the config (e.g. configs/markets/de.toml).
    #[arg(long = "overlay", value_name = "FILE")]
    pub overlays: Vec<PathBuf>,
    /// Override one key, e.g. `--set ranker.half_life_days=30`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl ConfigArgs {
    /// The config, or every error in it: host-level errors together with those of the
    /// components it names (docs/config.md).
    pub fn load(&self) -> Result<LoadedConfig> {
        let sources = ConfigSources { base: self.config.clone(), overlays: self.overlays.clone(), sets: self.sets.clone() };
        let (cfg, mut errors) = LoadedConfig::load_partial(&sources)?;
        if errors.is_empty() {
            return Ok(cfg);
        }
        errors.extend(pipeline::component_errors(&cfg));
        Err(crate::config::ConfigErrors(errors).into())
    }
}

/// Where a run goes and how it shows progress.
#[derive(Args, Debug, Clone)]
pub struct RunDirArgs {
    /// Run directory (default: run.dir/run.name from the config).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a pipeline; reruns skip unchanged stages and resume interrupted ones.
    Run {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        out: RunDirArgs,
        /// Run one shard of the per-user stages: `--shard INDEX/COUNT` (0-based), or `--shard`
        /// alone to read them from a Slurm array or Kubernetes Indexed Job (docs/scale-out.md).
        #[arg(long, value_name = "INDEX/COUNT", num_args = 0..=1, default_missing_value = "")]
        shard: Option<String>,
        /// Shard count for `--shard` under a Kubernetes Indexed Job (its `completions`;
        /// default: `run.shards` from the config).
        #[arg(long, value_name = "COUNT")]
        shards: Option<usize>,
    },
    /// The global stages of a sharded run: merge the shards' knowledge, build instructions,
    /// tune, fit every ranker (docs/scale-out.md).
    Prepare {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        out: RunDirArgs,
    },
    /// Combine the shards' outputs into the run directory: their knowledge, and once the run is
    /// prepared, their evaluation into the run's report (docs/scale-out.md).
    Merge {
        /// The run directory the shards and `prepare` wrote to.
        run_dir: PathBuf,
    },
    /// Check a config: every key, every component's own table, every plugin it names.
    Validate {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Serve the local LLM over the OpenAI Chat Completions protocol (loopback by default).
    #[cfg(feature = "local-llm")]
    ServeLlm {
        /// GGUF model file.
        #[arg(long, default_value = recfuse_plugin_local_llm_fuser::DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
        /// Most requests generated together: the rows of the running batch, which waiting
        /// requests join between decoding steps.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// When idle, milliseconds to wait for more requests before starting a batch.
        #[arg(long, default_value_t = 5)]
        gather_ms: u64,
        /// Matmul kernel: `auto` (our int8 kernel on CPUs with AVX512-VNNI or AVX2, else
        /// candle's), `int8`, `int8-avx2` or `candle`.
        #[arg(long, default_value = "auto")]
        kernel: String,
        /// With candle's kernel: quantized weights only (less memory, slower prefill and batches).
        #[arg(long)]
        no_dense: bool,
        /// Require `Authorization: Bearer <key>`, the key read from this environment variable.
        #[arg(long, value_name = "VAR")]
        api_key_env: Option<String>,
        /// Most requests waiting or generating; more get 503 with Retry-After.
        #[arg(long, default_value_t = 64)]
        max_queue: usize,
        /// KV-cache memory the requests may reserve together (prompt + max_tokens each), in MiB;
        /// beyond it, 503 with Retry-After.
        #[arg(long, default_value_t = 2048)]
        kv_budget_mb: u64,
        /// Keys and values of recent prompts kept, in MiB, so that a prompt beginning like an
        /// earlier one (a shared system prompt) computes only the rest; 0 turns it off.
        #[arg(long, default_value_t = 256)]
        prefix_cache_mb: usize,
    },
    /// Serve a finished run's ranker over HTTP: POST /v1/recommend, GET /health, GET /metrics
    /// (loopback by default; docs/serving.md).
    #[cfg(feature = "serve")]
    Serve {
        /// The run directory (`runs/<name>`).
        run_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8000")]
        addr: std::net::SocketAddr,
        /// Label of the ranker to serve (default: the config's first).
        #[arg(long)]
        ranker: Option<String>,
        /// Require `Authorization: Bearer <key>`, the key read from this environment variable.
        #[arg(long, value_name = "VAR")]
        api_key_env: Option<String>,
        /// Most items one request may ask for.
        #[arg(long, default_value_t = 1000)]
        max_k: usize,
        /// Most candidates one request may send.
        #[arg(long, default_value_t = 10_000)]
        max_candidates: usize,
        /// Largest request body, in bytes.
        #[arg(long, default_value_t = 256 * 1024)]
        max_body_bytes: usize,
    },
    /// List available components: built-in and from plugin libraries.
    Plugins {
        /// Plugin directories or library files to load as well.
        #[arg(long = "path", value_name = "DIR_OR_FILE")]
        paths: Vec<PathBuf>,
    },
}

/// Runs the CLI with `args` (including the program name); returns the exit code.
/// Exit status of `recfuse run` when it finished but a model failed (its report says which
/// and why). Other failures (bad config, a stage that could not complete) exit with 1.
pub const EXIT_MODEL_FAILED: i32 = 2;

pub fn run_cli(args: impl IntoIterator<Item = String>, out: &mut dyn Write) -> Result<i32> {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            write!(out, "{e}")?;
            return Ok(code);
        }
    };
    match cli.command {
        Command::Run { config, out: RunDirArgs { run_dir, quiet }, shard, shards } => {
            let cfg = config.load()?;
            let role = match shard {
                None => Role::Whole,
                Some(s) if s.is_empty() => {
                    Role::Shard(ShardSpec::from_env(|k| std::env::var(k).ok(), shards.or(cfg.pipeline.run.shards))?)
                }
                Some(s) => Role::Shard(s.parse::<ShardSpec>().context("--shard")?),
            };
            if let Role::Shard(s) = role {
                // Components that spend a budget shared by the whole run (an API's rate
                // limits) read their share from here (docs/plugin-guide.md). Set before any
                // thread starts.
                std::env::set_var(recfuse_sdk::SHARD_ENV, s.to_string());
            }
            execute(&cfg, RunOptions { run_dir, show_progress: !quiet, role, ..Default::default() }, out)
        }
        Command::Prepare { config, out: RunDirArgs { run_dir, quiet } } => {
            let cfg = config.load()?;
            execute(&cfg, RunOptions { run_dir, show_progress: !quiet, role: Role::Prepare, ..Default::default() }, out)
        }
        Command::Merge { run_dir } => {
            let merged = crate::shard::merge(&run_dir)?;
            if merged.knowledge_shards > 0 {
                writeln!(out, "merged the knowledge of {} shards", merged.knowledge_shards)?;
            }
            if !merged.prepared {
                writeln!(out, "the run is not prepared yet: no report to merge (next: `recfuse prepare CONFIG`)")?;
            } else if merged.reports.is_empty() {
                writeln!(out, "the run has no rankers: no report to merge")?;
            } else {
                writeln!(out, "merged the evaluation of {} shards\n\n{}", merged.shards, crate::eval::markdown(&merged.reports))?;
            }
            writeln!(out, "run directory: {}", run_dir.display())?;
            let failed = merged.failed();
            if !failed.is_empty() {
                eprintln!("error: {} model(s) failed: {} (see report.md)", failed.len(), failed.join(", "));
                return Ok(EXIT_MODEL_FAILED);
            }
            Ok(0)
        }
        Command::Validate { config } => {
            let cfg = config.load()?;
            let comps = pipeline::validate(&cfg)?;
            writeln!(out, "{}: ok", config.config.display())?;
            for c in comps {
                writeln!(out, "  {:<13} {:<16} {} {} ({})", c.kind, c.name, c.plugin, c.version, c.origin)?;
            }
            Ok(0)
        }
        #[cfg(feature = "local-llm")]
        #[cfg(feature = "serve")]
        Command::Serve { run_dir, addr, ranker, api_key_env, max_k, max_candidates, max_body_bytes } => {
            let api_key = crate::http::ApiKey::from_env(api_key_env.as_deref())?;
            let limits = crate::serve::Limits { max_body_bytes, max_k, max_candidates };
            let server = crate::serve::spawn(crate::serve::ServeOptions { run_dir, addr, ranker, api_key: api_key.clone(), limits })?;
            let auth = if api_key.required() { " (bearer key required)" } else { "" };
            writeln!(out, "serving `{}` on http://{}{auth}: POST /v1/recommend, GET /health, GET /metrics; Ctrl-C stops", server.model, server.addr)?;
            out.flush()?;
            server.wait()?;
            Ok(0)
        }
        Command::ServeLlm { model, addr, batch, gather_ms, kernel, no_dense, api_key_env, max_queue, kv_budget_mb, prefix_cache_mb } => {
            let opts = crate::serve_llm::ServeOptions {
                model,
                addr,
                batch,
                gather: std::time::Duration::from_millis(gather_ms),
                kernel: recfuse_llm_engine::Kernel::named(&kernel, !no_dense).context("--kernel")?,
                api_key: crate::http::ApiKey::from_env(api_key_env.as_deref())?,
                max_queue,
                kv_budget_bytes: kv_budget_mb << 20,
                prefix_cache_bytes: prefix_cache_mb << 20,
            };
            let kernel = opts.kernel.name();
            let server = crate::serve_llm::spawn(opts)?;
            writeln!(out, "serving {} on http://{}/v1 (OpenAI Chat Completions, {kernel} kernel); Ctrl-C stops", server.model_id, server.addr)?;
            out.flush()?;
            server.wait()?;
            Ok(0)
        }
        Command::Plugins { paths } => {
            let mut reg = Registry::with_builtins()?;
            let mut problems = Vec::new();
            for p in &paths {
                if p.is_dir() {
                    problems.extend(reg.load_dir(p)?);
                } else if let Err(e) = reg.load_library(p) {
                    problems.push(e);
                }
            }
            problems.extend(reg.load_env_path()?);
            writeln!(out, "{:<13} {:<16} {:<20} {:<8} {:<4} origin", "kind", "name", "plugin", "version", "abi")?;
            for plugin in reg.plugins() {
                for c in &plugin.components {
                    writeln!(
                        out,
                        "{:<13} {:<16} {:<20} {:<8} {:<4} {}",
                        c.kind.as_str(),
                        c.name,
                        plugin.name,
                        plugin.version,
                        plugin.abi.to_string(),
                        plugin.origin
                    )?;
                    if !c.description.is_empty() {
                        writeln!(out, "{:<13} {}", "", c.description)?;
                    }
                }
            }
            // Errors go to stderr, so the listing on stdout stays parseable.
            for e in &problems {
                eprintln!("error: {e:#}");
            }
            Ok(if problems.is_empty() { 0 } else { 1 })
        }
    }
}

/// Runs (a part of) a pipeline and prints what it did; the exit status says whether a model
/// failed.
fn execute(cfg: &LoadedConfig, opts: RunOptions, out: &mut dyn Write) -> Result<i32> {
    install_ctrlc(opts.cancel.clone());
    let outcome = pipeline::run(cfg, &opts)?;
    for (stage, how) in &outcome.stages {
        writeln!(out, "stage {stage:<24} {}", format!("{how:?}").to_lowercase())?;
    }
    if !outcome.reports.is_empty() {
        writeln!(out, "\n{}", crate::eval::markdown(&outcome.reports))?;
    }
    writeln!(out, "run directory: {}", outcome.run_dir.display())?;
    if let Some(note) = &outcome.note {
        writeln!(out, "{note}")?;
    }
    let failed = outcome.failed();
    if !failed.is_empty() {
        // The run finished and reported the others; the status still says it lost results.
        eprintln!("error: {} model(s) failed: {} (see report.md)", failed.len(), failed.join(", "));
        return Ok(EXIT_MODEL_FAILED);
    }
    Ok(0)
}

fn install_ctrlc(cancel: Arc<AtomicBool>) {
    // First Ctrl-C: stop at the next batch boundary (the run can be resumed). Second: exit now.
    let _ = ctrlc::set_handler(move || {
        if cancel.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after the current batch; press Ctrl-C again to exit immediately");
    });
}
