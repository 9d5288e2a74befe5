//! Extractors: JSON bodies and queries that fail as problem+json, the caller behind a
//! request, its metadata, and `If-Match`.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use orgledger_domain::{Actor, UserId};
use serde::de::DeserializeOwned;

use super::error::{ApiError, FieldProblem};
use super::strict_json::Strict;
use super::AppState;
use crate::ledger::RequestContext;

/// A JSON body: unparseable is `400 malformed_request`; well-formed but of the wrong shape
/// (types, unknown enum values, missing fields, an array where an object is wanted, a number
/// no field can hold) is `422 validation_failed` naming the field.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        // One media type: of two different ones, which a proxy or the client meant is unsaid
        // (the same header repeated, as some proxies do, says one).
        let mut media_types = request.headers().get_all(header::CONTENT_TYPE).iter();
        let first = media_types.next();
        let is_json = first
            .filter(|first| media_types.all(|other| other == *first))
            .and_then(|only| only.to_str().ok())
            .is_some_and(|value| {
                let mime = value
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                mime == "application/json" || mime.ends_with("+json")
            });
        let bytes = body_bytes(request, state).await?;
        // No body at all is a body missing, as unparseable as an empty JSON text; a body in
        // another media type is refused as such.
        if bytes.is_empty() {
            return Err(ApiError::malformed(
                "this request needs a JSON body (Content-Type: application/json)",
            ));
        }
        if !is_json {
            return Err(ApiError::new(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body with one header Content-Type: application/json",
            ));
        }
        parse_json(&bytes).map(Json)
    }
}

/// The body of a command that takes none: nothing, or any JSON text (ignored, as a client's
/// `{}` or `null` is). Anything else is `400 malformed_request`, as on every other route.
pub struct NoBody;

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(request, state).await?;
        if bytes
            .iter()
            .all(|byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
        {
            return Ok(Self);
        }
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
            .map(|_| Self)
            .map_err(|error| {
                ApiError::malformed(format!(
                    "this command takes no body, and this one is not JSON either: {error}"
                ))
            })
    }
}

/// The request's body, whole: too long is `413 payload_too_large`, unreadable `400`.
async fn body_bytes<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiError::malformed(rejection.body_text())
            }
        })
}

pub fn too_large() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the body exceeds {} bytes", super::BODY_LIMIT),
    )
}

/// Parses a JSON body, telling syntax errors (400) from shape errors (422).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Syntax first, so a truncated body is malformed even when a type error comes before
    // its end.
    if let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        return Err(ApiError::malformed(format!(
            "the body is not valid JSON: {error}"
        )));
    }
    // Neither PostgreSQL's text nor its jsonb can hold U+0000: refused here, whatever the
    // field, rather than failing the store or a read model later.
    if let Some(field) = field_holding_nul(bytes) {
        return Err(ApiError::validation(vec![FieldProblem {
            field,
            message: "must not contain the NUL character (\\u0000)".to_owned(),
        }]));
    }
    // The structure is sound, so whatever fails from here is the body's shape (a number no
    // field can hold, too many elements) and named by its field; but for a string that is
    // not text (bytes that are not UTF-8, a lone surrogate escape), which the first pass
    // skips over undecoded: the body is then not JSON at all.
    let shape_error = |error: serde_path_to_error::Error<serde_json::Error>| {
        let inner = error.inner();
        let out_of_range = inner.to_string().starts_with("number out of range");
        if inner.is_syntax() && !out_of_range {
            return ApiError::malformed(format!("the body is not valid JSON: {inner}"));
        }
        let path = error.path().to_string();
        let message = strip_position(&error.into_inner().to_string());
        ApiError::validation(vec![FieldProblem {
            field: field_named(&path, &message, "body"),
            message,
        }])
    };
    let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
    let parsed = serde_path_to_error::deserialize(deserializer).map_err(shape_error)?;
    // An array may stand where a struct is wanted only if the body holds one at all: most
    // bodies hold none and are read once.
    if bytes.contains(&b'[') {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|error| ApiError::malformed(format!("the body is not valid JSON: {error}")))?;
        serde_path_to_error::deserialize::<_, T>(Strict(&value)).map_err(shape_error)?;
    }
    Ok(parsed)
}

/// The field a shape error is about. serde reports a missing or repeated field at the path of
/// the object holding it and names the field only in its message (`` missing field `name` ``),
/// so the name is taken from there; an unknown field's path already ends in it. `whole`
/// stands for the top level.
fn field_named(path: &str, message: &str, whole: &str) -> String {
    let named = ["missing field `", "duplicate field `"]
        .iter()
        .find_map(|lead| message.strip_prefix(lead))
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name);
    match (path, named) {
        (".", Some(name)) => name.to_owned(),
        (".", None) => whole.to_owned(),
        (path, Some(name)) => format!("{path}.{name}"),
        (path, None) => path.to_owned(),
    }
}

/// The path (`owner.first_name`, `items[2]`) of a string or key holding `\u0000` in a
/// syntactically valid JSON body. The scan for the escape is the cheap common case; the body
/// is walked only when one is there.
fn field_holding_nul(bytes: &[u8]) -> Option<String> {
    let escaped_nul = bytes.windows(6).enumerate().any(|(at, window)| {
        // An escape only if an odd number of backslashes ends at it (`\\u0000` is text).
        window == b"\\u0000"
            && bytes[..at]
                .iter()
                .rev()
                .take_while(|&&b| b == b'\\')
                .count()
                % 2
                == 0
    });
    if !escaped_nul {
        return None;
    }
    fn walk(value: &serde_json::Value, path: &str) -> Option<String> {
        let here = || {
            Some(if path.is_empty() {
                "body".to_owned()
            } else {
                path.to_owned()
            })
        };
        match value {
            serde_json::Value::String(text) if text.contains('\0') => here(),
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(index, item)| walk(item, &format!("{path}[{index}]"))),
            serde_json::Value::Object(fields) => fields.iter().find_map(|(key, field)| {
                let inner = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if key.contains('\0') {
                    here()
                } else {
                    walk(field, &inner)
                }
            }),
            _ => None,
        }
    }
    let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    walk(&value, "")
}

fn strip_position(message: &str) -> String {
    match message.find(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

/// Path parameters: a segment that does not decode (invalid UTF-8, say) is
/// `400 malformed_request` as problem+json, not axum's plain-text rejection.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|rejection| ApiError::malformed(rejection.body_text()))
    }
}

/// Refuses a URL holding an encoded NUL byte (`%00`) as `400 malformed_request`: no id,
/// name or filter contains one, and PostgreSQL refuses it in text, which would otherwise
/// surface as a 500 from whichever query received it.
pub async fn refuse_nul_in_url(
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let url = request
        .uri()
        .path_and_query()
        .map_or("", |url| url.as_str());
    if url.contains("%00") {
        return axum::response::IntoResponse::into_response(ApiError::malformed(
            "the URL contains an encoded NUL byte (%00)",
        ));
    }
    next.run(request).await
}

/// Headers that say who is calling, or on what condition: each may come once. Sent twice,
/// which one counts would be this service's guess (a proxy that adds `X-Actor-Id` without
/// removing the client's own would otherwise let the client's win), so the request is
/// refused as `400 malformed_request`.
const SINGLE_HEADERS: [&str; 4] = ["authorization", "x-actor-id", "if-match", "idempotency-key"];

pub async fn refuse_repeated_headers(
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let headers = request.headers();
    if let Some(name) = SINGLE_HEADERS
        .into_iter()
        .find(|name| headers.get_all(*name).iter().nth(1).is_some())
    {
        return axum::response::IntoResponse::into_response(ApiError::malformed(format!(
            "the {name} header is given more than once"
        )));
    }
    next.run(request).await
}

/// The longest header value (request id, user agent, client address) an event records.
const RECORDED_HEADER_LIMIT: usize = 512;

/// An `X-Request-Id` that could not be recorded as sent (empty, longer than
/// [`RECORDED_HEADER_LIMIT`], or not printable ASCII) is dropped before one is generated for a
/// request without it: the id echoed in the response is then always the one its events carry.
/// A tracing aid is not worth refusing a request over.
pub async fn replace_unrecordable_request_id(
    mut request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let recordable = request.headers().get("x-request-id").map(|id| {
        let id = id.as_bytes();
        !id.is_empty()
            && id.len() <= RECORDED_HEADER_LIMIT
            && id.iter().all(|byte| (b' '..=b'~').contains(byte))
    });
    if recordable == Some(false) {
        request.headers_mut().remove("x-request-id");
    }
    next.run(request).await
}

/// Query parameters: anything unparseable is `422 validation_failed`.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(Query)
            .map_err(|error| {
                let path = error.path().to_string();
                let message = error.into_inner().to_string();
                ApiError::field(&field_named(&path, &message, "query"), &message)
            })
    }
}

/// Who is calling: a platform token with or without `X-Actor-Id`, or a service account key.
#[derive(Debug, Clone)]
pub struct Caller {
    pub actor: Actor,
    /// For a service account: its organization and scopes.
    pub account: Option<AccountCaller>,
}

#[derive(Debug, Clone)]
pub struct AccountCaller {
    pub organization_id: String,
    pub scopes: Vec<orgledger_domain::Scope>,
    /// The SHA-256 (hex) of the key presented, which the command carries into its decision.
    pub key_sha256: String,
}

impl Caller {
    pub fn is_system(&self) -> bool {
        self.actor == Actor::System
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // Already resolved by the idempotency layer, which claims keys for callers only.
        if let Some(caller) = parts.extensions.get::<Self>() {
            return Ok(caller.clone());
        }
        let token = bearer(&parts.headers).ok_or_else(ApiError::unauthenticated)?;
        if !state.tokens.accepts(token) {
            return service_account(state, token, &parts.headers).await;
        }
        let actor = match parts.headers.get("x-actor-id") {
            None => Actor::System,
            Some(value) => {
                // User ids are any text in bodies, so the header takes UTF-8 too (what
                // clients send for a non-ASCII header value), not only visible ASCII.
                let raw = std::str::from_utf8(value.as_bytes())
                    .map_err(|_| ApiError::field("X-Actor-Id", "must be UTF-8"))?;
                Actor::User(UserId::parse_for_actor("X-Actor-Id", raw)?)
            }
        };
        Ok(Self {
            actor,
            account: None,
        })
    }
}

/// A service account key: one indexed lookup of its hash.
async fn service_account(
    state: &AppState,
    token: &str,
    headers: &HeaderMap,
) -> Result<Caller, ApiError> {
    if !token.starts_with(crate::tokens::SERVICE_ACCOUNT_PREFIX) || token.len() > 200 {
        return Err(ApiError::unauthenticated());
    }
    let hash = crate::tokens::sha256_hex(token);
    let (organization_id, account) =
        orgledger_projections::service_accounts::by_key(state.service.database(), &hash)
            .await?
            .ok_or_else(ApiError::unauthenticated)?;
    if headers.contains_key("x-actor-id") {
        return Err(ApiError::field(
            "X-Actor-Id",
            "a service account acts as itself; send no X-Actor-Id with its key",
        ));
    }
    let id = uuid::Uuid::parse_str(&account.id).map_err(ApiError::internal)?;
    let organization = uuid::Uuid::parse_str(&organization_id).map_err(ApiError::internal)?;
    // The read model finds the key; the organization as stored says whether it still opens
    // and with which scopes: a rotation or deletion answered `pending` must not leave the
    // old key working while the read models catch up.
    let current = state.service.ledger.current(organization).await?;
    let Some(stored) = current
        .service_accounts
        .get(&id)
        .filter(|stored| stored.key_sha256 == hash)
    else {
        return Err(ApiError::unauthenticated());
    };
    let scopes = stored.scopes.clone();
    Ok(Caller {
        actor: Actor::ServiceAccount(id),
        account: Some(AccountCaller {
            organization_id,
            scopes,
            key_sha256: hash,
        }),
    })
}

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Request id, client address, user agent and idempotency key, for event metadata.
pub struct Meta(pub RequestContext);

impl<S: Send + Sync> FromRequestParts<S> for Meta {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let text = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(|value| {
                    value
                        .chars()
                        .take(RECORDED_HEADER_LIMIT)
                        .collect::<String>()
                })
        };
        // The first address, as the nearest proxy saw the client; text that is not an
        // address is not recorded as one (the peer's address is).
        let forwarded = text("x-forwarded-for").and_then(|list| {
            let first = list.split(',').next()?.trim();
            let ip = first
                .strip_prefix('[')
                .and_then(|bracketed| bracketed.strip_suffix(']'))
                .unwrap_or(first);
            ip.parse::<std::net::IpAddr>().ok().map(|ip| ip.to_string())
        });
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(address)| address.ip().to_string());
        Ok(Self(RequestContext {
            request_id: text("x-request-id"),
            client_ip: forwarded.or(peer),
            user_agent: text("user-agent"),
            idempotency_key: text("idempotency-key"),
            idempotency_claim: parts
                .extensions
                .get::<super::idempotency::IdempotencyClaim>()
                .map(|claim| claim.0.clone()),
        }))
    }
}

/// `If-Match: <version>` (bare or quoted); `*` or absent means no precondition. A weak tag
/// (`W/"12"`) is refused: `If-Match` compares strongly (RFC 9110), so it could never hold.
pub struct IfMatch(pub Option<usize>);

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(header::IF_MATCH) else {
            return Ok(Self(None));
        };
        let raw = value.to_str().unwrap_or("").trim();
        if raw == "*" {
            return Ok(Self(None));
        }
        if raw.starts_with("W/") {
            return Err(ApiError::field(
                "If-Match",
                "a weak entity tag never matches (If-Match compares strongly): send the \
                 version, bare or quoted, e.g. \"12\"",
            ));
        }
        // Bare, or one pair of quotes: an entity tag is quoted whole or not at all.
        let bare = raw
            .strip_prefix('"')
            .and_then(|quoted| quoted.strip_suffix('"'))
            .unwrap_or(raw);
        // Digits only: `parse` would also take a sign.
        match bare.parse::<usize>() {
            Ok(version) if bare.bytes().all(|byte| byte.is_ascii_digit()) => {
                Ok(Self(Some(version)))
            }
            _ => Err(ApiError::field(
                "If-Match",
                "must be an organization version, e.g. \"12\"",
            )),
        }
    }
}

/// Headers of every authenticated request, for the OpenAPI description.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct ActorHeaders {
    /// Act as this end user (1-128 characters); without it the request acts as `system`.
    #[param(rename = "X-Actor-Id", max_length = 128, min_length = 1)]
    x_actor_id: Option<String>,
    /// Correlates logs and audit entries; echoed in the response. One that is empty, longer
    /// than 512 characters or not printable ASCII is replaced by a generated one, as is none.
    #[param(rename = "X-Request-Id")]
    x_request_id: Option<String>,
}

/// Headers of the commands that create an organization, for the OpenAPI description: there is
/// no version yet for `If-Match` to name.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct CreationHeaders {
    /// A retry with the same key and body within 24 h replays the first response.
    #[param(rename = "Idempotency-Key", max_length = 255)]
    idempotency_key: Option<String>,
}

/// Headers of commands, for the OpenAPI description.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
pub struct CommandHeaders {
    /// A retry with the same key and body within 24 h replays the first response.
    #[param(rename = "Idempotency-Key", max_length = 255)]
    idempotency_key: Option<String>,
    /// The organization version the command expects (bare or quoted).
    #[param(rename = "If-Match")]
    if_match: Option<String>,
}
