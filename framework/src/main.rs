use tracing_subscriber::EnvFilter;

// Training allocates and frees many large tensors; glibc hands each back to the OS and pays
// page faults to get it again, mimalloc keeps it (SASRec trains ~1.7x faster).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (mimalloc.h, `mi_option_e`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() {
    // By default mimalloc hands freed pages back to the OS after 10 ms, and training frees
    // and reallocates tensors of tens of MB each op: LoRA training of SmolLM2 ran 1.6x slower
    // (page faults and zeroing) than with purging off (docs/benchmarks.md).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("RECFUSE_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let mut stdout = std::io::stdout();
    match recfuse::cli::run_cli(std::env::args(), &mut stdout) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
