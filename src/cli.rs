//! The `orgledger` command line.

use clap::{Parser, Subcommand};

use crate::config::{redact_url, StoreConfig};
use crate::ledger::Ledger;
use crate::store::{Database, MasterKey};

#[derive(Debug, Parser)]
#[command(
    name = "orgledger",
    version,
    about = "Event-sourced organization management: every change is an immutable event.",
    long_about = "Event-sourced organization management: every change to an organization \
                  (creation, invitations, roles, ownership, deletion, settings) is an immutable \
                  event in an append-only store; read models are projected from those events."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Apply pending database migrations and exit.
    Migrate {
        #[command(flatten)]
        store: StoreConfig,
    },
    /// Apply pending migrations, open the event store and serve until SIGTERM or SIGINT.
    Serve {
        #[command(flatten)]
        store: StoreConfig,
        /// Listen address.
        #[arg(long, env = "ORGLEDGER_BIND", default_value = "127.0.0.1:8080")]
        bind: String,
    },
    /// Print a new random master key (base64 of 32 bytes) for ORGLEDGER_MASTER_KEY.
    MasterKey,
}

/// Connects and migrates: what every command that touches data starts with.
pub async fn open_store(store: &StoreConfig) -> anyhow::Result<Ledger> {
    let master_key = store.master_key()?;
    let database = Database::connect(&store.database_url)
        .await
        .map_err(|error| {
            anyhow::anyhow!("cannot open {}: {error}", redact_url(&store.database_url))
        })?;
    database.migrate().await?;
    Ok(Ledger::new(database, master_key))
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Commands::Migrate { store } => {
            let ledger = open_store(&store).await?;
            tracing::info!(database = %redact_url(&store.database_url), "migrations applied");
            ledger.database().close().await;
        }
        Commands::Serve { store, bind } => {
            let ledger = open_store(&store).await?;
            let repaired = ledger.finish_interrupted_purges().await?;
            tracing::info!(
                database = %redact_url(&store.database_url),
                %bind,
                repaired_purges = repaired,
                "event store open"
            );
            shutdown_signal().await;
            tracing::info!("shutting down");
            ledger.database().close().await;
        }
        Commands::MasterKey => println!("{}", MasterKey::generate().to_base64()),
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}
