//! Security and billing settings: client restrictions, smart tool routing, AI providers,
//! plan and seats, custom roles; and personal organizations.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use orgledger_domain::{
    Actor, AddAiProvider, AiProviderRef, ChangePlan, Command, CreateOrganization, DefineRole,
    Email, NewMember, OrganizationCommand, OrganizationKind, OrganizationName, Permission, Role,
    RoleRef, Slug, UpdateAiProvider, UserId,
};
use orgledger_projections::{organizations, List};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::dto::{ClientRestrictionsDto, OrganizationDto, Problems};
use super::error::{ApiError, ProblemResponses};
use super::extract::{
    ActorHeaders, Caller, CommandHeaders, CreationHeaders, IfMatch, Json, Meta, Path, Query,
};
use super::{authorize, committed, organization_id, AppState, PageQuery};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(set_client_restrictions))
        .routes(routes!(set_smart_tool_routing))
        .routes(routes!(add_ai_provider, list_ai_providers))
        .routes(routes!(update_ai_provider, remove_ai_provider))
        .routes(routes!(change_plan, read_plan))
        .routes(routes!(list_roles, define_role))
        .routes(routes!(delete_role))
        .routes(routes!(personal_organization))
}

async fn run(
    state: &AppState,
    caller: Caller,
    context: &crate::ledger::RequestContext,
    expected: Option<usize>,
    org_id: &str,
    body: OrganizationCommand,
) -> Result<crate::service::Outcome, ApiError> {
    super::execute(
        state,
        caller,
        context,
        expected,
        organization_id(org_id)?,
        body,
    )
    .await
}

/// Which AI clients may reach the organization.
#[utoipa::path(put, path = "/v1/organizations/{org_id}/client-restrictions", tag = "settings",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders), request_body = ClientRestrictionsDto,
    responses((status = 200, body = ClientRestrictionsDto), ProblemResponses))]
async fn set_client_restrictions(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(org_id): Path<String>,
    Json(request): Json<ClientRestrictionsDto>,
) -> Result<Response, ApiError> {
    let body = OrganizationCommand::SetClientRestrictions(request.into());
    let outcome = run(&state, caller, &context, expected, &org_id, body).await?;
    let body = ClientRestrictionsDto::from(&outcome.committed.state.client_restrictions);
    Ok(committed(&outcome, StatusCode::OK, axum::Json(body)))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SmartToolRouting {
    pub enabled: bool,
}

/// Expose one routing tool to external clients instead of every tool.
#[utoipa::path(put, path = "/v1/organizations/{org_id}/smart-tool-routing", tag = "settings",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders), request_body = SmartToolRouting,
    responses((status = 200, body = SmartToolRouting), ProblemResponses))]
async fn set_smart_tool_routing(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(org_id): Path<String>,
    Json(request): Json<SmartToolRouting>,
) -> Result<Response, ApiError> {
    let body = OrganizationCommand::SetSmartToolRouting(request.enabled);
    let outcome = run(&state, caller, &context, expected, &org_id, body).await?;
    let enabled = outcome.committed.state.smart_tool_routing;
    Ok(committed(
        &outcome,
        StatusCode::OK,
        axum::Json(SmartToolRouting { enabled }),
    ))
}

/// An AI provider: never its key, only the key's last four characters.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AiProviderDto {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub enabled: bool,
    pub api_key_last4: String,
}

super::dto::page_type!(AiProviderList, AiProviderDto);

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddAiProviderRequest {
    pub name: String,
    /// e.g. `openai`, `anthropic`.
    pub kind: String,
    /// Encrypted at rest; never returned.
    #[schema(value_type = String)]
    pub api_key: orgledger_domain::Secret,
    pub enabled: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAiProviderRequest {
    #[serde(default, deserialize_with = "super::dto::not_null")]
    #[schema(value_type = bool)]
    pub enabled: Option<bool>,
    /// Replaces the key.
    #[serde(default, deserialize_with = "super::dto::not_null")]
    #[schema(value_type = String)]
    pub api_key: Option<orgledger_domain::Secret>,
}

fn provider_of(outcome: &crate::service::Outcome, id: Uuid) -> Result<AiProviderDto, ApiError> {
    let provider = outcome
        .committed
        .state
        .ai_providers
        .get(&id)
        .ok_or_else(|| ApiError::not_found("ai provider"))?;
    Ok(AiProviderDto {
        id: id.to_string(),
        name: provider.name.clone(),
        kind: provider.kind.clone(),
        enabled: provider.enabled,
        api_key_last4: provider.api_key_last4.clone(),
    })
}

fn provider_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found("ai provider"))
}

/// Configure an AI provider; the key is never shown again.
#[utoipa::path(post, path = "/v1/organizations/{org_id}/ai-providers", tag = "settings",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders), request_body = AddAiProviderRequest,
    responses((status = 201, body = AiProviderDto), ProblemResponses))]
async fn add_ai_provider(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(org_id): Path<String>,
    Json(request): Json<AddAiProviderRequest>,
) -> Result<Response, ApiError> {
    let provider_id = Uuid::now_v7();
    let body = OrganizationCommand::AddAiProvider(AddAiProvider {
        provider_id,
        name: request.name,
        kind: request.kind,
        api_key: request.api_key,
        enabled: request.enabled.unwrap_or(true),
    });
    let outcome = run(&state, caller, &context, expected, &org_id, body).await?;
    let body = provider_of(&outcome, provider_id)?;
    Ok(committed(&outcome, StatusCode::CREATED, axum::Json(body)))
}

/// The organization's AI providers.
#[utoipa::path(get, path = "/v1/organizations/{org_id}/ai-providers", tag = "settings",
    params(("org_id" = String, Path), ActorHeaders, PageQuery),
    responses((status = 200, body = AiProviderList), ProblemResponses))]
async fn list_ai_providers(
    State(state): State<AppState>,
    caller: Caller,
    Path(org_id): Path<String>,
    Query(query): Query<PageQuery>,
) -> Result<axum::Json<AiProviderList>, ApiError> {
    let organization = authorize(&state, &caller, &org_id, Permission::ViewOrganization).await?;
    let all = organizations::ai_providers(state.service.database(), &organization.id).await?;
    let page = query.page_of(all, List::AiProviders(&organization.id), |provider| {
        provider.id.clone()
    })?;
    Ok(axum::Json(AiProviderList {
        items: page
            .items
            .into_iter()
            .map(|view| AiProviderDto {
                id: view.id,
                name: view.name,
                kind: view.kind,
                enabled: view.enabled.0,
                api_key_last4: view.api_key_last4,
            })
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Enable, disable, or replace the key.
#[utoipa::path(patch, path = "/v1/organizations/{org_id}/ai-providers/{id}", tag = "settings",
    params(("org_id" = String, Path), ("id" = String, Path), ActorHeaders, CommandHeaders),
    request_body = UpdateAiProviderRequest,
    responses((status = 200, body = AiProviderDto), ProblemResponses))]
async fn update_ai_provider(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path((org_id, raw_id)): Path<(String, String)>,
    Json(request): Json<UpdateAiProviderRequest>,
) -> Result<Response, ApiError> {
    let provider_id = provider_id(&raw_id)?;
    let body = OrganizationCommand::UpdateAiProvider(UpdateAiProvider {
        provider_id,
        enabled: request.enabled,
        api_key: request.api_key,
    });
    let outcome = run(&state, caller, &context, expected, &org_id, body).await?;
    let body = provider_of(&outcome, provider_id)?;
    Ok(committed(&outcome, StatusCode::OK, axum::Json(body)))
}

/// Remove an AI provider.
#[utoipa::path(delete, path = "/v1/organizations/{org_id}/ai-providers/{id}", tag = "settings",
    params(("org_id" = String, Path), ("id" = String, Path), ActorHeaders, CommandHeaders),
    responses((status = 204, description = "Removed"), ProblemResponses))]
async fn remove_ai_provider(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path((org_id, raw_id)): Path<(String, String)>,
    _: super::extract::NoBody,
) -> Result<Response, ApiError> {
    let body = OrganizationCommand::RemoveAiProvider(AiProviderRef {
        provider_id: provider_id(&raw_id)?,
    });
    let outcome = run(&state, caller, &context, expected, &org_id, body).await?;
    Ok(committed(&outcome, StatusCode::NO_CONTENT, ()))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanDto {
    /// `null` until an owner sets one.
    pub plan: Option<String>,
    /// 1 to 1000000; members plus pending invitations may not exceed it. `null`: no limit.
    pub seats: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePlanRequest {
    pub plan: String,
    /// 1 to 1000000; members plus pending invitations may not exceed it. `null`: no limit.
    /// Required: a plan change that leaves it out must not lift the limit unasked.
    #[serde(default, deserialize_with = "super::dto::double_option")]
    #[schema(value_type = Option<i64>, required = true)]
    pub seats: Option<Option<i64>>,
}

/// Change plan and seats (owners only).
#[utoipa::path(put, path = "/v1/organizations/{org_id}/plan", tag = "settings",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders), request_body = ChangePlanRequest,
    responses((status = 200, body = PlanDto), ProblemResponses))]
async fn change_plan(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(org_id): Path<String>,
    Json(request): Json<ChangePlanRequest>,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let seats = match request.seats {
        None => Err(ApiError::field(
            "seats",
            "is required: a number of seats, or null for no limit",
        )),
        Some(None) => Ok(None),
        Some(Some(seats)) if (1..=1_000_000).contains(&seats) => Ok(Some(seats as u32)),
        Some(Some(_)) => Err(ApiError::field("seats", "must be between 1 and 1000000")),
    };
    let seats = super::checked_for(&state, &caller, id, Permission::ManageBilling, seats).await?;
    let body = OrganizationCommand::ChangePlan(ChangePlan {
        plan: request.plan,
        seats,
    });
    let outcome = run(&state, caller, &context, expected, &org_id, body).await?;
    let plan = &outcome.committed.state.plan;
    let body = PlanDto {
        plan: plan.name.clone(),
        seats: plan.seats.map(i64::from),
    };
    Ok(committed(&outcome, StatusCode::OK, axum::Json(body)))
}

/// Plan and seats: billing information, for owners (and `system`) only.
#[utoipa::path(get, path = "/v1/organizations/{org_id}/plan", tag = "settings",
    params(("org_id" = String, Path), ActorHeaders),
    responses((status = 200, body = PlanDto), ProblemResponses))]
async fn read_plan(
    State(state): State<AppState>,
    caller: Caller,
    Path(org_id): Path<String>,
) -> Result<axum::Json<PlanDto>, ApiError> {
    let organization = authorize(&state, &caller, &org_id, Permission::ManageBilling).await?;
    Ok(axum::Json(PlanDto {
        plan: organization.settings.plan,
        seats: organization.settings.seats,
    }))
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RoleDto {
    pub key: String,
    pub name: String,
    pub built_in: bool,
    /// Contract permission names; an owner also holds billing, ownership transfer,
    /// deletion and role management.
    pub permissions: Vec<String>,
}

super::dto::page_type!(RoleList, RoleDto);

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DefineRoleRequest {
    /// `^[a-z][a-z0-9_]{1,31}$`, not a built-in role.
    pub key: String,
    pub name: String,
    pub permissions: Vec<String>,
}

fn built_in_roles() -> Vec<RoleDto> {
    Role::BUILT_IN
        .iter()
        .map(|role| {
            let grant = orgledger_domain::Grant::BuiltIn(role);
            let mut permissions: Vec<String> = Permission::GRANTABLE
                .iter()
                .filter(|(permission, _)| grant.permits(*permission))
                .map(|(_, name)| (*name).to_owned())
                .collect();
            if *role == Role::Owner {
                permissions.extend(
                    [
                        "billing:manage",
                        "ownership:transfer",
                        "organization:delete",
                        "roles:manage",
                    ]
                    .map(str::to_owned),
                );
            }
            let mut name = role.as_str().to_owned();
            name[..1].make_ascii_uppercase();
            RoleDto {
                key: role.as_str().to_owned(),
                name,
                built_in: true,
                permissions,
            }
        })
        .collect()
}

/// Built-in and custom roles with their permissions.
#[utoipa::path(get, path = "/v1/organizations/{org_id}/roles", tag = "settings",
    params(("org_id" = String, Path), ActorHeaders, PageQuery),
    responses((status = 200, body = RoleList), ProblemResponses))]
async fn list_roles(
    State(state): State<AppState>,
    caller: Caller,
    Path(org_id): Path<String>,
    Query(query): Query<PageQuery>,
) -> Result<axum::Json<RoleList>, ApiError> {
    let organization = authorize(&state, &caller, &org_id, Permission::ViewOrganization).await?;
    // Built-in roles first, in their order of rank, then custom roles by key: each keyed
    // so, for the cursor.
    let built_in = built_in_roles();
    let customs_rank = built_in.len();
    let mut keyed: Vec<((usize, String), RoleDto)> = built_in
        .into_iter()
        .enumerate()
        .map(|(rank, role)| ((rank, role.key.clone()), role))
        .collect();
    for role in organizations::custom_roles(state.service.database(), &organization.id).await? {
        let key = (customs_rank, role.key.clone());
        keyed.push((
            key,
            RoleDto {
                key: role.key,
                name: role.name,
                built_in: false,
                permissions: role.permissions,
            },
        ));
    }
    let page = query.page_of(keyed, List::Roles(&organization.id), |(key, _)| key.clone())?;
    Ok(axum::Json(RoleList {
        items: page.items.into_iter().map(|(_, role)| role).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Define a custom role from grantable permissions (owners only).
#[utoipa::path(post, path = "/v1/organizations/{org_id}/roles", tag = "settings",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders), request_body = DefineRoleRequest,
    responses((status = 201, body = RoleDto), ProblemResponses))]
async fn define_role(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(org_id): Path<String>,
    Json(request): Json<DefineRoleRequest>,
) -> Result<Response, ApiError> {
    let mut problems = Problems::default();
    let mut permissions = Vec::new();
    for (i, name) in request.permissions.iter().enumerate() {
        match Permission::parse_grantable(name) {
            Some(permission) => permissions.push(permission),
            None => problems.push(
                &format!("permissions[{i}]"),
                "must be one of members:read, members:invite, members:manage, groups:manage, service_accounts:manage, settings:manage, audit:read, export:read (owner-only powers cannot be granted)",
            ),
        }
    }
    let id = organization_id(&org_id)?;
    super::checked_for(
        &state,
        &caller,
        id,
        Permission::ManageRoles,
        problems.finish(),
    )
    .await?;
    let key = request.key.clone();
    let body = OrganizationCommand::DefineRole(DefineRole {
        key: request.key,
        name: request.name,
        permissions,
    });
    let outcome = run(&state, caller, &context, expected, &org_id, body).await?;
    let role = outcome
        .committed
        .state
        .roles
        .get(&key)
        .ok_or_else(|| ApiError::not_found("role"))?;
    let body = RoleDto {
        key,
        name: role.name.clone(),
        built_in: false,
        permissions: role
            .permissions
            .iter()
            .filter_map(|p| p.grantable_name())
            .map(str::to_owned)
            .collect(),
    };
    Ok(committed(&outcome, StatusCode::CREATED, axum::Json(body)))
}

/// Delete a custom role no member or pending invitation holds (owners only); a built-in role
/// is `422 validation_failed`, held custom role `409 role_in_use`.
#[utoipa::path(delete, path = "/v1/organizations/{org_id}/roles/{key}", tag = "settings",
    params(("org_id" = String, Path), ("key" = String, Path), ActorHeaders, CommandHeaders),
    responses((status = 204, description = "Deleted"), ProblemResponses))]
async fn delete_role(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path((org_id, key)): Path<(String, String)>,
    _: super::extract::NoBody,
) -> Result<Response, ApiError> {
    let body = OrganizationCommand::DeleteRole(RoleRef { key });
    let outcome = run(&state, caller, &context, expected, &org_id, body).await?;
    Ok(committed(&outcome, StatusCode::NO_CONTENT, ()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PersonalOrganizationRequest {
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// The user's personal organization: created once (`201`), then returned (`200`).
#[utoipa::path(post, path = "/v1/users/{user_id}/personal-organization", tag = "organizations",
    params(("user_id" = String, Path), ActorHeaders, CreationHeaders), request_body = PersonalOrganizationRequest,
    responses((status = 201, body = OrganizationDto, description = "Created"),
              (status = 200, body = OrganizationDto, description = "The existing one"), ProblemResponses))]
async fn personal_organization(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    Path(raw_user): Path<String>,
    Json(request): Json<PersonalOrganizationRequest>,
) -> Result<Response, ApiError> {
    // Who may ask comes before what is asked: the user themselves, or `system`.
    match &caller.actor {
        Actor::System => {}
        Actor::User(actor) if actor.as_str() == raw_user => {}
        _ => return Err(ApiError::forbidden()),
    }
    let mut problems = Problems::default();
    let user_id = problems.check(UserId::parse_for_actor("user_id", &raw_user));
    let email = problems.check(Email::parse("email", &request.email));
    problems.finish()?;
    let user_id = user_id.expect("checked");
    let first_name = super::dto::optional_text(request.first_name);
    // Neither the name nor the slug is personal data, which a purge must be able to erase:
    // an organization's name and slug are stored in clear, for good, in its first event.
    let name = OrganizationName::parse("name", "Personal workspace")?;
    let organization_id = Uuid::now_v7();
    // A UUIDv7 begins with its time and ends in random bits: the end tells workspaces apart.
    let id = organization_id.simple().to_string();
    let slug = Slug::derive(&format!("personal {}", &id[20..]), &id[20..]);
    let command = Command::new(
        caller.actor,
        Utc::now(),
        OrganizationCommand::CreateOrganization(CreateOrganization {
            organization_id,
            name,
            slug,
            kind: OrganizationKind::Personal,
            owner: NewMember {
                user_id,
                email,
                first_name,
                last_name: super::dto::optional_text(request.last_name),
            },
        }),
    );
    // The domain names the owner's fields as a creation's (`owner.first_name`); this body
    // holds them at its top.
    let (outcome, created) = state
        .service
        .personal_organization(command, &context)
        .await
        .map_err(|error| ApiError::from(error).without_field_prefix("owner."))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(super::organization_response(&outcome, status))
}
