//! Invitations: send, list, resend, revoke, accept. Tokens are returned once and kept only as
//! their SHA-256.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use orgledger_domain::{
    AcceptInvitation, Email, OrganizationCommand, OrganizationError, Permission, ResendInvitation,
    RevokeInvitation, UserId,
};
use orgledger_projections::invitations::{self, InvitationFilter};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::dto::*;
use super::error::{ApiError, ProblemResponses};
use super::extract::{ActorHeaders, Caller, CommandHeaders, IfMatch, Json, Meta, Path, Query};
use super::{authorize, committed, organization_id, page_limit, AppState};
use crate::tokens;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(send_invitation, list_invitations))
        .routes(routes!(resend_invitation))
        .routes(routes!(revoke_invitation))
        .routes(routes!(accept_invitation))
}

fn invitation_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found("invitation"))
}

fn issued(
    outcome: &crate::service::Outcome,
    id: Uuid,
    token: String,
) -> Result<IssuedInvitationDto, ApiError> {
    let invitation = outcome
        .committed
        .state
        .invitations
        .get(&id)
        .ok_or_else(|| ApiError::internal("a just-sent invitation is missing from the state"))?;
    Ok(IssuedInvitationDto {
        invitation: InvitationDto::from_state(id, invitation, Utc::now()),
        token: token.into(),
    })
}

/// Invite someone by email, or make a shareable link (no email, up to `max_uses`).
#[utoipa::path(post, path = "/v1/organizations/{org_id}/invitations", tag = "invitations",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders),
    request_body = SendInvitationRequest,
    responses((status = 201, body = IssuedInvitationDto, description = "Sent; the token is shown this once"), ProblemResponses))]
async fn send_invitation(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(org_id): Path<String>,
    Json(request): Json<SendInvitationRequest>,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let invitation_id = Uuid::now_v7();
    let token = tokens::issue("inv");
    let send = request.into_command(invitation_id, token.sha256);
    let send = super::checked_for(&state, &caller, id, Permission::InviteMembers, send).await?;
    let outcome = super::execute(
        &state,
        caller,
        &context,
        expected,
        id,
        OrganizationCommand::SendInvitation(send),
    )
    .await?;
    let body = issued(&outcome, invitation_id, token.secret)?;
    Ok(committed(&outcome, StatusCode::CREATED, axum::Json(body)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListInvitationsQuery {
    /// `pending` (default), `accepted`, `revoked`, `expired` or `all`.
    status: Option<String>,
    /// 1 to 500, default 50.
    limit: Option<i64>,
    cursor: Option<String>,
}

/// Invitations of one status, oldest first, for those who may invite.
#[utoipa::path(get, path = "/v1/organizations/{org_id}/invitations", tag = "invitations",
    params(("org_id" = String, Path), ActorHeaders, ListInvitationsQuery),
    responses((status = 200, body = InvitationPage), ProblemResponses))]
async fn list_invitations(
    State(state): State<AppState>,
    caller: Caller,
    Path(org_id): Path<String>,
    Query(query): Query<ListInvitationsQuery>,
) -> Result<axum::Json<InvitationPage>, ApiError> {
    // Invitees are not members yet: their addresses and names are shown to those who may
    // invite, resend and revoke, not to every member.
    let organization = authorize(&state, &caller, &org_id, Permission::InviteMembers).await?;
    let status = match query.status.as_deref().unwrap_or("pending") {
        "all" => None,
        status @ ("pending" | "accepted" | "revoked" | "expired") => Some(status.to_owned()),
        _ => {
            return Err(ApiError::field(
                "status",
                "must be pending, accepted, revoked, expired or all",
            ))
        }
    };
    let filter = InvitationFilter {
        status,
        limit: page_limit(query.limit)?,
        cursor: query.cursor,
    };
    let page = invitations::list(
        state.service.database(),
        &organization.id,
        &filter,
        Utc::now(),
    )
    .await??;
    Ok(axum::Json(InvitationPage {
        items: page.items.into_iter().map(Into::into).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// A new token (the old one dies) and a restarted expiry.
#[utoipa::path(post, path = "/v1/organizations/{org_id}/invitations/{invitation_id}/resend", tag = "invitations",
    params(("org_id" = String, Path), ("invitation_id" = String, Path), ActorHeaders, CommandHeaders),
    responses((status = 200, body = IssuedInvitationDto), ProblemResponses))]
async fn resend_invitation(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path((org_id, raw_invitation_id)): Path<(String, String)>,
    _: super::extract::NoBody,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let invitation_id = invitation_id(&raw_invitation_id)?;
    let token = tokens::issue("inv");
    let body = OrganizationCommand::ResendInvitation(ResendInvitation {
        invitation_id,
        token_sha256: token.sha256,
    });
    let outcome = execute_on_pending(
        &state,
        caller,
        &context,
        expected,
        (id, invitation_id),
        body,
    )
    .await?;
    let body = issued(&outcome, invitation_id, token.secret)?;
    Ok(committed(&outcome, StatusCode::OK, axum::Json(body)))
}

/// Revoke an invitation; its token stops working.
#[utoipa::path(delete, path = "/v1/organizations/{org_id}/invitations/{invitation_id}", tag = "invitations",
    params(("org_id" = String, Path), ("invitation_id" = String, Path), ActorHeaders, CommandHeaders),
    responses((status = 204, description = "Revoked"), ProblemResponses))]
async fn revoke_invitation(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path((org_id, raw_invitation_id)): Path<(String, String)>,
    _: super::extract::NoBody,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let invitation_id = invitation_id(&raw_invitation_id)?;
    let body = OrganizationCommand::RevokeInvitation(RevokeInvitation { invitation_id });
    let outcome = execute_on_pending(
        &state,
        caller,
        &context,
        expected,
        (id, invitation_id),
        body,
    )
    .await?;
    Ok(committed(&outcome, StatusCode::NO_CONTENT, ()))
}

/// Runs a command on a pending invitation (resend, revoke). An invitation the organization
/// no longer holds as pending is `404` from the domain; one that was accepted or revoked,
/// as its list shows, is `409 invitation_not_pending` instead. The domain refuses a caller
/// without the permission first, so only those who may resend and revoke learn how an
/// invitation ended. The list is read once it shows the organization as the command found
/// it (a revocation racing this one included), within the consistency wait; where it still
/// does not, or cannot be read, the answer stays `404`.
async fn execute_on_pending(
    state: &AppState,
    caller: Caller,
    context: &crate::ledger::RequestContext,
    expected: Option<usize>,
    (id, invitation_id): (Uuid, Uuid),
    body: OrganizationCommand,
) -> Result<crate::service::Outcome, ApiError> {
    match super::execute(state, caller, context, expected, id, body).await {
        Ok(outcome) => Ok(outcome),
        Err(error) => Err(ended_or(state, id, invitation_id, error).await),
    }
}

async fn ended_or(state: &AppState, id: Uuid, invitation_id: Uuid, error: ApiError) -> ApiError {
    if error.status != StatusCode::NOT_FOUND {
        return error;
    }
    // The command that ended it may still be waiting for the read models itself (a revoke
    // racing this one): the list is read once it shows the organization as this command
    // found it, within the usual bound.
    if let Ok((_, version)) = state.service.ledger.load(id).await {
        let shown = state
            .service
            .projector
            .wait_for(
                &id.to_string(),
                version as i64,
                state.service.consistency_wait(),
            )
            .await;
        if let Err(wait) = shown {
            tracing::warn!(error = %wait, "could not wait for the invitations list");
        }
    }
    let view = invitations::get(
        state.service.database(),
        &id.to_string(),
        &invitation_id.to_string(),
        Utc::now(),
    )
    .await;
    match view {
        Ok(Some(view)) if matches!(view.status.as_str(), "accepted" | "revoked") => ApiError::new(
            StatusCode::CONFLICT,
            "invitation_not_pending",
            format!(
                "the invitation was {} and is no longer pending",
                view.status
            ),
        ),
        Ok(_) => error,
        Err(lookup) => {
            tracing::warn!(error = %lookup, "could not read how an invitation ended");
            error
        }
    }
}

/// Accept an invitation as the user named by `X-Actor-Id`. A shareable link is refused
/// (`409 invitation_pending`) to an email that has an invitation of its own pending: that one
/// is to be accepted, or revoked first, else it would stay pending with no one to accept it.
#[utoipa::path(post, path = "/v1/invitations/accept", tag = "invitations",
    params(ActorHeaders, CommandHeaders),
    request_body = AcceptInvitationRequest,
    responses((status = 200, body = AcceptedInvitationDto), ProblemResponses))]
async fn accept_invitation(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Json(request): Json<AcceptInvitationRequest>,
) -> Result<Response, ApiError> {
    let mut problems = Problems::default();
    let user_id = problems.check(UserId::parse_for_actor("user_id", &request.user_id));
    let email = problems.check(Email::parse("email", &request.email));
    if request.token.expose().is_empty() || request.token.expose().len() > 256 {
        problems.push("token", "must be the token of an invitation");
    }
    problems.finish()?;
    let (user_id, email) = (user_id.expect("checked"), email.expect("checked"));
    let token_sha256 = tokens::sha256_hex(request.token.expose());
    let organization = invitations::organization_of_token(state.service.database(), &token_sha256)
        .await?
        .ok_or(OrganizationError::InvalidInvitation)?;
    let id = organization_id(&organization)?;
    let body = OrganizationCommand::AcceptInvitation(AcceptInvitation {
        token_sha256,
        user_id: user_id.clone(),
        email,
        first_name: super::dto::optional_text(request.first_name),
        last_name: super::dto::optional_text(request.last_name),
    });
    let outcome = super::execute(&state, caller, &context, expected, id, body).await?;
    let member = outcome
        .committed
        .state
        .members
        .get(&user_id)
        .ok_or_else(|| ApiError::internal("an accepted member is missing from the state"))?;
    let body = AcceptedInvitationDto {
        organization_id: id.to_string(),
        member: MemberDto::from_state(&user_id, member),
    };
    Ok(committed(&outcome, StatusCode::OK, axum::Json(body)))
}
