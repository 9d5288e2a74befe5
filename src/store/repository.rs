//! The organization event repository, with personal data sealed on the way in and opened on
//! the way out, and every read counted. It implements cqrs-es's `PersistedEventRepository`
//! over the postgres-es/sqlite-es table layout, in its own SQL: appends (see `append!`),
//! snapshots (sealed whole, as raw ciphertext, see `stored_snapshot`), and reads, which check
//! each event's MAC before anything is decided on it (see `read_events_after`), something
//! those crates' reads cannot do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use serde_json::Value;
use sqlx::Row;

use super::group_commit::{is_conflict, GroupCommit, GroupError, GroupStats};
use super::{
    open_personal_data, seal_personal_data, AuthenticatedEvent, Authenticity, DataKey, DataKeys,
    Database, EventMacKey, StoreError,
};

/// Where a stored snapshot stands: its number and the sequence of its last event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotMarks {
    pub number: usize,
    pub last_sequence: usize,
}

/// What loading aggregates has read, for tests and metrics.
#[derive(Debug, Default)]
pub struct ReadStats {
    events: AtomicU64,
    snapshots: AtomicU64,
    catch_ups: AtomicU64,
}

impl ReadStats {
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    pub fn snapshots(&self) -> u64 {
        self.snapshots.load(Ordering::Relaxed)
    }

    /// Reads of the events after a known version (a cached state or a snapshot caught up).
    pub fn catch_ups(&self) -> u64 {
        self.catch_ups.load(Ordering::Relaxed)
    }
}

/// A snapshot's state as read from the store.
pub enum SnapshotState {
    /// Its JSON.
    Opened(String),
    /// Sealed before snapshots named the event they stand at (2026-12-06): nothing says
    /// where it stands, so it is never used.
    Unbound,
    /// It does not open under its organization's key: altered, relabelled as standing
    /// elsewhere, or damaged. The events say what it said, so readers replay them instead;
    /// `verify` names it.
    Damaged(StoreError),
}

/// An aggregate's snapshot as stored, opened.
pub struct StoredSnapshot {
    pub state: SnapshotState,
    /// The sequence of the last event it includes.
    pub last_sequence: usize,
    /// Its number: a commit that replaces it must name the next one.
    pub number: usize,
}

/// The numbers only: the state is personal data.
impl std::fmt::Debug for StoredSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSnapshot")
            .field("last_sequence", &self.last_sequence)
            .field("number", &self.number)
            .finish_non_exhaustive()
    }
}

pub struct OrganizationRepository {
    database: Database,
    keys: DataKeys,
    stats: Arc<ReadStats>,
    /// PostgreSQL's appends without a snapshot.
    group_commit: Option<GroupCommit>,
    group_stats: Arc<GroupStats>,
}

enum AppendError {
    /// The snapshot moved since the organization was loaded.
    Conflict,
    /// The idempotency claim the events carry is no longer theirs (see [`FENCE_POSTGRES`]).
    ClaimTakenOver,
    Database(sqlx::Error),
}

/// The idempotency claim an append's events carry (its command's `Idempotency-Key`), if any.
fn claim_of(events: &[SerializedEvent]) -> Option<&str> {
    events
        .first()?
        .metadata
        .get(CLAIM_FIELD)
        .and_then(serde_json::Value::as_str)
}

/// The metadata field that names the idempotency claim of a command's events (the ledger
/// writes it; the claims' index in the migrations names it too).
pub const CLAIM_FIELD: &str = "idempotency_claim";

/// The fence of an append that carries an idempotency claim: in the append's transaction, the
/// claim must still be unanswered and its own. PostgreSQL holds a share lock on it until the
/// commit, so a retry taking the claim over (an UPDATE of the row) waits for the append and
/// then finds its events; one that took it first leaves this append nothing to store. SQLite
/// runs the append under its write lock (`BEGIN IMMEDIATE`), which serializes the same way.
const FENCE_POSTGRES: &str =
    "SELECT 1 FROM idempotency_keys WHERE claim_id = $1 AND status IS NULL FOR SHARE";
const FENCE_SQLITE: &str = "SELECT 1 FROM idempotency_keys WHERE claim_id = $1 AND status IS NULL";

impl From<sqlx::Error> for AppendError {
    fn from(error: sqlx::Error) -> Self {
        Self::Database(error)
    }
}

/// Most events one INSERT carries: 8 parameters each keeps a statement within SQLite's
/// 32,766 parameters (PostgreSQL allows 65,535).
const EVENTS_PER_STATEMENT: usize = 1_000;

/// The first byte of a snapshot state's plaintext when the rest is its JSON compressed by
/// LZ4 (block format, its length first). JSON text never starts with it: states sealed
/// before 2026-12-03 are their JSON as it is, and still open.
const LZ4_STATE: u8 = 1;

/// A snapshot's state, sealed: compressed, then encrypted. Ciphertext does not compress, so
/// the database's own compression cannot shrink it; a 100,000-member organization's JSON
/// is about 22 MB, and writing it was most of the cost of the command that stores it.
fn seal_state(key: &DataKey, state: &str, aad: &[u8]) -> Vec<u8> {
    let compressed = lz4_flex::compress_prepend_size(state.as_bytes());
    let mut plaintext = Vec::with_capacity(1 + compressed.len());
    plaintext.push(LZ4_STATE);
    plaintext.extend_from_slice(&compressed);
    key.encrypt(&plaintext, aad)
}

/// The JSON of a state sealed by [`seal_state`].
fn open_state(key: &DataKey, sealed: &[u8], aad: &[u8]) -> Result<String, StoreError> {
    let plaintext = key.decrypt(sealed, aad)?;
    let Some((&LZ4_STATE, compressed)) = plaintext.split_first() else {
        return Err(StoreError::Integrity(
            "snapshot state is not in the form this version seals".into(),
        ));
    };
    let json = lz4_flex::decompress_size_prepended(compressed)
        .map_err(|error| StoreError::Integrity(format!("snapshot state: {error}")))?;
    String::from_utf8(json).map_err(|_| StoreError::Integrity("snapshot state is not UTF-8".into()))
}

/// A snapshot's sealed state standing at `last_sequence`, opened off the runtime's workers
/// (opening and decompressing a large state is CPU work).
async fn open_sealed_state(
    key: DataKey,
    aggregate_id: &str,
    last_sequence: i64,
    sealed: Vec<u8>,
) -> Result<SnapshotState, StoreError> {
    let aad = snapshot_aad(aggregate_id, last_sequence);
    let before_binding = aggregate_id.as_bytes().to_vec();
    Ok(
        tokio::task::spawn_blocking(move || match open_state(&key, &sealed, &aad) {
            Ok(json) => SnapshotState::Opened(json),
            Err(_) if key.decrypt(&sealed, &before_binding).is_ok() => SnapshotState::Unbound,
            Err(error) => SnapshotState::Damaged(error),
        })
        .await?,
    )
}

/// A snapshot written before the state had a column of its own: the state sealed as a field
/// is, to its organization alone, inside the JSON `payload` (`{"sealed": ...}`). It is never
/// used, for the same reason as [`SnapshotState::Unbound`], but one that does not open is
/// damaged like any other. Opened off the runtime's workers.
async fn open_payload_state(
    key: DataKey,
    aggregate_id: &str,
    payload: String,
) -> Result<SnapshotState, StoreError> {
    let aad = aggregate_id.as_bytes().to_vec();
    Ok(tokio::task::spawn_blocking(move || {
        let payload: Option<Value> = serde_json::from_str(&payload).ok();
        match payload
            .as_ref()
            .and_then(|payload| payload.get("sealed")?.as_str())
        {
            Some(sealed) => match key.open_str(sealed, &aad) {
                Ok(_) => SnapshotState::Unbound,
                Err(error) => SnapshotState::Damaged(error.into()),
            },
            None => SnapshotState::Damaged(StoreError::Integrity(
                "snapshot payload holds no sealed state".into(),
            )),
        }
    })
    .await?)
}

/// What a snapshot's state is sealed to: its organization and the event it stands at, in
/// words no event's field is sealed to (those name the organization alone). A state moved to
/// another organization or event, or a field's ciphertext put in its place, does not open:
/// else a snapshot relabelled as standing further on would make loads skip the events
/// between.
fn snapshot_aad(aggregate_id: &str, last_sequence: i64) -> Vec<u8> {
    format!("orgledger snapshot\0{aggregate_id}\0{last_sequence}").into_bytes()
}

/// Appends a command's events and its snapshot in one transaction: the events in multi-row
/// INSERTs (postgres-es and sqlite-es send one statement per event), and a snapshot that
/// moved since the load rolls back the events too (postgres-es 0.5 commits them first).
macro_rules! append {
    ($pool:expr, $aggregate_type:expr, $aggregate_id:expr, $events:expr, $snapshot:expr,
     $claim:expr, $begin:expr, $fence:expr) => {
        async {
            let events: &[AuthenticatedEvent] = $events;
            // By range rather than by slice, so the statement borrows from `events` itself.
            let insert = |rows: std::ops::Range<usize>| {
                let mut insert = sqlx::QueryBuilder::new(
                    "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                         event_version, payload, metadata, mac) ",
                );
                insert.push_values(&events[rows], |mut row, authenticated| {
                    let event = &authenticated.event;
                    row.push_bind(event.aggregate_type.as_str())
                        .push_bind(event.aggregate_id.as_str())
                        .push_bind(event.sequence as i64)
                        .push_bind(event.event_type.as_str())
                        .push_bind(event.event_version.as_str())
                        .push_bind(&event.payload)
                        .push_bind(&event.metadata)
                        .push_bind(&authenticated.mac[..]);
                });
                insert
            };
            let snapshot = $snapshot;
            let claim: Option<&str> = $claim;
            if snapshot.is_none() && claim.is_none() && events.len() <= EVENTS_PER_STATEMENT {
                // One statement is atomic on its own: no BEGIN and COMMIT round trips.
                if !events.is_empty() {
                    insert(0..events.len()).build().execute($pool).await?;
                }
                return Ok(());
            }
            let mut tx = $pool.begin_with($begin).await?;
            if let Some(claim) = claim {
                let held = sqlx::query($fence)
                    .bind(claim)
                    .fetch_optional(&mut *tx)
                    .await?;
                if held.is_none() {
                    return Err(AppendError::ClaimTakenOver);
                }
            }
            for start in (0..events.len()).step_by(EVENTS_PER_STATEMENT) {
                let end = events.len().min(start + EVENTS_PER_STATEMENT);
                insert(start..end).build().execute(&mut *tx).await?;
            }
            let Some((state, number)) = snapshot else {
                tx.commit().await?;
                return Ok(());
            };
            let last_sequence = events.last().map_or(0, |last| last.event.sequence as i64);
            if number == 1 {
                sqlx::query(
                    "INSERT INTO snapshots
                            (aggregate_type, aggregate_id, last_sequence, current_snapshot, state)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind($aggregate_type)
                .bind($aggregate_id)
                .bind(last_sequence)
                .bind(number as i64)
                .bind(&state)
                .execute(&mut *tx)
                .await?;
            } else {
                let updated = sqlx::query(
                    "UPDATE snapshots
                        SET last_sequence = $3, current_snapshot = $4, state = $5, payload = NULL
                      WHERE aggregate_type = $1 AND aggregate_id = $2 AND current_snapshot = $6",
                )
                .bind($aggregate_type)
                .bind($aggregate_id)
                .bind(last_sequence)
                .bind(number as i64)
                .bind(&state)
                .bind(number as i64 - 1)
                .execute(&mut *tx)
                .await?;
                if updated.rows_affected() != 1 {
                    return Err(AppendError::Conflict);
                }
            }
            tx.commit().await?;
            Ok::<(), AppendError>(())
        }
        .await
    };
}

fn failure(error: impl Into<StoreError>) -> PersistenceError {
    PersistenceError::UnknownError(Box::new(error.into()))
}

impl OrganizationRepository {
    pub fn new(database: Database, keys: DataKeys) -> Self {
        let group_stats = Arc::<GroupStats>::default();
        let group_commit = match &database {
            Database::Postgres(pool) => Some(GroupCommit::new(pool.clone(), group_stats.clone())),
            Database::Sqlite(_) => None,
        };
        Self {
            database,
            keys,
            stats: Arc::default(),
            group_commit,
            group_stats,
        }
    }

    pub fn stats(&self) -> Arc<ReadStats> {
        self.stats.clone()
    }

    /// The group commits of this repository's appends (PostgreSQL).
    pub fn group_stats(&self) -> Arc<GroupStats> {
        self.group_stats.clone()
    }

    /// Opens the sealed fields of one aggregate's events; personal data of a purged
    /// organization reads as erased.
    async fn open_events(
        &self,
        aggregate_id: &str,
        mut events: Vec<SerializedEvent>,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.stats
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        if events.is_empty() {
            return Ok(events);
        }
        let key = self.keys.get(aggregate_id).await.map_err(failure)?;
        for event in &mut events {
            open_event(event, key.as_ref()).map_err(failure)?;
        }
        Ok(events)
    }

    /// The number of the organization's stored snapshot and the sequence it stands at,
    /// without reading its state: what a commit that crosses the next boundary must replace,
    /// and whether a past moment may start from it.
    pub async fn snapshot_marks(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<SnapshotMarks>, StoreError> {
        let marks: Option<(i64, i64)> = orgledger_projections::with_pool!(&self.database, pool => {
            sqlx::query_as(
                "SELECT current_snapshot, last_sequence FROM snapshots
                  WHERE aggregate_type = $1 AND aggregate_id = $2",
            )
            .bind(aggregate_type)
            .bind(aggregate_id)
            .fetch_optional(pool)
            .await?
        });
        Ok(marks.map(|(number, last_sequence)| SnapshotMarks {
            number: number as usize,
            last_sequence: last_sequence as usize,
        }))
    }

    async fn remove_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<(), StoreError> {
        match &self.database {
            Database::Postgres(pool) => {
                sqlx::query(
                    "DELETE FROM snapshots WHERE aggregate_type = $1 AND aggregate_id = $2",
                )
                .bind(aggregate_type)
                .bind(aggregate_id)
                .execute(pool)
                .await?;
            }
            Database::Sqlite(pool) => {
                sqlx::query(
                    "DELETE FROM snapshots WHERE aggregate_type = ?1 AND aggregate_id = ?2",
                )
                .bind(aggregate_type)
                .bind(aggregate_id)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Up to `limit` of an aggregate's events after `after_sequence`, in order, opened.
    pub async fn events_after(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: usize,
        limit: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.read_events_after(aggregate_type, aggregate_id, after_sequence, limit, true)
            .await
    }

    /// Events after `after_sequence`, opened. Without `check_macs` only for `verify`, which
    /// gives each event's MAC verdict rather than stopping at the first. With it, an event whose MAC does not
    /// match it (edited in place, moved from elsewhere), or that has none and was not listed
    /// as stored before MACs (written by hand, or by an older version still running after
    /// the upgrade, which the Upgrading section forbids), fails the read: nothing is decided
    /// on it. `verify` names every such event.
    pub async fn read_events_after(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: usize,
        limit: usize,
        check_macs: bool,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        // postgres-es and sqlite-es write the sequence into the SQL text: a new statement to
        // parse and cache for every command. Bound, it is prepared once per connection.
        const AFTER: &str = "SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type,
                                    e.event_version, e.payload, e.metadata, e.mac,
                                    (e.mac IS NULL AND EXISTS (
                                        SELECT 1 FROM events_before_macs listed
                                         WHERE listed.aggregate_type = e.aggregate_type
                                           AND listed.aggregate_id = e.aggregate_id
                                           AND listed.sequence = e.sequence))
                                        AS stored_before_macs
                               FROM events e
                              WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
                                AND e.sequence > $3
                              ORDER BY e.sequence
                              LIMIT $4";
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let macs = self.keys.event_macs();
        let events = orgledger_projections::with_pool!(&self.database, pool => {
            let rows = sqlx::query(AFTER)
                .bind(aggregate_type)
                .bind(aggregate_id)
                .bind(after_sequence as i64)
                .bind(limit)
                .fetch_all(pool)
                .await
                .map_err(failure)?;
            let mut events = Vec::with_capacity(rows.len());
            for row in &rows {
                let event = stored_event(row).map_err(failure)?;
                if check_macs {
                    let mac: Option<Vec<u8>> = row.try_get("mac").map_err(failure)?;
                    let listed: bool = row.try_get("stored_before_macs").map_err(failure)?;
                    check_mac(macs, &event, mac.as_deref(), listed).map_err(failure)?;
                }
                events.push(event);
            }
            events
        });
        self.open_events(aggregate_id, events).await
    }

    /// The MAC verdicts of up to `limit` of an aggregate's stored events after
    /// `after_sequence`, in order.
    pub async fn authenticity_after(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        after_sequence: usize,
        limit: usize,
    ) -> Result<Vec<MacCheck>, StoreError> {
        // As text: a payload that is not JSON is then a verdict to give, not a failed read.
        const PAGE: &str = "SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type,
                                   e.event_version, CAST(e.payload AS text) AS payload,
                                   CAST(e.metadata AS text) AS metadata, e.mac,
                                   listed.sequence IS NOT NULL AS stored_before_macs
                              FROM events e
                              LEFT JOIN events_before_macs listed
                                USING (aggregate_type, aggregate_id, sequence)
                             WHERE e.aggregate_type = $1 AND e.aggregate_id = $2
                               AND e.sequence > $3
                             ORDER BY e.sequence LIMIT $4";
        let rows: Vec<StoredRow> = orgledger_projections::with_pool!(&self.database, pool => {
            sqlx::query_as(PAGE)
                .bind(aggregate_type)
                .bind(aggregate_id)
                .bind(after_sequence as i64)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(pool)
                .await?
        });
        let macs = self.keys.event_macs();
        Ok(rows
            .into_iter()
            .map(|row| MacCheck {
                sequence: row.sequence as usize,
                stored_before_macs: row.stored_before_macs,
                authenticity: row.check(macs),
            })
            .collect())
    }

    /// Refuses a master key that matches none of a sample of the stored events' MACs (one
    /// altered event must not refuse the right key). A store without organization keys left
    /// to open (every organization purged, or a lost key file on SQLite) would otherwise take
    /// any key, and append events whose MACs no longer agree with the history's.
    pub async fn verify_master_key_against_events(&self) -> Result<(), StoreError> {
        // The latest events this version stored: a listed one's MAC may be anyone's (see the
        // trigger). Newest first, so a store upgraded with millions of listed events is not
        // walked through them at every start (both keys are an index or the rowid).
        const MARKED: &str = "SELECT aggregate_type, aggregate_id, sequence, event_type,
                                     event_version, CAST(payload AS text) AS payload,
                                     CAST(metadata AS text) AS metadata, mac
                                FROM events e
                               WHERE mac IS NOT NULL
                                 AND NOT EXISTS (
                                     SELECT 1 FROM events_before_macs listed
                                      WHERE listed.aggregate_type = e.aggregate_type
                                        AND listed.aggregate_id = e.aggregate_id
                                        AND listed.sequence = e.sequence)
                               ORDER BY NEWEST DESC
                               LIMIT 100";
        let macs = self.keys.event_macs();
        let marked: Vec<StoredRow> = match &self.database {
            Database::Postgres(pool) => {
                sqlx::query_as(&MARKED.replace("NEWEST", "position"))
                    .fetch_all(pool)
                    .await?
            }
            Database::Sqlite(pool) => {
                sqlx::query_as(&MARKED.replace("NEWEST", "rowid"))
                    .fetch_all(pool)
                    .await?
            }
        };
        if !marked.is_empty()
            && !marked
                .into_iter()
                .any(|row| row.check(macs) == Some(Authenticity::Authentic))
        {
            return Err(StoreError::Integrity(
                "the master key matches none of the stored events' MACs: \
                 ORGLEDGER_MASTER_KEY must be the key the events were stored with"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// Gives each event a version before MACs stored (listed in `events_before_macs` when
    /// the column was added) and that has none yet its MAC, as the event stands: once, on a
    /// store whose rows are trusted. Events whose payload or metadata is not JSON are left
    /// without (`verify` names them). `on_page` hears the running count of events marked.
    /// Refused when none of the events this version stored checks out under this master
    /// key: the marks would never match under the right one.
    pub async fn authenticate_legacy(
        &self,
        mut on_page: impl FnMut(u64),
    ) -> Result<MarkedEvents, StoreError> {
        const UNMARKED: &str = "SELECT e.aggregate_type, e.aggregate_id, e.sequence,
                                       e.event_type, e.event_version,
                                       CAST(e.payload AS text) AS payload,
                                       CAST(e.metadata AS text) AS metadata, e.mac
                                  FROM events_before_macs listed
                                  JOIN events e USING (aggregate_type, aggregate_id, sequence)
                                 WHERE e.mac IS NULL
                                   AND (listed.aggregate_type, listed.aggregate_id,
                                        listed.sequence) > ($1, $2, $3)
                                 ORDER BY listed.aggregate_type, listed.aggregate_id,
                                          listed.sequence
                                 LIMIT $4";
        // The trigger lets this one update through, for a listed event only: a MAC where
        // there was none, nothing else changed.
        const MARK: &str = "UPDATE events SET mac = $4
                             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3
                               AND mac IS NULL";
        const MARK_MANY: &str = "UPDATE events e SET mac = page.mac
                                   FROM UNNEST($1::text[], $2::text[], $3::bigint[],
                                               $4::bytea[])
                                        AS page (aggregate_type, aggregate_id, sequence, mac)
                                  WHERE e.aggregate_type = page.aggregate_type
                                    AND e.aggregate_id = page.aggregate_id
                                    AND e.sequence = page.sequence AND e.mac IS NULL";
        self.verify_master_key_against_events().await?;
        let macs = self.keys.event_macs();
        let mut done = MarkedEvents::default();
        let mut after = (String::new(), String::new(), 0_i64);
        loop {
            let rows: Vec<StoredRow> = orgledger_projections::with_pool!(&self.database, pool => {
                sqlx::query_as(UNMARKED)
                    .bind(&after.0)
                    .bind(&after.1)
                    .bind(after.2)
                    .bind(MARK_PAGE)
                    .fetch_all(pool)
                    .await?
            });
            let Some(last) = rows.last() else {
                return Ok(done);
            };
            after = (
                last.aggregate_type.clone(),
                last.aggregate_id.clone(),
                last.sequence,
            );
            let marks: Vec<AuthenticatedEvent> = rows
                .into_iter()
                .filter_map(|row| {
                    let event = row.into_event().map(|(event, _)| macs.authenticate(event));
                    if event.is_none() {
                        done.unreadable += 1;
                    }
                    event
                })
                .collect();
            done.marked += match &self.database {
                // One statement a page: a statement an event took 50 s for 200,000.
                Database::Postgres(pool) => {
                    let column = |field: fn(&SerializedEvent) -> &str| -> Vec<&str> {
                        marks.iter().map(|marked| field(&marked.event)).collect()
                    };
                    sqlx::query(MARK_MANY)
                        .bind(column(|event| &event.aggregate_type))
                        .bind(column(|event| &event.aggregate_id))
                        .bind(
                            marks
                                .iter()
                                .map(|marked| marked.event.sequence as i64)
                                .collect::<Vec<_>>(),
                        )
                        .bind(
                            marks
                                .iter()
                                .map(|marked| &marked.mac[..])
                                .collect::<Vec<_>>(),
                        )
                        .execute(pool)
                        .await?
                        .rows_affected()
                }
                Database::Sqlite(pool) => {
                    let mut tx = pool.begin().await?;
                    let mut marked = 0;
                    for AuthenticatedEvent { event, mac } in &marks {
                        marked += sqlx::query(MARK)
                            .bind(&event.aggregate_type)
                            .bind(&event.aggregate_id)
                            .bind(event.sequence as i64)
                            .bind(&mac[..])
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                    }
                    tx.commit().await?;
                    marked
                }
            };
            on_page(done.marked);
        }
    }

    /// A page of one organization's stored events after `after_sequence`, opened.
    pub async fn raw_page(
        &self,
        organization_id: &str,
        after_sequence: i64,
        limit: i64,
    ) -> Result<Vec<crate::history::RawEvent>, StoreError> {
        let rows: Vec<(SerializedEvent, chrono::DateTime<chrono::Utc>)> = match &self.database {
            Database::Postgres(pool) => sqlx::query(
                "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version,
                        payload, metadata, recorded_at
                   FROM events
                  WHERE aggregate_type = 'organization' AND aggregate_id = $1 AND sequence > $2
                  ORDER BY sequence LIMIT $3",
            )
            .bind(organization_id)
            .bind(after_sequence)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|row| Ok((pg_event(row)?, row.try_get("recorded_at")?)))
            .collect::<Result<_, sqlx::Error>>()?,
            Database::Sqlite(pool) => sqlx::query(
                "SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type,
                        e.event_version, e.payload, e.metadata, l.recorded_at
                   FROM events e
                   JOIN event_log l USING (aggregate_type, aggregate_id, sequence)
                  WHERE e.aggregate_type = 'organization' AND e.aggregate_id = $1
                    AND e.sequence > $2
                  ORDER BY e.sequence LIMIT $3",
            )
            .bind(organization_id)
            .bind(after_sequence)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|row| {
                let recorded: String = row.try_get("recorded_at")?;
                let at = chrono::DateTime::parse_from_rfc3339(&recorded)
                    .map(|at| at.with_timezone(&chrono::Utc))
                    .unwrap_or_default();
                Ok((sqlite_event(row)?, at))
            })
            .collect::<Result<_, sqlx::Error>>()?,
        };
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.keys.get(organization_id).await?;
        rows.into_iter()
            .map(|(mut event, recorded_at)| {
                open_event(&mut event, key.as_ref())?;
                Ok(crate::history::RawEvent {
                    sequence: event.sequence as i64,
                    event_type: event.event_type,
                    event_version: event.event_version,
                    payload: event.payload,
                    metadata: event.metadata,
                    recorded_at,
                })
            })
            .collect()
    }

    /// The sequences at which the aggregate has a snapshot this version can place, current
    /// or replaced by a later one, ascending.
    pub async fn snapshot_sequences(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Vec<usize>, StoreError> {
        const SEQUENCES: &str = "SELECT last_sequence FROM snapshots
               WHERE aggregate_type = $1 AND aggregate_id = $2 AND state IS NOT NULL
              UNION
              SELECT last_sequence FROM past_snapshots
               WHERE aggregate_type = $1 AND aggregate_id = $2
              ORDER BY 1";
        let sequences: Vec<i64> = orgledger_projections::with_pool!(&self.database, pool => {
            sqlx::query_scalar(SEQUENCES)
                .bind(aggregate_type)
                .bind(aggregate_id)
                .fetch_all(pool)
                .await?
        });
        sequences
            .into_iter()
            .map(|sequence| {
                usize::try_from(sequence)
                    .map_err(|_| StoreError::Integrity(format!("snapshot at event {sequence}")))
            })
            .collect()
    }

    /// The state of the aggregate's snapshot standing at `last_sequence`, current or past:
    /// `None` when there is none there, or the organization was purged.
    pub async fn snapshot_standing_at(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Option<SnapshotState>, StoreError> {
        const STATE: &str = "SELECT state FROM snapshots
               WHERE aggregate_type = $1 AND aggregate_id = $2 AND last_sequence = $3
                 AND state IS NOT NULL
              UNION ALL
              SELECT state FROM past_snapshots
               WHERE aggregate_type = $1 AND aggregate_id = $2 AND last_sequence = $3
              LIMIT 1";
        let stands_at = last_sequence as i64;
        let sealed: Option<Vec<u8>> = orgledger_projections::with_pool!(&self.database, pool => {
            sqlx::query_scalar(STATE)
                .bind(aggregate_type)
                .bind(aggregate_id)
                .bind(stands_at)
                .fetch_optional(pool)
                .await?
        });
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
        let Some(key) = self.keys.get(aggregate_id).await? else {
            return Ok(None);
        };
        open_sealed_state(key, aggregate_id, stands_at, sealed)
            .await
            .map(Some)
    }

    /// The aggregate's snapshot, opened: `None` when there is none, or when the organization
    /// was purged (its key is gone, so the snapshot is unreadable by design).
    pub async fn stored_snapshot(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<StoredSnapshot>, StoreError> {
        type Row = (i64, i64, Option<String>, Option<Vec<u8>>);
        // CAST rather than `::`: the one statement runs on both backends.
        const SNAPSHOT: &str =
            "SELECT last_sequence, current_snapshot, CAST(payload AS TEXT), state
               FROM snapshots WHERE aggregate_type = $1 AND aggregate_id = $2";
        let row: Option<Row> = orgledger_projections::with_pool!(&self.database, pool => {
            sqlx::query_as(SNAPSHOT)
                .bind(aggregate_type)
                .bind(aggregate_id)
                .fetch_optional(pool)
                .await?
        });
        let Some((last_sequence, number, payload, state)) = row else {
            return Ok(None);
        };
        self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
        let Some(key) = self.keys.get(aggregate_id).await? else {
            return Ok(None);
        };
        let damaged = |what: String| SnapshotState::Damaged(StoreError::Integrity(what));
        let stands_at = usize::try_from(last_sequence).unwrap_or_default();
        let state = match (state, payload) {
            _ if last_sequence < 0 => damaged(format!("snapshot at event {last_sequence}")),
            (Some(sealed), _) => {
                open_sealed_state(key, aggregate_id, last_sequence, sealed).await?
            }
            (None, Some(payload)) => open_payload_state(key, aggregate_id, payload).await?,
            (None, None) => damaged("snapshot without a state".into()),
        };
        Ok(Some(StoredSnapshot {
            state,
            last_sequence: stands_at,
            number: number as usize,
        }))
    }

    /// Appends `events` and, with `snapshot` (its number and the state's JSON), replaces the
    /// aggregate's snapshot, in one transaction: personal data is sealed on the way in, and
    /// the state whole, as ciphertext. A sequence or snapshot number taken since the load
    /// fails with `OptimisticLockError` and stores nothing.
    pub async fn append(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        events: &[SerializedEvent],
        snapshot: Option<(usize, String)>,
    ) -> Result<(), PersistenceError> {
        if events.is_empty() && snapshot.is_none() {
            return Ok(());
        }
        let is_new = events.first().is_some_and(|event| event.sequence == 1);
        let key = if is_new {
            self.keys
                .get_or_create(aggregate_id)
                .await
                .map_err(failure)?
        } else {
            self.keys
                .get(aggregate_id)
                .await
                .map_err(failure)?
                .ok_or_else(|| {
                    failure(StoreError::Integrity(format!(
                        "the data key of {aggregate_id} is destroyed: it was purged"
                    )))
                })?
        };
        let aad = aggregate_id.as_bytes();
        let stands_at = events.last().map_or(0, |last| last.sequence as i64);
        let macs = self.keys.event_macs();
        let sealed_events: Vec<AuthenticatedEvent> = events
            .iter()
            .cloned()
            .map(|mut event| {
                seal_personal_data(&mut event.payload, &key, aad);
                seal_personal_data(&mut event.metadata, &key, aad);
                macs.authenticate(event)
            })
            .collect();
        let sealed_snapshot = match snapshot {
            Some((number, state)) => {
                if number == 1 {
                    // This process knew of no snapshot, yet another may have written one
                    // since (its number unknown here): it is replaced, not conflicted with.
                    self.remove_snapshot(aggregate_type, aggregate_id)
                        .await
                        .map_err(failure)?;
                }
                // Compressing and sealing a large state is CPU work: off the workers.
                let (key, aad) = (key.clone(), snapshot_aad(aggregate_id, stands_at));
                let sealed = tokio::task::spawn_blocking(move || seal_state(&key, &state, &aad))
                    .await
                    .map_err(|error| PersistenceError::UnknownError(Box::new(error)))?;
                Some((sealed, number))
            }
            None => None,
        };
        let claim = claim_of(events);
        if let Some(group) = &self.group_commit {
            if sealed_snapshot.is_none() && sealed_events.len() <= EVENTS_PER_STATEMENT {
                return group
                    .append(sealed_events, claim.map(str::to_owned))
                    .await
                    .map_err(|error| match error {
                        GroupError::Conflict => PersistenceError::OptimisticLockError,
                        GroupError::ClaimTakenOver => failure(StoreError::ClaimTakenOver),
                        GroupError::Database(error) => failure(StoreError::Shared(error)),
                    });
            }
        }
        let appended = match &self.database {
            Database::Postgres(pool) => append!(
                pool,
                aggregate_type,
                aggregate_id,
                &sealed_events,
                sealed_snapshot,
                claim,
                "BEGIN",
                FENCE_POSTGRES
            ),
            Database::Sqlite(pool) => append!(
                pool,
                aggregate_type,
                aggregate_id,
                &sealed_events,
                sealed_snapshot,
                claim,
                "BEGIN IMMEDIATE",
                FENCE_SQLITE
            ),
        };
        appended.map_err(|error| match error {
            AppendError::Conflict => PersistenceError::OptimisticLockError,
            AppendError::ClaimTakenOver => failure(StoreError::ClaimTakenOver),
            AppendError::Database(error) if is_conflict(&error) => {
                PersistenceError::OptimisticLockError
            }
            AppendError::Database(error) => failure(error),
        })
    }

    /// One page of an aggregate type's events in position order.
    async fn page_by_position(
        database: &Database,
        aggregate_type: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, SerializedEvent)>, StoreError> {
        let rows = match database {
            Database::Postgres(pool) => sqlx::query(
                "SELECT position, aggregate_type, aggregate_id, sequence, event_type,
                            event_version, payload, metadata
                       FROM events WHERE aggregate_type = $1 AND position > $2
                      ORDER BY position LIMIT $3",
            )
            .bind(aggregate_type)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|row| Ok((row.try_get("position")?, pg_event(row)?)))
            .collect::<Result<_, sqlx::Error>>()?,
            Database::Sqlite(pool) => sqlx::query(
                "SELECT l.position, e.aggregate_type, e.aggregate_id, e.sequence, e.event_type,
                            e.event_version, e.payload, e.metadata
                       FROM event_log l
                      CROSS JOIN events e
                         ON e.aggregate_type = l.aggregate_type
                        AND e.aggregate_id = l.aggregate_id AND e.sequence = l.sequence
                      WHERE +l.aggregate_type = ?1 AND l.position > ?2
                      ORDER BY l.position LIMIT ?3",
            )
            .bind(aggregate_type)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|row| Ok((row.try_get("position")?, sqlite_event(row)?)))
            .collect::<Result<_, sqlx::Error>>()?,
        };
        Ok(rows)
    }
}

/// One stored event's MAC, as `verify` reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacCheck {
    pub sequence: usize,
    /// `None` when its payload or metadata is not JSON: there is nothing to check.
    pub authenticity: Option<Authenticity>,
    /// Listed when MACs were added: a version before them stored it.
    pub stored_before_macs: bool,
}

/// Events `authenticate_legacy` gave a MAC, and those it could not (not JSON).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MarkedEvents {
    pub marked: u64,
    pub unreadable: u64,
}

/// Unmarked events given their MAC per transaction.
const MARK_PAGE: i64 = 1_000;

/// An event's row with its payload and metadata as text, and its MAC.
#[derive(sqlx::FromRow)]
struct StoredRow {
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: String,
    metadata: String,
    mac: Option<Vec<u8>>,
    /// Listed when MACs were added; selected only where it is asked.
    #[sqlx(default)]
    stored_before_macs: bool,
}

impl StoredRow {
    /// The event as stored and its MAC; `None` when its payload or metadata is not JSON.
    fn into_event(self) -> Option<(SerializedEvent, Option<Vec<u8>>)> {
        let event = SerializedEvent::new(
            self.aggregate_id,
            self.sequence as usize,
            self.aggregate_type,
            self.event_type,
            self.event_version,
            serde_json::from_str(&self.payload).ok()?,
            serde_json::from_str(&self.metadata).ok()?,
        );
        Some((event, self.mac))
    }

    /// What its MAC says of it; `None` when it is not JSON.
    fn check(self, macs: &EventMacKey) -> Option<Authenticity> {
        let (event, mac) = self.into_event()?;
        Some(macs.check(&event, mac.as_deref()))
    }
}

/// A stored event from its row, on either backend. Fallible rather than `get`'s panic: a
/// payload that is not JSON (on SQLite, text that someone wrote by hand) is an error to
/// report, not a crash.
fn stored_event<'r, R>(row: &'r R) -> Result<SerializedEvent, sqlx::Error>
where
    R: Row,
    &'r str: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Value: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(SerializedEvent::new(
        row.try_get("aggregate_id")?,
        row.try_get::<i64, _>("sequence")? as usize,
        row.try_get("aggregate_type")?,
        row.try_get("event_type")?,
        row.try_get("event_version")?,
        row.try_get("payload")?,
        row.try_get("metadata")?,
    ))
}

pub(crate) fn pg_event(row: &sqlx::postgres::PgRow) -> Result<SerializedEvent, sqlx::Error> {
    stored_event(row)
}

pub(crate) fn sqlite_event(row: &sqlx::sqlite::SqliteRow) -> Result<SerializedEvent, sqlx::Error> {
    stored_event(row)
}

/// What a load makes of an event's MAC (see [`OrganizationRepository::events_after`]).
fn check_mac(
    macs: &EventMacKey,
    event: &SerializedEvent,
    mac: Option<&[u8]>,
    stored_before_macs: bool,
) -> Result<(), StoreError> {
    match macs.check(event, mac) {
        Authenticity::Authentic => Ok(()),
        Authenticity::Unmarked if stored_before_macs => Ok(()),
        Authenticity::Unmarked => Err(StoreError::Integrity(format!(
            "event {} of organization {} carries no MAC and was not stored before MACs: it \
             was written without the master key (`orgledger verify` names every such event)",
            event.sequence, event.aggregate_id
        ))),
        Authenticity::Altered => Err(StoreError::Integrity(format!(
            "event {} of organization {} does not match its MAC: it was altered or moved \
             (`orgledger verify` names every such event)",
            event.sequence, event.aggregate_id
        ))),
    }
}

/// Opens one stored event in place.
pub fn open_event(event: &mut SerializedEvent, key: Option<&DataKey>) -> Result<(), StoreError> {
    let aad = event.aggregate_id.as_bytes().to_vec();
    open_personal_data(&mut event.payload, key, &aad)?;
    open_personal_data(&mut event.metadata, key, &aad)?;
    Ok(())
}

impl PersistedEventRepository for OrganizationRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.events_after(A::TYPE, aggregate_id, 0, usize::MAX)
            .await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.stats.catch_ups.fetch_add(1, Ordering::Relaxed);
        self.events_after(A::TYPE, aggregate_id, last_sequence, usize::MAX)
            .await
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        let Some(snapshot) = self
            .stored_snapshot(A::TYPE, aggregate_id)
            .await
            .map_err(failure)?
        else {
            return Ok(None);
        };
        let state = match snapshot.state {
            SnapshotState::Opened(state) => state,
            SnapshotState::Unbound => return Ok(None),
            SnapshotState::Damaged(error) => return Err(failure(error)),
        };
        Ok(Some(SerializedSnapshot {
            aggregate_id: aggregate_id.to_owned(),
            aggregate: serde_json::from_str(&state)
                .map_err(|error| PersistenceError::DeserializationError(Box::new(error)))?,
            current_sequence: snapshot.last_sequence,
            current_snapshot: snapshot.number,
        }))
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        let Some(aggregate_id) = events
            .first()
            .map(|event| event.aggregate_id.clone())
            .or_else(|| snapshot_update.as_ref().map(|(id, _, _)| id.clone()))
        else {
            return Ok(());
        };
        let snapshot = snapshot_update.map(|(_, state, number)| (number, state.to_string()));
        self.append(A::TYPE, &aggregate_id, events, snapshot).await
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        let events = self.get_events::<A>(aggregate_id).await?;
        let (mut feed, stream) = ReplayStream::new(events.len().max(1));
        for event in events {
            feed.push(Ok(event)).await?;
        }
        Ok(stream)
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        const PAGE: i64 = 500;
        let (mut feed, stream) = ReplayStream::new(PAGE as usize);
        let database = self.database.clone();
        let keys = self.keys.clone();
        tokio::spawn(async move {
            let mut after = 0;
            loop {
                let page = match Self::page_by_position(&database, A::TYPE, after, PAGE).await {
                    Ok(page) => page,
                    Err(error) => {
                        let _ = feed.push(Err(failure(error))).await;
                        return;
                    }
                };
                let done = (page.len() as i64) < PAGE;
                for (position, mut event) in page {
                    after = position;
                    let opened = match keys.get(&event.aggregate_id).await {
                        Ok(key) => open_event(&mut event, key.as_ref()).map(|()| event),
                        Err(error) => Err(error),
                    };
                    if feed.push(opened.map_err(failure)).await.is_err() {
                        return;
                    }
                }
                if done {
                    return;
                }
            }
        });
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members_json(count: usize) -> String {
        let members: serde_json::Map<String, Value> = (0..count)
            .map(|i| {
                (
                    format!("user-{i}"),
                    serde_json::json!({"email": format!("user-{i}@example.com"), "role": "member"}),
                )
            })
            .collect();
        serde_json::json!({ "members": members }).to_string()
    }

    #[test]
    fn a_sealed_state_is_compressed_and_opens_to_its_json() {
        let key = DataKey::generate();
        let json = members_json(1_000);
        let aad = snapshot_aad("org", 50);
        let sealed = seal_state(&key, &json, &aad);
        assert!(
            sealed.len() * 3 < json.len(),
            "{} bytes sealed for {} of JSON",
            sealed.len(),
            json.len()
        );
        assert!(!sealed.windows(11).any(|w| w == b"example.com"));
        assert_eq!(open_state(&key, &sealed, &aad).unwrap(), json);
    }

    #[test]
    fn a_state_opens_only_where_it_was_sealed() {
        let key = DataKey::generate();
        let json = members_json(3);
        let sealed = seal_state(&key, &json, &snapshot_aad("org", 50));
        for (elsewhere, aad) in [
            ("a later event", snapshot_aad("org", 51)),
            ("an earlier event", snapshot_aad("org", 5)),
            ("another organization", snapshot_aad("org2", 50)),
            ("a field of the organization", b"org".to_vec()),
        ] {
            assert!(open_state(&key, &sealed, &aad).is_err(), "{elsewhere}");
        }
        // Nor does a field's ciphertext open as a state, whatever it says.
        let field = key.encrypt(json.as_bytes(), b"org");
        assert!(open_state(&key, &field, &snapshot_aad("org", 50)).is_err());
        // The sequence is delimited: "org" at 15 is not "org1" at 5.
        assert_ne!(snapshot_aad("org", 15), snapshot_aad("org1", 5));
    }

    #[test]
    fn a_snapshot_prints_its_numbers_and_never_its_state() {
        let snapshot = StoredSnapshot {
            state: SnapshotState::Opened(
                r#"{"members":{"mia":{"email":"mia@example.com"}}}"#.into(),
            ),
            last_sequence: 50,
            number: 1,
        };
        let printed = format!("{snapshot:?}");
        assert!(printed.contains("last_sequence: 50"), "{printed}");
        assert!(!printed.contains("mia@example.com"), "{printed}");
    }
}
