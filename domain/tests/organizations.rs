//! Organization lifecycle: create, update, delete, restore, purge, transfer ownership.

mod support;

use orgledger_domain::*;
use support::*;

fn create(actor: Actor, owner: &str) -> Command {
    command(
        actor,
        OrganizationCommand::CreateOrganization(CreateOrganization {
            organization_id: org_id(),
            name: OrganizationName::parse("name", "Acme").unwrap(),
            slug: Slug::parse("slug", "acme").unwrap(),
            kind: OrganizationKind::Team,
            owner: NewMember {
                user_id: uid(owner),
                email: Some(email(&format!("{owner}@example.com"))),
                first_name: None,
                last_name: None,
            },
        }),
    )
}

#[test]
fn creating_an_organization_makes_the_creator_its_first_owner() {
    test()
        .given_no_previous_events()
        .when(create(user("olivia"), "olivia"))
        .then_expect_events(vec![created(), joined("olivia", Role::Owner)]);
}

#[test]
fn system_may_create_an_organization_for_a_named_owner() {
    test()
        .given_no_previous_events()
        .when(create(Actor::System, "olivia"))
        .then_expect_events(vec![created(), joined("olivia", Role::Owner)]);
}

#[test]
fn a_user_cannot_create_an_organization_owned_by_someone_else() {
    let error = error_of(vec![], create(user("mallory"), "olivia"));
    assert_eq!(error.code(), "validation_failed");
}

#[test]
fn an_owner_name_with_a_control_character_is_refused_at_creation() {
    for (first_name, last_name, field) in [
        (Some("Ol\u{0}ivia"), None, "owner.first_name"),
        (None, Some("Smith\n"), "owner.last_name"),
        (Some(&*"x".repeat(201)), None, "owner.first_name"),
    ] {
        let mut command = create(user("olivia"), "olivia");
        let OrganizationCommand::CreateOrganization(create) = &mut command.body else {
            unreachable!("a create command")
        };
        create.owner.first_name = first_name.map(str::to_owned);
        create.owner.last_name = last_name.map(str::to_owned);
        let OrganizationError::Validation(problems) = error_of(vec![], command) else {
            panic!("{field}: a validation error expected")
        };
        assert_eq!(problems[0].field, field);
    }
}

/// "Acme\u{202E}moc.live" shows as "Acmeevil.com" wherever the name is shown: a new name,
/// owner id or owner name that reorders the text around it is refused; right-to-left ones
/// are not.
#[test]
fn an_organization_or_owner_that_would_show_as_another_is_refused_at_creation() {
    type Edit = dyn Fn(&mut CreateOrganization);
    let creating = |change: &Edit| {
        let mut command = create(Actor::System, "olivia");
        let OrganizationCommand::CreateOrganization(create) = &mut command.body else {
            unreachable!("a create command")
        };
        change(create);
        command
    };
    let refusals: [(&Edit, &str); 3] = [
        (
            &|c| c.name = OrganizationName::parse("name", "Acme\u{202E}moc.live").unwrap(),
            "name",
        ),
        (&|c| c.owner.user_id = uid("r\u{2066}x"), "owner.user_id"),
        (
            &|c| c.owner.last_name = Some("Smith\u{202D}".into()),
            "owner.last_name",
        ),
    ];
    for (change, field) in refusals {
        let OrganizationError::Validation(problems) = error_of(vec![], creating(change)) else {
            panic!("{field}: a validation error expected")
        };
        assert_eq!(problems[0].field, field);
        assert!(
            problems[0].message.contains("text-direction"),
            "{problems:?}"
        );
    }
    let arabic = creating(&|c| {
        c.name = OrganizationName::parse("name", "شركة أكمي").unwrap();
        c.owner.last_name = Some("O\u{200F}".into());
    });
    let (
        OrganizationEvent::OrganizationCreated(mut created),
        OrganizationEvent::MemberJoined(mut owner),
    ) = (created(), joined("olivia", Role::Owner))
    else {
        unreachable!("a creation and a joining")
    };
    created.name = "شركة أكمي".into();
    owner.last_name = Some("O\u{200F}".into());
    test()
        .given_no_previous_events()
        .when(arabic)
        .then_expect_events(vec![
            OrganizationEvent::OrganizationCreated(created),
            OrganizationEvent::MemberJoined(owner),
        ]);
}

/// A name held before the rule, sent back unchanged (a client PATCHing the whole
/// organization), is no change; a new one is judged.
#[test]
fn only_a_new_organization_name_is_judged_for_text_direction_characters() {
    let held = "Old\u{202E}Name";
    let mut history = acme();
    history.push(OrganizationEvent::OrganizationUpdated(
        OrganizationUpdated {
            name: Some(Change {
                from: "Acme".into(),
                to: held.into(),
            }),
            ..Default::default()
        },
    ));
    let rename = |name: &str| {
        command(
            user("olivia"),
            update(UpdateOrganization {
                name: Some(OrganizationName::parse("name", name).unwrap()),
                ..Default::default()
            }),
        )
    };
    test()
        .given(history.clone())
        .when(rename(held))
        .then_expect_events(vec![]);
    assert_eq!(
        error_of(history, rename("New\u{202E}Name")).code(),
        "validation_failed"
    );
}

#[test]
fn an_organization_cannot_be_created_twice() {
    let error = error_of(acme(), create(user("olivia"), "olivia"));
    assert_eq!(error, OrganizationError::AlreadyExists);
}

#[test]
fn commands_on_an_unknown_organization_are_not_found() {
    let error = error_of(
        vec![],
        command(user("olivia"), OrganizationCommand::LeaveOrganization),
    );
    assert_eq!(error, OrganizationError::NotFound("organization"));
}

fn update(patch: UpdateOrganization) -> OrganizationCommand {
    OrganizationCommand::UpdateOrganization(patch)
}

#[test]
fn an_admin_renames_the_organization_and_the_event_holds_from_and_to() {
    let patch = UpdateOrganization {
        name: Some(OrganizationName::parse("name", "Acme Inc").unwrap()),
        default_invite_expiry_days: Some(ExpiryDays::new("d", 14).unwrap()),
        ..Default::default()
    };
    test()
        .given(acme())
        .when(command(user("adam"), update(patch)))
        .then_expect_events(vec![OrganizationEvent::OrganizationUpdated(
            OrganizationUpdated {
                name: Some(Change {
                    from: "Acme".into(),
                    to: "Acme Inc".into(),
                }),
                default_invite_expiry_days: Some(Change { from: 7, to: 14 }),
                ..Default::default()
            },
        )]);
}

#[test]
fn an_update_that_changes_nothing_appends_nothing() {
    let patch = UpdateOrganization {
        name: Some(OrganizationName::parse("name", "Acme").unwrap()),
        timezone: Some("UTC".into()),
        ..Default::default()
    };
    test()
        .given(acme())
        .when(command(user("adam"), update(patch)))
        .then_expect_events(vec![]);
}

#[test]
fn members_and_viewers_cannot_change_settings() {
    for who in ["mia", "vic", "stranger"] {
        let patch = UpdateOrganization {
            workflow_mode: Some(WorkflowMode::Founder),
            ..Default::default()
        };
        let error = error_of(acme(), command(user(who), update(patch)));
        assert_eq!(error, OrganizationError::PermissionDenied, "{who}");
    }
}

#[test]
fn system_needs_an_actor_for_anything_but_create() {
    let patch = UpdateOrganization {
        workflow_mode: Some(WorkflowMode::Founder),
        ..Default::default()
    };
    let error = error_of(acme(), command(Actor::System, update(patch)));
    assert_eq!(error, OrganizationError::ActorRequired);
    assert_eq!(error.code(), "actor_required");
}

#[test]
fn malformed_logo_urls_and_timezones_are_validation_errors() {
    let bad_logo = UpdateOrganization {
        logo_url: Some(Some("javascript:alert(1)".into())),
        ..Default::default()
    };
    assert_eq!(
        error_of(acme(), command(user("adam"), update(bad_logo))).code(),
        "validation_failed"
    );
    // Shown beside the logo's address, an override would reorder what follows it.
    assert_eq!(
        error_of(acme(), logo("https://x.example/\u{202E}gnp.exe")).code(),
        "validation_failed"
    );
    let bad_zone = UpdateOrganization {
        timezone: Some("Mars Base; DROP".into()),
        ..Default::default()
    };
    assert_eq!(
        error_of(acme(), command(user("adam"), update(bad_zone))).code(),
        "validation_failed"
    );
}

fn logo(url: &str) -> Command {
    command(
        user("adam"),
        update(UpdateOrganization {
            logo_url: Some(Some(url.into())),
            ..Default::default()
        }),
    )
}

#[test]
fn a_logo_url_needs_an_http_scheme_and_a_host_and_may_carry_a_port() {
    for good in [
        "https://cdn.example.com/logo.png",
        "HTTPS://Example.com",
        "http://localhost:8080/logo.svg?v=2#top",
        "https://[2001:db8::1]:8443/logo.png",
        "https://bücher.example/logo.png",
        "https://example.com/logo.png?signed_by=a@b",
        "https://my_cdn.example.com/logo.png",
        "https://example.com:/logo.png",
    ] {
        let events = test()
            .given(acme())
            .when(logo(good))
            .inspect_result()
            .unwrap_or_else(|error| panic!("{good:?}: {error:?}"));
        assert_eq!(events.len(), 1, "{good:?}");
    }
    for bad in [
        "javascript:alert(1)",
        "https://",
        "http:///logo.png",
        "https://:443/logo.png",
        "https://example.com:99999/logo.png",
        "https://example.com:+80/logo.png",
        "https://exa mple.com/logo.png",
        "https://[zz]/logo.png",
        "https://[::1]x/logo.png",
        "ftp://example.com/logo.png",
    ] {
        assert_eq!(
            error_of(acme(), logo(bad)),
            OrganizationError::validation(
                "logo_url",
                "must be an absolute http(s) URL with a host, of at most 2048 characters"
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn a_logo_url_that_carries_a_user_name_or_password_is_refused() {
    for secret in [
        "https://user:hunter2@cdn.example.com/logo.png",
        "https://token@cdn.example.com/logo.png",
        "http://:hunter2@cdn.example.com",
    ] {
        assert_eq!(
            error_of(acme(), logo(secret)),
            OrganizationError::validation("logo_url", "must not carry a user name or password"),
            "{secret:?}"
        );
    }
}

#[test]
fn a_logo_url_stored_under_older_rules_may_be_sent_back_unchanged() {
    let old = "https://user:hunter2@cdn.example.com/logo.png";
    let stored = OrganizationEvent::OrganizationUpdated(OrganizationUpdated {
        logo_url: Some(Change {
            from: None,
            to: Some(old.into()),
        }),
        ..Default::default()
    });
    let mut given = acme();
    given.push(stored);
    let resent = UpdateOrganization {
        logo_url: Some(Some(old.into())),
        timezone: Some("Europe/Paris".into()),
        ..Default::default()
    };
    let events = test()
        .given(given.clone())
        .when(command(user("adam"), update(resent)))
        .inspect_result()
        .expect("an unchanged value is no change to judge");
    assert_eq!(events.len(), 1);
    // A new value is judged as ever.
    assert_eq!(
        error_of(given, logo("https://other:pw@cdn.example.com/logo.png")).code(),
        "validation_failed"
    );
}

fn delete(confirm: &str) -> OrganizationCommand {
    OrganizationCommand::DeleteOrganization(DeleteOrganization {
        confirm_name: confirm.into(),
    })
}

#[test]
fn an_owner_soft_deletes_with_a_thirty_day_restore_window() {
    test()
        .given(acme())
        .when(command(user("olivia"), delete("Acme")))
        .then_expect_events(vec![deleted()]);
}

#[test]
fn deleting_needs_the_exact_name() {
    let error = error_of(acme(), command(user("olivia"), delete("acme")));
    assert_eq!(error, OrganizationError::ConfirmationMismatch);
}

#[test]
fn only_an_owner_may_delete() {
    let error = error_of(acme(), command(user("adam"), delete("Acme")));
    assert_eq!(error, OrganizationError::PermissionDenied);
}

/// Every command but create, restore and purge: what a deleted organization refuses.
fn every_other_command() -> Vec<OrganizationCommand> {
    let some_id = uuid::Uuid::from_u128(7);
    let member = |user_id: &str| UpdateMember {
        role: Some(Role::Viewer),
        ..UpdateMember::of(uid(user_id))
    };
    vec![
        OrganizationCommand::UpdateOrganization(UpdateOrganization {
            workflow_mode: Some(WorkflowMode::Founder),
            ..Default::default()
        }),
        delete("Acme"),
        OrganizationCommand::TransferOwnership(TransferOwnership {
            new_owner_id: uid("adam"),
        }),
        OrganizationCommand::SendInvitation(send(1, Some("new@example.com"), Role::Member)),
        OrganizationCommand::ResendInvitation(ResendInvitation {
            invitation_id: invitation_id(1),
            token_sha256: "hash-2".into(),
        }),
        OrganizationCommand::RevokeInvitation(RevokeInvitation {
            invitation_id: invitation_id(1),
        }),
        OrganizationCommand::UpdateMember(member("mia")),
        OrganizationCommand::RemoveMember(RemoveMember {
            user_id: uid("mia"),
        }),
        OrganizationCommand::LeaveOrganization,
        OrganizationCommand::CreateGroup(CreateGroup {
            group_id: some_id,
            name: "Eng".into(),
            description: None,
        }),
        OrganizationCommand::UpdateGroup(UpdateGroup {
            group_id: some_id,
            name: Some("Ops".into()),
            description: None,
        }),
        OrganizationCommand::DeleteGroup(GroupRef { group_id: some_id }),
        OrganizationCommand::AddGroupMember(GroupMembership {
            group_id: some_id,
            user_id: uid("mia"),
        }),
        OrganizationCommand::RemoveGroupMember(GroupMembership {
            group_id: some_id,
            user_id: uid("mia"),
        }),
        OrganizationCommand::CreateServiceAccount(CreateServiceAccount {
            service_account_id: some_id,
            name: "ci".into(),
            description: None,
            scopes: vec![Scope::MembersRead],
            key_prefix: "sa_1234".into(),
            key_sha256: "hash-sa".into(),
        }),
        OrganizationCommand::RotateServiceAccountKey(RotateServiceAccountKey {
            service_account_id: some_id,
            key_prefix: "sa_5678".into(),
            key_sha256: "hash-sa-2".into(),
        }),
        OrganizationCommand::DeleteServiceAccount(ServiceAccountRef {
            service_account_id: some_id,
        }),
        OrganizationCommand::SetClientRestrictions(ClientAccess::default()),
        OrganizationCommand::SetSmartToolRouting(true),
        OrganizationCommand::AddAiProvider(AddAiProvider {
            provider_id: some_id,
            name: "Main".into(),
            kind: "openai".into(),
            api_key: Secret::from("sk-test-provider-key-1234".to_owned()),
            enabled: true,
        }),
        OrganizationCommand::UpdateAiProvider(UpdateAiProvider {
            provider_id: some_id,
            enabled: Some(false),
            api_key: None,
        }),
        OrganizationCommand::RemoveAiProvider(AiProviderRef {
            provider_id: some_id,
        }),
        OrganizationCommand::ChangePlan(ChangePlan {
            plan: "team".into(),
            seats: Some(10),
        }),
        OrganizationCommand::DefineRole(DefineRole {
            key: "organizer".into(),
            name: "Organizer".into(),
            permissions: vec![Permission::InviteMembers],
        }),
        OrganizationCommand::DeleteRole(RoleRef {
            key: "organizer".into(),
        }),
    ]
}

/// Whatever the command and whoever in the organization asks, a deleted organization says
/// it is deleted; an invitee holding its token is told so too. Someone with no standing
/// there is refused as on a live organization, and learns nothing of its deletion.
#[test]
fn a_deleted_organization_refuses_every_command_and_tells_only_those_with_standing() {
    let mut given = acme();
    given.push(sent(1, "nina@example.com", Role::Member));
    given.push(deleted());
    for body in every_other_command() {
        for actor in ["olivia", "adam", "mia", "vic"] {
            let error = error_of(given.clone(), command(user(actor), body.clone()));
            assert_eq!(
                error,
                OrganizationError::OrganizationDeleted,
                "{actor}: {body:?}"
            );
        }
        let error = error_of(given.clone(), command(user("stranger"), body.clone()));
        assert_eq!(error, OrganizationError::PermissionDenied, "{body:?}");
    }
    let accept =
        OrganizationCommand::AcceptInvitation(accept("hash-1", "nina", "nina@example.com"));
    assert_eq!(
        error_of(given, command(user("nina"), accept)),
        OrganizationError::OrganizationDeleted
    );
}

#[test]
fn an_owner_restores_within_the_window() {
    let mut given = acme();
    given.push(deleted());
    test()
        .given(given)
        .when(command_at(
            user("olivia"),
            days(29),
            OrganizationCommand::RestoreOrganization,
        ))
        .then_expect_events(vec![OrganizationEvent::OrganizationRestored(
            OrganizationRestored {
                restored_at: days(29),
            },
        )]);
}

#[test]
fn restoring_after_thirty_days_is_refused() {
    let mut given = acme();
    given.push(deleted());
    let error = error_of(
        given,
        command_at(
            user("olivia"),
            days(30),
            OrganizationCommand::RestoreOrganization,
        ),
    );
    assert_eq!(error, OrganizationError::RestoreWindowElapsed);
}

#[test]
fn restoring_an_active_organization_is_refused() {
    let error = error_of(
        acme(),
        command(user("olivia"), OrganizationCommand::RestoreOrganization),
    );
    assert_eq!(error, OrganizationError::OrganizationNotDeleted);
}

#[test]
fn an_admin_cannot_restore() {
    let mut given = acme();
    given.push(deleted());
    let error = error_of(
        given,
        command(user("adam"), OrganizationCommand::RestoreOrganization),
    );
    assert_eq!(error, OrganizationError::PermissionDenied);
}

fn purge(confirm: &str) -> OrganizationCommand {
    OrganizationCommand::PurgeOrganization(PurgeOrganization {
        confirm_name: confirm.into(),
    })
}

fn purged(at: chrono::DateTime<chrono::Utc>) -> OrganizationEvent {
    OrganizationEvent::OrganizationPurged(OrganizationPurged { purged_at: at })
}

#[test]
fn an_owner_force_deletes_an_active_organization() {
    test()
        .given(acme())
        .when(command(user("olivia"), purge("Acme")))
        .then_expect_events(vec![purged(t0())]);
}

#[test]
fn only_an_owner_may_purge() {
    for actor in ["adam", "mia"] {
        let error = error_of(acme(), command(user(actor), purge("Acme")));
        assert_eq!(error, OrganizationError::PermissionDenied, "{actor}");
    }
    let mut given = acme();
    given.push(deleted());
    let error = error_of(given, command(user("adam"), purge("Acme")));
    assert_eq!(
        error,
        OrganizationError::PermissionDenied,
        "after a soft delete"
    );
}

#[test]
fn purging_needs_the_exact_name() {
    let error = error_of(acme(), command(user("olivia"), purge("Acme ")));
    assert_eq!(error, OrganizationError::ConfirmationMismatch);
}

#[test]
fn system_purges_only_once_the_restore_window_has_elapsed() {
    let mut given = acme();
    given.push(deleted());
    let early = error_of(
        given.clone(),
        command_at(Actor::System, days(29), purge("Acme")),
    );
    assert_eq!(early, OrganizationError::ActorRequired);
    test()
        .given(given)
        .when(command_at(Actor::System, days(31), purge("Acme")))
        .then_expect_events(vec![purged(days(31))]);
}

#[test]
fn a_purged_organization_is_gone_for_every_command() {
    let mut given = acme();
    given.push(purged(t0()));
    for body in [
        purge("Acme"),
        OrganizationCommand::RestoreOrganization,
        delete("Acme"),
    ] {
        let error = error_of(given.clone(), command(user("olivia"), body));
        assert_eq!(error, OrganizationError::NotFound("organization"));
    }
}

fn transfer(to: &str) -> OrganizationCommand {
    OrganizationCommand::TransferOwnership(TransferOwnership {
        new_owner_id: uid(to),
    })
}

#[test]
fn transferring_ownership_makes_the_admin_owner_and_the_actor_admin() {
    test()
        .given(acme())
        .when(command(user("olivia"), transfer("adam")))
        .then_expect_events(vec![OrganizationEvent::OwnershipTransferred(
            OwnershipTransferred {
                from_user_id: uid("olivia"),
                to_user_id: uid("adam"),
            },
        )]);

    let mut state = Organization::default();
    for event in acme() {
        cqrs_es::Aggregate::apply(&mut state, event);
    }
    let events = state
        .decide(&command(user("olivia"), transfer("adam")))
        .unwrap();
    for event in events {
        cqrs_es::Aggregate::apply(&mut state, event);
    }
    assert_eq!(state.members[&uid("adam")].role, Role::Owner);
    assert_eq!(state.members[&uid("olivia")].role, Role::Admin);
}

#[test]
fn ownership_can_only_go_to_an_admin() {
    for target in ["mia", "vic", "nobody"] {
        let error = error_of(acme(), command(user("olivia"), transfer(target)));
        assert_eq!(error, OrganizationError::TargetNotAdmin, "{target}");
    }
}

#[test]
fn only_an_owner_transfers_ownership() {
    let error = error_of(acme(), command(user("adam"), transfer("adam")));
    assert_eq!(error, OrganizationError::PermissionDenied);
}

#[test]
fn only_the_new_owner_transfers_ownership_again() {
    let mut given = acme();
    given.push(OrganizationEvent::OwnershipTransferred(
        OwnershipTransferred {
            from_user_id: uid("olivia"),
            to_user_id: uid("adam"),
        },
    ));
    let error = error_of(given.clone(), command(user("olivia"), transfer("adam")));
    assert_eq!(
        error,
        OrganizationError::PermissionDenied,
        "the former owner"
    );
    test()
        .given(given)
        .when(command(user("adam"), transfer("olivia")))
        .then_expect_events(vec![OrganizationEvent::OwnershipTransferred(
            OwnershipTransferred {
                from_user_id: uid("adam"),
                to_user_id: uid("olivia"),
            },
        )]);
}

#[test]
fn every_error_maps_to_one_contract_code() {
    let codes = [
        (OrganizationError::ActorRequired, "actor_required"),
        (OrganizationError::PermissionDenied, "permission_denied"),
        (OrganizationError::KeyRevoked, "unauthenticated"),
        (OrganizationError::NotFound("organization"), "not_found"),
        (OrganizationError::LastOwner, "last_owner"),
        (OrganizationError::CannotRemoveSelf, "cannot_remove_self"),
        (OrganizationError::TargetNotAdmin, "target_not_admin"),
        (
            OrganizationError::OrganizationDeleted,
            "organization_deleted",
        ),
        (
            OrganizationError::RestoreWindowElapsed,
            "restore_window_elapsed",
        ),
        (
            OrganizationError::ConfirmationMismatch,
            "confirmation_mismatch",
        ),
        (OrganizationError::SlugTaken, "slug_taken"),
        (OrganizationError::AlreadyMember, "already_member"),
        (OrganizationError::InvitationPending, "invitation_pending"),
        (OrganizationError::InvitationExpired, "invitation_expired"),
        (
            OrganizationError::OwnInvitationPending,
            "invitation_pending",
        ),
        (OrganizationError::InvalidInvitation, "invalid_invitation"),
        (OrganizationError::EmailMismatch, "email_mismatch"),
        (OrganizationError::FieldLocked("title"), "field_locked"),
        (
            OrganizationError::PersonalOrganization,
            "personal_organization",
        ),
        (OrganizationError::Validation(vec![]), "validation_failed"),
    ];
    for (error, code) in codes {
        assert_eq!(error.code(), code);
    }
}
