//! Group commit (PostgreSQL): the appends of concurrent commands go to the server together,
//! in one INSERT and one durable commit, instead of a statement and a commit each.
//!
//! A command's own INSERT cost the server about three times its execution in fixed work
//! around it (the protocol's messages, the executor's start and end, the commit record, the
//! wake-ups of a backend per command); PostgreSQL shares the flush of commits that arrive
//! together, not that work. One task takes every append waiting when it is free and commits
//! them as one statement, so under load the fixed work is paid once per group.
//!
//! Each command keeps its own outcome. Two appends of one organization at one sequence in a
//! group: the first goes in, the later ones conflict at once. A group the server refuses
//! for a taken sequence (another process appended first) is committed again one append at a
//! time, so only the appends whose sequences are taken conflict.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cqrs_es::persist::SerializedEvent;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

/// Most events one group carries; an append waiting past it goes in the next group.
const MOST_EVENTS: usize = 1_000;

/// One statement for any group size, so the server keeps a single prepared statement.
const INSERT: &str = "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                         event_version, payload, metadata)
                      SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[],
                                           $5::text[], $6::jsonb[], $7::jsonb[])";

/// Why an append was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupError {
    /// One of its sequences is taken: by an earlier append of the group or in the store.
    #[error("a sequence of the append is taken")]
    Conflict,
    /// The group's statement failed; whether it committed is unknown only if the connection
    /// broke after it was sent, as for a lone INSERT.
    #[error("database error: {0}")]
    Database(Arc<sqlx::Error>),
}

/// An append waiting for its group: its events (already sealed) and where to say how it went.
struct Append {
    events: Vec<SerializedEvent>,
    done: oneshot::Sender<Result<(), GroupError>>,
}

/// Groups committed and the appends they carried.
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

/// The queue of appends and the task that commits them.
pub struct GroupCommit {
    queue: mpsc::UnboundedSender<Append>,
}

impl GroupCommit {
    /// Starts the committing task; it ends when the last `GroupCommit` handle is dropped.
    pub fn start(pool: PgPool, stats: Arc<GroupStats>) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, waiting, stats));
        Self { queue }
    }

    /// Appends `events` (one command's, at most [`MOST_EVENTS`]) durably, together with
    /// whatever other appends are waiting.
    pub async fn append(&self, events: Vec<SerializedEvent>) -> Result<(), GroupError> {
        let (done, outcome) = oneshot::channel();
        let stopped = || GroupError::Database(Arc::new(sqlx::Error::PoolClosed));
        self.queue
            .send(Append { events, done })
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
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

/// Commits `group` and tells each append how it went.
async fn commit(pool: &PgPool, group: Vec<Append>) {
    let clashes: Vec<bool> = {
        let mut taken = HashSet::new();
        group
            .iter()
            .map(|append| {
                let keys: Vec<_> = append
                    .events
                    .iter()
                    .map(|e| {
                        (
                            e.aggregate_type.as_str(),
                            e.aggregate_id.as_str(),
                            e.sequence,
                        )
                    })
                    .collect();
                let clashes = keys.iter().any(|key| taken.contains(key));
                if !clashes {
                    taken.extend(keys);
                }
                clashes
            })
            .collect()
    };
    let (clashing, together): (Vec<_>, Vec<_>) = group
        .into_iter()
        .zip(clashes)
        .partition(|(_, clashes)| *clashes);
    let together: Vec<Append> = together.into_iter().map(|(append, _)| append).collect();
    for (append, _) in clashing {
        let _ = append.done.send(Err(GroupError::Conflict));
    }
    let outcome = insert(pool, together.iter().flat_map(|append| &append.events)).await;
    match outcome {
        Ok(()) => {
            for append in together {
                let _ = append.done.send(Ok(()));
            }
        }
        Err(error) if is_conflict(&error) && together.len() > 1 => {
            for append in together {
                let outcome = insert(pool, append.events.iter()).await;
                let _ = append.done.send(outcome.map_err(refusal));
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

fn is_conflict(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|error| error.is_unique_violation())
}

fn refusal(error: sqlx::Error) -> GroupError {
    if is_conflict(&error) {
        GroupError::Conflict
    } else {
        GroupError::Database(Arc::new(error))
    }
}

/// One INSERT of `events`, in their order (positions are taken in it).
async fn insert<'a>(
    pool: &PgPool,
    events: impl Iterator<Item = &'a SerializedEvent>,
) -> Result<(), sqlx::Error> {
    let mut columns = Columns::default();
    for event in events {
        columns.aggregate_types.push(event.aggregate_type.as_str());
        columns.aggregate_ids.push(event.aggregate_id.as_str());
        columns.sequences.push(event.sequence as i64);
        columns.event_types.push(event.event_type.as_str());
        columns.event_versions.push(event.event_version.as_str());
        columns.payloads.push(event.payload.clone());
        columns.metadata.push(event.metadata.clone());
    }
    sqlx::query(INSERT)
        .bind(columns.aggregate_types)
        .bind(columns.aggregate_ids)
        .bind(columns.sequences)
        .bind(columns.event_types)
        .bind(columns.event_versions)
        .bind(columns.payloads)
        .bind(columns.metadata)
        .execute(pool)
        .await?;
    Ok(())
}

#[derive(Default)]
struct Columns<'a> {
    aggregate_types: Vec<&'a str>,
    aggregate_ids: Vec<&'a str>,
    sequences: Vec<i64>,
    event_types: Vec<&'a str>,
    event_versions: Vec<&'a str>,
    payloads: Vec<serde_json::Value>,
    metadata: Vec<serde_json::Value>,
}
