//! Health, readiness, Prometheus metrics, and the request metrics middleware.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::dto::HealthDto;
use super::error::{ApiError, ProblemResponses};
use super::AppState;

/// Projections further behind than this make the service not ready.
const READY_LAG_SECONDS: f64 = 5.0;

/// How long `/readyz` waits for the database before calling it unreachable.
const READY_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, body = HealthDto)))]
async fn healthz() -> axum::Json<HealthDto> {
    axum::Json(HealthDto {
        status: "ok".to_owned(),
    })
}

/// Database reachable, migrations applied, projections caught up within 5 s.
#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    responses((status = 200, body = HealthDto), ProblemResponses))]
async fn readyz(State(state): State<AppState>) -> Result<axum::Json<HealthDto>, ApiError> {
    // A probe is answered within its bound, not after the pool's 10 s wait for a connection.
    match tokio::time::timeout(READY_CHECK, readiness(&state)).await {
        Ok(Ok(())) => Ok(axum::Json(HealthDto {
            status: "ready".to_owned(),
        })),
        Ok(Err(detail)) => Err(not_ready(detail)),
        Err(_) => {
            tracing::warn!(
                seconds = READY_CHECK.as_secs(),
                "readiness: database did not answer"
            );
            Err(not_ready("database unreachable".into()))
        }
    }
}

/// The routes while the service starts (see [`super::Starting`]): the process is up, not
/// ready, and anything else is to be retried.
pub(super) fn while_starting() -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(|| async { not_ready("starting: the store is being opened and migrated".into()) }),
        )
        .fallback(|| async { ApiError::starting() })
}

fn not_ready(detail: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", detail)
}

/// Why the service is not ready, if it is not.
async fn readiness(state: &AppState) -> Result<(), String> {
    match state.service.database().is_migrated().await {
        Ok(true) => {}
        Ok(false) => return Err("migrations are pending".into()),
        Err(error) => {
            // The cause names hosts and users; this route answers anyone.
            tracing::warn!(%error, "readiness: database unreachable");
            return Err("database unreachable".into());
        }
    }
    let statuses = state.service.projector.status().await.map_err(|error| {
        tracing::warn!(%error, "readiness: projection status unavailable");
        "projection status unavailable".to_owned()
    })?;
    if let Some(behind) = statuses.iter().find(|s| s.lag_seconds > READY_LAG_SECONDS) {
        return Err(format!(
            "projection {} is {:.1} s behind",
            behind.name, behind.lag_seconds
        ));
    }
    Ok(())
}

/// Prometheus text: requests, latency, commands by outcome, events appended, projection lag.
#[utoipa::path(get, path = "/metrics", tag = "operations", security(()),
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<AppState>) -> Response {
    if let Ok(statuses) = state.service.projector.status().await {
        for status in statuses {
            let name = status.name.clone();
            metrics::gauge!("orgledger_projection_backlog_events", "projection" => name.clone())
                .set(status.backlog as f64);
            metrics::gauge!("orgledger_projection_lag_seconds", "projection" => name.clone())
                .set(status.lag_seconds);
            metrics::gauge!("orgledger_projection_failing", "projection" => name).set(
                if status.last_error.is_some() {
                    1.0
                } else {
                    0.0
                },
            );
        }
    }
    // Counters the projector keeps itself, only ever growing: exported as counters (at their
    // absolute value), so that `rate()` and `increase()` read them across restarts.
    for (projection, counters) in state.service.projector.counters() {
        metrics::counter!("orgledger_projection_events_applied_total", "projection" => projection.clone())
            .absolute(counters.events_applied);
        metrics::counter!("orgledger_projection_batches_applied_total", "projection" => projection.clone())
            .absolute(counters.batches_applied);
        metrics::counter!("orgledger_projection_failures_total", "projection" => projection)
            .absolute(counters.failures);
    }
    metrics::gauge!("orgledger_uptime_seconds").set(state.started.elapsed().as_secs_f64());
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Counts requests and their latency by route, method and status; commands by outcome.
pub async fn record_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let matched = request.extensions().get::<MatchedPath>();
    // Only a route's command methods are commands: not a 404, nor a HEAD or OPTIONS.
    let command = matched.is_some() && matches!(method, "POST" | "PUT" | "PATCH" | "DELETE");
    let route = matched.map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let elapsed = started.elapsed().as_secs_f64();
    metrics::counter!("orgledger_http_requests_total", "method" => method, "route" => route.clone(), "status" => status.clone()).increment(1);
    metrics::histogram!("orgledger_http_request_duration_seconds", "method" => method, "route" => route).record(elapsed);
    if command {
        let outcome = match response.status().as_u16() {
            _ if response.headers().contains_key("idempotent-replayed") => "replayed",
            200..=299 => "committed",
            500..=599 => "failed",
            _ => "rejected",
        };
        metrics::counter!("orgledger_commands_total", "outcome" => outcome).increment(1);
    }
    tracing::info!(
        status = response.status().as_u16(),
        latency_ms = elapsed * 1000.0,
        "request finished"
    );
    response
}

/// A method as a metric label: the standard ones by name, any other as `other`, so a client
/// inventing methods cannot add series without bound.
fn method_label(method: &axum::http::Method) -> &'static str {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT",
    ];
    STANDARD
        .into_iter()
        .find(|standard| *standard == method.as_str())
        .unwrap_or("other")
}
