//! Members: roles, profiles and locks, removal, leaving, the last-owner rule.

mod support;

use orgledger_domain::*;
use support::*;

fn patch(actor: &str, update: UpdateMember) -> Command {
    command(user(actor), OrganizationCommand::UpdateMember(update))
}

fn set_role(target: &str, role: Role) -> UpdateMember {
    UpdateMember {
        role: Some(role),
        ..UpdateMember::of(uid(target))
    }
}

fn remove(actor: &str, target: &str) -> Command {
    command(
        user(actor),
        OrganizationCommand::RemoveMember(RemoveMember {
            user_id: uid(target),
        }),
    )
}

fn leave(actor: &str) -> Command {
    command(user(actor), OrganizationCommand::LeaveOrganization)
}

#[test]
fn a_role_change_records_from_and_to() {
    test()
        .given(acme())
        .when(patch("adam", set_role("mia", Role::Admin)))
        .then_expect_events(vec![role_changed("mia", Role::Member, Role::Admin)]);
}

#[test]
fn members_cannot_change_roles() {
    let error = error_of(acme(), patch("mia", set_role("vic", Role::Member)));
    assert_eq!(error, OrganizationError::PermissionDenied);
    let own = error_of(acme(), patch("mia", set_role("mia", Role::Admin)));
    assert_eq!(own, OrganizationError::PermissionDenied);
}

#[test]
fn only_an_owner_may_grant_the_owner_role() {
    let error = error_of(acme(), patch("adam", set_role("mia", Role::Owner)));
    assert_eq!(error, OrganizationError::PermissionDenied);
    test()
        .given(acme())
        .when(patch("olivia", set_role("mia", Role::Owner)))
        .then_expect_events(vec![role_changed("mia", Role::Member, Role::Owner)]);
}

#[test]
fn only_an_owner_may_change_an_owner() {
    let mut given = acme();
    given.push(joined("otto", Role::Owner));
    let error = error_of(given.clone(), patch("adam", set_role("otto", Role::Member)));
    assert_eq!(error, OrganizationError::PermissionDenied);
    let profile = UpdateMember {
        title: Some(Some("Boss".into())),
        ..UpdateMember::of(uid("otto"))
    };
    assert_eq!(
        error_of(given, patch("adam", profile)),
        OrganizationError::PermissionDenied
    );
}

#[test]
fn demoting_the_last_owner_is_refused() {
    let error = error_of(acme(), patch("olivia", set_role("olivia", Role::Admin)));
    assert_eq!(error, OrganizationError::LastOwner);
}

#[test]
fn an_owner_may_step_down_when_another_owner_remains() {
    let mut given = acme();
    given.push(joined("otto", Role::Owner));
    test()
        .given(given)
        .when(patch("olivia", set_role("olivia", Role::Admin)))
        .then_expect_events(vec![role_changed("olivia", Role::Owner, Role::Admin)]);
}

#[test]
fn changing_the_role_of_a_non_member_is_not_found() {
    let error = error_of(acme(), patch("adam", set_role("ghost", Role::Member)));
    assert_eq!(error, OrganizationError::NotFound("member"));
}

#[test]
fn setting_the_same_role_appends_nothing() {
    test()
        .given(acme())
        .when(patch("adam", set_role("mia", Role::Member)))
        .then_expect_events(vec![]);
}

#[test]
fn an_admin_edits_a_profile_and_locks_fields_in_one_event() {
    let update = UpdateMember {
        first_name: Some(Some("Mia".into())),
        title: Some(Some("Engineer".into())),
        locked_fields: Some(vec![
            LockedField::Title,
            LockedField::FirstName,
            LockedField::Title,
        ]),
        ..UpdateMember::of(uid("mia"))
    };
    test()
        .given(acme())
        .when(patch("adam", update))
        .then_expect_events(vec![OrganizationEvent::MemberProfileUpdated(
            MemberProfileUpdated {
                user_id: uid("mia"),
                first_name: Some(Change {
                    from: None,
                    to: Some("Mia".into()),
                }),
                last_name: None,
                title: Some(Change {
                    from: None,
                    to: Some("Engineer".into()),
                }),
                image_url: None,
                locked_fields: Some(Change {
                    from: vec![],
                    to: vec![LockedField::FirstName, LockedField::Title],
                }),
            },
        )]);
}

/// A name held before the rule on text-direction characters, sent back unchanged with the
/// rest of a profile, is no change; a new one is judged.
#[test]
fn only_new_profile_values_are_judged_for_text_direction_characters() {
    let held = "Mia\u{202E}";
    let mut given = acme();
    given.push(OrganizationEvent::MemberProfileUpdated(
        MemberProfileUpdated {
            user_id: uid("mia"),
            first_name: Some(Change {
                from: None,
                to: Some(held.into()),
            }),
            last_name: None,
            title: None,
            image_url: None,
            locked_fields: None,
        },
    ));
    let resent = UpdateMember {
        first_name: Some(Some(held.into())),
        ..UpdateMember::of(uid("mia"))
    };
    test()
        .given(given.clone())
        .when(patch("adam", resent))
        .then_expect_events(vec![]);
    let renamed = UpdateMember {
        first_name: Some(Some("Ai\u{2067}m".into())),
        ..UpdateMember::of(uid("mia"))
    };
    assert_eq!(
        error_of(given, patch("adam", renamed)).code(),
        "validation_failed"
    );
}

fn mia_locked() -> Vec<OrganizationEvent> {
    let mut given = acme();
    given.push(OrganizationEvent::MemberProfileUpdated(
        MemberProfileUpdated {
            user_id: uid("mia"),
            first_name: None,
            last_name: None,
            title: Some(Change {
                from: None,
                to: Some("Engineer".into()),
            }),
            image_url: None,
            locked_fields: Some(Change {
                from: vec![],
                to: vec![LockedField::Title],
            }),
        },
    ));
    given
}

#[test]
fn a_member_editing_their_own_locked_field_is_refused() {
    let update = UpdateMember {
        title: Some(Some("CEO".into())),
        ..UpdateMember::of(uid("mia"))
    };
    let error = error_of(mia_locked(), patch("mia", update));
    assert_eq!(error, OrganizationError::FieldLocked("title"));
    assert_eq!(error.code(), "field_locked");
}

#[test]
fn a_member_edits_their_own_unlocked_fields() {
    let update = UpdateMember {
        first_name: Some(Some("Mia".into())),
        title: Some(Some("Engineer".into())),
        ..UpdateMember::of(uid("mia"))
    };
    let events = test()
        .given(mia_locked())
        .when(patch("mia", update))
        .inspect_result()
        .unwrap();
    let OrganizationEvent::MemberProfileUpdated(updated) = &events[0] else {
        panic!()
    };
    assert!(updated.first_name.is_some());
    assert!(
        updated.title.is_none(),
        "an unchanged locked field is not a change"
    );
}

#[test]
fn an_admin_may_edit_a_locked_field() {
    let update = UpdateMember {
        title: Some(Some("CTO".into())),
        ..UpdateMember::of(uid("mia"))
    };
    test()
        .given(mia_locked())
        .when(patch("adam", update))
        .inspect_result()
        .expect("admins edit locked fields");
}

#[test]
fn a_member_cannot_unlock_their_own_fields_or_edit_others() {
    let unlock = UpdateMember {
        locked_fields: Some(vec![]),
        ..UpdateMember::of(uid("mia"))
    };
    assert_eq!(
        error_of(mia_locked(), patch("mia", unlock)),
        OrganizationError::PermissionDenied
    );
    let other = UpdateMember {
        first_name: Some(Some("V".into())),
        ..UpdateMember::of(uid("vic"))
    };
    assert_eq!(
        error_of(mia_locked(), patch("mia", other)),
        OrganizationError::PermissionDenied
    );
}

#[test]
fn who_may_not_edit_a_member_is_refused_whether_or_not_they_are_one() {
    let title = |target: &str| UpdateMember {
        title: Some(Some("Boss".into())),
        ..UpdateMember::of(uid(target))
    };
    // A stranger, and a member editing someone else: the same refusal for a member and for
    // an id that is none, so it tells nobody who belongs.
    for (actor, target) in [
        ("stranger", "mia"),
        ("stranger", "nobody"),
        ("stranger", "stranger"),
        ("vic", "mia"),
        ("vic", "nobody"),
    ] {
        assert_eq!(
            error_of(acme(), patch(actor, title(target))),
            OrganizationError::PermissionDenied,
            "{actor} editing {target}"
        );
    }
    // Who manages members is told when there is no such member.
    assert_eq!(
        error_of(acme(), patch("adam", title("nobody"))),
        OrganizationError::NotFound("member")
    );
}

#[test]
fn blank_names_and_bad_image_urls_are_validation_errors() {
    let blank = UpdateMember {
        first_name: Some(Some("  ".into())),
        ..UpdateMember::of(uid("mia"))
    };
    assert_eq!(
        error_of(acme(), patch("mia", blank)).code(),
        "validation_failed"
    );
    for bad in [
        "ftp://x",
        "https://a\u{0}b",
        "https://a\u{7f}",
        "https://me:hunter2@images.example/me.png",
    ] {
        let url = UpdateMember {
            image_url: Some(Some(bad.into())),
            ..UpdateMember::of(uid("mia"))
        };
        assert_eq!(
            error_of(acme(), patch("mia", url)).code(),
            "validation_failed",
            "{bad:?}"
        );
    }
}

#[test]
fn an_admin_removes_a_member() {
    let events = test()
        .given(acme())
        .when(remove("adam", "mia"))
        .inspect_result()
        .unwrap();
    assert_eq!(
        events,
        vec![OrganizationEvent::MemberRemoved(MemberRemoved {
            user_id: uid("mia"),
            removed_at: t0()
        })]
    );
}

#[test]
fn nobody_removes_themselves_through_the_members_route() {
    for who in ["olivia", "adam", "mia"] {
        assert_eq!(
            error_of(acme(), remove(who, who)),
            OrganizationError::CannotRemoveSelf,
            "{who}"
        );
    }
}

#[test]
fn only_an_owner_removes_an_owner() {
    let mut given = acme();
    given.push(joined("otto", Role::Owner));
    assert_eq!(
        error_of(given.clone(), remove("adam", "otto")),
        OrganizationError::PermissionDenied
    );
    test()
        .given(given)
        .when(remove("olivia", "otto"))
        .inspect_result()
        .expect("owners remove owners");
}

#[test]
fn members_cannot_remove_anyone() {
    assert_eq!(
        error_of(acme(), remove("mia", "vic")),
        OrganizationError::PermissionDenied
    );
    assert_eq!(
        error_of(acme(), remove("stranger", "vic")),
        OrganizationError::PermissionDenied
    );
}

#[test]
fn removing_a_non_member_is_not_found() {
    assert_eq!(
        error_of(acme(), remove("adam", "ghost")),
        OrganizationError::NotFound("member")
    );
}

#[test]
fn a_member_leaves() {
    test()
        .given(acme())
        .when(leave("mia"))
        .then_expect_events(vec![OrganizationEvent::MemberLeft(MemberLeft {
            user_id: uid("mia"),
            left_at: t0(),
        })]);
}

#[test]
fn the_last_owner_cannot_leave() {
    assert_eq!(
        error_of(acme(), leave("olivia")),
        OrganizationError::LastOwner
    );
}

#[test]
fn a_non_member_cannot_leave() {
    assert_eq!(
        error_of(acme(), leave("stranger")),
        OrganizationError::PermissionDenied
    );
}

#[test]
fn system_and_service_accounts_hold_no_member_powers() {
    let by_system = command(
        Actor::System,
        OrganizationCommand::RemoveMember(RemoveMember {
            user_id: uid("mia"),
        }),
    );
    assert_eq!(
        error_of(acme(), by_system),
        OrganizationError::ActorRequired
    );
    let by_account = command(
        Actor::ServiceAccount(invitation_id(7)),
        OrganizationCommand::RemoveMember(RemoveMember {
            user_id: uid("mia"),
        }),
    );
    assert_eq!(
        error_of(acme(), by_account),
        OrganizationError::PermissionDenied
    );
}
