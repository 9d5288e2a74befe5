//! Invitations: send, resend, revoke, accept, shareable links.

mod support;

use chrono::Duration;
use orgledger_domain::*;
use support::*;

fn send_cmd(actor: &str, invitation: SendInvitation) -> Command {
    command(user(actor), OrganizationCommand::SendInvitation(invitation))
}

fn accept_cmd(actor: &str, at_day: i64, acceptance: AcceptInvitation) -> Command {
    command_at(
        user(actor),
        days(at_day),
        OrganizationCommand::AcceptInvitation(acceptance),
    )
}

fn with(
    mut events: Vec<OrganizationEvent>,
    more: Vec<OrganizationEvent>,
) -> Vec<OrganizationEvent> {
    events.extend(more);
    events
}

#[test]
fn an_admin_sends_an_invitation_that_expires_after_the_default_seven_days() {
    test()
        .given(acme())
        .when(send_cmd(
            "adam",
            send(1, Some("Nina@Example.com"), Role::Member),
        ))
        .then_expect_events(vec![OrganizationEvent::InvitationSent(InvitationSent {
            invited_by: user("adam"),
            ..invitation_sent(1, Some("nina@example.com"), Role::Member)
        })]);
}

#[test]
fn the_organization_default_expiry_applies_and_an_explicit_one_wins() {
    let mut given = acme();
    given.push(OrganizationEvent::OrganizationUpdated(
        OrganizationUpdated {
            default_invite_expiry_days: Some(Change { from: 7, to: 30 }),
            ..Default::default()
        },
    ));
    let events = test()
        .given(given.clone())
        .when(send_cmd(
            "adam",
            send(1, Some("nina@example.com"), Role::Member),
        ))
        .inspect_result()
        .unwrap();
    let OrganizationEvent::InvitationSent(sent) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(sent.expires_at, days(30));

    let explicit = SendInvitation {
        expires_in_days: Some(ExpiryDays::new("expires_in_days", 90).unwrap()),
        ..send(2, Some("omar@example.com"), Role::Member)
    };
    let events = test()
        .given(given)
        .when(send_cmd("adam", explicit))
        .inspect_result()
        .unwrap();
    let OrganizationEvent::InvitationSent(sent) = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!(sent.expires_at, days(90));
}

#[test]
fn members_and_viewers_cannot_invite() {
    for who in ["mia", "vic"] {
        let error = error_of(
            acme(),
            send_cmd(who, send(1, Some("x@example.com"), Role::Member)),
        );
        assert_eq!(error, OrganizationError::PermissionDenied);
    }
}

#[test]
fn only_an_owner_may_invite_with_the_owner_role() {
    let error = error_of(
        acme(),
        send_cmd("adam", send(1, Some("x@example.com"), Role::Owner)),
    );
    assert_eq!(error, OrganizationError::PermissionDenied);
    test()
        .given(acme())
        .when(send_cmd(
            "olivia",
            send(1, Some("x@example.com"), Role::Owner),
        ))
        .inspect_result()
        .expect("an owner may invite an owner");
}

#[test]
fn inviting_a_member_again_is_refused() {
    let error = error_of(
        acme(),
        send_cmd("adam", send(1, Some("MIA@example.com"), Role::Member)),
    );
    assert_eq!(error, OrganizationError::AlreadyMember);
}

#[test]
fn a_second_pending_invitation_for_one_email_is_refused() {
    let given = with(acme(), vec![sent(1, "nina@example.com", Role::Member)]);
    let error = error_of(
        given,
        send_cmd("adam", send(2, Some("Nina@example.com"), Role::Admin)),
    );
    assert_eq!(error, OrganizationError::InvitationPending);
}

#[test]
fn an_expired_invitation_does_not_block_a_new_one() {
    let given = with(acme(), vec![sent(1, "nina@example.com", Role::Member)]);
    test()
        .given(given)
        .when(command_at(
            user("adam"),
            days(8),
            OrganizationCommand::SendInvitation(send(2, Some("nina@example.com"), Role::Member)),
        ))
        .inspect_result()
        .expect("the old invitation has expired");
}

#[test]
fn a_personal_organization_takes_no_invitations() {
    let given = vec![
        created_as(OrganizationKind::Personal),
        joined("olivia", Role::Owner),
    ];
    let error = error_of(
        given,
        send_cmd("olivia", send(1, Some("x@example.com"), Role::Member)),
    );
    assert_eq!(error, OrganizationError::PersonalOrganization);
}

#[test]
fn an_email_invitation_cannot_have_several_uses() {
    let invitation = SendInvitation {
        max_uses: MaxUses::new("max_uses", 5).unwrap(),
        ..send(1, Some("x@example.com"), Role::Member)
    };
    let error = error_of(acme(), send_cmd("adam", invitation));
    assert_eq!(error.code(), "validation_failed");
}

#[test]
fn resending_issues_a_new_token_and_restarts_the_expiry() {
    let given = with(acme(), vec![sent(1, "nina@example.com", Role::Member)]);
    test()
        .given(given)
        .when(command_at(
            user("adam"),
            days(5),
            OrganizationCommand::ResendInvitation(ResendInvitation {
                invitation_id: invitation_id(1),
                token_sha256: "hash-new".into(),
            }),
        ))
        .then_expect_events(vec![OrganizationEvent::InvitationResent(
            InvitationResent {
                invitation_id: invitation_id(1),
                token_sha256: "hash-new".into(),
                sent_at: days(5),
                expires_at: days(12),
            },
        )]);
}

#[test]
fn resending_an_expired_invitation_sends_it_anew_under_the_rules_of_a_new_one() {
    let resend = |n| {
        command_at(
            user("adam"),
            days(9),
            OrganizationCommand::ResendInvitation(ResendInvitation {
                invitation_id: invitation_id(n),
                token_sha256: "hash-new".into(),
            }),
        )
    };
    let five_seats = OrganizationEvent::PlanChanged(PlanChanged {
        plan: Change {
            from: None,
            to: Some("team".into()),
        },
        seats: Change {
            from: None,
            to: Some(5),
        },
    });
    let later = |n, to: &str| {
        OrganizationEvent::InvitationSent(InvitationSent {
            sent_at: days(8),
            expires_at: days(15),
            ..invitation_sent(n, Some(to), Role::Member)
        })
    };
    // Nina's invitation expired on day 7; Omar's, pending, holds the fifth seat.
    let full = with(
        acme(),
        vec![
            five_seats,
            sent(1, "nina@example.com", Role::Member),
            later(2, "omar@example.com"),
        ],
    );
    assert_eq!(
        error_of(full.clone(), resend(1)),
        OrganizationError::SeatLimitReached,
        "an expired invitation held no seat: resent, it needs one"
    );
    test()
        .given(full)
        .when(resend(2))
        .inspect_result()
        .expect("a pending one already holds its seat");
    // A newer invitation to the same address is pending.
    let superseded = with(
        acme(),
        vec![
            sent(1, "nina@example.com", Role::Member),
            later(2, "nina@example.com"),
        ],
    );
    assert_eq!(
        error_of(superseded, resend(1)),
        OrganizationError::InvitationPending
    );
    // The invitee joined meanwhile: resending is refused, expired or not.
    let joined_since = with(acme(), vec![sent(1, "mia@example.com", Role::Member)]);
    assert_eq!(
        error_of(joined_since, resend(1)),
        OrganizationError::AlreadyMember
    );
}

#[test]
fn the_old_token_is_dead_after_a_resend() {
    let given = with(
        acme(),
        vec![
            sent(1, "nina@example.com", Role::Member),
            OrganizationEvent::InvitationResent(InvitationResent {
                invitation_id: invitation_id(1),
                token_sha256: "hash-new".into(),
                sent_at: days(1),
                expires_at: days(8),
            }),
        ],
    );
    let error = error_of(
        given.clone(),
        accept_cmd("nina", 2, accept("hash-1", "nina", "nina@example.com")),
    );
    assert_eq!(error, OrganizationError::InvalidInvitation);
    test()
        .given(given)
        .when(accept_cmd(
            "nina",
            2,
            accept("hash-new", "nina", "nina@example.com"),
        ))
        .inspect_result()
        .expect("the new token works");
}

#[test]
fn revoking_ends_an_invitation_and_its_token() {
    let given = with(acme(), vec![sent(1, "nina@example.com", Role::Member)]);
    let revoke = OrganizationCommand::RevokeInvitation(RevokeInvitation {
        invitation_id: invitation_id(1),
    });
    test()
        .given(given.clone())
        .when(command(user("adam"), revoke.clone()))
        .then_expect_events(vec![OrganizationEvent::InvitationRevoked(
            InvitationRevoked {
                invitation_id: invitation_id(1),
                revoked_at: t0(),
            },
        )]);
    let revoked = with(
        given,
        vec![OrganizationEvent::InvitationRevoked(InvitationRevoked {
            invitation_id: invitation_id(1),
            revoked_at: t0(),
        })],
    );
    let error = error_of(
        revoked.clone(),
        accept_cmd("nina", 1, accept("hash-1", "nina", "nina@example.com")),
    );
    assert_eq!(error, OrganizationError::InvalidInvitation);
    let again = error_of(revoked, command(user("adam"), revoke));
    assert_eq!(again, OrganizationError::NotFound("invitation"));
}

#[test]
fn members_cannot_revoke_or_resend() {
    let given = with(acme(), vec![sent(1, "nina@example.com", Role::Member)]);
    let revoke = OrganizationCommand::RevokeInvitation(RevokeInvitation {
        invitation_id: invitation_id(1),
    });
    assert_eq!(
        error_of(given.clone(), command(user("mia"), revoke)),
        OrganizationError::PermissionDenied
    );
    let resend = OrganizationCommand::ResendInvitation(ResendInvitation {
        invitation_id: invitation_id(1),
        token_sha256: "h".into(),
    });
    assert_eq!(
        error_of(given, command(user("vic"), resend)),
        OrganizationError::PermissionDenied
    );
}

#[test]
fn accepting_adds_the_member_with_the_invited_role() {
    let given = with(acme(), vec![sent(1, "nina@example.com", Role::Admin)]);
    test()
        .given(given)
        .when(accept_cmd(
            "nina",
            1,
            accept("hash-1", "nina", "NINA@example.com"),
        ))
        .then_expect_events(vec![
            OrganizationEvent::InvitationAccepted(InvitationAccepted {
                invitation_id: invitation_id(1),
                user_id: uid("nina"),
                email: "nina@example.com".into(),
                accepted_at: days(1),
            }),
            OrganizationEvent::MemberJoined(MemberJoined {
                user_id: uid("nina"),
                email: "nina@example.com".into(),
                first_name: None,
                last_name: None,
                title: None,
                image_url: None,
                role: Role::Admin,
                locked_fields: vec![],
                group_ids: vec![],
                invitation_id: Some(invitation_id(1)),
                joined_at: days(1),
            }),
        ]);
}

/// The id becomes the actor of every entry the member makes: one that reorders the text
/// around it would show as another.
#[test]
fn accepting_as_an_id_that_would_show_as_another_is_refused() {
    let given = with(acme(), vec![sent(1, "nina@example.com", Role::Member)]);
    let spoofing = "nina\u{202E}nimda";
    let OrganizationError::Validation(problems) = error_of(
        given,
        accept_cmd(spoofing, 1, accept("hash-1", spoofing, "nina@example.com")),
    ) else {
        panic!("a validation error expected")
    };
    assert_eq!(problems[0].field, "user_id");
}

#[test]
fn names_and_title_given_on_the_invitation_become_locked_profile_fields() {
    let invitation = InvitationSent {
        first_name: Some("Nina".into()),
        title: Some("CFO".into()),
        group_id: Some(invitation_id(99)),
        ..invitation_sent(1, Some("nina@example.com"), Role::Member)
    };
    let group = OrganizationEvent::GroupCreated(GroupCreated {
        group_id: invitation_id(99),
        name: "Finance".into(),
        description: None,
        created_at: t0(),
    });
    let given = with(
        acme(),
        vec![group, OrganizationEvent::InvitationSent(invitation)],
    );
    let acceptance = AcceptInvitation {
        first_name: Some("Nini".into()),
        last_name: Some("Sky".into()),
        ..accept("hash-1", "nina", "nina@example.com")
    };
    let events = test()
        .given(given)
        .when(accept_cmd("nina", 1, acceptance))
        .inspect_result()
        .unwrap();
    let OrganizationEvent::MemberJoined(joined) = &events[1] else {
        panic!("{events:?}")
    };
    assert_eq!(joined.first_name.as_deref(), Some("Nina"));
    assert_eq!(joined.last_name.as_deref(), Some("Sky"));
    assert_eq!(joined.title.as_deref(), Some("CFO"));
    assert_eq!(
        joined.locked_fields,
        vec![LockedField::FirstName, LockedField::Title]
    );
    assert_eq!(joined.group_ids, vec![invitation_id(99)]);
}

#[test]
fn accepting_an_expired_invitation_is_rejected() {
    let given = with(acme(), vec![sent(1, "nina@example.com", Role::Member)]);
    let error = error_of(
        given,
        accept_cmd("nina", 7, accept("hash-1", "nina", "nina@example.com")),
    );
    assert_eq!(error, OrganizationError::InvitationExpired);
}

#[test]
fn accepting_with_an_unknown_token_is_an_invalid_invitation() {
    let given = with(acme(), vec![sent(1, "nina@example.com", Role::Member)]);
    let error = error_of(
        given,
        accept_cmd("nina", 1, accept("hash-x", "nina", "nina@example.com")),
    );
    assert_eq!(error, OrganizationError::InvalidInvitation);
}

#[test]
fn accepting_with_another_email_is_an_email_mismatch() {
    let given = with(acme(), vec![sent(1, "nina@example.com", Role::Member)]);
    let error = error_of(
        given,
        accept_cmd("nina", 1, accept("hash-1", "nina", "nina@other.com")),
    );
    assert_eq!(error, OrganizationError::EmailMismatch);
}

#[test]
fn an_accepted_invitation_cannot_be_used_again() {
    let given = with(acme(), vec![sent(1, "nina@example.com", Role::Member)]);
    let mut state = Organization::default();
    for event in given {
        cqrs_es::Aggregate::apply(&mut state, event);
    }
    for event in state
        .decide(&accept_cmd(
            "nina",
            1,
            accept("hash-1", "nina", "nina@example.com"),
        ))
        .unwrap()
    {
        cqrs_es::Aggregate::apply(&mut state, event);
    }
    let again = state.decide(&accept_cmd(
        "nina",
        1,
        accept("hash-1", "nina", "nina@example.com"),
    ));
    assert_eq!(again, Err(OrganizationError::InvalidInvitation));
}

#[test]
fn only_the_joining_user_may_accept() {
    let given = with(acme(), vec![sent(1, "nina@example.com", Role::Member)]);
    let error = error_of(
        given.clone(),
        accept_cmd("mallory", 1, accept("hash-1", "nina", "nina@example.com")),
    );
    assert_eq!(error, OrganizationError::PermissionDenied);
    let by_system = command(
        Actor::System,
        OrganizationCommand::AcceptInvitation(accept("hash-1", "nina", "nina@example.com")),
    );
    assert_eq!(error_of(given, by_system), OrganizationError::ActorRequired);
}

#[test]
fn a_member_cannot_accept_an_invitation_to_the_same_organization() {
    let link = InvitationSent {
        max_uses: 3,
        ..invitation_sent(1, None, Role::Member)
    };
    let given = with(acme(), vec![OrganizationEvent::InvitationSent(link)]);
    let error = error_of(
        given,
        accept_cmd("mia", 1, accept("hash-1", "mia", "mia@example.com")),
    );
    assert_eq!(error, OrganizationError::AlreadyMember);
}

#[test]
fn a_shareable_link_is_accepted_by_anyone_up_to_max_uses() {
    let link = InvitationSent {
        max_uses: 2,
        ..invitation_sent(1, None, Role::Viewer)
    };
    let mut state = Organization::default();
    for event in with(acme(), vec![OrganizationEvent::InvitationSent(link)]) {
        cqrs_es::Aggregate::apply(&mut state, event);
    }
    for who in ["p1", "p2"] {
        let events = state
            .decide(&accept_cmd(
                who,
                1,
                accept("hash-1", who, &format!("{who}@elsewhere.org")),
            ))
            .unwrap();
        for event in events {
            cqrs_es::Aggregate::apply(&mut state, event);
        }
    }
    assert_eq!(state.members[&uid("p2")].role, Role::Viewer);
    let third = state.decide(&accept_cmd(
        "p3",
        1,
        accept("hash-1", "p3", "p3@elsewhere.org"),
    ));
    assert_eq!(third, Err(OrganizationError::InvalidInvitation));
}

#[test]
fn joining_through_a_link_is_refused_while_an_invitation_to_that_email_is_pending() {
    let link = InvitationSent {
        max_uses: 3,
        expires_at: days(30),
        ..invitation_sent(1, None, Role::Member)
    };
    let given = with(
        acme(),
        vec![
            OrganizationEvent::InvitationSent(link),
            sent(2, "nina@example.com", Role::Viewer),
        ],
    );
    // Accepted through the link, the invitation addressed to her would stay pending with
    // no one left who could accept it: she accepts that one, or it is revoked first.
    let error = error_of(
        given.clone(),
        accept_cmd("nina", 1, accept("hash-1", "nina", "nina@example.com")),
    );
    assert_eq!(error, OrganizationError::OwnInvitationPending);
    assert_eq!(error.code(), "invitation_pending");
    // Once it has expired it stands in no one's way.
    test()
        .given(given)
        .when(accept_cmd(
            "nina",
            8,
            accept("hash-1", "nina", "nina@example.com"),
        ))
        .inspect_result()
        .expect("the link is accepted once the other invitation expired");
}

#[test]
fn resending_keeps_the_original_lifetime() {
    let long = InvitationSent {
        expires_at: t0() + Duration::days(60),
        ..invitation_sent(1, Some("nina@example.com"), Role::Member)
    };
    let events = test()
        .given(with(acme(), vec![OrganizationEvent::InvitationSent(long)]))
        .when(command_at(
            user("olivia"),
            days(10),
            OrganizationCommand::ResendInvitation(ResendInvitation {
                invitation_id: invitation_id(1),
                token_sha256: "h2".into(),
            }),
        ))
        .inspect_result()
        .unwrap();
    let OrganizationEvent::InvitationResent(resent) = &events[0] else {
        panic!()
    };
    assert_eq!(resent.expires_at, days(70));
}
