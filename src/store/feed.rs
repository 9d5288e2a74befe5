//! The whole log in commit order, opened and decoded, for the projector.
//!
//! PostgreSQL assigns `position` at insert, not at commit, so a transaction holding a lower
//! position can commit after a higher one. Reading in `(transaction_id, position)` order and
//! only below `pg_snapshot_xmin(pg_current_snapshot())` (the oldest transaction still in
//! flight) means every event read is final and none can later appear behind the checkpoint.
//! SQLite has one writer at a time, so `event_log.position` is already commit order.

use std::collections::HashMap;
use std::sync::OnceLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use cqrs_es::{Aggregate, EventEnvelope};
use orgledger_domain::{
    upcasters, Organization, OrganizationEvent, PERSONAL_DATA_FIELDS, SECRET_FIELDS,
};
use orgledger_projections::{Checkpoint, EventFeed, FeedError, RecordedEvent};
use sqlx::Row;

use super::repository::open_event;
use super::{DataKey, DataKeys, Database};

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

/// One row of the log as stored: payload and metadata still JSON text.
struct StoredRow {
    checkpoint: Checkpoint,
    recorded_at: DateTime<Utc>,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: String,
    metadata: String,
}

/// A decoded payload and its metadata.
type Decoded = (OrganizationEvent, HashMap<String, String>);

/// `"email"`, `"first_name"`, ...: the quoted names of every field whose strings are sealed.
fn sealed_field_names() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        PERSONAL_DATA_FIELDS
            .iter()
            .chain(SECRET_FIELDS)
            .map(|name| format!("\"{name}\""))
            .collect()
    })
}

/// True when no sealed field's name appears anywhere in `json`, so it holds nothing to open.
fn names_no_sealed_field(json: &str) -> bool {
    !sealed_field_names()
        .iter()
        .any(|name| json.contains(name.as_str()))
}

/// Decodes straight from the stored text an event that holds nothing sealed and needs no
/// upcasting: most of the log (role changes, settings), and the bulk of a rebuild's CPU
/// when it went through `serde_json::Value`. `None` sends the event the general way.
fn decode_plain(
    upcasters: &[Box<dyn EventUpcaster>],
    row: &StoredRow,
) -> Option<Result<Decoded, String>> {
    let upcast = upcasters
        .iter()
        .any(|upcaster| upcaster.can_upcast(&row.event_type, &row.event_version));
    if upcast || !names_no_sealed_field(&row.payload) || !names_no_sealed_field(&row.metadata) {
        return None;
    }
    Some(
        serde_json::from_str(&row.payload)
            .and_then(|event| Ok((event, serde_json::from_str(&row.metadata)?)))
            .map_err(|error| error.to_string()),
    )
}

/// Opens the sealed fields with the organization's key (or erases them), upcasts and
/// decodes.
fn decode_sealed(
    upcasters: &[Box<dyn EventUpcaster>],
    row: &StoredRow,
    key: Option<&DataKey>,
) -> Result<Decoded, String> {
    let json = |text: &str| serde_json::from_str(text).map_err(|error| error.to_string());
    let mut stored = SerializedEvent::new(
        row.aggregate_id.clone(),
        row.sequence as usize,
        row.aggregate_type.clone(),
        row.event_type.clone(),
        row.event_version.clone(),
        json(&row.payload)?,
        json(&row.metadata)?,
    );
    open_event(&mut stored, key).map_err(|error| error.to_string())?;
    let envelope = decode(upcasters, stored)?;
    Ok((envelope.payload, envelope.metadata))
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
    ) -> Result<Vec<StoredRow>, sqlx::Error> {
        Ok(match &self.database {
            // No `aggregate_type` predicate: organizations are the log's one aggregate type
            // (`read_after` refuses any other), and with it the planner AND-ed a scan of the
            // whole primary key into every read, so each batch cost grew with the log.
            Database::Postgres(pool) => sqlx::query(
                "SELECT transaction_id::text::bigint AS txid, position, recorded_at,
                        aggregate_type, aggregate_id, sequence, event_type, event_version,
                        payload::text AS payload, metadata::text AS metadata
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
            .map(|row| StoredRow {
                checkpoint: Checkpoint {
                    commit_txid: row.get("txid"),
                    position: row.get("position"),
                },
                recorded_at: row.get("recorded_at"),
                aggregate_type: row.get("aggregate_type"),
                aggregate_id: row.get("aggregate_id"),
                sequence: row.get("sequence"),
                event_type: row.get("event_type"),
                event_version: row.get("event_version"),
                payload: row.get("payload"),
                metadata: row.get("metadata"),
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
                let recorded: String = row.get("recorded_at");
                StoredRow {
                    checkpoint: Checkpoint {
                        commit_txid: 0,
                        position: row.get("position"),
                    },
                    recorded_at: DateTime::parse_from_rfc3339(&recorded)
                        .map(|at| at.with_timezone(&Utc))
                        .unwrap_or_else(|_| Utc::now()),
                    aggregate_type: row.get("aggregate_type"),
                    aggregate_id: row.get("aggregate_id"),
                    sequence: row.get("sequence"),
                    event_type: row.get("event_type"),
                    event_version: row.get("event_version"),
                    payload: row.get("payload"),
                    metadata: row.get("metadata"),
                }
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
        for row in rows {
            if row.aggregate_type != Organization::TYPE {
                return Err(FeedError(format!(
                    "the log holds a {:?} event, and the projections read organizations only",
                    row.aggregate_type
                )));
            }
            let event = match decode_plain(&self.upcasters, &row) {
                Some(decoded) => decoded,
                None => {
                    let organization_id = row.aggregate_id.as_str();
                    if !keys.contains_key(organization_id) {
                        let key = self
                            .keys
                            .get(organization_id)
                            .await
                            .map_err(|error| FeedError(error.to_string()))?;
                        keys.insert(organization_id.to_owned(), key);
                    }
                    decode_sealed(&self.upcasters, &row, keys[organization_id].as_ref())
                }
            }
            .map_err(|error| FeedError(format!("{}: {error}", row.aggregate_id)))?;
            events.push(RecordedEvent {
                checkpoint: row.checkpoint,
                organization_id: row.aggregate_id,
                sequence: row.sequence,
                event_type: row.event_type,
                event: event.0,
                metadata: event.1,
                recorded_at: row.recorded_at,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::seal_personal_data;
    use serde_json::{json, Value};

    fn row(event_type: &str, event_version: &str, payload: &Value, metadata: &Value) -> StoredRow {
        StoredRow {
            checkpoint: Checkpoint::default(),
            recorded_at: Utc::now(),
            aggregate_type: "organization".into(),
            aggregate_id: "org-1".into(),
            sequence: 7,
            event_type: event_type.into(),
            event_version: event_version.into(),
            payload: payload.to_string(),
            metadata: metadata.to_string(),
        }
    }

    fn sealed(mut value: Value, key: &DataKey) -> Value {
        seal_personal_data(&mut value, key, b"org-1");
        value
    }

    #[test]
    fn an_event_with_nothing_sealed_decodes_directly_as_the_general_way_does() {
        let key = DataKey::generate();
        let metadata = json!({"actor_type": "user", "actor_id": "olivia", "occurred_at": "2026-11-22T10:00:00Z"});
        let role_change = row(
            "MemberRoleChanged",
            "1",
            &json!({"MemberRoleChanged": {"user_id": "mia", "from": "member", "to": "admin"}}),
            &metadata,
        );
        let upcasters = upcasters();
        let direct = decode_plain(&upcasters, &role_change)
            .expect("nothing sealed, nothing to upcast")
            .unwrap();
        let general = decode_sealed(&upcasters, &role_change, Some(&key)).unwrap();
        assert_eq!(format!("{:?}", direct.0), format!("{:?}", general.0));
        assert_eq!(direct.1, general.1);
        assert_eq!(direct.1["actor_id"], "olivia");
    }

    #[test]
    fn sealed_fields_and_old_versions_take_the_general_way() {
        let key = DataKey::generate();
        let upcasters = upcasters();
        let plain_metadata = json!({"actor_type": "user", "actor_id": "olivia"});
        let joined = row(
            "MemberJoined",
            "1",
            &sealed(
                json!({"MemberJoined": {"user_id": "mia", "email": "mia@example.com", "role": "member"}}),
                &key,
            ),
            &plain_metadata,
        );
        assert!(decode_plain(&upcasters, &joined).is_none());
        let with_client_ip = row(
            "MemberRoleChanged",
            "1",
            &json!({"MemberRoleChanged": {"user_id": "mia", "from": "member", "to": "admin"}}),
            &sealed(json!({"actor_id": "olivia", "client_ip": "10.0.0.1"}), &key),
        );
        assert!(decode_plain(&upcasters, &with_client_ip).is_none());
        let opened = decode_sealed(&upcasters, &with_client_ip, Some(&key)).unwrap();
        assert_eq!(opened.1["client_ip"], "10.0.0.1");
        let erased = decode_sealed(&upcasters, &with_client_ip, None).unwrap();
        assert_eq!(erased.1["client_ip"], orgledger_domain::ERASED);
        assert!(
            upcasters
                .iter()
                .any(|upcaster| upcaster.can_upcast("InvitationSent", "1")),
            "InvitationSent 1 is upcast"
        );
        let old = row(
            "InvitationSent",
            "1",
            &json!({"InvitationSent": {}}),
            &plain_metadata,
        );
        assert!(decode_plain(&upcasters, &old).is_none());
    }
}
