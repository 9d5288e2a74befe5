//! `orgledger verify`: what an auditor runs to check that the stored history holds together.
//! Every organization's events are read back as the service reads them (opened, upcast,
//! decoded) and replayed with the domain's own `apply`; its snapshot is opened and compared
//! with the replay at the same event; the projections' recorded failures are reported.
//! Nothing is written.

use cqrs_es::{Aggregate, DomainEvent};
use orgledger_domain::Organization;
use serde::Serialize;
use uuid::Uuid;

use crate::ledger::LedgerError;
use crate::service::Orgledger;

/// Events read and applied at a time: an old organization's history is never held whole.
const PAGE: usize = 1_000;

/// Something that does not hold together, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The organization, or `None` for the read models.
    pub organization_id: Option<String>,
    /// The event it concerns, when one does.
    pub sequence: Option<usize>,
    pub problem: String,
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub organizations: usize,
    pub events: u64,
    pub snapshots: usize,
    /// Events committed that the read models have not applied yet: not a fault, a lag.
    pub events_not_yet_projected: u64,
    pub findings: Vec<Finding>,
}

/// Checks `only` one organization, or every organization in the log.
pub async fn verify(
    service: &Orgledger,
    only: Option<Uuid>,
    show_progress: bool,
) -> Result<VerifyReport, LedgerError> {
    let mut report = VerifyReport::default();
    let organizations = match only {
        Some(organization_id) => vec![organization_id.to_string()],
        None => service.ledger.organization_ids().await?,
    };
    let bar = if show_progress {
        let bar = indicatif::ProgressBar::new(organizations.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "verifying [{bar:40}] {pos}/{len} organizations, {msg} eta {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    for id in &organizations {
        let Ok(organization_id) = Uuid::parse_str(id) else {
            report.findings.push(Finding {
                organization_id: Some(id.clone()),
                sequence: None,
                problem: "its id is not a UUID".into(),
            });
            bar.inc(1);
            continue;
        };
        verify_organization(service, organization_id, &mut report).await?;
        report.organizations += 1;
        bar.set_message(format!("{} events", report.events));
        bar.inc(1);
    }
    bar.finish_and_clear();
    for status in service
        .projector
        .status()
        .await
        .map_err(|error| LedgerError::Store(error.to_string()))?
    {
        report.events_not_yet_projected += status.backlog;
        if let Some(error) = status.last_error {
            report.findings.push(Finding {
                organization_id: None,
                sequence: None,
                problem: format!(
                    "read model {} stopped at event {}: {error}",
                    status.name,
                    status.failed_event.as_deref().unwrap_or("(none named)")
                ),
            });
        }
    }
    Ok(report)
}

/// One organization: sequences from 1 without a gap, every event readable, the first one
/// its creation, and its snapshot equal to the replay up to the snapshot's event.
async fn verify_organization(
    service: &Orgledger,
    organization_id: Uuid,
    report: &mut VerifyReport,
) -> Result<(), LedgerError> {
    let ledger = &service.ledger;
    let mut found = |sequence: Option<usize>, problem: String| {
        report.findings.push(Finding {
            organization_id: Some(organization_id.to_string()),
            sequence,
            problem,
        });
    };
    // The snapshot first: one stored meanwhile stands at a later event, which the replay
    // below still reaches.
    let snapshot = match ledger.snapshot(organization_id).await {
        Ok(snapshot) => snapshot,
        Err(error) => {
            found(None, format!("its snapshot cannot be opened: {error}"));
            None
        }
    };
    let mut state = Organization::default();
    let mut at_snapshot = None;
    let mut last = 0;
    let mut events = 0_u64;
    let mut unreadable = false;
    let mut page_size = PAGE;
    loop {
        let page = match ledger.events_after(organization_id, last, page_size).await {
            Ok(page) => page,
            // A page fails as a whole: read it again one event at a time to name the event.
            Err(_) if page_size > 1 => {
                page_size = 1;
                continue;
            }
            Err(error) => {
                found(
                    Some(last + 1),
                    format!("the event after {last} cannot be read: {error}"),
                );
                unreadable = true;
                break;
            }
        };
        let complete = page.len() < page_size;
        for event in page {
            if event.sequence != last + 1 {
                found(
                    Some(event.sequence),
                    format!("events {} to {} are missing", last + 1, event.sequence - 1),
                );
            }
            if event.sequence == 1 && event.payload.event_type() != "OrganizationCreated" {
                found(
                    Some(1),
                    format!(
                        "its first event is {}, not OrganizationCreated",
                        event.payload.event_type()
                    ),
                );
            }
            last = event.sequence;
            events += 1;
            state.apply(event.payload);
            if snapshot.as_ref().is_some_and(|(_, at)| *at == last) {
                at_snapshot = Some(state.clone());
            }
        }
        if complete {
            break;
        }
    }
    if events == 0 && !unreadable {
        found(None, "it has no events: no such organization".into());
    }
    if let Some((stored, at)) = snapshot {
        report.snapshots += 1;
        match at_snapshot {
            // The replay stopped short: already reported, and nothing to compare with.
            _ if unreadable => {}
            Some(replayed) if replayed == stored => {}
            Some(_) => found(
                Some(at),
                format!("its snapshot at event {at} differs from the replay of its events"),
            ),
            None => found(
                Some(at),
                format!("its snapshot stands at event {at}, past the events read ({last})"),
            ),
        }
    }
    report.events += events;
    Ok(())
}
