use clap::Parser;
use orgledger::cli::{run, Cli};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    orgledger::telemetry::init();
    run(Cli::parse()).await
}
