//! Groups, service accounts, settings, AI providers, plan and seats, custom roles.

mod support;

use orgledger_domain::*;
use support::*;
use uuid::Uuid;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0002_0000 + n)
}

fn by(actor: &str, body: OrganizationCommand) -> Command {
    command(user(actor), body)
}

fn group_created(n: u128, name: &str) -> OrganizationEvent {
    OrganizationEvent::GroupCreated(GroupCreated {
        group_id: id(n),
        name: name.into(),
        description: None,
        created_at: t0(),
    })
}

fn with(
    mut events: Vec<OrganizationEvent>,
    more: Vec<OrganizationEvent>,
) -> Vec<OrganizationEvent> {
    events.extend(more);
    events
}

fn acme_state() -> Organization {
    state_after(acme())
}

fn state_after(events: Vec<OrganizationEvent>) -> Organization {
    let mut state = Organization::default();
    for event in events {
        cqrs_es::Aggregate::apply(&mut state, event);
    }
    state
}

/// A text-direction override would let a group read as another name in every list.
#[test]
fn a_group_name_that_reorders_the_text_around_it_is_refused_and_right_to_left_ones_are_not() {
    let create = |name: &str| {
        OrganizationCommand::CreateGroup(CreateGroup {
            group_id: id(1),
            name: name.into(),
            description: None,
        })
    };
    for name in ["Admins\u{202E}sresU", "\u{2067}Payroll", "Ops\u{202A}"] {
        let OrganizationError::Validation(problems) = error_of(acme(), by("adam", create(name)))
        else {
            panic!("{name:?}: a validation error expected")
        };
        assert_eq!(problems[0].field, "name", "{name:?}");
        assert!(
            problems[0].message.contains("text-direction"),
            "{:?}",
            problems[0].message
        );
    }
    // Right-to-left names, and the direction marks mixed-direction names use, are names.
    test()
        .given(acme())
        .when(by("adam", create("צוות תמיכה 2\u{200F}")))
        .then_expect_events(vec![group_created(1, "צוות תמיכה 2\u{200F}")]);
}

/// A group named before the rule on text-direction characters, its name and description
/// sent back unchanged (a client PUTting the whole group), is no change; a new one is judged.
#[test]
fn only_a_new_group_name_or_description_is_judged_for_text_direction_characters() {
    let held = "Ops\u{202E}x";
    let mut given = with(acme(), vec![group_created(1, held)]);
    given.push(OrganizationEvent::GroupUpdated(GroupUpdated {
        group_id: id(1),
        name: None,
        description: Some(Change {
            from: None,
            to: Some(held.into()),
        }),
    }));
    let update = |name: &str, description: &str| {
        by(
            "adam",
            OrganizationCommand::UpdateGroup(UpdateGroup {
                group_id: id(1),
                name: Some(name.into()),
                description: Some(Some(description.into())),
            }),
        )
    };
    test()
        .given(given.clone())
        .when(update(held, held))
        .then_expect_events(vec![]);
    for (name, description, field) in [
        ("Ops\u{2066}y", held, "name"),
        (held, "\u{202D}z", "description"),
    ] {
        let OrganizationError::Validation(problems) =
            error_of(given.clone(), update(name, description))
        else {
            panic!("{field}: a validation error expected")
        };
        assert_eq!(problems[0].field, field);
    }
}

#[test]
fn an_admin_creates_a_group_and_names_are_unique() {
    let create = |n, name: &str| {
        OrganizationCommand::CreateGroup(CreateGroup {
            group_id: id(n),
            name: name.into(),
            description: Some("People".into()),
        })
    };
    test()
        .given(acme())
        .when(by("adam", create(1, "Engineering")))
        .then_expect_events(vec![OrganizationEvent::GroupCreated(GroupCreated {
            group_id: id(1),
            name: "Engineering".into(),
            description: Some("People".into()),
            created_at: t0(),
        })]);
    let taken = error_of(
        with(acme(), vec![group_created(1, "Engineering")]),
        by("adam", create(2, "engineering")),
    );
    assert_eq!(taken.code(), "group_exists");
    assert_eq!(
        error_of(acme(), by("mia", create(1, "X"))),
        OrganizationError::PermissionDenied
    );
    assert_eq!(
        error_of(acme(), by("adam", create(1, " "))).code(),
        "validation_failed"
    );
}

#[test]
fn group_membership_needs_a_member_and_follows_removal_and_deletion() {
    let given = with(acme(), vec![group_created(1, "Eng")]);
    let add = |user: &str| {
        OrganizationCommand::AddGroupMember(GroupMembership {
            group_id: id(1),
            user_id: uid(user),
        })
    };
    assert_eq!(
        error_of(given.clone(), by("adam", add("ghost"))),
        OrganizationError::NotFound("member")
    );
    let added = OrganizationEvent::GroupMemberAdded(GroupMemberAdded {
        group_id: id(1),
        user_id: uid("mia"),
    });
    test()
        .given(given.clone())
        .when(by("adam", add("mia")))
        .then_expect_events(vec![added.clone()]);
    test()
        .given(with(given.clone(), vec![added.clone()]))
        .when(by("adam", add("mia")))
        .then_expect_events(vec![]);

    let state = state_after(with(given.clone(), vec![added.clone()]));
    assert_eq!(state.members[&uid("mia")].group_ids, vec![id(1)]);
    let removed = state_after(with(
        given.clone(),
        vec![
            added.clone(),
            OrganizationEvent::MemberRemoved(MemberRemoved {
                user_id: uid("mia"),
                removed_at: t0(),
            }),
        ],
    ));
    assert!(
        removed.groups[&id(1)].member_ids.is_empty(),
        "a removed member leaves every group"
    );
    let deleted = state_after(with(
        given,
        vec![
            added,
            OrganizationEvent::GroupDeleted(GroupDeleted { group_id: id(1) }),
        ],
    ));
    assert!(
        deleted.members[&uid("mia")].group_ids.is_empty(),
        "a deleted group leaves every member"
    );
}

/// Joining through an invitation into a group makes the member one of the group's members,
/// as adding them to it does: they can be taken out, and adding them again changes nothing.
#[test]
fn a_member_who_joined_through_an_invitation_into_a_group_can_be_taken_out_of_it() {
    let mut nina = joined("nina", Role::Member);
    if let OrganizationEvent::MemberJoined(joined) = &mut nina {
        joined.group_ids = vec![id(1)];
    }
    let given = with(acme(), vec![group_created(1, "Eng"), nina]);
    let state = state_after(given.clone());
    assert!(state.groups[&id(1)].member_ids.contains(&uid("nina")));
    let membership = GroupMembership {
        group_id: id(1),
        user_id: uid("nina"),
    };
    test()
        .given(given.clone())
        .when(by(
            "adam",
            OrganizationCommand::RemoveGroupMember(membership.clone()),
        ))
        .then_expect_events(vec![OrganizationEvent::GroupMemberRemoved(
            GroupMemberRemoved {
                group_id: id(1),
                user_id: uid("nina"),
            },
        )]);
    test()
        .given(given)
        .when(by("adam", OrganizationCommand::AddGroupMember(membership)))
        .then_expect_events(vec![]);
}

#[test]
fn an_invitation_puts_the_new_member_in_its_group() {
    let given = with(acme(), vec![group_created(1, "Eng")]);
    let invite = SendInvitation {
        group_id: Some(id(1)),
        ..send(1, Some("nina@example.com"), Role::Member)
    };
    let events = test()
        .given(given.clone())
        .when(by("adam", OrganizationCommand::SendInvitation(invite)))
        .inspect_result()
        .unwrap();
    let state = state_after(with(given, events));
    let events = state
        .decide(&command_at(
            user("nina"),
            days(1),
            OrganizationCommand::AcceptInvitation(accept("hash-1", "nina", "nina@example.com")),
        ))
        .unwrap();
    let OrganizationEvent::MemberJoined(joined) = &events[1] else {
        panic!()
    };
    assert_eq!(joined.group_ids, vec![id(1)]);
    let unknown = SendInvitation {
        group_id: Some(id(9)),
        ..send(2, Some("x@example.com"), Role::Member)
    };
    assert_eq!(
        error_of(
            acme(),
            by("adam", OrganizationCommand::SendInvitation(unknown))
        )
        .code(),
        "validation_failed"
    );
}

fn account_created(scopes: Vec<Scope>) -> OrganizationEvent {
    OrganizationEvent::ServiceAccountCreated(ServiceAccountCreated {
        service_account_id: id(7),
        name: "ci".into(),
        description: None,
        scopes,
        key_prefix: "sa_abcd".into(),
        key_sha256: ACCOUNT_KEY_SHA256.into(),
        created_at: t0(),
    })
}

#[test]
fn service_accounts_are_created_rotated_and_deleted_by_admins() {
    let create = OrganizationCommand::CreateServiceAccount(CreateServiceAccount {
        service_account_id: id(7),
        name: "ci".into(),
        description: None,
        scopes: vec![Scope::MembersRead, Scope::MembersRead],
        key_prefix: "sa_abcd".into(),
        key_sha256: "h".into(),
    });
    test()
        .given(acme())
        .when(by("adam", create.clone()))
        .then_expect_events(vec![account_created(vec![Scope::MembersRead])]);
    assert_eq!(
        error_of(acme(), by("mia", create)),
        OrganizationError::PermissionDenied
    );
    let given = with(acme(), vec![account_created(vec![Scope::MembersRead])]);
    let rotate = OrganizationCommand::RotateServiceAccountKey(RotateServiceAccountKey {
        service_account_id: id(7),
        key_prefix: "sa_efgh".into(),
        key_sha256: "h2".into(),
    });
    let events = test()
        .given(given.clone())
        .when(by("adam", rotate))
        .inspect_result()
        .unwrap();
    let state = state_after(with(given.clone(), events));
    assert_eq!(
        state.service_accounts[&id(7)].key_sha256,
        "h2",
        "the old key hash is gone"
    );
    assert!(state.service_accounts[&id(7)].last_rotated_at.is_some());
    let delete = OrganizationCommand::DeleteServiceAccount(ServiceAccountRef {
        service_account_id: id(7),
    });
    let events = test()
        .given(given)
        .when(by("adam", delete.clone()))
        .inspect_result()
        .unwrap();
    assert!(matches!(
        events[0],
        OrganizationEvent::ServiceAccountDeleted(_)
    ));
    assert_eq!(
        error_of(acme(), by("adam", delete)),
        OrganizationError::NotFound("service account")
    );
}

#[test]
fn a_service_account_acts_only_within_its_scopes() {
    let given = with(acme(), vec![account_created(vec![Scope::InvitationsWrite])]);
    let account = Actor::ServiceAccount(id(7));
    let invite =
        OrganizationCommand::SendInvitation(send(1, Some("new@example.com"), Role::Member));
    test()
        .given(given.clone())
        .when(command(account.clone(), invite))
        .inspect_result()
        .expect("invitations:write allows inviting");
    let owner_invite =
        OrganizationCommand::SendInvitation(send(2, Some("boss@example.com"), Role::Owner));
    assert_eq!(
        error_of(given.clone(), command(account.clone(), owner_invite)),
        OrganizationError::PermissionDenied
    );
    let remove = OrganizationCommand::RemoveMember(RemoveMember {
        user_id: uid("mia"),
    });
    assert_eq!(
        error_of(given.clone(), command(account.clone(), remove)),
        OrganizationError::PermissionDenied
    );
    let delete = OrganizationCommand::DeleteOrganization(DeleteOrganization {
        confirm_name: "Acme".into(),
    });
    assert_eq!(
        error_of(given.clone(), command(account, delete)),
        OrganizationError::PermissionDenied
    );
    let stranger =
        OrganizationCommand::SendInvitation(send(3, Some("x@example.com"), Role::Member));
    assert_eq!(
        error_of(given, command(Actor::ServiceAccount(id(8)), stranger)),
        OrganizationError::PermissionDenied,
        "another organization's account"
    );
}

/// The key is checked when a request is authenticated and again when its command is
/// decided: a rotation or deletion stored in between leaves nothing done with the old key.
#[test]
fn a_service_account_command_with_a_key_rotated_since_it_was_checked_is_refused() {
    let rotated = OrganizationEvent::ServiceAccountKeyRotated(ServiceAccountKeyRotated {
        service_account_id: id(7),
        key_prefix: "sa_efgh".into(),
        key_sha256: "h2".into(),
        rotated_at: t0(),
    });
    let given = with(
        acme(),
        vec![account_created(vec![Scope::InvitationsWrite]), rotated],
    );
    let account = Actor::ServiceAccount(id(7));
    let invite =
        |n| OrganizationCommand::SendInvitation(send(n, Some("new@example.com"), Role::Member));
    test()
        .given(given.clone())
        .when(command(account.clone(), invite(1)))
        .then_expect_error(OrganizationError::KeyRevoked);
    let without_key = Command::new(account.clone(), t0(), invite(2));
    assert_eq!(
        error_of(given.clone(), without_key),
        OrganizationError::KeyRevoked,
        "a service account's command names the key it was issued with"
    );
    let with_new_key = command(account, invite(3)).with_key_sha256(Some("h2".into()));
    test()
        .given(given)
        .when(with_new_key)
        .inspect_result()
        .expect("the current key opens");
}

#[test]
fn client_restrictions_and_smart_tool_routing_are_settings() {
    let access = ClientAccess {
        default: Access::Block,
        clients: [("cursor".to_owned(), Access::Allow)].into(),
    };
    let events = test()
        .given(acme())
        .when(by(
            "adam",
            OrganizationCommand::SetClientRestrictions(access.clone()),
        ))
        .inspect_result()
        .unwrap();
    assert_eq!(
        events,
        vec![OrganizationEvent::ClientRestrictionsChanged(
            ClientRestrictionsChanged {
                from: ClientAccess::default(),
                to: access.clone()
            }
        )]
    );
    let state = state_after(with(acme(), events));
    assert_eq!(state.client_restrictions, access);
    test()
        .given(acme())
        .when(by("adam", OrganizationCommand::SetSmartToolRouting(true)))
        .then_expect_events(vec![OrganizationEvent::SmartToolRoutingChanged(
            SmartToolRoutingChanged {
                enabled: Change {
                    from: false,
                    to: true,
                },
            },
        )]);
    test()
        .given(acme())
        .when(by("adam", OrganizationCommand::SetSmartToolRouting(false)))
        .then_expect_events(vec![]);
    assert_eq!(
        error_of(
            acme(),
            by("mia", OrganizationCommand::SetSmartToolRouting(true))
        ),
        OrganizationError::PermissionDenied
    );
}

#[test]
fn ai_provider_keys_show_only_their_last_four_characters() {
    let add = OrganizationCommand::AddAiProvider(AddAiProvider {
        provider_id: id(3),
        name: "OpenAI".into(),
        kind: "openai".into(),
        api_key: "sk-secret-test-key-1234".into(),
        enabled: true,
    });
    let events = test()
        .given(acme())
        .when(by("adam", add))
        .inspect_result()
        .unwrap();
    let state = state_after(with(acme(), events.clone()));
    assert_eq!(state.ai_providers[&id(3)].api_key_last4, "1234");
    assert!(
        !format!("{state:?}").contains("sk-secret"),
        "the state never holds the key"
    );
    let update = OrganizationCommand::UpdateAiProvider(UpdateAiProvider {
        provider_id: id(3),
        enabled: Some(false),
        api_key: Some("sk-other-test-key-9999".into()),
    });
    let updated = test()
        .given(with(acme(), events.clone()))
        .when(by("adam", update))
        .inspect_result()
        .unwrap();
    let state = state_after(with(with(acme(), events.clone()), updated));
    assert_eq!(
        (
            state.ai_providers[&id(3)].api_key_last4.as_str(),
            state.ai_providers[&id(3)].enabled
        ),
        ("9999", false)
    );
    // Its last four characters are shown wherever the provider is: at most a quarter of a
    // key of 16 characters, the shortest taken.
    let with_key = |key: &str| {
        OrganizationCommand::AddAiProvider(AddAiProvider {
            provider_id: id(4),
            name: "x".into(),
            kind: "x".into(),
            api_key: key.into(),
            enabled: true,
        })
    };
    for short in ["k", "sk-fifteen-char"] {
        assert_eq!(
            error_of(acme(), by("adam", with_key(short))).code(),
            "validation_failed",
            "{short}"
        );
    }
    test()
        .given(acme())
        .when(by("adam", with_key("sk-sixteen-chars")))
        .inspect_result()
        .unwrap();
    let remove = OrganizationCommand::RemoveAiProvider(AiProviderRef { provider_id: id(3) });
    let removed = test()
        .given(with(acme(), events))
        .when(by("adam", remove))
        .inspect_result()
        .unwrap();
    assert!(matches!(
        removed[0],
        OrganizationEvent::AiProviderRemoved(_)
    ));
}

fn plan(seats: u32) -> OrganizationEvent {
    OrganizationEvent::PlanChanged(PlanChanged {
        plan: Change {
            from: None,
            to: Some("team".into()),
        },
        seats: Change {
            from: None,
            to: Some(seats),
        },
    })
}

#[test]
fn only_owners_change_the_plan_and_seats_cannot_drop_below_use() {
    let change = |seats| {
        OrganizationCommand::ChangePlan(ChangePlan {
            plan: "team".into(),
            seats: Some(seats),
        })
    };
    test()
        .given(acme())
        .when(by("olivia", change(10)))
        .then_expect_events(vec![plan(10)]);
    assert_eq!(
        error_of(acme(), by("adam", change(10))),
        OrganizationError::PermissionDenied
    );
    assert_eq!(
        error_of(acme(), by("olivia", change(3))),
        OrganizationError::SeatLimitReached,
        "four members already"
    );
}

/// A pending invitation holds its seat against a smaller plan; an expired one holds none.
#[test]
fn a_smaller_plan_counts_pending_invitations_not_expired_ones() {
    let change = |seats| {
        OrganizationCommand::ChangePlan(ChangePlan {
            plan: "team".into(),
            seats: Some(seats),
        })
    };
    let mut expired = invitation_sent(2, Some("late@example.com"), Role::Member);
    expired.expires_at = t0() + chrono::Duration::hours(1);
    let given = with(
        acme(),
        vec![
            sent(1, "nina@example.com", Role::Member),
            OrganizationEvent::InvitationSent(expired),
        ],
    );
    let at_day_one = |body| command_at(user("olivia"), days(1), body);
    assert_eq!(
        error_of(given.clone(), at_day_one(change(4))),
        OrganizationError::SeatLimitReached,
        "four members and Nina's pending invitation"
    );
    let state = state_after(given);
    assert!(
        state.decide(&at_day_one(change(5))).is_ok(),
        "the expired invitation holds no seat"
    );
}

/// Someone invited by address who joins through a shareable link instead takes one seat:
/// the invitation to their address, which can no longer be accepted or resent, holds none.
#[test]
fn an_invitation_to_someone_who_joined_by_a_link_holds_no_seat() {
    let link = InvitationSent {
        max_uses: 1,
        ..invitation_sent(2, None, Role::Member)
    };
    let nina_joined_by_the_link = vec![
        OrganizationEvent::InvitationAccepted(InvitationAccepted {
            invitation_id: invitation_id(2),
            user_id: uid("nina"),
            email: "nina@example.com".into(),
            accepted_at: t0(),
        }),
        joined("nina", Role::Member),
    ];
    // Four members, Nina's invitation and the link: the six seats are taken.
    let full = with(
        acme(),
        vec![
            plan(6),
            sent(1, "nina@example.com", Role::Member),
            OrganizationEvent::InvitationSent(link),
        ],
    );
    let invite_bea = || {
        by(
            "adam",
            OrganizationCommand::SendInvitation(send(3, Some("bea@example.com"), Role::Member)),
        )
    };
    assert_eq!(
        error_of(full.clone(), invite_bea()),
        OrganizationError::SeatLimitReached
    );
    let joined = with(full, nina_joined_by_the_link);
    assert_eq!(state_after(joined.clone()).seats_in_use(t0()), 5);
    test()
        .given(joined)
        .when(invite_bea())
        .inspect_result()
        .expect("Nina takes one seat, not two: the sixth is free");
}

#[test]
fn members_plus_pending_invitations_never_exceed_the_seats() {
    let given = with(acme(), vec![plan(5)]);
    test()
        .given(given.clone())
        .when(by(
            "adam",
            OrganizationCommand::SendInvitation(send(1, Some("a@example.com"), Role::Member)),
        ))
        .inspect_result()
        .expect("the fifth seat");
    let full = with(given.clone(), vec![sent(1, "a@example.com", Role::Member)]);
    let error = error_of(
        full,
        by(
            "adam",
            OrganizationCommand::SendInvitation(send(2, Some("b@example.com"), Role::Member)),
        ),
    );
    assert_eq!(
        (error.code(), error.clone()),
        ("seat_limit_reached", OrganizationError::SeatLimitReached)
    );
    let link = SendInvitation {
        max_uses: MaxUses::new("max_uses", 2).unwrap(),
        ..send(3, None, Role::Viewer)
    };
    assert_eq!(
        error_of(given, by("adam", OrganizationCommand::SendInvitation(link))),
        OrganizationError::SeatLimitReached,
        "a link holds its remaining uses"
    );
}

fn organizer() -> OrganizationEvent {
    OrganizationEvent::RoleDefined(RoleDefined {
        key: "organizer".into(),
        name: "Organizer".into(),
        permissions: vec![Permission::ViewOrganization, Permission::InviteMembers],
    })
}

#[test]
fn owners_define_custom_roles_from_grantable_permissions() {
    let define = |key: &str, permissions: Vec<Permission>| {
        OrganizationCommand::DefineRole(DefineRole {
            key: key.into(),
            name: "Organizer".into(),
            permissions,
        })
    };
    test()
        .given(acme())
        .when(by(
            "olivia",
            define(
                "organizer",
                vec![Permission::InviteMembers, Permission::ViewOrganization],
            ),
        ))
        .then_expect_events(vec![organizer()]);
    assert_eq!(
        error_of(acme(), by("adam", define("organizer", vec![]))),
        OrganizationError::PermissionDenied
    );
    for built_in in ["owner", "admin", "member", "viewer"] {
        assert_eq!(
            error_of(acme(), by("olivia", define(built_in, vec![]))).code(),
            "validation_failed",
            "no shadowing of {built_in}"
        );
    }
    // ^[a-z][a-z0-9_]{1,31}$
    for bad in [
        "Bad-Key",
        "a",
        "1st",
        "_lead",
        "lead-er",
        "lead er",
        &"a".repeat(33),
    ] {
        assert_eq!(
            error_of(acme(), by("olivia", define(bad, vec![]))).code(),
            "validation_failed",
            "{bad:?}"
        );
    }
    for good in ["ab", "team_lead_2", &format!("a{}", "b".repeat(31))] {
        let defined = acme_state().decide(&by("olivia", define(good, vec![])));
        assert!(defined.is_ok(), "{good:?}: {defined:?}");
    }
    assert_eq!(
        error_of(
            acme(),
            by("olivia", define("biller", vec![Permission::ManageBilling]))
        )
        .code(),
        "validation_failed",
        "owner-only powers cannot be granted"
    );
    assert_eq!(
        error_of(
            with(acme(), vec![organizer()]),
            by("olivia", define("organizer", vec![]))
        ),
        OrganizationError::RoleExists
    );
    // A blank name is refused as such, whether or not the key is taken.
    let blank = OrganizationCommand::DefineRole(DefineRole {
        key: "organizer".into(),
        name: " ".into(),
        permissions: vec![],
    });
    assert_eq!(
        error_of(with(acme(), vec![organizer()]), by("olivia", blank)).code(),
        "validation_failed"
    );
}

#[test]
fn a_custom_role_grants_exactly_its_permissions() {
    let given = with(
        acme(),
        vec![
            organizer(),
            joined("otis", Role::Custom("organizer".into())),
        ],
    );
    test()
        .given(given.clone())
        .when(by(
            "otis",
            OrganizationCommand::SendInvitation(send(1, Some("x@example.com"), Role::Member)),
        ))
        .inspect_result()
        .expect("organizers invite");
    assert_eq!(
        error_of(
            given.clone(),
            by(
                "otis",
                OrganizationCommand::RemoveMember(RemoveMember {
                    user_id: uid("vic")
                })
            )
        ),
        OrganizationError::PermissionDenied
    );
    assert_eq!(
        error_of(
            given,
            by("otis", OrganizationCommand::SetSmartToolRouting(true))
        ),
        OrganizationError::PermissionDenied
    );
}

/// Custom roles grant powers over roles below owner only: whatever they hold, granting the
/// owner role, inviting with it and changing or removing an owner stay an owner's.
#[test]
fn no_custom_role_reaches_the_owner_role() {
    let people_lead_defined = OrganizationEvent::RoleDefined(RoleDefined {
        key: "people_lead".into(),
        name: "People lead".into(),
        permissions: Permission::GRANTABLE
            .iter()
            .map(|(permission, _)| *permission)
            .collect(),
    });
    let given = with(
        acme(),
        vec![
            people_lead_defined,
            joined("pat", Role::Custom("people_lead".into())),
            joined("otto", Role::Owner),
        ],
    );
    test()
        .given(given.clone())
        .when(by(
            "pat",
            OrganizationCommand::UpdateMember(UpdateMember {
                role: Some(Role::Admin),
                ..UpdateMember::of(uid("mia"))
            }),
        ))
        .then_expect_events(vec![role_changed("mia", Role::Member, Role::Admin)]);
    let refused = [
        (
            "grant the owner role",
            OrganizationCommand::UpdateMember(UpdateMember {
                role: Some(Role::Owner),
                ..UpdateMember::of(uid("mia"))
            }),
        ),
        (
            "invite as owner",
            OrganizationCommand::SendInvitation(send(1, Some("x@example.com"), Role::Owner)),
        ),
        (
            "demote an owner",
            OrganizationCommand::UpdateMember(UpdateMember {
                role: Some(Role::Member),
                ..UpdateMember::of(uid("otto"))
            }),
        ),
        (
            "remove an owner",
            OrganizationCommand::RemoveMember(RemoveMember {
                user_id: uid("otto"),
            }),
        ),
    ];
    for (what, body) in refused {
        assert_eq!(
            error_of(given.clone(), by("pat", body)),
            OrganizationError::PermissionDenied,
            "{what}"
        );
    }
}

/// A narrow grant stays narrow: a custom role or a service account gives no role, and
/// touches no member holding one, that has a power it lacks. Managing members alone does not
/// make an admin, of someone else or of oneself; inviting alone does not invite one.
#[test]
fn nobody_gives_or_touches_a_role_that_reaches_further_than_their_own() {
    let manager = OrganizationEvent::RoleDefined(RoleDefined {
        key: "manager".into(),
        name: "Manager".into(),
        permissions: vec![Permission::ViewOrganization, Permission::ManageMembers],
    });
    let given = with(
        acme(),
        vec![
            manager,
            organizer(),
            joined("max", Role::Custom("manager".into())),
            joined("ora", Role::Custom("organizer".into())),
            account_created(vec![
                Scope::MembersRead,
                Scope::MembersWrite,
                Scope::InvitationsWrite,
            ]),
        ],
    );
    let set_role = |user_id: &str, role: Role| {
        OrganizationCommand::UpdateMember(UpdateMember {
            role: Some(role),
            ..UpdateMember::of(uid(user_id))
        })
    };
    let account = Actor::ServiceAccount(id(7));
    let refused = [
        ("max", "make someone an admin", set_role("mia", Role::Admin)),
        ("max", "make himself an admin", set_role("max", Role::Admin)),
        ("max", "demote an admin", set_role("adam", Role::Member)),
        (
            "max",
            "change an organizer, who may invite",
            set_role("ora", Role::Member),
        ),
        (
            "max",
            "remove an admin",
            OrganizationCommand::RemoveMember(RemoveMember {
                user_id: uid("adam"),
            }),
        ),
        (
            "ora",
            "invite an admin",
            OrganizationCommand::SendInvitation(send(1, Some("x@example.com"), Role::Admin)),
        ),
    ];
    for (actor, what, body) in refused {
        assert_eq!(
            error_of(given.clone(), by(actor, body)),
            OrganizationError::PermissionDenied,
            "{actor}: {what}"
        );
    }
    assert_eq!(
        error_of(
            given.clone(),
            command(account.clone(), set_role("mia", Role::Admin))
        ),
        OrganizationError::PermissionDenied,
        "a service account makes no admin"
    );
    // Within their reach they act as before.
    test()
        .given(given.clone())
        .when(by("max", set_role("mia", Role::Viewer)))
        .then_expect_events(vec![role_changed("mia", Role::Member, Role::Viewer)]);
    test()
        .given(given.clone())
        .when(command(account, set_role("vic", Role::Member)))
        .then_expect_events(vec![role_changed("vic", Role::Viewer, Role::Member)]);
    test()
        .given(given.clone())
        .when(by("adam", set_role("max", Role::Admin)))
        .then_expect_events(vec![role_changed(
            "max",
            Role::Custom("manager".into()),
            Role::Admin,
        )]);
    let invited = test()
        .given(given.clone())
        .when(by(
            "ora",
            OrganizationCommand::SendInvitation(send(1, Some("x@example.com"), Role::Member)),
        ))
        .inspect_result();
    assert!(invited.is_ok(), "{invited:?}");
    // An admin reaches admins, an owner every role; a resend gives the invitation's role anew.
    let state = state_after(with(
        given.clone(),
        vec![
            joined("ada", Role::Admin),
            sent(2, "y@example.com", Role::Admin),
        ],
    ));
    for (actor, body) in [
        ("adam", set_role("ada", Role::Member)),
        ("olivia", set_role("max", Role::Viewer)),
        ("olivia", set_role("mia", Role::Custom("manager".into()))),
    ] {
        let decided = state.decide(&by(actor, body.clone()));
        assert!(decided.is_ok(), "{actor}: {body:?}: {decided:?}");
    }
    let resend = OrganizationCommand::ResendInvitation(ResendInvitation {
        invitation_id: invitation_id(2),
        token_sha256: "hash-3".into(),
    });
    assert_eq!(
        state.decide(&by("ora", resend.clone())),
        Err(OrganizationError::PermissionDenied),
        "an organizer resends no admin's invitation"
    );
    assert!(state.decide(&by("adam", resend)).is_ok());
    let remove_admin = OrganizationCommand::RemoveMember(RemoveMember {
        user_id: uid("ada"),
    });
    assert_eq!(
        state.decide(&command(Actor::ServiceAccount(id(7)), remove_admin)),
        Err(OrganizationError::PermissionDenied),
        "a service account removes no admin"
    );
}

/// A service account's key does all its scopes allow, so it is handed, created or rotated,
/// only to someone who could do all of that: managing service accounts alone does not turn
/// into managing members or reading the audit log through a key.
#[test]
fn a_service_account_key_goes_only_to_someone_holding_its_scopes() {
    let keeper = OrganizationEvent::RoleDefined(RoleDefined {
        key: "keeper".into(),
        name: "Keeper".into(),
        permissions: vec![
            Permission::ViewOrganization,
            Permission::ManageServiceAccounts,
        ],
    });
    let given = with(
        acme(),
        vec![
            keeper,
            joined("kim", Role::Custom("keeper".into())),
            account_created(vec![Scope::MembersRead, Scope::AuditRead]),
        ],
    );
    let create = |scopes: Vec<Scope>| {
        OrganizationCommand::CreateServiceAccount(CreateServiceAccount {
            service_account_id: id(8),
            name: "deploy".into(),
            description: None,
            scopes,
            key_prefix: "sa_efgh".into(),
            key_sha256: "h2".into(),
        })
    };
    let rotate = OrganizationCommand::RotateServiceAccountKey(RotateServiceAccountKey {
        service_account_id: id(7),
        key_prefix: "sa_ijkl".into(),
        key_sha256: "h3".into(),
    });
    let state = state_after(given);
    for body in [
        create(vec![Scope::MembersRead, Scope::MembersWrite]),
        create(vec![Scope::AuditRead]),
        rotate.clone(),
    ] {
        assert_eq!(
            state.decide(&by("kim", body.clone())),
            Err(OrganizationError::PermissionDenied),
            "{body:?}"
        );
    }
    assert!(state
        .decide(&by("kim", create(vec![Scope::MembersRead])))
        .is_ok());
    for body in [
        create(vec![
            Scope::MembersWrite,
            Scope::AuditRead,
            Scope::ExportRead,
        ]),
        rotate,
    ] {
        let decided = state.decide(&by("adam", body.clone()));
        assert!(decided.is_ok(), "an admin: {body:?}: {decided:?}");
    }
}

#[test]
fn a_custom_role_is_assignable_once_defined_and_deletable_only_when_unused() {
    let to_organizer = OrganizationCommand::UpdateMember(UpdateMember {
        role: Some(Role::Custom("organizer".into())),
        ..UpdateMember::of(uid("mia"))
    });
    assert_eq!(
        error_of(acme(), by("adam", to_organizer.clone())).code(),
        "validation_failed",
        "undefined role"
    );
    let given = with(acme(), vec![organizer()]);
    let events = test()
        .given(given.clone())
        .when(by("adam", to_organizer))
        .inspect_result()
        .unwrap();
    let delete = OrganizationCommand::DeleteRole(RoleRef {
        key: "organizer".into(),
    });
    assert_eq!(
        error_of(with(given.clone(), events), by("olivia", delete.clone())),
        OrganizationError::RoleInUse
    );
    test()
        .given(given)
        .when(by("olivia", delete))
        .then_expect_events(vec![OrganizationEvent::RoleDeleted(RoleDeleted {
            key: "organizer".into(),
        })]);
}

/// A built-in role is listed beside the custom ones but is no custom role: deleting it is
/// refused as such, for an owner, while an unknown key is not found.
#[test]
fn deleting_a_built_in_role_is_refused_as_built_in_not_as_unknown() {
    for key in ["owner", "admin", "member", "viewer"] {
        let refused = error_of(
            acme(),
            by(
                "olivia",
                OrganizationCommand::DeleteRole(RoleRef { key: key.into() }),
            ),
        );
        assert_eq!(
            refused,
            OrganizationError::validation("key", "is a built-in role, which cannot be deleted"),
            "{key}"
        );
    }
    assert_eq!(
        error_of(
            acme(),
            by(
                "olivia",
                OrganizationCommand::DeleteRole(RoleRef {
                    key: "organizer".into()
                })
            )
        ),
        OrganizationError::NotFound("role")
    );
}

/// A custom role is usable wherever a role is: an invitation with it makes a member holding
/// it, an undefined one is refused, and a pending invitation keeps its role in use. Only an
/// owner resends an invitation to be an owner.
#[test]
fn an_invitation_gives_a_custom_role_and_keeps_it_in_use() {
    let as_organizer = |n| {
        OrganizationCommand::SendInvitation(send(
            n,
            Some("nina@example.com"),
            Role::Custom("organizer".into()),
        ))
    };
    assert_eq!(
        error_of(acme(), by("adam", as_organizer(1))).code(),
        "validation_failed",
        "undefined role"
    );
    let given = with(acme(), vec![organizer()]);
    let sent_events = test()
        .given(given.clone())
        .when(by("adam", as_organizer(1)))
        .inspect_result()
        .unwrap();
    let pending = with(given, sent_events);
    assert_eq!(
        error_of(
            pending.clone(),
            by(
                "olivia",
                OrganizationCommand::DeleteRole(RoleRef {
                    key: "organizer".into()
                })
            )
        ),
        OrganizationError::RoleInUse,
        "a pending invitation uses it"
    );
    let events = state_after(pending)
        .decide(&command_at(
            user("nina"),
            days(1),
            OrganizationCommand::AcceptInvitation(accept("hash-1", "nina", "nina@example.com")),
        ))
        .unwrap();
    let Some(OrganizationEvent::MemberJoined(joined)) = events.last() else {
        panic!("{events:?}")
    };
    assert_eq!(joined.role, Role::Custom("organizer".into()));

    let to_owner = with(acme(), vec![sent(1, "otto@example.com", Role::Owner)]);
    let resend = OrganizationCommand::ResendInvitation(ResendInvitation {
        invitation_id: invitation_id(1),
        token_sha256: "hash-2".into(),
    });
    assert_eq!(
        error_of(to_owner.clone(), by("adam", resend.clone())),
        OrganizationError::PermissionDenied
    );
    assert!(state_after(to_owner).decide(&by("olivia", resend)).is_ok());
}

/// The state's collections are persistent maps: a command copies the state in constant time
/// and applies its events to the copy, and the copy a cache holds must not see them.
#[test]
fn a_copy_of_the_state_is_unchanged_by_events_applied_to_the_original() {
    let in_group = OrganizationEvent::GroupMemberAdded(GroupMemberAdded {
        group_id: id(1),
        user_id: uid("mia"),
    });
    let mut state = state_after(with(acme(), vec![group_created(1, "Eng"), in_group]));
    let before = state.clone();
    for event in [
        OrganizationEvent::MemberRoleChanged(MemberRoleChanged {
            user_id: uid("mia"),
            from: Role::Member,
            to: Role::Admin,
        }),
        OrganizationEvent::GroupDeleted(GroupDeleted { group_id: id(1) }),
        joined("noah", Role::Member),
    ] {
        cqrs_es::Aggregate::apply(&mut state, event);
    }
    assert_eq!(before.members[&uid("mia")].role, Role::Member);
    assert_eq!(before.members[&uid("mia")].group_ids, vec![id(1)]);
    assert!(!before.members.contains_key(&uid("noah")));
    assert!(before.groups[&id(1)].member_ids.contains(&uid("mia")));
    assert_eq!(state.members[&uid("mia")].role, Role::Admin);
    assert!(state.members[&uid("mia")].group_ids.is_empty());
    assert_eq!(state.members.len(), before.members.len() + 1);
    assert!(state.groups.is_empty());
}

/// Snapshots store the state as JSON: its collections serialize exactly as the `BTreeMap`s
/// they were before they became persistent maps, and read back from that shape, so
/// snapshots written before still load and those written now load in older code.
#[test]
fn the_state_keeps_the_json_shape_its_snapshots_were_written_in() {
    let state = state_after(with(acme(), vec![group_created(1, "Eng")]));
    let json = serde_json::to_value(&state).unwrap();
    let members: std::collections::BTreeMap<UserId, Member> =
        state.members.clone().into_iter().collect();
    let groups: std::collections::BTreeMap<Uuid, Group> =
        state.groups.clone().into_iter().collect();
    assert_eq!(json["members"], serde_json::to_value(&members).unwrap());
    assert_eq!(json["groups"], serde_json::to_value(&groups).unwrap());
    let old_shape = serde_json::to_string(&json).unwrap();
    let loaded: Organization = serde_json::from_str(&old_shape).unwrap();
    assert_eq!(loaded, state);
}

/// A snapshot written before states named their rules reads as derived under the first
/// ones, so a load knows to replay its events; a state built now names the current rules.
#[test]
fn a_state_names_the_rules_it_was_derived_under() {
    let state = state_after(acme());
    assert_eq!(state.rules, StateRules::CURRENT);
    let mut json = serde_json::to_value(&state).unwrap();
    json.as_object_mut().unwrap().remove("rules");
    let older: Organization = serde_json::from_value(json).unwrap();
    assert_eq!(older.rules, StateRules(1));
    assert_ne!(older.rules, StateRules::CURRENT);
}

/// Each command the permission table governs, by the permission it takes: what the table
/// test below sends, on the organization `table_organization` builds.
fn commands_by_permission() -> Vec<(Permission, OrganizationCommand)> {
    use OrganizationCommand as C;
    use Permission as P;
    vec![
        (
            P::InviteMembers,
            C::SendInvitation(send(2, Some("new@example.com"), Role::Member)),
        ),
        (
            P::InviteMembers,
            C::ResendInvitation(ResendInvitation {
                invitation_id: invitation_id(1),
                token_sha256: "hash-9".into(),
            }),
        ),
        (
            P::InviteMembers,
            C::RevokeInvitation(RevokeInvitation {
                invitation_id: invitation_id(1),
            }),
        ),
        (
            P::ManageMembers,
            C::UpdateMember(UpdateMember {
                role: Some(Role::Viewer),
                ..UpdateMember::of(uid("max"))
            }),
        ),
        (
            P::ManageMembers,
            C::RemoveMember(RemoveMember {
                user_id: uid("max"),
            }),
        ),
        (
            P::ManageGroups,
            C::CreateGroup(CreateGroup {
                group_id: id(2),
                name: "Ops".into(),
                description: None,
            }),
        ),
        (
            P::ManageGroups,
            C::UpdateGroup(UpdateGroup {
                group_id: id(1),
                name: Some("Platform".into()),
                description: None,
            }),
        ),
        (
            P::ManageGroups,
            C::DeleteGroup(GroupRef { group_id: id(1) }),
        ),
        (
            P::ManageGroups,
            C::AddGroupMember(GroupMembership {
                group_id: id(1),
                user_id: uid("vic"),
            }),
        ),
        (
            P::ManageGroups,
            C::RemoveGroupMember(GroupMembership {
                group_id: id(1),
                user_id: uid("mia"),
            }),
        ),
        (
            P::ManageServiceAccounts,
            C::CreateServiceAccount(CreateServiceAccount {
                service_account_id: id(8),
                name: "deploy".into(),
                description: None,
                scopes: vec![Scope::MembersRead],
                key_prefix: "sa_efgh".into(),
                key_sha256: "h2".into(),
            }),
        ),
        (
            P::ManageServiceAccounts,
            C::RotateServiceAccountKey(RotateServiceAccountKey {
                service_account_id: id(7),
                key_prefix: "sa_ijkl".into(),
                key_sha256: "h3".into(),
            }),
        ),
        (
            P::ManageServiceAccounts,
            C::DeleteServiceAccount(ServiceAccountRef {
                service_account_id: id(7),
            }),
        ),
        (
            P::ManageSettings,
            C::UpdateOrganization(UpdateOrganization {
                name: Some(OrganizationName::parse("name", "Acme 2").unwrap()),
                ..Default::default()
            }),
        ),
        (
            P::ManageSettings,
            C::SetClientRestrictions(ClientAccess {
                default: Access::Block,
                clients: Default::default(),
            }),
        ),
        (P::ManageSettings, C::SetSmartToolRouting(true)),
        (
            P::ManageSettings,
            C::AddAiProvider(AddAiProvider {
                provider_id: id(10),
                name: "Second".into(),
                kind: "openai".into(),
                api_key: Secret::from("sk-second-test-key-5678".to_owned()),
                enabled: true,
            }),
        ),
        (
            P::ManageSettings,
            C::UpdateAiProvider(UpdateAiProvider {
                provider_id: id(9),
                enabled: Some(false),
                api_key: None,
            }),
        ),
        (
            P::ManageSettings,
            C::RemoveAiProvider(AiProviderRef { provider_id: id(9) }),
        ),
        (
            P::ManageBilling,
            C::ChangePlan(ChangePlan {
                plan: "team".into(),
                seats: Some(20),
            }),
        ),
        (
            P::TransferOwnership,
            C::TransferOwnership(TransferOwnership {
                new_owner_id: uid("adam"),
            }),
        ),
        (
            P::DeleteOrganization,
            C::DeleteOrganization(DeleteOrganization {
                confirm_name: "Acme".into(),
            }),
        ),
        (
            P::ManageRoles,
            C::DefineRole(DefineRole {
                key: "reader".into(),
                name: "Reader".into(),
                permissions: vec![Permission::ReadAudit],
            }),
        ),
        (
            P::ManageRoles,
            C::DeleteRole(RoleRef {
                key: "organizer".into(),
            }),
        ),
    ]
}

/// Acme with a second member (Max, whom the members' commands are about), a group (Mia in
/// it), a service account, an AI provider, a pending invitation and an unused custom role:
/// every command of `commands_by_permission` has its object.
fn table_organization() -> Vec<OrganizationEvent> {
    with(
        acme(),
        vec![
            joined("max", Role::Member),
            group_created(1, "Eng"),
            OrganizationEvent::GroupMemberAdded(GroupMemberAdded {
                group_id: id(1),
                user_id: uid("mia"),
            }),
            account_created(vec![Scope::MembersRead]),
            OrganizationEvent::AiProviderAdded(AiProviderAdded {
                provider_id: id(9),
                name: "Main".into(),
                kind: "openai".into(),
                enabled: true,
                api_key: Secret::from("sk-main-1234".to_owned()),
                api_key_last4: "1234".into(),
            }),
            sent(1, "nina@example.com", Role::Member),
            organizer(),
        ],
    )
}

/// Decides every command of the table as `actor` on `given`: allowed exactly when `holds`
/// the command's permission, refused with `permission_denied` otherwise.
fn assert_allowed_exactly(
    given: &[OrganizationEvent],
    actor: Actor,
    holds: impl Fn(Permission) -> bool,
    who: &str,
) {
    let state = state_after(given.to_vec());
    for (permission, body) in commands_by_permission() {
        let decided = state.decide(&command(actor.clone(), body.clone()));
        // What the HTTP edge asks before judging a body's values agrees with the decision.
        assert_eq!(
            state.may_issue(&actor, permission).is_ok(),
            holds(permission),
            "{who} may issue what takes {permission:?}"
        );
        if holds(permission) {
            assert!(decided.is_ok(), "{who} may {body:?}: {decided:?}");
        } else {
            assert_eq!(
                decided,
                Err(OrganizationError::PermissionDenied),
                "{who} may not {body:?}"
            );
        }
    }
}

/// The contract's permission table, command by command: owners do everything; admins all
/// but billing, ownership transfer, deletion and roles; members and viewers none of it. A
/// custom role holding one grantable permission, and a service account holding one scope,
/// do exactly that permission's commands.
#[test]
fn the_permission_table_holds_for_every_command() {
    let given = table_organization();
    let owner_only = |p: Permission| {
        matches!(
            p,
            Permission::ManageBilling
                | Permission::TransferOwnership
                | Permission::DeleteOrganization
                | Permission::ManageRoles
        )
    };
    assert_allowed_exactly(&given, user("olivia"), |_| true, "an owner");
    assert_allowed_exactly(&given, user("adam"), |p| !owner_only(p), "an admin");
    assert_allowed_exactly(&given, user("mia"), |_| false, "a member");
    assert_allowed_exactly(&given, user("vic"), |_| false, "a viewer");
    for (granted, name) in Permission::GRANTABLE {
        let role = OrganizationEvent::RoleDefined(RoleDefined {
            key: "solo".into(),
            name: "Solo".into(),
            permissions: vec![Permission::ViewOrganization, granted],
        });
        let given = with(
            table_organization(),
            vec![role, joined("cara", Role::Custom("solo".into()))],
        );
        assert_allowed_exactly(&given, user("cara"), |p| p == granted, name);
    }
    for scope in [
        Scope::MembersWrite,
        Scope::InvitationsWrite,
        Scope::GroupsWrite,
        Scope::SettingsWrite,
        Scope::AuditRead,
    ] {
        let mut given = table_organization();
        given.push(OrganizationEvent::ServiceAccountCreated(
            ServiceAccountCreated {
                service_account_id: id(11),
                name: "scoped".into(),
                description: None,
                scopes: vec![Scope::MembersRead, scope],
                key_prefix: "sa_mnop".into(),
                key_sha256: ACCOUNT_KEY_SHA256.into(),
                created_at: t0(),
            },
        ));
        let granted = match scope {
            Scope::MembersWrite => Some(Permission::ManageMembers),
            Scope::InvitationsWrite => Some(Permission::InviteMembers),
            Scope::GroupsWrite => Some(Permission::ManageGroups),
            Scope::SettingsWrite => Some(Permission::ManageSettings),
            _ => None,
        };
        assert_allowed_exactly(
            &given,
            Actor::ServiceAccount(id(11)),
            |p| Some(p) == granted,
            &format!("a service account with {scope:?}"),
        );
    }
}

/// Before any value of a command is read, a caller is refused as `decide` refuses it: a
/// stranger to a deleted organization learns nothing, a member is told it is deleted,
/// `system` must name a user, and an organization never created is not found.
#[test]
fn who_may_issue_a_command_is_decided_before_its_values() {
    let live = state_after(acme());
    assert_eq!(
        live.may_issue(&Actor::System, Permission::ManageSettings),
        Err(OrganizationError::ActorRequired)
    );
    assert_eq!(
        live.may_issue(&user("stranger"), Permission::ManageSettings),
        Err(OrganizationError::PermissionDenied)
    );
    let gone = state_after(with(acme(), vec![deleted()]));
    assert_eq!(
        gone.may_issue(&user("olivia"), Permission::ManageSettings),
        Err(OrganizationError::OrganizationDeleted)
    );
    assert_eq!(
        gone.may_issue(&user("stranger"), Permission::ManageSettings),
        Err(OrganizationError::PermissionDenied)
    );
    assert_eq!(
        Organization::default().may_issue(&user("olivia"), Permission::ManageSettings),
        Err(OrganizationError::NotFound("organization"))
    );
}
