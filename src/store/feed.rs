//! The whole log in commit order, opened and decoded, for the projector.
//!
//! PostgreSQL assigns `position` at insert, not at commit, so a transaction holding a lower
//! position can commit after a higher one. Reading in `(transaction_id, position)` order and
//! only below `pg_snapshot_xmin(pg_current_snapshot())` (the oldest transaction still in
//! flight) means every event read is final and none can later appear behind the checkpoint.
//! SQLite has one writer at a time, so `event_log.position` is already commit order.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use cqrs_es::{Aggregate, EventEnvelope};
use orgledger_domain::{upcasters, Organization};
use orgledger_projections::{Checkpoint, EventFeed, FeedError, RecordedEvent};
use sqlx::Row;

use super::repository::{open_event, pg_event, sqlite_event};
use super::{DataKeys, Database};

/// Upcasts a stored event to the current schema and deserializes it.
pub fn decode(
    upcasters: &[Box<dyn EventUpcaster>],
    stored: SerializedEvent,
) -> Result<EventEnvelope<Organization>, String> {
    let upcast = upcasters.iter().fold(stored, |event, upcaster| {
        if upcaster.can_upcast(&event.event_type, &event.event_version) {
            upcaster.upcast(event)
        } else {
            event
        }
    });
    EventEnvelope::try_from(upcast).map_err(|error| error.to_string())
}

pub struct StoreFeed {
    database: Database,
    keys: DataKeys,
    upcasters: Vec<Box<dyn EventUpcaster>>,
}

impl StoreFeed {
    pub fn new(database: Database, keys: DataKeys) -> Self {
        Self {
            database,
            keys,
            upcasters: upcasters(),
        }
    }

    async fn rows_after(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<(Checkpoint, DateTime<Utc>, SerializedEvent)>, sqlx::Error> {
        Ok(match &self.database {
            // No `aggregate_type` predicate: organizations are the log's one aggregate type
            // (`read_after` refuses any other), and with it the planner AND-ed a scan of the
            // whole primary key into every read, so each batch cost grew with the log.
            Database::Postgres(pool) => sqlx::query(
                "SELECT transaction_id::text::bigint AS txid, position, recorded_at,
                        aggregate_type, aggregate_id, sequence, event_type, event_version,
                        payload, metadata
                   FROM events
                  WHERE (transaction_id, position) > ($1::bigint::text::xid8, $2)
                    AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
                  ORDER BY transaction_id, position
                  LIMIT $3",
            )
            .bind(after.commit_txid)
            .bind(after.position)
            .bind(limit as i64)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|row| {
                let checkpoint = Checkpoint {
                    commit_txid: row.get("txid"),
                    position: row.get("position"),
                };
                (checkpoint, row.get("recorded_at"), pg_event(row))
            })
            .collect(),
            Database::Sqlite(pool) => sqlx::query(
                "SELECT l.position, l.recorded_at, e.aggregate_type, e.aggregate_id, e.sequence,
                        e.event_type, e.event_version, e.payload, e.metadata
                   FROM event_log l
                   JOIN events e USING (aggregate_type, aggregate_id, sequence)
                  WHERE l.aggregate_type = 'organization' AND l.position > $1
                  ORDER BY l.position
                  LIMIT $2",
            )
            .bind(after.position)
            .bind(limit as i64)
            .fetch_all(pool)
            .await?
            .iter()
            .map(|row| {
                let checkpoint = Checkpoint {
                    commit_txid: 0,
                    position: row.get("position"),
                };
                let recorded: String = row.get("recorded_at");
                let recorded_at = DateTime::parse_from_rfc3339(&recorded)
                    .map(|at| at.with_timezone(&Utc))
                    .unwrap_or_else(|_| Utc::now());
                (checkpoint, recorded_at, sqlite_event(row))
            })
            .collect(),
        })
    }
}

#[async_trait]
impl EventFeed for StoreFeed {
    async fn read_after(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, FeedError> {
        let rows = self
            .rows_after(after, limit)
            .await
            .map_err(|error| FeedError(error.to_string()))?;

        let mut keys = HashMap::new();
        let mut events = Vec::with_capacity(rows.len());
        for (checkpoint, recorded_at, mut stored) in rows {
            if stored.aggregate_type != Organization::TYPE {
                return Err(FeedError(format!(
                    "the log holds a {:?} event, and the projections read organizations only",
                    stored.aggregate_type
                )));
            }
            let organization_id = stored.aggregate_id.clone();
            if !keys.contains_key(&organization_id) {
                let key = self
                    .keys
                    .get(&organization_id)
                    .await
                    .map_err(|error| FeedError(error.to_string()))?;
                keys.insert(organization_id.clone(), key);
            }
            open_event(&mut stored, keys[&organization_id].as_ref())
                .map_err(|error| FeedError(format!("{organization_id}: {error}")))?;
            let event_type = stored.event_type.clone();
            let envelope = decode(&self.upcasters, stored).map_err(FeedError)?;
            events.push(RecordedEvent {
                checkpoint,
                organization_id,
                sequence: envelope.sequence as i64,
                event_type,
                event: envelope.payload,
                metadata: envelope.metadata,
                recorded_at,
            });
        }
        Ok(events)
    }

    async fn has_events_after(&self, after: Checkpoint) -> Result<bool, FeedError> {
        let found = match &self.database {
            Database::Postgres(pool) => {
                // Ordered and limited, not `EXISTS`: EXPLAIN showed `EXISTS` scan the whole
                // log (the planner expected a match early); this walks events_commit_order.
                sqlx::query_scalar::<_, i64>(
                    "SELECT position FROM events
                      WHERE (transaction_id, position) > ($1::bigint::text::xid8, $2)
                      ORDER BY transaction_id, position
                      LIMIT 1",
                )
                .bind(after.commit_txid)
                .bind(after.position)
                .fetch_optional(pool)
                .await
                .map(|found| found.is_some())
            }
            Database::Sqlite(pool) => {
                sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM event_log WHERE position > $1)",
                )
                .bind(after.position)
                .fetch_one(pool)
                .await
            }
        };
        found.map_err(|error| FeedError(error.to_string()))
    }

    /// After a bulk import PostgreSQL's statistics lag (autovacuum analyzes within about a
    /// minute) and the planner then sorts the whole log for every batch instead of walking
    /// `events_commit_order`; `ANALYZE` samples a fixed number of rows, so it is cheap.
    async fn prepare_full_read(&self) -> Result<(), FeedError> {
        if let Database::Postgres(pool) = &self.database {
            sqlx::query("ANALYZE events")
                .execute(pool)
                .await
                .map_err(|error| FeedError(error.to_string()))?;
        }
        Ok(())
    }

    async fn backlog(&self, after: Checkpoint) -> Result<(u64, Option<DateTime<Utc>>), FeedError> {
        let result = match &self.database {
            Database::Postgres(pool) => {
                sqlx::query_as::<_, (i64, Option<DateTime<Utc>>)>(
                    "SELECT count(*), min(recorded_at) FROM events
                      WHERE (transaction_id, position) > ($1::bigint::text::xid8, $2)",
                )
                .bind(after.commit_txid)
                .bind(after.position)
                .fetch_one(pool)
                .await
            }
            Database::Sqlite(pool) => sqlx::query_as::<_, (i64, Option<String>)>(
                "SELECT count(*), min(recorded_at) FROM event_log
                  WHERE aggregate_type = 'organization' AND position > $1",
            )
            .bind(after.position)
            .fetch_one(pool)
            .await
            .map(|(count, oldest)| {
                let oldest = oldest.and_then(|at| {
                    DateTime::parse_from_rfc3339(&at)
                        .ok()
                        .map(|at| at.with_timezone(&Utc))
                });
                (count, oldest)
            }),
        };
        let (count, oldest) = result.map_err(|error| FeedError(error.to_string()))?;
        Ok((count as u64, oldest))
    }
}
