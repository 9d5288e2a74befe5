//! History for auditors: an organization's raw events, and its state at a past moment
//! rebuilt with the domain's own `apply`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, EventEnvelope};
use orgledger_domain::Organization;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::ledger::{continues_command, read_around, Ledger, LedgerError, SnapshotRead};

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
    /// Just after the event with this sequence, and the rest of the command that appended
    /// it.
    Sequence(usize),
    /// Everything that had occurred at or before this instant.
    Time(DateTime<Utc>),
}

/// The organization as it stood then.
#[derive(Debug, Clone, PartialEq)]
pub struct PastState {
    pub organization: Organization,
    pub as_of_sequence: usize,
    /// The instant it stood at, which an invitation's expiry is judged against: the instant
    /// asked for; or when the event asked for occurred, and now when the log does not reach
    /// that event yet (it still stands as it is) or the event does not say when.
    pub moment: DateTime<Utc>,
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

/// Events decoded and applied at a time: an old organization's whole history is never
/// held in memory at once.
const REPLAY_PAGE: usize = 1_000;

/// How long before a moment the snapshot's last event must have occurred for the snapshot
/// to stand for it. An event's `occurred_at` is when its command began, and commands commit
/// in the order they finish, so an earlier event may have occurred a little later: one whose
/// command began after the moment, yet committed before the snapshot's last event, would be
/// in the snapshot and not in the replay. No command runs for a minute.
const OCCURRED_AT_DISORDER: chrono::Duration = chrono::Duration::minutes(1);

/// Replays the events up to the moment, from the latest snapshot (current or past) that
/// stands at or before it; `None` if the organization did not exist then (not yet, or no
/// longer: purged).
pub async fn state_as_of(
    ledger: &Ledger,
    organization_id: Uuid,
    as_of: AsOf,
) -> Result<Option<PastState>, LedgerError> {
    let included = |event: &EventEnvelope<Organization>| match as_of {
        AsOf::Sequence(sequence) => event.sequence <= sequence,
        AsOf::Time(at) => occurred_at(event).is_some_and(|occurred| occurred <= at),
    };
    // A snapshot stands for the moment when every event in it is included, which its last
    // event tells: by its sequence, or by its time with room for commits out of order. The
    // latest one that does is the start; only its state is read (a large organization's
    // takes a while to open).
    let sequences = ledger.snapshot_sequences(organization_id).await?;
    let standing = match as_of {
        AsOf::Sequence(sequence) => sequences.iter().rev().find(|at| **at <= sequence).copied(),
        AsOf::Time(at) => latest_standing_before(ledger, organization_id, &sequences, at).await?,
    };
    // One that does not open is passed over for the one before it (every snapshot before
    // a standing one stands too), loudly: `verify` names it.
    let mut start = None;
    let candidates = sequences.iter().rev().copied();
    for sequence in candidates.filter(|at| standing.is_some_and(|standing| *at <= standing)) {
        match ledger
            .snapshot_standing_at(organization_id, sequence)
            .await?
        {
            SnapshotRead::Usable(state) => {
                start = Some((*state, sequence));
                break;
            }
            SnapshotRead::Damaged(error) => read_around(organization_id, sequence, &error),
            SnapshotRead::Unused => break,
        }
    }
    let (mut organization, mut as_of_sequence) = start.unwrap_or_default();
    let mut last_metadata = None;
    'replay: loop {
        // Up to a sequence, no further than it: a start just before it reads a few events.
        let limit = match as_of {
            AsOf::Sequence(sequence) => REPLAY_PAGE.min(sequence.saturating_sub(as_of_sequence)),
            AsOf::Time(_) => REPLAY_PAGE,
        };
        if limit == 0 {
            break;
        }
        let page = ledger
            .events_after(organization_id, as_of_sequence, limit)
            .await?;
        let complete = page.len() < limit;
        for event in page {
            if !included(&event) {
                break 'replay;
            }
            as_of_sequence = event.sequence;
            // Kept whole, read once at the end: only the last event's time is wanted.
            last_metadata = Some(event.metadata);
            organization.apply(event.payload);
        }
        if complete {
            break;
        }
    }
    // A sequence inside a command: the state is the one its command left, a moment that
    // was. (Its events share their `occurred_at`, so a time never falls inside one.)
    if let AsOf::Sequence(_) = as_of {
        while last_metadata.as_ref().is_some_and(continues_command) {
            let Some(event) = ledger
                .events_after(organization_id, as_of_sequence, 1)
                .await?
                .into_iter()
                .next()
                .filter(|event| event.sequence == as_of_sequence + 1)
            else {
                break;
            };
            as_of_sequence = event.sequence;
            last_metadata = Some(event.metadata);
            organization.apply(event.payload);
        }
    }
    if !organization.exists() {
        return Ok(None);
    }
    let moment = match (as_of, last_metadata) {
        (AsOf::Time(at), _) => at,
        (AsOf::Sequence(asked), _) if asked > as_of_sequence => Utc::now(),
        (AsOf::Sequence(_), Some(metadata)) => occurred_at_in(&metadata).unwrap_or_else(Utc::now),
        // Started from a snapshot at the very event: read when it occurred.
        (AsOf::Sequence(_), None) => ledger
            .events_after(organization_id, as_of_sequence.saturating_sub(1), 1)
            .await?
            .first()
            .filter(|event| event.sequence == as_of_sequence)
            .and_then(occurred_at)
            .unwrap_or_else(Utc::now),
    };
    Ok(Some(PastState {
        organization,
        as_of_sequence,
        moment,
    }))
}

/// Of the snapshots standing at `sequences` (ascending), the latest whose last event occurred
/// at least [`OCCURRED_AT_DISORDER`] before `at`: found by halving, one event read a step.
async fn latest_standing_before(
    ledger: &Ledger,
    organization_id: Uuid,
    sequences: &[usize],
    at: DateTime<Utc>,
) -> Result<Option<usize>, LedgerError> {
    let (mut low, mut high) = (0, sequences.len());
    let mut latest = None;
    while low < high {
        let middle = low + (high - low) / 2;
        let sequence = sequences[middle];
        let last = ledger
            .events_after(organization_id, sequence.saturating_sub(1), 1)
            .await?;
        let stands = last.first().is_some_and(|event| {
            event.sequence == sequence
                && occurred_at(event)
                    .and_then(|occurred| occurred.checked_add_signed(OCCURRED_AT_DISORDER))
                    .is_some_and(|later| later <= at)
        });
        if stands {
            latest = Some(sequence);
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    Ok(latest)
}

fn occurred_at(event: &EventEnvelope<Organization>) -> Option<DateTime<Utc>> {
    occurred_at_in(&event.metadata)
}

fn occurred_at_in(metadata: &HashMap<String, String>) -> Option<DateTime<Utc>> {
    let occurred = metadata.get("occurred_at")?;
    DateTime::parse_from_rfc3339(occurred)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}
