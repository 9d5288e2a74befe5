//! The command path: load an organization (snapshot + newer events), decide, commit, retry on
//! optimistic-concurrency conflicts, and keep slug reservations and data keys in step.
//!
//! Loading and committing go through `OrganizationRepository` directly rather than cqrs-es's
//! `PersistedEventStore`, whose 0.5 snapshots can disagree with the events:
//! `CqrsFramework` applies new events through `EventSink` and the store applies them again,
//! and a snapshot taken mid-commit is stored with the commit's last sequence. Here a snapshot
//! is always the state after every event of the commit that crosses a multiple of the
//! organization's [`snapshot_interval`] (at least [`crate::store::SNAPSHOT_EVERY`]), so
//! loading it and the events after it equals a full replay.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use cqrs_es::persist::{
    EventUpcaster, PersistedEventRepository, PersistenceError, SerializedEvent,
};
use cqrs_es::{Aggregate, DomainEvent, EventEnvelope};
use orgledger_domain::{
    upcasters, Command, Lifecycle, Organization, OrganizationCommand, OrganizationError,
    OrganizationEvent, OrganizationKind, Slug, StateRules,
};
use rand::Rng;
use uuid::Uuid;

use crate::store::{
    snapshot_interval, DataKeys, Database, MacCheck, MarkedEvents, MasterKey,
    OrganizationRepository, ReadStats, SnapshotMarks, SnapshotState, StoreError, StoredSnapshot,
};
use crate::turns::Turns;

/// Attempts of one command before a persistent conflict is reported.
const MAX_ATTEMPTS: u32 = 10;
/// How long a slug reserved by an organization that has no events yet stays claimed: a
/// create in flight. Past it, the reservation is a crash's leftover and may be taken.
const RESERVATION_GRACE: chrono::Duration = chrono::Duration::seconds(60);

/// Where a command came from; recorded in every event's metadata.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub idempotency_key: Option<String>,
    /// The claim the command runs under (see `http::idempotency`), so that the log can tell
    /// whether a command whose response was lost was applied.
    pub idempotency_claim: Option<String>,
}

/// A command that was decided and, if it produced events, durably stored.
#[derive(Debug)]
pub struct Committed {
    pub organization_id: Uuid,
    /// The organization after the command (shared with the ledger's cache).
    pub state: Arc<Organization>,
    /// The last event sequence: the organization's version.
    pub version: usize,
    pub events: Vec<EventEnvelope<Organization>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Rejected(#[from] OrganizationError),
    #[error("the organization is at version {actual}, not {expected}")]
    VersionMismatch { expected: usize, actual: usize },
    #[error("the organization changed concurrently {MAX_ATTEMPTS} times in a row")]
    Contended,
    /// The request's idempotency claim was taken over by a retry before its events were
    /// stored: nothing was, and the retry runs the command.
    #[error("the request's Idempotency-Key was taken over by a retry")]
    ClaimTakenOver,
    #[error("event store failure: {0}")]
    Store(String),
    /// The database did not take a statement in time (see [`orgledger_projections::is_busy`]).
    /// It says nothing of statements before it: a keyed command's claim is settled from the
    /// log, as after any 5xx.
    #[error("the database is busy: {0}")]
    Busy(String),
}

impl From<StoreError> for LedgerError {
    fn from(error: StoreError) -> Self {
        if error.is_busy() {
            Self::Busy(error.to_string())
        } else {
            Self::Store(error.to_string())
        }
    }
}

fn store_failure(error: PersistenceError) -> LedgerError {
    if let PersistenceError::UnknownError(cause) | PersistenceError::ConnectionError(cause) = &error
    {
        if let Some(StoreError::ClaimTakenOver) = cause.downcast_ref::<StoreError>() {
            return LedgerError::ClaimTakenOver;
        }
        let busy = cause
            .downcast_ref::<StoreError>()
            .is_some_and(StoreError::is_busy)
            || cause
                .downcast_ref::<sqlx::Error>()
                .is_some_and(orgledger_projections::is_busy);
        if busy {
            return LedgerError::Busy(error.to_string());
        }
    }
    LedgerError::Store(error.to_string())
}

/// A snapshot's state from its JSON, off the runtime's workers: a large organization's
/// takes tens of milliseconds of CPU. A state derived under older rules is refused like an
/// unreadable one: the events are replayed and the next commit replaces the snapshot.
async fn parse_state(json: String) -> Result<Result<Organization, UnusableState>, LedgerError> {
    let parsed = tokio::task::spawn_blocking(move || {
        let state = serde_json::from_str::<Organization>(&json).map_err(UnusableState::Shape)?;
        if state.rules == StateRules::CURRENT {
            Ok(state)
        } else {
            Err(UnusableState::OlderRules(state.rules))
        }
    });
    Ok(parsed.await.map_err(StoreError::from)?)
}

/// A snapshot as a reader finds it.
pub enum SnapshotRead {
    Usable(Box<Organization>),
    /// There is none there, or it is not trusted: sealed before snapshots named their
    /// event, of a shape this version cannot read, derived under older rules, or its
    /// organization purged.
    Unused,
    /// It does not open (see [`SnapshotState::Damaged`]): why.
    Damaged(String),
}

/// Says that the snapshot standing at `sequence` did not open and is read around: an ERROR
/// line and `orgledger_snapshots_unopened_total`, wherever a reader meets one.
pub(crate) fn read_around(organization_id: Uuid, sequence: usize, error: &dyn std::fmt::Display) {
    tracing::error!(%organization_id, sequence, %error, "snapshot cannot be opened; read around it");
    metrics::counter!("orgledger_snapshots_unopened_total").increment(1);
}

/// Why a snapshot's state is not used.
enum UnusableState {
    /// A shape this version cannot read: unexpected.
    Shape(serde_json::Error),
    /// Derived under rules since changed: expected once after an upgrade.
    OlderRules(StateRules),
}

/// An organization as loaded: its state, version and the number of its snapshot. The state
/// is shared with the cache: a command clones it once, to apply its events to.
#[derive(Clone)]
struct Loaded {
    state: Arc<Organization>,
    version: usize,
    snapshot: Option<usize>,
    /// The stored snapshot could not be used (an older form or shape): the next commit
    /// replaces it, whatever the interval, so loads stop replaying every event.
    replace_snapshot: bool,
}

/// A stored snapshot that does not open: its number, the event its row says it stands at,
/// and why.
struct Unopened {
    number: usize,
    last_sequence: usize,
    error: StoreError,
}

impl Loaded {
    /// The state once `events` are applied to this one.
    fn after(&self, events: &[OrganizationEvent]) -> Arc<Organization> {
        let mut after = (*self.state).clone();
        for event in events {
            after.apply(event.clone());
        }
        Arc::new(after)
    }

    /// Nothing from stored snapshot `number`, which is not used: every event is replayed,
    /// and the next commit replaces it.
    fn replacing(number: usize) -> Self {
        Self {
            state: Arc::default(),
            version: 0,
            snapshot: Some(number),
            replace_snapshot: true,
        }
    }
}

/// The number of the snapshot that replaces stored snapshot `stored`. A number only tells
/// a replacement from a race; one the column cannot follow (a row set so from outside)
/// starts again at 1, which replaces whatever is stored (without keeping it for past
/// states) instead of failing every later snapshot write of its organization.
fn next_snapshot_number(stored: Option<usize>) -> usize {
    stored
        .and_then(|number| number.checked_add(1))
        .filter(|&next| i64::try_from(next).is_ok())
        .unwrap_or(1)
}

/// Organizations kept in memory after a load or commit.
const CACHED_ORGANIZATIONS: usize = 10_000;

/// Loaded organizations, most recently used kept. Only a command's first decision trusts an
/// entry as it is, because a stale one cannot commit (another process took the next
/// sequence, and the primary key refuses it) and is decided again on the latest state. Every
/// other load reads the events after the entry's version (one indexed query, usually empty),
/// so another process's commits are always seen.
#[derive(Default)]
struct AggregateCache {
    entries: HashMap<Uuid, (std::time::Instant, Loaded)>,
}

impl AggregateCache {
    fn get(&mut self, id: Uuid) -> Option<Loaded> {
        let entry = self.entries.get_mut(&id)?;
        entry.0 = std::time::Instant::now();
        Some(entry.1.clone())
    }

    /// Keeps the newer state: a read that loaded before a command stored must not put an
    /// older state back over the command's.
    fn put(&mut self, id: Uuid, loaded: Loaded) {
        if self
            .entries
            .get(&id)
            .is_some_and(|(_, cached)| cached.version > loaded.version)
        {
            return;
        }
        if self.entries.len() >= CACHED_ORGANIZATIONS && !self.entries.contains_key(&id) {
            // Drop the least recently used half: rare, and O(n) only then.
            let mut ages: Vec<_> = self
                .entries
                .iter()
                .map(|(id, (at, _))| (*at, *id))
                .collect();
            ages.sort();
            for (_, old) in ages.into_iter().take(CACHED_ORGANIZATIONS / 2) {
                self.entries.remove(&old);
            }
        }
        self.entries.insert(id, (std::time::Instant::now(), loaded));
    }
}

pub struct Ledger {
    database: Database,
    cache: std::sync::Mutex<AggregateCache>,
    repository: OrganizationRepository,
    upcasters: Vec<Box<dyn EventUpcaster>>,
    keys: DataKeys,
    stats: Arc<ReadStats>,
    turns: Turns,
}

impl Ledger {
    pub fn new(database: Database, master_key: MasterKey) -> Self {
        let keys = DataKeys::new(database.clone(), master_key);
        let repository = OrganizationRepository::new(database.clone(), keys.clone());
        let stats = repository.stats();
        Self {
            database,
            cache: std::sync::Mutex::default(),
            repository,
            upcasters: upcasters(),
            keys,
            stats,
            turns: Turns::default(),
        }
    }

    pub fn database(&self) -> &Database {
        &self.database
    }

    pub fn keys(&self) -> &DataKeys {
        &self.keys
    }

    pub fn read_stats(&self) -> Arc<ReadStats> {
        self.stats.clone()
    }

    /// The organization as it stands now, shared with the cache rather than copied.
    pub async fn current(&self, organization_id: Uuid) -> Result<Arc<Organization>, LedgerError> {
        Ok(self.load_latest(organization_id).await?.state)
    }

    /// The organization as it stands now, and its version.
    pub async fn load(&self, organization_id: Uuid) -> Result<(Organization, usize), LedgerError> {
        let loaded = self.load_latest(organization_id).await?;
        Ok((Arc::unwrap_or_clone(loaded.state), loaded.version))
    }

    /// The latest state: the cached one brought up to date, or the snapshot (if readable)
    /// plus every event after it.
    async fn load_latest(&self, organization_id: Uuid) -> Result<Loaded, LedgerError> {
        let cached = self.cached(organization_id);
        let cached_miss = cached.is_none();
        let mut loaded = match cached {
            Some(cached) => cached,
            None => self.load_from_snapshot(organization_id).await?,
        };
        let id = organization_id.to_string();
        let newer = if loaded.version == 0 {
            self.repository.get_events::<Organization>(&id).await
        } else {
            self.repository
                .get_last_events::<Organization>(&id, loaded.version)
                .await
        }
        .map_err(store_failure)?;
        let changed = cached_miss || !newer.is_empty();
        for stored in newer {
            let event = self.decode(stored)?;
            loaded.version = event.sequence;
            // Clones the state only if the cache shares it.
            Arc::make_mut(&mut loaded.state).apply(event.payload);
        }
        if changed && loaded.version > 0 {
            self.remember(organization_id, &loaded);
        }
        Ok(loaded)
    }

    /// The cached state as it is, without asking the store for newer events.
    fn cached(&self, organization_id: Uuid) -> Option<Loaded> {
        self.cache
            .lock()
            .expect("aggregate cache poisoned")
            .get(organization_id)
    }

    /// The latest state, with the number of the snapshot stored now (another process may
    /// have stored one since this process loaded the organization).
    async fn load_with_stored_snapshot_number(
        &self,
        organization_id: Uuid,
    ) -> Result<Loaded, LedgerError> {
        let mut loaded = self.load_latest(organization_id).await?;
        let stored = self
            .snapshot_marks(organization_id)
            .await?
            .map(|marks| marks.number);
        if loaded.snapshot != stored {
            loaded.snapshot = stored;
            self.remember(organization_id, &loaded);
        }
        Ok(loaded)
    }

    fn remember(&self, organization_id: Uuid, loaded: &Loaded) {
        self.cache
            .lock()
            .expect("aggregate cache poisoned")
            .put(organization_id, loaded.clone());
    }

    /// The snapshot if there is a readable one; the events after it are read by the caller.
    /// One that does not open is replayed around, loudly, rather than failing every command
    /// of its organization: the events it was derived from are checked one by one as they
    /// are read, and the next commit replaces it.
    async fn load_from_snapshot(&self, organization_id: Uuid) -> Result<Loaded, LedgerError> {
        Ok(match self.open_snapshot(organization_id).await? {
            Ok(loaded) => loaded,
            Err(Unopened {
                number,
                last_sequence,
                error,
            }) => {
                read_around(organization_id, last_sequence, &error);
                Loaded::replacing(number)
            }
        })
    }

    /// The stored snapshot, loaded, or where it stands and why it does not open.
    async fn open_snapshot(
        &self,
        organization_id: Uuid,
    ) -> Result<Result<Loaded, Unopened>, LedgerError> {
        let id = organization_id.to_string();
        let snapshot = self
            .repository
            .stored_snapshot(Organization::TYPE, &id)
            .await?;
        let ignored = Loaded::replacing;
        Ok(Ok(match snapshot {
            // Sealed before snapshots named their event: replay everything; the next
            // snapshot replaces it.
            Some(StoredSnapshot {
                state: SnapshotState::Unbound,
                number,
                ..
            }) => {
                tracing::info!(%organization_id, "snapshot sealed without its event ignored");
                ignored(number)
            }
            Some(StoredSnapshot {
                state: SnapshotState::Damaged(error),
                number,
                last_sequence,
            }) => {
                return Ok(Err(Unopened {
                    number,
                    last_sequence,
                    error,
                }))
            }
            Some(StoredSnapshot {
                state: SnapshotState::Opened(state),
                last_sequence,
                number,
            }) => match parse_state(state).await? {
                Ok(state) => Loaded {
                    state: Arc::new(state),
                    version: last_sequence,
                    snapshot: Some(number),
                    replace_snapshot: false,
                },
                // Replay everything; the next snapshot replaces it.
                Err(UnusableState::Shape(error)) => {
                    tracing::warn!(%organization_id, %error, "unreadable snapshot ignored");
                    ignored(number)
                }
                Err(UnusableState::OlderRules(rules)) => {
                    tracing::info!(%organization_id, rules = rules.0, "snapshot under older state rules ignored");
                    ignored(number)
                }
            },
            None => Loaded {
                state: Arc::default(),
                version: 0,
                snapshot: None,
                replace_snapshot: false,
            },
        }))
    }

    /// Upcasts a stored event to the current schema and deserializes it.
    fn decode(&self, stored: SerializedEvent) -> Result<EventEnvelope<Organization>, LedgerError> {
        crate::store::decode(&self.upcasters, stored).map_err(LedgerError::Store)
    }

    /// Every stored event of the organization, opened (personal data erased if purged).
    pub async fn events(
        &self,
        organization_id: Uuid,
    ) -> Result<Vec<EventEnvelope<Organization>>, LedgerError> {
        self.repository
            .get_events::<Organization>(&organization_id.to_string())
            .await
            .map_err(store_failure)?
            .into_iter()
            .map(|stored| self.decode(stored))
            .collect()
    }

    /// Up to `limit` of the organization's events after `after_sequence`, opened, upcast
    /// and decoded, in sequence order. An event whose MAC does not match it fails the read.
    pub async fn events_after(
        &self,
        organization_id: Uuid,
        after_sequence: usize,
        limit: usize,
    ) -> Result<Vec<EventEnvelope<Organization>>, LedgerError> {
        self.read_after(organization_id, after_sequence, limit, true)
            .await
    }

    /// As [`Ledger::events_after`], MACs unchecked: for `verify`, which gives each event's
    /// verdict.
    pub async fn events_after_as_stored(
        &self,
        organization_id: Uuid,
        after_sequence: usize,
        limit: usize,
    ) -> Result<Vec<EventEnvelope<Organization>>, LedgerError> {
        self.read_after(organization_id, after_sequence, limit, false)
            .await
    }

    async fn read_after(
        &self,
        organization_id: Uuid,
        after_sequence: usize,
        limit: usize,
        check_macs: bool,
    ) -> Result<Vec<EventEnvelope<Organization>>, LedgerError> {
        self.repository
            .read_events_after(
                Organization::TYPE,
                &organization_id.to_string(),
                after_sequence,
                limit,
                check_macs,
            )
            .await
            .map_err(store_failure)?
            .into_iter()
            .map(|stored| self.decode(stored))
            .collect()
    }

    /// Where the stored snapshot stands, without reading its state.
    pub async fn snapshot_marks(
        &self,
        organization_id: Uuid,
    ) -> Result<Option<SnapshotMarks>, LedgerError> {
        Ok(self
            .repository
            .snapshot_marks(Organization::TYPE, &organization_id.to_string())
            .await?)
    }

    /// The stored snapshot's state and the sequence it stands at, when there is a readable
    /// one (none after a purge, nor of a state shape this version cannot read); an error
    /// when it does not open.
    pub async fn snapshot(
        &self,
        organization_id: Uuid,
    ) -> Result<Option<(Organization, usize)>, LedgerError> {
        let loaded = self
            .open_snapshot(organization_id)
            .await?
            .map_err(|unopened| unopened.error)?;
        Ok((loaded.version > 0).then(|| (Arc::unwrap_or_clone(loaded.state), loaded.version)))
    }

    /// The sequences at which the organization has a snapshot, current or past, ascending.
    pub async fn snapshot_sequences(
        &self,
        organization_id: Uuid,
    ) -> Result<Vec<usize>, LedgerError> {
        Ok(self
            .repository
            .snapshot_sequences(Organization::TYPE, &organization_id.to_string())
            .await?)
    }

    /// The snapshot standing at `sequence`, current or past.
    pub async fn snapshot_standing_at(
        &self,
        organization_id: Uuid,
        sequence: usize,
    ) -> Result<SnapshotRead, LedgerError> {
        let json = match self
            .repository
            .snapshot_standing_at(Organization::TYPE, &organization_id.to_string(), sequence)
            .await?
        {
            Some(SnapshotState::Opened(json)) => json,
            Some(SnapshotState::Damaged(error)) => {
                return Ok(SnapshotRead::Damaged(LedgerError::from(error).to_string()))
            }
            Some(SnapshotState::Unbound) | None => return Ok(SnapshotRead::Unused),
        };
        Ok(match parse_state(json).await? {
            Ok(state) => SnapshotRead::Usable(Box::new(state)),
            Err(UnusableState::Shape(error)) => {
                tracing::warn!(%organization_id, sequence, %error, "unreadable snapshot ignored");
                SnapshotRead::Unused
            }
            Err(UnusableState::OlderRules(_)) => SnapshotRead::Unused,
        })
    }

    /// Raw stored events after `after_sequence`, opened, in sequence order.
    pub async fn raw_events(
        &self,
        organization_id: Uuid,
        after_sequence: usize,
        limit: usize,
    ) -> Result<Vec<crate::history::RawEvent>, LedgerError> {
        self.repository
            .raw_page(
                &organization_id.to_string(),
                after_sequence as i64,
                limit as i64,
            )
            .await
            .map_err(LedgerError::from)
    }

    /// Appends `events` after `loaded`, with a snapshot of `after` (the state once they are
    /// applied) when the commit crosses a multiple of its [`snapshot_interval`]. A concurrent
    /// append of the same sequence fails with `OptimisticLockError` and nothing is stored.
    async fn commit(
        &self,
        organization_id: Uuid,
        loaded: &Loaded,
        after: &Arc<Organization>,
        events: Vec<OrganizationEvent>,
        metadata: &HashMap<String, String>,
        commands: Commands,
    ) -> Result<Vec<EventEnvelope<Organization>>, PersistenceError> {
        let id = organization_id.to_string();
        // Every event of the command but its last says the command goes on: a past state
        // asked for by sequence is never one caught inside a command.
        let count = events.len();
        let metadata_at = |offset: usize| {
            let mut metadata = metadata.clone();
            if commands == Commands::One && offset + 1 < count {
                metadata.insert(COMMAND_CONTINUES.to_owned(), "true".to_owned());
            }
            metadata
        };
        let mut stored = Vec::with_capacity(events.len());
        for (offset, event) in events.iter().enumerate() {
            stored.push(SerializedEvent::new(
                id.clone(),
                loaded.version + 1 + offset,
                Organization::TYPE.to_owned(),
                event.event_type(),
                event.event_version(),
                serde_json::to_value(event)?,
                serde_json::to_value(metadata_at(offset))?,
            ));
        }
        let last = loaded.version + events.len();
        let interval = snapshot_interval(after);
        // Straight to JSON text: a `Value` tree of a 100,000-member state first took longer
        // than the text.
        let snapshot = if loaded.replace_snapshot || last / interval > loaded.version / interval {
            let number = next_snapshot_number(loaded.snapshot);
            // A large state takes tens of milliseconds of CPU: off the runtime's workers, so
            // other requests do not wait behind it.
            let state = after.clone();
            let json = tokio::task::spawn_blocking(move || serde_json::to_string(&*state))
                .await
                .map_err(|error| PersistenceError::UnknownError(Box::new(error)))??;
            Some((number, json))
        } else {
            None
        };
        let snapshot_number = snapshot.as_ref().map_or(loaded.snapshot, |(n, _)| Some(*n));
        self.repository
            .append(Organization::TYPE, &id, &stored, snapshot)
            .await?;
        self.remember(
            organization_id,
            &Loaded {
                state: after.clone(),
                version: last,
                snapshot: snapshot_number,
                replace_snapshot: false,
            },
        );
        Ok(events
            .into_iter()
            .enumerate()
            .map(|(offset, payload)| EventEnvelope {
                aggregate_id: id.clone(),
                sequence: loaded.version + 1 + offset,
                payload,
                metadata: metadata_at(offset),
            })
            .collect())
    }

    /// Appends already-decided events without checking any rule: for importing history and
    /// seeding benchmarks, never for requests.
    pub async fn import(
        &self,
        organization_id: Uuid,
        events: Vec<OrganizationEvent>,
        metadata: HashMap<String, String>,
    ) -> Result<usize, LedgerError> {
        let _turn = self.turns.take(organization_id).await;
        let loaded = self.load_latest(organization_id).await?;
        let after = loaded.after(&events);
        // Imported events say nothing of the commands that made them: none is marked, and a
        // mark in the metadata given would join them all into one.
        let mut metadata = metadata;
        metadata.remove(COMMAND_CONTINUES);
        let committed = self
            .commit(
                organization_id,
                &loaded,
                &after,
                events,
                &metadata,
                Commands::Unknown,
            )
            .await
            .map_err(store_failure)?;
        Ok(committed
            .last()
            .map_or(loaded.version, |event| event.sequence))
    }

    /// Runs a command against the organization's latest state; conflicts with concurrent
    /// writers are retried on fresh state, so the command fails only if its rules fail.
    /// `expected_version` (If-Match) is checked against the state it is decided on.
    pub async fn execute(
        &self,
        organization_id: Uuid,
        command: Command,
        context: &RequestContext,
        expected_version: Option<usize>,
    ) -> Result<Committed, LedgerError> {
        let _turn = self.turns.take(organization_id).await;
        self.execute_in_turn(organization_id, command, context, expected_version)
            .await
    }

    /// [`Ledger::execute`], for a caller that already holds the organization's turn.
    async fn execute_in_turn(
        &self,
        organization_id: Uuid,
        command: Command,
        context: &RequestContext,
        expected_version: Option<usize>,
    ) -> Result<Committed, LedgerError> {
        let metadata = metadata_of(&command, context);
        // The first attempt decides on the cached state without reading the store: if
        // another process appended since, the commit's sequence is taken and the command is
        // decided again on the latest state. A refusal or a no-op commits nothing that could
        // fail, so one decided on an unread cache entry is confirmed on the latest state.
        let mut cached = self.cached(organization_id);
        let mut snapshot_number_unsure = false;
        for attempt in 1..=MAX_ATTEMPTS {
            let (loaded, unconfirmed) = match cached.take() {
                Some(loaded) => (loaded, true),
                None if snapshot_number_unsure => (
                    self.load_with_stored_snapshot_number(organization_id)
                        .await?,
                    false,
                ),
                None => (self.load_latest(organization_id).await?, false),
            };
            let events = match decide(&loaded, &command, expected_version) {
                Ok(events) if !events.is_empty() => events,
                _ if unconfirmed => continue,
                Ok(_) => {
                    return Ok(Committed {
                        organization_id,
                        version: loaded.version,
                        state: loaded.state,
                        events: Vec::new(),
                    })
                }
                Err(error) => return Err(error),
            };
            let after = loaded.after(&events);
            match self
                .commit(
                    organization_id,
                    &loaded,
                    &after,
                    events,
                    &metadata,
                    Commands::One,
                )
                .await
            {
                Ok(committed) => {
                    metrics::counter!("orgledger_events_appended_total")
                        .increment(committed.len() as u64);
                    let version = committed.last().map_or(loaded.version, |e| e.sequence);
                    return Ok(Committed {
                        organization_id,
                        state: after,
                        version,
                        events: committed,
                    });
                }
                // The sequence or the snapshot number was taken. Catching the events up
                // does not tell which snapshot another writer stored since, so the retry
                // also reads the stored snapshot's number.
                Err(PersistenceError::OptimisticLockError) if unconfirmed => {
                    snapshot_number_unsure = true;
                }
                Err(PersistenceError::OptimisticLockError) => {
                    snapshot_number_unsure = true;
                    tracing::debug!(%organization_id, attempt, "concurrent change; retrying");
                    let jitter = rand::thread_rng().gen_range(0..=(2u64 << attempt.min(6)));
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Err(error) => return Err(store_failure(error)),
            }
        }
        Err(LedgerError::Contended)
    }

    /// Creates an organization, reserving its slug first. A slug derived from the name gets
    /// a numeric suffix when taken; an explicit one fails with `slug_taken`. A personal one
    /// is its owner's only one: a second is `personal_organization_exists`.
    pub async fn create_organization(
        &self,
        command: Command,
        slug_was_given: bool,
        context: &RequestContext,
    ) -> Result<Committed, LedgerError> {
        let personal = matches!(
            &command.body,
            OrganizationCommand::CreateOrganization(create) if create.kind == OrganizationKind::Personal
        );
        if !personal {
            return self
                .create_reserving_slug(command, slug_was_given, context)
                .await;
        }
        match self
            .personal_organization(command, slug_was_given, context)
            .await?
        {
            (committed, true) => Ok(committed),
            (_, false) => Err(OrganizationError::PersonalOrganizationExists.into()),
        }
    }

    async fn create_reserving_slug(
        &self,
        command: Command,
        slug_was_given: bool,
        context: &RequestContext,
    ) -> Result<Committed, LedgerError> {
        let OrganizationCommand::CreateOrganization(mut create) = command.body.clone() else {
            return Err(LedgerError::Store(
                "create_organization needs a create command".into(),
            ));
        };
        let organization_id = create.organization_id;
        let candidates: Vec<Slug> = if slug_was_given {
            vec![create.slug.clone()]
        } else {
            std::iter::once(create.slug.clone())
                .chain((2..=20).map(|n| create.slug.with_suffix(n)))
                .collect()
        };
        let mut reserved = None;
        for candidate in candidates {
            if self.reserve_slug(&candidate, organization_id).await? {
                reserved = Some(candidate);
                break;
            }
        }
        let Some(slug) = reserved else {
            return Err(OrganizationError::SlugTaken.into());
        };
        create.slug = slug.clone();
        let command = Command {
            body: OrganizationCommand::CreateOrganization(create),
            ..command
        };
        let result = self.execute(organization_id, command, context, None).await;
        if result.is_err() && !self.may_exist(organization_id).await {
            self.release_slug(slug.as_str(), organization_id).await?;
        }
        result
    }

    /// After a failed create: whether the organization may exist all the same (a store
    /// failure can come after the commit), in which case its slug and personal claims are
    /// kept. A claim kept for one that does not exist is taken over once it is stale.
    async fn may_exist(&self, organization_id: Uuid) -> bool {
        match self.load_latest(organization_id).await {
            Ok(loaded) => loaded.state.exists(),
            Err(error) => {
                tracing::warn!(%organization_id, %error, "cannot tell whether a failed create was stored; its claims are kept");
                true
            }
        }
    }

    /// The user's personal organization: created on the first call, returned as it is on
    /// later ones (`created` false). One per user, also under concurrency, whichever route
    /// creates it.
    pub async fn personal_organization(
        &self,
        command: Command,
        slug_was_given: bool,
        context: &RequestContext,
    ) -> Result<(Committed, bool), LedgerError> {
        let OrganizationCommand::CreateOrganization(create) = &command.body else {
            return Err(LedgerError::Store(
                "personal_organization needs a create command".into(),
            ));
        };
        // Who may create it is decided before the user's row is claimed: a claim made for
        // someone else would tell whether they have one, and hold their row meanwhile.
        Organization::default().decide(&command)?;
        let user_id = create.owner.user_id.to_string();
        for _ in 0..50 {
            let claimed = self
                .claim_personal(&user_id, create.organization_id)
                .await?;
            if claimed == create.organization_id {
                let result = self
                    .create_reserving_slug(command.clone(), slug_was_given, context)
                    .await;
                if result.is_err() && !self.may_exist(create.organization_id).await {
                    self.release_personal(&user_id, create.organization_id)
                        .await?;
                }
                return result.map(|committed| (committed, true));
            }
            let loaded = self.load_latest(claimed).await?;
            if loaded.state.exists() {
                return Ok((
                    Committed {
                        organization_id: claimed,
                        state: loaded.state,
                        version: loaded.version,
                        events: Vec::new(),
                    },
                    false,
                ));
            }
            // Purged, or a create that crashed: free the claim; in flight: wait for it.
            if loaded.state.lifecycle == Lifecycle::Purged
                || self.claim_is_stale(&user_id, command.at).await?
            {
                self.release_personal(&user_id, claimed).await?;
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Err(LedgerError::Contended)
    }

    /// Claims the user's personal organization for `organization_id`; returns the holder.
    async fn claim_personal(
        &self,
        user_id: &str,
        organization_id: Uuid,
    ) -> Result<Uuid, LedgerError> {
        let id = organization_id.to_string();
        let holder: String = match &self.database {
            Database::Postgres(pool) => {
                sqlx::query("INSERT INTO personal_organizations (user_id, organization_id) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING")
                    .bind(user_id).bind(&id).execute(pool).await.map_err(StoreError::from)?;
                sqlx::query_scalar(
                    "SELECT organization_id FROM personal_organizations WHERE user_id = $1",
                )
                .bind(user_id)
                .fetch_one(pool)
                .await
                .map_err(StoreError::from)?
            }
            Database::Sqlite(pool) => {
                sqlx::query("INSERT INTO personal_organizations (user_id, organization_id) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING")
                    .bind(user_id).bind(&id).execute(pool).await.map_err(StoreError::from)?;
                sqlx::query_scalar(
                    "SELECT organization_id FROM personal_organizations WHERE user_id = $1",
                )
                .bind(user_id)
                .fetch_one(pool)
                .await
                .map_err(StoreError::from)?
            }
        };
        Uuid::parse_str(&holder).map_err(|error| LedgerError::Store(error.to_string()))
    }

    async fn claim_is_stale(&self, user_id: &str, now: DateTime<Utc>) -> Result<bool, LedgerError> {
        let claimed_at: Option<DateTime<Utc>> = match &self.database {
            Database::Postgres(pool) => {
                sqlx::query_scalar(
                    "SELECT claimed_at FROM personal_organizations WHERE user_id = $1",
                )
                .bind(user_id)
                .fetch_optional(pool)
                .await
            }
            Database::Sqlite(pool) => {
                sqlx::query_scalar(
                    "SELECT claimed_at FROM personal_organizations WHERE user_id = $1",
                )
                .bind(user_id)
                .fetch_optional(pool)
                .await
            }
        }
        .map_err(StoreError::from)?;
        Ok(claimed_at.is_none_or(|at| now - at >= RESERVATION_GRACE))
    }

    async fn release_personal(
        &self,
        user_id: &str,
        organization_id: Uuid,
    ) -> Result<(), LedgerError> {
        let id = organization_id.to_string();
        let sql = "DELETE FROM personal_organizations WHERE user_id = $1 AND organization_id = $2";
        match &self.database {
            Database::Postgres(pool) => sqlx::query(sql)
                .bind(user_id)
                .bind(&id)
                .execute(pool)
                .await
                .map(|_| ()),
            Database::Sqlite(pool) => sqlx::query(sql)
                .bind(user_id)
                .bind(&id)
                .execute(pool)
                .await
                .map(|_| ()),
        }
        .map_err(StoreError::from)?;
        Ok(())
    }

    /// Runs any command but create, keeping slug reservations in step with renames and
    /// finishing purges.
    pub async fn run(
        &self,
        organization_id: Uuid,
        command: Command,
        context: &RequestContext,
        expected_version: Option<usize>,
    ) -> Result<Committed, LedgerError> {
        let new_slug = match &command.body {
            OrganizationCommand::UpdateOrganization(update) => update.slug.clone(),
            _ => None,
        };
        let Some(new_slug) = new_slug else {
            let is_purge = matches!(command.body, OrganizationCommand::PurgeOrganization(_));
            let committed = self
                .execute(organization_id, command, context, expected_version)
                .await?;
            if is_purge && !committed.events.is_empty() {
                self.finish_purge(organization_id).await?;
            }
            return Ok(committed);
        };
        // The organization's turn is held from the look at its slug to the release of the old
        // one: a second rename of it in this process starts from the first's outcome.
        let _turn = self.turns.take(organization_id).await;
        let current = self.load_latest(organization_id).await?;
        if current.state.slug == new_slug.as_str() || !current.state.exists() {
            return self
                .execute_in_turn(organization_id, command, context, expected_version)
                .await;
        }
        // Decided before the slug is reserved: a command refused anyway (no permission, a
        // stale If-Match, a deleted organization) is refused as such, and nobody learns
        // which slugs are taken without the right to take one.
        decide(&current, &command, expected_version)?;
        if !self.reserve_slug(&new_slug, organization_id).await? {
            return Err(OrganizationError::SlugTaken.into());
        }
        // On failure the reservation is kept, not released: a rename of the same organization
        // in another process may share it, in flight or committed (this one then failed on
        // its If-Match). Left unused, it is taken over once older than the grace period.
        let committed = self
            .execute_in_turn(organization_id, command, context, expected_version)
            .await?;
        if let Some(old) = committed
            .events
            .iter()
            .find_map(|event| match &event.payload {
                orgledger_domain::OrganizationEvent::OrganizationUpdated(update) => {
                    update.slug.as_ref().map(|change| change.from.clone())
                }
                _ => None,
            })
        {
            // A rename that outlasted the grace period may have lost its reservation to a
            // takeover: claim it again, and say so if another organization holds it now.
            if !self
                .claim_reservation(new_slug.as_str(), &organization_id.to_string())
                .await?
            {
                tracing::error!(
                    organization_id = %organization_id,
                    slug = new_slug.as_str(),
                    "renamed to a slug another organization reserved meanwhile"
                );
            }
            self.release_slug(&old, organization_id).await?;
        }
        Ok(committed)
    }

    /// After `OrganizationPurged` is stored: destroy the data key (erasing personal data in
    /// every event), forget the organization's stored command responses (they hold its
    /// personal data, sealed under the service's key), drop the snapshot and free the slug.
    /// Idempotent; a crash before the key is destroyed is repaired by
    /// [`Ledger::finish_interrupted_purges`], one after it by `idempotency::forget_purged`.
    /// A keyed command still in flight stores no response once the key is gone.
    pub async fn finish_purge(&self, organization_id: Uuid) -> Result<(), LedgerError> {
        let id = organization_id.to_string();
        // Before the key goes: a purge cut short after that is not finished at start-up, and
        // these would stay, unreadable.
        orgledger_projections::with_pool!(&self.database, pool => {
            sqlx::query("DELETE FROM past_snapshots WHERE aggregate_type = $1 AND aggregate_id = $2")
                .bind(Organization::TYPE)
                .bind(&id)
                .execute(pool)
                .await
                .map_err(StoreError::from)?;
        });
        self.keys.destroy(&id).await?;
        orgledger_projections::with_pool!(&self.database, pool => {
            // Erased, not deleted: a retry under a key stays answered (`404`) for its 24 hours
            // instead of running again, which would create a purged creation anew.
            sqlx::query(
                "UPDATE idempotency_keys
                    SET body = NULL, content_type = NULL, etag = NULL, consistency = NULL
                  WHERE organization_id = $1",
            )
            .bind(&id)
                .execute(pool)
                .await
                .map_err(StoreError::from)?;
            sqlx::query("DELETE FROM snapshots WHERE aggregate_type = $1 AND aggregate_id = $2")
                .bind(Organization::TYPE)
                .bind(&id)
                .execute(pool)
                .await
                .map_err(StoreError::from)?;
            sqlx::query("DELETE FROM organization_slugs WHERE organization_id = $1")
                .bind(&id)
                .execute(pool)
                .await
                .map_err(StoreError::from)?;
        });
        tracing::info!(%organization_id, "purge finished: data key destroyed");
        Ok(())
    }

    /// The first stored sequence of the organization after `after`, read bare (nothing to
    /// open or decode): for naming an event that cannot be read.
    pub async fn next_sequence_after(
        &self,
        organization_id: Uuid,
        after: usize,
    ) -> Result<Option<usize>, LedgerError> {
        const QUERY: &str = "SELECT min(sequence) FROM events
              WHERE aggregate_type = 'organization' AND aggregate_id = $1 AND sequence > $2";
        let next: Option<i64> = orgledger_projections::with_pool!(&self.database, pool => {
            sqlx::query_scalar(QUERY)
                .bind(organization_id.to_string())
                .bind(after as i64)
                .fetch_one(pool)
                .await
                .map_err(StoreError::from)?
        });
        Ok(next.map(|sequence| sequence as usize))
    }

    /// The MAC verdicts of up to `limit` of the organization's stored events after
    /// `after_sequence`.
    pub async fn authenticity_after(
        &self,
        organization_id: Uuid,
        after_sequence: usize,
        limit: usize,
    ) -> Result<Vec<MacCheck>, LedgerError> {
        Ok(self
            .repository
            .authenticity_after(
                Organization::TYPE,
                &organization_id.to_string(),
                after_sequence,
                limit,
            )
            .await?)
    }

    /// Refuses a master key that is not the one the store was written with: it must open the
    /// organizations' data keys, and, for a store with none left to open (every organization
    /// purged), check out against the stored events' MACs.
    pub async fn verify_master_key(&self) -> Result<(), LedgerError> {
        self.keys().verify_master_key().await?;
        Ok(self.repository.verify_master_key_against_events().await?)
    }

    /// Gives the events a version before MACs stored theirs (see
    /// [`OrganizationRepository::authenticate_legacy`]).
    pub async fn authenticate_legacy(
        &self,
        on_page: impl FnMut(u64),
    ) -> Result<MarkedEvents, LedgerError> {
        Ok(self.repository.authenticate_legacy(on_page).await?)
    }

    /// Every organization that has events, purged ones included, in id order.
    pub async fn organization_ids(&self) -> Result<Vec<String>, LedgerError> {
        const QUERY: &str = "SELECT DISTINCT aggregate_id FROM events
              WHERE aggregate_type = 'organization' ORDER BY aggregate_id";
        Ok(orgledger_projections::with_pool!(&self.database, pool => {
            sqlx::query_scalar(QUERY)
                .fetch_all(pool)
                .await
                .map_err(StoreError::from)?
        }))
    }

    /// Finishes purges whose key outlived a crash. Run at start-up.
    pub async fn finish_interrupted_purges(&self) -> Result<usize, LedgerError> {
        const QUERY: &str = "SELECT k.organization_id FROM organization_keys k
              WHERE EXISTS (SELECT 1 FROM events e
                             WHERE e.aggregate_type = 'organization'
                               AND e.aggregate_id = k.organization_id
                               AND e.event_type = 'OrganizationPurged')";
        let ids: Vec<String> = match &self.database {
            Database::Postgres(pool) => sqlx::query_scalar(QUERY).fetch_all(pool).await,
            Database::Sqlite(pool) => sqlx::query_scalar(QUERY).fetch_all(pool).await,
        }
        .map_err(StoreError::from)?;
        for id in &ids {
            if let Ok(organization_id) = Uuid::parse_str(id) {
                self.finish_purge(organization_id).await?;
            }
        }
        Ok(ids.len())
    }

    /// Claims `slug` for the organization. A claim held by another organization stands while
    /// that organization lives under this slug, and for [`RESERVATION_GRACE`] after it was
    /// made or renewed (a create or a rename in flight); otherwise it is a leftover (renamed
    /// away, purged, a crash's) and is taken over.
    async fn reserve_slug(&self, slug: &Slug, organization_id: Uuid) -> Result<bool, LedgerError> {
        let id = organization_id.to_string();
        for _ in 0..3 {
            if self.claim_reservation(slug.as_str(), &id).await? {
                return Ok(true);
            }
            let Some(holder) = self.reservation_holder(slug.as_str()).await? else {
                continue;
            };
            let holder_id = Uuid::parse_str(&holder).map_err(|_| {
                LedgerError::Store(format!(
                    "slug {slug:?} is held by a malformed id {holder:?}"
                ))
            })?;
            let (holder_state, _) = self.load(holder_id).await?;
            match holder_state.lifecycle {
                Lifecycle::Purged => self.release_slug(slug.as_str(), holder_id).await?,
                Lifecycle::Active | Lifecycle::Deleted { .. }
                    if holder_state.slug == slug.as_str() =>
                {
                    return Ok(false)
                }
                // Not (yet) its slug: stands while it may be in flight, judged by the
                // database's clock, which also stamped it.
                _ => {
                    if !self.release_stale_slug(slug.as_str(), holder_id).await? {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Reserves `slug` for the organization, or renews its own reservation (so that an old
    /// one it takes up again stands for the grace period from now). False when another
    /// organization holds it.
    async fn claim_reservation(
        &self,
        slug: &str,
        organization_id: &str,
    ) -> Result<bool, LedgerError> {
        let sql = format!(
            "INSERT INTO organization_slugs (slug, organization_id) VALUES ($1, $2)
             ON CONFLICT (slug) DO UPDATE SET reserved_at = {}
              WHERE organization_slugs.organization_id = excluded.organization_id",
            self.database_time_ago(0)
        );
        let claimed = orgledger_projections::with_pool!(&self.database, pool => {
            sqlx::query(&sql)
                .bind(slug)
                .bind(organization_id)
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
        })
        .map_err(StoreError::from)?;
        Ok(claimed == 1)
    }

    /// Releases `slug` if `organization_id` still holds it and its reservation is older than
    /// [`RESERVATION_GRACE`]; true when it did.
    async fn release_stale_slug(
        &self,
        slug: &str,
        organization_id: Uuid,
    ) -> Result<bool, LedgerError> {
        self.release_reservation(slug, organization_id, true).await
    }

    async fn reservation_holder(&self, slug: &str) -> Result<Option<String>, LedgerError> {
        const HOLDER: &str = "SELECT organization_id FROM organization_slugs WHERE slug = $1";
        let holder: Option<String> = orgledger_projections::with_pool!(&self.database, pool => {
            sqlx::query_scalar(HOLDER).bind(slug).fetch_optional(pool).await
        })
        .map_err(StoreError::from)?;
        Ok(holder)
    }

    /// Releases `slug` only if `organization_id` still holds it.
    async fn release_slug(&self, slug: &str, organization_id: Uuid) -> Result<(), LedgerError> {
        self.release_reservation(slug, organization_id, false)
            .await
            .map(drop)
    }

    /// Deletes `organization_id`'s reservation of `slug`, when `only_stale` only one older
    /// than [`RESERVATION_GRACE`] by the database's clock, which stamped it; true when it did.
    async fn release_reservation(
        &self,
        slug: &str,
        organization_id: Uuid,
        only_stale: bool,
    ) -> Result<bool, LedgerError> {
        let stale = if only_stale {
            let grace = self.database_time_ago(RESERVATION_GRACE.num_seconds());
            format!("AND reserved_at < {grace}")
        } else {
            String::new()
        };
        let sql = format!(
            "DELETE FROM organization_slugs WHERE slug = $1 AND organization_id = $2 {stale}"
        );
        let id = organization_id.to_string();
        let released = orgledger_projections::with_pool!(&self.database, pool => {
            sqlx::query(&sql)
                .bind(slug)
                .bind(&id)
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
        })
        .map_err(StoreError::from)?;
        Ok(released == 1)
    }

    /// The database's clock `seconds` ago, in SQL, as each backend stamps `reserved_at`.
    fn database_time_ago(&self, seconds: i64) -> String {
        match &self.database {
            Database::Postgres(_) => format!("now() - interval '{seconds} seconds'"),
            Database::Sqlite(_) => {
                format!("strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-{seconds} seconds')")
            }
        }
    }
}

/// Decides `command` on `loaded`, with its If-Match. A stale If-Match is told after the
/// refusals of the caller, and never to a caller without standing whose command fails
/// anyway: a 412 names the version. An invitee stands on its token alone: a failed
/// acceptance says why it failed.
fn decide(
    loaded: &Loaded,
    command: &Command,
    expected_version: Option<usize>,
) -> Result<Vec<OrganizationEvent>, LedgerError> {
    let stale = expected_version.filter(|expected| *expected != loaded.version);
    let accepting = matches!(command.body, OrganizationCommand::AcceptInvitation(_));
    match (loaded.state.decide(command), stale) {
        (Err(refusal), _) if refusal.precedes_preconditions() || accepting => Err(refusal.into()),
        (Err(_), Some(_)) if !loaded.state.has_standing(&command.actor) => {
            Err(OrganizationError::PermissionDenied.into())
        }
        (_, Some(expected)) => Err(LedgerError::VersionMismatch {
            expected,
            actual: loaded.version,
        }),
        (decision, None) => decision.map_err(LedgerError::from),
    }
}

/// In the metadata of each event of a command but its last (events stored before
/// 2026-12-07 do not say, nor do imported ones).
pub const COMMAND_CONTINUES: &str = "command_continues";

/// What the events a commit stores are: one command's, or history whose commands are not
/// known (an import).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commands {
    One,
    Unknown,
}

/// Whether the command that appended the event with `metadata` appended more after it.
pub fn continues_command(metadata: &HashMap<String, String>) -> bool {
    metadata
        .get(COMMAND_CONTINUES)
        .is_some_and(|value| value == "true")
}

/// Event metadata: who, when, and where the request came from.
fn metadata_of(command: &Command, context: &RequestContext) -> HashMap<String, String> {
    let mut metadata = HashMap::from([
        ("actor_type".to_owned(), command.actor.kind().to_owned()),
        ("actor_id".to_owned(), command.actor.id()),
        (
            "occurred_at".to_owned(),
            command
                .at
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        ),
    ]);
    let optional = [
        ("request_id", &context.request_id),
        ("client_ip", &context.client_ip),
        ("user_agent", &context.user_agent),
        (crate::store::CLAIM_FIELD, &context.idempotency_claim),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            metadata.insert(name.to_owned(), value.clone());
        }
    }
    // A key stays out of the log in clear, as tokens do; its hash still ties the event to
    // the request for whoever holds the key. (Events before 2026-12-07 hold it in clear.)
    if let Some(key) = &context.idempotency_key {
        metadata.insert(
            "idempotency_key_sha256".to_owned(),
            crate::tokens::sha256_hex(key),
        );
    }
    metadata
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_never_goes_back_to_an_older_state() {
        let mut cache = AggregateCache::default();
        let id = Uuid::now_v7();
        let at = |version| Loaded {
            state: Arc::default(),
            version,
            snapshot: None,
            replace_snapshot: false,
        };
        cache.put(id, at(10));
        cache.put(id, at(9));
        assert_eq!(cache.get(id).map(|loaded| loaded.version), Some(10));
        cache.put(id, at(11));
        assert_eq!(cache.get(id).map(|loaded| loaded.version), Some(11));
    }
}
