//! The `orgledger` command line.

use clap::{Parser, Subcommand};

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::config::{
    platform_tokens, platform_tokens_kept_in, redact_url, GeneratedKey, PlatformTokenSource,
    StoreConfig,
};
use crate::http::{AppState, PlatformTokens};
use crate::service::Orgledger;
use crate::store::{Database, MasterKey};
use orgledger_projections::{RebuildReport, PROJECTION_NAMES};

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
        /// Then give the events a version before MACs stored (listed when MACs were added)
        /// their MAC, as each event stands: once, after upgrading, with no such version still
        /// running. It vouches for those rows: run it only on a store you trust.
        #[arg(long)]
        authenticate_legacy_events: bool,
    },
    /// Apply pending migrations, open the event store and serve until SIGTERM or SIGINT.
    Serve {
        #[command(flatten)]
        store: StoreConfig,
        /// Listen address.
        #[arg(
            long = "orgledger-bind",
            visible_alias = "bind",
            env = "ORGLEDGER_BIND",
            hide_env_values = true,
            default_value = "127.0.0.1:8080"
        )]
        bind: String,
        /// Platform token(s), comma-separated. When unset, one is generated, printed once and
        /// kept beside the data.
        #[arg(
            long = "orgledger-api-token",
            visible_alias = "api-token",
            env = "ORGLEDGER_API_TOKEN",
            hide_env_values = true
        )]
        api_token: Option<orgledger_domain::Secret>,
        /// How long a command waits for the read models to show it before answering with
        /// `X-Consistency: pending`, in milliseconds. 0 answers as soon as its events are
        /// stored (always `pending`): no read-your-writes, for callers that do not need it.
        #[arg(
            long = "orgledger-consistency-wait-ms",
            env = "ORGLEDGER_CONSISTENCY_WAIT_MS",
            hide_env_values = true,
            default_value_t = crate::service::DEFAULT_CONSISTENCY_WAIT.as_millis() as u64,
            value_parser = clap::value_parser!(u64).range(0..=60_000),
            value_name = "MS"
        )]
        consistency_wait_ms: u64,
        /// How long a stop (SIGTERM, SIGINT) waits for the requests in flight, in milliseconds,
        /// before the process stops without those still open: a client that never finishes
        /// sending its request must not hold it up. Events already committed are kept.
        #[arg(
            long = "orgledger-shutdown-grace-ms",
            env = "ORGLEDGER_SHUTDOWN_GRACE_MS",
            hide_env_values = true,
            default_value_t = 30_000,
            value_parser = clap::value_parser!(u64).range(0..=600_000),
            value_name = "MS"
        )]
        shutdown_grace_ms: u64,
    },
    /// Check the stored history: every organization's events read back and replayed
    /// (sequences without gaps, personal data that opens under its key, upcasts that
    /// apply), each event's MAC and recording time, each snapshot against the replay, each
    /// log's end against what the read models applied, each organization's members (roles
    /// and profiles), pending invitations, groups and audit entries (column by column) in
    /// the read models against its history, and the read models' recorded failures. Exits 1
    /// when anything does not hold, 2 when it could not check. Writes nothing.
    Verify {
        #[command(flatten)]
        store: StoreConfig,
        /// Only this organization.
        #[arg(long, value_name = "ID")]
        organization: Option<uuid::Uuid>,
        /// Print the report as one JSON object (counts and findings) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Write an organization's JSON data export (the document `GET
    /// /v1/organizations/{id}/export` serves) to a file readable by its owner only, or to
    /// standard output with `-`. Reads only; a progress line on a terminal.
    Export {
        #[command(flatten)]
        store: StoreConfig,
        #[arg(long, value_name = "ID")]
        organization: uuid::Uuid,
        /// The file to write (replaced whole, only once the export is complete), or `-`.
        #[arg(long, short, value_name = "FILE")]
        output: std::path::PathBuf,
    },
    /// Print a new random master key (base64 of 32 bytes) for ORGLEDGER_MASTER_KEY.
    MasterKey,
    /// Inspect or rebuild the read models.
    Projections {
        #[command(flatten)]
        store: StoreConfig,
        #[command(subcommand)]
        action: ProjectionsAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsAction {
    /// Print each projection's position, backlog, lag and last error.
    Status,
    /// Replay the whole log into fresh tables and swap them in atomically (reads keep being
    /// served meanwhile). Without NAME, rebuilds every projection.
    Rebuild {
        /// organizations, members, invitations, audit_log, groups or service_accounts.
        name: Option<String>,
    },
}

/// Connects and migrates: what every command that touches data starts with. Only `serve`
/// and `migrate` may create or migrate the store (`create`); the others open an existing one
/// and refuse it when its migrations are behind this binary. Read models named in
/// `to_rebuild` are left for the caller to rebuild (see [`Orgledger::open_to_rebuild`]).
pub async fn open_store(
    store: &StoreConfig,
    create: bool,
    to_rebuild: &[&str],
) -> anyhow::Result<Orgledger> {
    store.refuse_unopenable()?;
    // The store first: a missing one must not get a master key file generated beside it.
    let database = if create {
        Database::connect(&store.database_url).await
    } else {
        Database::connect_existing(&store.database_url).await
    };
    let url = redact_url(&store.database_url);
    let database = database.map_err(|error| anyhow::anyhow!("cannot open {url}: {error}"))?;
    if create {
        database
            .migrate()
            .await
            .with_context(|| format!("cannot migrate {url}"))?;
    } else {
        refuse_unmigrated(&database).await?;
    }
    loop {
        let (master_key, generated) = store.master_key()?;
        let service =
            match Orgledger::open_to_rebuild(database.clone(), master_key, to_rebuild).await {
                Ok(service) => service,
                // Another process on this new store kept its key, and wrote under it, after
                // this one generated its own: open again under the kept one.
                Err(_) if generated.as_ref().is_some_and(GeneratedKey::kept_elsewhere) => continue,
                Err(error) => {
                    return Err(anyhow::Error::from(error))
                        .with_context(|| format!("cannot open the store {url}"))
                }
            };
        match generated.map(GeneratedKey::keep).transpose()? {
            None | Some(true) => return Ok(service),
            // Another process on this new store kept its key first. Nothing was written under
            // this one (the service has not run), so open again under the kept key.
            Some(false) => tracing::info!("another process kept its master key first; using it"),
        }
    }
}

/// Opens an existing store to read only: nothing migrated, no key generated, no read-model
/// table prepared. A store whose migrations are behind this binary is refused.
async fn open_store_to_read(store: &StoreConfig) -> anyhow::Result<Orgledger> {
    store.refuse_unopenable()?;
    let database = Database::connect_read_only(&store.database_url)
        .await
        .map_err(|error| {
            anyhow::anyhow!("cannot open {}: {error}", redact_url(&store.database_url))
        })?;
    refuse_unmigrated(&database).await?;
    let url = redact_url(&store.database_url);
    let master_key = store
        .existing_master_key()
        .with_context(|| format!("cannot open the store {url}"))?;
    Orgledger::open_to_read(database, master_key)
        .await
        .with_context(|| format!("cannot open the store {url}"))
}

/// For the commands that only `serve` and `migrate` set a store up for: refuses another
/// application's SQLite file, and a store whose migrations are behind this binary.
async fn refuse_unmigrated(database: &Database) -> anyhow::Result<()> {
    database.refuse_another_applications_file().await?;
    if !database.is_migrated().await? {
        bail!("the store's schema is behind this binary: run `orgledger migrate` first");
    }
    Ok(())
}

/// What `serve` does, once its store is open, before it can answer: reads the platform
/// tokens, finishes purges a crash interrupted. On failure the store is closed.
async fn ready_to_serve(
    service: Orgledger,
    store: &StoreConfig,
    api_token: Option<&orgledger_domain::Secret>,
    consistency_wait_ms: u64,
) -> anyhow::Result<(Arc<Orgledger>, AppState)> {
    let service = Arc::new(service);
    service.set_consistency_wait(Duration::from_millis(consistency_wait_ms));
    let ready = tokens_and_repairs(&service, store, api_token).await;
    match ready {
        Ok(tokens) => {
            let state = AppState::new(service.clone(), tokens);
            Ok((service, state))
        }
        Err(error) => {
            service.close().await;
            Err(error)
        }
    }
}

/// The platform tokens, once the purges a crash interrupted are finished.
async fn tokens_and_repairs(
    service: &Orgledger,
    store: &StoreConfig,
    api_token: Option<&orgledger_domain::Secret>,
) -> anyhow::Result<PlatformTokens> {
    let tokens = match platform_tokens(store, api_token.map(orgledger_domain::Secret::expose))? {
        PlatformTokenSource::Tokens(tokens) => {
            PlatformTokens::new(tokens.iter().map(String::as_str))
        }
        PlatformTokenSource::KeptInDatabase { legacy } => {
            platform_tokens_kept_in(service.database(), &legacy)
                .await?
                .into_iter()
                .fold(PlatformTokens::new([]), PlatformTokens::with_digest)
        }
    };
    let repaired = service.ledger.finish_interrupted_purges().await?;
    if repaired > 0 {
        tracing::info!(
            repaired_purges = repaired,
            "purges a crash interrupted finished"
        );
    }
    crate::http::idempotency::forget_purged(service.database()).await?;
    Ok(tokens)
}

/// How often the purge of organizations past their restore window runs.
const PURGE_EVERY: Duration = Duration::from_secs(60);

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Commands::Migrate {
            store,
            authenticate_legacy_events,
        } => {
            let service = open_store(&store, true, &[]).await?;
            tracing::info!(database = %redact_url(&store.database_url), "migrations applied");
            let marked = if authenticate_legacy_events {
                Some(authenticate_legacy(&service).await)
            } else {
                None
            };
            service.close().await;
            if let Some(marked) = marked.transpose()? {
                say(format_args!(
                    "events given their MAC: {}; left without one (not JSON, `verify` names \
                     them): {}",
                    marked.marked, marked.unreadable
                ))?;
            }
        }
        Commands::Serve {
            store,
            bind,
            api_token,
            consistency_wait_ms,
            shutdown_grace_ms,
        } => {
            // Signals are taken from here on: a stop is never the default action's death.
            let signalled = signals_from_now(Stop::Requested);
            // The address first: a start that cannot listen must fail before it creates a
            // store, a master key or a platform token it would print and then lose. It
            // listens from then on, answering `503 starting` (and `/healthz`) while the
            // store is opened and migrated, so that a probe does not take a long migration
            // for a dead process.
            let listener = tokio::net::TcpListener::bind(&bind)
                .await
                .with_context(|| format!("cannot listen on {bind}"))?;
            let address = listener.local_addr()?;
            tracing::info!(%address, "orgledger starting");
            let (requested, stop_requested) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                signalled.await;
                let _ = requested.send(true);
            });
            let on_stop = || {
                let mut stop_requested = stop_requested.clone();
                async move {
                    let _ = stop_requested.wait_for(|requested| *requested).await;
                }
            };
            let starting = crate::http::Starting::default();
            let grace = Duration::from_millis(shutdown_grace_ms);
            let server = tokio::spawn(crate::http::serve(
                listener,
                starting.router(),
                on_stop(),
                grace,
            ));
            // A stop while the store is opened gives the opening up: the migrations are
            // transactional, a statement already sent runs to its end on the server and
            // is rolled back, and a start-up rebuild's copies are left to the sweep. The
            // steps after it are short and not cut: one may print a new platform token.
            let opened = tokio::select! {
                opened = open_store(&store, true, &[]) => opened,
                () = on_stop() => {
                    tracing::info!("stopped before the store was open");
                    server.await??;
                    return Ok(());
                }
            };
            let started = match opened {
                Ok(service) => {
                    ready_to_serve(service, &store, api_token.as_ref(), consistency_wait_ms).await
                }
                Err(error) => Err(error),
            };
            let (service, state) = match started {
                Ok(started) => started,
                // A database stopped along with the service (a node drained) fails the
                // start of a stop already asked for: still a clean stop.
                Err(error) if *stop_requested.borrow() => {
                    tracing::info!(error = format!("{error:#}"), "stopped while starting");
                    server.await??;
                    return Ok(());
                }
                Err(error) => {
                    server.abort();
                    return Err(error);
                }
            };
            if *stop_requested.borrow() {
                tracing::info!("stopped before it was ready");
                let served = server.await;
                service.close().await;
                served??;
                return Ok(());
            }
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let mut tasks = service.projector.spawn(stopped.clone());
            tasks.push(tokio::spawn(purge_periodically(service.clone(), stopped)));
            starting.ready(crate::http::app(state));
            tracing::info!(
                database = %redact_url(&store.database_url),
                %address,
                "orgledger ready"
            );
            let served = server.await;
            tracing::info!("stopping projections");
            let _ = stop.send(true);
            for task in tasks {
                let _ = task.await;
            }
            service.close().await;
            served??;
        }
        // Reads only, as `verify` and `export` do: it works on a read-only store, and leaves
        // the sweep of a dead rebuild's copies to `serve` and `rebuild`.
        Commands::Projections {
            store,
            action: ProjectionsAction::Status,
        } => {
            let service = open_store_to_read(&store).await?;
            let printed = print_status(&service).await;
            service.close().await;
            printed?;
        }
        Commands::Projections {
            store,
            action: ProjectionsAction::Rebuild { name },
        } => {
            let to_rebuild = match &name {
                Some(name) => vec![name.as_str()],
                None => PROJECTION_NAMES.to_vec(),
            };
            let service = open_store(&store, false, &to_rebuild).await?;
            let show_progress = std::io::stderr().is_terminal();
            // Ctrl-C, SIGTERM or a closed terminal drop the copies at once: they
            // hold personal data in clear. A second one ends the process there and
            // then (the copies left are dropped later, once untouched for 2 min).
            let first = signals_from_now(Stop::RequestedOrHungUp);
            let stop = async {
                first.await;
                let second = signals_from_now(Stop::RequestedOrHungUp);
                tokio::spawn(async move {
                    second.await;
                    stderr_line!("Error: stopped twice: the rebuild's copies may be left");
                    std::process::exit(1);
                });
            };
            let report = service
                .projector
                .rebuild_unless_stopped(&to_rebuild, show_progress, stop)
                .await;
            let report = match report {
                Ok(report) => report,
                Err(error) => {
                    service.close().await;
                    use orgledger_projections::ProjectionError::{Stopped, StoppedCopiesLeft};
                    // A stop says what became of the copies itself.
                    if matches!(error, Stopped | StoppedCopiesLeft) {
                        return Err(error.into());
                    }
                    return Err(anyhow::Error::from(error).context(
                        "the rebuild failed; the read models are as they were (a copy it could \
                         not drop goes with the next rebuild, or `serve`, once untouched for 2 \
                         minutes)",
                    ));
                }
            };
            let what = match name {
                Some(name) => format!("{name:<16}"),
                None => format!(
                    "all {} projections from one read of the log:",
                    PROJECTION_NAMES.len()
                ),
            };
            say(format_args!(
                "rebuilt {what} {:>9} events in {:>7.2} s  ({:.0} events/s; {})",
                report.events,
                report.seconds,
                report.events_per_second,
                phases(&report)
            ))?;
            service.close().await;
        }
        Commands::Verify {
            store,
            organization,
            json,
        } => {
            let checked = async {
                let service = open_store_to_read(&store).await?;
                let show_progress = std::io::stderr().is_terminal();
                let report = crate::verify::verify(&service, organization, show_progress).await;
                service.close().await;
                anyhow::Ok(report?)
            };
            // Exit 2 when the history could not be checked, 1 when it was and does not hold.
            match checked.await {
                Ok(report) => print_verification(&report, json)?,
                Err(error) => {
                    stderr_line!("Error: could not verify: {error:#}");
                    std::process::exit(2);
                }
            }
        }
        Commands::Export {
            store,
            organization,
            output,
        } => {
            let service = Arc::new(open_store_to_read(&store).await?);
            let written = export_to(service.clone(), organization, &output).await;
            service.close().await;
            let written = written?;
            stderr_line!("exported organization {organization}: {written} bytes");
        }
        Commands::MasterKey => say(format_args!("{}", MasterKey::generate().to_base64()))?,
    }
    Ok(())
}

/// Streams the organization's data export to `output` (`-`: standard output); the bytes
/// written. A file appears only complete: it is written to a new file beside it, made
/// exclusively (for its owner only, never through a link), then renamed over it.
async fn export_to(
    service: Arc<Orgledger>,
    organization: uuid::Uuid,
    output: &std::path::Path,
) -> anyhow::Result<u64> {
    use futures::StreamExt;
    use std::io::Write;

    let to_stdout = output.as_os_str() == "-";
    if !to_stdout {
        refuse_unless_a_regular_file(output)?;
    }
    // Only for the warning: an export without it is still an export.
    let behind = match service.projector.status().await {
        Ok(statuses) => statuses.iter().map(|status| status.backlog).max(),
        Err(error) => {
            stderr_line!("warning: the read models' positions could not be read: {error}");
            None
        }
    };
    let behind = behind.unwrap_or(0);
    let view =
        orgledger_projections::organizations::get(service.database(), &organization.to_string())
            .await?;
    let Some(view) = view else {
        if behind > 0 {
            bail!("no organization {organization} in the read models, which are {behind} events behind the log");
        }
        let history = service.ledger.current(organization).await;
        if history.is_ok_and(|state| state.id.is_some()) {
            bail!("organization {organization} was purged: its read models are dropped and its personal data erased (`orgledger verify --organization {organization}` still checks its history)");
        }
        bail!("no organization {organization}");
    };
    if behind > 0 {
        stderr_line!("warning: the read models are {behind} events behind the log; the export shows them as they stand");
    }
    let mut file = None;
    // Listened for before the file exists: a signal between its creation and the first look
    // for one would leave it behind.
    let mut interruption = None;
    let mut sink: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        interruption = Some(signals_from_now(Stop::RequestedOrHungUp));
        let directory = match output.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => std::path::Path::new("."),
        };
        #[cfg(unix)]
        remove_dead_exports(directory);
        let made = tempfile::Builder::new()
            .prefix(EXPORT_IN_PROGRESS)
            .tempfile_in(directory)
            .with_context(|| format!("creating a file in {}", directory.display()))?;
        // Held while it is written: an export killed outright (SIGKILL) releases it, and the
        // next export into the directory removes the file it left. (Unix only: Windows locks
        // are mandatory, and would refuse the writes through the second handle below.)
        #[cfg(unix)]
        made.as_file()
            .try_lock()
            .with_context(|| format!("locking {}", made.path().display()))?;
        let writer = made.reopen()?;
        file = Some(made);
        Box::new(std::io::BufWriter::new(writer))
    };
    let bar = spinner_on_terminal("{spinner} exporting: {bytes} written ({bytes_per_sec})");
    let mut stream = crate::exports::data_export(service, view);
    let mut written = 0_u64;
    // A reader that left early (`| head`) leaves the export incomplete: said as such.
    let closed = |error: std::io::Error, written: u64| -> anyhow::Error {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            anyhow::anyhow!(
                "the reader closed the output after {written} bytes: the export is incomplete"
            )
        } else {
            error.into()
        }
    };
    let copied = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            sink.write_all(&chunk)
                .map_err(|error| closed(error, written))?;
            written += chunk.len() as u64;
            bar.set_position(written);
        }
        sink.flush().map_err(|error| closed(error, written))?;
        Ok(())
    };
    // A signal must not leave half an export file behind: it holds personal data in clear.
    // (Written to standard output, what was sent is out; the signal ends the process as
    // usual.)
    let streamed: anyhow::Result<()> = if let Some(interruption) = interruption {
        tokio::select! {
            copied = copied => copied,
            () = interruption => Err(anyhow::anyhow!("interrupted by a signal; nothing was written")),
        }
    } else {
        copied.await
    };
    bar.finish_and_clear();
    drop(sink);
    // On an error the new file is dropped, and with it deleted.
    streamed?;
    if let Some(file) = file {
        file.as_file().sync_all()?;
        file.persist(output)
            .with_context(|| format!("writing {}", output.display()))?;
    }
    Ok(written)
}

/// How a data export's file begins while it is written, beside the file it will become.
const EXPORT_IN_PROGRESS: &str = ".orgledger-export-";

/// The export is renamed over `output` once complete, which would replace a FIFO, a device
/// or a symbolic link (not what it points to) with a file: only a regular file, or a path
/// where nothing is yet, is taken.
fn refuse_unless_a_regular_file(output: &std::path::Path) -> anyhow::Result<()> {
    let shown = output.display();
    let kind = match std::fs::symlink_metadata(output) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error).with_context(|| format!("looking at {shown}")),
        Ok(found) if found.is_file() => return Ok(()),
        Ok(found) if found.is_dir() => "a directory",
        Ok(found) if found.is_symlink() => "a symbolic link (name the file it points to)",
        Ok(_) => "not a regular file (a FIFO, a socket or a device; - writes to standard output)",
    };
    bail!("{shown} is {kind}: --output names the file to write")
}

/// Removes the files exports killed outright left in `directory`: personal data in clear.
/// Only a regular file untouched for [`DEAD_EXPORT_AFTER`] and not locked is removed: a live
/// export holds its lock from just after it makes its file, and writes to it as it goes. The
/// file is opened without following a link and without waiting (a FIFO put in its place in a
/// shared directory neither blocks nor is removed). Best effort: what cannot be looked at is
/// left.
#[cfg(unix)]
fn remove_dead_exports(directory: &std::path::Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        let is_export = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.starts_with(EXPORT_IN_PROGRESS));
        if !is_export {
            continue;
        }
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(entry.path())
        else {
            continue;
        };
        let dead = file.metadata().is_ok_and(|found| {
            found.is_file()
                && found
                    .modified()
                    .ok()
                    .and_then(|at| at.elapsed().ok())
                    .is_some_and(|untouched| untouched >= DEAD_EXPORT_AFTER)
        });
        if dead && file.try_lock().is_ok() {
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(file = %path.display(), "removed the file of an export that was killed")
                }
                Err(error) => {
                    tracing::warn!(file = %path.display(), %error, "could not remove the file of an export that was killed")
                }
            }
        }
    }
}

/// How long the file of an export must go untouched before another export may remove it.
#[cfg(unix)]
const DEAD_EXPORT_AFTER: Duration = Duration::from_secs(60);

/// A spinner drawn with `template` when standard error is a terminal; otherwise hidden.
fn spinner_on_terminal(template: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(indicatif::ProgressStyle::with_template(template).expect("a valid template"));
    bar
}

/// Gives the events stored before MACs theirs, with a running count on a terminal.
async fn authenticate_legacy(
    service: &Orgledger,
) -> Result<crate::store::MarkedEvents, crate::ledger::LedgerError> {
    let bar = spinner_on_terminal("{spinner} {pos} events given their MAC");
    let marked = service
        .ledger
        .authenticate_legacy(|marked| bar.set_position(marked))
        .await;
    bar.finish_and_clear();
    marked
}

/// Writes a line to standard output. A reader that left early (`| head`) ends nothing: the
/// rest is dropped and the command still ends with its own exit status.
fn say(line: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write as _;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => written,
    }
}

/// Prints `verify`'s report, as lines or as JSON; an error when it found anything.
fn print_verification(report: &crate::verify::VerifyReport, json: bool) -> anyhow::Result<()> {
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let problems = plural(report.findings.len(), "problem", "problems");
    if json {
        say(format_args!("{}", serde_json::to_string_pretty(&report)?))?;
        if !report.findings.is_empty() {
            bail!("verification found {problems}");
        }
        return Ok(());
    }
    for finding in &report.findings {
        let at = match (&finding.organization_id, finding.sequence) {
            (Some(organization), Some(sequence)) => {
                format!("organization {organization}, event {sequence}")
            }
            (Some(organization), None) => format!("organization {organization}"),
            (None, _) => "read models".to_owned(),
        };
        say(format_args!("FAIL {at}: {}", finding.problem))?;
    }
    let read_models = if report.read_models_checked {
        format!(
            "read models {} behind",
            plural(report.events_not_yet_projected as usize, "event", "events")
        )
    } else {
        "read models' lag not checked (one organization)".to_owned()
    };
    say(format_args!(
        "verified {}, {} ({} with a matching MAC), {} (and {} in an older shape or under \
         older state rules, not compared); {read_models}; {}",
        plural(report.organizations, "organization", "organizations"),
        plural(report.events as usize, "event", "events"),
        report.events_authenticated,
        plural(report.snapshots, "snapshot", "snapshots"),
        report.snapshots_not_compared,
        problems,
    ))?;
    if !report.findings.is_empty() {
        bail!("verification found {problems}");
    }
    Ok(())
}

/// Which signals a future from [`signals_from_now`] resolves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// SIGINT or SIGTERM: the service's stop.
    Requested,
    /// Those, or SIGHUP (a closed terminal): for CLI work that cleans up before it exits.
    RequestedOrHungUp,
}

/// Listens for the signals of `stop` from this call on, not from the first poll, and
/// resolves when one arrives. Once listened for, a signal no longer ends the process by
/// itself. Elsewhere than on Unix: Ctrl-C, listened for from the first poll.
fn signals_from_now(stop: Stop) -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let hangup = (stop == Stop::RequestedOrHungUp).then(SignalKind::hangup);
        let listening: Vec<_> = [SignalKind::interrupt(), SignalKind::terminate()]
            .into_iter()
            .chain(hangup)
            .filter_map(|kind| signal(kind).ok())
            .collect();
        async move {
            if listening.is_empty() {
                return std::future::pending().await;
            }
            let arrivals = listening.into_iter().map(|mut signal| {
                Box::pin(async move {
                    signal.recv().await;
                })
            });
            futures::future::select_all(arrivals).await;
        }
    }
    #[cfg(not(unix))]
    {
        let _ = stop;
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn phases(report: &RebuildReport) -> String {
    format!(
        "replay {:.2} s, indexes {:.2} s, statistics {:.2} s, swap {:.2} s",
        report.replay_seconds, report.index_seconds, report.analyze_seconds, report.swap_seconds
    )
}

async fn print_status(service: &Orgledger) -> anyhow::Result<()> {
    say(format_args!(
        "{:<16} {:>10} {:>12} {:>9} {:>9}  last error",
        "projection", "position", "applied", "backlog", "lag (s)"
    ))?;
    for status in service.projector.status().await? {
        say(format_args!(
            "{:<16} {:>10} {:>12} {:>9} {:>9.1}  {}",
            status.name,
            status.position,
            status.events_applied,
            status.backlog,
            status.lag_seconds,
            match (&status.failed_event, &status.last_error) {
                (Some(event), Some(error)) => format!("{event}: {error}"),
                (None, Some(error)) => error.clone(),
                _ => "-".to_owned(),
            }
        ))?;
    }
    Ok(())
}

async fn purge_periodically(
    service: Arc<Orgledger>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match service.purge_expired().await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "scheduled purge finished"),
            Err(error) => tracing::error!(%error, "scheduled purge failed; will retry"),
        }
        if let Err(error) = crate::http::idempotency::forget_expired(service.database()).await {
            tracing::warn!(%error, "could not forget expired idempotency keys");
        }
        tokio::select! {
            () = tokio::time::sleep(PURGE_EVERY) => {}
            _ = stopped.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_flags(args: &[&str]) -> (StoreConfig, String, Option<orgledger_domain::Secret>, u64) {
        let cli = Cli::try_parse_from(["orgledger", "serve"].iter().chain(args))
            .unwrap_or_else(|error| panic!("{args:?} should parse: {error}"));
        match cli.command {
            Commands::Serve {
                store,
                bind,
                api_token,
                consistency_wait_ms,
                ..
            } => (store, bind, api_token, consistency_wait_ms),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn every_variable_is_also_a_flag_of_the_same_name_in_kebab_case() {
        let (store, bind, token, _) = serve_flags(&[
            "--database-url",
            "sqlite://flags.db",
            "--orgledger-bind",
            "127.0.0.1:9191",
            "--orgledger-api-token",
            "t1,t2",
            "--orgledger-master-key",
            "a2V5",
        ]);
        assert_eq!(store.database_url, "sqlite://flags.db");
        assert_eq!(bind, "127.0.0.1:9191");
        assert_eq!(token.as_ref().map(|t| t.expose()), Some("t1,t2"));
        assert_eq!(store.master_key.as_deref(), Some("a2V5"));
    }

    #[test]
    fn the_store_flags_go_before_or_after_a_projections_subcommand() {
        let store = [
            "--database-url",
            "sqlite://flags.db",
            "--orgledger-master-key",
            "a2V5",
        ];
        for args in [
            [&["orgledger", "projections", "status"][..], &store].concat(),
            [&["orgledger", "projections"][..], &store, &["status"]].concat(),
        ] {
            let cli = Cli::try_parse_from(&args)
                .unwrap_or_else(|error| panic!("{args:?} should parse: {error}"));
            match cli.command {
                Commands::Projections { store, action } => {
                    assert_eq!(store.database_url, "sqlite://flags.db", "{args:?}");
                    assert_eq!(store.master_key.as_deref(), Some("a2V5"), "{args:?}");
                    assert!(matches!(action, ProjectionsAction::Status), "{args:?}");
                }
                other => panic!("parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn the_short_flag_names_still_work() {
        let (store, bind, token, _) = serve_flags(&[
            "--bind",
            "0.0.0.0:8181",
            "--api-token",
            "t3",
            "--master-key",
            "a2V5",
        ]);
        assert_eq!(bind, "0.0.0.0:8181");
        assert_eq!(token.as_ref().map(|t| t.expose()), Some("t3"));
        assert_eq!(store.master_key.as_deref(), Some("a2V5"));
    }

    #[test]
    fn parsed_settings_never_print_a_token_a_key_or_a_password() {
        let cli = Cli::try_parse_from([
            "orgledger",
            "serve",
            "--database-url",
            "postgres://app:hunter2@db/orgledger?password=hunter3",
            "--api-token",
            "platform-token-1",
            "--master-key",
            "bWFzdGVyLWtleQ==",
        ])
        .expect("parses");
        let printed = format!("{cli:?}");
        for secret in ["hunter2", "hunter3", "platform-token-1", "bWFzdGVyLWtleQ=="] {
            assert!(!printed.contains(secret), "{secret} printed in {printed}");
        }
        assert!(
            printed.contains("postgres://app:***@db/orgledger"),
            "{printed}"
        );
    }

    #[test]
    fn help_never_shows_the_value_of_a_variable_that_holds_a_secret() {
        use clap::CommandFactory;
        let secrets = [
            "DATABASE_URL",
            "ORGLEDGER_MASTER_KEY",
            "ORGLEDGER_API_TOKEN",
        ];
        let cli = Cli::command();
        let mut seen = Vec::new();
        let mut commands = vec![&cli];
        while let Some(command) = commands.pop() {
            commands.extend(command.get_subcommands());
            for argument in command.get_arguments() {
                let Some(variable) = argument.get_env().and_then(|v| v.to_str()) else {
                    continue;
                };
                if secrets.contains(&variable) {
                    assert!(
                        argument.is_hide_env_values_set(),
                        "{} shows {variable}'s value in --help",
                        command.get_name()
                    );
                    seen.push(variable);
                }
            }
        }
        for secret in secrets {
            assert!(seen.contains(&secret), "no flag reads {secret}");
        }
    }

    #[test]
    fn the_consistency_wait_defaults_to_five_seconds_and_is_bounded() {
        assert_eq!(serve_flags(&[]).3, 5_000);
        assert_eq!(serve_flags(&["--orgledger-consistency-wait-ms", "0"]).3, 0);
        assert_eq!(
            serve_flags(&["--orgledger-consistency-wait-ms", "60000"]).3,
            60_000
        );
        for refused in ["60001", "-1", "5s", ""] {
            let flag = format!("--orgledger-consistency-wait-ms={refused}");
            let parsed = Cli::try_parse_from(["orgledger", "serve", flag.as_str()]);
            let error = parsed.expect_err(refused).to_string();
            assert!(error.contains("consistency-wait-ms"), "{refused}: {error}");
        }
    }
}
