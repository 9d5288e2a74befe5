//! Groups: create, list, read, rename, delete, and their members.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use orgledger_domain::{
    CreateGroup, GroupMembership, GroupRef, OrganizationCommand, Permission, UpdateGroup, UserId,
};
use orgledger_projections::groups::{self, GroupView};
use orgledger_projections::List;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::error::{ApiError, ProblemResponses};
use super::extract::{ActorHeaders, Caller, CommandHeaders, IfMatch, Json, Meta, Path, Query};
use super::{authorize, committed, organization_id, AppState, PageQuery};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_group, list_groups))
        .routes(routes!(get_group, update_group, delete_group))
        .routes(routes!(add_group_member, remove_group_member))
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GroupDto {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub member_ids: Vec<String>,
    pub created_at: DateTime<Utc>,
}

impl From<GroupView> for GroupDto {
    fn from(view: GroupView) -> Self {
        Self {
            id: view.id,
            name: view.name,
            description: view.description,
            member_ids: view.member_ids,
            created_at: view.created_at,
        }
    }
}

impl GroupDto {
    fn from_state(id: Uuid, group: &orgledger_domain::Group) -> Self {
        Self {
            id: id.to_string(),
            name: group.name.clone(),
            description: group.description.clone(),
            member_ids: group
                .member_ids
                .iter()
                .map(|user| user.to_string())
                .collect(),
            created_at: group.created_at,
        }
    }
}

super::dto::page_type!(GroupList, GroupDto);

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGroupRequest {
    /// 1 to 100 characters, unique in the organization.
    pub name: String,
    pub description: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateGroupRequest {
    #[serde(default, deserialize_with = "super::dto::not_null")]
    #[schema(value_type = String)]
    pub name: Option<String>,
    /// `null` clears it.
    #[serde(default, deserialize_with = "super::dto::double_option")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
}

fn group_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found("group"))
}

fn group_of(outcome: &crate::service::Outcome, id: Uuid) -> Result<GroupDto, ApiError> {
    outcome
        .committed
        .state
        .groups
        .get(&id)
        .map(|group| GroupDto::from_state(id, group))
        .ok_or_else(|| ApiError::not_found("group"))
}

/// Create a group.
#[utoipa::path(post, path = "/v1/organizations/{org_id}/groups", tag = "groups",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders), request_body = CreateGroupRequest,
    responses((status = 201, body = GroupDto), ProblemResponses))]
async fn create_group(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(org_id): Path<String>,
    Json(request): Json<CreateGroupRequest>,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let group_id = Uuid::now_v7();
    let body = OrganizationCommand::CreateGroup(CreateGroup {
        group_id,
        name: request.name,
        description: request.description,
    });
    let outcome = super::execute(&state, caller, &context, expected, id, body).await?;
    let group = group_of(&outcome, group_id)?;
    Ok(committed(&outcome, StatusCode::CREATED, axum::Json(group)))
}

/// The organization's groups.
#[utoipa::path(get, path = "/v1/organizations/{org_id}/groups", tag = "groups",
    params(("org_id" = String, Path), ActorHeaders, PageQuery),
    responses((status = 200, body = GroupList), ProblemResponses))]
async fn list_groups(
    State(state): State<AppState>,
    caller: Caller,
    Path(org_id): Path<String>,
    Query(query): Query<PageQuery>,
) -> Result<axum::Json<GroupList>, ApiError> {
    let organization = authorize(&state, &caller, &org_id, Permission::ViewOrganization).await?;
    let all = groups::list(state.service.database(), &organization.id).await?;
    let page = query.page_of(all, List::Groups(&organization.id), |group| {
        (group.created_at.timestamp_micros(), group.id.clone())
    })?;
    Ok(axum::Json(GroupList {
        items: page.items.into_iter().map(Into::into).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// One group.
#[utoipa::path(get, path = "/v1/organizations/{org_id}/groups/{group_id}", tag = "groups",
    params(("org_id" = String, Path), ("group_id" = String, Path), ActorHeaders),
    responses((status = 200, body = GroupDto), ProblemResponses))]
async fn get_group(
    State(state): State<AppState>,
    caller: Caller,
    Path((org_id, raw_group)): Path<(String, String)>,
) -> Result<axum::Json<GroupDto>, ApiError> {
    let organization = authorize(&state, &caller, &org_id, Permission::ViewOrganization).await?;
    let group = groups::get(state.service.database(), &organization.id, &raw_group)
        .await?
        .ok_or_else(|| ApiError::not_found("group"))?;
    Ok(axum::Json(group.into()))
}

/// Rename a group or change its description.
#[utoipa::path(patch, path = "/v1/organizations/{org_id}/groups/{group_id}", tag = "groups",
    params(("org_id" = String, Path), ("group_id" = String, Path), ActorHeaders, CommandHeaders),
    request_body = UpdateGroupRequest,
    responses((status = 200, body = GroupDto), ProblemResponses))]
async fn update_group(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path((org_id, raw_group)): Path<(String, String)>,
    Json(request): Json<UpdateGroupRequest>,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let group_id = group_id(&raw_group)?;
    let body = OrganizationCommand::UpdateGroup(UpdateGroup {
        group_id,
        name: request.name,
        description: request.description,
    });
    let outcome = super::execute(&state, caller, &context, expected, id, body).await?;
    let group = group_of(&outcome, group_id)?;
    Ok(committed(&outcome, StatusCode::OK, axum::Json(group)))
}

/// Delete a group; its members leave it.
#[utoipa::path(delete, path = "/v1/organizations/{org_id}/groups/{group_id}", tag = "groups",
    params(("org_id" = String, Path), ("group_id" = String, Path), ActorHeaders, CommandHeaders),
    responses((status = 204, description = "Deleted"), ProblemResponses))]
async fn delete_group(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path((org_id, raw_group)): Path<(String, String)>,
    _: super::extract::NoBody,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let body = OrganizationCommand::DeleteGroup(GroupRef {
        group_id: group_id(&raw_group)?,
    });
    let outcome = super::execute(&state, caller, &context, expected, id, body).await?;
    Ok(committed(&outcome, StatusCode::NO_CONTENT, ()))
}

async fn membership(
    state: &AppState,
    caller: Caller,
    context: &crate::ledger::RequestContext,
    expected: Option<usize>,
    (org_id, raw_group, raw_user): (String, String, String),
    add: bool,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let membership = GroupMembership {
        group_id: group_id(&raw_group)?,
        user_id: UserId::parse("user_id", &raw_user).map_err(|_| ApiError::not_found("member"))?,
    };
    let body = if add {
        OrganizationCommand::AddGroupMember(membership)
    } else {
        OrganizationCommand::RemoveGroupMember(membership)
    };
    let outcome = super::execute(state, caller, context, expected, id, body).await?;
    Ok(committed(&outcome, StatusCode::NO_CONTENT, ()))
}

/// Put a member in the group (idempotent).
#[utoipa::path(put, path = "/v1/organizations/{org_id}/groups/{group_id}/members/{user_id}", tag = "groups",
    params(("org_id" = String, Path), ("group_id" = String, Path), ("user_id" = String, Path), ActorHeaders, CommandHeaders),
    responses((status = 204, description = "In the group"), ProblemResponses))]
async fn add_group_member(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(ids): Path<(String, String, String)>,
    _: super::extract::NoBody,
) -> Result<Response, ApiError> {
    membership(&state, caller, &context, expected, ids, true).await
}

/// Take a member out of the group.
#[utoipa::path(delete, path = "/v1/organizations/{org_id}/groups/{group_id}/members/{user_id}", tag = "groups",
    params(("org_id" = String, Path), ("group_id" = String, Path), ("user_id" = String, Path), ActorHeaders, CommandHeaders),
    responses((status = 204, description = "Out of the group"), ProblemResponses))]
async fn remove_group_member(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(ids): Path<(String, String, String)>,
    _: super::extract::NoBody,
) -> Result<Response, ApiError> {
    membership(&state, caller, &context, expected, ids, false).await
}
