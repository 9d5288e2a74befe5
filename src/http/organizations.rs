//! Organizations: create, list, read, update, soft delete, restore, purge, transfer.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use orgledger_domain::{
    Command, CreateOrganization, DeleteOrganization, NewMember, OrganizationCommand,
    OrganizationError, Permission, PurgeOrganization, Slug, TransferOwnership, UpdateOrganization,
    UserId,
};
use orgledger_projections::organizations::{self as directory, OrganizationFilter};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::dto::*;
use super::error::{ApiError, ProblemResponses};
use super::extract::{
    ActorHeaders, Caller, CommandHeaders, CreationHeaders, IfMatch, Json, Meta, Path, Query,
};
use super::{
    authorize, committed, organization_id, organization_response, page_limit, with_etag, AppState,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_organization, list_organizations))
        .routes(routes!(
            get_organization,
            update_organization,
            delete_organization
        ))
        .routes(routes!(restore_organization))
        .routes(routes!(purge_organization))
        .routes(routes!(transfer_ownership))
}

/// Create an organization; the actor (or the named `owner`) becomes its first owner.
#[utoipa::path(post, path = "/v1/organizations", tag = "organizations",
    params(ActorHeaders, CreationHeaders), request_body = CreateOrganizationRequest,
    responses((status = 201, body = OrganizationDto, description = "Created"), ProblemResponses))]
async fn create_organization(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    Json(request): Json<CreateOrganizationRequest>,
) -> Result<Response, ApiError> {
    // A service account acts inside its own organization only, whatever its body says.
    if matches!(caller.actor, orgledger_domain::Actor::ServiceAccount(_)) {
        return Err(OrganizationError::PermissionDenied.into());
    }
    let request = NewOrganization::try_from(request)?;
    let organization_id = Uuid::now_v7();
    let owner = match (&caller.actor, request.owner) {
        (_, Some((user_id, email, first_name, last_name))) => NewMember {
            user_id,
            email: Some(email),
            first_name,
            last_name,
        },
        (orgledger_domain::Actor::User(user_id), None) => NewMember {
            user_id: user_id.clone(),
            email: None,
            first_name: None,
            last_name: None,
        },
        (orgledger_domain::Actor::ServiceAccount(_), None) => {
            return Err(OrganizationError::PermissionDenied.into())
        }
        (orgledger_domain::Actor::System, None) => {
            return Err(OrganizationError::ActorRequired.into())
        }
    };
    let slug_was_given = request.slug.is_some();
    // Letters beyond ASCII are spelled in it first, so "Café Société" is `cafe-societe`
    // rather than losing them (`caf-soci-t`).
    let slug = request.slug.unwrap_or_else(|| {
        Slug::derive(
            &deunicode::deunicode(request.name.as_str()),
            &organization_id.simple().to_string()[..8],
        )
    });
    let command = Command::new(
        caller.actor,
        Utc::now(),
        OrganizationCommand::CreateOrganization(CreateOrganization {
            organization_id,
            name: request.name,
            slug,
            kind: request.kind,
            owner,
        }),
    );
    let outcome = state
        .service
        .create_organization(command, slug_was_given, &context)
        .await?;
    Ok(organization_response(&outcome, StatusCode::CREATED))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListOrganizationsQuery {
    /// Matches name or slug.
    q: Option<String>,
    /// `active` or `deleted`.
    status: Option<String>,
    /// 1 to 500, default 50.
    limit: Option<i64>,
    cursor: Option<String>,
}

/// The organization directory (`system` only).
#[utoipa::path(get, path = "/v1/organizations", tag = "organizations",
    params(ActorHeaders, ListOrganizationsQuery),
    responses((status = 200, body = OrganizationPage), ProblemResponses))]
async fn list_organizations(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListOrganizationsQuery>,
) -> Result<axum::Json<OrganizationPage>, ApiError> {
    if !caller.is_system() {
        return Err(ApiError::forbidden());
    }
    if let Some(status) = &query.status {
        if !matches!(status.as_str(), "active" | "deleted") {
            return Err(ApiError::field("status", "must be active or deleted"));
        }
    }
    let filter = OrganizationFilter {
        q: super::search_text(query.q)?,
        status: query.status,
        limit: page_limit(query.limit)?,
        cursor: query.cursor,
    };
    let page = directory::list(state.service.database(), &filter).await??;
    Ok(axum::Json(OrganizationPage {
        items: page.items.into_iter().map(Into::into).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// An organization (members and `system`).
#[utoipa::path(get, path = "/v1/organizations/{org_id}", tag = "organizations",
    params(("org_id" = String, Path), ActorHeaders),
    responses((status = 200, body = OrganizationDto), ProblemResponses))]
async fn get_organization(
    State(state): State<AppState>,
    caller: Caller,
    Path(org_id): Path<String>,
) -> Result<Response, ApiError> {
    let organization = authorize(&state, &caller, &org_id, Permission::ViewOrganization).await?;
    let version = organization.version;
    Ok(with_etag(
        version,
        axum::Json(OrganizationDto::from(organization)),
    ))
}

/// Change name, slug and settings (owners and admins).
#[utoipa::path(patch, path = "/v1/organizations/{org_id}", tag = "organizations",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders),
    request_body = UpdateOrganizationRequest,
    responses((status = 200, body = OrganizationDto), ProblemResponses))]
async fn update_organization(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(org_id): Path<String>,
    Json(request): Json<UpdateOrganizationRequest>,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let update = UpdateOrganization::try_from(request);
    let update =
        super::checked_for(&state, &caller, id, Permission::ManageSettings, update).await?;
    let outcome = super::execute(
        &state,
        caller,
        &context,
        expected,
        id,
        OrganizationCommand::UpdateOrganization(update),
    )
    .await?;
    Ok(organization_response(&outcome, StatusCode::OK))
}

/// Soft delete (owner): recoverable for 30 days.
#[utoipa::path(delete, path = "/v1/organizations/{org_id}", tag = "organizations",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders),
    request_body = ConfirmNameRequest,
    responses((status = 200, body = OrganizationDto), ProblemResponses))]
async fn delete_organization(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(org_id): Path<String>,
    Json(request): Json<ConfirmNameRequest>,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let body = OrganizationCommand::DeleteOrganization(DeleteOrganization {
        confirm_name: request.confirm_name,
    });
    let outcome = super::execute(&state, caller, &context, expected, id, body).await?;
    Ok(organization_response(&outcome, StatusCode::OK))
}

/// Restore a soft-deleted organization within 30 days (owner).
#[utoipa::path(post, path = "/v1/organizations/{org_id}/restore", tag = "organizations",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders),
    responses((status = 200, body = OrganizationDto), ProblemResponses))]
async fn restore_organization(
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
        OrganizationCommand::RestoreOrganization,
    )
    .await?;
    Ok(organization_response(&outcome, StatusCode::OK))
}

/// Force delete (owner): read models dropped, personal data erased, a tombstone kept.
#[utoipa::path(post, path = "/v1/organizations/{org_id}/purge", tag = "organizations",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders),
    request_body = ConfirmNameRequest,
    responses((status = 200, body = PurgedDto), ProblemResponses))]
async fn purge_organization(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(org_id): Path<String>,
    Json(request): Json<ConfirmNameRequest>,
) -> Result<Response, ApiError> {
    // The domain lets `system` purge once the restore window has elapsed: that is the
    // scheduled purge, run inside the service. Over HTTP `system` commands nothing but
    // creations (api.md).
    if caller.is_system() {
        return Err(OrganizationError::ActorRequired.into());
    }
    let id = organization_id(&org_id)?;
    let body = OrganizationCommand::PurgeOrganization(PurgeOrganization {
        confirm_name: request.confirm_name,
    });
    let outcome = super::execute(&state, caller, &context, expected, id, body).await?;
    let body = PurgedDto {
        id: id.to_string(),
        status: "purged".to_owned(),
        version: outcome.committed.version as i64,
    };
    let mut response = committed(&outcome, StatusCode::OK, axum::Json(body));
    // Its answer names no personal data, so it is not filed under the organization whose
    // responses the purge forgot: a retry with its Idempotency-Key gets it again.
    response
        .extensions_mut()
        .remove::<super::idempotency::ResponseOrganization>();
    Ok(response)
}

/// Make an admin the owner; the acting owner becomes an admin.
#[utoipa::path(post, path = "/v1/organizations/{org_id}/transfer-ownership", tag = "organizations",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders),
    request_body = TransferOwnershipRequest,
    responses((status = 200, body = OrganizationDto), ProblemResponses))]
async fn transfer_ownership(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(org_id): Path<String>,
    Json(request): Json<TransferOwnershipRequest>,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let new_owner_id = UserId::parse("new_owner_id", &request.new_owner_id);
    let new_owner_id = super::checked_for(
        &state,
        &caller,
        id,
        Permission::TransferOwnership,
        new_owner_id,
    )
    .await?;
    let body = OrganizationCommand::TransferOwnership(TransferOwnership { new_owner_id });
    let outcome = super::execute(&state, caller, &context, expected, id, body).await?;
    Ok(organization_response(&outcome, StatusCode::OK))
}
