//! The whole log in commit order, opened and decoded, for the projector.
//!
//! PostgreSQL assigns `position` at insert, not at commit, so a transaction holding a lower
//! position can commit after a higher one. Reading in `(transaction_id, position)` order and
//! only below the oldest transaction of this database still in flight means every event read
//! is final and none can later appear behind the checkpoint (see [`POSTGRES_READ_AFTER`]).
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
use orgledger_projections::{Checkpoint, EventFeed, EventMetadata, FeedError, RecordedEvent};
use serde_json::Value;
use sqlx::Row;

use super::{open_personal_data, DataKey, DataKeys, Database};

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

/// The log in position order past a checkpoint (SQLite). `CROSS JOIN` keeps `event_log` the
/// outer loop and the `+` keeps its type off the index, so SQLite seeks the position: without
/// statistics it took the type as the better key, read every event and sorted them, on every
/// call (32 ms at 68,000 events, twice a command).
const SQLITE_READ_AFTER: &str = "SELECT 0 AS txid, l.position, l.recorded_at, e.aggregate_type,
                                        e.aggregate_id, e.sequence, e.event_type,
                                        e.event_version, e.payload, e.metadata
                                   FROM event_log l
                                  CROSS JOIN events e
                                     ON e.aggregate_type = l.aggregate_type
                                    AND e.aggregate_id = l.aggregate_id
                                    AND e.sequence = l.sequence
                                  WHERE +l.aggregate_type = 'organization' AND l.position > $1
                                  ORDER BY l.position
                                  LIMIT $2";

/// The log in commit order past a checkpoint (PostgreSQL), below the oldest transaction of
/// this database still in flight as the statement's snapshot saw it.
///
/// The snapshot's `xmin` is that bound for the whole server: a write transaction left open in
/// any other database (another service's, a test's, an idle session) would hold every read
/// model back, and every command would wait out its consistency bound. So when a committed
/// event lies past `xmin` (`held_back`: one probe of `events_commit_order`, starting past
/// `xmin`'s own rows, all in flight) and was recorded more than 10 ms ago, the bound is the
/// lowest transaction in the snapshot's in-flight list not seen running in another database,
/// or the snapshot's `xmax`. The 10 ms: this service's own appends hold events back for a
/// millisecond or two, and reading the activity (0.1 to 0.4 ms) for them cost a command about
/// a tenth more CPU at 32 clients.
///
/// The activity is read after the snapshot was taken, so a transaction that ended in between
/// is not seen at all and keeps bounding the read (its events may be invisible to the
/// snapshot); one seen running elsewhere writes no event here. Running transaction ids lie
/// within 2^31 of each other, so their low 32 bits (the `xid` that `pg_stat_activity` shows)
/// name one. Hence this must run as a statement of its own, never inside a longer transaction,
/// where the activity would be the one read first in that transaction. A hot standby's
/// snapshots list no transaction in flight, so there the bound stays `xmin` (the projector
/// writes and runs on the primary, but nothing here should skip).
const POSTGRES_READ_AFTER: &str = "
    WITH horizon AS MATERIALIZED (
             SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin,
                    (pg_snapshot_xmin(pg_current_snapshot())::text::bigint + 1)::text::xid8
                        AS past_xmin,
                    pg_snapshot_xmax(pg_current_snapshot()) AS xmax
         ),
         held_back AS MATERIALIZED (
             SELECT recorded_at FROM events
              WHERE (transaction_id, position)
                    >= (GREATEST((SELECT past_xmin FROM horizon), $1::bigint::text::xid8),
                        CASE WHEN (SELECT past_xmin FROM horizon) > $1::bigint::text::xid8
                             THEN 0 ELSE $2 + 1 END)
              ORDER BY transaction_id, position
              LIMIT 1
         ),
         bound AS MATERIALIZED (
             SELECT CASE
                 WHEN pg_is_in_recovery()
                      OR NOT EXISTS (SELECT 1 FROM held_back
                                      WHERE recorded_at < clock_timestamp() - interval '10 ms')
                     THEN (SELECT xmin FROM horizon)
                 ELSE (SELECT coalesce(min(x), (SELECT xmax FROM horizon))
                         FROM pg_snapshot_xip(pg_current_snapshot()) AS x
                        WHERE (x::text::bigint & 4294967295) NOT IN (
                                  SELECT backend_xid::text::bigint FROM pg_stat_activity
                                   WHERE backend_xid IS NOT NULL
                                     AND datid <> (SELECT oid FROM pg_database
                                                    WHERE datname = current_database())
                                  UNION ALL
                                  SELECT transaction::text::bigint FROM pg_prepared_xacts
                                   WHERE database <> current_database()))
             END AS below
         )
    SELECT transaction_id::text::bigint AS txid, position, recorded_at,
           aggregate_type, aggregate_id, sequence, event_type, event_version,
           payload::text AS payload, metadata::text AS metadata
      FROM events
     WHERE (transaction_id, position) > ($1::bigint::text::xid8, $2)
       AND transaction_id < (SELECT below FROM bound)
     ORDER BY transaction_id, position
     LIMIT $3";

/// How far the log runs past a checkpoint (SQLite), by position for the same reason.
const SQLITE_BACKLOG: &str = "SELECT count(*), min(recorded_at) FROM event_log
                               WHERE +aggregate_type = 'organization' AND position > $1";

pub struct StoreFeed {
    database: Database,
    keys: DataKeys,
    upcasters: Vec<Box<dyn EventUpcaster>>,
}

/// One row of the log as stored, borrowed from the driver's row: payload and metadata still
/// JSON text, so nothing is copied before it is decoded.
struct StoredRow<'r> {
    checkpoint: Checkpoint,
    recorded_at: DateTime<Utc>,
    aggregate_type: &'r str,
    aggregate_id: &'r str,
    sequence: i64,
    event_type: &'r str,
    event_version: &'r str,
    payload: &'r str,
    metadata: &'r str,
}

/// The columns both backends' reads select, in this order, so a row is read by position
/// (by name, each value was a search of the row's column names).
const TXID: usize = 0;
const POSITION: usize = 1;
const RECORDED_AT: usize = 2;
const AGGREGATE_TYPE: usize = 3;
const AGGREGATE_ID: usize = 4;
const SEQUENCE: usize = 5;
const EVENT_TYPE: usize = 6;
const EVENT_VERSION: usize = 7;
const PAYLOAD: usize = 8;
const METADATA: usize = 9;

/// A [`StoredRow`] borrowed from a row of either backend (a function generic over sqlx's
/// `Row` would need a decode bound for every column type).
macro_rules! stored_row {
    ($row:expr, $recorded_at:expr) => {
        StoredRow {
            checkpoint: Checkpoint {
                commit_txid: $row.try_get(TXID)?,
                position: $row.try_get(POSITION)?,
            },
            recorded_at: $recorded_at,
            aggregate_type: $row.try_get(AGGREGATE_TYPE)?,
            aggregate_id: $row.try_get(AGGREGATE_ID)?,
            sequence: $row.try_get(SEQUENCE)?,
            event_type: $row.try_get(EVENT_TYPE)?,
            event_version: $row.try_get(EVENT_VERSION)?,
            payload: $row.try_get(PAYLOAD)?,
            metadata: $row.try_get(METADATA)?,
        }
    };
}

/// A decoded payload and what the projections read of its metadata.
type Decoded = (OrganizationEvent, EventMetadata);

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
/// Stored JSON is written by serde_json or PostgreSQL's jsonb output, neither of which
/// escapes a letter, so a name cannot hide as `\u0065mail`.
fn names_no_sealed_field(json: &str) -> bool {
    !sealed_field_names()
        .iter()
        .any(|name| json.contains(name.as_str()))
}

/// Whether a row's payload can be decoded straight from its text: it names no sealed field
/// and no upcaster applies to it. Its metadata always can: [`EventMetadata`] holds no sealed
/// field, and those it skips are left sealed.
fn plain_payload(upcasters: &[Box<dyn EventUpcaster>], row: &StoredRow<'_>) -> bool {
    names_no_sealed_field(row.payload)
        && !upcasters
            .iter()
            .any(|upcaster| upcaster.can_upcast(row.event_type, row.event_version))
}

/// Decodes a stored row. A plain payload ([`plain_payload`]) is read straight from its JSON
/// text: going through `serde_json::Value` was most of a rebuild's CPU. Any other is parsed
/// into a `Value`, its sealed strings opened with `key` (erased when it is `None`: the
/// organization was purged), upcast, then decoded; `key` is consulted only then.
fn decode_row(
    upcasters: &[Box<dyn EventUpcaster>],
    row: &StoredRow<'_>,
    plain: bool,
    key: Option<&DataKey>,
) -> Result<Decoded, String> {
    let event = if plain {
        serde_json::from_str(row.payload).map_err(|error| error.to_string())?
    } else {
        let mut payload: Value =
            serde_json::from_str(row.payload).map_err(|error| error.to_string())?;
        open_personal_data(&mut payload, key, row.aggregate_id.as_bytes())
            .map_err(|error| error.to_string())?;
        let stored = SerializedEvent::new(
            row.aggregate_id.to_owned(),
            row.sequence as usize,
            row.aggregate_type.to_owned(),
            row.event_type.to_owned(),
            row.event_version.to_owned(),
            payload,
            Value::Object(serde_json::Map::new()),
        );
        decode(upcasters, stored)?.payload
    };
    let metadata = serde_json::from_str(row.metadata).map_err(|error| error.to_string())?;
    Ok((event, metadata))
}

impl StoreFeed {
    pub fn new(database: Database, keys: DataKeys) -> Self {
        Self {
            database,
            keys,
            upcasters: upcasters(),
        }
    }

    /// Opens and decodes `rows` in order, fetching each organization's data key once, and
    /// only for a row that holds a sealed string.
    async fn decode_rows<'r>(
        &self,
        rows: impl Iterator<Item = Result<StoredRow<'r>, sqlx::Error>>,
    ) -> Result<Vec<RecordedEvent>, FeedError> {
        let mut keys = HashMap::new();
        let mut events = Vec::with_capacity(rows.size_hint().0);
        for row in rows {
            let row = row.map_err(|error| FeedError(error.to_string()))?;
            if row.aggregate_type != Organization::TYPE {
                return Err(FeedError(format!(
                    "the log holds a {:?} event, and the projections read organizations only",
                    row.aggregate_type
                )));
            }
            let plain = plain_payload(&self.upcasters, &row);
            let key = if !plain {
                let organization_id = row.aggregate_id;
                if !keys.contains_key(organization_id) {
                    let key = self
                        .keys
                        .get(organization_id)
                        .await
                        .map_err(|error| FeedError(error.to_string()))?;
                    keys.insert(organization_id.to_owned(), key);
                }
                keys[organization_id].as_ref()
            } else {
                None
            };
            let (event, metadata) = decode_row(&self.upcasters, &row, plain, key)
                .map_err(|error| FeedError(format!("{}: {error}", row.aggregate_id)))?;
            events.push(RecordedEvent {
                checkpoint: row.checkpoint,
                organization_id: row.aggregate_id.to_owned(),
                sequence: row.sequence,
                event_type: row.event_type.to_owned(),
                event,
                occurred_at: metadata.occurred_at(row.recorded_at),
                metadata,
                recorded_at: row.recorded_at,
            });
        }
        Ok(events)
    }
}

#[async_trait]
impl EventFeed for StoreFeed {
    async fn read_after(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, FeedError> {
        let read_failed = |error: sqlx::Error| FeedError(error.to_string());
        match &self.database {
            // No `aggregate_type` predicate: organizations are the log's one aggregate type
            // (`decode_rows` refuses any other), and with it the planner AND-ed a scan of the
            // whole primary key into every read, so each batch cost grew with the log.
            Database::Postgres(pool) => {
                let rows = sqlx::query(POSTGRES_READ_AFTER)
                    .bind(after.commit_txid)
                    .bind(after.position)
                    .bind(limit as i64)
                    .fetch_all(pool)
                    .await
                    .map_err(read_failed)?;
                self.decode_rows(
                    rows.iter()
                        .map(|row| Ok(stored_row!(row, row.try_get(RECORDED_AT)?))),
                )
                .await
            }
            Database::Sqlite(pool) => {
                let rows = sqlx::query(SQLITE_READ_AFTER)
                    .bind(after.position)
                    .bind(limit as i64)
                    .fetch_all(pool)
                    .await
                    .map_err(read_failed)?;
                self.decode_rows(rows.iter().map(|row| {
                    let recorded: &str = row.try_get(RECORDED_AT)?;
                    // A time that does not parse is a read error, never replaced by another:
                    // the audit log and the past states show it.
                    let recorded_at = DateTime::parse_from_rfc3339(recorded)
                        .map(|at| at.with_timezone(&Utc))
                        .map_err(|error| sqlx::Error::ColumnDecode {
                            index: "recorded_at".to_owned(),
                            source: Box::new(error),
                        })?;
                    Ok(stored_row!(row, recorded_at))
                }))
                .await
            }
        }
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
            Database::Sqlite(pool) => sqlx::query_as::<_, (i64, Option<String>)>(SQLITE_BACKLOG)
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
    use crate::store::{open_event, seal_personal_data};
    use serde_json::json;

    /// The text of a stored row, which a [`StoredRow`] borrows.
    struct OwnedRow {
        event_type: String,
        event_version: String,
        payload: String,
        metadata: String,
    }

    impl OwnedRow {
        fn stored(&self) -> StoredRow<'_> {
            StoredRow {
                checkpoint: Checkpoint::default(),
                recorded_at: Utc::now(),
                aggregate_type: "organization",
                aggregate_id: "org-1",
                sequence: 7,
                event_type: &self.event_type,
                event_version: &self.event_version,
                payload: &self.payload,
                metadata: &self.metadata,
            }
        }
    }

    fn row(event_type: &str, event_version: &str, payload: &Value, metadata: &Value) -> OwnedRow {
        OwnedRow {
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

    /// The general way, for every row: both parts through `Value`, opened, upcast, decoded.
    fn general(row: &StoredRow<'_>, key: Option<&DataKey>) -> Decoded {
        let mut stored = SerializedEvent::new(
            row.aggregate_id.to_owned(),
            row.sequence as usize,
            row.aggregate_type.to_owned(),
            row.event_type.to_owned(),
            row.event_version.to_owned(),
            serde_json::from_str(row.payload).unwrap(),
            serde_json::from_str(row.metadata).unwrap(),
        );
        open_event(&mut stored, key).unwrap();
        let envelope = decode(&upcasters(), stored).unwrap();
        let metadata = serde_json::to_value(envelope.metadata).unwrap();
        (envelope.payload, serde_json::from_value(metadata).unwrap())
    }

    fn assert_same(left: &Decoded, right: &Decoded) {
        assert_eq!(format!("{:?}", left.0), format!("{:?}", right.0));
        assert_eq!(left.1, right.1);
    }

    #[test]
    fn every_row_decodes_as_the_general_way_does_with_its_key_and_after_purge() {
        let key = DataKey::generate();
        let upcasters = upcasters();
        let plain_metadata = json!({"actor_type": "user", "actor_id": "olivia", "occurred_at": "2026-11-22T10:00:00Z"});
        let sealed_metadata = sealed(
            json!({"actor_id": "olivia", "request_id": "r-1", "client_ip": "10.0.0.1", "user_agent": "curl/8"}),
            &key,
        );
        let role_change =
            json!({"MemberRoleChanged": {"user_id": "mia", "from": "member", "to": "admin"}});
        let profile = sealed(
            json!({"MemberProfileUpdated": {"user_id": "mia", "first_name": {"from": null, "to": "Mia"}}}),
            &key,
        );
        let invitation_v1 = sealed(
            json!({"InvitationSent": {
                "invitation_id": "01900000-0000-7000-8000-000000010001",
                "email": "nina@example.com", "role": "member",
                "first_name": null, "last_name": null, "title": null, "group_id": null,
                "token_sha256": "abc", "invited_by": {"type": "user", "id": "olivia"},
                "sent_at": "2026-11-01T09:00:00Z", "expires_at": "2026-11-08T09:00:00Z"
            }}),
            &key,
        );
        let rows = [
            row("MemberRoleChanged", "1", &role_change, &plain_metadata),
            row("MemberRoleChanged", "1", &role_change, &sealed_metadata),
            row("MemberProfileUpdated", "1", &profile, &plain_metadata),
            row("MemberProfileUpdated", "1", &profile, &sealed_metadata),
            row("InvitationSent", "1", &invitation_v1, &plain_metadata),
        ];
        for owned in &rows {
            let stored = owned.stored();
            for key in [Some(&key), None] {
                let plain = plain_payload(&upcasters, &stored);
                let decoded = decode_row(&upcasters, &stored, plain, key).unwrap();
                assert_same(&decoded, &general(&stored, key));
            }
        }
        let decoded = |row: &OwnedRow, key| {
            let row = row.stored();
            decode_row(&upcasters, &row, plain_payload(&upcasters, &row), key).unwrap()
        };
        let beside_sealed = decoded(&rows[1], None);
        assert_eq!(beside_sealed.1.actor_id.as_deref(), Some("olivia"));
        assert_eq!(beside_sealed.1.request_id.as_deref(), Some("r-1"));
        let erased = decoded(&rows[3], None);
        assert!(format!("{:?}", erased.0).contains(orgledger_domain::ERASED));
    }

    #[test]
    fn only_rows_whose_payload_names_a_sealed_field_need_their_key() {
        let key = DataKey::generate();
        let upcasters = upcasters();
        let plain_metadata = json!({"actor_type": "user", "actor_id": "olivia"});
        let role_change =
            json!({"MemberRoleChanged": {"user_id": "mia", "from": "member", "to": "admin"}});
        let plain = |event_type: &str, payload: &Value, metadata: &Value| {
            plain_payload(
                &upcasters,
                &row(event_type, "1", payload, metadata).stored(),
            )
        };

        assert!(plain("MemberRoleChanged", &role_change, &plain_metadata));

        let sealed_ip = sealed(json!({"client_ip": "10.0.0.1"}), &key);
        assert!(
            plain("MemberRoleChanged", &role_change, &sealed_ip),
            "sealed metadata is skipped, not opened"
        );

        let joined = sealed(json!({"MemberJoined": {"email": "mia@example.com"}}), &key);
        assert!(!plain("MemberJoined", &joined, &plain_metadata));

        assert!(
            !plain(
                "InvitationSent",
                &json!({"InvitationSent": {}}),
                &plain_metadata
            ),
            "version 1 of InvitationSent is upcast"
        );
    }

    /// SQLite plans these without statistics (a new store has none): each must seek the log
    /// by position, not read the whole of it, whatever its size.
    #[tokio::test]
    async fn the_sqlite_feed_seeks_the_log_by_position() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("feed.db").display());
        let database = Database::connect(&url).await.unwrap();
        database.migrate().await.unwrap();
        let Database::Sqlite(pool) = &database else {
            unreachable!()
        };
        for (sql, parameters) in [(SQLITE_READ_AFTER, 2), (SQLITE_BACKLOG, 1)] {
            let explain = format!("EXPLAIN QUERY PLAN {sql}");
            let mut query = sqlx::query(&explain).bind(0_i64);
            if parameters == 2 {
                query = query.bind(500_i64);
            }
            let plan: Vec<String> = query
                .fetch_all(pool)
                .await
                .unwrap()
                .iter()
                .map(|row| row.get::<String, _>("detail"))
                .collect();
            assert!(
                plan[0].contains("USING INTEGER PRIMARY KEY (rowid>?)"),
                "{plan:?}"
            );
            assert!(
                plan.iter().all(|step| !step.contains("TEMP B-TREE")),
                "{plan:?}"
            );
        }
    }
}
