//! Event MACs: every event is stored with an HMAC-SHA256 of where it stands and what it says
//! (aggregate, sequence, type, version, payload and metadata as stored, sealed fields as
//! ciphertext) under a key derived from the master key, which never enters the database.
//! Whoever can write to the database without holding the master key cannot alter an event,
//! move it to another sequence or organization, or write one, without `verify` seeing it.
//!
//! The MAC is over the stored form, so a purged organization's history (its data key gone)
//! stays checkable. JSON is hashed in a canonical form (object keys sorted, no whitespace)
//! because PostgreSQL's `jsonb` gives a document back with its keys reordered.

use cqrs_es::persist::SerializedEvent;
use ring::hmac;
use serde_json::Value;

/// Bytes of a MAC.
pub const MAC_LEN: usize = 32;

/// What the derived key is for: a key derived for anything else differs.
const PURPOSE: &[u8] = b"orgledger event mac v1";

/// An event as it goes into the store: sealed, with its MAC.
#[derive(Debug, Clone)]
pub struct AuthenticatedEvent {
    pub event: SerializedEvent,
    pub mac: [u8; MAC_LEN],
}

/// What the MAC stored beside an event says of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authenticity {
    /// The MAC matches the event.
    Authentic,
    /// The MAC does not match: the event was altered, moved, or written by a holder of
    /// another master key.
    Altered,
    /// No MAC: written before MACs were, or by someone without the master key.
    Unmarked,
}

/// The key events are authenticated with.
#[derive(Clone)]
pub struct EventMacKey(hmac::Key);

impl std::fmt::Debug for EventMacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventMacKey(..)")
    }
}

impl EventMacKey {
    /// The key for `master_key`'s store: HMAC-SHA256 of the purpose under the master key, so
    /// the master key itself never authenticates anything but its own purposes.
    pub fn derive(master_key: &[u8]) -> Self {
        let derived = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, master_key), PURPOSE);
        Self(hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()))
    }

    /// `event`, as it will be stored, with its MAC.
    pub fn authenticate(&self, event: SerializedEvent) -> AuthenticatedEvent {
        let tag = hmac::sign(&self.0, &message(&event));
        let mut mac = [0; MAC_LEN];
        mac.copy_from_slice(tag.as_ref());
        AuthenticatedEvent { event, mac }
    }

    /// Checks a stored event against its stored MAC, if any.
    pub fn check(&self, event: &SerializedEvent, mac: Option<&[u8]>) -> Authenticity {
        match mac {
            None => Authenticity::Unmarked,
            Some(mac) => match hmac::verify(&self.0, &message(event), mac) {
                Ok(()) => Authenticity::Authentic,
                Err(_) => Authenticity::Altered,
            },
        }
    }
}

/// The bytes a MAC covers: each field length-prefixed, so no two events share them.
fn message(event: &SerializedEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let sequence = (event.sequence as u64).to_be_bytes();
    let payload = canonical(&event.payload);
    let metadata = canonical(&event.metadata);
    for field in [
        PURPOSE,
        event.aggregate_type.as_bytes(),
        event.aggregate_id.as_bytes(),
        &sequence,
        event.event_type.as_bytes(),
        event.event_version.as_bytes(),
        &payload,
        &metadata,
    ] {
        out.extend_from_slice(&(field.len() as u64).to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// `value` as JSON with object keys in byte order and no whitespace.
fn canonical(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(fields) => {
            let mut keys: Vec<&String> = fields.keys().collect();
            keys.sort_unstable();
            out.push(b'{');
            for (index, key) in keys.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).expect("a string always serializes");
                out.push(b':');
                write_canonical(&fields[key], out);
            }
            out.push(b'}');
        }
        // Scalars as serde_json writes them: strings escaped, numbers in their shortest form.
        scalar => {
            serde_json::to_writer(&mut *out, scalar).expect("a JSON scalar always serializes");
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event() -> SerializedEvent {
        SerializedEvent::new(
            "0193f4a2-7b1c-7d3e-9f00-123456789abc".into(),
            7,
            "organization".into(),
            "MemberRoleChanged".into(),
            "1.0".into(),
            json!({"MemberRoleChanged": {"user_id": "u1", "role": "admin", "at": "2026-12-06T00:00:00Z"}}),
            json!({"actor": "u2", "request_id": "r1"}),
        )
    }

    #[test]
    fn an_event_is_authentic_under_its_key_and_altered_under_another() {
        let key = EventMacKey::derive(&[1; 32]);
        let stored = key.authenticate(event());
        assert_eq!(
            key.check(&stored.event, Some(&stored.mac)),
            Authenticity::Authentic
        );
        assert_eq!(
            EventMacKey::derive(&[2; 32]).check(&stored.event, Some(&stored.mac)),
            Authenticity::Altered
        );
        assert_eq!(key.check(&stored.event, None), Authenticity::Unmarked);
    }

    #[test]
    fn the_canonical_form_sorts_keys_and_drops_whitespace() {
        // As PostgreSQL prints a jsonb document: shorter keys first, spaces after separators.
        let read_back: Value = serde_json::from_str(
            r#"{"b": [1, {"d": "é\"\\\n😀", "c": null}], "a": {}, "aa": [], "ab": true}"#,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(canonical(&read_back)).unwrap(),
            r#"{"a":{},"aa":[],"ab":true,"b":[1,{"c":null,"d":"é\"\\\n😀"}]}"#
        );
        let key = EventMacKey::derive(&[1; 32]);
        let stored = key.authenticate(event());
        let mut respaced = event();
        respaced.payload = serde_json::from_str(
            r#"{"MemberRoleChanged": {"at": "2026-12-06T00:00:00Z", "role": "admin", "user_id": "u1"}}"#,
        )
        .unwrap();
        assert_eq!(
            key.check(&respaced, Some(&stored.mac)),
            Authenticity::Authentic
        );
    }

    #[test]
    fn every_stored_field_is_covered() {
        let key = EventMacKey::derive(&[1; 32]);
        let mac = key.authenticate(event()).mac;
        let alterations: [fn(&mut SerializedEvent); 7] = [
            |e| e.aggregate_type = "organisation".into(),
            |e| e.aggregate_id = "0193f4a2-7b1c-7d3e-9f00-123456789abd".into(),
            |e| e.sequence = 8,
            |e| e.event_type = "MemberRemoved".into(),
            |e| e.event_version = "2.0".into(),
            |e| e.payload["MemberRoleChanged"]["role"] = json!("owner"),
            |e| e.metadata["actor"] = json!("u3"),
        ];
        for (index, alter) in alterations.into_iter().enumerate() {
            let mut altered = event();
            alter(&mut altered);
            assert_eq!(
                key.check(&altered, Some(&mac)),
                Authenticity::Altered,
                "alteration {index} went unseen"
            );
        }
    }

    #[test]
    fn field_boundaries_cannot_shift() {
        // Without the length prefixes, moving a character from the type to the version
        // would hash the same bytes.
        let key = EventMacKey::derive(&[1; 32]);
        let mut first = event();
        first.event_type = "Ab".into();
        first.event_version = "c".into();
        let mut second = event();
        second.event_type = "A".into();
        second.event_version = "bc".into();
        let mac = key.authenticate(first).mac;
        assert_eq!(key.check(&second, Some(&mac)), Authenticity::Altered);
    }
}
