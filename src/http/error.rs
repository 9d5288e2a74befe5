//! One error type for the HTTP edge: every failure becomes an RFC 9457 problem+json with the
//! contract's `code`. Causes of 5xx are logged, never shown.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use orgledger_domain::{FieldError, OrganizationError};
use serde::Serialize;
use utoipa::ToSchema;

use crate::ledger::LedgerError;

/// A field that broke a rule of shape or range.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

/// RFC 9457 problem details.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the problem type: `urn:orgledger:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The contract's error code, e.g. `last_owner`.
    pub code: String,
    /// For `validation_failed`: the offending fields found. Values are checked together; a
    /// body not of the route's shape (a wrong type, an unknown field) names the first such
    /// field alone, and rules that need the organization are checked once the values pass.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(nullable = false)]
    pub errors: Vec<FieldProblem>,
}

/// The code of a command that could not commit because its organization kept changing.
const CONTENDED: &str = "conflict";

/// The code of a request the database was too busy to take in time.
const BUSY: &str = "database_busy";
const STARTING: &str = "starting";

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub errors: Vec<FieldProblem>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    pub fn validation(errors: Vec<FieldProblem>) -> Self {
        let detail = errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "validation_failed",
            detail,
            errors,
        }
    }

    pub fn field(field: &str, message: &str) -> Self {
        Self::validation(vec![FieldProblem {
            field: field.to_owned(),
            message: message.to_owned(),
        }])
    }

    /// The same error with `prefix` taken off its fields' names: for a route whose body holds
    /// at its top what the command nests (a personal organization's owner).
    pub fn without_field_prefix(self, prefix: &str) -> Self {
        if self.errors.is_empty() {
            return self;
        }
        let errors = self
            .errors
            .into_iter()
            .map(|problem| FieldProblem {
                field: problem
                    .field
                    .strip_prefix(prefix)
                    .map_or_else(|| problem.field.clone(), str::to_owned),
                message: problem.message,
            })
            .collect();
        Self::validation(errors)
    }

    pub fn malformed(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_request", detail)
    }

    pub fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "a valid bearer token is required",
        )
    }

    pub fn forbidden() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_denied",
            "the actor is not allowed to do this",
        )
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    /// The database did not take the request's work in time (a long rebuild holding
    /// SQLite's write lock, every pooled connection busy): a retry after `Retry-After` may
    /// pass. Logged as a warning, its cause never shown.
    pub fn busy(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(%cause, "database busy: request answered 503");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            BUSY,
            "the database is busy; retry shortly",
        )
    }

    /// Any request but `/healthz` while `serve` opens and migrates its store: it listens from
    /// the start, so that a probe sees the process up and a client a clear answer.
    pub fn starting() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            STARTING,
            "the service is starting: its store is being opened and migrated; retry shortly",
        )
    }

    /// A failure that is ours, not the caller's: logged in full, shown as a bare 500.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(%cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "the server failed to handle this request; it has been logged",
        )
    }

    fn title(&self) -> &'static str {
        self.status.canonical_reason().unwrap_or("Error")
    }
}

/// On a response: a refusal that says nothing of the request itself (the organization kept
/// changing under it), which a retry may get past. An `Idempotency-Key` does not keep it, so
/// the retry runs the command rather than replaying the refusal for a day.
#[derive(Debug, Clone, Copy)]
pub struct Transient;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let transient = self.code == CONTENDED;
        // Not `Transient`: a busy database may refuse a read after the command committed,
        // so an Idempotency-Key's claim is settled from the log, as after any 5xx.
        let retry_after = self.code == BUSY || self.code == STARTING;
        let problem = Problem {
            kind: format!("urn:orgledger:problem:{}", self.code),
            title: self.title().to_owned(),
            status: self.status.as_u16(),
            detail: self.detail,
            code: self.code.to_owned(),
            errors: self.errors,
        };
        let mut response = (self.status, axum::Json(problem)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if transient {
            response.extensions_mut().insert(Transient);
        }
        if retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // RFC 9110, section 11.6.1: a 401 names the scheme that would be accepted.
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"orgledger\""),
            );
        }
        response
    }
}

impl From<Vec<FieldError>> for ApiError {
    fn from(errors: Vec<FieldError>) -> Self {
        Self::validation(
            errors
                .into_iter()
                .map(|e| FieldProblem {
                    field: e.field,
                    message: e.message,
                })
                .collect(),
        )
    }
}

impl From<FieldError> for ApiError {
    fn from(error: FieldError) -> Self {
        vec![error].into()
    }
}

impl From<OrganizationError> for ApiError {
    fn from(error: OrganizationError) -> Self {
        use OrganizationError as E;
        let status = match &error {
            E::Validation(errors) => return errors.clone().into(),
            E::ActorRequired => StatusCode::BAD_REQUEST,
            E::KeyRevoked => StatusCode::UNAUTHORIZED,
            E::PermissionDenied | E::FieldLocked(_) | E::EmailMismatch => StatusCode::FORBIDDEN,
            E::NotFound(_) | E::InvalidInvitation => StatusCode::NOT_FOUND,
            E::InvitationExpired => StatusCode::GONE,
            E::CannotRemoveSelf
            | E::TargetNotAdmin
            | E::ConfirmationMismatch
            | E::PersonalOrganization => StatusCode::UNPROCESSABLE_ENTITY,
            E::AlreadyExists
            | E::LastOwner
            | E::OrganizationDeleted
            | E::OrganizationNotDeleted
            | E::RestoreWindowElapsed
            | E::SlugTaken
            | E::AlreadyMember
            | E::InvitationPending
            | E::OwnInvitationPending
            | E::SeatLimitReached
            | E::GroupExists
            | E::RoleExists
            | E::RoleInUse
            | E::PersonalOrganizationExists => StatusCode::CONFLICT,
        };
        Self::new(status, error.code(), error.to_string())
    }
}

impl From<LedgerError> for ApiError {
    fn from(error: LedgerError) -> Self {
        match error {
            LedgerError::Rejected(rejection) => rejection.into(),
            LedgerError::VersionMismatch { expected, actual } => Self::new(
                StatusCode::PRECONDITION_FAILED,
                "version_mismatch",
                format!(
                    "If-Match names version {expected} but the organization is at version {actual}"
                ),
            ),
            LedgerError::Contended => Self::new(
                StatusCode::CONFLICT,
                CONTENDED,
                "the organization kept changing concurrently; retry the request",
            ),
            LedgerError::ClaimTakenOver => Self::new(
                StatusCode::CONFLICT,
                "idempotency_key_in_use",
                "a retry took this request's Idempotency-Key over while it ran; this request \
                 stored nothing",
            ),
            LedgerError::Store(cause) => Self::internal(cause),
            LedgerError::Busy(cause) => Self::busy(cause),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        if orgledger_projections::is_busy(&error) {
            Self::busy(error)
        } else {
            Self::internal(error)
        }
    }
}

impl From<orgledger_projections::CursorError> for ApiError {
    fn from(error: orgledger_projections::CursorError) -> Self {
        Self::field("cursor", &error.to_string())
    }
}

impl From<orgledger_projections::ProjectionError> for ApiError {
    fn from(error: orgledger_projections::ProjectionError) -> Self {
        match &error {
            orgledger_projections::ProjectionError::Database(cause)
                if orgledger_projections::is_busy(cause) =>
            {
                Self::busy(error)
            }
            _ => Self::internal(error),
        }
    }
}

/// The problem responses every operation may give, for the OpenAPI description.
pub struct ProblemResponses;

impl utoipa::IntoResponses for ProblemResponses {
    fn responses() -> std::collections::BTreeMap<
        String,
        utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
    > {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        [
            ("400", "malformed_request (unparseable body) or actor_required"),
            ("401", "unauthenticated: no or unknown token, or a service account's key rotated while its command ran"),
            ("403", "permission_denied, field_locked or email_mismatch"),
            ("404", "not_found or invalid_invitation"),
            ("405", "method_not_allowed"),
            ("409", "a rule of state: last_owner, slug_taken, already_member, invitation_pending, invitation_not_pending, organization_deleted, restore_window_elapsed, seat_limit_reached, role_in_use, personal_organization_exists, conflict, idempotency_key_in_use, idempotency_response_lost"),
            ("410", "invitation_expired"),
            ("412", "version_mismatch: If-Match names an older version"),
            ("413", "payload_too_large"),
            ("415", "unsupported_media_type: send application/json"),
            ("422", "validation_failed (with errors per field), cannot_remove_self, target_not_admin, confirmation_mismatch, personal_organization, idempotency_key_reused"),
            ("500", "internal_error: logged, never detailed"),
            ("503", "not_ready (/readyz); database_busy or starting: retry after `Retry-After`"),
        ]
        .into_iter()
        .map(|(status, description)| {
            let response = ResponseBuilder::new()
                .description(description)
                .content(
                    "application/problem+json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("Problem")))
                        .build(),
                )
                .build();
            (status.to_owned(), response.into())
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_domain_error_maps_to_its_contract_status() {
        use OrganizationError as E;
        let cases = [
            (E::ActorRequired, 400),
            (E::PermissionDenied, 403),
            (E::KeyRevoked, 401),
            (E::FieldLocked("title"), 403),
            (E::EmailMismatch, 403),
            (E::NotFound("member"), 404),
            (E::InvalidInvitation, 404),
            (E::InvitationExpired, 410),
            (E::LastOwner, 409),
            (E::SlugTaken, 409),
            (E::AlreadyMember, 409),
            (E::InvitationPending, 409),
            (E::OwnInvitationPending, 409),
            (E::OrganizationDeleted, 409),
            (E::RestoreWindowElapsed, 409),
            (E::CannotRemoveSelf, 422),
            (E::TargetNotAdmin, 422),
            (E::ConfirmationMismatch, 422),
            (E::PersonalOrganization, 422),
            (E::SeatLimitReached, 409),
            (E::RoleInUse, 409),
            (E::PersonalOrganizationExists, 409),
        ];
        for (error, status) in cases {
            let code = error.code();
            let api = ApiError::from(error);
            assert_eq!((api.status.as_u16(), api.code), (status, code));
        }
    }

    #[test]
    fn a_request_whose_key_a_retry_took_over_is_told_the_key_is_in_use() {
        let api = ApiError::from(LedgerError::ClaimTakenOver);
        assert_eq!(
            (api.status.as_u16(), api.code),
            (409, "idempotency_key_in_use")
        );
        assert!(api.detail.contains("stored nothing"), "{}", api.detail);
    }

    #[tokio::test]
    async fn a_database_too_busy_to_take_the_request_is_a_503_to_retry_not_a_500() {
        use sqlx::{ConnectOptions, Connection};
        let dir = tempfile::tempdir().unwrap();
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("busy.db"))
            .create_if_missing(true)
            .busy_timeout(std::time::Duration::ZERO);
        let mut holder = options.connect().await.unwrap();
        sqlx::query("CREATE TABLE t (x)")
            .execute(&mut holder)
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut holder)
            .await
            .unwrap();
        let mut writer = options.connect().await.unwrap();
        let locked = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut writer)
            .await
            .unwrap_err();
        assert!(orgledger_projections::is_busy(&locked), "{locked}");
        let missing = sqlx::query("INSERT INTO missing VALUES (1)")
            .execute(&mut writer)
            .await
            .unwrap_err();
        assert!(!orgledger_projections::is_busy(&missing), "{missing}");
        writer.close().await.unwrap();

        let busy_store = crate::store::StoreError::Database(sqlx::Error::PoolTimedOut);
        for api in [
            ApiError::from(locked),
            ApiError::from(sqlx::Error::PoolTimedOut),
            ApiError::from(sqlx::Error::PoolClosed),
            ApiError::from(LedgerError::from(busy_store)),
        ] {
            assert_eq!((api.status.as_u16(), api.code), (503, "database_busy"));
            let response = api.into_response();
            assert_eq!(response.headers()[header::RETRY_AFTER], "1");
            assert!(
                response.extensions().get::<Transient>().is_none(),
                "a key's claim is settled from the log, as after any 5xx: the command may \
                 have committed before a later read found the database busy"
            );
        }
        // A table that is not there; a connection that broke while a statement ran (its
        // outcome unknown: a retry must not be invited as if nothing had run).
        for failure in [
            missing,
            sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()),
        ] {
            assert_eq!(
                ApiError::from(failure).status,
                StatusCode::INTERNAL_SERVER_ERROR
            );
        }
    }
}
