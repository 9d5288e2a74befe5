//! The event store: PostgreSQL or SQLite behind one [`Database`] handle, the sealed event
//! repository, data keys and slug reservations.

mod database;
mod keys;
mod repository;
mod sealing;

pub use database::{Backend, Database, StoreError};
pub use keys::{DataKeys, MasterKey};
pub use repository::{OrganizationRepository, ReadStats};
pub use sealing::{open_personal_data, seal_personal_data, DataKey, SealError, SEALED_PREFIX};

/// Events after which a new snapshot of an organization is written.
pub const SNAPSHOT_EVERY: usize = 50;
