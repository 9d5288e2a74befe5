use clap::Parser;
use orgledger::cli::{run, Cli};

// glibc's allocator took a quarter of the process's CPU in a rebuild's profile (many small,
// short-lived strings and maps per event); mimalloc serves them from thread-local pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    orgledger::telemetry::init();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line, its causes after colons: what an operator and a log collector read.
            // Never a backtrace (`RUST_BACKTRACE` set for other programs would print one).
            orgledger::stderr_line!("Error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
