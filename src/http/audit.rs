//! Audit log, exports, raw events and point-in-time state (owners and admins, and `system`).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::TryStreamExt;
use orgledger_domain::Permission;
use orgledger_projections::audit::{self, AuditFilter};
use orgledger_projections::exports::{self, attachment_name, AuditFormat, ByteStream};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::dto::*;
use super::error::{ApiError, ProblemResponses};
use super::extract::{ActorHeaders, Caller, Path, Query};
use super::{authorize, authorize_any, instant, organization_id, page_limit, AppState};
use crate::history::{self, AsOf};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(audit_log))
        .routes(routes!(export_audit_log))
        .routes(routes!(raw_events))
        .routes(routes!(state_as_of))
        .routes(routes!(export_organization))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// RFC 3339; inclusive bound of `occurred_at`.
    from: Option<String>,
    /// RFC 3339; exclusive bound of `occurred_at`.
    to: Option<String>,
    /// An actor id (a user id, service account id or `system`).
    actor: Option<String>,
    /// An action, or a family such as `member.*`.
    action: Option<String>,
    resource_type: Option<String>,
    /// Free text over action, resource, actor and details.
    q: Option<String>,
    /// 1 to 500, default 50.
    limit: Option<i64>,
    cursor: Option<String>,
}

/// `from` (inclusive) and `to` (exclusive); a range that ends before it begins is a mistake
/// worth naming, not an empty page.
fn bounds(from: Option<&str>, to: Option<&str>) -> Result<AuditFilter, ApiError> {
    let (from, to) = (instant("from", from)?, instant("to", to)?);
    if let (Some(from), Some(to)) = (from, to) {
        if to < from {
            return Err(ApiError::field("to", "must not be before from"));
        }
    }
    Ok(AuditFilter {
        from,
        to,
        ..AuditFilter::default()
    })
}

/// The audit log, by sequence.
#[utoipa::path(get, path = "/v1/organizations/{org_id}/audit-log", tag = "audit",
    params(("org_id" = String, Path), ActorHeaders, AuditQuery),
    responses((status = 200, body = AuditEntryPage), ProblemResponses))]
async fn audit_log(
    State(state): State<AppState>,
    caller: Caller,
    Path(org_id): Path<String>,
    Query(query): Query<AuditQuery>,
) -> Result<axum::Json<AuditEntryPage>, ApiError> {
    let organization = history_of(&state, &caller, &org_id, &[Permission::ReadAudit]).await?;
    if let Some(kind) = query.resource_type.as_deref() {
        if !audit::RESOURCE_TYPES.contains(&kind) {
            return Err(ApiError::field(
                "resource_type",
                &format!("must be one of {}", audit::RESOURCE_TYPES.join(", ")),
            ));
        }
    }
    // As every other filter: a blank one is refused, not taken for one that matches nothing.
    for (field, value) in [("actor", &query.actor), ("action", &query.action)] {
        if value.as_deref().is_some_and(str::is_empty) {
            return Err(ApiError::field(
                field,
                "must not be empty (leave it out to match every entry)",
            ));
        }
    }
    if let Some(action) = query.action.as_deref() {
        if !audit::is_action_filter(action) {
            return Err(ApiError::field(
                "action",
                "must be an audit action (such as member.role_changed) or the start of one \
                 followed by * (such as member.*)",
            ));
        }
    }
    let filter = AuditFilter {
        actor: query.actor,
        action: query.action,
        resource_type: query.resource_type,
        q: super::search_text(query.q)?,
        ..bounds(query.from.as_deref(), query.to.as_deref())?
    };
    let limit = page_limit(query.limit)?;
    let page = audit::list(
        state.service.database(),
        &organization,
        &filter,
        limit,
        query.cursor.as_deref(),
    )
    .await??;
    Ok(axum::Json(AuditEntryPage {
        items: page.items.into_iter().map(Into::into).collect(),
        next_cursor: page.next_cursor,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// `csv` (default) or `json`.
    format: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

fn attachment(stream: ByteStream, content_type: &'static str, file_name: String) -> Response {
    let body = Body::from_stream(stream.map_err(|error| std::io::Error::other(error.to_string())));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(disposition) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\""))
    {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    response
}

/// The audit log as CSV or JSON, streamed.
#[utoipa::path(get, path = "/v1/organizations/{org_id}/audit-log/export", tag = "audit",
    params(("org_id" = String, Path), ActorHeaders, ExportQuery),
    responses(
        (status = 200, description = "CSV columns sequence,occurred_at,actor_type,actor_id,action,resource_type,resource_id,details; or a JSON array of AuditEntry",
            content((String = "text/csv"), (Vec<AuditEntryDto> = "application/json"))),
        ProblemResponses))]
async fn export_audit_log(
    State(state): State<AppState>,
    caller: Caller,
    Path(org_id): Path<String>,
    Query(query): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    // The audit log is in the data export too, so either permission reads it.
    let organization = history_of(
        &state,
        &caller,
        &org_id,
        &[Permission::ReadAudit, Permission::ReadExport],
    )
    .await?;
    let (format, content_type, extension) = match query.format.as_deref().unwrap_or("csv") {
        "csv" => (AuditFormat::Csv, "text/csv; charset=utf-8", "csv"),
        "json" => (AuditFormat::Json, "application/json", "json"),
        _ => return Err(ApiError::field("format", "must be csv or json")),
    };
    let filter = bounds(query.from.as_deref(), query.to.as_deref())?;
    let file_name = attachment_name("audit-log", &organization, extension);
    let stream = exports::audit_log(
        state.service.database().clone(),
        organization,
        filter,
        format,
    );
    Ok(attachment(stream, content_type, file_name))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Events after this sequence (default 0).
    after_sequence: Option<i64>,
    /// The `next_cursor` of the page before: the same as `after_sequence` set to it.
    cursor: Option<String>,
    /// 1 to 500, default 50.
    limit: Option<i64>,
}

/// Raw events by sequence; personal data of a purged organization reads as `[erased]`;
/// secrets and hashes of secrets are left out.
#[utoipa::path(get, path = "/v1/organizations/{org_id}/events", tag = "audit",
    params(("org_id" = String, Path), ActorHeaders, EventsQuery),
    responses((status = 200, body = RawEventPage), ProblemResponses))]
async fn raw_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(org_id): Path<String>,
    Query(query): Query<EventsQuery>,
) -> Result<axum::Json<RawEventPage>, ApiError> {
    let id = organization_id(&org_id)?;
    authorize_history(&state, &caller, &org_id).await?;
    let after = match (query.cursor.as_deref(), query.after_sequence) {
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "cursor",
                "give cursor or after_sequence, not both",
            ))
        }
        // This list's cursors are the last sequence of a page, in decimal.
        (Some(cursor), None) => cursor
            .parse::<i64>()
            .ok()
            .filter(|sequence| *sequence >= 0)
            .ok_or_else(|| ApiError::from(orgledger_projections::CursorError))?,
        (None, after) => after.unwrap_or(0),
    };
    if after < 0 {
        return Err(ApiError::field("after_sequence", "must be 0 or more"));
    }
    let limit = page_limit(query.limit)?;
    let events = history::raw_events(&state.service.ledger, id, after as usize, limit + 1).await?;
    let more = events.len() > limit;
    let items: Vec<RawEventDto> = events
        .into_iter()
        .take(limit)
        .map(|mut event| {
            crate::exports::strip_secrets(&mut event.payload);
            crate::exports::strip_secrets(&mut event.metadata);
            RawEventDto {
                sequence: event.sequence,
                event_type: event.event_type,
                event_version: event.event_version,
                payload: event.payload,
                metadata: event.metadata,
                recorded_at: event.recorded_at,
            }
        })
        .collect();
    let next_cursor = more
        .then(|| items.last().map(|e| e.sequence.to_string()))
        .flatten();
    Ok(axum::Json(RawEventPage { items, next_cursor }))
}

/// History stays readable after purge (a tombstone); `system` reads it, users need the
/// audit permission while the organization is live.
async fn authorize_history(
    state: &AppState,
    caller: &Caller,
    org_id: &str,
) -> Result<(), ApiError> {
    history_of(state, caller, org_id, &[Permission::ReadAudit])
        .await
        .map(drop)
}

/// The id of the organization whose history the caller may read with one of `permissions`.
/// `system` (auditors) also reads a purged organization's: its read models are gone, but its
/// log and the audit log's `organization.purged` entry are its tombstone.
async fn history_of(
    state: &AppState,
    caller: &Caller,
    org_id: &str,
    permissions: &[Permission],
) -> Result<String, ApiError> {
    match authorize_any(state, caller, org_id, permissions).await {
        Ok(organization) => Ok(organization.id),
        Err(error) if caller.is_system() && error.code == "not_found" => {
            let id = organization_id(org_id)?;
            // Whether its log holds anything: one event read, not the whole history replayed
            // (a purged organization's snapshot no longer opens).
            if state
                .service
                .ledger
                .events_after(id, 0, 1)
                .await?
                .is_empty()
            {
                Err(error)
            } else {
                Ok(id.to_string())
            }
        }
        Err(error) => Err(error),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StateQuery {
    /// RFC 3339: the organization as it stood at this instant.
    as_of: Option<String>,
    /// Or: just after the event with this sequence.
    sequence: Option<i64>,
}

/// The organization as it stood at a past moment, replayed from its events.
#[utoipa::path(get, path = "/v1/organizations/{org_id}/state", tag = "audit",
    params(("org_id" = String, Path), ActorHeaders, StateQuery),
    responses((status = 200, body = PastStateDto), ProblemResponses))]
async fn state_as_of(
    State(state): State<AppState>,
    caller: Caller,
    Path(org_id): Path<String>,
    Query(query): Query<StateQuery>,
) -> Result<axum::Json<PastStateDto>, ApiError> {
    let id = organization_id(&org_id)?;
    authorize_history(&state, &caller, &org_id).await?;
    let as_of = match (instant("as_of", query.as_of.as_deref())?, query.sequence) {
        (Some(at), None) => AsOf::Time(at),
        (None, Some(sequence)) if sequence >= 1 => AsOf::Sequence(sequence as usize),
        (None, Some(_)) => return Err(ApiError::field("sequence", "must be 1 or more")),
        (None, None) => AsOf::Time(Utc::now()),
        (Some(_), Some(_)) => {
            return Err(ApiError::field("as_of", "give as_of or sequence, not both"))
        }
    };
    let past = history::state_as_of(&state.service.ledger, id, as_of)
        .await?
        .ok_or_else(|| ApiError::not_found("organization at that moment"))?;
    let organization = &past.organization;
    // In the live lists' orders: members by `joined_at, user_id`, groups by creation, at the
    // microseconds the read models keep.
    let mut members: Vec<_> = organization.members.iter().collect();
    members.sort_by_cached_key(|(user_id, member)| {
        (member.joined_at.timestamp_micros(), (*user_id).clone())
    });
    let mut groups: Vec<_> = organization.groups.iter().collect();
    groups.sort_by_key(|(id, group)| (group.created_at.timestamp_micros(), **id));
    Ok(axum::Json(PastStateDto {
        organization: OrganizationDto::from_state(organization, past.as_of_sequence),
        members: members
            .into_iter()
            .map(|(user_id, member)| MemberDto::from_state(user_id, member))
            .collect(),
        invitations: organization
            .invitations
            .iter()
            .map(|(id, invitation)| InvitationDto::from_state(*id, invitation, past.moment))
            .collect(),
        groups: groups
            .into_iter()
            .map(|(id, group)| {
                serde_json::json!({
                    "id": id, "name": group.name, "description": group.description,
                    "member_ids": group.member_ids, "created_at": group.created_at,
                })
            })
            .collect(),
        as_of_sequence: past.as_of_sequence as i64,
    }))
}

/// The JSON data export of the organization, streamed: no token, key, secret or hash of one.
#[utoipa::path(get, path = "/v1/organizations/{org_id}/export", tag = "audit",
    params(("org_id" = String, Path), ActorHeaders),
    responses((status = 200, description = "{format_version, exported_at, organization, members, invitations, groups, service_accounts, audit_log, events}",
        content_type = "application/json", body = Object), ProblemResponses))]
async fn export_organization(
    State(state): State<AppState>,
    caller: Caller,
    Path(org_id): Path<String>,
) -> Result<Response, ApiError> {
    let organization = authorize(&state, &caller, &org_id, Permission::ReadExport).await?;
    let file_name = attachment_name("organization", &organization.id, "json");
    let stream = crate::exports::data_export(state.service.clone(), organization);
    Ok(attachment(stream, "application/json", file_name))
}
