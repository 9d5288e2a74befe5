//! The durable projector. The projections run together: each batch reads and decodes the log
//! once, from the furthest-behind checkpoint, and gives every projection the events past its
//! own. A batch's read-model changes, per-organization versions and new checkpoints commit in
//! one transaction, so a crash anywhere is followed by a clean catch-up and nothing is applied
//! twice. A batch that fails is rolled back and reported; the failing projection is retried
//! on its own backoff while the others carry on, and an event is never skipped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::db::{
    in_list, value_rows, Arg, Backend, Conn, Database, Index, Transaction, MAX_ROWS_PER_STATEMENT,
};
use crate::feed::{Checkpoint, EventFeed, FeedError, RecordedEvent};
use crate::{args, audit, invitations, members, organizations, to_micros, BatchMap};

/// Every projection, in the order they are run.
pub const PROJECTION_NAMES: &[&str] = &[
    "organizations",
    "members",
    "invitations",
    "audit_log",
    "groups",
    "service_accounts",
];

/// How often a command waiting for the read models asks the database whether they show it,
/// at the longest (see [`Projector::wait_for`]).
const DATABASE_CHECK_EVERY: Duration = Duration::from_millis(50);

const LIVE_BATCH: usize = 500;
/// A backlog of at least this many events, caught up in full live batches, is followed by
/// an `ANALYZE` of the read models it filled (see `track_backlog`).
const BACKLOG_ANALYZE_EVENTS: usize = 5_000;
const REBUILD_BATCH: usize = 5_000;
/// Index builds a rebuild runs at once (see `index_copies`).
const INDEX_BUILDS_AT_ONCE: usize = 2;
/// First and longest pause before looking again at events held back behind a transaction in
/// flight.
const HELD_BACK_FIRST_LOOK: Duration = Duration::from_millis(2);
const HELD_BACK_LAST_LOOK: Duration = Duration::from_millis(64);
/// Poll interval when no wake-up arrives: the fallback for lost notifications.
const POLL: Duration = Duration::from_millis(1_000);
/// A rebuild's copy whose checkpoint has not been touched for this long belongs to a rebuild
/// that died (killed, crashed, failed before it could drop it): it holds read-model rows,
/// personal data among them, that no purge would reach, so it is dropped when a process
/// starts, when a rebuild starts, after a purge and every [`COPY_CHECK`]. A live rebuild
/// touches its copies every [`COPY_HEARTBEAT`], whatever step it is at.
const ABANDONED_COPY_AFTER: Duration = Duration::from_secs(120);
const COPY_HEARTBEAT: Duration = Duration::from_secs(5);
/// How long dropping a copy waits for another session's lock on it (PostgreSQL).
const DISCARD_LOCK_WAIT: Duration = Duration::from_secs(5);
/// How often the live runner looks for the copies of rebuilds that died.
const COPY_CHECK: Duration = Duration::from_secs(60);
/// How long the server lets the projector's lock session sit idle before ending it, and how
/// often a live leader pings it (see [`Leadership`]).
const LEADER_IDLE_LIMIT: Duration = Duration::from_secs(10);
const LEADER_PING: Duration = Duration::from_secs(2);
/// Separates a projection's name from a rebuild copy's suffix (`members__rb<micros>`).
const COPY_MARK: &str = "__rb";
const NOTIFY_CHANNEL: &str = "orgledger_events";

/// One read model: its tables and how an event changes them. `apply` must be a pure
/// function of the event and the rows it touches, so replaying the log rebuilds it.
#[async_trait]
pub trait Projection: Send + Sync {
    /// The checkpoint name: the base name, plus the rebuild suffix on a shadow copy.
    fn name(&self) -> &str;
    /// `(live table name, this copy's table name)` for each of its tables.
    fn tables(&self) -> Vec<(&'static str, String)>;
    /// Idempotent DDL for this copy's tables on `backend` (with the keys their writes look
    /// rows up by).
    fn create_tables(&self, backend: Backend) -> Vec<String>;
    /// This copy's other indexes (an append-only table's key among them). A rebuild builds
    /// them once its replay is done, rather than maintaining them row by row during it.
    fn indexes(&self) -> Vec<Index> {
        Vec::new()
    }
    /// Bumped whenever the tables' shape changes: older tables are dropped and replayed.
    fn schema_version(&self) -> i64 {
        1
    }
    async fn apply(&self, conn: &mut Conn<'_>, event: &RecordedEvent) -> Result<(), sqlx::Error>;

    /// Called on a rebuild's copy once its replay is done, before its indexes are built:
    /// for work put off while the copy had none.
    async fn replay_done(&self, _conn: &mut Conn<'_>) -> Result<(), sqlx::Error> {
        Ok(())
    }

    /// Applies a batch in order. The default applies event by event; a projection may write
    /// set-based instead. On failure: the index of the (first) event that failed.
    async fn apply_all(
        &self,
        conn: &mut Conn<'_>,
        events: &[&RecordedEvent],
    ) -> Result<(), (usize, sqlx::Error)> {
        for (index, event) in events.iter().enumerate() {
            self.apply(conn, event)
                .await
                .map_err(|error| (index, error))?;
        }
        Ok(())
    }
}

/// The projection `name` writing to tables with `suffix` (empty for the live tables).
pub fn projection_named(name: &str, suffix: &str) -> Option<Arc<dyn Projection>> {
    let projection: Arc<dyn Projection> = match name {
        "organizations" => Arc::new(organizations::OrganizationsProjection::new(suffix)),
        "members" => Arc::new(members::MembersProjection::new(suffix)),
        "invitations" => Arc::new(invitations::InvitationsProjection::new(suffix)),
        "audit_log" => Arc::new(audit::AuditLogProjection::new(suffix)),
        "groups" => Arc::new(crate::groups::GroupsProjection::new(suffix)),
        "service_accounts" => Arc::new(crate::service_accounts::ServiceAccountsProjection::new(
            suffix,
        )),
        _ => return None,
    };
    Some(projection)
}

pub fn all_projections(suffix: &str) -> Vec<Arc<dyn Projection>> {
    PROJECTION_NAMES
        .iter()
        .filter_map(|name| projection_named(name, suffix))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("reading the event log failed: {0}")]
    Feed(#[from] FeedError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("projection {projection} failed on {event}: {error}")]
    Apply {
        projection: String,
        event: String,
        error: sqlx::Error,
    },
    #[error("a rebuild read ahead from {read_from:?} but its checkpoints stand at {checkpoint:?}")]
    ReadAhead {
        read_from: Checkpoint,
        checkpoint: Checkpoint,
    },
    #[error("projection {0} has no checkpoint: its tables were never prepared")]
    Unprepared(String),
    #[error("projections did not catch up within 60 s: {0}")]
    Stalled(String),
    #[error("unknown projection {0:?}; known: organizations, members, invitations, audit_log, groups, service_accounts")]
    Unknown(String),
    #[error("the rebuild was stopped before its copies were swapped in; they were dropped and the read models are as they were")]
    Stopped,
    #[error("the rebuild was stopped before its copies were swapped in; the read models are as they were, but its copies could not all be dropped: the next rebuild, or `serve`, drops them once untouched for 2 minutes")]
    StoppedCopiesLeft,
}

/// Where a projection stands, for `projections status`, `/readyz` and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProjectionStatus {
    pub name: String,
    pub position: i64,
    pub commit_txid: i64,
    pub events_applied: i64,
    /// Events committed but not yet applied.
    pub backlog: u64,
    /// Age of the oldest event not yet applied.
    pub lag_seconds: f64,
    pub updated_at: Option<DateTime<Utc>>,
    pub failed_event: Option<String>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RebuildReport {
    pub projection: String,
    pub events: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    /// Where the seconds went: replaying the log into the copies, building their indexes,
    /// gathering their planner statistics, and swapping them in (with the tail written
    /// meanwhile).
    pub replay_seconds: f64,
    pub index_seconds: f64,
    pub analyze_seconds: f64,
    pub swap_seconds: f64,
}

/// Counters exported as metrics.
#[derive(Debug, Default, Clone)]
pub struct ProjectionCounters {
    pub events_applied: u64,
    /// Batches that applied events to it: events per batch is what a batch's fixed
    /// statements are shared by.
    pub batches_applied: u64,
    pub failures: u64,
}

pub struct Projector {
    database: Database,
    /// Where read-your-writes checks and status reads go: requests wait on them, and they
    /// must not take the runner's connections (see `Database::separate_pool`).
    requests: Database,
    feed: Arc<dyn EventFeed>,
    projections: Vec<Arc<dyn Projection>>,
    /// Bumped whenever events may have been committed.
    commits: watch::Sender<u64>,
    /// Bumped after every batch this process applies.
    progress: watch::Sender<u64>,
    counters: Mutex<HashMap<String, ProjectionCounters>>,
    leading: Mutex<HashSet<String>>,
    /// Versions this process's batches applied, by organization and projection: lets
    /// read-your-writes waits finish without asking the database.
    applied: Mutex<HashMap<String, HashMap<String, i64>>>,
    /// Asks the task that notifies other processes' runners (PostgreSQL), started by the
    /// first commit that needs it.
    notifier: OnceLock<watch::Sender<u64>>,
    /// Events in the current run of full live batches: a backlog being caught up.
    backlog_run: std::sync::atomic::AtomicUsize,
    /// True while the `ANALYZE` after a backlog runs: one at a time.
    analyzing: Arc<std::sync::atomic::AtomicBool>,
    /// Set by a live batch that applied a purge: the runner then drops the copies of
    /// rebuilds that died, which hold the purged organization's rows too.
    purged: std::sync::atomic::AtomicBool,
}

impl Projector {
    pub fn new(database: Database, feed: Arc<dyn EventFeed>) -> Self {
        Self {
            requests: database.clone(),
            database,
            feed,
            projections: all_projections(""),
            commits: watch::channel(0).0,
            progress: watch::channel(0).0,
            counters: Mutex::default(),
            leading: Mutex::default(),
            applied: Mutex::default(),
            notifier: OnceLock::new(),
            backlog_run: std::sync::atomic::AtomicUsize::new(0),
            analyzing: Arc::default(),
            purged: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Sends read-your-writes checks and status reads to `requests` instead of the
    /// runner's own database.
    pub fn with_request_pool(mut self, requests: Database) -> Self {
        self.requests = requests;
        self
    }

    pub fn database(&self) -> &Database {
        &self.database
    }

    /// Creates missing read-model tables and checkpoints. A read model stored in an older
    /// schema is rebuilt into new tables and swapped in before this returns: until the swap
    /// its old tables stay as they were, and this process serves nothing before it, instead
    /// of answers from half-replayed tables.
    pub async fn prepare(&self) -> Result<(), ProjectionError> {
        self.prepare_leaving(&[]).await
    }

    /// As [`Projector::prepare`], except that the read models of an older schema named in
    /// `to_rebuild` are left as they are: the caller rebuilds them next (`projections
    /// rebuild`), and rebuilding them here first would replay the log for them twice.
    pub async fn prepare_leaving(&self, to_rebuild: &[&str]) -> Result<(), ProjectionError> {
        // Processes starting together on one PostgreSQL database (`migrate` beside `serve`,
        // replicas) would create the same tables at once, which fails on the catalog's unique
        // index, `IF NOT EXISTS` or not: one prepares at a time, and the next finds the tables
        // made. The lock is held on a connection of its own, closed at the end.
        let turn = match &self.database {
            Database::Postgres(pool) => {
                let mut connection = pool.acquire().await?.detach();
                sqlx::query("SELECT pg_advisory_lock(hashtext($1)::bigint)")
                    .bind("orgledger.prepare")
                    .execute(&mut connection)
                    .await?;
                Some(connection)
            }
            Database::Sqlite(_) => None,
        };
        let prepared = self.prepare_in_turn(to_rebuild).await;
        if let Some(connection) = turn {
            // Closing ends the session, and the lock with it.
            drop(sqlx::Connection::close(connection).await);
        }
        prepared
    }

    async fn prepare_in_turn(&self, to_rebuild: &[&str]) -> Result<(), ProjectionError> {
        self.discard_abandoned_copies().await?;
        let stored: HashMap<String, i64> = crate::with_pool!(&self.database, pool => {
            sqlx::query_as("SELECT name, schema_version FROM projection_checkpoints")
                .fetch_all(pool)
                .await?
                .into_iter()
                .collect()
        });
        let mut outdated = Vec::new();
        for projection in &self.projections {
            let name = projection.name();
            let older = stored
                .get(name)
                .is_some_and(|stored| *stored < projection.schema_version());
            if !older {
                self.prepare_copy(projection.as_ref(), true).await?;
            } else if !to_rebuild.contains(&name) {
                outdated.push(name);
            }
        }
        if !outdated.is_empty() {
            tracing::warn!(
                projections = %outdated.join(","),
                "read-model schema changed: rebuilding into new tables before serving"
            );
            match self
                .rebuild_unless_stopped(&outdated, false, std::future::pending())
                .await
            {
                Ok(report) => tracing::info!(
                    projections = %report.projection,
                    events = report.events,
                    seconds = report.seconds,
                    "read models rebuilt in their new schema and swapped in"
                ),
                // An event the new schema cannot take would fail every start: the service
                // opens with those read models emptied and replayed in place instead, held
                // at that event and reporting it, as any failing projection is.
                Err(error) => {
                    tracing::error!(
                        projections = %outdated.join(","),
                        %error,
                        "rebuilding read models into their new schema failed: replaying them in place"
                    );
                    for projection in &self.projections {
                        if outdated.contains(&projection.name()) {
                            self.empty(projection.as_ref()).await?;
                            self.prepare_copy(projection.as_ref(), true).await?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Drops a projection's tables, checkpoint and versions: it starts again from the first
    /// event.
    async fn empty(&self, projection: &dyn Projection) -> Result<(), ProjectionError> {
        let mut tx = self.database.begin().await?;
        let mut conn = tx.conn();
        for (_, table) in projection.tables() {
            conn.execute(&format!("DROP TABLE IF EXISTS {table}"), &[])
                .await?;
        }
        let name = projection.name();
        conn.execute(
            "DELETE FROM projection_checkpoints WHERE name = $1",
            &args![name],
        )
        .await?;
        conn.execute(
            "DELETE FROM projected_versions WHERE projection = $1",
            &args![name],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Creates a copy's tables (and, with `indexed`, its secondary indexes) and checkpoint.
    /// Tables stored in an older schema are left as they are, for a rebuild's swap to
    /// replace: indexes of the new schema may name columns they lack.
    async fn prepare_copy(
        &self,
        projection: &dyn Projection,
        indexed: bool,
    ) -> Result<(), ProjectionError> {
        let mut tx = self.database.begin().await?;
        let mut conn = tx.conn();
        let name = projection.name();
        let version = projection.schema_version();
        let stored = conn
            .fetch_i64(
                "SELECT schema_version FROM projection_checkpoints WHERE name = $1",
                &args![name],
            )
            .await?;
        if stored.is_some_and(|stored| stored < version) {
            tx.rollback().await?;
            return Ok(());
        }
        let backend = conn.backend();
        conn.execute_script(&projection.create_tables(backend))
            .await?;
        if indexed {
            let indexes: Vec<String> = projection.indexes().iter().map(Index::create).collect();
            conn.execute_script(&indexes).await?;
        }
        // Created counts as moved: a copy just made is not mistaken for an abandoned one.
        conn.execute(
            "INSERT INTO projection_checkpoints (name, schema_version, updated_at_us)
             VALUES ($1, $2, $3)
             ON CONFLICT (name) DO NOTHING",
            &args![name, version, to_micros(Utc::now())],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Drops the copies of rebuilds that died (see [`ABANDONED_COPY_AFTER`]).
    async fn discard_abandoned_copies(&self) -> Result<(), ProjectionError> {
        let stale_before = to_micros(Utc::now()) - ABANDONED_COPY_AFTER.as_micros() as i64;
        let sql = format!(
            "SELECT name FROM projection_checkpoints
              WHERE name LIKE '%{}%' ESCAPE '!' AND updated_at_us < $1",
            COPY_MARK.replace('_', "!_")
        );
        let names: Vec<String> = crate::with_pool!(&self.database, pool => {
            sqlx::query_scalar(&sql)
                .bind(stale_before)
                .fetch_all(pool)
                .await?
        });
        for name in names {
            let copy = name
                .find(COPY_MARK)
                .and_then(|at| projection_named(&name[..at], &name[at..]));
            if let Some(copy) = copy {
                self.discard(copy.as_ref(), Some(stale_before)).await;
            }
        }
        Ok(())
    }

    /// Tells the runners in this process that events were committed.
    pub fn wake(&self) {
        self.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// This process committed events: wakes its own runner and, on PostgreSQL while the
    /// active runner is another process's, that one too, by a NOTIFY sent after the commit
    /// (see [`spawn_notifier`]).
    pub fn committed(&self) {
        self.wake();
        if !self.leading.lock().expect("leading poisoned").is_empty() {
            return;
        }
        if let Database::Postgres(pool) = &self.database {
            self.notifier
                .get_or_init(|| spawn_notifier(pool.clone()))
                .send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The projections whose active runner is in this process.
    pub fn leading(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .leading
            .lock()
            .expect("leading poisoned")
            .iter()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// The live projections applied by this process and their counters.
    pub fn counters(&self) -> HashMap<String, ProjectionCounters> {
        self.counters.lock().expect("counters poisoned").clone()
    }

    /// Applies one batch of `projection` alone; returns how many events it read.
    pub async fn run_batch(&self, projection: &dyn Projection) -> Result<usize, ProjectionError> {
        Ok(self
            .run_group(&[projection], BatchSource::Feed(LIVE_BATCH))
            .await?
            .0)
    }

    /// Applies the next batch to every projection of `group` in one transaction: the log is
    /// read and decoded once for all of them. Returns how many events were read and the
    /// group's furthest-behind checkpoint afterwards.
    async fn run_group(
        &self,
        group: &[&dyn Projection],
        source: BatchSource,
    ) -> Result<(usize, Checkpoint), ProjectionError> {
        if group.is_empty() {
            return Ok((0, Checkpoint::default()));
        }
        let live_tables = !matches!(source, BatchSource::ReadAhead { .. })
            && group.iter().all(|p| PROJECTION_NAMES.contains(&p.name()));
        let mut tx = self.database.begin().await?;
        match self.apply_batch(&mut tx, group, source).await {
            Ok(batch) if batch.read == 0 => {
                tx.rollback().await?;
                if live_tables {
                    self.track_backlog(0);
                }
                Ok((0, batch.lowest))
            }
            Ok(batch) => {
                tx.commit().await?;
                if live_tables {
                    self.track_backlog(batch.read);
                }
                // A rebuild's copies replace the live tables whole: only live batches.
                if live_tables && batch.purges {
                    self.erase_old_pages();
                    self.purged
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                // Only the live projections: a rebuild's copies must not become metric
                // labels or linger in the read-your-writes map.
                let live = |name: &String| PROJECTION_NAMES.contains(&name.as_str());
                {
                    let mut known = self.applied.lock().expect("applied poisoned");
                    for (name, versions) in batch.versions.iter().filter(|(name, _)| live(name)) {
                        for (organization, version) in versions {
                            known
                                .entry(organization.clone())
                                .or_default()
                                .insert(name.clone(), *version);
                        }
                    }
                }
                for (name, applied) in batch.applied.iter().filter(|(name, _)| live(name)) {
                    self.count(name, |c| {
                        c.events_applied += *applied as u64;
                        c.batches_applied += 1;
                    });
                }
                self.progress.send_modify(|n| *n = n.wrapping_add(1));
                Ok((batch.read, batch.lowest))
            }
            Err(error) => {
                drop(tx.rollback().await);
                match &error {
                    ProjectionError::Apply { projection, .. } => {
                        self.record_failure(projection, &error).await;
                    }
                    _ => {
                        for projection in group {
                            self.record_failure(projection.name(), &error).await;
                        }
                    }
                }
                Err(error)
            }
        }
    }

    /// Inside `tx`: lock the group's checkpoints, read the events past the furthest-behind
    /// one, give each projection the events past its own checkpoint and not yet applied to
    /// their organization, record the organizations' versions and move the checkpoints.
    async fn apply_batch(
        &self,
        tx: &mut Transaction,
        group: &[&dyn Projection],
        source: BatchSource,
    ) -> Result<GroupBatch, ProjectionError> {
        let mut conn = tx.conn();
        let names: Vec<&str> = group.iter().map(|projection| projection.name()).collect();
        // Events already in hand: PostgreSQL reads their organizations' versions with the
        // lock, in one round trip.
        let in_hand = match &source {
            BatchSource::Feed(_) => None,
            BatchSource::ReadAhead { events, .. } | BatchSource::Prefetched { events, .. } => {
                Some(events.as_slice())
            }
        };
        let (checkpoints, mut known) = lock_checkpoints(&mut conn, &names, in_hand).await?;
        let after = checkpoints.values().copied().min().unwrap_or_default();
        let events = match source {
            BatchSource::Feed(limit) => self.feed.read_after(after, limit).await?,
            BatchSource::ReadAhead {
                after: read_from,
                events,
            } => {
                if read_from != after {
                    return Err(ProjectionError::ReadAhead {
                        read_from,
                        checkpoint: after,
                    });
                }
                events
            }
            BatchSource::Prefetched {
                after: read_from,
                events,
                limit,
            } => {
                if read_from == after {
                    events
                } else {
                    known = None;
                    self.feed.read_after(after, limit).await?
                }
            }
        };
        let Some(last) = events.last().map(|event| event.checkpoint) else {
            return Ok(GroupBatch {
                lowest: after,
                ..GroupBatch::default()
            });
        };
        let known = match known {
            Some(known) => known,
            None => projected_versions(&mut conn, &names, &events).await?,
        };
        // Every projection either reaches `last` or already stood past it.
        let mut batch = GroupBatch {
            read: events.len(),
            lowest: last,
            purges: events.iter().any(|event| {
                matches!(
                    event.event,
                    orgledger_domain::OrganizationEvent::OrganizationPurged(_)
                )
            }),
            ..GroupBatch::default()
        };
        let mut version_rows: Vec<(&str, &str, i64)> = Vec::new();
        for projection in group {
            let name = projection.name();
            let from = checkpoints.get(name).copied().unwrap_or_default();
            let past: Vec<&RecordedEvent> = events
                .iter()
                .filter(|event| event.checkpoint > from)
                .collect();
            // A projection ahead of the batch has nothing in it; its checkpoint stays put.
            if past.is_empty() {
                continue;
            }
            let mut versions: BatchMap<&str, i64> = BatchMap::default();
            let mut to_apply = Vec::with_capacity(past.len());
            for event in past.iter().copied() {
                let organization = event.organization_id.as_str();
                let applied = *versions.entry(organization).or_insert_with(|| {
                    known
                        .get(name)
                        .and_then(|versions| versions.get(organization))
                        .copied()
                        .unwrap_or(0)
                });
                if event.sequence > applied {
                    to_apply.push(event);
                    versions.insert(organization, event.sequence);
                } else {
                    tracing::warn!(projection = name, event = %event.describe(), "already applied; skipped");
                }
            }
            projection
                .apply_all(&mut conn, &to_apply)
                .await
                .map_err(|(index, error)| {
                    // A connection lost, a statement cancelled or the database busy says
                    // nothing of the event it was applying: the batch failed, not the event.
                    if crate::db::is_about_the_connection(&error) {
                        return ProjectionError::Database(error);
                    }
                    ProjectionError::Apply {
                        projection: name.to_owned(),
                        event: to_apply
                            .get(index)
                            .map_or_else(String::new, |event| event.describe()),
                        error,
                    }
                })?;
            version_rows.extend(
                versions
                    .iter()
                    .map(|(organization, version)| (name, *organization, *version)),
            );
            batch.applied.push((name.to_owned(), past.len()));
            batch.versions.push((
                name.to_owned(),
                versions
                    .into_iter()
                    .map(|(organization, version)| (organization.to_owned(), version))
                    .collect(),
            ));
        }
        record_versions_and_move_checkpoints(&mut conn, &version_rows, last, &batch.applied)
            .await?;
        Ok(batch)
    }

    /// SQLite, once a batch deleted a purged organization's rows: their old page images,
    /// personal data in clear, remain in the write-ahead log until it is overwritten (the
    /// file's own pages are zeroed by `secure_delete`). A checkpoint that truncates the log
    /// drops them. In the background, as it waits for readers; best effort: a busy log is
    /// truncated at a later purge, or when the last connection closes. PostgreSQL keeps dead
    /// rows until vacuum reuses their space.
    fn erase_old_pages(&self) {
        let Database::Sqlite(pool) = &self.database else {
            return;
        };
        let pool = pool.clone();
        tokio::spawn(async move {
            let checkpoint =
                sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
                    .fetch_one(&pool)
                    .await;
            match checkpoint {
                Ok((0, _, _)) => {}
                Ok(_) => {
                    tracing::info!("the write-ahead log was busy after a purge: truncated later")
                }
                Err(error) => {
                    tracing::warn!(%error, "could not checkpoint the write-ahead log after a purge")
                }
            }
        });
    }

    /// Counts a live batch of `read` events into the current run of full batches. When a
    /// run of at least [`BACKLOG_ANALYZE_EVENTS`] ends (the backlog is caught up), every live
    /// table is analyzed beside the runner (PostgreSQL), one such `ANALYZE` at a time: after
    /// a bulk import or a start-up replay into a new read-model schema, their planner
    /// statistics would lag until autovacuum's next visit, and the planner would take a
    /// large organization for a few rows (see `analyze_copies`). Steady traffic rarely fills
    /// a batch, so this seldom repeats autovacuum's work.
    fn track_backlog(&self, read: usize) {
        use std::sync::atomic::Ordering;
        if read >= LIVE_BATCH {
            self.backlog_run.fetch_add(read, Ordering::Relaxed);
            return;
        }
        let run = self.backlog_run.swap(0, Ordering::Relaxed) + read;
        let Database::Postgres(pool) = &self.requests else {
            return;
        };
        if run < BACKLOG_ANALYZE_EVENTS || self.analyzing.swap(true, Ordering::AcqRel) {
            return;
        }
        let statement = analyze_statement(self.projections.iter().map(AsRef::as_ref));
        let pool = pool.clone();
        let analyzing = self.analyzing.clone();
        tokio::spawn(async move {
            match sqlx::query(&statement).execute(&pool).await {
                Ok(_) => tracing::info!(events = run, "backlog caught up; read models analyzed"),
                Err(error) => tracing::warn!(%error, "read models not analyzed after a backlog"),
            }
            analyzing.store(false, Ordering::Release);
        });
    }

    /// Whether the `ANALYZE` that follows a caught-up backlog is running.
    pub fn analyzing(&self) -> bool {
        self.analyzing.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn record_failure(&self, name: &str, error: &ProjectionError) {
        // A rebuild's copies stay out of the metrics, as in `run_group`.
        if PROJECTION_NAMES.contains(&name) {
            self.count(name, |c| c.failures += 1);
        }
        let event = match error {
            ProjectionError::Apply { event, .. } => Some(event.clone()),
            _ => None,
        };
        tracing::error!(projection = name, failed_event = event.as_deref(), %error, "projection stopped on an error; it will retry and never skip the event");
        let recorded = with_failure_args(&self.database, name, event, error.to_string()).await;
        if let Err(record_error) = recorded {
            tracing::error!(projection = name, %record_error, "could not record the failure");
        }
    }

    fn count(&self, name: &str, change: impl FnOnce(&mut ProjectionCounters)) {
        let mut counters = self.counters.lock().expect("counters poisoned");
        change(counters.entry(name.to_owned()).or_default());
    }

    /// One pass: applies every live projection, together, until a batch finds nothing to
    /// read. Events held back behind a transaction still in flight wait for a later pass.
    pub async fn apply_available(&self) -> Result<usize, ProjectionError> {
        let group: Vec<&dyn Projection> = self.projections.iter().map(AsRef::as_ref).collect();
        let mut total = 0;
        loop {
            let (applied, _) = self
                .run_group(&group, BatchSource::Feed(LIVE_BATCH))
                .await?;
            total += applied;
            if applied == 0 {
                return Ok(total);
            }
        }
    }

    /// Applies every live projection until each has applied every committed event. On
    /// PostgreSQL an in-flight write in this database can briefly hold events back, so
    /// an empty batch is not enough: the backlog must be zero.
    pub async fn catch_up(&self) -> Result<usize, ProjectionError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut total = 0;
        loop {
            total += self.apply_available().await?;
            let statuses = self.status().await?;
            if statuses.iter().all(|status| status.backlog == 0) {
                return Ok(total);
            }
            if Instant::now() >= deadline {
                return Err(ProjectionError::Stalled(format!("{statuses:?}")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts the projection runner (and, on PostgreSQL, a LISTEN task); they stop when
    /// `shutdown` turns true.
    pub fn spawn(self: &Arc<Self>, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        if let Database::Postgres(pool) = &self.database {
            let projector = self.clone();
            let pool = pool.clone();
            let shutdown = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                projector.listen(pool, shutdown).await;
            }));
        }
        let projector = self.clone();
        tasks.push(tokio::spawn(async move {
            projector.run_projections(shutdown).await;
        }));
        tasks
    }

    /// Forwards PostgreSQL notifications of new events to this process's runner.
    async fn listen(&self, pool: sqlx::PgPool, mut shutdown: watch::Receiver<bool>) {
        loop {
            let listener = async {
                let mut listener = sqlx::postgres::PgListener::connect_with(&pool).await?;
                listener.listen(NOTIFY_CHANNEL).await?;
                loop {
                    listener.recv().await?;
                    self.wake();
                }
                #[allow(unreachable_code)]
                Ok::<(), sqlx::Error>(())
            };
            tokio::select! {
                result = listener => {
                    if let Err(error) = result {
                        tracing::warn!(%error, "event notifications lost; polling until reconnected");
                    }
                }
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// The runner: applies every live projection in shared batches. A projection that fails
    /// is left out of the batches, with a growing backoff, and tried again from its own
    /// checkpoint; the others carry on meanwhile.
    async fn run_projections(&self, mut shutdown: watch::Receiver<bool>) {
        loop {
            // One active runner across processes: the holder of the advisory lock. The lock
            // dies with its session, so another process takes over.
            let leadership = match &self.database {
                Database::Postgres(pool) => loop {
                    if *shutdown.borrow() {
                        return;
                    }
                    match try_lead(pool).await {
                        Ok(Some(connection)) => break Some(Leadership::hold(connection)),
                        Ok(None) => {}
                        Err(error) => tracing::warn!(%error, "projector leader election failed"),
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = shutdown.changed() => return,
                    }
                },
                Database::Sqlite(_) => None,
            };
            // SQLite's single writer needs no lock, and it is never lost.
            let (_kept, never_lost) = watch::channel(false);
            let mut lost = leadership
                .as_ref()
                .map_or(never_lost, |held| held.lost.clone());
            if !self.lead(&mut shutdown, &mut lost).await {
                return;
            }
            tracing::warn!("the projection runner's lock was lost; electing again");
        }
    }

    /// Runs the projections while this process holds the lead: until `shutdown` (false), or
    /// until `lost` says the lock's session ended (true).
    async fn lead(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        lost: &mut watch::Receiver<bool>,
    ) -> bool {
        tracing::info!("projection runner active");
        self.leading
            .lock()
            .expect("leading poisoned")
            .extend(self.projections.iter().map(|p| p.name().to_owned()));
        // However the loop ends, a panic included, this process no longer leads: its commits
        // must then notify whichever process takes over.
        let _no_longer_leading = NoLongerLeading(&self.leading);
        let mut commits = self.commits.subscribe();
        // Failed projections: when to try again, and the backoff after that.
        let mut failing: HashMap<String, (Instant, Duration)> = HashMap::new();
        let mut backoff = Duration::from_millis(500);
        let mut held_back_wait = HELD_BACK_FIRST_LOOK;
        // Where the group's checkpoints stood after its last batch, and the group: the next
        // batch is read from there before any transaction is opened.
        let mut lowest: Option<(Vec<&str>, Checkpoint)> = None;
        let mut copies_checked = Instant::now();
        while !*shutdown.borrow() && !*lost.borrow() {
            let now = Instant::now();
            let purged = self
                .purged
                .swap(false, std::sync::atomic::Ordering::Relaxed);
            if purged || now >= copies_checked + COPY_CHECK {
                copies_checked = now;
                if let Err(error) = self.discard_abandoned_copies().await {
                    tracing::warn!(%error, "could not look for the copies of rebuilds that died");
                }
            }
            let group: Vec<&dyn Projection> = self
                .projections
                .iter()
                .map(AsRef::as_ref)
                .filter(|p| failing.get(p.name()).is_none_or(|(retry, _)| now >= *retry))
                .collect();
            let next_retry = failing.values().map(|(retry, _)| *retry).min();
            let names: Vec<&str> = group.iter().map(|projection| projection.name()).collect();
            if lowest.as_ref().is_some_and(|(of, _)| *of != names) {
                lowest = None;
            }
            let wait = match self.run_live_batch(&group, lowest.map(|(_, at)| at)).await {
                Ok((read, now_lowest)) => {
                    // An empty group (every projection failing) read nothing and stands nowhere.
                    lowest = (!group.is_empty()).then_some((names, now_lowest));
                    backoff = Duration::from_millis(500);
                    for projection in &group {
                        failing.remove(projection.name());
                    }
                    if read > 0 {
                        held_back_wait = HELD_BACK_FIRST_LOOK;
                        continue;
                    }
                    // Committed events a transaction in flight holds back (PostgreSQL): the
                    // wake-up for them is already spent, so look again in a moment, and less
                    // often while a long transaction in this database holds them.
                    let held_back = match &lowest {
                        Some((_, at)) => self
                            .feed
                            .has_events_after(*at)
                            .await
                            .map_err(ProjectionError::from),
                        None => self.has_unread_events(&group).await,
                    }
                    .unwrap_or(false);
                    if held_back {
                        let wait = held_back_wait;
                        held_back_wait = (held_back_wait * 2).min(HELD_BACK_LAST_LOOK);
                        wait
                    } else {
                        POLL
                    }
                }
                Err(ProjectionError::Apply { projection, .. }) => {
                    lowest = None;
                    let previous = failing.get(&projection).map(|(_, backoff)| *backoff);
                    let next = previous.map_or(Duration::from_millis(500), |b| {
                        (b * 2).min(Duration::from_secs(30))
                    });
                    failing.insert(projection, (Instant::now() + next, next));
                    continue;
                }
                Err(_) => {
                    lowest = None;
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    wait
                }
            };
            let wait = next_retry.map_or(wait, |retry| {
                wait.min(retry.saturating_duration_since(Instant::now()))
            });
            tokio::select! {
                _ = commits.changed() => {}
                () = tokio::time::sleep(wait) => {}
                // Asked to stop, or no one is left who could ask: either way, stop.
                _ = shutdown.changed() => return false,
                _ = lost.changed() => return true,
            }
        }
        *lost.borrow()
    }

    /// One batch of the live runner. Knowing where the group stood after its last batch, it
    /// reads first and opens no transaction when there is nothing to apply (many wake-ups
    /// find the events already applied by the batch before).
    async fn run_live_batch(
        &self,
        group: &[&dyn Projection],
        lowest: Option<Checkpoint>,
    ) -> Result<(usize, Checkpoint), ProjectionError> {
        let source = match lowest {
            Some(after) => {
                let events = self.feed.read_after(after, LIVE_BATCH).await?;
                if events.is_empty() {
                    // Caught up: a backlog of whole batches ends here.
                    self.track_backlog(0);
                    return Ok((0, after));
                }
                BatchSource::Prefetched {
                    after,
                    events,
                    limit: LIVE_BATCH,
                }
            }
            None => BatchSource::Feed(LIVE_BATCH),
        };
        self.run_group(group, source).await
    }

    /// True when committed events lie past the checkpoint of any projection of `group`.
    async fn has_unread_events(&self, group: &[&dyn Projection]) -> Result<bool, ProjectionError> {
        if group.is_empty() {
            return Ok(false);
        }
        let names: Vec<&str> = group.iter().map(|projection| projection.name()).collect();
        let sql = format!(
            "SELECT commit_txid, position FROM projection_checkpoints
              WHERE name IN ({}) ORDER BY commit_txid, position LIMIT 1",
            in_list(names.len(), 1)
        );
        let row: Option<(i64, i64)> = crate::with_pool!(&self.database, pool => {
            let query = sqlx::query_as::<_, (i64, i64)>(&sql);
            let query = names.iter().fold(query, |query, name| query.bind(*name));
            query.fetch_optional(pool).await?
        });
        let Some((commit_txid, position)) = row else {
            return Ok(false);
        };
        Ok(self
            .feed
            .has_events_after(Checkpoint {
                commit_txid,
                position,
            })
            .await?)
    }

    /// Waits until every projection has applied `organization_id` up to `version`; false when
    /// `timeout` passes first.
    pub async fn wait_for(
        &self,
        organization_id: &str,
        version: i64,
        timeout: Duration,
    ) -> Result<bool, ProjectionError> {
        let deadline = Instant::now() + timeout;
        let mut progress = self.progress.subscribe();
        let names = PROJECTION_NAMES
            .iter()
            .map(|name| format!("'{name}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT count(*) FROM projected_versions
              WHERE organization_id = $1 AND version >= $2 AND projection IN ({names})"
        );
        // When this process runs the projections its own batches report progress, and the
        // database is asked only as a fallback, every 50 ms; otherwise another process's
        // runner is seen through the database alone, asked at once and then after 5, 10, 20
        // and 40 ms and every 50 ms: a batch applies in a few milliseconds, and a fixed 50 ms
        // made every command of a process that does not lead wait about that long.
        let leads = !self.leading.lock().expect("leading poisoned").is_empty();
        let mut pause_between_checks = if leads {
            DATABASE_CHECK_EVERY
        } else {
            Duration::from_millis(5)
        };
        let mut next_database_check = if leads {
            Instant::now() + DATABASE_CHECK_EVERY
        } else {
            Instant::now()
        };
        loop {
            if self.applied_here(organization_id, version) {
                return Ok(true);
            }
            let now = Instant::now();
            // Runners in other processes are seen through the database, at most every 50 ms.
            if now >= next_database_check {
                let applied: i64 = crate::with_pool!(&self.requests, pool => {
                    sqlx::query_scalar(&sql)
                        .bind(organization_id)
                        .bind(version)
                        .fetch_one(pool)
                        .await?
                });
                if applied as usize >= PROJECTION_NAMES.len() {
                    return Ok(true);
                }
                next_database_check = now + pause_between_checks;
                pause_between_checks = (pause_between_checks * 2).min(DATABASE_CHECK_EVERY);
            }
            if now >= deadline {
                return Ok(false);
            }
            let pause = (deadline - now).min(next_database_check.saturating_duration_since(now));
            tokio::select! {
                _ = progress.changed() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// By organization (`only` one, or all), the furthest version any live read model has
    /// applied, as recorded in the database: a log that ends before it has lost events.
    pub async fn applied_versions(
        &self,
        only: Option<&str>,
    ) -> Result<HashMap<String, i64>, ProjectionError> {
        let sql = format!(
            "SELECT organization_id, max(version) FROM projected_versions
              WHERE projection IN ({}) {}
              GROUP BY organization_id",
            in_list(PROJECTION_NAMES.len(), 1),
            if only.is_some() {
                format!("AND organization_id = ${}", PROJECTION_NAMES.len() + 1)
            } else {
                String::new()
            }
        );
        let rows: Vec<(String, i64)> = crate::with_pool!(&self.requests, pool => {
            let query = sqlx::query_as(&sql);
            let query = PROJECTION_NAMES
                .iter()
                .fold(query, |query, name| query.bind(*name));
            match only {
                Some(organization_id) => query.bind(organization_id),
                None => query,
            }
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().collect())
    }

    /// True when this process's own batches applied the organization up to `version` in
    /// every projection.
    fn applied_here(&self, organization_id: &str, version: i64) -> bool {
        let applied = self.applied.lock().expect("applied poisoned");
        applied.get(organization_id).is_some_and(|by_projection| {
            PROJECTION_NAMES.iter().all(|name| {
                by_projection
                    .get(*name)
                    .is_some_and(|applied| *applied >= version)
            })
        })
    }

    /// Every live projection's position, backlog and last failure.
    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, ProjectionError> {
        let rows: Vec<CheckpointRow> = crate::with_pool!(&self.requests, pool => {
            sqlx::query_as(
                "SELECT name, commit_txid, position, events_applied, updated_at_us,
                        failed_event, last_error
                   FROM projection_checkpoints",
            )
            .fetch_all(pool)
            .await?
        });
        let mut statuses = Vec::new();
        for name in PROJECTION_NAMES {
            let row = rows.iter().find(|row| row.name == *name);
            let after = row.map_or(Checkpoint::default(), |row| Checkpoint {
                commit_txid: row.commit_txid,
                position: row.position,
            });
            let (backlog, oldest) = self.feed.backlog(after).await?;
            let lag_seconds = oldest.map_or(0.0, |at| {
                (Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
            });
            statuses.push(ProjectionStatus {
                name: (*name).to_owned(),
                position: after.position,
                commit_txid: after.commit_txid,
                events_applied: row.map_or(0, |row| row.events_applied),
                backlog,
                lag_seconds,
                updated_at: row
                    .filter(|row| row.updated_at_us > 0)
                    .map(|row| crate::from_micros(row.updated_at_us)),
                failed_event: row.and_then(|row| row.failed_event.clone()),
                last_error: row.and_then(|row| row.last_error.clone()),
            });
        }
        Ok(statuses)
    }

    /// Replays the whole log into fresh tables and swaps them in atomically; reads keep
    /// being served from the old tables until the swap commits.
    pub async fn rebuild(
        &self,
        name: &str,
        show_progress: bool,
    ) -> Result<RebuildReport, ProjectionError> {
        self.rebuild_unless_stopped(&[name], show_progress, std::future::pending())
            .await
    }

    /// Rebuilds every projection at once: one read of the log feeds every fresh copy; each
    /// copy is then swapped in by its own transaction.
    pub async fn rebuild_all(&self, show_progress: bool) -> Result<RebuildReport, ProjectionError> {
        self.rebuild_unless_stopped(PROJECTION_NAMES, show_progress, std::future::pending())
            .await
    }

    /// Rebuilds `names` together, unless `stop` resolves before their copies are swapped in:
    /// then the copies, which hold personal data in clear, are dropped at once (not left for
    /// [`ABANDONED_COPY_AFTER`]) and the live read models stay as they were
    /// ([`ProjectionError::Stopped`]). Once swapping has begun it finishes.
    pub async fn rebuild_unless_stopped(
        &self,
        names: &[&str],
        show_progress: bool,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<RebuildReport, ProjectionError> {
        let started = Instant::now();
        self.discard_abandoned_copies().await?;
        let suffix = format!("{COPY_MARK}{}", Utc::now().timestamp_micros());
        let mut copies = Vec::with_capacity(names.len());
        for name in names {
            let shadow = projection_named(name, &suffix)
                .ok_or_else(|| ProjectionError::Unknown((*name).to_owned()))?;
            let live = projection_named(name, "").expect("a known projection");
            copies.push((live, shadow));
        }
        for (live, shadow) in &copies {
            self.prepare_copy(live.as_ref(), true).await?;
            self.prepare_copy(shadow.as_ref(), false).await?;
        }
        let _alive = CopiesAlive::start(
            self.database.clone(),
            copies
                .iter()
                .map(|(_, shadow)| shadow.name().to_owned())
                .collect(),
        );

        self.feed.prepare_full_read().await?;
        let (total, _) = self.feed.backlog(Checkpoint::default()).await?;
        let bar = if show_progress {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:40}] {pos}/{len} events {per_sec} eta {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(format!("{}: replaying", names.join(", ")));
            // The stages after the replay move no count and can take as long as it: the
            // spinner and the stage's name say the work goes on.
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            indicatif::ProgressBar::hidden()
        };
        let shadows: Vec<&dyn Projection> =
            copies.iter().map(|(_, shadow)| shadow.as_ref()).collect();
        let mut events = 0_u64;
        // The next batch is read and decoded while this one is applied.
        let (ahead, mut batches) = tokio::sync::mpsc::channel(2);
        let feed = self.feed.clone();
        let reader = tokio::spawn(async move {
            let mut after = Checkpoint::default();
            loop {
                let read = feed.read_after(after, REBUILD_BATCH).await;
                let last = match &read {
                    Ok(events) => events.last().map(|event| event.checkpoint),
                    Err(_) => None,
                };
                let stop = last.is_none();
                if ahead
                    .send(read.map(|events| (after, events)))
                    .await
                    .is_err()
                    || stop
                {
                    return;
                }
                after = last.unwrap_or(after);
            }
        });
        let (mut replayed, mut indexed, mut analyzed) = (started, started, started);
        let copied = async {
            while let Some(read) = batches.recv().await {
                let (after, batch) = read?;
                let read = batch.len();
                if read == 0 {
                    break;
                }
                self.run_group(
                    &shadows,
                    BatchSource::ReadAhead {
                        after,
                        events: batch,
                    },
                )
                .await?;
                events += read as u64;
                bar.inc(read as u64);
            }
            let mut tx = self.database.begin().await?;
            for shadow in &shadows {
                shadow.replay_done(&mut tx.conn()).await?;
            }
            tx.commit().await?;
            replayed = Instant::now();
            let stage = |name: &str| bar.set_message(format!("{}: {name}", names.join(", ")));
            stage("building indexes");
            self.index_copies(shadows.iter().copied()).await?;
            indexed = Instant::now();
            stage("analyzing");
            self.analyze_copies(shadows.iter().copied()).await;
            analyzed = Instant::now();
            Ok::<(), ProjectionError>(())
        };
        let copied = tokio::select! {
            copied = copied => copied,
            () = stop => Err(ProjectionError::Stopped),
        };
        let result = async {
            copied?;
            bar.set_message(format!("{}: swapping in", names.join(", ")));
            let mut tail = 0;
            for (live, shadow) in &copies {
                tail = tail.max(self.swap(live.as_ref(), shadow.as_ref()).await?);
            }
            events += tail as u64;
            Ok::<(), ProjectionError>(())
        }
        .await;
        reader.abort();
        bar.finish_and_clear();
        if let Err(error) = result {
            // Stopped or failed: an index build beside the one that failed runs on too.
            self.cancel_statements_on_copies(&suffix).await;
            let mut dropped = true;
            for (_, shadow) in &copies {
                dropped &= self.discard(shadow.as_ref(), None).await;
            }
            return Err(match error {
                ProjectionError::Stopped if !dropped => ProjectionError::StoppedCopiesLeft,
                error => error,
            });
        }
        let finished = Instant::now();
        let seconds = (finished - started).as_secs_f64();
        Ok(RebuildReport {
            projection: names.join(","),
            events,
            seconds,
            events_per_second: events as f64 / seconds.max(1e-9),
            replay_seconds: (replayed - started).as_secs_f64(),
            index_seconds: (indexed - replayed).as_secs_f64(),
            analyze_seconds: (analyzed - indexed).as_secs_f64(),
            swap_seconds: (finished - analyzed).as_secs_f64(),
        })
    }

    /// In one transaction: apply the shadow's tail, replace the live tables with it, and take
    /// over its checkpoint and versions. Returns the tail's length.
    async fn swap(
        &self,
        live: &dyn Projection,
        shadow: &dyn Projection,
    ) -> Result<usize, ProjectionError> {
        let mut tx = self.database.begin().await?;
        {
            let mut conn = tx.conn();
            // The runner's connections commit asynchronously (see `Database::separate_pool`);
            // a swap the operator was told of must survive a server crash.
            if conn.backend() == Backend::Postgres {
                conn.execute("SET LOCAL synchronous_commit = on", &[])
                    .await?;
            }
            lock_checkpoints(&mut conn, &[live.name()], None).await?;
        }
        let mut tail = 0;
        loop {
            let batch = self
                .apply_batch(&mut tx, &[shadow], BatchSource::Feed(REBUILD_BATCH))
                .await?;
            tail += batch.read;
            if batch.read == 0 {
                break;
            }
        }
        let mut conn = tx.conn();
        for (live_table, shadow_table) in shadow.tables() {
            conn.execute(&format!("DROP TABLE IF EXISTS {live_table}"), &[])
                .await?;
            conn.execute(
                &format!("ALTER TABLE {shadow_table} RENAME TO {live_table}"),
                &[],
            )
            .await?;
        }
        // The live names go with the live tables, so the next start's `CREATE INDEX IF NOT
        // EXISTS` finds them instead of building duplicates.
        match conn.backend() {
            Backend::Postgres => {
                for (live_table, shadow_table) in shadow.tables() {
                    let sql = format!(
                        "ALTER INDEX IF EXISTS {shadow_table}_pkey RENAME TO {live_table}_pkey"
                    );
                    conn.execute(&sql, &[]).await?;
                }
                for (built, wanted) in shadow.indexes().iter().zip(live.indexes()) {
                    let sql = format!(
                        "ALTER INDEX IF EXISTS {} RENAME TO {}",
                        built.name(),
                        wanted.name()
                    );
                    conn.execute(&sql, &[]).await?;
                }
            }
            // SQLite cannot rename an index; its readers are not blocked by this writer, so
            // the indexes are built here, on the renamed tables.
            Backend::Sqlite => {
                let indexes: Vec<String> = live.indexes().iter().map(Index::create).collect();
                conn.execute_script(&indexes).await?;
            }
        }
        conn.execute(
            "UPDATE projection_checkpoints
                SET commit_txid = (SELECT commit_txid FROM projection_checkpoints WHERE name = $2),
                    position = (SELECT position FROM projection_checkpoints WHERE name = $2),
                    events_applied = (SELECT events_applied FROM projection_checkpoints WHERE name = $2),
                    updated_at_us = $3, failed_at_us = NULL, failed_event = NULL, last_error = NULL,
                    schema_version = $4
              WHERE name = $1",
            &args![
                live.name(),
                shadow.name(),
                to_micros(Utc::now()),
                live.schema_version()
            ],
        )
        .await?;
        conn.execute(
            "DELETE FROM projection_checkpoints WHERE name = $1",
            &args![shadow.name()],
        )
        .await?;
        conn.execute(
            "DELETE FROM projected_versions WHERE projection = $1",
            &args![live.name()],
        )
        .await?;
        conn.execute(
            "UPDATE projected_versions SET projection = $1 WHERE projection = $2",
            &args![live.name(), shadow.name()],
        )
        .await?;
        tx.commit().await?;
        self.progress.send_modify(|n| *n = n.wrapping_add(1));
        Ok(tail)
    }

    /// Builds the replayed copies' deferred indexes before their swap (PostgreSQL; SQLite
    /// builds them during the swap), so readers of the live tables are not held up by the
    /// build. Two at a time: a build's final merge and write-out run on one core, which the
    /// other build's sort can use.
    async fn index_copies<'a>(
        &self,
        shadows: impl Iterator<Item = &'a dyn Projection>,
    ) -> Result<(), ProjectionError> {
        use futures::{StreamExt, TryStreamExt};
        if let Database::Postgres(pool) = &self.database {
            let statements: Vec<String> = shadows
                .flat_map(|shadow| shadow.indexes())
                .map(|index| index.create())
                .collect();
            futures::stream::iter(statements)
                .map(|statement| async move { sqlx::query(&statement).execute(pool).await })
                .buffer_unordered(INDEX_BUILDS_AT_ONCE)
                .try_collect::<Vec<_>>()
                .await?;
        }
        Ok(())
    }

    /// A stopped or failed rebuild's statements still running on PostgreSQL, an index build
    /// above all: the futures dropped with the stop or the failure do not end them on the
    /// server, and the copies' `DROP TABLE` would wait for them. Cancelled: the client backends of this role whose
    /// statement names this rebuild's copies (`suffix` is its own). Another role's, or an
    /// autovacuum worker's, would make `pg_cancel_backend` fail the whole query. Best effort.
    async fn cancel_statements_on_copies(&self, suffix: &str) {
        let Database::Postgres(pool) = &self.database else {
            return;
        };
        let cancel = "SELECT count(*) FILTER (WHERE pg_cancel_backend(pid)) FROM pg_stat_activity
                       WHERE datname = current_database() AND pid <> pg_backend_pid()
                         AND usename = current_user AND backend_type = 'client backend'
                         AND state = 'active' AND strpos(query, $1) > 0";
        match sqlx::query_scalar::<_, i64>(cancel)
            .bind(suffix)
            .fetch_one(pool)
            .await
        {
            Ok(0) => {}
            Ok(cancelled) => tracing::info!(
                cancelled,
                "a stopped or failed rebuild's statements cancelled"
            ),
            Err(error) => {
                tracing::warn!(%error, "a stopped or failed rebuild's statements could not be cancelled");
            }
        }
    }

    /// Gathers the replayed copies' planner statistics before their swap (PostgreSQL). A
    /// fresh table has none until autovacuum gets to it, typically a minute or more later;
    /// meanwhile the planner takes a large organization's rows for a few and pages its
    /// members by sorting all of them (67 ms a page of 500 at 100,000 members, against
    /// 0.2 ms with statistics). Statistics belong to the table, so they survive its rename
    /// in the swap. They only speed reads up: a failure is logged, not worth the rebuild.
    async fn analyze_copies<'a>(&self, shadows: impl Iterator<Item = &'a dyn Projection>) {
        if let Database::Postgres(pool) = &self.database {
            if let Err(error) = sqlx::query(&analyze_statement(shadows)).execute(pool).await {
                tracing::warn!(%error, "rebuilt read models swapped in without planner statistics");
            }
        }
    }

    /// Drops a rebuild's copy: its tables, checkpoint and versions. With `untouched_since`,
    /// only if its checkpoint is still untouched since then, checked again in the
    /// transaction that drops it: a rebuild that touched it meanwhile keeps it. Whether it
    /// is gone.
    async fn discard(&self, shadow: &dyn Projection, untouched_since: Option<i64>) -> bool {
        let result = async {
            let mut tx = self.database.begin().await?;
            let mut conn = tx.conn();
            // Another session's lock on a copy must not hold a stopped rebuild (or the
            // runner's sweep) for good: past it, the copy is left to a later sweep. SQLite's
            // busy timeout bounds the same wait.
            if conn.backend() == Backend::Postgres {
                conn.execute(
                    &format!(
                        "SET LOCAL lock_timeout = '{}ms'",
                        DISCARD_LOCK_WAIT.as_millis()
                    ),
                    &[],
                )
                .await?;
            }
            let claimed = conn
                .execute(
                    "DELETE FROM projection_checkpoints WHERE name = $1 AND updated_at_us < $2",
                    &args![shadow.name(), untouched_since.unwrap_or(i64::MAX)],
                )
                .await?;
            if claimed == 0 && untouched_since.is_some() {
                return tx.rollback().await;
            }
            if untouched_since.is_some() {
                tracing::warn!(
                    copy = shadow.name(),
                    "dropping the copy of a rebuild that did not finish"
                );
            }
            for (_, table) in shadow.tables() {
                conn.execute(&format!("DROP TABLE IF EXISTS {table}"), &[])
                    .await?;
            }
            conn.execute(
                "DELETE FROM projected_versions WHERE projection = $1",
                &args![shadow.name()],
            )
            .await?;
            tx.commit().await
        }
        .await;
        match result {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(projection = shadow.name(), %error, "could not drop a rebuild's copy; it is dropped once untouched for 2 minutes");
                false
            }
        }
    }
}

/// Touches a live rebuild's copies every [`COPY_HEARTBEAT`] until dropped, so that no
/// process takes them for the copies of a rebuild that died, however long a step lasts.
struct CopiesAlive(JoinHandle<()>);

impl CopiesAlive {
    fn start(database: Database, names: Vec<String>) -> Self {
        Self(tokio::spawn(async move {
            // A row a batch or a swap holds is skipped, not waited for (waiting while holding
            // the others could deadlock with the batch): its holder moves it as it commits.
            let rows = match database.backend() {
                Backend::Postgres => format!(
                    "SELECT name FROM projection_checkpoints WHERE name IN ({})
                      ORDER BY name FOR UPDATE SKIP LOCKED",
                    in_list(names.len(), 1)
                ),
                Backend::Sqlite => in_list(names.len(), 1),
            };
            let sql = format!(
                "UPDATE projection_checkpoints SET updated_at_us = ${} WHERE name IN ({rows})",
                names.len() + 1,
            );
            loop {
                tokio::time::sleep(COPY_HEARTBEAT).await;
                let mut args: Vec<Arg> = names.iter().map(Arg::from).collect();
                args.push(Arg::from(to_micros(Utc::now())));
                if let Err(error) = database.execute(&sql, &args).await {
                    tracing::warn!(%error, "could not mark a rebuild's copies as alive; trying again");
                }
            }
        }))
    }
}

impl Drop for CopiesAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(sqlx::FromRow)]
struct CheckpointRow {
    name: String,
    commit_txid: i64,
    position: i64,
    events_applied: i64,
    updated_at_us: i64,
    failed_event: Option<String>,
    last_error: Option<String>,
}

async fn with_failure_args(
    database: &Database,
    name: &str,
    event: Option<String>,
    error: String,
) -> Result<(), sqlx::Error> {
    crate::with_pool!(database, pool => {
        sqlx::query(
            "UPDATE projection_checkpoints
                SET failed_at_us = $2, failed_event = $3, last_error = $4
              WHERE name = $1",
        )
        .bind(name)
        .bind(to_micros(Utc::now()))
        .bind(event)
        .bind(error)
        .execute(pool)
        .await?;
    });
    Ok(())
}

/// Empties the set of projections this process leads when dropped.
struct NoLongerLeading<'a>(&'a Mutex<HashSet<String>>);

impl Drop for NoLongerLeading<'_> {
    fn drop(&mut self) {
        // A poisoned lock still holds the set; clearing it is right either way.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

/// Sends `NOTIFY orgledger_events` each time it is asked, one at a time: asks made while one
/// is in flight are answered by the next. It runs after the append has committed, in a
/// transaction of its own, and never inside the append: PostgreSQL holds a cluster-wide lock
/// from a notifying transaction's pre-commit until its commit is flushed, which made every
/// append commit alone (no group commit). `pool` is the runner's, whose transactions commit
/// asynchronously, so this one holds that lock for no flush. The task ends with the sender.
/// Needs a Tokio runtime, as every caller of [`Projector::committed`] has.
fn spawn_notifier(pool: sqlx::PgPool) -> watch::Sender<u64> {
    let (asks, mut asked) = watch::channel(0u64);
    tokio::spawn(async move {
        while asked.changed().await.is_ok() {
            if let Err(error) = sqlx::query("SELECT pg_notify($1, '')")
                .bind(NOTIFY_CHANNEL)
                .execute(&pool)
                .await
            {
                tracing::warn!(%error, "could not notify the projection runner of new events; it polls every second");
            }
        }
    });
    asks
}

/// The projector's lock, held on a connection of its own while this process leads. A leader
/// that stops answering (stopped, hung, cut off) must not keep it for good: the server ends
/// the session once it has been idle for [`LEADER_IDLE_LIMIT`], lock and all, while a live
/// leader pings it every [`LEADER_PING`]. A failed ping says the lock is gone.
struct Leadership {
    lost: watch::Receiver<bool>,
    pinger: JoinHandle<()>,
}

impl Leadership {
    fn hold(mut connection: sqlx::PgConnection) -> Self {
        let (tell, lost) = watch::channel(false);
        let pinger = tokio::spawn(async move {
            let limit = format!(
                "SET idle_session_timeout = {}",
                LEADER_IDLE_LIMIT.as_millis()
            );
            if let Err(error) = sqlx::query(&limit).execute(&mut connection).await {
                tracing::warn!(%error, "the projector's lock may outlive a hung leader");
            }
            loop {
                tokio::time::sleep(LEADER_PING).await;
                let ping = sqlx::query("SELECT 1").execute(&mut connection);
                if !matches!(tokio::time::timeout(LEADER_PING, ping).await, Ok(Ok(_))) {
                    tell.send_replace(true);
                    return;
                }
            }
        });
        Self { lost, pinger }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        // The task owns the connection: dropped with it, the session and the lock end.
        self.pinger.abort();
    }
}

/// Takes the projector's advisory lock on a connection of its own, held while it leads.
async fn try_lead(pool: &sqlx::PgPool) -> Result<Option<sqlx::PgConnection>, sqlx::Error> {
    let mut connection = pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1)::bigint)")
        .bind("orgledger.projector")
        .fetch_one(&mut *connection)
        .await?;
    // Detached, the connection closes when dropped, and the lock goes with it rather than
    // back into the pool.
    Ok(locked.then(|| connection.detach()))
}

/// Where a batch's events come from.
enum BatchSource {
    /// Up to this many, read from the feed past the group's furthest-behind checkpoint.
    Feed(usize),
    /// Already read, by a rebuild reading ahead, past `after`.
    ReadAhead {
        after: Checkpoint,
        events: Vec<RecordedEvent>,
    },
    /// Already read by the live runner, before its transaction, past where the group's
    /// checkpoints stood after its last batch. If they moved since (another runner on the
    /// same SQLite file), this many are read again from where they stand now.
    Prefetched {
        after: Checkpoint,
        events: Vec<RecordedEvent>,
        limit: usize,
    },
}

/// What one batch did: events read, and per projection the events past its checkpoint and
/// the organizations' versions it reached.
#[derive(Default)]
struct GroupBatch {
    read: usize,
    /// The group's furthest-behind checkpoint once the batch commits.
    lowest: Checkpoint,
    /// Whether the batch holds a purge: its rows, personal data among them, are deleted.
    purges: bool,
    applied: Vec<(String, usize)>,
    versions: Vec<(String, HashMap<String, i64>)>,
}

/// Versions already applied, by projection and then organization.
type Versions = HashMap<String, HashMap<String, i64>>;

/// Locks the named checkpoints for the transaction and returns where each stands. PostgreSQL
/// locks the rows in name order, so two groups sharing a projection never deadlock; SQLite's
/// first write takes the database's one write lock.
///
/// On PostgreSQL, with `events` in hand, the same statement also reads their organizations'
/// versions (one round trip, not two). Those are read in the statement's snapshot, taken
/// before the lock was granted: they are returned only if no checkpoint row changed in
/// between (the locked row is the one the snapshot sees, by `xmin`), since every writer of
/// versions (a batch, a swap) updates its checkpoint row under the same lock, and the ones
/// that delete versions (a schema reset, a discarded copy) delete the row, which a batch then
/// finds missing. Otherwise, and without `events`, the versions are `None`: read them under
/// the lock.
async fn lock_checkpoints(
    conn: &mut Conn<'_>,
    names: &[&str],
    events: Option<&[RecordedEvent]>,
) -> Result<(HashMap<String, Checkpoint>, Option<Versions>), ProjectionError> {
    let list = in_list(names.len(), 1);
    // The plain read of the checkpoints, for when the versions are not read with them.
    let select = || {
        format!(
            "SELECT name, commit_txid, position FROM projection_checkpoints
              WHERE name IN ({list}) ORDER BY name"
        )
    };
    let args: Vec<Arg> = names.iter().map(|name| Arg::from(*name)).collect();
    let mut versions = None;
    let organizations = match (conn.backend(), events) {
        (Backend::Postgres, Some(events)) => organizations_of(events),
        _ => Vec::new(),
    };
    let rows: Vec<(String, i64, i64)> = match &mut *conn {
        Conn::Postgres(pg) if !organizations.is_empty() => {
            // Arrays, not a list of parameters: one shape whatever the batch's size, so the
            // connection prepares it once and the server plans it without a parse per size.
            let sql = "WITH locked AS MATERIALIZED (
                     SELECT name, commit_txid, position, xmin FROM projection_checkpoints
                      WHERE name = ANY($1::text[]) ORDER BY name FOR UPDATE)
                 SELECT name, NULL::text, commit_txid, position,
                        coalesce(xmin = (SELECT seen.xmin FROM projection_checkpoints seen
                                          WHERE seen.name = locked.name), false)
                   FROM locked
                 UNION ALL
                 SELECT projection, organization_id, version, 0, true FROM projected_versions
                  WHERE projection = ANY($1::text[]) AND organization_id = ANY($2::text[])";
            let mixed: Vec<(String, Option<String>, i64, i64, bool)> = sqlx::query_as(sql)
                .bind(names)
                .bind(&organizations)
                .fetch_all(&mut **pg)
                .await?;
            let mut checkpoints = Vec::with_capacity(names.len());
            let mut known = Versions::new();
            let mut unchanged = true;
            for (name, organization, first, second, current) in mixed {
                match organization {
                    None => {
                        unchanged &= current;
                        checkpoints.push((name, first, second));
                    }
                    Some(organization) => {
                        known.entry(name).or_default().insert(organization, first);
                    }
                }
            }
            versions = unchanged.then_some(known);
            checkpoints
        }
        Conn::Postgres(_) => {
            conn.fetch_all(&format!("{} FOR UPDATE", select()), &args)
                .await?
        }
        Conn::Sqlite(_) => {
            let lock =
                format!("UPDATE projection_checkpoints SET name = name WHERE name IN ({list})");
            conn.execute(&lock, &args).await?;
            conn.fetch_all(&select(), &args).await?
        }
    };
    if let Some(missing) = names
        .iter()
        .find(|name| !rows.iter().any(|(row, _, _)| row == *name))
    {
        return Err(ProjectionError::Unprepared((*missing).to_owned()));
    }
    let checkpoints = rows
        .into_iter()
        .map(|(name, commit_txid, position)| {
            (
                name,
                Checkpoint {
                    commit_txid,
                    position,
                },
            )
        })
        .collect();
    Ok((checkpoints, versions))
}

/// One `ANALYZE` of every table of `projections` (PostgreSQL).
fn analyze_statement<'a>(projections: impl Iterator<Item = &'a dyn Projection>) -> String {
    let tables: Vec<String> = projections
        .flat_map(|projection| projection.tables())
        .map(|(_, table)| table)
        .collect();
    format!("ANALYZE {}", tables.join(", "))
}

/// The organizations of `events`, each once.
fn organizations_of(events: &[RecordedEvent]) -> Vec<&str> {
    events
        .iter()
        .map(|event| event.organization_id.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect()
}

/// The versions already applied, by projection and then organization (looked up per event
/// without allocating), for the organizations in `events`.
async fn projected_versions(
    conn: &mut Conn<'_>,
    names: &[&str],
    events: &[RecordedEvent],
) -> Result<Versions, sqlx::Error> {
    let organizations = organizations_of(events);
    let mut known = Versions::new();
    for chunk in organizations.chunks(MAX_ROWS_PER_STATEMENT) {
        let sql = format!(
            "SELECT projection, organization_id, version FROM projected_versions
              WHERE projection IN ({}) AND organization_id IN ({})",
            in_list(names.len(), 1),
            in_list(chunk.len(), names.len() + 1)
        );
        let args: Vec<Arg> = names
            .iter()
            .chain(chunk)
            .map(|text| Arg::from(*text))
            .collect();
        let rows: Vec<(String, String, i64)> = conn.fetch_all(&sql, &args).await?;
        for (projection, organization, version) in rows {
            known
                .entry(projection)
                .or_default()
                .insert(organization, version);
        }
    }
    Ok(known)
}

/// Upserts the `(projection, organization, version)` rows of a batch and moves the
/// checkpoints of the projections that took part in it to `to`, adding to each its count of
/// events passed. On PostgreSQL one statement of fixed shape does both.
async fn record_versions_and_move_checkpoints(
    conn: &mut Conn<'_>,
    rows: &[(&str, &str, i64)],
    to: Checkpoint,
    applied: &[(String, usize)],
) -> Result<(), sqlx::Error> {
    if applied.is_empty() {
        return record_versions(conn, rows).await;
    }
    let now = to_micros(Utc::now());
    if let Conn::Postgres(pg) = conn {
        // One array per column: the statement keeps one shape whatever the batch's size (a
        // list of parameters took a shape, a parse and a plan per size, and pushed the
        // connection's other statements out of its cache).
        let sql = "WITH recorded AS (
                 INSERT INTO projected_versions (projection, organization_id, version)
                 SELECT * FROM UNNEST($4::text[], $5::text[], $6::int8[])
                 ON CONFLICT (projection, organization_id) DO UPDATE SET version = excluded.version),
             moved (name, events) AS (SELECT * FROM UNNEST($7::text[], $8::int8[]))
             UPDATE projection_checkpoints
                SET commit_txid = $1, position = $2, events_applied = events_applied + moved.events,
                    updated_at_us = $3, failed_at_us = NULL, failed_event = NULL, last_error = NULL
               FROM moved
              WHERE projection_checkpoints.name = moved.name";
        let (projections, (organizations, versions)): (Vec<&str>, (Vec<&str>, Vec<i64>)) = rows
            .iter()
            .map(|(projection, organization, version)| (*projection, (*organization, *version)))
            .unzip();
        let (names, events): (Vec<&str>, Vec<i64>) = applied
            .iter()
            .map(|(name, events)| (name.as_str(), *events as i64))
            .unzip();
        sqlx::query(sql)
            .bind(to.commit_txid)
            .bind(to.position)
            .bind(now)
            .bind(projections)
            .bind(organizations)
            .bind(versions)
            .bind(names)
            .bind(events)
            .execute(&mut **pg)
            .await?;
        return Ok(());
    }
    record_versions(conn, rows).await?;
    let mut args = args![to.commit_txid, to.position, now].to_vec();
    for (name, events) in applied {
        args.extend(args![name, *events as i64]);
    }
    let sql = format!(
        "WITH moved (name, events) AS (VALUES {})
         UPDATE projection_checkpoints
            SET commit_txid = $1, position = $2, events_applied = events_applied + moved.events,
                updated_at_us = $3, failed_at_us = NULL, failed_event = NULL, last_error = NULL
           FROM moved
          WHERE projection_checkpoints.name = moved.name",
        value_rows(applied.len(), 2, 4)
    );
    conn.execute(&sql, &args).await?;
    Ok(())
}

/// Upserts `(projection, organization, version)` rows, many per statement.
async fn record_versions(
    conn: &mut Conn<'_>,
    rows: &[(&str, &str, i64)],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(MAX_ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO projected_versions (projection, organization_id, version) VALUES {}
             ON CONFLICT (projection, organization_id) DO UPDATE SET version = excluded.version",
            value_rows(chunk.len(), 3, 1)
        );
        let args: Vec<Arg> = chunk
            .iter()
            .flat_map(|(projection, organization, version)| {
                args![*projection, *organization, *version]
            })
            .collect();
        conn.execute(&sql, &args).await?;
    }
    Ok(())
}
