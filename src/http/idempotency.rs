//! `Idempotency-Key` on POST, PUT, PATCH and DELETE: the first response is stored durably and
//! replayed for 24 hours to a retry with the same key and body; the same key with another
//! body is `422 idempotency_key_reused`. Keys are scoped to the caller (token and actor).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use orgledger_projections::{to_micros, Database};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::error::{ApiError, Transient};
use super::extract::{too_large, Caller};
use super::{AppState, BODY_LIMIT};
use crate::store::DataKeys;

const KEEP_FOR: chrono::Duration = chrono::Duration::hours(24);
/// How long a retry waits for the first request with its key to finish.
const WAIT_FOR_FIRST: Duration = Duration::from_secs(10);
const LARGEST_STORED_RESPONSE: usize = 1024 * 1024;
const SEAL_PURPOSE: &str = "orgledger.idempotent-response";
/// How long a claim may go unrenewed before a retry settles it from the log: its holder
/// renews it every [`RENEW_EVERY`] while the command runs, so only a claim whose process died
/// goes that long. Short, because a retry of a command cut short by a crash waits that long
/// to be settled; six renewals fit in it, so a slow database does not cost a live holder its
/// claim (which would only fence its append: nothing is ever applied twice).
const CLAIM_LEASE: chrono::Duration = chrono::Duration::seconds(30);
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How long a holder whose command failed waits before settling its claim from the log: a
/// commit whose outcome the failure left unknown is visible by then.
const SETTLE_GRACE: Duration = Duration::from_secs(2);

/// On a keyed command's request: the id of its claim, which [`RequestContext`] carries into
/// the metadata of the events it stores (`idempotency_claim`). Whether a claim left without
/// a response was applied is then a question the log answers.
///
/// [`RequestContext`]: crate::ledger::RequestContext
#[derive(Debug, Clone)]
pub struct IdempotencyClaim(pub String);

/// On a command's response: the organization it changed. Its stored copy is filed under
/// that organization, so the organization's purge erases it (see `Ledger::finish_purge`).
#[derive(Debug, Clone, Copy)]
pub struct ResponseOrganization(pub Uuid);

#[derive(sqlx::FromRow)]
struct Stored {
    fingerprint: String,
    created_at_us: i64,
    claim_id: Option<String>,
    status: Option<i64>,
    content_type: Option<String>,
    etag: Option<String>,
    consistency: Option<String>,
    body: Option<Vec<u8>>,
}

/// What makes two requests under one key the same request: method, path and query, body.
fn fingerprint_of(method: &Method, path: &str, body: &[u8]) -> String {
    hex::encode(
        Sha256::new()
            .chain_update(method.as_str().as_bytes())
            .chain_update(b"\n")
            .chain_update(path.as_bytes())
            .chain_update(b"\n")
            .chain_update(body)
            .finalize(),
    )
}

/// A JSON body as serde_json writes it back: its objects' keys sorted (its `Map` is a
/// `BTreeMap` while the `preserve_order` feature is off, which
/// `idempotency_keys_replay_the_first_response` checks) and no whitespace. A retry that
/// serializes the same request anew, in another key order or layout, is the same request.
/// `None` when the body is not JSON; its bytes are compared as they are.
fn canonical_body(bytes: &[u8]) -> Option<Vec<u8>> {
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    serde_json::to_vec(&value).ok()
}

pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let is_command = matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );
    let Some(key) = request.headers().get("idempotency-key").cloned() else {
        return next.run(request).await;
    };
    if !is_command {
        return next.run(request).await;
    }
    // Only a caller the service knows claims a key: a request with no valid token (or a bad
    // `X-Actor-Id`) writes nothing to the store and gets its refusal from the handler, which
    // reuses the caller resolved here.
    let (mut parts, body) = request.into_parts();
    let known = match Caller::from_request_parts(&mut parts, &state).await {
        Ok(caller) => {
            parts.extensions.insert(caller);
            true
        }
        // Who is calling could not be looked up: no command may run unclaimed meanwhile.
        Err(refusal) if refusal.status.is_server_error() => return refusal.into_response(),
        Err(_) => false,
    };
    // A service account that rotated or deleted its own key and retries with the old one is
    // still owed the answer kept for it, which holds the new key: looked up, never claimed.
    let old_account_key = super::extract::bearer(&parts.headers)
        .is_some_and(|token| token.starts_with(crate::tokens::SERVICE_ACCOUNT_PREFIX));
    if !known && !old_account_key {
        return next.run(Request::from_parts(parts, body)).await;
    }
    // `to_str` takes a tab too: printable ASCII (space to `~`) only.
    let key = match key.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) && !key.contains('\t') => key.to_owned(),
        _ => {
            return ApiError::field(
                "Idempotency-Key",
                "must be 1 to 255 printable ASCII characters (space to ~)",
            )
            .into_response()
        }
    };
    let Ok(bytes) = to_bytes(body, BODY_LIMIT).await else {
        return too_large().into_response();
    };
    // Raw bytes: a non-ASCII actor must not share the scope of a request without one.
    let header_bytes = |name: &str| parts.headers.get(name).map_or(&[][..], |v| v.as_bytes());
    let scope = hex::encode(
        Sha256::new()
            .chain_update(header_bytes("authorization"))
            .chain_update(b"\n")
            .chain_update(header_bytes("x-actor-id"))
            .finalize(),
    );
    let path = parts.uri.path_and_query().map_or("", |p| p.as_str());
    let canonical = canonical_body(&bytes);
    let fingerprint = fingerprint_of(&parts.method, path, canonical.as_deref().unwrap_or(&bytes));
    let database = state.service.database().clone();
    // Keys stored before bodies were compared as canonical JSON (2026-12-03) hold the raw
    // body's fingerprint: a retry of one is still the same request until it expires.
    let before_canonical = fingerprint_of(&parts.method, path, &bytes);
    let same = [fingerprint.as_str(), before_canonical.as_str()];
    if !known {
        let answered = matches!(
            load(&database, &scope, &key).await,
            Ok(Some(Stored {
                status: Some(_),
                ..
            }))
        );
        if answered {
            if let Replay::Answer(response) =
                replay(&state, &database, &scope, &key, &same, "").await
            {
                return response;
            }
        }
        return next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
    }

    let claim_id = Uuid::now_v7().to_string();
    let claimed = claim_or_replay(
        &state,
        &database,
        (&scope, &key),
        &fingerprint,
        &same,
        &claim_id,
    )
    .await;
    if let Err(response) = claimed {
        return response;
    }
    // In a task of its own: a client that goes away must not cancel the command midway,
    // after its events are stored but before its response is, or a retry would run it again.
    let mut request = Request::from_parts(parts, Body::from(bytes));
    request
        .extensions_mut()
        .insert(IdempotencyClaim(claim_id.clone()));
    let recorded = tokio::spawn(run_and_record(
        state, database, scope, key, claim_id, next, request,
    ));
    recorded.await.unwrap_or_else(|_| {
        // The handler panicked; `Claim` settled the key as the task unwound.
        ApiError::internal("a handler panicked").into_response()
    })
}

/// Runs the claimed command and stores its response under the key, renewing the claim while
/// it runs. A 401 or a transient refusal releases the key ([`settlement_of`]); a 5xx, or a
/// response too large to keep, has the claim settled from the log (see [`settle`]).
async fn run_and_record(
    state: AppState,
    database: Database,
    scope: String,
    key: String,
    claim_id: String,
    next: Next,
    request: Request,
) -> Response {
    let keys = state.service.ledger.keys().clone();
    let responses = state.responses.clone();
    let mut claim = Claim {
        responses: Some(responses.clone()),
        keys: keys.clone(),
        scope: scope.clone(),
        key: key.clone(),
        claim_id: claim_id.clone(),
        renewing: tokio::spawn(renew_while_running(
            database.clone(),
            scope.clone(),
            key.clone(),
            claim_id.clone(),
            RENEW_EVERY,
        ))
        .abort_handle(),
    };
    let response = next.run(request).await;
    let (parts, body) = response.into_parts();
    let body = to_bytes(body, LARGEST_STORED_RESPONSE).await;
    claim.renewing.abort();
    let Ok(body) = body else {
        // `Claim` settles it as it goes.
        return ApiError::internal("a command response was too large to keep").into_response();
    };
    let stored = match settlement_of(&parts) {
        // `Claim` settles it as it goes: the failure may have come after the commit.
        Settlement::FromLog => Ok(()),
        Settlement::Release => {
            claim.responses = None;
            release(&database, &scope, &key, &claim_id)
                .await
                .map_err(Arc::new)
        }
        Settlement::Keep => {
            claim.responses = None;
            // Responses can hold a secret shown once (an invitation token, a service-account
            // key): the stored copy is sealed.
            let sealed = keys.seal_blob(SEAL_PURPOSE, &body);
            complete(&responses, &scope, &key, &claim_id, &parts, &sealed)
                .await
                .map(drop)
        }
    };
    if let Err(error) = stored {
        tracing::error!(%error, "could not record an idempotent response");
    }
    Response::from_parts(parts, Body::from(body))
}

/// What becomes of a claim once its command has answered.
#[derive(Debug, PartialEq)]
enum Settlement {
    /// The response is the key's answer for 24 hours.
    Keep,
    /// Nothing was applied and a retry may fare otherwise (a bad token must not hold its
    /// slot; an organization that kept changing may hold still): the key is free again.
    Release,
    /// A failure that may have come after the commit: the log tells (see [`settle`]).
    FromLog,
}

fn settlement_of(parts: &axum::http::response::Parts) -> Settlement {
    if parts.status.is_server_error() {
        Settlement::FromLog
    } else if parts.status == StatusCode::UNAUTHORIZED
        || parts.extensions.get::<Transient>().is_some()
    {
        Settlement::Release
    } else {
        Settlement::Keep
    }
}

/// Keeps the claim's lease fresh while its command runs (renewed `every`, until the task is
/// aborted), so that no retry takes over a command that may still commit.
async fn renew_while_running(
    database: Database,
    scope: String,
    key: String,
    claim_id: String,
    every: Duration,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        if let Err(error) = renew(&database, &scope, &key, &claim_id).await {
            tracing::warn!(%error, "could not renew an idempotency claim");
        }
    }
}

async fn renew(
    database: &Database,
    scope: &str,
    key: &str,
    claim_id: &str,
) -> Result<(), sqlx::Error> {
    orgledger_projections::with_pool!(database, pool => {
        sqlx::query(
            "UPDATE idempotency_keys SET created_at_us = $4
              WHERE scope = $1 AND key = $2 AND claim_id = $3 AND status IS NULL",
        )
        .bind(scope).bind(key).bind(claim_id).bind(to_micros(Utc::now()))
        .execute(pool).await?;
    });
    Ok(())
}

/// A claim whose request ended without a response to keep (a 5xx, a response too large, or
/// a panic that unwound the task): settled from the log after [`SETTLE_GRACE`], so a retry is
/// neither made to wait out the lease nor allowed to run a command that was applied.
struct Claim {
    responses: Option<Arc<KeptResponses>>,
    keys: DataKeys,
    scope: String,
    key: String,
    claim_id: String,
    renewing: tokio::task::AbortHandle,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.renewing.abort();
        if let Some(responses) = self.responses.take() {
            let keys = self.keys.clone();
            let (scope, key, claim_id) = (
                std::mem::take(&mut self.scope),
                std::mem::take(&mut self.key),
                std::mem::take(&mut self.claim_id),
            );
            tokio::spawn(async move {
                tokio::time::sleep(SETTLE_GRACE).await;
                if let Err(error) = settle(&responses, &keys, &scope, &key, &claim_id).await {
                    tracing::error!(%error, "could not settle an idempotency claim");
                }
            });
        }
    }
}

/// Inserts the claim, or replaces an expired one; false if the key is already held.
async fn claim(
    database: &Database,
    scope: &str,
    key: &str,
    fingerprint: &str,
    claim_id: &str,
) -> Result<bool, sqlx::Error> {
    const INSERT: &str = "INSERT INTO idempotency_keys
                                 (scope, key, fingerprint, created_at_us, claim_id)";
    const OR_REPLACE_EXPIRED: &str = "ON CONFLICT (scope, key) DO UPDATE
            SET fingerprint = excluded.fingerprint, created_at_us = excluded.created_at_us,
                claim_id = excluded.claim_id, status = NULL, content_type = NULL, etag = NULL,
                consistency = NULL, body = NULL, completed_at_us = NULL, organization_id = NULL
          WHERE idempotency_keys.created_at_us < $6";
    let now = to_micros(Utc::now());
    let expired_before = now - KEEP_FOR.num_microseconds().unwrap_or(i64::MAX);
    // PostgreSQL commits the claim without waiting for its WAL flush (the setting is local to
    // the statement's transaction). Whatever makes a claim matter commits durably after it,
    // which flushes it too: the command's events, or its kept response. A crash before
    // either loses only a claim whose request got no answer and stored nothing.
    let sql = match database {
        Database::Postgres(_) => format!(
            "{INSERT} SELECT $1, $2, $3, $4::bigint, $5
                        FROM (SELECT set_config('synchronous_commit', 'off', true)) AS flushed_later
             {OR_REPLACE_EXPIRED}"
        ),
        Database::Sqlite(_) => format!("{INSERT} VALUES ($1, $2, $3, $4, $5) {OR_REPLACE_EXPIRED}"),
    };
    let inserted = orgledger_projections::with_pool!(database, pool => {
        sqlx::query(&sql)
            .bind(scope).bind(key).bind(fingerprint).bind(now).bind(claim_id).bind(expired_before)
            .execute(pool).await?
            .rows_affected()
    });
    Ok(inserted == 1)
}

/// Where a claim's command was applied: its organization and version, if any stored event
/// carries the claim's id (a partial index holds the events that carry one).
async fn applied(
    database: &Database,
    claim_id: &str,
) -> Result<Option<(String, i64)>, sqlx::Error> {
    let sql = applied_sql(database);
    orgledger_projections::with_pool!(database, pool => {
        sqlx::query_as(sql).bind(claim_id).fetch_optional(pool).await
    })
}

/// The query of [`applied`]: the expression its backend's partial index holds.
fn applied_sql(database: &Database) -> &'static str {
    match database {
        Database::Postgres(_) => {
            "SELECT aggregate_id, max(sequence) FROM events
              WHERE metadata ? 'idempotency_claim'
                AND metadata->>'idempotency_claim' = $1
              GROUP BY aggregate_id"
        }
        Database::Sqlite(_) => {
            "SELECT aggregate_id, max(sequence) FROM events
              WHERE json_valid(metadata)
                AND json_extract(metadata, '$.idempotency_claim') IS NOT NULL
                AND json_extract(metadata, '$.idempotency_claim') = $1
              GROUP BY aggregate_id"
        }
    }
}

/// Settles a claim left without a response to keep, if it is still `claim_id`'s: if the
/// log holds the command's events, the key answers that it was applied (and where), for
/// good; if not, the key is released for a retry to run the command.
async fn settle(
    responses: &KeptResponses,
    keys: &DataKeys,
    scope: &str,
    key: &str,
    claim_id: &str,
) -> Result<Option<Response>, Arc<sqlx::Error>> {
    let database = responses.database();
    match applied(database, claim_id).await? {
        Some(applied_at) => answer_lost(responses, keys, scope, key, claim_id, applied_at).await,
        None => {
            release(database, scope, key, claim_id).await?;
            Ok(None)
        }
    }
}

/// Keeps, for good, the answer that `claim_id`'s command was applied at `(organization,
/// version)` but its response was lost; `None` if the claim was answered or settled meanwhile.
async fn answer_lost(
    responses: &KeptResponses,
    keys: &DataKeys,
    scope: &str,
    key: &str,
    claim_id: &str,
    applied_at: (String, i64),
) -> Result<Option<Response>, Arc<sqlx::Error>> {
    let (parts, body) = lost_answer(applied_at).await;
    let sealed = keys.seal_blob(SEAL_PURPOSE, &body);
    if !complete(responses, scope, key, claim_id, &parts, &sealed).await? {
        // Answered or settled by someone else meanwhile.
        return Ok(None);
    }
    Ok(Some(Response::from_parts(parts, Body::from(body))))
}

/// The answer that a command was applied at `(organization, version)` but its response was
/// lost.
async fn lost_answer(
    (organization_id, version): (String, i64),
) -> (axum::http::response::Parts, axum::body::Bytes) {
    let organization = Uuid::parse_str(&organization_id).ok();
    let lost = ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_response_lost",
        format!(
            "the first request with this Idempotency-Key was applied (organization \
             {organization_id}, version {version}) but its response was lost; read the \
             organization to see the outcome"
        ),
    )
    .into_response();
    let (mut parts, body) = lost.into_parts();
    if let Some(organization) = organization {
        parts.extensions.insert(ResponseOrganization(organization));
    }
    let body = to_bytes(body, LARGEST_STORED_RESPONSE)
        .await
        .unwrap_or_default();
    (parts, body)
}

/// Keeps the response under the key (see [`KeptResponses`]), if the claim is still
/// `claim_id`'s and unanswered; false if it was not kept (or was kept by an attempt whose
/// outcome a lost connection hid). A claim whose response was not kept because its
/// organization's key is gone (purged meanwhile) is answered as erased (see [`ERASE`]).
async fn complete(
    responses: &KeptResponses,
    scope: &str,
    key: &str,
    claim_id: &str,
    parts: &axum::http::response::Parts,
    body: &[u8],
) -> Result<bool, Arc<sqlx::Error>> {
    let completion = Completion::of(parts, body);
    let organization = completion.organization.is_some();
    let status = completion.status;
    let kept = responses.keep(scope, key, claim_id, completion).await?;
    if !kept && organization {
        erase(responses.database(), scope, key, claim_id, status).await?;
    }
    Ok(kept)
}

/// A response as it is kept under its key.
struct Completion {
    status: i64,
    content_type: Option<String>,
    etag: Option<String>,
    consistency: Option<String>,
    body: Vec<u8>,
    organization: Option<String>,
}

impl Completion {
    fn of(parts: &axum::http::response::Parts, body: &[u8]) -> Self {
        let text = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            status: i64::from(parts.status.as_u16()),
            content_type: text(header::CONTENT_TYPE.as_str()),
            etag: text(header::ETAG.as_str()),
            consistency: text("x-consistency"),
            body: body.to_vec(),
            organization: parts
                .extensions
                .get::<ResponseOrganization>()
                .map(|organization| organization.0.to_string()),
        }
    }
}

/// Keeps `$completion` under the key on `$executor`, if the claim is still `$claim_id`'s and
/// unanswered; evaluates to the rows changed (0 or 1). Not kept once the organization's key
/// is gone: a purge that finished while the command waited for the read models has already
/// forgotten its organization's responses.
macro_rules! complete_on {
    ($executor:expr, $scope:expr, $key:expr, $claim_id:expr, $completion:expr) => {
        sqlx::query(
            "UPDATE idempotency_keys
                SET status = $3, content_type = $4, etag = $5, consistency = $6, body = $7,
                    completed_at_us = $8, organization_id = $9
              WHERE scope = $1 AND key = $2 AND claim_id = $10 AND status IS NULL
                AND ($9 IS NULL OR EXISTS (SELECT 1 FROM organization_keys
                                            WHERE organization_keys.organization_id = $9))",
        )
        .bind($scope)
        .bind($key)
        .bind($completion.status)
        .bind($completion.content_type.as_deref())
        .bind($completion.etag.as_deref())
        .bind($completion.consistency.as_deref())
        .bind(&$completion.body[..])
        .bind(to_micros(Utc::now()))
        .bind($completion.organization.as_deref())
        .bind($claim_id)
        .execute($executor)
        .await?
        .rows_affected()
    };
}

// After the macro: `kept` uses it.
mod kept;
pub use kept::KeptResponses;

/// Erases the stored responses of organizations whose key is gone (purged): a purge
/// interrupted between destroying the key and erasing them is finished at start-up.
pub async fn forget_purged(database: &Database) -> Result<u64, sqlx::Error> {
    Ok(orgledger_projections::with_pool!(database, pool => {
        sqlx::query(
            "UPDATE idempotency_keys
                SET body = NULL, content_type = NULL, etag = NULL, consistency = NULL
              WHERE organization_id IS NOT NULL AND body IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM organization_keys
                                 WHERE organization_keys.organization_id
                                     = idempotency_keys.organization_id)",
        )
        .execute(pool)
        .await?
        .rows_affected()
    }))
}

/// Answers the claim, if it is still `claim_id`'s and unanswered, as a response erased with
/// its organization's purge: no body. The key stays taken for its 24 hours, so a retry is
/// told so (`404`) rather than run again: a creation retried after its organization's purge
/// must not create another.
const ERASE: &str = "UPDATE idempotency_keys
                        SET status = $4, completed_at_us = $5, body = NULL, content_type = NULL,
                            etag = NULL, consistency = NULL
                      WHERE scope = $1 AND key = $2 AND claim_id = $3 AND status IS NULL";

/// Runs [`ERASE`].
async fn erase(
    database: &Database,
    scope: &str,
    key: &str,
    claim_id: &str,
    status: i64,
) -> Result<(), sqlx::Error> {
    orgledger_projections::with_pool!(database, pool => {
        sqlx::query(ERASE)
            .bind(scope)
            .bind(key)
            .bind(claim_id)
            .bind(status)
            .bind(to_micros(Utc::now()))
            .execute(pool)
            .await?;
    });
    Ok(())
}

/// Deletes the claim, if it is still `claim_id`'s and unanswered.
const RELEASE: &str = "DELETE FROM idempotency_keys
                        WHERE scope = $1 AND key = $2 AND claim_id = $3 AND status IS NULL";

/// Runs [`RELEASE`].
async fn release(
    database: &Database,
    scope: &str,
    key: &str,
    claim_id: &str,
) -> Result<(), sqlx::Error> {
    orgledger_projections::with_pool!(database, pool => {
        sqlx::query(RELEASE).bind(scope).bind(key).bind(claim_id).execute(pool).await?;
    });
    Ok(())
}

async fn load(database: &Database, scope: &str, key: &str) -> Result<Option<Stored>, sqlx::Error> {
    let sql = "SELECT fingerprint, created_at_us, claim_id, status, content_type, etag,
                      consistency, body
                 FROM idempotency_keys WHERE scope = $1 AND key = $2";
    orgledger_projections::with_pool!(database, pool => {
        sqlx::query_as(sql).bind(scope).bind(key).fetch_optional(pool).await
    })
}

/// Claims the key for `claim_id`, or answers the request from the claim already held:
/// `Err` with the answer. A key released while this request waited (its first request failed
/// and stored nothing) is claimed again: the retry runs the command rather than being asked
/// to retry once more.
async fn claim_or_replay(
    state: &AppState,
    database: &Database,
    (scope, key): (&str, &str),
    fingerprint: &str,
    fingerprints: &[&str],
    claim_id: &str,
) -> Result<(), Response> {
    let deadline = tokio::time::Instant::now() + WAIT_FOR_FIRST;
    loop {
        let claimed = claim(database, scope, key, fingerprint, claim_id)
            .await
            .map_err(|error| ApiError::from(error).into_response())?;
        if claimed {
            return Ok(());
        }
        match replay(state, database, scope, key, fingerprints, claim_id).await {
            Replay::Answer(response) => return Err(response),
            Replay::TakenOver => return Ok(()),
            Replay::Released if tokio::time::Instant::now() < deadline => {}
            Replay::Released => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "idempotency_key_in_use",
                    "the first request with this key failed; retry it",
                )
                .into_response())
            }
        }
    }
}

enum Replay {
    Answer(Response),
    /// The claim was abandoned without its command being applied: this request holds it now.
    TakenOver,
    /// The key was released (its first request failed, storing nothing): free to claim.
    Released,
}

/// Answers a request whose key is already held: the first response, once it is known. A
/// claim left without one past [`CLAIM_LEASE`] (its process died) is settled from the log:
/// applied, the retry is told so; not applied, the retry takes the claim and runs.
async fn replay(
    state: &AppState,
    database: &Database,
    scope: &str,
    key: &str,
    fingerprints: &[&str],
    claim_id: &str,
) -> Replay {
    let answer = |response: Response| Replay::Answer(response);
    let deadline = tokio::time::Instant::now() + WAIT_FOR_FIRST;
    loop {
        let stored = match load(database, scope, key).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return Replay::Released,
            Err(error) => return answer(ApiError::from(error).into_response()),
        };
        if !fingerprints.contains(&stored.fingerprint.as_str()) {
            return answer(
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used with a different request",
                )
                .into_response(),
            );
        }
        if let (Some(_), None) = (stored.status, &stored.body) {
            let mut erased = ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "the organization this request changed was purged since; its response went \
                 with it",
            )
            .into_response();
            erased
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return answer(erased);
        }
        if let Some(status) = stored.status {
            let body = match state
                .service
                .ledger
                .keys()
                .open_blob(SEAL_PURPOSE, &stored.body.unwrap_or_default())
            {
                Ok(body) => body,
                Err(error) => return answer(ApiError::internal(error).into_response()),
            };
            let mut response = Response::new(Body::from(body));
            *response.status_mut() = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK);
            let headers = response.headers_mut();
            for (name, value) in [
                (header::CONTENT_TYPE, stored.content_type),
                (header::ETAG, stored.etag),
                (
                    header::HeaderName::from_static("x-consistency"),
                    stored.consistency,
                ),
            ] {
                if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                    headers.insert(name, value);
                }
            }
            headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
            return answer(response);
        }
        let claimed_at = chrono::DateTime::from_timestamp_micros(stored.created_at_us);
        let abandoned = claimed_at.is_some_and(|at| Utc::now() - at > CLAIM_LEASE);
        if let (true, Some(holder)) = (abandoned, &stored.claim_id) {
            match take_over(state, scope, key, holder, claim_id).await {
                Ok(Some(replay)) => return replay,
                // Settled by someone else meanwhile: look again.
                Ok(None) => continue,
                Err(error) => return answer(ApiError::from(error).into_response()),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return answer(
                ApiError::new(
                    StatusCode::CONFLICT,
                    "idempotency_key_in_use",
                    "a request with this Idempotency-Key is still being processed",
                )
                .into_response(),
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Settles a claim whose holder stopped renewing it (its process died) for a retry: the
/// lost-response answer if its command was applied; otherwise the claim becomes `claim_id`'s
/// and the retry runs the command. `None` when another retry got there first.
async fn take_over(
    state: &AppState,
    scope: &str,
    key: &str,
    holder: &str,
    claim_id: &str,
) -> Result<Option<Replay>, sqlx::Error> {
    let database = state.service.database();
    let keys = state.service.ledger.keys();
    let applied_sql = applied_sql(database);
    // SQLite: the write lock from the start, as the store's appends take it.
    let begin = match database {
        Database::Postgres(_) => "BEGIN",
        Database::Sqlite(_) => "BEGIN IMMEDIATE",
    };
    // One transaction, the claim first. An append of the holder's still in flight holds the
    // claim share-locked (the store's fence), so taking it waits for that commit and the
    // events are then found; an append that comes later finds the claim gone and stores
    // nothing. Finding the events and keeping the answer commit with the take-over: a crash
    // in between leaves the claim the holder's, to be settled again.
    let lost = orgledger_projections::with_pool!(database, pool => {
        let mut tx = pool.begin_with(begin).await?;
        let taken = sqlx::query(
            "UPDATE idempotency_keys SET claim_id = $4, created_at_us = $5
              WHERE scope = $1 AND key = $2 AND claim_id = $3 AND status IS NULL",
        )
        .bind(scope).bind(key).bind(holder).bind(claim_id).bind(to_micros(Utc::now()))
        .execute(&mut *tx).await?
        .rows_affected();
        if taken != 1 {
            // Settled by someone else meanwhile.
            return Ok(None);
        }
        let applied_at: Option<(String, i64)> =
            sqlx::query_as(applied_sql).bind(holder).fetch_optional(&mut *tx).await?;
        let Some(applied_at) = applied_at else {
            tx.commit().await?;
            return Ok(Some(Replay::TakenOver));
        };
        let (parts, body) = lost_answer(applied_at).await;
        let completion = Completion::of(&parts, &keys.seal_blob(SEAL_PURPOSE, &body));
        if complete_on!(&mut *tx, scope, key, claim_id, completion) != 1 {
            // Its organization was purged since: the answer is kept as erased.
            sqlx::query(ERASE)
                .bind(scope).bind(key).bind(claim_id).bind(i64::from(parts.status.as_u16()))
                .bind(to_micros(Utc::now()))
                .execute(&mut *tx).await?;
            tx.commit().await?;
            return Ok(None);
        }
        tx.commit().await?;
        (parts, body)
    });
    let (mut parts, body) = lost;
    parts
        .headers
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(Some(Replay::Answer(Response::from_parts(
        parts,
        Body::from(body),
    ))))
}

/// Deletes stored responses older than 24 hours.
pub async fn forget_expired(database: &Database) -> Result<u64, sqlx::Error> {
    let before = to_micros(Utc::now()) - KEEP_FOR.num_microseconds().unwrap_or(i64::MAX);
    orgledger_projections::with_pool!(database, pool => {
        Ok(sqlx::query("DELETE FROM idempotency_keys WHERE created_at_us < $1")
            .bind(before).execute(pool).await?.rows_affected())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_claim_dropped_without_a_response_or_events_is_released() {
        let (_dir, database) = scratch_store().await;
        assert!(claim(&database, "scope", "key", "print", "claim-1")
            .await
            .unwrap());
        drop(Claim {
            responses: Some(Arc::new(KeptResponses::new(database.clone()))),
            keys: DataKeys::new(database.clone(), crate::store::MasterKey::generate()),
            scope: "scope".into(),
            key: "key".into(),
            claim_id: "claim-1".into(),
            renewing: tokio::spawn(async {}).abort_handle(),
        });
        let mut released = false;
        // Settled after its grace: nothing in the log carries the claim.
        for _ in 0..500 {
            if claim(&database, "scope", "key", "print", "claim-2")
                .await
                .unwrap()
            {
                released = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(released, "a retry may claim the key again");
    }

    /// A retry that arrives while its first request is failing waits, and once the failure
    /// is settled (nothing stored: the key released) runs the command itself, instead of
    /// being answered `409 idempotency_key_in_use` and asked to retry again.
    #[tokio::test]
    async fn a_retry_waiting_on_a_first_request_that_failed_runs_once_the_key_is_released() {
        let (_dir, database) = scratch_store().await;
        let master_key = crate::store::MasterKey::generate();
        let service = crate::service::Orgledger::open(database.clone(), master_key.clone())
            .await
            .unwrap();
        let state = AppState::new(Arc::new(service), super::super::PlatformTokens::new([]));
        assert!(claim(&database, "scope", "key", "print", "claim-1")
            .await
            .unwrap());
        let failed = Claim {
            responses: Some(state.responses.clone()),
            keys: DataKeys::new(database.clone(), master_key),
            scope: "scope".into(),
            key: "key".into(),
            claim_id: "claim-1".into(),
            renewing: tokio::spawn(async {}).abort_handle(),
        };
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(failed);
        });
        let retried = claim_or_replay(
            &state,
            &database,
            ("scope", "key"),
            "print",
            &["print"],
            "claim-2",
        )
        .await;
        assert!(retried.is_ok(), "the retry holds the key and runs");
        let stored = load(&database, "scope", "key").await.unwrap().unwrap();
        assert_eq!(stored.claim_id.as_deref(), Some("claim-2"));
    }

    #[test]
    fn a_refusal_a_retry_may_get_past_is_not_kept_for_the_key() {
        let settlement = |response: Response| settlement_of(&response.into_parts().0);
        let contended = ApiError::from(crate::ledger::LedgerError::Contended).into_response();
        assert_eq!(contended.status(), StatusCode::CONFLICT);
        assert_eq!(settlement(contended), Settlement::Release);
        assert_eq!(
            settlement(
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "no").into_response()
            ),
            Settlement::Release
        );
        for kept in [
            ApiError::new(StatusCode::CONFLICT, "slug_taken", "taken").into_response(),
            ApiError::new(StatusCode::PRECONDITION_FAILED, "version_mismatch", "moved")
                .into_response(),
            StatusCode::OK.into_response(),
        ] {
            assert_eq!(settlement(kept), Settlement::Keep);
        }
        assert_eq!(
            settlement(ApiError::internal("down").into_response()),
            Settlement::FromLog
        );
    }

    async fn scratch_store() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("keys.db").display());
        let database = Database::connect(&url).await.unwrap();
        database.migrate().await.unwrap();
        (dir, database)
    }

    #[tokio::test]
    async fn a_claim_whose_command_was_applied_is_answered_as_such_not_released() {
        let (_dir, database) = scratch_store().await;
        let Database::Sqlite(pool) = &database else {
            unreachable!("a SQLite URL")
        };
        let organization = Uuid::now_v7().to_string();
        sqlx::query("INSERT INTO organization_keys (organization_id, wrapped_key) VALUES (?1, ?2)")
            .bind(&organization)
            .bind(vec![0_u8; 8])
            .execute(pool)
            .await
            .unwrap();
        for (sequence, claim) in [(1, "someone-else"), (2, "claim-1"), (3, "claim-1")] {
            sqlx::query(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                     event_version, payload, metadata)
                 VALUES ('Organization', ?1, ?2, 'GroupCreated', '1', '{}', ?3)",
            )
            .bind(&organization)
            .bind(sequence)
            .bind(serde_json::json!({ "idempotency_claim": claim }).to_string())
            .execute(pool)
            .await
            .unwrap();
        }
        assert_eq!(
            applied(&database, "claim-1").await.unwrap(),
            Some((organization.clone(), 3))
        );
        assert_eq!(applied(&database, "claim-2").await.unwrap(), None);
        assert!(claim(&database, "scope", "key", "print", "claim-1")
            .await
            .unwrap());
        let keys = DataKeys::new(database.clone(), crate::store::MasterKey::generate());
        let responses = KeptResponses::new(database.clone());
        let lost = settle(&responses, &keys, "scope", "key", "claim-1")
            .await
            .unwrap()
            .expect("applied");
        assert_eq!(lost.status(), StatusCode::CONFLICT);
        let body = to_bytes(lost.into_body(), usize::MAX).await.unwrap();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["code"], "idempotency_response_lost");
        assert!(problem["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("organization {organization}, version 3")));
        let stored = load(&database, "scope", "key").await.unwrap().unwrap();
        assert_eq!(stored.status, Some(409), "kept for every retry");
        // Settled once: neither a second settlement nor the holder's late response changes it.
        assert!(settle(&responses, &keys, "scope", "key", "claim-1")
            .await
            .unwrap()
            .is_none());
        let (parts, _) = StatusCode::CREATED.into_response().into_parts();
        assert!(
            !complete(&responses, "scope", "key", "claim-1", &parts, b"{}")
                .await
                .unwrap()
        );
        assert_eq!(
            load(&database, "scope", "key")
                .await
                .unwrap()
                .unwrap()
                .status,
            Some(409)
        );
    }

    /// How long ago `key`'s claim was made or last renewed, in microseconds.
    async fn claim_age(database: &Database) -> i64 {
        let stored = load(database, "scope", "key").await.unwrap().unwrap();
        to_micros(Utc::now()) - stored.created_at_us
    }

    /// Ages `key`'s claim by ten minutes, past its lease.
    async fn make_stale(database: &Database) {
        let Database::Sqlite(pool) = database else {
            unreachable!("a SQLite URL")
        };
        sqlx::query("UPDATE idempotency_keys SET created_at_us = created_at_us - 600000000")
            .execute(pool)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_running_claim_keeps_its_lease_and_only_its_holder_renews_it() {
        let (_dir, database) = scratch_store().await;
        assert!(claim(&database, "scope", "key", "print", "claim-1")
            .await
            .unwrap());
        make_stale(&database).await;
        renew(&database, "scope", "key", "someone-else")
            .await
            .unwrap();
        assert!(claim_age(&database).await > CLAIM_LEASE.num_microseconds().unwrap());
        renew(&database, "scope", "key", "claim-1").await.unwrap();
        assert!(
            claim_age(&database).await < 60_000_000,
            "renewed: no retry takes it over"
        );
    }

    #[tokio::test]
    async fn a_claim_is_renewed_while_its_command_runs_and_no_longer_once_it_ends() {
        let (_dir, database) = scratch_store().await;
        assert!(claim(&database, "scope", "key", "print", "claim-1")
            .await
            .unwrap());
        let every = Duration::from_millis(20);
        let renewing = tokio::spawn(renew_while_running(
            database.clone(),
            "scope".into(),
            "key".into(),
            "claim-1".into(),
            every,
        ));
        // Stale again and again: each time a later tick renews it.
        for _ in 0..3 {
            make_stale(&database).await;
            let mut renewed = false;
            for _ in 0..100 {
                tokio::time::sleep(every).await;
                if claim_age(&database).await < 60_000_000 {
                    renewed = true;
                    break;
                }
            }
            assert!(renewed, "a tick renewed the claim");
        }
        // The command ended: its task is aborted, and the claim ages from then on.
        renewing.abort();
        let _ = renewing.await;
        // A renewal already handed to SQLite's thread when the task was aborted lands first.
        tokio::time::sleep(every * 5).await;
        make_stale(&database).await;
        tokio::time::sleep(every * 5).await;
        assert!(claim_age(&database).await > CLAIM_LEASE.num_microseconds().unwrap());
    }

    /// A fresh, migrated database on PostgreSQL at `ORGLEDGER_TEST_POSTGRES` (the server the
    /// integration tests use), or on SQLite.
    async fn scratch_database(postgres: bool) -> (Option<tempfile::TempDir>, Database) {
        if !postgres {
            let (dir, database) = scratch_store().await;
            return (Some(dir), database);
        }
        let admin = std::env::var("ORGLEDGER_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!("orgledger_test_{}", Uuid::now_v7().simple());
        let server = Database::connect(&admin)
            .await
            .unwrap_or_else(|error| panic!("PostgreSQL at {admin} is unreachable: {error}"));
        let Database::Postgres(pool) = &server else {
            unreachable!("a PostgreSQL URL")
        };
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(pool)
            .await
            .unwrap();
        let (server_url, _) = admin.rsplit_once('/').expect("a database in the URL");
        let database = Database::connect(&format!("{server_url}/{name}"))
            .await
            .unwrap();
        database.migrate().await.unwrap();
        (None, database)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn responses_kept_together_are_kept_only_under_their_own_open_claim_on_postgres() {
        responses_kept_together_are_kept_only_under_their_own_open_claim(true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn responses_kept_together_are_kept_only_under_their_own_open_claim_on_sqlite() {
        responses_kept_together_are_kept_only_under_their_own_open_claim(false).await;
    }

    /// Kept at the same moment (one statement on PostgreSQL), each response has its own
    /// outcome: kept under its claim, or not kept when the claim is another's, already
    /// answered, or its organization's key is gone (then it is answered as erased).
    async fn responses_kept_together_are_kept_only_under_their_own_open_claim(postgres: bool) {
        let (_dir, database) = scratch_database(postgres).await;
        let live = Uuid::now_v7();
        orgledger_projections::with_pool!(&database, pool => {
            sqlx::query("INSERT INTO organization_keys (organization_id, wrapped_key) VALUES ($1, $2)")
                .bind(live.to_string())
                .bind(vec![0_u8; 8])
                .execute(pool)
                .await
                .unwrap();
        });
        let purged = Uuid::now_v7();
        let responses = Arc::new(KeptResponses::new(database.clone()));
        let answered_first = |status: StatusCode, organization: Option<Uuid>| {
            let mut response = status.into_response();
            if let Some(organization) = organization {
                response
                    .extensions_mut()
                    .insert(ResponseOrganization(organization));
            }
            response.into_parts().0
        };
        for key in ["live", "none", "purged", "taken", "answered"] {
            assert!(claim(&database, "scope", key, "print", key).await.unwrap());
        }
        let parts = answered_first(StatusCode::ACCEPTED, Some(live));
        assert!(
            complete(&responses, "scope", "answered", "answered", &parts, b"first")
                .await
                .unwrap()
        );
        // (key, the claim keeping it, its organization, kept?)
        let cases = [
            ("live", "live", Some(live), true),
            ("none", "none", None, true),
            ("purged", "purged", Some(purged), false),
            ("taken", "not-its-claim", Some(live), false),
            ("answered", "answered", Some(live), false),
        ];
        let keep = |(key, claim_id, organization, _): (&'static str, &'static str, _, bool)| {
            let responses = responses.clone();
            let parts = answered_first(StatusCode::CREATED, organization);
            tokio::spawn(async move {
                complete(&responses, "scope", key, claim_id, &parts, key.as_bytes()).await
            })
        };
        // PostgreSQL: the first response's row held locked by another transaction, so that
        // the others queue behind its statement and are kept together in the next one.
        let blocker = match &database {
            Database::Postgres(pool) => {
                let mut blocker = pool.begin().await.unwrap();
                sqlx::query("SELECT 1 FROM idempotency_keys WHERE key = 'live' FOR UPDATE")
                    .execute(&mut *blocker)
                    .await
                    .unwrap();
                Some(blocker)
            }
            Database::Sqlite(_) => None,
        };
        let statements_before = responses.statements();
        let first = keep(cases[0]);
        if let Database::Postgres(pool) = &database {
            // Its statement waits on the lock.
            let mut waiting = 0;
            for _ in 0..500 {
                waiting = sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(pool)
                .await
                .unwrap();
                if waiting > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(waiting, 1, "the first statement waits on the row");
        }
        let rest: Vec<_> = cases[1..].iter().copied().map(keep).collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(blocker) = blocker {
            blocker.rollback().await.unwrap();
        }
        let kept = std::iter::once(first).chain(rest);
        for (&(key, _, _, expected), kept) in cases.iter().zip(kept) {
            assert_eq!(kept.await.unwrap().unwrap(), expected, "{key}");
        }
        if postgres {
            assert_eq!(
                responses.statements() - statements_before,
                2,
                "the first alone, the four queued behind it together"
            );
        }
        let stored = |key: &'static str| {
            let database = database.clone();
            async move { load(&database, "scope", key).await.unwrap() }
        };
        for key in ["live", "none"] {
            let kept = stored(key).await.expect("kept");
            assert_eq!(kept.status, Some(201), "{key}");
            assert_eq!(kept.body.as_deref(), Some(key.as_bytes()), "{key}");
        }
        let erased = stored("purged").await.expect("answered as erased");
        assert_eq!(
            (erased.status, erased.body),
            (Some(201), None),
            "a retry is told its organization was purged, not run again"
        );
        let taken = stored("taken").await.expect("still claimed");
        assert_eq!(
            (taken.status, taken.claim_id.as_deref()),
            (None, Some("taken"))
        );
        let answered = stored("answered").await.expect("answered");
        assert_eq!(
            (answered.status, answered.body.as_deref()),
            (Some(202), Some(&b"first"[..])),
            "the first answer stands"
        );
    }
}
