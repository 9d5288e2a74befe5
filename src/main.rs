use clap::Parser;
use orgledger::cli::{run, Cli};

// glibc's allocator took a quarter of the process's CPU in a rebuild's profile (many small,
// short-lived strings and maps per event); mimalloc serves them from thread-local pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    orgledger::telemetry::init();
    run(Cli::parse()).await
}
