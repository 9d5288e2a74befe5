//! History for auditors: an organization's raw events, and its state at a past moment
//! rebuilt with the domain's own `apply`.

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use orgledger_domain::Organization;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::ledger::{Ledger, LedgerError};

/// One stored event as recorded: personal data opened, or `[erased]` after purge.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawEvent {
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
}

/// Which past moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// Just after the event with this sequence.
    Sequence(usize),
    /// Everything that had occurred at or before this instant.
    Time(DateTime<Utc>),
}

/// The organization as it stood then.
#[derive(Debug, Clone, PartialEq)]
pub struct PastState {
    pub organization: Organization,
    pub as_of_sequence: usize,
}

pub async fn raw_events(
    ledger: &Ledger,
    organization_id: Uuid,
    after_sequence: usize,
    limit: usize,
) -> Result<Vec<RawEvent>, LedgerError> {
    ledger
        .raw_events(organization_id, after_sequence, limit)
        .await
}

/// Replays the events up to the moment; `None` if the organization did not exist yet.
pub async fn state_as_of(
    ledger: &Ledger,
    organization_id: Uuid,
    as_of: AsOf,
) -> Result<Option<PastState>, LedgerError> {
    let mut organization = Organization::default();
    let mut as_of_sequence = 0;
    for event in ledger.events(organization_id).await? {
        let included = match as_of {
            AsOf::Sequence(sequence) => event.sequence <= sequence,
            AsOf::Time(at) => event
                .metadata
                .get("occurred_at")
                .and_then(|occurred| DateTime::parse_from_rfc3339(occurred).ok())
                .is_some_and(|occurred| occurred <= at),
        };
        if !included {
            break;
        }
        as_of_sequence = event.sequence;
        organization.apply(event.payload);
    }
    Ok((as_of_sequence > 0).then_some(PastState {
        organization,
        as_of_sequence,
    }))
}
