//! Responses kept under their keys: on PostgreSQL, the responses waiting are kept together,
//! in one statement and one durable commit.
//!
//! A keyed command's response is kept durably before it is sent, so that a retry after a
//! crash gets it again. Kept one commit each, a keyed command cost about twice the CPU of an
//! unkeyed one (`BENCHMARKS.md`, section 8), its backend waiting on WAL flushes; one task
//! takes every response waiting when it is free, so under load the flush and the statement's
//! fixed work are paid once for all of them. SQLite, whose writers take turns anyway, keeps
//! each on its own.

use chrono::Utc;
use orgledger_projections::{to_micros, Database};
use sqlx::PgPool;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

use super::Completion;
use crate::lazy_queue::LazyQueue;
use crate::store::refused;

/// Responses a statement takes before it stops taking more: this many, or once their bodies
/// pass this many bytes (a body is at most 1 MiB, so a statement holds at most 5 MiB).
const MOST_RESPONSES: usize = 256;
const MOST_BYTES: usize = 4 * 1024 * 1024;

/// Keeps the responses of a whole batch whose claims are still theirs and unanswered, and
/// returns those claims. The organization's key is looked up by index for the batch's
/// organizations only, whatever plan the server settles on.
const KEEP_TOGETHER: &str = "UPDATE idempotency_keys AS kept
        SET status = answered.status, content_type = answered.content_type,
            etag = answered.etag, consistency = answered.consistency, body = answered.body,
            completed_at_us = answered.completed_at_us,
            organization_id = answered.organization_id
       FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                   $7::text[], $8::bytea[], $9::bigint[], $10::text[])
            AS answered (scope, key, claim_id, status, content_type, etag, consistency, body,
                         completed_at_us, organization_id)
      WHERE kept.scope = answered.scope AND kept.key = answered.key
        AND kept.claim_id = answered.claim_id AND kept.status IS NULL
        AND (answered.organization_id IS NULL
             OR answered.organization_id IN (SELECT organization_id FROM organization_keys
                                              WHERE organization_id = ANY($10::text[])))
  RETURNING kept.claim_id";

/// Where a service keeps its responses.
pub struct KeptResponses {
    database: Database,
    queue: LazyQueue<Keep>,
    /// Statements run to keep them (PostgreSQL), retries alone included.
    statements: Arc<AtomicU64>,
}

/// A response waiting for its statement, and where to say whether it was kept.
struct Keep {
    scope: String,
    key: String,
    claim_id: String,
    completion: Completion,
    completed_at_us: i64,
    done: oneshot::Sender<Result<bool, Arc<sqlx::Error>>>,
}

impl KeptResponses {
    pub fn new(database: Database) -> Self {
        Self {
            database,
            queue: LazyQueue::new(),
            statements: Arc::default(),
        }
    }

    pub fn database(&self) -> &Database {
        &self.database
    }

    #[cfg(test)]
    pub(super) fn statements(&self) -> u64 {
        self.statements.load(Ordering::Relaxed)
    }

    /// Keeps `completion` under the key if the claim is still `claim_id`'s and unanswered,
    /// durably; false if it was not kept. An error shared by a whole statement (the server
    /// unreachable, a connection lost) is every one of its responses' error: whether a
    /// statement whose connection broke committed is unknown, as for a lone UPDATE.
    pub(super) async fn keep(
        &self,
        scope: &str,
        key: &str,
        claim_id: &str,
        completion: Completion,
    ) -> Result<bool, Arc<sqlx::Error>> {
        let pool = match &self.database {
            Database::Postgres(pool) => pool,
            Database::Sqlite(pool) => {
                let alone = async {
                    Ok::<_, sqlx::Error>(complete_on!(pool, scope, key, claim_id, completion))
                };
                return alone.await.map(|kept| kept == 1).map_err(Arc::new);
            }
        };
        let (done, outcome) = oneshot::channel();
        let waiting = Keep {
            scope: scope.to_owned(),
            key: key.to_owned(),
            claim_id: claim_id.to_owned(),
            completion,
            completed_at_us: to_micros(Utc::now()),
            done,
        };
        self.queue
            .send(waiting, |queue| {
                keep_together(pool.clone(), queue, self.statements.clone())
            })
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }
}

/// The keeping task stopped with the response in it (its runtime shut down).
fn stopped() -> Arc<sqlx::Error> {
    Arc::new(sqlx::Error::WorkerCrashed)
}

async fn keep_together(
    pool: PgPool,
    mut waiting: mpsc::UnboundedReceiver<Keep>,
    statements: Arc<AtomicU64>,
) {
    while let Some(first) = waiting.recv().await {
        let mut bytes = first.completion.body.len();
        let mut batch = vec![first];
        while batch.len() < MOST_RESPONSES && bytes < MOST_BYTES {
            let Ok(next) = waiting.try_recv() else { break };
            bytes += next.completion.body.len();
            batch.push(next);
        }
        metrics::histogram!("orgledger_kept_responses_per_commit").record(batch.len() as f64);
        match store(&pool, &statements, &batch).await {
            Ok(kept) => {
                for keep in batch {
                    let _ = keep.done.send(Ok(kept.contains(&keep.claim_id)));
                }
            }
            // The server refused the statement, so it kept nothing: each again alone, so
            // that one response it refuses costs the others nothing.
            Err(error) if batch.len() > 1 && refused(&error) => {
                for keep in batch {
                    let outcome = store(&pool, &statements, std::slice::from_ref(&keep))
                        .await
                        .map(|kept| !kept.is_empty())
                        .map_err(Arc::new);
                    let _ = keep.done.send(outcome);
                }
            }
            Err(error) => {
                let error = Arc::new(error);
                for keep in batch {
                    let _ = keep.done.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Runs [`KEEP_TOGETHER`] for `batch`; the claims whose responses were kept.
async fn store(
    pool: &PgPool,
    statements: &AtomicU64,
    batch: &[Keep],
) -> Result<HashSet<String>, sqlx::Error> {
    statements.fetch_add(1, Ordering::Relaxed);
    let text = |column: fn(&Keep) -> &str| batch.iter().map(column).collect::<Vec<_>>();
    let optional = |column: fn(&Completion) -> Option<&str>| -> Vec<Option<&str>> {
        batch.iter().map(|keep| column(&keep.completion)).collect()
    };
    let kept: Vec<String> = sqlx::query_scalar(KEEP_TOGETHER)
        .bind(text(|keep| &keep.scope))
        .bind(text(|keep| &keep.key))
        .bind(text(|keep| &keep.claim_id))
        .bind(
            batch
                .iter()
                .map(|keep| keep.completion.status)
                .collect::<Vec<_>>(),
        )
        .bind(optional(|completion| completion.content_type.as_deref()))
        .bind(optional(|completion| completion.etag.as_deref()))
        .bind(optional(|completion| completion.consistency.as_deref()))
        .bind(
            batch
                .iter()
                .map(|keep| &keep.completion.body[..])
                .collect::<Vec<_>>(),
        )
        .bind(
            batch
                .iter()
                .map(|keep| keep.completed_at_us)
                .collect::<Vec<_>>(),
        )
        .bind(optional(|completion| completion.organization.as_deref()))
        .fetch_all(pool)
        .await?;
    Ok(kept.into_iter().collect())
}
