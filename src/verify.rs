//! `orgledger verify`: what an auditor runs to check that the stored history holds together.
//! Every organization's events are read back as the service reads them (opened, upcast,
//! decoded) and replayed with the domain's own `apply`; each event's MAC is checked against
//! the event as stored; its snapshot is opened and compared with the replay at the same
//! event; a log that ends before what the read models applied is named; the read models'
//! rows for it (every audit entry among them, column by column) are compared with what its
//! events make; the projections' recorded failures are reported.
//! It only reads: `cli` opens the store without migrating or preparing anything.

use std::collections::BTreeMap;

use cqrs_es::Aggregate;
use futures::StreamExt;
use orgledger_domain::{Lifecycle, Organization, OrganizationEvent};
use orgledger_projections::audit::{self, StoredEntry};
use orgledger_projections::organizations::{
    self, AiProviderView, CustomRoleView, IntBool, OrganizationView, SettingsView,
};
use orgledger_projections::service_accounts::{self, ServiceAccountView};
use orgledger_projections::{fold, Database, EventMetadata};
use serde::Serialize;
use uuid::Uuid;

use crate::ledger::{LedgerError, SnapshotRead};
use crate::service::Orgledger;
use crate::store::Authenticity;

/// Events read and applied at a time: an old organization's history is never held whole.
const PAGE: usize = 1_000;

/// Organizations checked at once.
const ORGANIZATIONS_AT_ONCE: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("no organization {0} in the log")]
    UnknownOrganization(Uuid),
    /// Verification could not go on: not a finding about the data.
    #[error("the database stopped answering: {0}")]
    Unreachable(String),
    #[error("the read models' positions could not be read: {0}")]
    ReadModels(String),
    #[error("the events' MACs could not be read: {0}")]
    Macs(String),
    #[error("the events' recording times could not be read: {0}")]
    RecordingTimes(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

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
    /// Events whose MAC matches them.
    pub events_authenticated: u64,
    /// Snapshots compared with the replay.
    pub snapshots: usize,
    /// Snapshots in a state shape this version no longer reads, or derived under older
    /// state rules: loads ignore them and replay the events, and the next snapshot replaces
    /// the current one (those kept for past moments stay, unused). Not a fault.
    pub snapshots_not_compared: usize,
    /// Whether the read models' lag and failures were looked at (a whole-log run). An
    /// organization's own rows in them are compared with its history either way.
    pub read_models_checked: bool,
    /// Committed events the furthest-behind read model has not applied yet: a lag.
    pub events_not_yet_projected: u64,
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    /// Adds one organization's counts and findings (`own`) to the whole run's.
    fn absorb(&mut self, own: VerifyReport) {
        // Every field named, so that a new one is not forgotten here.
        let VerifyReport {
            organizations: _,
            events,
            events_authenticated,
            snapshots,
            snapshots_not_compared,
            read_models_checked: _,
            events_not_yet_projected: _,
            findings,
        } = own;
        self.events += events;
        self.events_authenticated += events_authenticated;
        self.snapshots += snapshots;
        self.snapshots_not_compared += snapshots_not_compared;
        self.findings.extend(findings);
    }
}

/// Checks `only` one organization, or every organization in the log, their slugs' uniqueness
/// and the read models.
pub async fn verify(
    service: &Orgledger,
    only: Option<Uuid>,
    show_progress: bool,
) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport::default();
    // What the read models applied, read before the log: whatever they record is in the log
    // by the time it is read.
    let applied = service
        .projector
        .applied_versions(only.map(|id| id.to_string()).as_deref())
        .await
        .map_err(|error| VerifyError::ReadModels(error.to_string()))?;
    let organizations = match only {
        Some(organization_id) => {
            let id = organization_id.to_string();
            match service
                .ledger
                .next_sequence_after(organization_id, 0)
                .await?
            {
                Some(_) => vec![id],
                // Its events all gone: a finding below.
                None if applied.contains_key(&id) => Vec::new(),
                None => return Err(VerifyError::UnknownOrganization(organization_id)),
            }
        }
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
    // Each slug's holders among the organizations not purged, as their histories replay.
    let mut slugs: std::collections::BTreeMap<String, Vec<Uuid>> = Default::default();
    // A few organizations at once, so that one's reads overlap another's replay; their
    // reports are taken in the log's order, so findings come out as one at a time would.
    let mut checks = futures::stream::iter(organizations.iter().map(|id| {
        let applied = applied.get(id).map(|version| *version as usize);
        async move {
            let Ok(organization_id) = Uuid::parse_str(id) else {
                let finding = Finding {
                    organization_id: Some(id.clone()),
                    sequence: None,
                    problem: "its id is not a UUID".into(),
                };
                let own = VerifyReport {
                    findings: vec![finding],
                    ..VerifyReport::default()
                };
                return Ok((None, own));
            };
            let mut own = VerifyReport::default();
            let slug = verify_organization(service, organization_id, applied, &mut own).await?;
            Ok::<_, VerifyError>((slug.map(|slug| (slug, organization_id)), own))
        }
    }))
    .buffered(ORGANIZATIONS_AT_ONCE);
    while let Some(checked) = checks.next().await {
        let (slug, own) = checked?;
        if let Some((slug, organization_id)) = slug {
            slugs.entry(slug).or_default().push(organization_id);
        }
        report.absorb(own);
        report.organizations += 1;
        bar.set_message(format!("{} events", report.events));
        bar.inc(1);
    }
    bar.finish_and_clear();
    // An organization the read models know and the log does not: every event of it gone.
    let logged: std::collections::HashSet<&String> = organizations.iter().collect();
    let mut vanished: Vec<(&String, &i64)> = applied
        .iter()
        .filter(|(id, _)| !logged.contains(id))
        .collect();
    vanished.sort();
    for (id, version) in vanished {
        report.findings.push(Finding {
            organization_id: Some(id.clone()),
            sequence: Some(1),
            problem: cut_short(1, *version as usize),
        });
    }
    // The contract's slugs are unique among organizations not purged; renames racing could
    // break that (ARCHITECTURE, slugs). The histories were replayed a few at a time while
    // the service may run: a pair is named only if their latest states still share the slug.
    for (slug, holders) in slugs.iter().filter(|(_, holders)| holders.len() > 1) {
        let mut still = Vec::with_capacity(holders.len());
        for holder in holders {
            // One that no longer loads (its own findings say why) is taken as replayed.
            let holds = match service.ledger.load(*holder).await {
                Ok((state, _)) => state.exists() && state.slug == *slug,
                Err(_) => true,
            };
            if holds {
                still.push(*holder);
            }
        }
        if still.len() < 2 {
            continue;
        }
        for holder in &still {
            let others: Vec<String> = still
                .iter()
                .filter(|other| *other != holder)
                .map(Uuid::to_string)
                .collect();
            report.findings.push(Finding {
                organization_id: Some(holder.to_string()),
                sequence: None,
                problem: format!("its slug {slug:?} is also held by {}", others.join(", ")),
            });
        }
    }
    if only.is_none() {
        verify_read_models(service, &mut report).await?;
    }
    Ok(report)
}

async fn verify_read_models(
    service: &Orgledger,
    report: &mut VerifyReport,
) -> Result<(), VerifyError> {
    let statuses = service
        .projector
        .status()
        .await
        .map_err(|error| VerifyError::ReadModels(error.to_string()))?;
    report.read_models_checked = true;
    for status in statuses {
        report.events_not_yet_projected = report.events_not_yet_projected.max(status.backlog);
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
    Ok(())
}

/// A read that failed is a finding about the data only while the database answers.
async fn still_answering(database: &Database) -> Result<(), VerifyError> {
    let answered = orgledger_projections::with_pool!(database, pool => {
        sqlx::query("SELECT 1").execute(pool).await.map(drop)
    });
    answered.map_err(|error| VerifyError::Unreachable(error.to_string()))
}

/// `read`, and once more after the database answers if it failed: a connection lost
/// mid-read is not a fault of the data. The second outcome is the data's.
async fn read_twice<T, E, Read>(
    database: &Database,
    read: impl Fn() -> Read,
) -> Result<Result<T, E>, VerifyError>
where
    Read: std::future::Future<Output = Result<T, E>>,
{
    match read().await {
        Ok(value) => Ok(Ok(value)),
        Err(_) => {
            still_answering(database).await?;
            Ok(read().await)
        }
    }
}

/// One organization: sequences from 1 without a gap, every event readable and carrying a
/// MAC that matches it, the first one its creation, its snapshot and those kept for past
/// moments each equal to the replay up to its event, and its last event no earlier than the
/// read models' (`applied`).
/// Returns its slug unless it is purged.
async fn verify_organization(
    service: &Orgledger,
    organization_id: Uuid,
    applied: Option<usize>,
    report: &mut VerifyReport,
) -> Result<Option<String>, VerifyError> {
    let ledger = &service.ledger;
    let mut findings = Vec::new();
    let mut found = |sequence: Option<usize>, problem: String| {
        findings.push(Finding {
            organization_id: Some(organization_id.to_string()),
            sequence,
            problem,
        });
    };
    // The key before the events: a purge appends its event before it destroys the key, so a
    // key already gone means the replay reaches that event.
    let keyed = has_key(ledger, organization_id).await?;
    // The snapshot before the events: one stored meanwhile stands at a later event, which
    // the replay below still reaches.
    let marks = ledger.snapshot_marks(organization_id).await?;
    let snapshot = match marks {
        None => None,
        Some(marks) => {
            match read_twice(ledger.database(), || ledger.snapshot(organization_id)).await? {
                Ok(Some(snapshot)) => Some(snapshot),
                // Without its key: the finding after the replay says so.
                Ok(None) if !keyed => None,
                Ok(None) => {
                    report.snapshots_not_compared += 1;
                    None
                }
                Err(error) => {
                    found(
                        Some(marks.last_sequence),
                        format!("its snapshot cannot be opened: {error}"),
                    );
                    None
                }
            }
        }
    };
    // The snapshots it replaced, kept for past moments: each compared with the replay where
    // it stands.
    let current = marks.map(|marks| marks.last_sequence);
    let mut past: std::collections::VecDeque<usize> = ledger
        .snapshot_sequences(organization_id)
        .await?
        .into_iter()
        .filter(|at| Some(*at) != current)
        .collect();
    let mut state = Organization::default();
    let mut entries = ExpectedEntries::new(organization_id, keyed);
    let mut invitations = ExpectedInvitations::default();
    let mut at_snapshot = None;
    // The first event that could not be read: the replay after it is not the history.
    let mut unreadable = None;
    let mut last = 0;
    let mut events = 0_u64;
    // A page fails as a whole: it is read again one event at a time, up to its end, to name
    // the events that fail.
    let mut one_at_a_time_until = 0;
    loop {
        let page_size = if last < one_at_a_time_until { 1 } else { PAGE };
        let page = match ledger
            .events_after_as_stored(organization_id, last, page_size)
            .await
        {
            Ok(page) => page,
            Err(_) if page_size > 1 => {
                one_at_a_time_until = last + PAGE;
                continue;
            }
            Err(_) => {
                // Once more after the database answers: a connection lost mid-read is not a
                // fault of the event.
                still_answering(ledger.database()).await?;
                let error = match ledger
                    .events_after_as_stored(organization_id, last, 1)
                    .await
                {
                    Ok(_) => continue,
                    Err(error) => error,
                };
                let Some(sequence) = ledger.next_sequence_after(organization_id, last).await?
                else {
                    break;
                };
                if sequence != last + 1 {
                    found(Some(sequence), missing(last + 1, sequence - 1));
                }
                found(Some(sequence), format!("it cannot be read: {error}"));
                unreadable.get_or_insert(sequence);
                last = sequence;
                // The replay up to those is not the history: nothing to compare them with,
                // and what is wrong is already reported.
                while past.front().is_some_and(|at| *at <= last) {
                    past.pop_front();
                }
                continue;
            }
        };
        let complete = page.len() < page_size;
        for event in page {
            if event.sequence != last + 1 {
                found(Some(event.sequence), missing(last + 1, event.sequence - 1));
            }
            if event.sequence == 1
                && !matches!(event.payload, OrganizationEvent::OrganizationCreated(_))
            {
                found(
                    Some(1),
                    format!(
                        "the first event is {}, not OrganizationCreated",
                        cqrs_es::DomainEvent::event_type(&event.payload)
                    ),
                );
            }
            last = event.sequence;
            events += 1;
            entries.push(&event);
            invitations.push(&event.payload);
            state.apply(event.payload);
            if snapshot.as_ref().is_some_and(|(_, at)| *at == last) {
                at_snapshot = Some(state.clone());
            }
            while let Some(at) = past.front().copied().filter(|at| *at <= last) {
                past.pop_front();
                if unreadable.is_some() {
                    // The replay up to it skipped an event: already reported.
                    continue;
                }
                if at < last {
                    found(
                        Some(at),
                        format!("event {at}, where a past snapshot stands, is missing"),
                    );
                    continue;
                }
                let stored = read_twice(ledger.database(), || {
                    ledger.snapshot_standing_at(organization_id, at)
                })
                .await?
                .unwrap_or_else(|error| SnapshotRead::Damaged(error.to_string()));
                if matches!(stored, SnapshotRead::Usable(_)) {
                    report.snapshots += 1;
                }
                match stored {
                    SnapshotRead::Usable(stored) if *stored == state => {}
                    SnapshotRead::Usable(_) => found(
                        Some(at),
                        format!(
                            "its past snapshot at event {at} differs from the replay of its events"
                        ),
                    ),
                    SnapshotRead::Unused if !keyed => {}
                    SnapshotRead::Unused => report.snapshots_not_compared += 1,
                    SnapshotRead::Damaged(error) => found(
                        Some(at),
                        format!("its past snapshot at event {at} cannot be opened: {error}"),
                    ),
                }
            }
        }
        if complete {
            break;
        }
    }
    // Without its key an organization's personal data reads as erased, without an error:
    // only a purge may have destroyed it. A purged one's leftover snapshot (a purge
    // interrupted between the two) cannot be opened by anyone: not a fault.
    if events > 0 && !keyed && state.lifecycle != Lifecycle::Purged {
        found(
            marks.map(|marks| marks.last_sequence),
            "its data key is missing though it was never purged: its personal data reads as \
             erased"
                .into(),
        );
    }
    if let Some((stored, at)) = snapshot {
        report.snapshots += 1;
        match at_snapshot {
            // The replay up to the snapshot skipped an event: already reported, and not a
            // state to compare with.
            _ if unreadable.is_some_and(|bad| bad <= at) => {}
            Some(replayed) if replayed == stored => {}
            Some(_) => found(
                Some(at),
                format!("its snapshot at event {at} differs from the replay of its events"),
            ),
            None if at < last => found(
                Some(at),
                format!("event {at}, where its snapshot stands, is missing"),
            ),
            None => found(
                Some(at),
                format!("its snapshot stands at event {at}, past its last event ({last})"),
            ),
        }
    }
    for at in past {
        found(
            Some(at),
            format!("a past snapshot stands at event {at}, past its last event ({last})"),
        );
    }
    verify_macs(service, organization_id, last, report, &mut found).await?;
    verify_recording_times(ledger.database(), organization_id, &mut found).await?;
    if unreadable.is_none() && last > 0 {
        let replay = Replay {
            state: &state,
            entries: &entries,
            invitations: &invitations,
            last,
            keyed,
        };
        verify_read_models_of(ledger, organization_id, replay, &mut found).await?;
    }
    // The read models record the last event they applied of each organization: a log that
    // ends before it lost its last events, which no gap shows.
    if let Some(applied) = applied.filter(|applied| *applied > last) {
        found(Some(last + 1), cut_short(last + 1, applied));
    }
    report.events += events;
    report.findings.extend(findings);
    Ok(state.exists().then_some(state.slug))
}

/// Checks the MAC of each of the organization's events up to `through` (where the replay
/// stopped) against the event as stored.
async fn verify_macs(
    service: &Orgledger,
    organization_id: Uuid,
    through: usize,
    report: &mut VerifyReport,
    found: &mut impl FnMut(Option<usize>, String),
) -> Result<(), VerifyError> {
    let ledger = &service.ledger;
    let mut last = 0;
    while last < through {
        let page = read_twice(ledger.database(), || {
            ledger.authenticity_after(organization_id, last, PAGE)
        })
        .await?
        .map_err(|error| VerifyError::Macs(error.to_string()))?;
        let complete = page.len() < PAGE;
        for check in page
            .into_iter()
            .take_while(|check| check.sequence <= through)
        {
            last = check.sequence;
            match check.authenticity {
                Some(Authenticity::Authentic) => report.events_authenticated += 1,
                Some(Authenticity::Altered) => found(
                    Some(check.sequence),
                    "its MAC does not match it: it was altered, moved from elsewhere, or \
                     written without the master key"
                        .into(),
                ),
                Some(Authenticity::Unmarked) if check.stored_before_macs => found(
                    Some(check.sequence),
                    "it carries no MAC: a version before MACs stored it (`orgledger migrate \
                     --authenticate-legacy-events` gives it one, on a store whose rows are \
                     trusted)"
                        .into(),
                ),
                Some(Authenticity::Unmarked) => found(
                    Some(check.sequence),
                    "it carries no MAC, and no version before MACs stored it: it was written \
                     without the master key"
                        .into(),
                ),
                // Not JSON: the replay above names it.
                None => {}
            }
        }
        if complete {
            break;
        }
    }
    Ok(())
}

/// Compares what the read models hold of the organization with its history, each where it
/// stands at the organization's last event `last` (one that lags, or moved on while this
/// ran, is not compared): its members, their roles and (where the replay opens them) their
/// profiles; one audit entry for each of its events (only its purge's, once purged); its
/// pending invitations and the role each offers; its groups, their names and members; and
/// every audit entry, column by column, with the entry its event makes.
async fn verify_read_models_of(
    ledger: &crate::ledger::Ledger,
    organization_id: Uuid,
    replay: Replay<'_>,
    found: &mut impl FnMut(Option<usize>, String),
) -> Result<(), VerifyError> {
    use orgledger_projections::args;
    let Replay {
        state,
        entries: expected_entries,
        invitations: expected_invitations,
        last,
        keyed,
    } = replay;
    let database = ledger.database();
    let id = organization_id.to_string();
    let failed = |error: sqlx::Error| VerifyError::ReadModels(error.to_string());
    let at_last = || async {
        let rows: Vec<(String, i64)> = database
            .fetch_all(
                "SELECT projection, version FROM projected_versions
                  WHERE organization_id = $1
                    AND projection IN ('members', 'audit_log', 'invitations', 'groups',
                                       'organizations', 'service_accounts')",
                &args![id.as_str()],
            )
            .await?;
        Ok::<_, sqlx::Error>(
            rows.into_iter()
                .filter(|(_, version)| *version as usize == last)
                .map(|(projection, _)| projection)
                .collect::<std::collections::HashSet<String>>(),
        )
    };
    let before = at_last().await.map_err(failed)?;
    if before.is_empty() {
        return Ok(());
    }
    // Only the read models that stand at the last event are read: another's table is not
    // looked at, so it can neither fail this check nor be compared.
    let members: Vec<HeldMember> = rows_if_at_last(
        database,
        &before,
        "members",
        "SELECT user_id, role, email, first_name, last_name, title, image_url, joined_at_us,
                group_ids, locked_fields, first_name_folded, last_name_folded
           FROM rm_members WHERE organization_id = $1",
        &args![id.as_str()],
    )
    .await?;
    let entries: Vec<(i64, Option<i64>, Option<i64>)> = rows_if_at_last(
        database,
        &before,
        "audit_log",
        "SELECT count(*), min(sequence), max(sequence) FROM rm_audit_log
          WHERE organization_id = $1",
        &args![organization_id],
    )
    .await?;
    let invitations: Vec<HeldInvitation> = rows_if_at_last(
        database,
        &before,
        "invitations",
        "SELECT id, role, email, first_name, last_name, title, group_id, status, invited_by_type,
                invited_by_id, sent_at_us, expires_at_us, max_uses, uses, token_sha256,
                accepted_at_us, revoked_at_us
           FROM rm_invitations WHERE organization_id = $1",
        &args![id.as_str()],
    )
    .await?;
    let groups: Vec<(String, String, String, Option<String>, i64)> = rows_if_at_last(
        database,
        &before,
        "groups",
        "SELECT id, name, member_ids, description, created_at_us FROM rm_groups
          WHERE organization_id = $1",
        &args![id.as_str()],
    )
    .await?;
    let settings = if before.contains("organizations") {
        Some(HeldSettings::read(database, &id).await.map_err(failed)?)
    } else {
        None
    };
    let accounts = if before.contains("service_accounts") {
        held_service_accounts(database, &id).await.map_err(failed)?
    } else {
        BTreeMap::new()
    };
    // Its entries, column by column, only when there are as many as its history makes.
    let (count, first, latest) = entries.first().copied().unwrap_or((0, None, None));
    let purged = state.lifecycle == Lifecycle::Purged;
    let whole = if purged {
        count == 1 && first == Some(last as i64)
    } else {
        count == last as i64 && first == Some(1) && latest == Some(last as i64)
    };
    // A purged organization's one entry, its tombstone, holds no personal data: compared
    // though its key is gone.
    let altered = if whole && (keyed || purged) && before.contains("audit_log") {
        expected_entries.altered(database, purged).await?
    } else {
        Vec::new()
    };
    // Moved on meanwhile: what was read may be a later state than the replay's.
    let after = at_last().await.map_err(failed)?;
    let compared = |projection: &str| before.contains(projection) && after.contains(projection);
    // Purge deletes an organization's rows from every read model but the audit log.
    let expected = |rows: Vec<String>| if purged { Vec::new() } else { rows };
    if compared("members") {
        // Who holds which role, named; then what else both sides hold of each member, by
        // the fields that differ (a profile is personal data), its profile only where the
        // replay could open it.
        let held_fields = members
            .iter()
            .map(|member| (member.user_id.clone(), member.fields(keyed)))
            .collect();
        let expected_fields = state
            .members
            .iter()
            .map(|(user, member)| (user.as_str().to_owned(), member_fields(member, keyed)))
            .collect();
        let held = members
            .into_iter()
            .map(|member| format!("{} as {}", member.user_id, member.role))
            .collect();
        let events_say = expected(
            state
                .members
                .iter()
                .map(|(user, member)| format!("{} as {}", user.as_str(), member.role.as_str()))
                .collect(),
        );
        differs("members", held, events_say, found);
        compare_shared_rows("members", held_fields, expected_fields, found);
    }
    if compared("invitations") {
        // Every invitation, pending or ended (the replayed state keeps only the pending
        // ones): each row as the events that made it say, who it was for only where the
        // replay could open it.
        let held = invitations
            .iter()
            .map(|invitation| (invitation.id.clone(), invitation.fields(keyed)))
            .collect();
        compare_rows("invitations", held, expected_invitations.rows(keyed), found);
    }
    if compared("groups") {
        let held_fields = groups
            .iter()
            .map(|(id, _, _, description, created_at_us)| {
                let fields = serde_json::json!({
                    "description": description,
                    "created_at": created_at_us,
                });
                (id.clone(), fields)
            })
            .collect();
        let expected_fields = state
            .groups
            .iter()
            .map(|(id, group)| {
                let fields = serde_json::json!({
                    "description": group.description,
                    "created_at": orgledger_projections::to_micros(group.created_at),
                });
                (id.to_string(), fields)
            })
            .collect();
        let held = groups
            .into_iter()
            .map(|(id, name, member_ids, ..)| {
                let mut member_ids: Vec<String> =
                    serde_json::from_str(&member_ids).unwrap_or_else(|_| vec![member_ids]);
                member_ids.sort();
                format!("{id} {name:?} of [{}]", member_ids.join(", "))
            })
            .collect();
        let events_say = expected(
            state
                .groups
                .iter()
                .map(|(id, group)| {
                    let member_ids: Vec<&str> =
                        group.member_ids.iter().map(|user| user.as_str()).collect();
                    format!("{id} {:?} of [{}]", group.name, member_ids.join(", "))
                })
                .collect(),
        );
        differs("groups", held, events_say, found);
        compare_shared_rows("groups", held_fields, expected_fields, found);
    }
    if let (Some(held), true) = (settings, compared("organizations")) {
        let expected = HeldSettings::of(state, &id, last);
        compare_rows(
            "organizations",
            held.organization,
            expected.organization,
            found,
        );
        compare_rows(
            "AI providers",
            held.ai_providers,
            expected.ai_providers,
            found,
        );
        compare_rows("custom roles", held.roles, expected.roles, found);
    }
    if compared("service_accounts") {
        compare_rows(
            "service accounts",
            accounts,
            expected_service_accounts(state),
            found,
        );
    }
    if compared("audit_log") {
        if !whole {
            found(
                None,
                format!(
                    "its audit log holds {count} entries where its history has {}",
                    if purged {
                        "its purge's alone".to_owned()
                    } else {
                        format!("one for each of its {last} events")
                    }
                ),
            );
        }
        report_altered_entries(ledger, organization_id, &altered, found).await?;
    }
    Ok(())
}

/// Rows of a read model by their id, each as JSON: compared field by field.
type Rows = BTreeMap<String, serde_json::Value>;

/// What the organizations read model holds for one organization: its directory row (its
/// settings among them), its AI providers and its custom roles, as the API shows them.
struct HeldSettings {
    organization: Rows,
    ai_providers: Rows,
    roles: Rows,
}

impl HeldSettings {
    async fn read(database: &Database, id: &str) -> Result<Self, sqlx::Error> {
        use orgledger_projections::args;
        let organization = organizations::get(database, id).await?;
        // Not shown, but what `q` searches.
        let folded: Vec<(String,)> = database
            .fetch_all(
                "SELECT name_folded FROM rm_organizations WHERE id = $1",
                &args![id],
            )
            .await?;
        let ai_providers = organizations::ai_providers(database, id).await?;
        let roles = organizations::custom_roles(database, id).await?;
        let mut organization = rows(organization, |row| row.id.clone());
        if let (Some(serde_json::Value::Object(fields)), Some((folded,))) =
            (organization.get_mut(id), folded.into_iter().next())
        {
            fields.insert("name_folded".to_owned(), folded.into());
        }
        Ok(Self {
            organization,
            ai_providers: rows(ai_providers, |provider| provider.id.clone()),
            roles: rows(roles, |role| role.key.clone()),
        })
    }

    /// The same, as the replayed `state` makes them: nothing once purged; no directory row
    /// for a history that never created its organization (an import), whose providers and
    /// roles are still kept.
    fn of(state: &Organization, id: &str, last: usize) -> Self {
        let (status, deleted_at, purge_after) = match &state.lifecycle {
            Lifecycle::Active => ("active", None, None),
            Lifecycle::Deleted {
                deleted_at,
                purge_after,
            } => ("deleted", Some(*deleted_at), Some(*purge_after)),
            Lifecycle::Unborn => ("", None, None),
            Lifecycle::Purged => {
                return Self {
                    organization: Rows::new(),
                    ai_providers: Rows::new(),
                    roles: Rows::new(),
                }
            }
        };
        let organization = OrganizationView {
            id: id.to_owned(),
            name: state.name.clone(),
            slug: state.slug.clone(),
            kind: unit_name(&state.kind),
            status: status.to_owned(),
            created_at: stored_time(state.created_at.unwrap_or_default()),
            deleted_at: deleted_at.map(stored_time),
            purge_after: purge_after.map(stored_time),
            member_count: state.members.len() as i64,
            version: last as i64,
            settings: SettingsView {
                timezone: state.settings.timezone.clone(),
                logo_url: state.settings.logo_url.clone(),
                workflow_mode: unit_name(&state.settings.workflow_mode),
                default_invite_expiry_days: i64::from(state.settings.default_invite_expiry_days),
                client_restrictions: serde_json::to_value(&state.client_restrictions)
                    .unwrap_or_default(),
                smart_tool_routing: state.smart_tool_routing,
                plan: state.plan.name.clone(),
                seats: state.plan.seats.map(i64::from),
            },
        };
        let ai_providers = state
            .ai_providers
            .iter()
            .map(|(id, provider)| AiProviderView {
                id: id.to_string(),
                name: provider.name.clone(),
                kind: provider.kind.clone(),
                enabled: IntBool(provider.enabled),
                api_key_last4: provider.api_key_last4.clone(),
            });
        let roles = state.roles.iter().map(|(key, role)| CustomRoleView {
            key: key.clone(),
            name: role.name.clone(),
            permissions: role
                .permissions
                .iter()
                .filter_map(|permission| permission.grantable_name())
                .map(str::to_owned)
                .collect(),
        });
        let mut organization = rows([organization], |row| row.id.clone());
        if let Some(serde_json::Value::Object(fields)) = organization.get_mut(id) {
            fields.insert("name_folded".to_owned(), fold(&state.name).into());
        }
        if state.lifecycle == Lifecycle::Unborn {
            organization.clear();
        }
        Self {
            organization,
            ai_providers: rows(ai_providers, |provider| provider.id.clone()),
            roles: rows(roles, |role| role.key.clone()),
        }
    }
}

/// The organization's service accounts as the API shows them, with each key's hash (never
/// shown, but what a key is checked against).
async fn held_service_accounts(database: &Database, id: &str) -> Result<Rows, sqlx::Error> {
    use orgledger_projections::args;
    let mut accounts = rows(service_accounts::list(database, id).await?, |account| {
        account.id.clone()
    });
    let hashes: Vec<(String, String)> = database
        .fetch_all(
            "SELECT id, key_sha256 FROM rm_service_accounts WHERE organization_id = $1",
            &args![id],
        )
        .await?;
    for (account, hash) in hashes {
        if let Some(serde_json::Value::Object(fields)) = accounts.get_mut(&account) {
            fields.insert("key_sha256".to_owned(), hash.into());
        }
    }
    Ok(accounts)
}

fn expected_service_accounts(state: &Organization) -> Rows {
    if state.lifecycle == Lifecycle::Purged {
        return Rows::new();
    }
    state
        .service_accounts
        .iter()
        .map(|(id, account)| {
            let view = ServiceAccountView {
                id: id.to_string(),
                name: account.name.clone(),
                description: account.description.clone(),
                scopes: account
                    .scopes
                    .iter()
                    .map(|scope| scope.as_str().to_owned())
                    .collect(),
                key_prefix: account.key_prefix.clone(),
                created_at: stored_time(account.created_at),
                last_rotated_at: account.last_rotated_at.map(stored_time),
            };
            let mut fields = serde_json::to_value(view).unwrap_or_default();
            if let serde_json::Value::Object(fields) = &mut fields {
                fields.insert("key_sha256".to_owned(), account.key_sha256.clone().into());
            }
            (id.to_string(), fields)
        })
        .collect()
}

/// `items` as JSON by the id `id_of` gives each.
fn rows<T: Serialize>(items: impl IntoIterator<Item = T>, id_of: impl Fn(&T) -> String) -> Rows {
    items
        .into_iter()
        .map(|item| {
            let id = id_of(&item);
            (id, serde_json::to_value(item).unwrap_or_default())
        })
        .collect()
}

/// A time as the read models store it: to the microsecond.
fn stored_time(time: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    orgledger_projections::from_micros(orgledger_projections::to_micros(time))
}

/// A unit enum's name as stored (`Team` as `team`).
fn unit_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        other => format!("{other:?}"),
    }
}

/// Reports the rows of a read model (`what`) that only one side holds, by their ids, and
/// those both hold that differ, by their ids and the fields that differ: not their values,
/// which may be secrets' hashes.
fn compare_rows(
    what: &str,
    held: Rows,
    mut expected: Rows,
    found: &mut impl FnMut(Option<usize>, String),
) {
    for (id, row) in held {
        match expected.remove(&id) {
            None => found(
                None,
                format!("its {what} read model holds {id}, which its history does not"),
            ),
            Some(expected) => {
                let mut fields = Vec::new();
                differing_fields(&row, &expected, "", &mut fields);
                if !fields.is_empty() {
                    found(
                        None,
                        format!(
                            "its {what} read model holds {id} differing from its history ({})",
                            fields.join(", ")
                        ),
                    );
                }
            }
        }
    }
    for id in expected.into_keys() {
        found(
            None,
            format!("its {what} read model lacks {id}, which its history holds"),
        );
    }
}

/// Compares only the rows both sides hold: for a read model whose rows either side lacks
/// are already named by another comparison.
fn compare_shared_rows(
    what: &str,
    mut held: Rows,
    mut expected: Rows,
    found: &mut impl FnMut(Option<usize>, String),
) {
    held.retain(|id, _| expected.contains_key(id));
    expected.retain(|id, _| held.contains_key(id));
    compare_rows(what, held, expected, found);
}

/// The fields, by dotted path from `path`, in which `held` and `expected` differ.
fn differing_fields(
    held: &serde_json::Value,
    expected: &serde_json::Value,
    path: &str,
    fields: &mut Vec<String>,
) {
    use serde_json::Value;
    let name = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match (held, expected) {
        (Value::Object(held), Value::Object(expected)) => {
            let keys: std::collections::BTreeSet<&String> =
                held.keys().chain(expected.keys()).collect();
            for key in keys {
                match (held.get(key), expected.get(key)) {
                    (Some(held), Some(expected)) => {
                        differing_fields(held, expected, &name(key), fields)
                    }
                    _ => fields.push(name(key)),
                }
            }
        }
        (held, expected) if held != expected => fields.push(path.to_owned()),
        _ => {}
    }
}

/// A row of the members read model as compared.
#[derive(sqlx::FromRow)]
struct HeldMember {
    user_id: String,
    role: String,
    email: String,
    first_name: Option<String>,
    last_name: Option<String>,
    title: Option<String>,
    image_url: Option<String>,
    joined_at_us: i64,
    group_ids: String,
    locked_fields: String,
    first_name_folded: Option<String>,
    last_name_folded: Option<String>,
}

impl HeldMember {
    /// What is compared beside the role; the profile only when `keyed`.
    fn fields(&self, keyed: bool) -> serde_json::Value {
        compared(ComparedMember {
            joined_at: self.joined_at_us,
            groups: sorted_texts(&self.group_ids),
            locked_fields: sorted_texts(&self.locked_fields),
            profile: keyed.then(|| MemberProfile {
                email: &self.email,
                first_name: self.first_name.as_deref(),
                last_name: self.last_name.as_deref(),
                title: self.title.as_deref(),
                image_url: self.image_url.as_deref(),
                first_name_folded: self.first_name_folded.clone(),
                last_name_folded: self.last_name_folded.clone(),
            }),
        })
    }
}

/// The same fields of a member as its replay holds them.
fn member_fields(member: &orgledger_domain::Member, keyed: bool) -> serde_json::Value {
    let mut groups: Vec<String> = member.group_ids.iter().map(Uuid::to_string).collect();
    groups.sort();
    let mut locked_fields: Vec<String> = member
        .locked_fields
        .iter()
        .map(|field| field.as_str().to_owned())
        .collect();
    locked_fields.sort();
    compared(ComparedMember {
        joined_at: orgledger_projections::to_micros(member.joined_at),
        groups,
        locked_fields,
        profile: keyed.then(|| MemberProfile {
            email: &member.email,
            first_name: member.first_name.as_deref(),
            last_name: member.last_name.as_deref(),
            title: member.title.as_deref(),
            image_url: member.image_url.as_deref(),
            first_name_folded: member.first_name.as_deref().map(fold),
            last_name_folded: member.last_name.as_deref().map(fold),
        }),
    })
}

/// What is compared of a member beside its role, held or replayed: one shape for both sides.
#[derive(Serialize)]
struct ComparedMember<'a> {
    joined_at: i64,
    groups: Vec<String>,
    locked_fields: Vec<String>,
    /// Only where the replay could open it.
    #[serde(flatten)]
    profile: Option<MemberProfile<'a>>,
}

#[derive(Serialize)]
struct MemberProfile<'a> {
    email: &'a str,
    first_name: Option<&'a str>,
    last_name: Option<&'a str>,
    title: Option<&'a str>,
    image_url: Option<&'a str>,
    /// What `q` searches.
    first_name_folded: Option<String>,
    last_name_folded: Option<String>,
}

/// What is compared of an invitation, held or made by its events: one shape for both sides.
#[derive(Serialize)]
struct ComparedInvitation<'a> {
    role: &'a str,
    group_id: Option<String>,
    status: &'a str,
    invited_by: String,
    sent_at: i64,
    expires_at: i64,
    max_uses: i64,
    uses: i64,
    token_sha256: Option<&'a str>,
    accepted_at: Option<i64>,
    revoked_at: Option<i64>,
    /// Whom it addresses, only where the replay could open it.
    #[serde(flatten)]
    profile: Option<InvitationProfile<'a>>,
}

#[derive(Serialize)]
struct InvitationProfile<'a> {
    email: Option<&'a str>,
    first_name: Option<&'a str>,
    last_name: Option<&'a str>,
    title: Option<&'a str>,
}

/// A compared shape as JSON, for [`compare_rows`].
fn compared(fields: impl Serialize) -> serde_json::Value {
    serde_json::to_value(fields).unwrap_or_default()
}

/// A row of the invitations read model as compared.
#[derive(sqlx::FromRow)]
struct HeldInvitation {
    id: String,
    role: String,
    email: Option<String>,
    first_name: Option<String>,
    last_name: Option<String>,
    title: Option<String>,
    group_id: Option<String>,
    status: String,
    invited_by_type: String,
    invited_by_id: String,
    sent_at_us: i64,
    expires_at_us: i64,
    max_uses: i64,
    uses: i64,
    token_sha256: Option<String>,
    accepted_at_us: Option<i64>,
    revoked_at_us: Option<i64>,
}

impl HeldInvitation {
    /// The compared fields; who it is for only when `keyed`.
    fn fields(&self, keyed: bool) -> serde_json::Value {
        compared(ComparedInvitation {
            role: &self.role,
            group_id: self.group_id.clone(),
            status: &self.status,
            invited_by: format!("{} {}", self.invited_by_type, self.invited_by_id),
            sent_at: self.sent_at_us,
            expires_at: self.expires_at_us,
            max_uses: self.max_uses,
            uses: self.uses,
            token_sha256: self.token_sha256.as_deref(),
            accepted_at: self.accepted_at_us,
            revoked_at: self.revoked_at_us,
            profile: keyed.then_some(InvitationProfile {
                email: self.email.as_deref(),
                first_name: self.first_name.as_deref(),
                last_name: self.last_name.as_deref(),
                title: self.title.as_deref(),
            }),
        })
    }
}

/// Every invitation as its events leave it, pending or ended: what the invitations read
/// model must hold. (The replayed state keeps only pending ones: the rules need no more.)
#[derive(Default)]
struct ExpectedInvitations(BTreeMap<Uuid, ExpectedInvitation>);

struct ExpectedInvitation {
    sent: orgledger_domain::InvitationSent,
    uses: u32,
    status: &'static str,
    token_sha256: Option<String>,
    sent_at: chrono::DateTime<chrono::Utc>,
    expires_at: chrono::DateTime<chrono::Utc>,
    accepted_at: Option<chrono::DateTime<chrono::Utc>>,
    revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl ExpectedInvitations {
    fn push(&mut self, event: &OrganizationEvent) {
        use OrganizationEvent as E;
        match event {
            E::InvitationSent(e) => {
                self.0
                    .entry(e.invitation_id)
                    .or_insert_with(|| ExpectedInvitation {
                        sent: e.clone(),
                        uses: 0,
                        status: "pending",
                        token_sha256: Some(e.token_sha256.clone()),
                        sent_at: e.sent_at,
                        expires_at: e.expires_at,
                        accepted_at: None,
                        revoked_at: None,
                    });
            }
            E::InvitationResent(e) => {
                if let Some(invitation) = self.0.get_mut(&e.invitation_id) {
                    invitation.token_sha256 = Some(e.token_sha256.clone());
                    invitation.sent_at = e.sent_at;
                    invitation.expires_at = e.expires_at;
                }
            }
            E::InvitationRevoked(e) => {
                if let Some(invitation) = self.0.get_mut(&e.invitation_id) {
                    invitation.status = "revoked";
                    invitation.revoked_at = Some(e.revoked_at);
                    invitation.token_sha256 = None;
                }
            }
            E::InvitationAccepted(e) => {
                if let Some(invitation) = self.0.get_mut(&e.invitation_id) {
                    invitation.uses += 1;
                    invitation.accepted_at = Some(e.accepted_at);
                    // A used-up invitation is accepted and its token dead.
                    if invitation.uses >= invitation.sent.max_uses {
                        invitation.status = "accepted";
                        invitation.token_sha256 = None;
                    }
                }
            }
            E::OrganizationPurged(_) => self.0.clear(),
            _ => {}
        }
    }

    /// The rows, in the shape [`HeldInvitation::fields`] gives the stored ones.
    fn rows(&self, keyed: bool) -> Rows {
        let micros = orgledger_projections::to_micros;
        self.0
            .iter()
            .map(|(id, invitation)| {
                let sent = &invitation.sent;
                let fields = compared(ComparedInvitation {
                    role: sent.role.as_str(),
                    group_id: sent.group_id.map(|group| group.to_string()),
                    status: invitation.status,
                    invited_by: format!("{} {}", sent.invited_by.kind(), sent.invited_by.id()),
                    sent_at: micros(invitation.sent_at),
                    expires_at: micros(invitation.expires_at),
                    max_uses: i64::from(sent.max_uses),
                    uses: i64::from(invitation.uses),
                    token_sha256: invitation.token_sha256.as_deref(),
                    accepted_at: invitation.accepted_at.map(micros),
                    revoked_at: invitation.revoked_at.map(micros),
                    profile: keyed.then_some(InvitationProfile {
                        email: sent.email.as_deref(),
                        first_name: sent.first_name.as_deref(),
                        last_name: sent.last_name.as_deref(),
                        title: sent.title.as_deref(),
                    }),
                });
                (id.to_string(), fields)
            })
            .collect()
    }
}

/// A JSON array of texts as stored, sorted; the text itself if it is not one.
fn sorted_texts(stored: &str) -> Vec<String> {
    let mut texts: Vec<String> =
        serde_json::from_str(stored).unwrap_or_else(|_| vec![stored.to_owned()]);
    texts.sort();
    texts
}

/// What an organization's replay gives the comparison with its read models.
struct Replay<'r> {
    state: &'r Organization,
    entries: &'r ExpectedEntries,
    invitations: &'r ExpectedInvitations,
    last: usize,
    /// Without its key the replay reads personal data as erased, which the entries written
    /// before hold: they are not compared (a finding says the key is missing), unless
    /// purged.
    keyed: bool,
}

/// The audit entry each replayed event makes, kept as a fingerprint (24 bytes an event, an
/// organization's events at most; their contents are never held).
struct ExpectedEntries {
    organization_id: Uuid,
    /// Its text, as the entries hold it: made once, not for every event.
    organization: String,
    /// Random keys, drawn for each organization: an entry altered to collide with its
    /// event's cannot be prepared ahead.
    hasher: std::hash::RandomState,
    /// By sequence, ascending.
    entries: Vec<ExpectedEntry>,
    /// Without its key only a purge's tombstone, the last entry, can be compared: only the
    /// latest is kept.
    latest_only: bool,
}

struct ExpectedEntry {
    sequence: i64,
    fingerprint: u64,
    /// False for an event whose metadata names no moment: the projection took the time it
    /// was recorded, which is not compared.
    timed: bool,
}

impl ExpectedEntries {
    fn new(organization_id: Uuid, keyed: bool) -> Self {
        Self {
            organization_id,
            organization: organization_id.to_string(),
            hasher: std::hash::RandomState::new(),
            entries: Vec::new(),
            latest_only: !keyed,
        }
    }

    fn push(&mut self, event: &cqrs_es::EventEnvelope<Organization>) {
        let (entry, timed) = expected_entry(&self.organization, event);
        if self.latest_only {
            self.entries.clear();
        }
        self.entries.push(ExpectedEntry {
            sequence: entry.sequence,
            fingerprint: self.fingerprint(&entry, timed),
            timed,
        });
    }

    fn fingerprint(&self, entry: &StoredEntry, timed: bool) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, compared_columns(entry, timed))
    }

    /// The stored entries (all of them, or only the purge's tombstone once `purged`) that
    /// differ from what their events make, read a page at a time.
    async fn altered(
        &self,
        database: &Database,
        purged: bool,
    ) -> Result<Vec<StoredEntry>, VerifyError> {
        let organization_id = self.organization_id;
        let mut altered = Vec::new();
        let mut after = 0;
        loop {
            let page = read_twice(database, || {
                audit::stored_entries(database, organization_id, after, PAGE)
            })
            .await?
            .map_err(|error| VerifyError::ReadModels(error.to_string()))?;
            let complete = page.len() < PAGE;
            for stored in page {
                after = stored.sequence;
                let Ok(at) = self
                    .entries
                    .binary_search_by_key(&stored.sequence, |entry| entry.sequence)
                else {
                    // Its event is missing from the log: a finding of the replay's already.
                    continue;
                };
                let expected = &self.entries[at];
                // Once purged, only the purge's own entry is left to compare.
                if purged && at + 1 != self.entries.len() {
                    continue;
                }
                if self.fingerprint(&stored, expected.timed) != expected.fingerprint {
                    altered.push(stored);
                }
            }
            if complete {
                return Ok(altered);
            }
        }
    }
}

/// The entry the audit log's projection makes of `event`, and whether its moment is known.
fn expected_entry(
    organization_id: &str,
    event: &cqrs_es::EventEnvelope<Organization>,
) -> (StoredEntry, bool) {
    let read = |name: &str| event.metadata.get(name).cloned();
    let metadata = EventMetadata {
        actor_type: read("actor_type"),
        actor_id: read("actor_id"),
        occurred_at: read("occurred_at"),
        request_id: read("request_id"),
    };
    let occurred_at = metadata.stated_occurred_at();
    let entry = StoredEntry::of(
        organization_id,
        event.sequence as i64,
        &event.payload,
        &metadata,
        occurred_at.unwrap_or_default(),
    );
    (entry, occurred_at.is_some())
}

/// Most altered entries named one by one; past them, a count.
const ALTERED_ENTRIES_NAMED: usize = 10;

/// Names each altered entry and the columns in which it differs from what its event makes
/// (not their values: an entry may hold personal data). The event is read again for it.
async fn report_altered_entries(
    ledger: &crate::ledger::Ledger,
    organization_id: Uuid,
    altered: &[StoredEntry],
    found: &mut impl FnMut(Option<usize>, String),
) -> Result<(), VerifyError> {
    let id = organization_id.to_string();
    for stored in altered.iter().take(ALTERED_ENTRIES_NAMED) {
        let at = stored.sequence as usize;
        let event = read_twice(ledger.database(), || {
            ledger.events_after_as_stored(organization_id, at - 1, 1)
        })
        .await?
        .ok()
        .and_then(|events| events.into_iter().find(|event| event.sequence == at));
        let columns = match event {
            Some(event) => {
                let (expected, timed) = expected_entry(&id, &event);
                differing_columns(stored, &expected, timed).join(", ")
            }
            // Gone since the replay read it: named without its columns.
            None => "columns not compared again".to_owned(),
        };
        found(
            Some(at),
            format!("its audit entry for event {at} is not the one its event makes ({columns})"),
        );
    }
    if altered.len() > ALTERED_ENTRIES_NAMED {
        found(
            None,
            format!(
                "and {} more of its audit entries are not the ones their events make",
                altered.len() - ALTERED_ENTRIES_NAMED
            ),
        );
    }
    Ok(())
}

fn differing_columns(
    stored: &StoredEntry,
    expected: &StoredEntry,
    timed: bool,
) -> Vec<&'static str> {
    compared_columns(stored, timed)
        .into_iter()
        .zip(compared_columns(expected, timed))
        .filter(|((_, held), (_, made))| held != made)
        .map(|((column, _), _)| column)
        .collect()
}

/// One column's value, as compared.
#[derive(Debug, Hash, PartialEq, Eq)]
enum Cell<'e> {
    Number(Option<i64>),
    Text(Option<&'e str>),
}

/// Every column of an entry `verify` compares, named: the time only where the event names
/// it (`timed`). Every field is destructured, so that a new column is compared too.
fn compared_columns(entry: &StoredEntry, timed: bool) -> [(&'static str, Cell<'_>); 10] {
    let StoredEntry {
        sequence,
        occurred_at_us,
        actor_type,
        actor_id,
        action,
        resource_type,
        resource_id,
        details,
        request_id,
        search_folded,
    } = entry;
    [
        ("sequence", Cell::Number(Some(*sequence))),
        (
            "occurred_at",
            Cell::Number(timed.then_some(*occurred_at_us)),
        ),
        ("actor_type", Cell::Text(Some(actor_type))),
        ("actor_id", Cell::Text(Some(actor_id))),
        ("action", Cell::Text(Some(action))),
        ("resource_type", Cell::Text(Some(resource_type))),
        ("resource_id", Cell::Text(Some(resource_id))),
        ("details", Cell::Text(Some(details))),
        ("request_id", Cell::Text(request_id.as_deref())),
        ("search_folded", Cell::Text(search_folded.as_deref())),
    ]
}

/// The rows `sql` reads (with `args`) from `projection`'s tables, or none when that read
/// model does not stand at the organization's last event (`at_last`).
async fn rows_if_at_last<T>(
    database: &Database,
    at_last: &std::collections::HashSet<String>,
    projection: &str,
    sql: &str,
    args: &[orgledger_projections::Arg],
) -> Result<Vec<T>, VerifyError>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
        + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
{
    if !at_last.contains(projection) {
        return Ok(Vec::new());
    }
    database
        .fetch_all(sql, args)
        .await
        .map_err(|error| VerifyError::ReadModels(error.to_string()))
}

/// Reports the rows of a read model (`what`) that its history does not hold, and those its
/// history holds that it lacks.
fn differs(
    what: &str,
    mut held: Vec<String>,
    mut events_say: Vec<String>,
    found: &mut impl FnMut(Option<usize>, String),
) {
    held.sort();
    events_say.sort();
    if held == events_say {
        return;
    }
    let extra: Vec<&str> = held
        .iter()
        .filter(|row| events_say.binary_search(row).is_err())
        .map(String::as_str)
        .collect();
    let missing: Vec<&str> = events_say
        .iter()
        .filter(|row| held.binary_search(row).is_err())
        .map(String::as_str)
        .collect();
    found(
        None,
        format!(
            "its {what} read model differs from its history: it holds [{}] where the events \
             say [{}]",
            extra.join(", "),
            missing.join(", ")
        ),
    );
}

/// How far an event's `recorded_at` may run behind its predecessor's, or ahead of now,
/// before it is a finding: a clock stepped back by a little (NTP) is not tampering.
const RECORDING_TIME_SLACK_SECONDS: i64 = 60;

/// Checks that the organization's `recorded_at`s, which its MACs do not cover (the database
/// sets them as it commits), follow its sequence and lie in the past: an event is committed
/// only after the one before it. Past state "as of" a time reads them.
async fn verify_recording_times(
    database: &Database,
    organization_id: Uuid,
    found: &mut impl FnMut(Option<usize>, String),
) -> Result<(), VerifyError> {
    let sql = match database.backend() {
        orgledger_projections::Backend::Postgres => {
            "SELECT sequence, micros, before_micros, now_micros FROM (
                 SELECT sequence,
                        (extract(epoch FROM recorded_at) * 1000000)::bigint AS micros,
                        (extract(epoch FROM lag(recorded_at) OVER (ORDER BY sequence))
                            * 1000000)::bigint AS before_micros,
                        (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS now_micros
                   FROM events
                  WHERE aggregate_type = 'organization' AND aggregate_id = $1) t
              WHERE micros < before_micros - $2 OR micros > now_micros + $2
              ORDER BY sequence LIMIT 100"
        }
        orgledger_projections::Backend::Sqlite => {
            "SELECT sequence, micros, before_micros, now_micros FROM (
                 SELECT sequence,
                        CAST(round((julianday(recorded_at) - 2440587.5) * 86400000000) AS INTEGER)
                            AS micros,
                        CAST(round((julianday(lag(recorded_at) OVER (ORDER BY sequence))
                            - 2440587.5) * 86400000000) AS INTEGER) AS before_micros,
                        CAST(round((julianday('now') - 2440587.5) * 86400000000) AS INTEGER)
                            AS now_micros
                   FROM event_log
                  WHERE aggregate_type = 'organization' AND aggregate_id = $1) t
              WHERE micros IS NULL OR micros < before_micros - $2 OR micros > now_micros + $2
              ORDER BY sequence LIMIT 100"
        }
    };
    let slack = RECORDING_TIME_SLACK_SECONDS * 1_000_000;
    let args = orgledger_projections::args![organization_id.to_string(), slack];
    let rows: Vec<(i64, Option<i64>, Option<i64>, i64)> =
        read_twice(database, || database.fetch_all(sql, &args))
            .await?
            .map_err(|error| VerifyError::RecordingTimes(error.to_string()))?;
    let at = |micros: i64| {
        chrono::DateTime::from_timestamp_micros(micros)
            .map_or_else(|| micros.to_string(), |at| at.to_rfc3339())
    };
    for (sequence, micros, before, now) in rows {
        let sequence = sequence as usize;
        let problem = match (micros, before) {
            // SQLite keeps it as text.
            (None, _) => "its recording time cannot be read as a time".to_owned(),
            (Some(micros), Some(before)) if micros < before - slack => format!(
                "it was recorded at {}, before event {} ({}): the log's recording times were \
                 altered, or the database's clock stepped back",
                at(micros),
                sequence - 1,
                at(before)
            ),
            (Some(micros), _) => format!(
                "it was recorded at {}, later than now ({}): the log's recording times were \
                 altered, or the database's clock ran ahead",
                at(micros),
                at(now)
            ),
        };
        found(Some(sequence), problem);
    }
    Ok(())
}

async fn has_key(
    ledger: &crate::ledger::Ledger,
    organization_id: Uuid,
) -> Result<bool, LedgerError> {
    let key = ledger.keys().get(&organization_id.to_string()).await?;
    Ok(key.is_some())
}

/// Events from `first` gone from the log, though the read models applied up to `applied`.
fn cut_short(first: usize, applied: usize) -> String {
    format!(
        "{}: the read models applied up to event {applied}",
        missing(first, applied)
    )
}

fn missing(first: usize, last: usize) -> String {
    if first == last {
        format!("event {first} is missing")
    } else {
        format!("events {first} to {last} are missing")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use orgledger_domain::OrganizationRestored;

    use super::*;

    fn restored(metadata: &[(&str, &str)]) -> cqrs_es::EventEnvelope<Organization> {
        cqrs_es::EventEnvelope {
            aggregate_id: Uuid::nil().to_string(),
            sequence: 7,
            payload: OrganizationEvent::OrganizationRestored(OrganizationRestored {
                restored_at: chrono::DateTime::UNIX_EPOCH,
            }),
            metadata: metadata
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect::<HashMap<_, _>>(),
        }
    }

    #[test]
    fn an_entry_whose_event_names_no_moment_is_compared_without_its_time() {
        let mut entries = ExpectedEntries::new(Uuid::nil(), true);
        entries.push(&restored(&[("actor_id", "olivia"), ("actor_type", "user")]));
        let expected = &entries.entries[0];
        assert!(!expected.timed);
        let (mut stored, _) = expected_entry(
            &Uuid::nil().to_string(),
            &restored(&[("actor_id", "olivia"), ("actor_type", "user")]),
        );
        // The projection took the time the event was recorded: not the metadata's to judge.
        stored.occurred_at_us = 1_765_000_000_000_000;
        assert_eq!(entries.fingerprint(&stored, false), expected.fingerprint);
        stored.actor_id = "mallory".into();
        assert_ne!(entries.fingerprint(&stored, false), expected.fingerprint);
    }

    #[test]
    fn an_entry_whose_event_names_its_moment_is_compared_with_it() {
        let moment = [
            ("actor_id", "olivia"),
            ("occurred_at", "2026-11-22T10:00:00.000001Z"),
        ];
        let mut entries = ExpectedEntries::new(Uuid::nil(), true);
        entries.push(&restored(&moment));
        let expected = &entries.entries[0];
        assert!(expected.timed);
        let (mut stored, _) = expected_entry(&Uuid::nil().to_string(), &restored(&moment));
        assert_eq!(entries.fingerprint(&stored, true), expected.fingerprint);
        stored.occurred_at_us -= 1;
        assert_ne!(entries.fingerprint(&stored, true), expected.fingerprint);
        assert_eq!(
            differing_columns(
                &stored,
                &expected_entry("00000000-0000-0000-0000-000000000000", &restored(&moment)).0,
                true
            ),
            ["occurred_at"]
        );
    }

    #[test]
    fn without_its_key_only_the_latest_entry_is_kept() {
        let mut entries = ExpectedEntries::new(Uuid::nil(), false);
        for _ in 0..3 {
            entries.push(&restored(&[]));
        }
        assert_eq!(entries.entries.len(), 1);
    }
}
