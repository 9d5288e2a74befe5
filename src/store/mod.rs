//! The event store: the sealed event repository in the postgres-es / sqlite-es layout, data keys,
//! and the ordered feed of the whole log that projections read.

mod authenticity;
mod feed;
mod group_commit;
mod keys;
mod repository;
mod sealing;

pub use authenticity::{AuthenticatedEvent, Authenticity, EventMacKey, MAC_LEN};
pub use feed::{decode, StoreFeed};
pub use group_commit::{refused, GroupStats};
pub use keys::{DataKeys, MasterKey};
pub use orgledger_projections::{Backend, Database, DatabaseError};
pub use repository::{
    open_event, MacCheck, MarkedEvents, OrganizationRepository, ReadStats, SnapshotMarks,
    SnapshotState, StoredSnapshot, CLAIM_FIELD,
};
pub use sealing::{open_personal_data, seal_personal_data, DataKey, SealError, SEALED_PREFIX};

/// Events after which a new snapshot of an organization is written, for an organization of
/// up to `4 * SNAPSHOT_EVERY` members, invitations, groups and service accounts; larger ones
/// are snapshotted less often (see [`snapshot_interval`]).
pub const SNAPSHOT_EVERY: usize = 50;

/// Events between snapshots of `state`: see `interval_for`.
pub fn snapshot_interval(state: &orgledger_domain::Organization) -> usize {
    interval_for(
        state.members.len()
            + state.invitations.len()
            + state.groups.len()
            + state.service_accounts.len(),
    )
}

/// Events between snapshots of an organization holding `entries` members, invitations,
/// groups and service accounts: [`SNAPSHOT_EVERY`], doubled until it reaches a quarter of
/// the entries. Writing a snapshot costs in proportion to the state and replaying an event
/// does not, so a large organization's snapshots stay rare (a 100,000-member one's every
/// 25,600 events, not every 50, when each took most of a second inside a command). Every
/// interval is `SNAPSHOT_EVERY` times a power of two, so each divides the larger ones: the
/// events after the last snapshot are fewer than the largest interval the organization had
/// since it was taken.
fn interval_for(entries: usize) -> usize {
    let mut interval = SNAPSHOT_EVERY;
    while interval * 4 < entries {
        interval *= 2;
    }
    interval
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Connect(#[from] DatabaseError),
    #[error("sealing failed: {0}")]
    Sealing(#[from] SealError),
    #[error("{0}")]
    Integrity(String),
    /// A blocking task (opening a large snapshot's state) panicked or was cancelled.
    #[error("a blocking task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The append carried an idempotency claim that a retry has taken over (its lease
    /// lapsed): nothing was stored, and the retry runs the command.
    #[error("the request's Idempotency-Key was taken over by a retry; nothing was stored")]
    ClaimTakenOver,
    /// A failure shared by the appends of one group commit.
    #[error("database error: {0}")]
    Shared(std::sync::Arc<sqlx::Error>),
}

impl StoreError {
    /// The database did not take the work in time (see [`orgledger_projections::is_busy`]).
    pub fn is_busy(&self) -> bool {
        match self {
            Self::Database(error) => orgledger_projections::is_busy(error),
            Self::Shared(error) => orgledger_projections::is_busy(error),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_grow_rarer_only_past_a_quarter_of_the_state() {
        assert_eq!(interval_for(0), SNAPSHOT_EVERY);
        assert_eq!(interval_for(4 * SNAPSHOT_EVERY), SNAPSHOT_EVERY);
        assert_eq!(interval_for(4 * SNAPSHOT_EVERY + 1), 2 * SNAPSHOT_EVERY);
        assert_eq!(interval_for(1_000), 400);
        assert_eq!(interval_for(100_000), 25_600);
    }
}
