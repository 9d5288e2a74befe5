//! Stored events of older versions still load.

use cqrs_es::persist::SerializedEvent;
use orgledger_domain::*;
use serde_json::json;

fn upcast(event: SerializedEvent) -> SerializedEvent {
    upcasters().iter().fold(event, |event, upcaster| {
        if upcaster.can_upcast(&event.event_type, &event.event_version) {
            upcaster.upcast(event)
        } else {
            event
        }
    })
}

#[test]
fn a_version_one_invitation_loads_as_a_single_use_invitation() {
    let v1 = json!({"InvitationSent": {
        "invitation_id": "01900000-0000-7000-8000-000000010001",
        "email": "nina@example.com",
        "role": "member",
        "first_name": null, "last_name": null, "title": null, "group_id": null,
        "token_sha256": "abc",
        "invited_by": {"type": "user", "id": "olivia"},
        "sent_at": "2026-11-01T09:00:00Z",
        "expires_at": "2026-11-08T09:00:00Z"
    }});
    let stored = SerializedEvent::new(
        "org".into(),
        3,
        "organization".into(),
        "InvitationSent".into(),
        "1".into(),
        v1,
        json!({}),
    );
    let lifted = upcast(stored);
    assert_eq!(lifted.event_version, "2.0.0");
    let event: OrganizationEvent = serde_json::from_value(lifted.payload).unwrap();
    let OrganizationEvent::InvitationSent(sent) = event else {
        panic!()
    };
    assert_eq!(sent.max_uses, 1);
}

#[test]
fn current_versions_pass_through_untouched() {
    let payload = json!({"MemberLeft": {"user_id": "mia", "left_at": "2026-11-01T09:00:00Z"}});
    let stored = SerializedEvent::new(
        "org".into(),
        9,
        "organization".into(),
        "MemberLeft".into(),
        "1".into(),
        payload.clone(),
        json!({}),
    );
    assert_eq!(upcast(stored).payload, payload);
}
