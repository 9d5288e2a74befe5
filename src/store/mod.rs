//! The event store: the sealed event repository over postgres-es / sqlite-es, data keys,
//! and the ordered feed of the whole log that projections read.

mod feed;
mod keys;
mod repository;
mod sealing;

pub use feed::{decode, StoreFeed};
pub use keys::{DataKeys, MasterKey};
pub use orgledger_projections::{Backend, Database, DatabaseError};
pub use repository::{open_event, OrganizationRepository, ReadStats};
pub use sealing::{open_personal_data, seal_personal_data, DataKey, SealError, SEALED_PREFIX};

/// Events after which a new snapshot of an organization is written.
pub const SNAPSHOT_EVERY: usize = 50;

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
}
