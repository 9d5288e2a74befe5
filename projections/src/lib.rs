//! The read side of orgledger: read models projected from the event log, the durable
//! projector that keeps them current, and the queries and exports served from them.
//!
//! Read-model tables are owned by their projection (their DDL lives with it), so a rebuild
//! can create fresh copies and swap them in. Every statement is one SQL text that runs on
//! PostgreSQL and SQLite alike: ids are text, times are BIGINT microseconds since the epoch,
//! JSON is text.

pub mod audit;
mod cursor;
mod db;
pub mod exports;
mod feed;
pub mod groups;
pub mod invitations;
pub mod members;
pub mod organizations;
mod projector;
pub mod service_accounts;
mod time;

pub use cursor::{fold, page_of, Cursor, CursorError, List, Page};
pub use db::{is_busy, Arg, Backend, Conn, Database, DatabaseError, Transaction, PING_IDLE_FOR};
pub use feed::{Checkpoint, EventFeed, EventMetadata, FeedError, RecordedEvent};
pub use projector::{
    all_projections, projection_named, Projection, ProjectionError, ProjectionStatus, Projector,
    RebuildReport, PROJECTION_NAMES,
};
pub use time::{ceil_micros, from_micros, to_micros};

/// A map a projector builds per batch, keyed by ids from the log: foldhash rather than the
/// standard SipHash, which cost a twentieth of a rebuild's CPU (its seed is still random).
pub(crate) type BatchMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
