//! Group commit (PostgreSQL): the appends of concurrent commands go to the server together,
//! in one INSERT and one durable commit, instead of a statement and a commit each.
//!
//! A command's own INSERT cost the server about three times its execution in fixed work
//! around it (the protocol's messages, the executor's start and end, the commit record, the
//! wake-ups of a backend per command); PostgreSQL shares the flush of commits that arrive
//! together, not that work. One task takes every append waiting when it is free and commits
//! them as one statement, so under load the fixed work is paid once per group.
//!
//! Each command keeps its own outcome:
//! - Two appends of one organization at one sequence: the later one waits for the next
//!   statement, where it conflicts only if the first was stored.
//! - A statement the server refuses with an error (a sequence another process took, a
//!   deadlock with another process's group, a bad value) stored nothing: its appends are
//!   stored again one at a time, so each gets its own outcome. A fatal error (the server
//!   shutting down) may come after the commit, so it is every append's outcome, unknown, as
//!   for a lone INSERT.
//! - Rows go in ordered by organization and sequence, so two processes' groups take their
//!   key locks in one order and do not deadlock on each other.
//!
//! - An append that carries an idempotency claim is stored only if the claim is still its
//!   own: a group holding any share-locks them in its one statement ([`INSERT_FENCED`]), and
//!   an append whose claim a retry took over is left out.
//!
//! An append whose caller stopped waiting (a dropped request) is still stored once queued,
//! as a lone INSERT already sent would be.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::AuthenticatedEvent;
use crate::lazy_queue::LazyQueue;
use sqlx::postgres::{PgDatabaseError, PgSeverity};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

/// Events a group takes before it stops taking more appends (it then holds fewer than
/// twice as many: an append carries at most 1,000).
const MOST_EVENTS: usize = 1_000;

/// One statement for any group size, so the server keeps a single prepared statement.
const INSERT: &str = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                         event_version, payload, metadata, mac)
                      SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[],
                                           $5::text[], $6::jsonb[], $7::jsonb[], $8::bytea[])";

/// [`INSERT`] for a group holding keyed appends, fenced on their idempotency claims in the
/// same statement: the claims still unanswered are share-locked (a take-over, which updates
/// the claim, waits for this commit; one that committed first leaves its claim out), only the
/// events whose claim is held or who carry none are stored, and the held claims are returned.
/// A plain filter on the function scan, so the rows go in in their order, as in [`INSERT`].
const INSERT_FENCED: &str = "WITH held AS MATERIALIZED (
                                 SELECT claim_id FROM idempotency_keys
                                  WHERE claim_id = ANY($9) AND status IS NULL
                                  ORDER BY claim_id FOR SHARE),
                             stored AS (
                                 INSERT INTO events (aggregate_type, aggregate_id, sequence,
                                                     event_type, event_version, payload,
                                                     metadata, mac)
                                 SELECT aggregate_type, aggregate_id, sequence, event_type,
                                        event_version, payload, metadata, mac
                                   FROM UNNEST($1::text[], $2::text[], $3::bigint[],
                                               $4::text[], $5::text[], $6::jsonb[],
                                               $7::jsonb[], $8::bytea[], $10::text[])
                                        AS appended (aggregate_type, aggregate_id, sequence,
                                                     event_type, event_version, payload,
                                                     metadata, mac, claim)
                                  WHERE claim IS NULL
                                     OR claim = ANY(ARRAY(SELECT claim_id FROM held)))
                             SELECT claim_id FROM held";

/// PostgreSQL's `deadlock_detected` and `serialization_failure`: the statement stored
/// nothing, and the same append may well succeed if decided again.
const RETRYABLE: [&str; 2] = ["40P01", "40001"];

/// Why an append was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupError {
    /// One of its sequences is taken, or the server refused it in a way a retry on fresh
    /// state can get past.
    #[error("a sequence of the append is taken")]
    Conflict,
    /// Its idempotency claim was taken over by a retry: it was left out of the group.
    #[error("the append's idempotency claim was taken over")]
    ClaimTakenOver,
    /// The statement failed; whether it committed is unknown only if the connection broke
    /// after it was sent, as for a lone INSERT.
    #[error("database error: {0}")]
    Database(Arc<sqlx::Error>),
}

/// An append waiting for its group: its events (already sealed) and where to say how it went.
struct Append {
    events: Vec<AuthenticatedEvent>,
    claim: Option<String>,
    done: oneshot::Sender<Result<(), GroupError>>,
}

/// Groups taken and the appends they carried.
#[derive(Debug, Default)]
pub struct GroupStats {
    groups: AtomicU64,
    appends: AtomicU64,
}

impl GroupStats {
    pub fn groups(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }

    pub fn appends(&self) -> u64 {
        self.appends.load(Ordering::Relaxed)
    }
}

/// The queue of appends and the task that commits them (started by the first append).
pub struct GroupCommit {
    pool: PgPool,
    stats: Arc<GroupStats>,
    queue: LazyQueue<Append>,
}

impl GroupCommit {
    pub fn new(pool: PgPool, stats: Arc<GroupStats>) -> Self {
        Self {
            pool,
            stats,
            queue: LazyQueue::new(),
        }
    }

    /// Appends `events` (one command's, at most 1,000) durably, together with whatever other
    /// appends are waiting.
    pub async fn append(
        &self,
        events: Vec<AuthenticatedEvent>,
        claim: Option<String>,
    ) -> Result<(), GroupError> {
        let (done, outcome) = oneshot::channel();
        let append = Append {
            events,
            claim,
            done,
        };
        self.queue
            .send(append, |waiting| {
                run(self.pool.clone(), waiting, self.stats.clone())
            })
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

/// The committing task stopped with the append in it (its runtime shut down).
fn stopped() -> GroupError {
    GroupError::Database(Arc::new(sqlx::Error::WorkerCrashed))
}

async fn run(pool: PgPool, mut waiting: mpsc::UnboundedReceiver<Append>, stats: Arc<GroupStats>) {
    while let Some(first) = waiting.recv().await {
        let mut events = first.events.len();
        let mut group = vec![first];
        while events < MOST_EVENTS {
            let Ok(next) = waiting.try_recv() else { break };
            events += next.events.len();
            group.push(next);
        }
        stats.groups.fetch_add(1, Ordering::Relaxed);
        stats
            .appends
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        metrics::histogram!("orgledger_group_commit_appends").record(group.len() as f64);
        commit(&pool, group).await;
    }
}

/// Commits `group` and tells each append how it went: every append whose sequences no
/// earlier append of the group claims goes in one statement; the others wait for the next.
async fn commit(pool: &PgPool, mut group: Vec<Append>) {
    while !group.is_empty() {
        let (mut together, later) = without_clashes(group);
        together.sort_by(|a, b| key_of(a).cmp(&key_of(b)));
        commit_together(pool, together).await;
        group = later;
    }
}

/// Splits `group` into the appends whose sequences no earlier one claims, and the rest.
fn without_clashes(group: Vec<Append>) -> (Vec<Append>, Vec<Append>) {
    let mut taken = HashSet::new();
    let mut together = Vec::with_capacity(group.len());
    let mut later = Vec::new();
    for append in group {
        let keys: Vec<(String, String, usize)> = append
            .events
            .iter()
            .map(|e| &e.event)
            .map(|e| (e.aggregate_type.clone(), e.aggregate_id.clone(), e.sequence))
            .collect();
        if keys.iter().any(|key| taken.contains(key)) {
            later.push(append);
        } else {
            taken.extend(keys);
            together.push(append);
        }
    }
    (together, later)
}

/// Where an append's rows sort: an append's events are one organization's, in sequence order.
fn key_of(append: &Append) -> (&str, &str, usize) {
    append.events.first().map_or(("", "", 0), |first| {
        let event = &first.event;
        (
            event.aggregate_type.as_str(),
            event.aggregate_id.as_str(),
            event.sequence,
        )
    })
}

async fn commit_together(pool: &PgPool, together: Vec<Append>) {
    match store(pool, &together).await {
        Ok(fenced) => {
            for (append, fenced) in together.into_iter().zip(fenced) {
                let outcome = if fenced {
                    Err(GroupError::ClaimTakenOver)
                } else {
                    Ok(())
                };
                let _ = append.done.send(outcome);
            }
        }
        // The server refused the statement, so it stored nothing: each append again alone.
        Err(error) if together.len() > 1 && refused(&error) => {
            for append in together {
                let outcome = match store(pool, std::slice::from_ref(&append)).await {
                    Ok(fenced) if fenced.first() == Some(&true) => Err(GroupError::ClaimTakenOver),
                    Ok(_) => Ok(()),
                    Err(error) => Err(refusal(error)),
                };
                let _ = append.done.send(outcome);
            }
        }
        Err(error) => {
            let error = refusal(error);
            for append in together {
                let _ = append.done.send(Err(error.clone()));
            }
        }
    }
}

/// An `ERROR` ends the statement's transaction with nothing stored; a PostgreSQL `FATAL`
/// may come after its commit (a shutdown while a synchronous standby is awaited). SQLite
/// reports no severity: its errors all end the statement.
pub fn refused(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|error| {
        error
            .try_downcast_ref::<PgDatabaseError>()
            .is_none_or(|error| error.severity() == PgSeverity::Error)
    })
}

/// A taken sequence, a deadlock or a serialization failure: the statement stored nothing and
/// the command, decided again on fresh state, may well succeed.
pub fn is_conflict(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|error| {
        error.is_unique_violation() || error.code().is_some_and(|code| RETRYABLE.contains(&&*code))
    })
}

fn refusal(error: sqlx::Error) -> GroupError {
    if is_conflict(&error) {
        GroupError::Conflict
    } else {
        GroupError::Database(Arc::new(error))
    }
}

/// Binds the event columns of `$columns` as `$1` to `$8` (a plain query and a scalar one
/// are different types in sqlx).
macro_rules! bind_columns {
    ($query:expr, $columns:expr) => {
        $query
            .bind(&$columns.aggregate_types)
            .bind(&$columns.aggregate_ids)
            .bind(&$columns.sequences)
            .bind(&$columns.event_types)
            .bind(&$columns.event_versions)
            .bind(&$columns.payloads)
            .bind(&$columns.metadata)
            .bind(&$columns.macs)
    };
}

/// Stores `appends` in one statement, in their order (positions are taken in it); returns,
/// for each, whether it was left out because its idempotency claim is no longer its own.
async fn store(pool: &PgPool, appends: &[Append]) -> Result<Vec<bool>, sqlx::Error> {
    let mut columns = Columns::default();
    for append in appends {
        columns.push(&append.events, append.claim.as_deref());
    }
    let claims: Vec<&str> = appends
        .iter()
        .filter_map(|append| append.claim.as_deref())
        .collect();
    if claims.is_empty() {
        bind_columns!(sqlx::query(INSERT), columns)
            .execute(pool)
            .await?;
        return Ok(vec![false; appends.len()]);
    }
    let held: HashSet<String> = bind_columns!(sqlx::query_scalar(INSERT_FENCED), columns)
        .bind(&claims)
        .bind(&columns.claims)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
    Ok(appends
        .iter()
        .map(|append| {
            append
                .claim
                .as_ref()
                .is_some_and(|claim| !held.contains(claim))
        })
        .collect())
}

/// The events of a statement, one array per column (`$1` to `$8`), and each one's claim.
#[derive(Default)]
struct Columns<'a> {
    aggregate_types: Vec<&'a str>,
    aggregate_ids: Vec<&'a str>,
    sequences: Vec<i64>,
    event_types: Vec<&'a str>,
    event_versions: Vec<&'a str>,
    payloads: Vec<&'a serde_json::Value>,
    metadata: Vec<&'a serde_json::Value>,
    macs: Vec<&'a [u8]>,
    claims: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    /// One append's events, each with the append's claim.
    fn push(&mut self, events: &'a [AuthenticatedEvent], claim: Option<&'a str>) {
        for AuthenticatedEvent { event, mac } in events {
            self.aggregate_types.push(event.aggregate_type.as_str());
            self.aggregate_ids.push(event.aggregate_id.as_str());
            self.sequences.push(event.sequence as i64);
            self.event_types.push(event.event_type.as_str());
            self.event_versions.push(event.event_version.as_str());
            self.payloads.push(&event.payload);
            self.metadata.push(&event.metadata);
            self.macs.push(&mac[..]);
            self.claims.push(claim);
        }
    }
}
