//! Builders shared by the domain tests: a clock, actors and the usual events.
#![allow(dead_code)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use orgledger_domain::*;
use uuid::Uuid;

pub type OrganizationTest = TestFramework<Organization>;

pub fn test() -> OrganizationTest {
    TestFramework::with(())
}

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 1, 9, 0, 0).unwrap()
}

pub fn days(n: i64) -> DateTime<Utc> {
    t0() + Duration::days(n)
}

pub fn org_id() -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001)
}

pub fn invitation_id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0001_0000 + n)
}

pub fn uid(id: &str) -> UserId {
    UserId::parse("user_id", id).unwrap()
}

pub fn user(id: &str) -> Actor {
    Actor::User(uid(id))
}

pub fn email(raw: &str) -> Email {
    Email::parse("email", raw).unwrap()
}

/// The SHA-256 the fixtures give a service account's key: a service account's command is
/// issued with it, as the HTTP edge issues one with the hash of the key it presented.
pub const ACCOUNT_KEY_SHA256: &str = "h";

pub fn command(actor: Actor, body: OrganizationCommand) -> Command {
    command_at(actor, t0(), body)
}

pub fn command_at(actor: Actor, at: DateTime<Utc>, body: OrganizationCommand) -> Command {
    let key = matches!(actor, Actor::ServiceAccount(_)).then(|| ACCOUNT_KEY_SHA256.to_owned());
    Command::new(actor, at, body).with_key_sha256(key)
}

pub fn created() -> OrganizationEvent {
    created_as(OrganizationKind::Team)
}

pub fn created_as(kind: OrganizationKind) -> OrganizationEvent {
    OrganizationEvent::OrganizationCreated(OrganizationCreated {
        organization_id: org_id(),
        name: "Acme".into(),
        slug: "acme".into(),
        kind,
        settings: Settings::default(),
        created_at: t0(),
    })
}

pub fn joined(user_id: &str, role: Role) -> OrganizationEvent {
    OrganizationEvent::MemberJoined(MemberJoined {
        user_id: uid(user_id),
        email: format!("{user_id}@example.com"),
        first_name: None,
        last_name: None,
        title: None,
        image_url: None,
        role,
        locked_fields: Vec::new(),
        group_ids: Vec::new(),
        invitation_id: None,
        joined_at: t0(),
    })
}

/// Acme with owner `olivia`, admin `adam`, member `mia` and viewer `vic`.
pub fn acme() -> Vec<OrganizationEvent> {
    vec![
        created(),
        joined("olivia", Role::Owner),
        joined("adam", Role::Admin),
        joined("mia", Role::Member),
        joined("vic", Role::Viewer),
    ]
}

pub fn invitation_sent(n: u128, to: Option<&str>, role: Role) -> InvitationSent {
    InvitationSent {
        invitation_id: invitation_id(n),
        email: to.map(str::to_owned),
        role,
        first_name: None,
        last_name: None,
        title: None,
        group_id: None,
        max_uses: 1,
        token_sha256: format!("hash-{n}"),
        invited_by: user("olivia"),
        sent_at: t0(),
        expires_at: days(7),
    }
}

pub fn sent(n: u128, to: &str, role: Role) -> OrganizationEvent {
    OrganizationEvent::InvitationSent(invitation_sent(n, Some(to), role))
}

pub fn send(n: u128, to: Option<&str>, role: Role) -> SendInvitation {
    SendInvitation {
        invitation_id: invitation_id(n),
        email: to.map(email),
        role,
        first_name: None,
        last_name: None,
        title: None,
        group_id: None,
        expires_in_days: None,
        max_uses: MaxUses::ONE,
        token_sha256: format!("hash-{n}"),
    }
}

pub fn accept(token: &str, user_id: &str, address: &str) -> AcceptInvitation {
    AcceptInvitation {
        token_sha256: token.into(),
        user_id: uid(user_id),
        email: email(address),
        first_name: None,
        last_name: None,
    }
}

pub fn deleted() -> OrganizationEvent {
    OrganizationEvent::OrganizationDeleted(OrganizationDeleted {
        deleted_at: t0(),
        purge_after: days(30),
    })
}

pub fn role_changed(user_id: &str, from: Role, to: Role) -> OrganizationEvent {
    OrganizationEvent::MemberRoleChanged(MemberRoleChanged {
        user_id: uid(user_id),
        from,
        to,
    })
}

pub fn error_of(given: Vec<OrganizationEvent>, command: Command) -> OrganizationError {
    test()
        .given(given)
        .when(command)
        .inspect_result()
        .expect_err("the command should be refused")
}
