//! Lifting stored payloads of older event versions to the current shape. Stored rows are
//! never rewritten: old versions are upcast every time they are read.

use cqrs_es::persist::{EventUpcaster, SemanticVersionEventUpcaster};
use serde_json::Value;

/// Every upcaster, applied in order by the event store on read.
pub fn upcasters() -> Vec<Box<dyn EventUpcaster>> {
    vec![Box::new(SemanticVersionEventUpcaster::new(
        "InvitationSent",
        "2",
        Box::new(invitation_sent_v1_to_v2),
    ))]
}

/// Version 1 of `InvitationSent` predates shareable links: every invitation named an email
/// and could be used once. Version 2 adds `max_uses`.
fn invitation_sent_v1_to_v2(mut payload: Value) -> Value {
    if let Some(body) = payload
        .get_mut("InvitationSent")
        .and_then(Value::as_object_mut)
    {
        body.entry("max_uses").or_insert(Value::from(1));
    }
    payload
}
