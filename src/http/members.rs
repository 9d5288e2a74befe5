//! Members: list, read, update (role, profile, locks), remove, leave; a user's organizations.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use orgledger_domain::{
    Actor, OrganizationCommand, Permission, RemoveMember, Role, UserId, NO_SUCH_ROLE,
};
use orgledger_projections::members::{self, MemberFilter};
use orgledger_projections::organizations;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::dto::*;
use super::error::{ApiError, ProblemResponses};
use super::extract::{ActorHeaders, Caller, CommandHeaders, IfMatch, Json, Meta, Path, Query};
use super::{authorize, committed, organization_id, page_limit, AppState, PageQuery};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_members))
        .routes(routes!(get_member, update_member, remove_member))
        .routes(routes!(leave_organization))
        .routes(routes!(organizations_of_user))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListMembersQuery {
    /// Only members with this role.
    role: Option<String>,
    /// Matches name or email.
    q: Option<String>,
    /// 1 to 500, default 50.
    limit: Option<i64>,
    cursor: Option<String>,
}

/// Members by `joined_at, user_id`.
#[utoipa::path(get, path = "/v1/organizations/{org_id}/members", tag = "members",
    params(("org_id" = String, Path), ActorHeaders, ListMembersQuery),
    responses((status = 200, body = MemberPage), ProblemResponses))]
async fn list_members(
    State(state): State<AppState>,
    caller: Caller,
    Path(org_id): Path<String>,
    Query(query): Query<ListMembersQuery>,
) -> Result<axum::Json<MemberPage>, ApiError> {
    let organization = authorize(&state, &caller, &org_id, Permission::ViewOrganization).await?;
    // A role this organization does not have is refused, as an unknown value of any other
    // filter is, rather than answered with an empty page.
    if let Some(role) = &query.role {
        if let Role::Custom(key) = parse_role("role", role)? {
            let database = state.service.database();
            if organizations::custom_role_permissions(database, &organization.id, &key)
                .await?
                .is_none()
            {
                return Err(ApiError::field("role", NO_SUCH_ROLE));
            }
        }
    }
    let filter = MemberFilter {
        role: query.role,
        q: super::search_text(query.q)?,
        limit: page_limit(query.limit)?,
        cursor: query.cursor,
    };
    let page = members::list(state.service.database(), &organization.id, &filter).await??;
    Ok(axum::Json(MemberPage {
        items: page.items.into_iter().map(Into::into).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// One member.
#[utoipa::path(get, path = "/v1/organizations/{org_id}/members/{user_id}", tag = "members",
    params(("org_id" = String, Path), ("user_id" = String, Path), ActorHeaders),
    responses((status = 200, body = MemberDto), ProblemResponses))]
async fn get_member(
    State(state): State<AppState>,
    caller: Caller,
    Path((org_id, user_id)): Path<(String, String)>,
) -> Result<axum::Json<MemberDto>, ApiError> {
    let organization = authorize(&state, &caller, &org_id, Permission::ViewOrganization).await?;
    let member = members::get(state.service.database(), &organization.id, &user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("member"))?;
    Ok(axum::Json(member.into()))
}

/// Change a member's role, profile or locked fields. Members may edit their own unlocked
/// profile fields; owners and admins edit anyone's (only owners touch owners).
#[utoipa::path(patch, path = "/v1/organizations/{org_id}/members/{user_id}", tag = "members",
    params(("org_id" = String, Path), ("user_id" = String, Path), ActorHeaders, CommandHeaders),
    request_body = UpdateMemberRequest,
    responses((status = 200, body = MemberDto), ProblemResponses))]
async fn update_member(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path((org_id, user_id)): Path<(String, String)>,
    Json(request): Json<UpdateMemberRequest>,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let user_id = UserId::parse("user_id", &user_id).map_err(|_| ApiError::not_found("member"))?;
    // The edge reads only the role: a bad one is a role change, which takes the permission.
    let update = request.into_command(user_id.clone());
    let update = super::checked_for(&state, &caller, id, Permission::ManageMembers, update).await?;
    let outcome = super::execute(
        &state,
        caller,
        &context,
        expected,
        id,
        OrganizationCommand::UpdateMember(update),
    )
    .await?;
    let member = outcome
        .committed
        .state
        .members
        .get(&user_id)
        .ok_or_else(|| ApiError::not_found("member"))?;
    let body = MemberDto::from_state(&user_id, member);
    Ok(committed(&outcome, StatusCode::OK, axum::Json(body)))
}

/// Remove a member (not yourself: leave instead).
#[utoipa::path(delete, path = "/v1/organizations/{org_id}/members/{user_id}", tag = "members",
    params(("org_id" = String, Path), ("user_id" = String, Path), ActorHeaders, CommandHeaders),
    responses((status = 204, description = "Removed"), ProblemResponses))]
async fn remove_member(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path((org_id, user_id)): Path<(String, String)>,
    _: super::extract::NoBody,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let user_id = UserId::parse("user_id", &user_id).map_err(|_| ApiError::not_found("member"))?;
    let body = OrganizationCommand::RemoveMember(RemoveMember { user_id });
    let outcome = super::execute(&state, caller, &context, expected, id, body).await?;
    Ok(committed(&outcome, StatusCode::NO_CONTENT, ()))
}

/// Leave the organization (the last owner cannot).
#[utoipa::path(post, path = "/v1/organizations/{org_id}/leave", tag = "members",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders),
    responses((status = 204, description = "Left"), ProblemResponses))]
async fn leave_organization(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(org_id): Path<String>,
    _: super::extract::NoBody,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let outcome = super::execute(
        &state,
        caller,
        &context,
        expected,
        id,
        OrganizationCommand::LeaveOrganization,
    )
    .await?;
    Ok(committed(&outcome, StatusCode::NO_CONTENT, ()))
}

/// A user's organizations with their role (that user, or `system`).
#[utoipa::path(get, path = "/v1/users/{user_id}/organizations", tag = "members",
    params(("user_id" = String, Path), ActorHeaders, PageQuery),
    responses((status = 200, body = UserOrganizationPage), ProblemResponses))]
async fn organizations_of_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(user_id): Path<String>,
    Query(query): Query<PageQuery>,
) -> Result<Response, ApiError> {
    UserId::parse("user_id", &user_id)?;
    let allowed = match &caller.actor {
        Actor::System => true,
        Actor::User(actor) => actor.as_str() == user_id,
        Actor::ServiceAccount(_) => false,
    };
    if !allowed {
        return Err(ApiError::forbidden());
    }
    let limit = page_limit(query.limit)?;
    let page = members::organizations_of(
        state.service.database(),
        &user_id,
        limit,
        query.cursor.as_deref(),
    )
    .await??;
    Ok(axum::Json(UserOrganizationPage {
        items: page.items.into_iter().map(Into::into).collect(),
        next_cursor: page.next_cursor,
    })
    .into_response())
}
