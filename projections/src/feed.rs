//! The events a projector reads: the whole log, in commit order, opened and decoded.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orgledger_domain::OrganizationEvent;
use serde::Deserialize;

/// A place in the global log. On PostgreSQL, `(commit_txid, position)` orders events by
/// transaction and stays below the oldest transaction of its database in flight; on SQLite `commit_txid` is 0
/// and `position` alone is commit order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Checkpoint {
    pub commit_txid: i64,
    pub position: i64,
}

/// One event as the projector sees it.
#[derive(Debug, Clone)]
pub struct RecordedEvent {
    pub checkpoint: Checkpoint,
    pub organization_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event: OrganizationEvent,
    pub metadata: EventMetadata,
    pub recorded_at: DateTime<Utc>,
    /// When the command behind the event was decided ([`EventMetadata::occurred_at`]), read
    /// once with the event rather than by each projection that shows it.
    pub occurred_at: DateTime<Utc>,
}

/// What the projections read of an event's metadata: who acted, when, and in which request.
/// None of it is sealed, so reading it never needs the organization's key; the rest of the
/// stored metadata (the client's address and agent, sealed) is skipped unread.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct EventMetadata {
    pub actor_type: Option<String>,
    pub actor_id: Option<String>,
    pub occurred_at: Option<String>,
    pub request_id: Option<String>,
}

impl EventMetadata {
    /// Who acted: a user, a service account, or `system` when the metadata does not say.
    pub fn actor_type(&self) -> &str {
        self.actor_type.as_deref().unwrap_or("system")
    }

    pub fn actor_id(&self) -> &str {
        self.actor_id.as_deref().unwrap_or("system")
    }

    /// When the command behind the event was decided, or, failing that, `recorded_at`: when
    /// it was stored.
    pub fn occurred_at(&self, recorded_at: DateTime<Utc>) -> DateTime<Utc> {
        self.stated_occurred_at().unwrap_or(recorded_at)
    }

    /// When the command behind the event was decided, if the metadata says (and says it as
    /// RFC 3339).
    pub fn stated_occurred_at(&self) -> Option<DateTime<Utc>> {
        self.occurred_at
            .as_deref()
            .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
            .map(|at| at.with_timezone(&Utc))
    }
}

impl RecordedEvent {
    pub fn actor_type(&self) -> &str {
        self.metadata.actor_type()
    }

    pub fn actor_id(&self) -> &str {
        self.metadata.actor_id()
    }

    pub fn describe(&self) -> String {
        format!(
            "{} #{} of organization {} (log position {}, commit {})",
            self.event_type,
            self.sequence,
            self.organization_id,
            self.checkpoint.position,
            self.checkpoint.commit_txid
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FeedError(pub String);

/// Reads the event log. Implemented by the store, which alone can open sealed personal data.
#[async_trait]
pub trait EventFeed: Send + Sync {
    /// Up to `limit` events after `after`, in commit order, never skipping one whose
    /// transaction commits later.
    async fn read_after(
        &self,
        after: Checkpoint,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, FeedError>;

    /// Whether any committed event lies after `after` (cheap: one indexed probe).
    async fn has_events_after(&self, after: Checkpoint) -> Result<bool, FeedError>;

    /// How many events lie after `after`, and when the oldest of them was recorded.
    async fn backlog(&self, after: Checkpoint) -> Result<(u64, Option<DateTime<Utc>>), FeedError>;

    /// Called before reading the whole log (a rebuild): refreshes whatever the store's query
    /// planner knows of the log's size.
    async fn prepare_full_read(&self) -> Result<(), FeedError> {
        Ok(())
    }
}
