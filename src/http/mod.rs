//! The HTTP API of `../shared/api.md`, on axum. Each capability is a module with its own
//! `router()`; they are merged here with the cross-cutting layers (request ids, logs,
//! metrics, idempotency, body limit, panics as problem+json).

mod audit;
mod dto;
mod error;
mod extract;
mod groups;
pub mod idempotency;
mod invitations;
mod members;
mod operations;
mod organizations;
mod service_accounts;
mod settings;
mod strict_json;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use orgledger_domain::{Actor, Grant, Permission, Role};

use extract::Caller;
use orgledger_projections::organizations::OrganizationView;
use sha2::{Digest, Sha256};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use uuid::Uuid;

pub use error::{ApiError, Problem};

use crate::service::{Orgledger, Outcome};

/// Largest accepted request body.
pub const BODY_LIMIT: usize = 256 * 1024;

/// The platform tokens the API layer authenticates with, kept as SHA-256 only.
pub struct PlatformTokens(Vec<[u8; 32]>);

impl PlatformTokens {
    pub fn new<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Self {
        Self(
            tokens
                .into_iter()
                .map(str::trim)
                .filter(|token| !token.is_empty())
                .map(|token| Sha256::digest(token.as_bytes()).into())
                .collect(),
        )
    }

    /// Also accepts the token whose SHA-256 is `digest` (one generated and kept in the
    /// database, which keeps only its digest).
    pub fn with_digest(mut self, digest: [u8; 32]) -> Self {
        self.0.push(digest);
        self
    }

    /// Compares digests, so the comparison's timing says nothing about the token.
    pub fn accepts(&self, token: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.0
            .iter()
            .fold(false, |found, known| found | (*known == digest))
    }
}

#[derive(Clone)]
pub struct AppState {
    pub service: Arc<Orgledger>,
    pub tokens: Arc<PlatformTokens>,
    pub metrics: PrometheusHandle,
    pub started: Instant,
    /// Where keyed commands keep their responses (see [`idempotency::KeptResponses`]).
    pub responses: Arc<idempotency::KeptResponses>,
}

impl AppState {
    /// The state of a service starting now, accepting `tokens`.
    pub fn new(service: Arc<Orgledger>, tokens: PlatformTokens) -> Self {
        let responses = Arc::new(idempotency::KeptResponses::new(service.database().clone()));
        Self {
            service,
            tokens: Arc::new(tokens),
            metrics: crate::telemetry::metrics_handle(),
            started: Instant::now(),
            responses,
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "orgledger",
        description = "Event-sourced organization management: organizations, members, invitations, audit, history and exports.",
        version = "1"
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(Problem, error::FieldProblem))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A platform token (ORGLEDGER_API_TOKEN); add X-Actor-Id to act as an end user.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Every route and its OpenAPI description, from one place.
pub fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(organizations::router())
        .merge(members::router())
        .merge(invitations::router())
        .merge(audit::router())
        .merge(groups::router())
        .merge(service_accounts::router())
        .merge(settings::router())
        .merge(operations::router())
        .split_for_parts()
}

/// `GET /openapi.json`, described in the document it serves.
fn described_with_itself(
    (routes, mut openapi): (Router<AppState>, utoipa::openapi::OpenApi),
) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    use utoipa::openapi::path::{HttpMethod, OperationBuilder};
    use utoipa::openapi::security::SecurityRequirement;
    use utoipa::openapi::{ContentBuilder, ObjectBuilder, ResponseBuilder};
    let document = ResponseBuilder::new()
        .description("This document: every operation, its parameters, bodies and problems")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(ObjectBuilder::new()))
                .build(),
        )
        .build();
    let operation = OperationBuilder::new()
        .tag("operations")
        .summary(Some("The API's OpenAPI 3.1 description"))
        .operation_id(Some("openapi"))
        .security(SecurityRequirement::default())
        .response("200", document)
        .build();
    openapi
        .paths
        .add_path_operation("/openapi.json", vec![HttpMethod::Get], operation);
    describe_command_headers(&mut openapi);
    (routes, openapi)
}

/// The headers a command's success may carry, on every command's 2xx responses.
fn describe_command_headers(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::header::HeaderBuilder;
    use utoipa::openapi::{ObjectBuilder, RefOr, Type};
    let flag = |value: &str, description: &str| {
        HeaderBuilder::new()
            .schema(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some([value])),
            )
            .description(Some(description))
            .build()
    };
    let consistency = flag(
        "pending",
        "The events are stored, but the read models did not reflect them within the bounded \
         wait (ORGLEDGER_CONSISTENCY_WAIT_MS, 5 s by default); absent when they did",
    );
    let replayed = flag(
        "true",
        "The first response to this Idempotency-Key, replayed: nothing was appended",
    );
    for item in openapi.paths.paths.values_mut() {
        let commands = [
            &mut item.post,
            &mut item.put,
            &mut item.patch,
            &mut item.delete,
        ];
        for operation in commands.into_iter().flatten() {
            for (status, response) in &mut operation.responses.responses {
                if let (true, RefOr::T(response)) = (status.starts_with('2'), response) {
                    response
                        .headers
                        .insert("X-Consistency".into(), consistency.clone());
                    response
                        .headers
                        .insert("Idempotent-Replayed".into(), replayed.clone());
                }
            }
        }
    }
}

pub fn app(state: AppState) -> Router {
    let (routes, openapi) = described_with_itself(api());
    let openapi = Arc::new(openapi);
    // Per route, so requests that match no route or method never reach the idempotency store.
    let routes = routes
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let openapi = openapi.clone();
                async move { axum::Json(openapi.as_ref().clone()) }
            }),
        )
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(extract::refuse_nul_in_url))
        .layer(axum::middleware::from_fn(extract::refuse_repeated_headers));
    served(routes).with_state(state)
}

fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

/// The layers every answer passes, the app's and those given while it starts: request ids,
/// a span, the request's record (log line and metrics), panics as problem+json.
fn served<S: Clone + Send + Sync + 'static>(routes: Router<S>) -> Router<S> {
    let x_request_id = HeaderName::from_static("x-request-id");
    recorded(routes)
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &axum::http::Request<_>| {
                    let request_id = request
                        .headers()
                        .get("x-request-id")
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or("-");
                    let path = loggable_path(request.uri().path());
                    tracing::info_span!("request", method = %request.method(), path, request_id)
                })
                // Every answer is logged once, by `record_request`, and a 5xx's cause by
                // `ApiError`: not again at ERROR for each 503 a readiness probe gets.
                .on_failure(()),
        )
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .layer(axum::middleware::from_fn(
            extract::replace_unrecordable_request_id,
        ))
}

/// A request's path as logged: a user id (which an API layer may make an email) is shown as
/// `{user_id}`, and any other segment that looks like an email (a path no route matched) as
/// `{redacted}`; organizations, groups and the like keep their ids, which are not personal.
fn loggable_path(path: &str) -> String {
    let mut previous = "";
    path.split('/')
        .map(|segment| {
            let shown = if matches!(previous, "users" | "members") && !segment.is_empty() {
                "{user_id}"
            } else if segment.contains('@') || segment.contains("%40") {
                "{redacted}"
            } else {
                segment
            };
            previous = segment;
            shown
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Every answer counted, timed and logged (`record_request`), a handler's panic among them:
/// it becomes a problem+json 500 inside the record, not outside it.
fn recorded<S: Clone + Send + Sync + 'static>(routes: Router<S>) -> Router<S> {
    routes
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("a handler panicked").into_response()
        }))
        .layer(axum::middleware::from_fn(operations::record_request))
}

/// What `serve` answers while it opens and migrates its store, listening from the start: a
/// probe sees the process up (`/healthz`) and not ready (`/readyz`), any other request gets
/// `503 starting`. Once [`Starting::ready`] hands it the app, every request goes there.
#[derive(Clone, Default)]
pub struct Starting(Arc<std::sync::OnceLock<Router>>);

impl Starting {
    pub fn router(&self) -> Router {
        use tower::ServiceExt;
        let app = self.0.clone();
        let starting = served(
            operations::while_starting()
                .method_not_allowed_fallback(|| async { method_not_allowed() }),
        );
        Router::new().fallback_service(tower::service_fn(move |request: axum::extract::Request| {
            let answering = app.get().unwrap_or(&starting).clone();
            answering.oneshot(request)
        }))
    }

    pub fn ready(&self, app: Router) {
        // Set once, by the one `serve` that made it.
        let _ = self.0.set(app);
    }
}

/// Serves until `shutdown` resolves; in-flight requests then have `grace` to finish. Past it,
/// returns without waiting for them (a client that never completes its request would hold
/// the stop up for good): they end with the process, as in a crash, which loses no committed
/// event and leaves a keyed command's answer to be settled as after one.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: std::time::Duration,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    // A streamed body ends in a small last chunk: with Nagle's algorithm it waited for the
    // client's delayed ACK, about 40 ms, on every streamed response of a kept-alive connection.
    let listener = listener.tap_io(|connection| {
        if let Err(error) = connection.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set on a connection");
        }
    });
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping.send(());
    });
    let overdue = async move {
        if stopped.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = std::future::IntoFuture::into_future(server) => served,
        () = overdue => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "connections still open after the shutdown grace; stopping without them");
            Ok(())
        }
    }
}

/// A path's organization id; a malformed one cannot exist.
pub(crate) fn organization_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found("organization"))
}

/// The organization, if the caller may exercise `permission` on it: `system` reads
/// everything; a user through their role, a service account through its scopes, both by
/// [`Grant::permits`].
pub(crate) async fn authorize(
    state: &AppState,
    caller: &Caller,
    raw_id: &str,
    permission: Permission,
) -> Result<OrganizationView, ApiError> {
    authorize_any(state, caller, raw_id, &[permission]).await
}

/// The organization, if the caller may exercise at least one of `permissions` on it.
pub(crate) async fn authorize_any(
    state: &AppState,
    caller: &Caller,
    raw_id: &str,
    permissions: &[Permission],
) -> Result<OrganizationView, ApiError> {
    let id = organization_id(raw_id)?;
    let database = state.service.database();
    let organization = orgledger_projections::organizations::get(database, &id.to_string())
        .await?
        .ok_or_else(|| ApiError::not_found("organization"))?;
    let allowed = match (&caller.actor, &caller.account) {
        (Actor::System, _) => true,
        (Actor::ServiceAccount(_), Some(account)) => {
            account.organization_id == organization.id
                && permits_any(&Grant::Scopes(&account.scopes), permissions)
        }
        (Actor::User(user_id), _) => {
            let role = orgledger_projections::members::role_of(
                database,
                &organization.id,
                user_id.as_str(),
            )
            .await?
            .and_then(|role| Role::parse(&role));
            match role {
                Some(Role::Custom(key)) => {
                    let names = orgledger_projections::organizations::custom_role_permissions(
                        database,
                        &organization.id,
                        &key,
                    )
                    .await?
                    .unwrap_or_default();
                    let granted: Vec<Permission> = names
                        .iter()
                        .filter_map(|name| Permission::parse_grantable(name))
                        .collect();
                    permits_any(&Grant::Custom(&granted), permissions)
                }
                Some(role) => permits_any(&Grant::BuiltIn(&role), permissions),
                None => false,
            }
        }
        (Actor::ServiceAccount(_), None) => false,
    };
    if allowed {
        Ok(organization)
    } else {
        Err(ApiError::forbidden())
    }
}

fn permits_any(grant: &Grant<'_>, permissions: &[Permission]) -> bool {
    permissions
        .iter()
        .any(|permission| grant.permits(*permission))
}

/// `parsed`, or, when its values broke a rule, the refusal a caller who may not issue the
/// command at all gets (`403`, or `404`/`409` for an organization unknown or deleted) before
/// the `422`: bad values are told only to a caller who could act on good ones, as on the
/// routes whose values the domain checks after its permission. Asked of the organization as
/// stored, not of the read models, which may lag a promotion.
pub(crate) async fn checked_for<T>(
    state: &AppState,
    caller: &Caller,
    organization_id: Uuid,
    permission: Permission,
    parsed: Result<T, impl Into<ApiError>>,
) -> Result<T, ApiError> {
    let invalid = match parsed {
        Ok(value) => return Ok(value),
        Err(invalid) => invalid.into(),
    };
    let organization = state.service.ledger.current(organization_id).await?;
    organization.may_issue(&caller.actor, permission)?;
    Err(invalid)
}

/// Runs `body` as the caller, now, against the organization; waits for the read models.
pub(crate) async fn execute(
    state: &AppState,
    caller: Caller,
    context: &crate::ledger::RequestContext,
    expected: Option<usize>,
    organization_id: Uuid,
    body: orgledger_domain::OrganizationCommand,
) -> Result<Outcome, ApiError> {
    let key_sha256 = caller.account.map(|account| account.key_sha256);
    let command = orgledger_domain::Command::new(caller.actor, chrono::Utc::now(), body)
        .with_key_sha256(key_sha256);
    Ok(state
        .service
        .run(organization_id, command, context, expected)
        .await?)
}

/// A command's response: its status and body, `X-Consistency: pending` if the read models
/// were still behind after the bounded wait, and the organization version as `ETag`.
pub(crate) fn committed(
    outcome: &Outcome,
    status: StatusCode,
    body: impl IntoResponse,
) -> Response {
    let mut response = (status, body).into_response();
    response
        .extensions_mut()
        .insert(idempotency::ResponseOrganization(
            outcome.committed.organization_id,
        ));
    let headers = response.headers_mut();
    if !outcome.consistent {
        headers.insert("x-consistency", HeaderValue::from_static("pending"));
    }
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", outcome.committed.version)) {
        headers.insert(header::ETAG, etag);
    }
    response
}

/// A command's response whose body is the organization after it.
pub(crate) fn organization_response(outcome: &Outcome, status: StatusCode) -> Response {
    let body =
        dto::OrganizationDto::from_state(&outcome.committed.state, outcome.committed.version);
    committed(outcome, status, axum::Json(body))
}

/// An organization read with its version as `ETag`.
pub(crate) fn with_etag(version: i64, body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

/// `?limit=&cursor=`, for a list with nothing to filter by.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// 1 to 500, default 50.
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

impl PageQuery {
    /// The requested page of a short list read whole, ordered by `key`.
    pub(crate) fn page_of<T, K>(
        &self,
        items: Vec<T>,
        list: orgledger_projections::List<'_>,
        key: impl Fn(&T) -> K,
    ) -> Result<orgledger_projections::Page<T>, ApiError>
    where
        K: Ord + serde::Serialize + serde::de::DeserializeOwned,
    {
        let limit = page_limit(self.limit)?;
        Ok(orgledger_projections::page_of(
            items,
            limit,
            list,
            self.cursor.as_deref(),
            key,
        )?)
    }
}

/// `limit` of a list: 1 to 500, default 50.
pub(crate) fn page_limit(limit: Option<i64>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(50),
        Some(limit) if (1..=500).contains(&limit) => Ok(limit as usize),
        Some(_) => Err(ApiError::field("limit", "must be between 1 and 500")),
    }
}

/// The longest `q` a search takes, in characters: longer than any name, email or slug it can
/// match, and far inside SQLite's limit on a `LIKE` pattern (50,000 bytes, which a longer
/// `q` reached and answered with a 500).
const LONGEST_SEARCH: usize = 256;

/// A search's `q`, refused when it is longer than [`LONGEST_SEARCH`] characters.
pub(crate) fn search_text(q: Option<String>) -> Result<Option<String>, ApiError> {
    match q {
        Some(q) if q.chars().count() > LONGEST_SEARCH => Err(ApiError::field(
            "q",
            &format!("must be at most {LONGEST_SEARCH} characters"),
        )),
        q => Ok(q),
    }
}

/// An RFC 3339 instant from a query parameter.
pub(crate) fn instant(
    field: &str,
    raw: Option<&str>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    raw.map(|raw| {
        chrono::DateTime::parse_from_rfc3339(raw)
            .map(|at| at.with_timezone(&chrono::Utc))
            .map_err(|_| {
                ApiError::field(
                    field,
                    "must be an RFC 3339 timestamp such as 2026-11-22T10:00:00Z",
                )
            })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn panics() -> StatusCode {
        panic!("deliberately")
    }

    #[test]
    fn a_user_id_in_a_path_is_not_logged() {
        for (path, logged) in [
            (
                "/v1/users/zoe@example.com/organizations",
                "/v1/users/{user_id}/organizations",
            ),
            (
                "/v1/organizations/0190/members/zoe@example.com",
                "/v1/organizations/0190/members/{user_id}",
            ),
            (
                "/v1/organizations/0190/groups/0191/members/zoe",
                "/v1/organizations/0190/groups/0191/members/{user_id}",
            ),
            (
                "/v1/organizations/0190/members",
                "/v1/organizations/0190/members",
            ),
            (
                "/v1/organizations/0190/members/",
                "/v1/organizations/0190/members/",
            ),
            ("/v1/user/zoe@example.com", "/v1/user/{redacted}"),
            ("/v1/user/zoe%40example.com/x", "/v1/user/{redacted}/x"),
        ] {
            assert_eq!(loggable_path(path), logged);
        }
    }

    #[tokio::test]
    async fn a_handler_that_panics_is_answered_as_a_problem_and_counted() {
        use tower::ServiceExt;
        let metrics = crate::telemetry::metrics_handle();
        let routes: Router = Router::new().route("/test/panics", axum::routing::post(panics));
        let request = axum::http::Request::post("/test/panics")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = recorded(routes).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            response.headers()[axum::http::header::CONTENT_TYPE],
            "application/problem+json"
        );
        let text = metrics.render();
        assert!(
            text.lines()
                .any(|line| line.starts_with("orgledger_http_requests_total")
                    && line.contains("route=\"/test/panics\"")
                    && line.contains("status=\"500\"")),
            "{text}"
        );
        assert!(
            text.contains("orgledger_commands_total{outcome=\"failed\"}"),
            "{text}"
        );
    }

    #[test]
    fn platform_tokens_accept_only_configured_ones() {
        let tokens = PlatformTokens::new("alpha, beta ,".split(','));
        assert!(tokens.accepts("alpha"));
        assert!(tokens.accepts("beta"));
        assert!(!tokens.accepts(""));
        assert!(!tokens.accepts("gamma"));
    }
}
