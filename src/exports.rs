//! The JSON data export of an organization, streamed section by section and page by page so
//! memory stays flat whatever the organization's size. It never carries a token, key, secret
//! or hash of one.

use std::sync::Arc;

use chrono::Utc;
use orgledger_projections::audit::{self, AuditFilter};
use orgledger_projections::exports::{channel_stream, ByteStream, ExportError};
use orgledger_projections::invitations::{self, InvitationFilter};
use orgledger_projections::members::{self, MemberFilter};
use orgledger_projections::organizations::OrganizationView;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc::Sender;
use uuid::Uuid;

use crate::service::Orgledger;

const PAGE: usize = 500;

/// Version of the export's shape.
pub const FORMAT_VERSION: u32 = 1;

/// Field names whose values are secrets or hashes of secrets; dropped from exported and
/// served events. `idempotency_key`: the metadata of events stored before 2026-12-07 holds
/// a request's key in clear. Not `key`: in events it is a custom role's name for itself (`RoleDefined`,
/// `RoleDeleted`); a service account's key is stored only as its hash.
fn is_secret_field(name: &str) -> bool {
    name.ends_with("_sha256")
        || name.ends_with("_hash")
        || matches!(name, "token" | "secret" | "idempotency_key")
        || orgledger_domain::SECRET_FIELDS.contains(&name)
}

/// Removes every secret and hash of one, at any depth.
pub fn strip_secrets(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|name, _| !is_secret_field(name));
            for (name, child) in map.iter_mut() {
                match child {
                    // Keys there are names users chose: a client called `token` stays.
                    Value::Object(entries)
                        if orgledger_domain::USER_KEYED_FIELDS.contains(&name.as_str()) =>
                    {
                        entries.values_mut().for_each(strip_secrets)
                    }
                    _ => strip_secrets(child),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_secrets),
        _ => {}
    }
}

type Chunks = Sender<Result<Vec<u8>, ExportError>>;

/// `{format_version, exported_at, organization, members, invitations, groups,
/// service_accounts, audit_log, events}` as a stream of JSON chunks.
pub fn data_export(service: Arc<Orgledger>, organization: OrganizationView) -> ByteStream {
    channel_stream(move |sender| async move {
        if let Err(error) = write_export(&service, &organization, &sender).await {
            // Nobody reads any more (the client went away, or an interrupted `orgledger
            // export` closed the pools behind it): the failure is that, not the export's.
            if sender.is_closed() {
                return;
            }
            tracing::error!(organization_id = %organization.id, %error, "data export failed mid-stream");
            let _ = sender.send(Err(error)).await;
        }
    })
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("export values serialize")
}

/// Sends a chunk; false when the client went away.
async fn send(sender: &Chunks, chunk: Vec<u8>) -> bool {
    sender.send(Ok(chunk)).await.is_ok()
}

/// The organization, its audit entries and its events stand at one version: the one the
/// organization has as the export begins; entries and events past it (commands landing while
/// the export streams) are left out. Members, invitations, groups and service accounts are
/// read page by page as they stand when each page is read, so a change landing meanwhile may
/// show there. One snapshot of every read model would make those agree too, but its
/// transaction would hold every table it read for as long as the client takes to read the
/// export, and a rebuild's swap, and every read behind it, would wait that long.
async fn write_export(
    service: &Orgledger,
    organization: &OrganizationView,
    sender: &Chunks,
) -> Result<(), ExportError> {
    let database = service.database();
    let id = organization.id.as_str();
    let version = organization.version;
    let mut head = format!(
        "{{\"format_version\":{FORMAT_VERSION},\"exported_at\":{},\"organization\":",
        serde_json::to_string(&Utc::now()).expect("time serializes")
    )
    .into_bytes();
    head.extend(json(organization));
    head.extend(b",\"members\":[");
    if !send(sender, head).await {
        return Ok(());
    }

    let mut cursor = None;
    let mut first = true;
    loop {
        let filter = MemberFilter {
            limit: PAGE,
            cursor: cursor.take(),
            ..MemberFilter::default()
        };
        let page = members::list(database, id, &filter)
            .await?
            .expect("cursors issued by the previous page are valid");
        if !send(sender, items(&page.items, &mut first)).await {
            return Ok(());
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }

    if !send(sender, b"],\"invitations\":[".to_vec()).await {
        return Ok(());
    }
    let now = Utc::now();
    let mut first = true;
    loop {
        let filter = InvitationFilter {
            status: None,
            limit: PAGE,
            cursor: cursor.take(),
        };
        let page = invitations::list(database, id, &filter, now)
            .await?
            .expect("cursors issued by the previous page are valid");
        if !send(sender, items(&page.items, &mut first)).await {
            return Ok(());
        }
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }

    let groups = orgledger_projections::groups::list(database, id).await?;
    let accounts = orgledger_projections::service_accounts::list(database, id).await?;
    let mut chunk = b"],\"groups\":".to_vec();
    chunk.extend(json(&groups));
    chunk.extend(b",\"service_accounts\":");
    chunk.extend(json(&accounts));
    chunk.extend(b",\"audit_log\":[");
    if !send(sender, chunk).await {
        return Ok(());
    }
    let mut after = 0;
    let mut first = true;
    loop {
        let mut entries = audit::page(database, id, &AuditFilter::default(), after, PAGE).await?;
        entries.retain(|entry| entry.sequence <= version);
        let Some(last) = entries.last() else { break };
        after = last.sequence;
        if !send(sender, items(&entries, &mut first)).await {
            return Ok(());
        }
    }

    if !send(sender, b"],\"events\":[".to_vec()).await {
        return Ok(());
    }
    let organization_id = Uuid::parse_str(id)
        .map_err(|error| ExportError::Database(sqlx::Error::Decode(Box::new(error))))?;
    let mut after = 0;
    let mut first = true;
    loop {
        let mut events = service
            .ledger
            .raw_events(organization_id, after, PAGE)
            .await
            .map_err(|error| ExportError::Database(sqlx::Error::Protocol(error.to_string())))?;
        events.retain(|event| event.sequence <= version);
        let Some(last) = events.last() else { break };
        after = last.sequence as usize;
        for event in &mut events {
            strip_secrets(&mut event.payload);
            strip_secrets(&mut event.metadata);
        }
        if !send(sender, items(&events, &mut first)).await {
            return Ok(());
        }
    }
    let _ = send(sender, b"]}".to_vec()).await;
    Ok(())
}

/// Items of a JSON array, comma-separated across pages.
fn items<T: Serialize>(items: &[T], first: &mut bool) -> Vec<u8> {
    let mut chunk = Vec::new();
    for item in items {
        if !*first {
            chunk.push(b',');
        }
        *first = false;
        chunk.extend(json(item));
    }
    chunk
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_client_named_like_a_secret_is_kept() {
        let mut value = json!({"ClientRestrictionsChanged": {"to": {
            "default": "allow",
            "clients": {"token": "block", "api_key": "allow", "web": "allow"}
        }}});
        let kept = value.clone();
        strip_secrets(&mut value);
        assert_eq!(value, kept);
    }

    #[test]
    fn secrets_and_their_hashes_are_stripped_at_any_depth() {
        let mut value = json!({"InvitationSent": {"email": "a@b.c", "token_sha256": "abc",
            "nested": [{"api_key": "k", "key_hash": "h", "name": "n"}]}});
        strip_secrets(&mut value);
        assert_eq!(
            value,
            json!({"InvitationSent": {"email": "a@b.c", "nested": [{"name": "n"}]}})
        );
    }

    #[test]
    fn an_idempotency_key_and_its_hash_are_stripped_from_metadata() {
        let mut metadata = json!({"actor_id": "olivia", "idempotency_key": "key-1",
            "idempotency_key_sha256": "9f86"});
        strip_secrets(&mut metadata);
        assert_eq!(metadata, json!({"actor_id": "olivia"}));
    }
}
