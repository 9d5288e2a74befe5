//! orgledger-bench: measures orgledger on real PostgreSQL, side by side in one run, against
//! the physical ceiling of the same database and against vanilla cqrs-es + postgres-es.
//! Prints medians and ratios; asserts nothing (CI runs `--quick` only to keep it working).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use cqrs_es::persist::{GenericQuery, PersistedEventStore, SerializedEvent};
use cqrs_es::{CqrsFramework, EventEnvelope, View};
use futures::StreamExt;
use orgledger::http::{AppState, PlatformTokens};
use orgledger::ledger::RequestContext;
use orgledger::service::Orgledger;
use orgledger::store::{Database, MasterKey};
use orgledger_domain::*;
use postgres_es::{PostgresEventRepository, PostgresViewRepository};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::postgres::PgPoolCopyExt;
use sqlx::{Connection, PgPool};
use uuid::Uuid;

// The same allocator as the service's binary, so the numbers are the service's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Benchmarks orgledger against the database's ceiling and vanilla cqrs-es")]
struct Args {
    /// A reduced run (under 2 minutes) that exercises every measurement.
    #[arg(long)]
    quick: bool,
    /// Internal: stream one organization's data export and report bytes and peak RSS (run
    /// in a child process, so the peak is the export's own).
    #[arg(long, hide = true, num_args = 3, value_names = ["DATABASE_URL", "MASTER_KEY", "ORG_ID"])]
    export_only: Option<Vec<String>>,
    /// The PostgreSQL server; a fresh database is created on it and dropped afterwards.
    #[arg(
        long,
        env = "ORGLEDGER_BENCH_POSTGRES",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres: String,
    /// Run only these sections (the ceiling always runs: every ratio needs it).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Events in the log for the rebuild (default: 1,000,000; 50,000 with --quick).
    #[arg(long)]
    rebuild_events: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Commands,
    History,
    Lag,
    Export,
    Rebuild,
}

struct Scale {
    seconds: f64,
    history_events: usize,
    history_samples: usize,
    vanilla_big_samples: usize,
    rebuild_events: usize,
    lag_seconds: f64,
    export_members: usize,
    embedded_rebuild_events: usize,
}

const TOKEN: &str = "bench-token";

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A ceiling measured three times, at the start of the run and just before and after the
/// measurement it is a ceiling for: this machine's speed drifts by a quarter from one minute
/// to the next, and one reading minutes away put the same rebuild anywhere from 34 to 69%.
struct Bracketed {
    start: f64,
    before: f64,
    after: f64,
}

impl Bracketed {
    fn median(&self) -> f64 {
        let mut rates = [self.start, self.before, self.after];
        rates.sort_by(f64::total_cmp);
        rates[1]
    }

    fn describe(&self) -> String {
        format!(
            "{:.0} at the start, {:.0} just before, {:.0} just after: median {:.0}",
            self.start,
            self.before,
            self.after,
            self.median()
        )
    }
}

/// CPU time spent so far by the whole machine and by this process, from Linux's `/proc`
/// (in `USER_HZ` ticks, 100 a second on every architecture Linux exposes them on). None
/// elsewhere: the bench then prints no CPU figures.
#[derive(Clone, Copy)]
struct CpuClock {
    at: Instant,
    machine: f64,
    process: f64,
}

/// CPU seconds spent between two readings of a [`CpuClock`], and the wall-clock seconds.
#[derive(Clone, Copy)]
struct CpuSpent {
    wall: f64,
    machine: f64,
    process: f64,
}

const USER_HZ: f64 = 100.0;

/// The ticks all CPUs were busy, from `/proc/stat`'s first line ("cpu  user nice system idle
/// iowait irq softirq steal ..."): all but idle and iowait (guest time is counted in user).
fn busy_ticks(stat: &str) -> Option<f64> {
    let ticks: Vec<f64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&field| ticks.get(field));
    (ticks.len() >= 8).then(|| busy.sum())
}

/// A process's user and system ticks, from its `/proc/PID/stat`: the 14th and 15th fields,
/// counted after the name in parentheses, which may itself hold spaces and parentheses.
fn process_ticks(stat: &str) -> Option<f64> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?)
}

impl CpuClock {
    fn now() -> Option<Self> {
        let machine = busy_ticks(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let process = process_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        Some(Self {
            at: Instant::now(),
            machine: machine / USER_HZ,
            process: process / USER_HZ,
        })
    }

    fn spent_since(earlier: Option<Self>) -> Option<CpuSpent> {
        let (earlier, now) = (earlier?, Self::now()?);
        Some(CpuSpent {
            wall: now.at.duration_since(earlier.at).as_secs_f64(),
            machine: now.machine - earlier.machine,
            process: now.process - earlier.process,
        })
    }
}

impl CpuSpent {
    /// Microseconds of the machine's CPU per unit of work, `units` of it done.
    fn machine_us_per(&self, units: f64) -> f64 {
        self.machine / units * 1e6
    }

    fn process_us_per(&self, units: f64) -> f64 {
        self.process / units * 1e6
    }

    /// Some busy time and some wall time passed: every rate and share has a denominator.
    fn measured(&self) -> bool {
        self.machine > 0.0 && self.wall > 0.0
    }

    /// The share of the machine's cores busy in the stretch.
    fn busy(&self, cores: usize) -> f64 {
        self.machine / (self.wall * cores.max(1) as f64)
    }
}

struct Report(Vec<String>);

impl Report {
    fn line(&mut self, text: String) {
        println!("{text}");
        self.0.push(text);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(export) = &args.export_only {
        return export_child(&export[0], &export[1], &export[2]).await;
    }
    let mut scale = if args.quick {
        Scale {
            seconds: 1.0,
            history_events: 10_000,
            history_samples: 30,
            vanilla_big_samples: 3,
            rebuild_events: 50_000,
            lag_seconds: 2.0,
            export_members: 5_000,
            embedded_rebuild_events: 10_000,
        }
    } else {
        Scale {
            seconds: 4.0,
            history_events: 100_000,
            history_samples: 100,
            vanilla_big_samples: 5,
            rebuild_events: 1_000_000,
            lag_seconds: 5.0,
            export_members: 100_000,
            embedded_rebuild_events: 100_000,
        }
    };
    if let Some(events) = args.rebuild_events {
        scale.rebuild_events = events;
    }
    let name = format!("orgledger_bench_{}", Uuid::now_v7().simple());
    let mut admin = sqlx::PgConnection::connect(&args.postgres)
        .await
        .context("connecting to PostgreSQL")?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let url = replace_database(&args.postgres, &name);
    let result = run(&url, &scale, args.quick, &args.only).await;
    drop(
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await,
    );
    result
}

fn replace_database(url: &str, name: &str) -> String {
    match url.rfind('/') {
        Some(slash) if slash > "postgres://".len() => format!("{}/{name}", &url[..slash]),
        _ => format!("{url}/{name}"),
    }
}

async fn run(url: &str, scale: &Scale, quick: bool, only: &[Section]) -> anyhow::Result<()> {
    let runs = |section| only.is_empty() || only.contains(&section);
    let database = Database::connect(url).await?;
    database.migrate().await?;
    let Database::Postgres(pool) = database.clone() else {
        unreachable!()
    };
    let master_key = MasterKey::generate();
    let service = Arc::new(Orgledger::open(database.clone(), master_key.clone()).await?);
    let mut report = Report(Vec::new());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    report.line(format!(
        "orgledger-bench {} on PostgreSQL, {} cores, {}",
        if quick { "--quick" } else { "full" },
        cores,
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    ));

    // 1. The physical ceiling.
    checkpoint(&pool).await;
    report.line("\n## 1. Physical ceiling (sqlx, durable commits)".into());
    let mut ceiling = HashMap::new();
    for concurrency in [1, 8, 32] {
        let rate = one_row_inserts(&pool, concurrency, scale.seconds).await?;
        ceiling.insert(concurrency, rate);
        report.line(format!(
            "one-row INSERT per transaction, {concurrency:>2} clients: {rate:>9.0} rows/s"
        ));
    }
    let ceilings = batched_inserts(&pool, scale.seconds).await?;
    report.line(format!(
        "1,000 rows per transaction, sent by this process, multi-row INSERT: {:>9.0} rows/s",
        ceilings.insert
    ));
    report.line(format!(
        "1,000 rows per transaction, sent by this process, COPY FROM STDIN:  {:>9.0} rows/s",
        ceilings.copy
    ));
    report.line(format!(
        "1,000 rows per transaction, made by the server (generate_series):  {:>9.0} rows/s (reference: no row crosses the wire)",
        ceilings.server_generated
    ));
    let batched = ceilings.ceiling();
    report.line(format!(
        "batched-insert ceiling (the faster of the two a client can use):   {batched:>9.0} rows/s"
    ));

    // 2. Commands over real HTTP.
    let mut served = None;
    if runs(Section::Commands) {
        checkpoint(&pool).await;
        report.line(
            "\n## 2. Commands over HTTP (invitations and role changes, one organization per client)"
                .into(),
        );
        let (stop, stopped) = tokio::sync::watch::channel(false);
        service.projector.spawn(stopped);
        let address = serve(service.clone()).await?;
        served = Some(address.clone());
        for concurrency in [1, 8, 32] {
            let cpu_at_start = CpuClock::now();
            let before = one_row_inserts(&pool, concurrency, scale.seconds).await?;
            let ceiling_cpu = CpuClock::spent_since(cpu_at_start);
            let run = http_commands(
                &service,
                &address,
                concurrency,
                scale.seconds,
                Answer::ReadYourWrites,
                false,
            )
            .await?;
            let after = one_row_inserts(&pool, concurrency, scale.seconds).await?;
            let one_row = Bracketed {
                start: ceiling[&concurrency],
                before,
                after,
            };
            let mean = |total: Duration| ms(total) / run.times.commands.max(1) as f64;
            let ratio = run.rate / one_row.median();
            report.line(format!(
                "{concurrency:>2} clients: {:>7.0} commands/s  p50 {:>6.1} ms  p99 {:>6.1} ms  {:>5.1} events per runner batch  = {:>5.1}% of the one-row ceiling{}\n            in the service, mean: committing {:>5.2} ms, waiting for the read models {:>5.2} ms\n            one-row ceiling, rows/s: {}",
                run.rate,
                run.p50,
                run.p99,
                run.events_per_batch,
                ratio * 100.0,
                if concurrency == 32 { if ratio >= 0.5 { "  (target >= 50%: met)" } else { "  (target >= 50%: NOT met)" } } else { "" },
                mean(run.times.committing),
                mean(run.times.waiting),
                one_row.describe(),
            ));
            report_cpu(
                &mut report,
                &run,
                ceiling_cpu,
                before * scale.seconds,
                cores,
            );
        }
        // Section 3 measures the store alone: no projection runner competes for the cores.
        let _ = stop.send(true);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // 3. Cost versus history.
    if runs(Section::History) {
        report.line(format!(
            "\n## 3. Role change p50 versus history (10 events vs {} events)",
            scale.history_events
        ));
        let ([small, big, small_cold, big_cold], big_organization) =
            history_cost(&service, &master_key, scale).await?;
        report.line(format!("orgledger:                 10 events {small:>8.2} ms   {} events {big:>8.2} ms   ratio {:.2} (target <= 1.5: {})",
            scale.history_events, big / small, if big / small <= 1.5 { "met" } else { "NOT met" }));
        report.line(format!("orgledger, cold (a fresh process's first command): 10 events {small_cold:>8.2} ms   {} events {big_cold:>8.2} ms   ratio {:.2}",
            scale.history_events, big_cold / small_cold));
        // The same role change where the history is members joining: the state holds them all.
        let crowded = crowded_cost(
            &service,
            &master_key,
            &pool,
            scale.history_events,
            scale.history_samples,
        )
        .await?;
        report.line(format!("orgledger, {} members (as many joins):       {:>8.2} ms   ratio to 10 events {:.2}; p99 {:.2} ms",
            scale.history_events, crowded.p50, crowded.p50 / small, crowded.p99));
        report.line(format!("  its snapshot every {} events: the command that writes one {:.0} ms; a cold load just before it (snapshot + {} events) {:.0} ms",
            crowded.interval, crowded.snapshot_commit, crowded.replayed, crowded.cold_load));
        let mb = |bytes: i64| bytes as f64 / 1e6;
        report.line(format!("  kept for past moments: {} snapshots, {:.1} MB sealed (its current one {:.1} MB, its events {:.1} MB as stored)",
            crowded.kept.0, mb(crowded.kept.1), mb(crowded.current_bytes), mb(crowded.event_bytes)));
        let (latest, middle) = past_state_cost(&service, big_organization).await?;
        report.line(format!("past state of the {}-event organization (GET .../state), p50: as of its latest event {latest:.1} ms, as of its middle {middle:.1} ms (each from the latest snapshot at or before it)",
            scale.history_events));
        let (vanilla_small, vanilla_big) = vanilla_history_cost(&pool, scale).await?;
        report.line(format!("vanilla cqrs-es+postgres-es: 10 events {vanilla_small:>8.2} ms   {} events {vanilla_big:>8.2} ms   ratio {:.1}",
            scale.history_events, vanilla_big / vanilla_small));
    }

    // 5. Projection lag, with the runners live again.
    if runs(Section::Lag) {
        checkpoint(&pool).await;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        service.projector.spawn(stopped);
        report.line("\n## 5. Projection lag at a sustained 1,000 commands/s".into());
        let (achieved, lag50, lag99) = projection_lag(&service, scale.lag_seconds).await?;
        report.line(format!("offered 1000/s, committed {achieved:.0}/s; commit -> read model p50 {lag50:.1} ms, p99 {lag99:.1} ms (target p99 < 100 ms: {})",
            if lag99 < 100.0 { "met" } else { "NOT met" }));
        let _ = stop.send(true);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 6. Export.
    if runs(Section::Export) {
        checkpoint(&pool).await;
        report.line(format!(
            "\n## 6. JSON data export of a {}-member organization",
            scale.export_members
        ));
        let (megabytes, seconds, peak) =
            export(&service, url, &master_key, scale.export_members).await?;
        report.line(format!("{megabytes:.1} MB in {seconds:.2} s = {:.1} MB/s; peak RSS of the exporting process {peak:.1} MB (target < 64 MB: {})",
            megabytes / seconds, if peak < 64.0 { "met" } else { "NOT met" }));
    }

    // 4. Rebuild (last: it needs the most data).
    if runs(Section::Rebuild) {
        report.line(format!(
            "\n## 4. Rebuild of every read model from {} events",
            scale.rebuild_events
        ));
        let events = seed_log(&service, scale.rebuild_events).await?;
        checkpoint(&pool).await;
        let before = batched_inserts(&pool, scale.seconds).await?;
        checkpoint(&pool).await;
        let rebuilt = service.projector.rebuild_all(false).await?;
        checkpoint(&pool).await;
        let after = batched_inserts(&pool, scale.seconds).await?;
        let batched_now = Bracketed {
            start: batched,
            before: before.ceiling(),
            after: after.ceiling(),
        };
        let seconds = rebuilt.seconds;
        let rate = events as f64 / seconds;
        let ceiling_now = batched_now.median();
        report.line(format!("{events} events in the log, all {} projections rebuilt from one read of it in {seconds:.1} s = {rate:.0} events/s = {:.1}% of the batched-insert ceiling (target >= 50%: {}); {:.1}% of the server-generated rows at the start",
            orgledger_projections::PROJECTION_NAMES.len(), rate / ceiling_now * 100.0, if rate >= ceiling_now * 0.5 { "met" } else { "NOT met" }, rate / ceilings.server_generated * 100.0));
        report.line(format!(
            "batched-insert ceiling, rows/s: {}",
            batched_now.describe()
        ));
        report.line(format!(
            "of which: replay {:.1} s, index builds {:.1} s, statistics {:.1} s, swap {:.1} s",
            rebuilt.replay_seconds,
            rebuilt.index_seconds,
            rebuilt.analyze_seconds,
            rebuilt.swap_seconds
        ));
        checkpoint(&pool).await;
        let (written, indexed) = audit_log_floor(&pool, events).await?;
        let floor = events as f64 / (written + indexed);
        report.line(format!("floor: the audit log alone (one entry per event), rows made by the server, no client: {events} rows in {written:.1} s + its key and 4 indexes in {indexed:.1} s = {floor:.0} rows/s = {:.1}% of the batched-insert ceiling, {:.1}% of the server-generated rows at the start",
            floor / ceiling_now * 100.0, floor / ceilings.server_generated * 100.0));
        // Not a target: what an auditor's `orgledger verify` of the whole log takes.
        let started = Instant::now();
        let verified = orgledger::verify::verify(&service, None, false).await?;
        let seconds = started.elapsed().as_secs_f64();
        report.line(format!("not a target: `orgledger verify` of the whole log ({} events of {} organizations, each read, opened, replayed, its MAC checked and its audit entry compared; {} snapshots compared) in {seconds:.1} s = {:.0} events/s, {} findings",
            verified.events, verified.organizations, verified.snapshots, verified.events as f64 / seconds, verified.findings.len()));
    }

    // 7. What read-your-writes costs: section 2's 32 clients answered once stored. Last, so
    // that its events and its runner's backlog touch no target's measurement.
    if let Some(address) = served {
        checkpoint(&pool).await;
        report.line(
            "\n## 7. Diagnostic, not a target: 32 clients with ORGLEDGER_CONSISTENCY_WAIT_MS=0"
                .into(),
        );
        // What the sections since left unapplied (with `--only`, no rebuild caught it up).
        service.projector.catch_up().await?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        service.projector.spawn(stopped);
        let measured = beside_a_ceiling(
            &service,
            &pool,
            &address,
            scale.seconds,
            Answer::OnceStored,
            false,
        )
        .await?;
        report_diagnostic(
            &mut report,
            "answered once stored (X-Consistency: pending), the runner applying behind",
            measured,
            scale.seconds,
            cores,
        );

        // 8. What an Idempotency-Key costs: section 2's 32 clients, each command keyed (a
        // claim stored, renewed while it runs, its response kept, its append fenced).
        report.line(
            "\n## 8. Diagnostic, not a target: 32 clients, every command with an Idempotency-Key"
                .into(),
        );
        service.projector.catch_up().await?;
        let measured = beside_a_ceiling(
            &service,
            &pool,
            &address,
            scale.seconds,
            Answer::ReadYourWrites,
            true,
        )
        .await?;
        report_diagnostic(
            &mut report,
            "keyed, read-your-writes",
            measured,
            scale.seconds,
            cores,
        );
        let _ = stop.send(true);
    }

    // 9. The embedded store's rebuild, on a file of its own. A log with purges in it: their
    // entries are dropped after the replay, by a statement that was once quadratic there.
    if runs(Section::Rebuild) {
        report.line(format!(
            "\n## 9. Not a target: rebuild on the embedded store (SQLite) from {} events, every tenth organization purged",
            scale.embedded_rebuild_events
        ));
        let embedded = embedded_rebuild(scale.embedded_rebuild_events, scale.seconds).await?;
        let rebuilt = &embedded.rebuilt;
        let rate = rebuilt.events as f64 / rebuilt.seconds;
        report.line(format!(
            "{} events rebuilt in {:.1} s = {rate:.0} events/s = {:.1}% of the same file's batched-insert ceiling ({:.0} rows/s, {} rows a transaction); replay {:.1} s, swap with its index builds {:.1} s",
            rebuilt.events,
            rebuilt.seconds,
            rate / embedded.ceiling * 100.0,
            embedded.ceiling,
            BATCH_ROWS,
            rebuilt.replay_seconds,
            rebuilt.swap_seconds
        ));
    }
    Ok(())
}

struct EmbeddedRebuild {
    ceiling: f64,
    rebuilt: orgledger_projections::RebuildReport,
}

/// Section 9: a log of about `events` events in a fresh SQLite file (organizations of 1,000
/// events, every tenth purged), the file's batched-insert ceiling, then a rebuild of every
/// read model from it.
async fn embedded_rebuild(events: usize, seconds: f64) -> anyhow::Result<EmbeddedRebuild> {
    let directory = tempfile::tempdir()?;
    let url = format!("sqlite://{}", directory.path().join("bench.db").display());
    let database = Database::connect(&url).await?;
    database.migrate().await?;
    let service = Orgledger::open(database.clone(), MasterKey::generate()).await?;
    for n in 0..events.div_ceil(1_000) {
        let id = organization_with(&service, "Embedded", role_flip_imports(997)).await?;
        if n % 10 == 9 {
            let confirm_name = service.ledger.current(id).await?.name.clone();
            let purge = Command::new(
                Actor::User(UserId::parse("user_id", "olivia").unwrap()),
                chrono::Utc::now(),
                OrganizationCommand::PurgeOrganization(PurgeOrganization { confirm_name }),
            );
            service
                .ledger
                .run(id, purge, &RequestContext::default(), None)
                .await?;
        }
    }
    let Database::Sqlite(pool) = &database else {
        unreachable!()
    };
    sqlx::query(
        "CREATE TABLE bench_ceiling (aggregate_id TEXT NOT NULL, sequence BIGINT NOT NULL,
                                     event_type TEXT NOT NULL, payload TEXT NOT NULL,
                                     metadata TEXT NOT NULL)",
    )
    .execute(pool)
    .await?;
    let rows = ceiling_rows();
    let ceiling = batch_rate(seconds, |_| async {
        let aggregate_id = Uuid::now_v7().to_string();
        let mut tx = pool.begin().await?;
        // 200 rows (1,000 parameters) a statement: SQLite's cost per statement grows with
        // the square of its placeholders.
        for (chunk, rows) in rows.chunks(200).enumerate() {
            let mut query = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO bench_ceiling (aggregate_id, sequence, event_type, payload, metadata) ",
            );
            query.push_values(rows.iter().enumerate(), |mut row, (i, (payload, metadata))| {
                row.push_bind(aggregate_id.clone())
                    .push_bind((chunk * 200 + i) as i64)
                    .push_bind("MemberRoleChanged")
                    .push_bind(payload.as_str())
                    .push_bind(metadata.as_str());
            });
            query.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    })
    .await?;
    sqlx::query("DROP TABLE bench_ceiling")
        .execute(pool)
        .await?;
    let rebuilt = service.projector.rebuild_all(false).await?;
    Ok(EmbeddedRebuild { ceiling, rebuilt })
}

/// A diagnostic's measurement: a one-row ceiling at 32 clients (its rate and CPU), then
/// section 2's 32 clients answered as `answer`, with a key on every command if `keyed`.
async fn beside_a_ceiling(
    service: &Orgledger,
    pool: &PgPool,
    address: &str,
    seconds: f64,
    answer: Answer,
    keyed: bool,
) -> anyhow::Result<(f64, Option<CpuSpent>, CommandRun)> {
    let cpu_at_start = CpuClock::now();
    let ceiling = one_row_inserts(pool, 32, seconds).await?;
    let ceiling_cpu = CpuClock::spent_since(cpu_at_start);
    let run = http_commands(service, address, 32, seconds, answer, keyed).await?;
    Ok((ceiling, ceiling_cpu, run))
}

/// A diagnostic's lines: its commands as `label`, against the one-row ceiling measured just
/// before them, where their time went in the service, and their CPU.
fn report_diagnostic(
    report: &mut Report,
    label: &str,
    (ceiling_now, ceiling_cpu, run): (f64, Option<CpuSpent>, CommandRun),
    seconds: f64,
    cores: usize,
) {
    let mean = |total: Duration| ms(total) / run.times.commands.max(1) as f64;
    report.line(format!(
        "{label}: {:>7.0} commands/s  p50 {:>6.1} ms  p99 {:>6.1} ms  {:>5.1} events per runner batch  = {:>5.1}% of the one-row ceiling just before ({ceiling_now:.0} rows/s)\n            in the service, mean: committing {:>5.2} ms, waiting for the read models {:>5.2} ms",
        run.rate,
        run.p50,
        run.p99,
        run.events_per_batch,
        run.rate / ceiling_now * 100.0,
        mean(run.times.committing),
        mean(run.times.waiting),
    ));
    report_cpu(report, &run, ceiling_cpu, ceiling_now * seconds, cores);
}

/// Starts a measurement with no checkpoint in progress, as pgbench does: seeding writes
/// enough WAL to set off checkpoints whose writes and full-page images would otherwise land
/// in whichever section runs next.
async fn checkpoint(pool: &PgPool) {
    if let Err(error) = sqlx::query("CHECKPOINT").execute(pool).await {
        println!("(CHECKPOINT refused, measuring without it: {error})");
    }
}

async fn one_row_inserts(pool: &PgPool, concurrency: usize, seconds: f64) -> anyhow::Result<f64> {
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_ceiling (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        aggregate_id text NOT NULL, sequence bigint NOT NULL, event_type text NOT NULL, payload jsonb NOT NULL,
        metadata jsonb NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now())").execute(pool).await?;
    let payload =
        json!({"MemberRoleChanged": {"user_id": "user-00042", "from": "member", "to": "admin"}});
    let metadata = json!({"actor_type": "user", "actor_id": "olivia", "occurred_at": "2026-11-22T10:00:00.000000Z", "request_id": "0b7e4a3c-5d1f-4d8e-9a51-1f0c2b3d4e5f"});
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..concurrency).map(|client| {
        let pool = pool.clone();
        let (payload, metadata) = (payload.clone(), metadata.clone());
        tokio::spawn(async move {
            let mut count = 0u64;
            while Instant::now() < deadline {
                sqlx::query("INSERT INTO bench_ceiling (aggregate_id, sequence, event_type, payload, metadata) VALUES ($1, $2, 'MemberRoleChanged', $3, $4)")
                    .bind(format!("client-{client}")).bind(count as i64).bind(&payload).bind(&metadata)
                    .execute(&pool).await?;
                count += 1;
            }
            Ok::<u64, sqlx::Error>(count)
        })
    }).collect();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / seconds)
}

/// The batched ceiling: 1,000 event-sized rows per durable transaction, measured three ways.
/// `insert` and `copy` send 1,000 distinct rows from this process through sqlx, as a client
/// must (one multi-row INSERT, as the store's imports do; one `COPY ... FROM STDIN`, as the
/// projector's audit log does); the faster of the two is the ceiling the targets use.
/// `server_generated` has the server repeat one row (`generate_series`): no row crosses the
/// wire or is parsed, so it is the database's own limit, printed beside it for reference.
struct BatchedCeiling {
    insert: f64,
    copy: f64,
    server_generated: f64,
}

impl BatchedCeiling {
    fn ceiling(&self) -> f64 {
        self.insert.max(self.copy)
    }
}

const BATCH_ROWS: usize = 1_000;

/// One batch's payloads and metadata, distinct per row, serialized once: the measurement is
/// the database's, not serde's.
fn ceiling_rows() -> Vec<(String, String)> {
    (0..BATCH_ROWS)
        .map(|i| {
            let payload = json!({"MemberRoleChanged": {"user_id": format!("user-{i:05}"), "from": "member", "to": "admin"}});
            let metadata = json!({"actor_type": "user", "actor_id": "olivia", "occurred_at": "2026-11-22T10:00:00.000000Z", "request_id": Uuid::new_v4().to_string()});
            (payload.to_string(), metadata.to_string())
        })
        .collect()
}

/// Rows per second of `batch`, called back to back for `seconds`, each call one durable
/// transaction of [`BATCH_ROWS`] rows; it gets the number of batches before it.
async fn batch_rate<F, Fut>(seconds: f64, mut batch: F) -> anyhow::Result<f64>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut batches = 0u64;
    while Instant::now() < deadline {
        batch(batches).await?;
        batches += 1;
    }
    Ok((batches * BATCH_ROWS as u64) as f64 / started.elapsed().as_secs_f64())
}

async fn batched_inserts(pool: &PgPool, seconds: f64) -> anyhow::Result<BatchedCeiling> {
    let rows = ceiling_rows();
    let insert = batch_rate(seconds, |_| async {
        let aggregate_id = Uuid::now_v7().to_string();
        let mut query = sqlx::QueryBuilder::<sqlx::Postgres>::new(
            "INSERT INTO bench_ceiling (aggregate_id, sequence, event_type, payload, metadata) ",
        );
        query.push_values(
            rows.iter().enumerate(),
            |mut row, (sequence, (payload, metadata))| {
                row.push_bind(aggregate_id.clone())
                    .push_bind(sequence as i64)
                    .push_bind("MemberRoleChanged")
                    .push_bind(payload.as_str())
                    .push_unseparated("::jsonb")
                    .push_bind(metadata.as_str())
                    .push_unseparated("::jsonb");
            },
        );
        query.build().execute(pool).await?;
        Ok(())
    })
    .await?;
    let copy = batch_rate(seconds, |_| async {
        let aggregate_id = Uuid::now_v7().to_string();
        let mut text = String::with_capacity(rows.len() * 256);
        for (sequence, (payload, metadata)) in rows.iter().enumerate() {
            // Plain JSON with no backslash, tab or newline: nothing to escape.
            writeln!(
                text,
                "{aggregate_id}\t{sequence}\tMemberRoleChanged\t{payload}\t{metadata}"
            )?;
        }
        let mut copy = pool
            .copy_in_raw(
                "COPY bench_ceiling (aggregate_id, sequence, event_type, payload, metadata) FROM STDIN",
            )
            .await?;
        copy.send(text.into_bytes()).await?;
        copy.finish().await?;
        Ok(())
    })
    .await?;
    let (payload, metadata) = &rows[0];
    let server_generated = batch_rate(seconds, |batch| async move {
        sqlx::query("INSERT INTO bench_ceiling (aggregate_id, sequence, event_type, payload, metadata)
                     SELECT 'batch', s, 'MemberRoleChanged', $1::jsonb, $2::jsonb FROM generate_series($3::bigint, $3 + 999) s")
            .bind(payload).bind(metadata).bind((batch * BATCH_ROWS as u64) as i64)
            .execute(pool).await?;
        Ok(())
    })
    .await?;
    // Millions of rows a measurement: kept, they would crowd the page cache of every
    // section after it.
    sqlx::query("TRUNCATE bench_ceiling").execute(pool).await?;
    Ok(BatchedCeiling {
        insert,
        copy,
        server_generated,
    })
}

async fn serve(service: Arc<Orgledger>) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let state = AppState::new(service, PlatformTokens::new([TOKEN]));
    // Through `Starting`, as `serve` answers: its hand-over is on every request's path.
    let starting = orgledger::http::Starting::default();
    starting.ready(orgledger::http::app(state));
    tokio::spawn(orgledger::http::serve(
        listener,
        starting.router(),
        std::future::pending(),
        Duration::from_secs(30),
    ));
    Ok(address)
}

async fn post(
    client: &reqwest::Client,
    url: String,
    actor: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    post_keyed(client, url, actor, body, None).await
}

/// [`post`], with an `Idempotency-Key` when `key` is given.
async fn post_keyed(
    client: &reqwest::Client,
    url: String,
    actor: &str,
    body: serde_json::Value,
    key: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    let mut request = client
        .post(url)
        .bearer_auth(TOKEN)
        .header("X-Actor-Id", actor);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.json(&body).send().await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    anyhow::ensure!(status.is_success(), "{status}: {body}");
    Ok(body)
}

/// Where the machine's CPU went during the commands and during the one-row ceiling just
/// before them, per command and per row. With every core busy the machine answers at most
/// `cores / per_command` commands a second, and the ceiling is `busy * cores / per_row` rows,
/// so the commands' share of the ceiling is at most `per_row / per_command / busy`.
/// The CPU lines of a commands' stretch beside the ceiling's (`inserted` rows) before it.
fn report_cpu(
    report: &mut Report,
    run: &CommandRun,
    ceiling_cpu: Option<CpuSpent>,
    inserted: f64,
    cores: usize,
) {
    // `/proc` counts in ticks of 10 ms: a stretch that read none has no rates to give.
    if let (Some(commands), Some(rows)) = (
        run.cpu.filter(CpuSpent::measured),
        ceiling_cpu.filter(CpuSpent::measured),
    ) {
        report.line(cpu_budget(&commands, run.commands, &rows, inserted, cores));
    }
}

fn cpu_budget(
    commands: &CpuSpent,
    count: usize,
    rows: &CpuSpent,
    inserted: f64,
    cores: usize,
) -> String {
    let (count, inserted) = (count.max(1) as f64, inserted.max(1.0));
    let per_command = commands.machine_us_per(count);
    let in_process = commands.process_us_per(count);
    let per_row = rows.machine_us_per(inserted);
    format!(
        "            CPU per command {per_command:.0} us ({in_process:.0} us in this process: the service and the load generator; {:.0} us elsewhere, PostgreSQL mostly), machine {:.0}% busy\n            CPU per one-row INSERT {per_row:.0} us ({:.0} us in this process), machine {:.0}% busy: a command costs the CPU of {:.1} rows, so with every core busy commands would reach at most {:.1}% of the one-row ceiling",
        per_command - in_process,
        commands.busy(cores) * 100.0,
        rows.process_us_per(inserted),
        rows.busy(cores) * 100.0,
        per_command / per_row,
        per_row / per_command / rows.busy(cores) * 100.0,
    )
}

/// When the service answers the bench's commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Once the read models show the command: the contract's default.
    ReadYourWrites,
    /// Once its events are stored (`ORGLEDGER_CONSISTENCY_WAIT_MS=0`), set after the set-up,
    /// which reads what it made.
    OnceStored,
}

/// What `concurrency` clients, each in a loop, made of the service in the timed stretch.
struct CommandRun {
    rate: f64,
    p50: f64,
    p99: f64,
    /// The service's own account of those commands' time.
    times: orgledger::service::CommandTimes,
    /// The share of a runner batch's fixed statements each command pays.
    events_per_batch: f64,
    /// Commands answered in the timed stretch, and the CPU the machine spent in it.
    commands: usize,
    cpu: Option<CpuSpent>,
}

/// Events and batches the audit log's runner applied so far.
fn audit_batches(service: &Orgledger) -> (u64, u64) {
    service
        .projector
        .counters()
        .get("audit_log")
        .map_or((0, 0), |c| (c.events_applied, c.batches_applied))
}

async fn http_commands(
    service: &Orgledger,
    address: &str,
    concurrency: usize,
    seconds: f64,
    answer: Answer,
    keyed: bool,
) -> anyhow::Result<CommandRun> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let mut orgs = Vec::new();
    for i in 0..concurrency {
        let owner = format!("owner{i}");
        let org = post(
            &client,
            format!("{address}/v1/organizations"),
            &owner,
            json!({"name": format!("Load {i} {}", Uuid::now_v7().simple())}),
        )
        .await?;
        let org = org["id"].as_str().unwrap_or_default().to_owned();
        let invited = post(
            &client,
            format!("{address}/v1/organizations/{org}/invitations"),
            &owner,
            json!({"email": format!("m{i}@example.com"), "role": "member"}),
        )
        .await?;
        post(&client, format!("{address}/v1/invitations/accept"), &format!("m{i}"), json!({"token": invited["token"], "user_id": format!("m{i}"), "email": format!("m{i}@example.com")})).await?;
        orgs.push((org, owner, format!("m{i}")));
    }
    // Each client's organization, invitation and member above are set-up, not measured.
    if answer == Answer::OnceStored {
        service.set_consistency_wait(Duration::ZERO);
    }
    // Keys are scoped to the caller; this run's prefix keeps them apart from other runs'.
    let keys = keyed.then(|| Uuid::now_v7().simple().to_string());
    let (events_before, batches_before) = audit_batches(service);
    let times_before = service.command_times();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let cpu_at_start = CpuClock::now();
    let tasks: Vec<_> = orgs.into_iter().enumerate().map(|(client_id, (org, owner, member))| {
        let client = client.clone();
        let address = address.to_owned();
        let keys = keys.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let start = Instant::now();
                let key = keys.as_ref().map(|run| format!("{run}-{client_id}-{n}"));
                if n.is_multiple_of(2) {
                    post_keyed(&client, format!("{address}/v1/organizations/{org}/invitations"), &owner,
                        json!({"email": format!("g{client_id}-{n}@example.com"), "role": "viewer"}), key).await?;
                } else {
                    let role = if n % 4 == 1 { "viewer" } else { "member" };
                    let mut request = client.patch(format!("{address}/v1/organizations/{org}/members/{member}"))
                        .bearer_auth(TOKEN).header("X-Actor-Id", &owner);
                    if let Some(key) = key {
                        request = request.header("Idempotency-Key", key);
                    }
                    let response = request.json(&json!({"role": role})).send().await?;
                    anyhow::ensure!(response.status().is_success(), "role change: {}", response.status());
                    // Read to its end: a response dropped unread closes its connection, and the
                    // next request would pay for a new one on both ends.
                    response.bytes().await?;
                }
                latencies.push(ms(start.elapsed()));
                n += 1;
            }
            Ok::<Vec<f64>, anyhow::Error>(latencies)
        })
    }).collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let cpu = CpuClock::spent_since(cpu_at_start);
    service.set_consistency_wait(orgledger::service::DEFAULT_CONSISTENCY_WAIT);
    let rate = latencies.len() as f64 / started.elapsed().as_secs_f64();
    let times = service.command_times() - times_before;
    let (events_after, batches_after) = audit_batches(service);
    Ok(CommandRun {
        rate,
        p50: percentile(&mut latencies, 0.5),
        p99: percentile(&mut latencies, 0.99),
        times,
        events_per_batch: (events_after - events_before) as f64
            / (batches_after - batches_before).max(1) as f64,
        commands: latencies.len(),
        cpu,
    })
}

fn role_flips(count: usize, user: &str) -> Vec<OrganizationEvent> {
    (0..count)
        .map(|i| {
            let (from, to) = if i % 2 == 0 {
                (Role::Member, Role::Admin)
            } else {
                (Role::Admin, Role::Member)
            };
            OrganizationEvent::MemberRoleChanged(MemberRoleChanged {
                user_id: UserId::parse("user_id", user).unwrap(),
                from,
                to,
            })
        })
        .collect()
}

fn create_command(
    name: &str,
    owner: &str,
    extra_member: bool,
) -> (Uuid, Command, Option<OrganizationEvent>) {
    let id = Uuid::now_v7();
    let command = Command::new(
        Actor::System,
        chrono::Utc::now(),
        OrganizationCommand::CreateOrganization(CreateOrganization {
            organization_id: id,
            name: OrganizationName::parse("name", name).unwrap(),
            slug: Slug::derive(name, &id.simple().to_string()),
            kind: OrganizationKind::Team,
            owner: NewMember {
                user_id: UserId::parse("user_id", owner).unwrap(),
                email: Some(Email::parse("email", &format!("{owner}@example.com")).unwrap()),
                first_name: None,
                last_name: None,
            },
        }),
    );
    let member = extra_member.then(|| member_joined("mia", None, None));
    (id, command, member)
}

async fn organization_with_history(service: &Orgledger, events: usize) -> anyhow::Result<Uuid> {
    let flips = role_flip_imports(events.saturating_sub(3));
    organization_with(service, &format!("History {events}"), flips).await
}

/// `count` role flips of mia, 5,000 to an import.
fn role_flip_imports(count: usize) -> impl Iterator<Item = Vec<OrganizationEvent>> {
    (0..count)
        .step_by(5_000)
        .map(move |start| role_flips(count.min(start + 5_000) - start, "mia"))
}

/// An organization of olivia (owner), mia and `members` members more.
async fn organization_with_members(service: &Orgledger, members: usize) -> anyhow::Result<Uuid> {
    let joins = (0..members)
        .step_by(2_000)
        .map(|start| member_joins(start..members.min(start + 2_000)));
    organization_with(service, &format!("Crowded {members}"), joins).await
}

/// A new organization of olivia (owner) and mia, then `imports`, each appended as it is.
async fn organization_with(
    service: &Orgledger,
    name: &str,
    imports: impl Iterator<Item = Vec<OrganizationEvent>>,
) -> anyhow::Result<Uuid> {
    let (id, create, mia) = create_command(
        &format!("{name} {}", Uuid::now_v7().simple()),
        "olivia",
        true,
    );
    service
        .ledger
        .create_organization(create, false, &RequestContext::default())
        .await?;
    for events in std::iter::once(mia.into_iter().collect()).chain(imports) {
        service.ledger.import(id, events, HashMap::new()).await?;
    }
    Ok(id)
}

/// `user-NNNNNN` joining as members, one event each.
fn member_joins(numbers: std::ops::Range<usize>) -> Vec<OrganizationEvent> {
    numbers
        .map(|n| {
            member_joined(
                &format!("user-{n:06}"),
                Some(format!("First{n}")),
                Some(format!("Last{n}")),
            )
        })
        .collect()
}

/// `user` joining as a member, now, with the address `user@example.com`.
fn member_joined(
    user: &str,
    first_name: Option<String>,
    last_name: Option<String>,
) -> OrganizationEvent {
    OrganizationEvent::MemberJoined(MemberJoined {
        user_id: UserId::parse("user_id", user).unwrap(),
        email: format!("{user}@example.com"),
        first_name,
        last_name,
        title: None,
        image_url: None,
        role: Role::Member,
        locked_fields: vec![],
        group_ids: vec![],
        invitation_id: None,
        joined_at: chrono::Utc::now(),
    })
}

struct CrowdedCost {
    p50: f64,
    p99: f64,
    interval: usize,
    snapshot_commit: f64,
    cold_load: f64,
    replayed: usize,
    /// The snapshots kept for past moments: how many, and their sealed bytes; then the
    /// current snapshot's and the events' bytes as stored, for scale.
    kept: (i64, i64),
    current_bytes: i64,
    event_bytes: i64,
}

/// Role changes on an organization of `members` members: warm p50 and p99, then, one event
/// short of its next snapshot, a fresh process's load (its snapshot and the most events that
/// can follow it) and the command that writes the snapshot.
async fn crowded_cost(
    service: &Orgledger,
    master_key: &MasterKey,
    pool: &PgPool,
    members: usize,
    samples: usize,
) -> anyhow::Result<CrowdedCost> {
    let org = organization_with_members(service, members).await?;
    checkpoint(pool).await;
    let (p50, p99) = role_change_latencies(service, org, samples).await?;
    let (state, version) = service.ledger.load(org).await?;
    let interval = orgledger::store::snapshot_interval(&state);
    let short = (version / interval + 1) * interval - 1 - version;
    for flips in role_flip_imports(short) {
        service.ledger.import(org, flips, HashMap::new()).await?;
    }
    let stored: i64 = sqlx::query_scalar(
        "SELECT last_sequence FROM snapshots WHERE aggregate_type = 'organization' AND aggregate_id = $1",
    )
    .bind(org.to_string())
    .fetch_one(pool)
    .await?;
    let mut loads = Vec::new();
    for _ in 0..3 {
        let fresh = Orgledger::open(service.database().clone(), master_key.clone()).await?;
        let start = Instant::now();
        fresh.ledger.load(org).await?;
        loads.push(ms(start.elapsed()));
    }
    let snapshot_commit = time_role_changes(service, org, 1).await?;
    let id = org.to_string();
    let kept: (i64, i64) = sqlx::query_as(
        "SELECT count(*), coalesce(sum(octet_length(state)), 0)::int8 FROM past_snapshots
          WHERE aggregate_type = 'organization' AND aggregate_id = $1",
    )
    .bind(&id)
    .fetch_one(pool)
    .await?;
    let current_bytes: i64 = sqlx::query_scalar(
        "SELECT octet_length(state)::int8 FROM snapshots
          WHERE aggregate_type = 'organization' AND aggregate_id = $1",
    )
    .bind(&id)
    .fetch_one(pool)
    .await?;
    let event_bytes: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(pg_column_size(events.*)), 0)::int8 FROM events
          WHERE aggregate_type = 'organization' AND aggregate_id = $1",
    )
    .bind(&id)
    .fetch_one(pool)
    .await?;
    Ok(CrowdedCost {
        p50,
        p99,
        interval,
        snapshot_commit,
        cold_load: percentile(&mut loads, 0.5),
        replayed: (version + short) - stored as usize,
        kept,
        current_bytes,
        event_bytes,
    })
}

async fn time_role_changes(service: &Orgledger, org: Uuid, samples: usize) -> anyhow::Result<f64> {
    Ok(role_change_latencies(service, org, samples).await?.0)
}

/// p50 and p99 of `samples` role changes of mia, in ms.
async fn role_change_latencies(
    service: &Orgledger,
    org: Uuid,
    samples: usize,
) -> anyhow::Result<(f64, f64)> {
    let mut latencies = Vec::new();
    for i in 0..samples {
        let role = if i % 2 == 0 {
            Role::Viewer
        } else {
            Role::Member
        };
        let command = Command::new(
            Actor::User(UserId::parse("user_id", "olivia").unwrap()),
            chrono::Utc::now(),
            OrganizationCommand::UpdateMember(UpdateMember {
                role: Some(role),
                ..UpdateMember::of(UserId::parse("user_id", "mia").unwrap())
            }),
        );
        let start = Instant::now();
        service
            .ledger
            .run(org, command, &RequestContext::default(), None)
            .await?;
        latencies.push(ms(start.elapsed()));
    }
    Ok((
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.99),
    ))
}

/// The p50 of reading a past state of `organization`: as of its latest event and as of
/// its middle one.
async fn past_state_cost(service: &Orgledger, organization: Uuid) -> anyhow::Result<(f64, f64)> {
    let (_, version) = service.ledger.load(organization).await?;
    let mut p50 = Vec::new();
    for sequence in [version, version / 2] {
        let mut samples = Vec::new();
        for _ in 0..PAST_STATE_SAMPLES {
            let started = Instant::now();
            let past = orgledger::history::state_as_of(
                &service.ledger,
                organization,
                orgledger::history::AsOf::Sequence(sequence),
            )
            .await?;
            samples.push(ms(started.elapsed()));
            // At or just past it: a sequence inside a command stands for the command's end.
            anyhow::ensure!(past.is_some_and(|past| past.as_of_sequence >= sequence));
        }
        p50.push(percentile(&mut samples, 0.5));
    }
    Ok((p50[0], p50[1]))
}

const PAST_STATE_SAMPLES: usize = 5;

/// p50 of a role change on a 10-event and on a long organization: warm (the process that
/// seeded them, its cache current) and cold (a fresh process's first command, which reads
/// the snapshot and the events after it). Also returns the long organization.
async fn history_cost(
    service: &Orgledger,
    master_key: &MasterKey,
    scale: &Scale,
) -> anyhow::Result<([f64; 4], Uuid)> {
    let small = organization_with_history(service, 10).await?;
    let big = organization_with_history(service, scale.history_events).await?;
    if let Database::Postgres(pool) = service.database() {
        checkpoint(pool).await;
    }
    let small_warm = time_role_changes(service, small, scale.history_samples).await?;
    let big_warm = time_role_changes(service, big, scale.history_samples).await?;
    let mut cold = [Vec::new(), Vec::new()];
    for _ in 0..COLD_SAMPLES {
        for (org, samples) in [small, big].into_iter().zip(cold.iter_mut()) {
            let fresh = Orgledger::open(service.database().clone(), master_key.clone()).await?;
            samples.push(time_role_changes(&fresh, org, 1).await?);
        }
    }
    let [small_cold, big_cold] = cold.map(|mut samples| percentile(&mut samples, 0.5));
    Ok(([small_warm, big_warm, small_cold, big_cold], big))
}

/// Fresh processes opened for the cold measurement of each organization.
const COLD_SAMPLES: usize = 9;

/// The baseline: cqrs-es's CqrsFramework over postgres-es, no snapshots, an inline
/// GenericQuery view, the same domain.
#[derive(Debug, Default, Serialize, Deserialize)]
struct MemberCountView {
    members: i64,
}

impl View<Organization> for MemberCountView {
    fn update(&mut self, event: &EventEnvelope<Organization>) {
        match &event.payload {
            OrganizationEvent::MemberJoined(_) => self.members += 1,
            OrganizationEvent::MemberRemoved(_) | OrganizationEvent::MemberLeft(_) => {
                self.members -= 1
            }
            _ => {}
        }
    }
}

async fn vanilla_history_cost(pool: &PgPool, scale: &Scale) -> anyhow::Result<(f64, f64)> {
    for ddl in [
        "CREATE TABLE vanilla_events (aggregate_type text NOT NULL, aggregate_id text NOT NULL, sequence bigint NOT NULL,
            event_type text NOT NULL, event_version text NOT NULL, payload json NOT NULL, metadata json NOT NULL,
            PRIMARY KEY (aggregate_type, aggregate_id, sequence))",
        "CREATE TABLE vanilla_snapshots (aggregate_type text NOT NULL, aggregate_id text NOT NULL, last_sequence bigint NOT NULL,
            current_snapshot bigint NOT NULL, payload json NOT NULL, PRIMARY KEY (aggregate_type, aggregate_id, last_sequence))",
        "CREATE TABLE vanilla_view (view_id text NOT NULL PRIMARY KEY, version bigint NOT NULL, payload json NOT NULL)",
    ] {
        sqlx::query(ddl).execute(pool).await?;
    }
    let repository = PostgresEventRepository::new(pool.clone())
        .with_tables("vanilla_events", "vanilla_snapshots");
    let store = PersistedEventStore::new_event_store(repository);
    let view = Arc::new(
        PostgresViewRepository::<MemberCountView, Organization>::new("vanilla_view", pool.clone()),
    );
    let cqrs = CqrsFramework::new(store, vec![Box::new(GenericQuery::new(view))], ());
    let mut p50 = Vec::new();
    for (events, samples) in [(10, 30), (scale.history_events, scale.vanilla_big_samples)] {
        let (id, create, member) = create_command(&format!("Vanilla {events}"), "olivia", true);
        let aggregate = id.to_string();
        cqrs.execute(&aggregate, create)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut seed: Vec<OrganizationEvent> = member.into_iter().collect();
        seed.extend(role_flips(events.saturating_sub(3), "mia"));
        for (chunk_index, chunk) in seed.chunks(1_000).enumerate() {
            let mut builder = sqlx::QueryBuilder::new("INSERT INTO vanilla_events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) ");
            builder.push_values(chunk.iter().enumerate(), |mut row, (i, event)| {
                use cqrs_es::DomainEvent;
                row.push_bind("organization")
                    .push_bind(&aggregate)
                    .push_bind((3 + chunk_index * 1_000 + i) as i64)
                    .push_bind(event.event_type())
                    .push_bind(event.event_version())
                    .push_bind(serde_json::to_value(event).unwrap())
                    .push_bind(json!({}));
            });
            builder.build().execute(pool).await?;
        }
        let mut latencies = Vec::new();
        for i in 0..samples {
            let role = if i % 2 == 0 {
                Role::Viewer
            } else {
                Role::Member
            };
            let command = Command::new(
                Actor::User(UserId::parse("user_id", "olivia").unwrap()),
                chrono::Utc::now(),
                OrganizationCommand::UpdateMember(UpdateMember {
                    role: Some(role),
                    ..UpdateMember::of(UserId::parse("user_id", "mia").unwrap())
                }),
            );
            let start = Instant::now();
            cqrs.execute(&aggregate, command)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            latencies.push(ms(start.elapsed()));
        }
        p50.push(percentile(&mut latencies, 0.5));
    }
    Ok((p50[0], p50[1]))
}

/// Waits for the `ANALYZE` a runner starts after catching up a backlog (here: the events
/// earlier sections imported), so that it does not run inside the next measurement.
async fn analyses_finished(service: &Orgledger) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while service.projector.analyzing() {
        if Instant::now() >= deadline {
            println!("(an ANALYZE still runs after a minute; measuring beside it)");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn projection_lag(service: &Arc<Orgledger>, seconds: f64) -> anyhow::Result<(f64, f64, f64)> {
    let mut orgs = Vec::new();
    for _ in 0..64 {
        orgs.push(organization_with_history(service, 3).await?);
    }
    service.projector.catch_up().await?;
    analyses_finished(service).await;
    let rate = 1000.0;
    let total = (rate * seconds) as usize;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for n in 0..total {
        let due = started + Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let service = service.clone();
        let org = orgs[n % orgs.len()];
        tasks.push(tokio::spawn(async move {
            let role = if (n / orgs_len()).is_multiple_of(2) {
                Role::Viewer
            } else {
                Role::Member
            };
            let command = Command::new(
                Actor::User(UserId::parse("user_id", "olivia").unwrap()),
                chrono::Utc::now(),
                OrganizationCommand::UpdateMember(UpdateMember {
                    role: Some(role),
                    ..UpdateMember::of(UserId::parse("user_id", "mia").unwrap())
                }),
            );
            let committed = service
                .ledger
                .run(org, command, &RequestContext::default(), None)
                .await?;
            let at = Instant::now();
            service.projector.wake();
            let visible = service
                .projector
                .wait_for(
                    &org.to_string(),
                    committed.version as i64,
                    Duration::from_secs(10),
                )
                .await?;
            anyhow::ensure!(visible, "not visible within 10 s");
            Ok::<f64, anyhow::Error>(ms(at.elapsed()))
        }));
    }
    let mut lags = Vec::new();
    for task in tasks {
        lags.push(task.await??);
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    let p50 = percentile(&mut lags, 0.5);
    let p99 = percentile(&mut lags, 0.99);
    Ok((achieved, p50, p99))
}

fn orgs_len() -> usize {
    64
}

fn rss_megabytes(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .map(str::to_owned)
        })
        .and_then(|line| {
            line.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

async fn export(
    service: &Arc<Orgledger>,
    url: &str,
    master_key: &MasterKey,
    members: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let id = organization_with_members(service, members).await?;
    service.projector.catch_up().await?;
    // The steady state: the runner analyzes its tables after catching up a backlog this
    // large, and autovacuum within a minute or so; one more ANALYZE, waited for, makes
    // sure. Without statistics the planner takes the 100,000 members for a few and sorts
    // them all for each page (BENCHMARKS.md).
    let Database::Postgres(pool) = service.database() else {
        unreachable!()
    };
    analyses_finished(service).await;
    sqlx::query("ANALYZE").execute(pool).await?;
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--export-only")
        .arg(url)
        .arg(master_key.to_base64())
        .arg(id.to_string())
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "export child failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8_lossy(&output.stdout);
    let numbers: Vec<f64> = line
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    anyhow::ensure!(numbers.len() == 3, "unexpected export child output: {line}");
    Ok((numbers[0], numbers[1], numbers[2]))
}

/// The child: opens the store like `serve` would, streams the export, prints
/// `megabytes seconds peak_rss_megabytes`.
async fn export_child(url: &str, master_key: &str, organization_id: &str) -> anyhow::Result<()> {
    let database = Database::connect(url).await?;
    let key = MasterKey::from_base64(master_key).context("master key")?;
    let service = Arc::new(Orgledger::open(database, key).await?);
    let organization =
        orgledger_projections::organizations::get(service.database(), organization_id)
            .await?
            .context("organization")?;
    let started = Instant::now();
    let mut stream = orgledger::exports::data_export(service.clone(), organization);
    let mut bytes = 0usize;
    while let Some(chunk) = stream.next().await {
        bytes += chunk?.len();
    }
    println!(
        "{} {} {}",
        bytes as f64 / 1_000_000.0,
        started.elapsed().as_secs_f64(),
        rss_megabytes("VmHWM:")
    );
    Ok(())
}

/// What the audit log's table costs the server with no client in the way: `rows` entries
/// generated by `INSERT ... SELECT` (1,000 organizations' worth at a time, each its own
/// transaction, as a rebuild's batches), then its secondary indexes built, as a rebuild
/// builds them. Returns the two durations in seconds.
async fn audit_log_floor(pool: &PgPool, rows: i64) -> anyhow::Result<(f64, f64)> {
    use orgledger_projections::audit::AuditLogProjection;
    use orgledger_projections::Projection;
    let copy = AuditLogProjection::new("__floor");
    let table = copy.tables()[0].1.clone();
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(pool)
        .await?;
    for statement in copy.create_tables(orgledger_projections::Backend::Postgres) {
        sqlx::query(&statement).execute(pool).await?;
    }
    let started = Instant::now();
    let batch = 5_000_i64;
    for from in (0..rows).step_by(batch as usize) {
        let sql = format!(
            "INSERT INTO {table} (organization_id, sequence, occurred_at_us, actor_type, actor_id,
                                  action, resource_type, resource_id, details, request_id)
             SELECT md5((n / 1000)::text)::uuid, n % 1000 + 1, 1795384659826496 + n,
                    'user', 'olivia', 'member.role_changed', 'member', 'mia',
                    '{{\"from\":\"member\",\"to\":\"admin\"}}', NULL
               FROM generate_series($1::bigint, $2::bigint) n"
        );
        sqlx::query(&sql)
            .bind(from)
            .bind((from + batch).min(rows) - 1)
            .execute(pool)
            .await?;
    }
    let written = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for index in copy.indexes() {
        sqlx::query(&index.create()).execute(pool).await?;
    }
    let indexed = started.elapsed().as_secs_f64();
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(pool)
        .await?;
    Ok((written, indexed))
}

/// Fills the log to `events` (1,000 per organization, role changes written straight in) and
/// vacuums it; returns how many it holds.
async fn seed_log(service: &Arc<Orgledger>, events: usize) -> anyhow::Result<i64> {
    let Database::Postgres(pool) = service.database() else {
        unreachable!()
    };
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;
    let per_org = 1_000;
    let mut remaining = (events as i64 - existing).max(0) as usize;
    while remaining > 0 {
        let (id, create, member) = create_command(
            &format!("Rebuild {}", Uuid::now_v7().simple()),
            "olivia",
            true,
        );
        service
            .ledger
            .create_organization(create, false, &RequestContext::default())
            .await?;
        service
            .ledger
            .import(id, member.into_iter().collect(), HashMap::new())
            .await?;
        let flips = remaining.min(per_org).saturating_sub(3);
        // Role changes carry no personal data: written straight in, 1,000 rows a statement,
        // each with its MAC as the store writes it.
        let metadata = serde_json::json!({
            "actor_type": "user", "actor_id": "olivia", "occurred_at": "2026-11-22T10:00:00Z"
        });
        let macs = service.ledger.keys().event_macs();
        let stored: Vec<(String, [u8; orgledger::store::MAC_LEN])> = role_flips(flips, "mia")
            .iter()
            .enumerate()
            .map(|(i, event)| {
                let payload = serde_json::to_value(event).unwrap();
                let mac = macs
                    .authenticate(SerializedEvent::new(
                        id.to_string(),
                        4 + i,
                        "organization".into(),
                        "MemberRoleChanged".into(),
                        "1".into(),
                        payload.clone(),
                        metadata.clone(),
                    ))
                    .mac;
                (payload.to_string(), mac)
            })
            .collect();
        let metadata = metadata.to_string();
        for (chunk_index, chunk) in stored.chunks(1_000).enumerate() {
            let mut builder = sqlx::QueryBuilder::new("INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, mac) ");
            builder.push_values(chunk.iter().enumerate(), |mut row, (i, (payload, mac))| {
                row.push_bind("organization")
                    .push_bind(id.to_string())
                    .push_bind((4 + chunk_index * 1_000 + i) as i64)
                    .push_bind("MemberRoleChanged")
                    .push_bind("1")
                    .push("CAST(")
                    .push_bind_unseparated(payload)
                    .push_unseparated(" AS jsonb)")
                    .push("CAST(")
                    .push_bind_unseparated(&metadata)
                    .push_unseparated(" AS jsonb)")
                    .push_bind(&mac[..]);
            });
            builder.build().execute(pool).await?;
        }
        remaining = remaining.saturating_sub(flips + 3);
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;
    // As pgbench vacuums before it measures: the seeding's inserts would otherwise set off
    // autovacuum on the log, and its scan would run inside the rebuild's timing.
    sqlx::query("VACUUM (ANALYZE) events").execute(pool).await?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 9000 300 7 8 2 40 0\ncpu0 50 2 25 4500 150 3 4 1 20 0\n";
        assert_eq!(busy_ticks(stat), Some(100.0 + 5.0 + 50.0 + 7.0 + 8.0 + 2.0));
        assert_eq!(busy_ticks("cpu0 1 2 3 4 5 6 7 8\n"), None);
        assert_eq!(busy_ticks("cpu  1 2 3\n"), None);
    }

    #[test]
    fn a_stretch_that_read_no_busy_ticks_gives_no_cpu_budget() {
        let spent = |wall, machine| CpuSpent {
            wall,
            machine,
            process: 0.0,
        };
        assert!(spent(4.0, 5.6).measured());
        assert!(!spent(4.0, 0.0).measured());
        assert!(!spent(0.0, 5.6).measured());
    }

    #[test]
    fn the_cpu_budget_bounds_the_commands_by_a_rows_share_of_a_commands_cpu() {
        // 16,000 commands on 5.6 CPU-seconds: 350 us each, 2.64 s of it here. 56,000 rows on
        // 6.72 CPU-seconds over 4 s on 2 cores: 120 us each, the machine 84% busy.
        let commands = CpuSpent {
            wall: 4.0,
            machine: 5.6,
            process: 2.64,
        };
        let rows = CpuSpent {
            wall: 4.0,
            machine: 6.72,
            process: 1.68,
        };
        let line = cpu_budget(&commands, 16_000, &rows, 56_000.0, 2);
        for expected in [
            "CPU per command 350 us (165 us in this process",
            "185 us elsewhere",
            "machine 70% busy",
            "CPU per one-row INSERT 120 us (30 us in this process), machine 84% busy",
            "the CPU of 2.9 rows",
            // 120 / 350 / 0.84
            "at most 40.8% of the one-row ceiling",
        ] {
            assert!(line.contains(expected), "{expected:?} not in {line:?}");
        }
    }

    #[test]
    fn process_ticks_are_read_after_a_name_holding_spaces_and_parentheses() {
        let stat = "4242 (bench (x) y) S 1 4242 4242 0 -1 4194304 900 0 0 0 1234 567 0 0 20 0 9 0 100 2000000 3000";
        assert_eq!(process_ticks(stat), Some(1234.0 + 567.0));
        assert_eq!(process_ticks("4242 (short) S 1 2"), None);
    }
}
