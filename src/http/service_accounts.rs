//! Service accounts: the key is returned once and kept only as its SHA-256.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, Utc};
use orgledger_domain::{
    CreateServiceAccount, OrganizationCommand, Permission, RotateServiceAccountKey, Scope,
    ServiceAccountRef,
};
use orgledger_projections::service_accounts::{self, ServiceAccountView};
use orgledger_projections::List;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::dto::Problems;
use super::error::{ApiError, ProblemResponses};
use super::extract::{ActorHeaders, Caller, CommandHeaders, IfMatch, Json, Meta, Path, Query};
use super::{authorize, committed, organization_id, AppState, PageQuery};
use crate::tokens::{self, SERVICE_ACCOUNT_PREFIX};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_service_account, list_service_accounts))
        .routes(routes!(rotate_service_account))
        .routes(routes!(delete_service_account))
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ServiceAccountDto {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub scopes: Vec<String>,
    /// The key's first characters, to recognize it; never the key.
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_rotated_at: Option<DateTime<Utc>>,
}

impl From<ServiceAccountView> for ServiceAccountDto {
    fn from(view: ServiceAccountView) -> Self {
        Self {
            id: view.id,
            name: view.name,
            description: view.description,
            scopes: view.scopes,
            key_prefix: view.key_prefix,
            created_at: view.created_at,
            last_rotated_at: view.last_rotated_at,
        }
    }
}

/// A service account with its key: shown this once.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IssuedKeyDto {
    pub service_account: ServiceAccountDto,
    #[schema(value_type = String)]
    pub key: orgledger_domain::Secret,
}

super::dto::page_type!(ServiceAccountList, ServiceAccountDto);

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateServiceAccountRequest {
    pub name: String,
    pub description: Option<String>,
    /// `members:read`, `members:write`, `invitations:write`, `groups:write`,
    /// `settings:write`, `audit:read`, `export:read`.
    pub scopes: Vec<String>,
}

/// A new key: `sa_` and 43 random characters; its first 11 characters are its prefix.
fn new_key() -> (String, String, String) {
    let issued = tokens::issue(SERVICE_ACCOUNT_PREFIX.trim_end_matches('_'));
    let prefix: String = issued.secret.chars().take(11).collect();
    (issued.secret, prefix, issued.sha256)
}

fn issued(
    outcome: &crate::service::Outcome,
    id: Uuid,
    key: String,
) -> Result<IssuedKeyDto, ApiError> {
    let account = outcome
        .committed
        .state
        .service_accounts
        .get(&id)
        .ok_or_else(|| ApiError::not_found("service account"))?;
    Ok(IssuedKeyDto {
        service_account: ServiceAccountDto {
            id: id.to_string(),
            name: account.name.clone(),
            description: account.description.clone(),
            scopes: account
                .scopes
                .iter()
                .map(|scope| scope.as_str().to_owned())
                .collect(),
            key_prefix: account.key_prefix.clone(),
            created_at: account.created_at,
            last_rotated_at: account.last_rotated_at,
        },
        key: key.into(),
    })
}

/// Create a service account; its key is in this response only.
#[utoipa::path(post, path = "/v1/organizations/{org_id}/service-accounts", tag = "service accounts",
    params(("org_id" = String, Path), ActorHeaders, CommandHeaders), request_body = CreateServiceAccountRequest,
    responses((status = 201, body = IssuedKeyDto), ProblemResponses))]
async fn create_service_account(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path(org_id): Path<String>,
    Json(request): Json<CreateServiceAccountRequest>,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let mut problems = Problems::default();
    let scopes: Vec<Scope> = request
        .scopes
        .iter()
        .enumerate()
        .filter_map(|(i, scope)| problems.check(Scope::parse(&format!("scopes[{i}]"), scope)))
        .collect();
    super::checked_for(
        &state,
        &caller,
        id,
        Permission::ManageServiceAccounts,
        problems.finish(),
    )
    .await?;
    let account_id = Uuid::now_v7();
    let (key, key_prefix, key_sha256) = new_key();
    let body = OrganizationCommand::CreateServiceAccount(CreateServiceAccount {
        service_account_id: account_id,
        name: request.name,
        description: request.description,
        scopes,
        key_prefix,
        key_sha256,
    });
    let outcome = super::execute(&state, caller, &context, expected, id, body).await?;
    let body = issued(&outcome, account_id, key)?;
    Ok(committed(&outcome, StatusCode::CREATED, axum::Json(body)))
}

/// The organization's service accounts (never their keys).
#[utoipa::path(get, path = "/v1/organizations/{org_id}/service-accounts", tag = "service accounts",
    params(("org_id" = String, Path), ActorHeaders, PageQuery),
    responses((status = 200, body = ServiceAccountList), ProblemResponses))]
async fn list_service_accounts(
    State(state): State<AppState>,
    caller: Caller,
    Path(org_id): Path<String>,
    Query(query): Query<PageQuery>,
) -> Result<axum::Json<ServiceAccountList>, ApiError> {
    let organization =
        authorize(&state, &caller, &org_id, Permission::ManageServiceAccounts).await?;
    let all = service_accounts::list(state.service.database(), &organization.id).await?;
    let page = query.page_of(all, List::ServiceAccounts(&organization.id), |account| {
        (account.created_at.timestamp_micros(), account.id.clone())
    })?;
    Ok(axum::Json(ServiceAccountList {
        items: page.items.into_iter().map(Into::into).collect(),
        next_cursor: page.next_cursor,
    }))
}

fn account_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found("service account"))
}

/// A new key; the old one fails at once.
#[utoipa::path(post, path = "/v1/organizations/{org_id}/service-accounts/{id}/rotate", tag = "service accounts",
    params(("org_id" = String, Path), ("id" = String, Path), ActorHeaders, CommandHeaders),
    responses((status = 200, body = IssuedKeyDto), ProblemResponses))]
async fn rotate_service_account(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path((org_id, raw_id)): Path<(String, String)>,
    _: super::extract::NoBody,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let account_id = account_id(&raw_id)?;
    let (key, key_prefix, key_sha256) = new_key();
    let body = OrganizationCommand::RotateServiceAccountKey(RotateServiceAccountKey {
        service_account_id: account_id,
        key_prefix,
        key_sha256,
    });
    let outcome = super::execute(&state, caller, &context, expected, id, body).await?;
    let body = issued(&outcome, account_id, key)?;
    Ok(committed(&outcome, StatusCode::OK, axum::Json(body)))
}

/// Delete a service account; its key fails at once.
#[utoipa::path(delete, path = "/v1/organizations/{org_id}/service-accounts/{id}", tag = "service accounts",
    params(("org_id" = String, Path), ("id" = String, Path), ActorHeaders, CommandHeaders),
    responses((status = 204, description = "Deleted"), ProblemResponses))]
async fn delete_service_account(
    State(state): State<AppState>,
    caller: Caller,
    Meta(context): Meta,
    IfMatch(expected): IfMatch,
    Path((org_id, raw_id)): Path<(String, String)>,
    _: super::extract::NoBody,
) -> Result<Response, ApiError> {
    let id = organization_id(&org_id)?;
    let body = OrganizationCommand::DeleteServiceAccount(ServiceAccountRef {
        service_account_id: account_id(&raw_id)?,
    });
    let outcome = super::execute(&state, caller, &context, expected, id, body).await?;
    Ok(committed(&outcome, StatusCode::NO_CONTENT, ()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::dto::AcceptInvitationRequest;
    use crate::http::settings::{AddAiProviderRequest, UpdateAiProviderRequest};

    #[test]
    fn secrets_in_requests_and_responses_are_sent_but_never_printed() {
        let issued = IssuedKeyDto {
            service_account: ServiceAccountDto {
                id: "sa".into(),
                name: "ci".into(),
                description: None,
                scopes: vec!["members:read".into()],
                key_prefix: "olk_abcd".into(),
                created_at: Utc::now(),
                last_rotated_at: None,
            },
            key: "olk_abcd-the-whole-key".into(),
        };
        assert!(!format!("{issued:?}").contains("the-whole-key"));
        let sent = serde_json::to_value(&issued).unwrap();
        assert_eq!(sent["key"], "olk_abcd-the-whole-key");

        let accept: AcceptInvitationRequest = serde_json::from_value(serde_json::json!({
            "token": "invitation-token-1", "user_id": "u1", "email": "a@example.com"
        }))
        .unwrap();
        assert_eq!(accept.token.expose(), "invitation-token-1");
        assert!(!format!("{accept:?}").contains("invitation-token-1"));

        let add: AddAiProviderRequest = serde_json::from_value(serde_json::json!({
            "name": "main", "kind": "openai", "api_key": "sk-provider-key"
        }))
        .unwrap();
        let update: UpdateAiProviderRequest =
            serde_json::from_value(serde_json::json!({ "api_key": "sk-replacement" })).unwrap();
        assert!(!format!("{add:?}{update:?}").contains("sk-"));
    }
}
