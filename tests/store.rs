//! The event store on real PostgreSQL and real SQLite: append-only, sealed personal data,
//! crypto-shredding on purge, optimistic concurrency, slugs, snapshots, upcasting.

mod support;

use std::collections::HashMap;

use cqrs_es::persist::SerializedEvent;
use orgledger::ledger::{Ledger, LedgerError, RequestContext, SnapshotRead};
use orgledger::service::Orgledger;
use orgledger::store::{seal_personal_data, snapshot_interval, MasterKey, SNAPSHOT_EVERY};
use orgledger_domain::*;
use orgledger_projections::{Database, PING_IDLE_FOR};
use support::*;
use uuid::Uuid;

on_both_backends!(
    stored_events_cannot_be_updated_or_deleted,
    personal_data_and_tokens_never_appear_in_clear_in_stored_rows,
    event_metadata_records_actor_time_and_request,
    purging_erases_personal_data_everywhere_and_frees_the_slug,
    a_purge_interrupted_before_its_key_was_destroyed_is_finished_at_start_up,
    racing_commands_on_one_organization_both_apply_on_distinct_versions,
    racing_owners_removing_each_other_leave_exactly_one_owner,
    two_concurrent_creates_with_one_slug_have_exactly_one_winner,
    a_refused_create_frees_its_slug_at_once,
    a_second_personal_organization_is_refused_by_the_ledger,
    a_derived_slug_that_is_taken_gets_a_suffix,
    renaming_a_slug_frees_the_old_one,
    a_slug_reservation_left_by_a_crashed_create_is_taken_over,
    a_slug_reserved_by_a_rename_in_flight_is_not_taken_until_it_is_stale,
    two_organizations_renamed_to_one_slug_at_once_have_exactly_one_winner,
    a_rename_that_loses_a_race_for_its_slug_leaves_the_winners_reservation,
    a_command_on_a_ten_thousand_event_organization_reads_the_snapshot_and_what_follows,
    snapshots_equal_a_full_replay,
    a_snapshot_sealed_without_its_event_is_replayed_around_never_trusted,
    a_snapshot_derived_under_older_rules_is_replayed_around_and_replaced,
    importing_nothing_stores_nothing_and_needs_no_data_key,
    a_stored_version_one_event_is_upcast_on_read_and_never_rewritten,
    committed_events_survive_a_new_process,
    a_master_key_that_does_not_open_the_stored_keys_is_refused_at_start,
    if_match_with_a_stale_version_is_refused_and_appends_nothing,
    a_rejected_command_appends_nothing,
    a_snapshot_that_moved_since_the_load_rolls_back_the_events_with_it,
    a_refusal_decided_on_a_cache_another_process_outdated_is_decided_again,
    a_no_op_decided_on_a_cache_another_process_outdated_is_decided_again,
    a_commit_decided_on_an_outdated_cache_lands_after_the_other_process_commits,
    if_match_is_checked_against_the_latest_version_not_an_outdated_cache,
    a_snapshot_another_process_wrote_since_does_not_block_the_next_one,
    a_snapshot_numbered_as_high_as_numbers_go_is_replaced_not_overflowed,
    a_command_on_a_cached_organization_reads_nothing_before_it_commits,
    an_import_larger_than_one_statement_is_stored_whole_in_one_transaction,
    an_append_over_several_statements_with_a_stale_snapshot_leaves_none_of_them,
    a_large_organization_is_snapshotted_less_often_and_loads_as_a_full_replay,
    concurrent_appends_each_keep_their_own_outcome,
    an_import_beside_commands_on_one_organization_lands_with_them,
    verify_passes_a_history_that_holds_together,
    verify_finds_invitations_and_groups_that_differ_from_the_history,
    verify_finds_settings_roles_providers_and_service_accounts_that_differ_from_the_history,
    verify_names_audit_entries_that_are_not_the_ones_their_events_make,
    verify_names_every_organization_holding_a_slug_another_holds,
    verify_names_every_tampering_with_its_organization_and_event,
    verify_compares_each_kept_snapshot_with_the_replay_where_it_stands,
    the_log_keeps_the_layout_stock_postgres_es_and_sqlite_es_read,
    a_stored_command_whose_wait_fails_answers_pending_not_an_error,
    a_store_from_before_macs_has_its_events_vouched_for_and_nothing_written_since,
    an_append_under_an_idempotency_claim_no_longer_its_own_stores_nothing,
);

async fn stored_events_cannot_be_updated_or_deleted(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    create_org(&ledger, "Acme", "acme", "olivia").await;
    let mac_of = |sequence: u32| format!("(SELECT mac FROM events WHERE sequence = {sequence})");
    for sql in [
        "UPDATE events SET event_type = 'Tampered'".to_owned(),
        "DELETE FROM events".to_owned(),
        // A MAC, once set, neither goes nor changes.
        "UPDATE events SET mac = NULL".to_owned(),
        format!("UPDATE events SET mac = {} WHERE sequence = 1", mac_of(2)),
    ] {
        let error = try_execute(ledger.db(), &sql).await.unwrap_err();
        assert!(error.contains("append-only"), "{sql}: {error}");
    }
    // A row written since MACs, without one, cannot be given one: only the events stored
    // before MACs can (see `a_store_from_before_macs_...`).
    try_execute(
        ledger.db(),
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         SELECT aggregate_type, aggregate_id, 3, event_type, event_version, payload, metadata
           FROM events WHERE sequence = 2",
    )
    .await
    .unwrap();
    let marking = format!("UPDATE events SET mac = {} WHERE sequence = 3", mac_of(1));
    let error = try_execute(ledger.db(), &marking).await.unwrap_err();
    assert!(error.contains("append-only"), "{error}");
    let listing = "INSERT INTO events_before_macs (aggregate_type, aggregate_id, sequence)
                   SELECT aggregate_type, aggregate_id, sequence FROM events WHERE sequence = 3";
    let error = try_execute(ledger.db(), listing).await.unwrap_err();
    assert!(error.contains("fixed"), "{error}");
    if backend == Backend::Postgres {
        let error = try_execute(ledger.db(), "TRUNCATE events")
            .await
            .unwrap_err();
        assert!(error.contains("append-only"), "{error}");
    } else {
        let error = try_execute(ledger.db(), "DELETE FROM event_log")
            .await
            .unwrap_err();
        assert!(error.contains("append-only"), "{error}");
    }
    assert_eq!(count(ledger.db(), "SELECT count(*) FROM events").await, 3);
    assert_eq!(
        count(ledger.db(), "SELECT count(*) FROM events WHERE mac IS NULL").await,
        1
    );
}

async fn personal_data_and_tokens_never_appear_in_clear_in_stored_rows(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = create_org(&ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    let token = orgledger::tokens::issue("inv");
    let send = SendInvitation {
        invitation_id: Uuid::now_v7(),
        email: Some(Email::parse("email", "Nina.Secret@Example.com").unwrap()),
        role: Role::Member,
        first_name: Some("Ninotchka".into()),
        last_name: Some("Zweistein".into()),
        title: Some("Chief Whisperer".into()),
        group_id: None,
        expires_in_days: None,
        max_uses: MaxUses::ONE,
        token_sha256: token.sha256.clone(),
    };
    run(
        &ledger,
        org,
        "olivia",
        OrganizationCommand::SendInvitation(send),
    )
    .await;
    let context = RequestContext {
        request_id: Some("req-1".into()),
        client_ip: Some("203.0.113.77".into()),
        user_agent: Some("SecretBrowser/9".into()),
        idempotency_key: None,
        idempotency_claim: None,
    };
    let accept = AcceptInvitation {
        token_sha256: token.sha256.clone(),
        user_id: uid("nina"),
        email: Email::parse("email", "nina.secret@example.com").unwrap(),
        first_name: None,
        last_name: None,
    };
    ledger
        .run(
            org,
            cmd(user("nina"), OrganizationCommand::AcceptInvitation(accept)),
            &context,
            None,
        )
        .await
        .unwrap();
    let profile = UpdateMember {
        image_url: Some(Some("https://img.example.com/olivia-face.png".into())),
        ..UpdateMember::of(uid("olivia"))
    };
    run(
        &ledger,
        org,
        "olivia",
        OrganizationCommand::UpdateMember(profile),
    )
    .await;
    // Push past a snapshot so a snapshot row exists too.
    for i in 0..SNAPSHOT_EVERY {
        let role = if i % 2 == 0 {
            Role::Admin
        } else {
            Role::Member
        };
        run(&ledger, org, "olivia", set_role("nina", role)).await;
    }

    let rows = raw_rows(ledger.db()).await;
    assert!(count(ledger.db(), "SELECT count(*) FROM snapshots").await >= 1);
    for secret in [
        "nina.secret@example.com",
        "olivia@example.com",
        "Ninotchka",
        "Zweistein",
        "Chief Whisperer",
        "olivia-first",
        "olivia-face",
        "203.0.113.77",
        "SecretBrowser",
        token.secret.as_str(),
    ] {
        assert!(!rows.contains(secret), "{secret:?} is stored in clear");
    }
    assert!(rows.contains("enc:v1:"), "personal data is stored sealed");
    // ...and reads back in clear through the store.
    let (state, _) = ledger.load(org).await.unwrap();
    assert_eq!(state.members[&uid("nina")].email, "nina.secret@example.com");
    assert_eq!(
        state.members[&uid("nina")].first_name.as_deref(),
        Some("Ninotchka")
    );
}

async fn event_metadata_records_actor_time_and_request(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = create_org(&ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    let context = RequestContext {
        request_id: Some("req-42".into()),
        client_ip: Some("198.51.100.1".into()),
        user_agent: Some("curl/8".into()),
        idempotency_key: Some("key-1".into()),
        idempotency_claim: None,
    };
    let update = UpdateOrganization {
        workflow_mode: Some(WorkflowMode::Founder),
        ..Default::default()
    };
    let committed = ledger
        .run(
            org,
            cmd(
                user("olivia"),
                OrganizationCommand::UpdateOrganization(update),
            ),
            &context,
            None,
        )
        .await
        .unwrap();
    let events = ledger.events(org).await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(last.sequence, committed.version);
    let m = &last.metadata;
    assert_eq!(m["actor_type"], "user");
    assert_eq!(m["actor_id"], "olivia");
    assert_eq!(m["request_id"], "req-42");
    assert_eq!(m["client_ip"], "198.51.100.1");
    assert_eq!(m["user_agent"], "curl/8");
    // The key itself stays out of the log, as tokens do.
    assert!(!m.contains_key("idempotency_key"), "{m:?}");
    assert_eq!(
        m["idempotency_key_sha256"],
        orgledger::tokens::sha256_hex("key-1")
    );
    assert!(chrono::DateTime::parse_from_rfc3339(&m["occurred_at"]).is_ok());
}

async fn purging_erases_personal_data_everywhere_and_frees_the_slug(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = acme_with_mia(&ledger).await;
    for _ in 0..SNAPSHOT_EVERY {
        run(&ledger, org, "olivia", set_role("mia", Role::Viewer)).await;
        run(&ledger, org, "olivia", set_role("mia", Role::Member)).await;
    }
    assert!(
        count(ledger.db(), "SELECT count(*) FROM past_snapshots").await >= 1,
        "a replaced snapshot is kept for past moments"
    );
    let purge = OrganizationCommand::PurgeOrganization(PurgeOrganization {
        confirm_name: "Acme".into(),
    });
    run(&ledger, org, "olivia", purge).await;

    assert_eq!(
        count(ledger.db(), "SELECT count(*) FROM organization_keys").await,
        0
    );
    assert_eq!(
        count(ledger.db(), "SELECT count(*) FROM snapshots").await,
        0
    );
    assert_eq!(
        count(ledger.db(), "SELECT count(*) FROM past_snapshots").await,
        0,
        "the kept snapshots go with the current one"
    );
    // Another process that never saw the key reads the history as erased.
    let other = ledger.reopen().await;
    let events = other.events(org).await.unwrap();
    assert!(
        events.len() > 2 * SNAPSHOT_EVERY,
        "history keeps its tombstone"
    );
    let OrganizationEvent::MemberJoined(owner) = &events[1].payload else {
        panic!()
    };
    assert_eq!(owner.email, ERASED);
    assert_eq!(owner.first_name.as_deref(), Some(ERASED));
    assert!(matches!(
        events.last().unwrap().payload,
        OrganizationEvent::OrganizationPurged(_)
    ));
    let (state, _) = other.load(org).await.unwrap();
    assert_eq!(state.lifecycle, Lifecycle::Purged);
    assert!(state.members.is_empty());
    // Every command is refused, and the slug is free for someone else.
    let refused = other
        .run(
            org,
            cmd(user("olivia"), OrganizationCommand::LeaveOrganization),
            &RequestContext::default(),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        LedgerError::Rejected(OrganizationError::NotFound(_))
    ));
    create_org(&other, "Acme Again", "acme", "zed").await;
}

async fn a_purge_interrupted_before_its_key_was_destroyed_is_finished_at_start_up(
    backend: Backend,
) {
    let ledger = spawn_ledger(backend).await;
    let org = create_org(&ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    let purge = OrganizationCommand::PurgeOrganization(PurgeOrganization {
        confirm_name: "Acme".into(),
    });
    // `execute` stores the tombstone but, like a crash right after commit, does not finish.
    ledger
        .execute(
            org,
            cmd(user("olivia"), purge),
            &RequestContext::default(),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        count(ledger.db(), "SELECT count(*) FROM organization_keys").await,
        1
    );
    let restarted = ledger.reopen().await;
    assert_eq!(restarted.finish_interrupted_purges().await.unwrap(), 1);
    assert_eq!(
        count(ledger.db(), "SELECT count(*) FROM organization_keys").await,
        0
    );
    assert_eq!(restarted.finish_interrupted_purges().await.unwrap(), 0);
}

async fn racing_commands_on_one_organization_both_apply_on_distinct_versions(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = acme_with_mia(&ledger).await;
    add_member(&ledger, org, "olivia", "vic", Role::Member).await;
    let other = ledger.reopen().await;
    let context = RequestContext::default();
    let (a, b) = tokio::join!(
        ledger.run(
            org,
            cmd(user("olivia"), set_role("mia", Role::Admin)),
            &context,
            None
        ),
        other.run(
            org,
            cmd(user("olivia"), set_role("vic", Role::Viewer)),
            &context,
            None
        ),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.version, b.version);
    let (state, version) = ledger.load(org).await.unwrap();
    assert_eq!(version, a.version.max(b.version));
    assert_eq!(state.members[&uid("mia")].role, Role::Admin);
    assert_eq!(state.members[&uid("vic")].role, Role::Viewer);
}

async fn racing_owners_removing_each_other_leave_exactly_one_owner(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = create_org(&ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    add_member(&ledger, org, "olivia", "otto", Role::Owner).await;
    let other = ledger.reopen().await;
    let context = RequestContext::default();
    let remove = |id: &str| OrganizationCommand::RemoveMember(RemoveMember { user_id: uid(id) });
    let (a, b) = tokio::join!(
        ledger.run(org, cmd(user("olivia"), remove("otto")), &context, None),
        other.run(org, cmd(user("otto"), remove("olivia")), &context, None),
    );
    let loser = match (a, b) {
        (Ok(_), Err(error)) | (Err(error), Ok(_)) => error,
        other => panic!("expected one winner: {other:?}"),
    };
    assert!(
        matches!(
            loser,
            LedgerError::Rejected(OrganizationError::PermissionDenied)
        ),
        "the loser, retried, is no longer a member: {loser:?}"
    );
    let (state, _) = ledger.load(org).await.unwrap();
    assert_eq!(state.owner_count(), 1);
}

async fn two_concurrent_creates_with_one_slug_have_exactly_one_winner(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let other = ledger.reopen().await;
    let context = RequestContext::default();
    let (a, b) = tokio::join!(
        ledger.create_organization(create_command("Acme", "acme", "olivia"), true, &context),
        other.create_organization(create_command("Acme Two", "acme", "otto"), true, &context),
    );
    let loser = match (a, b) {
        (Ok(_), Err(error)) | (Err(error), Ok(_)) => error,
        other => panic!("expected one winner: {other:?}"),
    };
    assert!(matches!(
        loser,
        LedgerError::Rejected(OrganizationError::SlugTaken)
    ));
    assert_eq!(
        count(ledger.db(), "SELECT count(*) FROM organization_slugs").await,
        1
    );
    assert_eq!(
        count(
            ledger.db(),
            "SELECT count(*) FROM events WHERE event_type = 'OrganizationCreated'"
        )
        .await,
        1
    );
}

/// A create the aggregate refuses stored nothing: its slug is free again at once. (One
/// whose store failed keeps its slug while the organization may exist; a stale
/// reservation is taken over, below.)
async fn a_refused_create_frees_its_slug_at_once(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let context = RequestContext::default();
    let mut for_someone_else = create_command("Acme", "acme", "olivia");
    for_someone_else.actor = user("mallory");
    let refused = ledger
        .create_organization(for_someone_else, true, &context)
        .await
        .expect_err("mallory names olivia as owner");
    assert!(
        matches!(
            refused,
            LedgerError::Rejected(OrganizationError::Validation(_))
        ),
        "{refused:?}"
    );
    assert_eq!(
        count(ledger.db(), "SELECT count(*) FROM organization_slugs").await,
        0,
        "the reservation is gone"
    );
    ledger
        .create_organization(create_command("Acme", "acme", "olivia"), true, &context)
        .await
        .expect("the slug is free");
}

/// The ledger keeps a user to one personal organization, whoever calls it.
async fn a_second_personal_organization_is_refused_by_the_ledger(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let context = RequestContext::default();
    let personal = |name: &str, slug: &str| {
        let mut command = create_command(name, slug, "olivia");
        if let OrganizationCommand::CreateOrganization(create) = &mut command.body {
            create.kind = OrganizationKind::Personal;
        }
        command
    };
    ledger
        .create_organization(personal("Olivia's", "olivia"), true, &context)
        .await
        .expect("the first one");
    let second = ledger
        .create_organization(personal("Olivia's other", "olivia-2"), true, &context)
        .await
        .expect_err("a second personal organization");
    assert!(
        matches!(
            second,
            LedgerError::Rejected(OrganizationError::PersonalOrganizationExists)
        ),
        "{second:?}"
    );
    ledger
        .create_organization(create_command("Team", "team", "olivia"), true, &context)
        .await
        .expect("teams are not limited");
    assert_eq!(
        count(
            ledger.db(),
            "SELECT count(*) FROM events WHERE event_type = 'OrganizationCreated'"
        )
        .await,
        2
    );
    assert_eq!(
        count(ledger.db(), "SELECT count(*) FROM organization_slugs").await,
        2,
        "the refused one's slug is not kept"
    );
}

async fn a_derived_slug_that_is_taken_gets_a_suffix(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    create_org(&ledger, "Acme", "acme", "olivia").await;
    let second = ledger
        .create_organization(
            create_command("Acme", "acme", "otto"),
            false,
            &RequestContext::default(),
        )
        .await
        .unwrap();
    assert_eq!(second.state.slug, "acme-2");
    let explicit = ledger
        .create_organization(
            create_command("Acme", "acme", "zed"),
            true,
            &RequestContext::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        explicit,
        LedgerError::Rejected(OrganizationError::SlugTaken)
    ));
}

async fn renaming_a_slug_frees_the_old_one(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = create_org(&ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    create_org(&ledger, "Beta", "beta", "bob").await;
    let to = |slug: &str| {
        OrganizationCommand::UpdateOrganization(UpdateOrganization {
            slug: Some(Slug::parse("slug", slug).unwrap()),
            ..Default::default()
        })
    };
    let taken = ledger
        .run(
            org,
            cmd(user("olivia"), to("beta")),
            &RequestContext::default(),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(
        taken,
        LedgerError::Rejected(OrganizationError::SlugTaken)
    ));
    let renamed = run(&ledger, org, "olivia", to("acme-corp")).await;
    assert_eq!(renamed.state.slug, "acme-corp");
    create_org(&ledger, "New Acme", "acme", "zed").await;
    // A refused rename does not keep its reservation.
    let refused = ledger
        .run(
            org,
            cmd(user("stranger"), to("gamma")),
            &RequestContext::default(),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        LedgerError::Rejected(OrganizationError::PermissionDenied)
    ));
    create_org(&ledger, "Gamma", "gamma", "gus").await;
}

async fn a_slug_reservation_left_by_a_crashed_create_is_taken_over(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let ghost = Uuid::now_v7();
    let (fresh, stale) = match backend {
        Backend::Postgres => (
            format!("INSERT INTO organization_slugs (slug, organization_id) VALUES ('inflight', '{ghost}')"),
            format!("INSERT INTO organization_slugs (slug, organization_id, reserved_at) VALUES ('crashed', '{ghost}', now() - interval '1 hour')"),
        ),
        Backend::Sqlite => (
            format!("INSERT INTO organization_slugs (slug, organization_id) VALUES ('inflight', '{ghost}')"),
            format!("INSERT INTO organization_slugs (slug, organization_id, reserved_at) VALUES ('crashed', '{ghost}', '2020-01-01T00:00:00Z')"),
        ),
    };
    try_execute(ledger.db(), &fresh).await.unwrap();
    try_execute(ledger.db(), &stale).await.unwrap();
    let inflight = ledger
        .create_organization(
            create_command("X", "inflight", "olivia"),
            true,
            &RequestContext::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        inflight,
        LedgerError::Rejected(OrganizationError::SlugTaken)
    ));
    let taken_over = create_org(&ledger, "Y", "crashed", "olivia").await;
    assert_eq!(taken_over.state.slug, "crashed");
}

/// A create that names `slug` is refused: the slug is held.
async fn a_create_finds_the_slug_taken(ledger: &Ledger, slug: &str) {
    let refused = ledger
        .create_organization(
            create_command("Later", slug, "zed"),
            true,
            &RequestContext::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(refused, LedgerError::Rejected(OrganizationError::SlugTaken)),
        "{slug}: {refused:?}"
    );
}

fn rename_to(slug: &str) -> OrganizationCommand {
    OrganizationCommand::UpdateOrganization(UpdateOrganization {
        slug: Some(Slug::parse("slug", slug).unwrap()),
        ..Default::default()
    })
}

/// A reservation by a live organization whose slug is not (yet) the reserved one is a rename
/// in flight while fresh, and a crash's leftover once older than the grace period.
async fn a_slug_reserved_by_a_rename_in_flight_is_not_taken_until_it_is_stale(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let renaming = create_org(&ledger, "Alpha", "alpha", "olivia")
        .await
        .organization_id;
    let other = create_org(&ledger, "Beta", "beta", "bob")
        .await
        .organization_id;
    try_execute(
        ledger.db(),
        &format!("INSERT INTO organization_slugs (slug, organization_id) VALUES ('wanted', '{renaming}')"),
    )
    .await
    .unwrap();
    let context = RequestContext::default();
    let rename = ledger
        .run(other, cmd(user("bob"), rename_to("wanted")), &context, None)
        .await
        .unwrap_err();
    assert!(
        matches!(rename, LedgerError::Rejected(OrganizationError::SlugTaken)),
        "{rename:?}"
    );
    a_create_finds_the_slug_taken(&ledger, "wanted").await;
    let age = match backend {
        Backend::Postgres => "now() - interval '1 hour'",
        Backend::Sqlite => "'2020-01-01T00:00:00Z'",
    };
    try_execute(
        ledger.db(),
        &format!("UPDATE organization_slugs SET reserved_at = {age} WHERE slug = 'wanted'"),
    )
    .await
    .unwrap();
    let renamed = run(&ledger, other, "bob", rename_to("wanted")).await;
    assert_eq!(renamed.state.slug, "wanted");
    let holder = format!(
        "SELECT count(*) FROM organization_slugs WHERE slug = 'wanted' AND organization_id = '{other}'"
    );
    assert_eq!(count(ledger.db(), &holder).await, 1);
}

/// Two processes, so that nothing but the reservations stands between the two renames.
async fn two_organizations_renamed_to_one_slug_at_once_have_exactly_one_winner(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let other = ledger.reopen().await;
    let context = RequestContext::default();
    let first = create_org(&ledger, "First", "first", "olivia")
        .await
        .organization_id;
    let second = create_org(&ledger, "Second", "second", "otto")
        .await
        .organization_id;
    for round in 0..10 {
        let slug = format!("wanted-{round}");
        let (a, b) = tokio::join!(
            ledger.run(first, cmd(user("olivia"), rename_to(&slug)), &context, None),
            other.run(second, cmd(user("otto"), rename_to(&slug)), &context, None),
        );
        let loser = match (a, b) {
            (Ok(_), Err(error)) | (Err(error), Ok(_)) => error,
            other => panic!("round {round}: expected one winner: {other:?}"),
        };
        assert!(
            matches!(loser, LedgerError::Rejected(OrganizationError::SlugTaken)),
            "round {round}: {loser:?}"
        );
        let (first_state, _) = ledger.load(first).await.unwrap();
        let (second_state, _) = ledger.load(second).await.unwrap();
        assert_eq!(
            [&first_state.slug, &second_state.slug]
                .iter()
                .filter(|held| ***held == slug)
                .count(),
            1,
            "round {round}"
        );
    }
}

/// Two renames of one organization to one slug under one If-Match, from two processes: one
/// commits, the other fails on its version and must not release the reservation the winner
/// now holds, or a later create would take the slug a second time.
async fn a_rename_that_loses_a_race_for_its_slug_leaves_the_winners_reservation(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let other = ledger.reopen().await;
    let context = RequestContext::default();
    let org = create_org(&ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    for round in 0..5 {
        let slug = format!("renamed-{round}");
        let (_, version) = ledger.load(org).await.unwrap();
        let (a, b) = tokio::join!(
            ledger.run(
                org,
                cmd(user("olivia"), rename_to(&slug)),
                &context,
                Some(version)
            ),
            other.run(
                org,
                cmd(user("olivia"), rename_to(&slug)),
                &context,
                Some(version)
            ),
        );
        let loser = match (a, b) {
            (Ok(_), Err(error)) | (Err(error), Ok(_)) => error,
            other => panic!("round {round}: expected one winner: {other:?}"),
        };
        assert!(
            matches!(loser, LedgerError::VersionMismatch { .. }),
            "round {round}: {loser:?}"
        );
        a_create_finds_the_slug_taken(&ledger, &slug).await;
    }
    // The same race within one process: its renames take turns.
    let (_, version) = ledger.load(org).await.unwrap();
    let (a, b) = tokio::join!(
        ledger.run(
            org,
            cmd(user("olivia"), rename_to("in-turn")),
            &context,
            Some(version)
        ),
        ledger.run(
            org,
            cmd(user("olivia"), rename_to("in-turn")),
            &context,
            Some(version)
        ),
    );
    assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
    a_create_finds_the_slug_taken(&ledger, "in-turn").await;
}

/// 5,000 events are 35,000 parameters: more than SQLite takes in one statement.
async fn an_import_larger_than_one_statement_is_stored_whole_in_one_transaction(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = acme_with_mia(&ledger).await;
    let (_, start) = ledger.load(org).await.unwrap();
    let version = ledger
        .import(org, role_flips(5_000, "mia"), HashMap::new())
        .await
        .unwrap();
    assert_eq!(version, start + 5_000);
    let stored = format!("SELECT count(*) FROM events WHERE aggregate_id = '{org}'");
    assert_eq!(count(ledger.db(), &stored).await as usize, start + 5_000);
    let last = format!("SELECT max(sequence) FROM events WHERE aggregate_id = '{org}'");
    assert_eq!(count(ledger.db(), &last).await as usize, start + 5_000);
    // The history replays: an even number of flips leaves mia a member.
    let (state, _) = ledger.reopen().await.load(org).await.unwrap();
    assert_eq!(
        state.members.get(&uid("mia")).map(|member| &member.role),
        Some(&Role::Member)
    );
}

async fn an_append_over_several_statements_with_a_stale_snapshot_leaves_none_of_them(
    backend: Backend,
) {
    use cqrs_es::persist::{PersistedEventRepository, PersistenceError};
    use serde_json::json;

    let ledger = spawn_ledger(backend).await;
    let repository = bare_repository(&ledger);
    let id = Uuid::now_v7().to_string();
    let events = |sequences: std::ops::RangeInclusive<usize>| -> Vec<SerializedEvent> {
        sequences
            .map(|sequence| opaque_event(&id, sequence))
            .collect()
    };
    let stored = || stored_count(&repository, &id);
    let state = json!({ "state": "opaque to the store" });
    repository
        .persist::<Organization>(&events(1..=2_500), Some((id.clone(), state.clone(), 1)))
        .await
        .unwrap();
    assert_eq!(stored().await, 2_500, "three statements, one transaction");
    let stale = repository
        .persist::<Organization>(&events(2_501..=5_000), Some((id.clone(), state, 3)))
        .await
        .unwrap_err();
    assert!(
        matches!(stale, PersistenceError::OptimisticLockError),
        "{stale:?}"
    );
    assert_eq!(
        stored().await,
        2_500,
        "no chunk of the refused append remains"
    );
}

async fn a_command_on_a_ten_thousand_event_organization_reads_the_snapshot_and_what_follows(
    backend: Backend,
) {
    let ledger = spawn_ledger(backend).await;
    let org = acme_with_mia(&ledger).await;
    let (_, start) = ledger.load(org).await.unwrap();
    let flips = role_flips(10_000, "mia");
    for chunk in flips.chunks(2_000) {
        ledger
            .import(org, chunk.to_vec(), HashMap::new())
            .await
            .unwrap();
    }
    // A few commands that do not reach the next snapshot.
    run(&ledger, org, "olivia", set_role("mia", Role::Viewer)).await;
    run(&ledger, org, "olivia", set_role("mia", Role::Member)).await;
    let snapshot_at = count(
        ledger.db(),
        "SELECT last_sequence FROM snapshots WHERE aggregate_type = 'organization'",
    )
    .await as usize;
    let (_, version) = ledger.load(org).await.unwrap();
    assert!(
        snapshot_at >= start + 10_000,
        "a snapshot covers the imported history"
    );

    // A process that never saw the organization reads one snapshot and what follows it.
    let cold = ledger.reopen().await;
    let stats = cold.read_stats();
    let committed = run(&cold, org, "olivia", set_role("mia", Role::Viewer)).await;
    assert_eq!(committed.version, start + 10_003);
    assert_eq!(stats.snapshots(), 1, "one snapshot read");
    assert_eq!(
        stats.events(),
        (version - snapshot_at) as u64,
        "only the events after the snapshot are read"
    );
    assert!(stats.events() < SNAPSHOT_EVERY as u64);

    // Once loaded, the next command reads no snapshot and only events newer than its cache.
    let (events_before, snapshots_before) = (stats.events(), stats.snapshots());
    run(&ledger, org, "olivia", set_role("mia", Role::Member)).await;
    run(&cold, org, "olivia", set_role("mia", Role::Admin)).await;
    assert_eq!(
        stats.snapshots(),
        snapshots_before,
        "no snapshot read when warm"
    );
    assert_eq!(
        stats.events() - events_before,
        1,
        "only the other process's new event"
    );
}

async fn snapshots_equal_a_full_replay(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = create_org(&ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    // A shareable link counts its uses: a state field that double application would break.
    let token = orgledger::tokens::issue("inv");
    let link = SendInvitation {
        invitation_id: Uuid::now_v7(),
        email: None,
        role: Role::Viewer,
        first_name: None,
        last_name: None,
        title: None,
        group_id: None,
        expires_in_days: None,
        max_uses: MaxUses::new("max_uses", 1000).unwrap(),
        token_sha256: token.sha256.clone(),
    };
    run(
        &ledger,
        org,
        "olivia",
        OrganizationCommand::SendInvitation(link),
    )
    .await;
    for i in 0..(SNAPSHOT_EVERY + 7) {
        let id = format!("guest{i}");
        let accept = AcceptInvitation {
            token_sha256: token.sha256.clone(),
            user_id: uid(&id),
            email: Email::parse("email", &format!("{id}@example.org")).unwrap(),
            first_name: None,
            last_name: None,
        };
        run(
            &ledger,
            org,
            &id,
            OrganizationCommand::AcceptInvitation(accept),
        )
        .await;
    }
    assert!(count(ledger.db(), "SELECT count(*) FROM snapshots").await >= 1);
    let (from_snapshot, version) = ledger.reopen().await.load(org).await.unwrap();
    let mut replayed = Organization::default();
    let events = ledger.events(org).await.unwrap();
    assert_eq!(events.len(), version);
    for event in events {
        cqrs_es::Aggregate::apply(&mut replayed, event.payload);
    }
    assert_eq!(from_snapshot, replayed);
    let uses = replayed.invitations.values().next().unwrap().uses as usize;
    assert_eq!(uses, SNAPSHOT_EVERY + 7);
}

/// Snapshots are stored compressed, then sealed, in `state`, to their organization and the
/// event they stand at. The forms written before that binding (the JSON sealed as it was,
/// before 2026-12-03; compressed, to the organization alone, until 2026-12-06; base64 inside
/// the JSON `payload`, before `state` had a column) say nothing trustworthy about where they
/// stand: loads read past them, replaying every event, and the next snapshot replaces them.
/// A snapshot relabelled as standing elsewhere does not open.
async fn a_snapshot_sealed_without_its_event_is_replayed_around_never_trusted(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = create_org(&ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    for i in 0..SNAPSHOT_EVERY {
        add_member(&ledger, org, "olivia", &format!("m{i:02}"), Role::Member).await;
    }
    let new_form = "SELECT count(*) FROM snapshots WHERE state IS NOT NULL AND payload IS NULL";
    assert_eq!(count(ledger.db(), new_form).await, 1);
    let snapshot_at = count(ledger.db(), "SELECT last_sequence FROM snapshots").await as usize;
    let id = org.to_string();
    let key = ledger.keys().get(&id).await.unwrap().expect("a live key");
    let (state, at) = ledger.snapshot(org).await.unwrap().expect("a snapshot");
    assert_eq!(at, snapshot_at);
    let state = serde_json::to_string(&state).unwrap();
    let sealed_now: Vec<u8> = orgledger_projections::with_pool!(ledger.db(), pool => {
        sqlx::query_scalar("SELECT state FROM snapshots")
            .fetch_one(pool)
            .await
            .unwrap()
    });
    assert!(
        sealed_now.len() < state.len(),
        "compressed: {} bytes sealed for {} of JSON",
        sealed_now.len(),
        state.len()
    );
    let mut replayed = Organization::default();
    for event in ledger.events(org).await.unwrap() {
        cqrs_es::Aggregate::apply(&mut replayed, event.payload);
    }
    let replayed_around = |form: &'static str| {
        let (ledger, replayed) = (&ledger, &replayed);
        async move {
            let cold = ledger.reopen().await;
            let (loaded, version) = cold.load(org).await.unwrap();
            let stats = cold.read_stats();
            assert_eq!(stats.snapshots(), 1, "{form}: the snapshot was looked at");
            assert_eq!(
                stats.events(),
                version as u64,
                "{form}: every event was replayed"
            );
            assert_eq!(&loaded, replayed, "{form}");
            assert!(
                cold.snapshot(org).await.unwrap().is_none(),
                "{form}: not used"
            );
            cold
        }
    };
    let set_state = |state: Vec<u8>| {
        let ledger = &ledger;
        async move {
            orgledger_projections::with_pool!(ledger.db(), pool => {
                sqlx::query("UPDATE snapshots SET state = $1")
                    .bind(state)
                    .execute(pool)
                    .await
                    .unwrap();
            });
        }
    };

    set_state(key.encrypt(state.as_bytes(), id.as_bytes())).await;
    replayed_around("uncompressed, sealed to the organization").await;
    let mut compressed = vec![1_u8];
    compressed.extend(lz4_flex::compress_prepend_size(state.as_bytes()));
    set_state(key.encrypt(&compressed, id.as_bytes())).await;
    replayed_around("compressed, sealed to the organization").await;

    // The payload column is jsonb on PostgreSQL, text on SQLite.
    let set_payload = |payload: serde_json::Value| {
        let ledger = &ledger;
        async move {
            let rewrite = "UPDATE snapshots SET payload = $1, state = NULL";
            match ledger.db() {
                Database::Postgres(pool) => {
                    sqlx::query(rewrite)
                        .bind(payload)
                        .execute(pool)
                        .await
                        .unwrap();
                }
                Database::Sqlite(pool) => {
                    sqlx::query(rewrite)
                        .bind(payload.to_string())
                        .execute(pool)
                        .await
                        .unwrap();
                }
            }
        }
    };
    // A payload that does not open is damaged, not an older form: read around all the same,
    // and refused when read as a snapshot, so that `verify` names it.
    set_payload(serde_json::json!({ "sealed": "not a sealed state" })).await;
    let damaged = ledger.reopen().await;
    let (loaded, version) = damaged.load(org).await.expect("loaded around it");
    assert_eq!(damaged.read_stats().events(), version as u64);
    assert_eq!(loaded, replayed);
    assert!(damaged.snapshot(org).await.is_err());

    set_payload(serde_json::json!({ "sealed": key.seal_str(&state, id.as_bytes()) })).await;
    assert_eq!(count(ledger.db(), new_form).await, 0);
    let cold = replayed_around("base64 in the payload").await;

    // The next command replaces it in the new form, whatever the interval, and it is used.
    add_member(&cold, org, "olivia", "nia", Role::Member).await;
    assert_eq!(count(ledger.db(), new_form).await, 1);
    let now_at = count(ledger.db(), "SELECT last_sequence FROM snapshots").await as usize;
    assert!(now_at > snapshot_at);
    let fresh = ledger.reopen().await;
    let (_, version) = fresh.load(org).await.unwrap();
    assert_eq!(
        fresh.read_stats().events(),
        (version - now_at) as u64,
        "loads start from it again"
    );
    let (_, at) = ledger
        .reopen()
        .await
        .snapshot(org)
        .await
        .unwrap()
        .expect("used");
    assert_eq!(at, now_at);

    // Relabelled as standing one event further on, a load would skip that event: it does
    // not open, so the organization is loaded from its events alone (not refused: every
    // command of it would fail), and the next commit replaces it.
    try_execute(
        ledger.db(),
        "UPDATE snapshots SET last_sequence = last_sequence + 1",
    )
    .await
    .unwrap();
    let relabelled = ledger.reopen().await;
    let (loaded, version) = relabelled.load(org).await.expect("loaded around it");
    assert_eq!(
        relabelled.read_stats().events(),
        version as u64,
        "every event was replayed"
    );
    let mut replayed = Organization::default();
    for event in ledger.events(org).await.unwrap() {
        cqrs_es::Aggregate::apply(&mut replayed, event.payload);
    }
    assert_eq!(loaded, replayed);
    assert!(
        relabelled.snapshot(org).await.is_err(),
        "read as a snapshot, it is refused"
    );
    add_member(&relabelled, org, "olivia", "noor", Role::Member).await;
    let (replaced, at) = ledger
        .reopen()
        .await
        .snapshot(org)
        .await
        .unwrap()
        .expect("replaced by the next commit");
    assert_eq!(at, version + 1, "by the first command after it");
    let mut replayed = Organization::default();
    for event in ledger.events(org).await.unwrap().into_iter().take(at) {
        cqrs_es::Aggregate::apply(&mut replayed, event.payload);
    }
    assert_eq!(replaced, replayed);
}

/// A snapshot whose state was derived under older rules (here, as before a member who
/// joined through an invitation into a group was among the group's members) is not what a
/// replay gives now: loads replay the events instead, `verify` does not call it tampered, and
/// the next commit replaces it.
async fn a_snapshot_derived_under_older_rules_is_replayed_around_and_replaced(backend: Backend) {
    let service = spawn_service(backend).await;
    let ledger = &service.ledger;
    let org = create_org(ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    for i in 0..SNAPSHOT_EVERY {
        add_member(ledger, org, "olivia", &format!("m{i:02}"), Role::Member).await;
    }
    let (state, at) = ledger.snapshot(org).await.unwrap().expect("a snapshot");
    assert_eq!(state.rules, StateRules::CURRENT);
    let mut older = serde_json::to_value(&state).unwrap();
    older.as_object_mut().unwrap().remove("rules");
    let older = serde_json::to_string(&older).unwrap();
    // Sealed as the store seals a state: compressed (marked by a first byte of 1), then
    // encrypted to the organization and the event it stands at.
    let id = org.to_string();
    let key = ledger.keys().get(&id).await.unwrap().expect("a live key");
    let mut plaintext = vec![1_u8];
    plaintext.extend(lz4_flex::compress_prepend_size(older.as_bytes()));
    let sealed = key.encrypt(
        &plaintext,
        format!("orgledger snapshot\0{id}\0{at}").as_bytes(),
    );
    orgledger_projections::with_pool!(service.db(), pool => {
        sqlx::query("UPDATE snapshots SET state = $1")
            .bind(sealed)
            .execute(pool)
            .await
            .unwrap();
    });

    let cold = service.reopen().await.ledger;
    let (loaded, version) = cold.load(org).await.unwrap();
    assert_eq!(
        cold.read_stats().snapshots(),
        1,
        "the snapshot was looked at"
    );
    assert_eq!(
        cold.read_stats().events(),
        version as u64,
        "every event was replayed"
    );
    assert_eq!(loaded.rules, StateRules::CURRENT);
    assert!(cold.snapshot(org).await.unwrap().is_none(), "not used");
    let report = orgledger::verify::verify(&service, Some(org), false)
        .await
        .unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(report.snapshots_not_compared, 1);

    add_member(&cold, org, "olivia", "nia", Role::Member).await;
    let (replaced, now_at) = service
        .reopen()
        .await
        .ledger
        .snapshot(org)
        .await
        .unwrap()
        .expect("replaced, and used");
    assert!(now_at > at);
    assert_eq!(replaced.rules, StateRules::CURRENT);
}

/// An empty import is a no-op, even for an organization with no data key yet.
async fn importing_nothing_stores_nothing_and_needs_no_data_key(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let unknown = Uuid::now_v7();
    let version = ledger
        .import(unknown, Vec::new(), HashMap::new())
        .await
        .unwrap();
    assert_eq!(version, 0);
    assert_eq!(count(ledger.db(), "SELECT count(*) FROM events").await, 0);
}

async fn a_stored_version_one_event_is_upcast_on_read_and_never_rewritten(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = create_org(&ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    let key = ledger.keys().get(&org.to_string()).await.unwrap().unwrap();
    let invitation_id = Uuid::now_v7();
    let mut payload = serde_json::json!({"InvitationSent": {
        "invitation_id": invitation_id,
        "email": "legacy@example.com",
        "role": "member",
        "first_name": null, "last_name": null, "title": null, "group_id": null,
        "token_sha256": "legacy-hash",
        "invited_by": {"type": "user", "id": "olivia"},
        "sent_at": "2026-11-01T09:00:00Z",
        "expires_at": "2099-01-01T00:00:00Z"
    }});
    seal_personal_data(&mut payload, &key, org.to_string().as_bytes());
    // Stored as that version stored it, with the MAC this one gives every event.
    let mac = ledger
        .keys()
        .event_macs()
        .authenticate(SerializedEvent::new(
            org.to_string(),
            3,
            "organization".into(),
            "InvitationSent".into(),
            "1".into(),
            payload.clone(),
            serde_json::json!({}),
        ))
        .mac;
    let mac = match backend {
        Backend::Postgres => format!("'\\x{}'::bytea", hex::encode(mac)),
        Backend::Sqlite => format!("X'{}'", hex::encode(mac)),
    };
    let sql = format!(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, mac)
         VALUES ('organization', '{org}', 3, 'InvitationSent', '1', '{}', '{{}}', {mac})",
        payload.to_string().replace('\'', "''")
    );
    try_execute(ledger.db(), &sql).await.unwrap();
    let (state, _) = ledger.load(org).await.unwrap();
    let invitation = &state.invitations[&invitation_id];
    assert_eq!(invitation.max_uses, 1);
    assert_eq!(invitation.email.as_deref(), Some("legacy@example.com"));
    assert_eq!(
        count(ledger.db(), "SELECT count(*) FROM events WHERE event_version = '1' AND event_type = 'InvitationSent'").await,
        1,
        "the stored row keeps its version"
    );
}

async fn committed_events_survive_a_new_process(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = create_org(&ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    add_member(&ledger, org, "olivia", "mia", Role::Admin).await;
    let (before, version) = ledger.load(org).await.unwrap();
    ledger.db().close().await;
    let restarted = ledger.reopen().await;
    let (after, version_after) = restarted.load(org).await.unwrap();
    assert_eq!((before, version), (after, version_after));
}

async fn a_master_key_that_does_not_open_the_stored_keys_is_refused_at_start(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let url = ledger.database.url.clone();
    let open = |key: MasterKey| {
        let url = url.clone();
        async move {
            let database = Database::connect(&url).await.unwrap();
            orgledger::service::Orgledger::open(database, key).await
        }
    };
    // An empty store takes any key: it has nothing sealed yet.
    assert!(open(MasterKey::generate()).await.is_ok());
    let org = create_org(&ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    let Err(refused) = open(MasterKey::generate()).await else {
        panic!("a wrong master key was accepted");
    };
    assert!(refused.to_string().contains("master key"), "{refused}");
    assert!(open(ledger.master_key.clone()).await.is_ok());
    // With every organization purged no data key is left to open, and the events' MACs
    // refuse it: else new events would be stored under it, out of step with the history's.
    let purge = OrganizationCommand::PurgeOrganization(PurgeOrganization {
        confirm_name: "Acme".into(),
    });
    run(&ledger, org, "olivia", purge).await;
    assert_eq!(
        count(ledger.db(), "SELECT count(*) FROM organization_keys").await,
        0
    );
    let Err(refused) = open(MasterKey::generate()).await else {
        panic!("a wrong master key was accepted once no data key was left");
    };
    assert!(refused.to_string().contains("MACs"), "{refused}");
    assert!(open(ledger.master_key.clone()).await.is_ok());
}

async fn if_match_with_a_stale_version_is_refused_and_appends_nothing(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let created = create_org(&ledger, "Acme", "acme", "olivia").await;
    let org = created.organization_id;
    let update = || {
        OrganizationCommand::UpdateOrganization(UpdateOrganization {
            workflow_mode: Some(WorkflowMode::Founder),
            ..Default::default()
        })
    };
    let stale = ledger
        .run(
            org,
            cmd(user("olivia"), update()),
            &RequestContext::default(),
            Some(created.version - 1),
        )
        .await
        .unwrap_err();
    assert!(matches!(
        stale,
        LedgerError::VersionMismatch {
            expected: 1,
            actual: 2
        }
    ));
    let (_, version) = ledger.load(org).await.unwrap();
    assert_eq!(version, created.version);
    let ok = ledger
        .run(
            org,
            cmd(user("olivia"), update()),
            &RequestContext::default(),
            Some(created.version),
        )
        .await
        .unwrap();
    assert_eq!(ok.version, created.version + 1);
}

async fn a_rejected_command_appends_nothing(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = create_org(&ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    let leave = ledger
        .run(
            org,
            cmd(user("olivia"), OrganizationCommand::LeaveOrganization),
            &RequestContext::default(),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(
        leave,
        LedgerError::Rejected(OrganizationError::LastOwner)
    ));
    assert_eq!(count(ledger.db(), "SELECT count(*) FROM events").await, 2);
}

/// A repository of its own over the ledger's database, for appends the ledger would not make.
fn bare_repository(ledger: &TestLedger) -> orgledger::store::OrganizationRepository {
    use orgledger::store::{DataKeys, OrganizationRepository};
    OrganizationRepository::new(
        ledger.db().clone(),
        DataKeys::new(ledger.db().clone(), ledger.master_key.clone()),
    )
}

/// An event whose payload the store does not look into.
fn opaque_event(id: &str, sequence: usize) -> SerializedEvent {
    SerializedEvent::new(
        id.to_owned(),
        sequence,
        "organization".into(),
        "OrganizationSettingsChanged".into(),
        "1".into(),
        serde_json::json!({ "note": sequence }),
        serde_json::json!({}),
    )
}

async fn stored_count(repository: &orgledger::store::OrganizationRepository, id: &str) -> usize {
    use cqrs_es::persist::PersistedEventRepository;
    repository
        .get_events::<Organization>(id)
        .await
        .unwrap()
        .len()
}

async fn a_snapshot_that_moved_since_the_load_rolls_back_the_events_with_it(backend: Backend) {
    use cqrs_es::persist::{PersistedEventRepository, PersistenceError};
    use serde_json::json;

    let ledger = spawn_ledger(backend).await;
    let repository = bare_repository(&ledger);
    let id = Uuid::now_v7().to_string();
    let event = |sequence: usize| opaque_event(&id, sequence);
    let stored = || stored_count(&repository, &id);
    let state = json!({ "state": "opaque to the store" });
    repository
        .persist::<Organization>(&[event(1), event(2)], Some((id.clone(), state.clone(), 1)))
        .await
        .unwrap();
    assert_eq!(stored().await, 2, "both events of one command are stored");
    // A writer that expects snapshot 2 (there is only 1): its event would fit, its snapshot
    // is stale.
    let stale = repository
        .persist::<Organization>(&[event(3)], Some((id.clone(), state.clone(), 3)))
        .await
        .unwrap_err();
    assert!(
        matches!(stale, PersistenceError::OptimisticLockError),
        "{stale:?}"
    );
    assert_eq!(
        stored().await,
        2,
        "the refused command's event was rolled back with its snapshot"
    );
    let taken = repository
        .persist::<Organization>(&[event(2)], None)
        .await
        .unwrap_err();
    assert!(
        matches!(taken, PersistenceError::OptimisticLockError),
        "{taken:?}"
    );
    repository
        .persist::<Organization>(&[event(3)], Some((id.clone(), state, 2)))
        .await
        .unwrap();
    assert_eq!(stored().await, 3);
}

/// Appends made at once (on PostgreSQL committed together, one statement for the group): a
/// second append of one sequence and an append of a sequence already stored conflict, and
/// only they; every other append is stored.
async fn concurrent_appends_each_keep_their_own_outcome(backend: Backend) {
    let (conflicts, groups, _) = ten_appends_at_once(backend).await;
    assert!(
        conflicts[0] == 0 || conflicts[0] == 8,
        "one of the two appends of sequence 2 of the first organization conflicts: {conflicts:?}"
    );
    assert_eq!(
        conflicts[1], 9,
        "sequence 1 of the second organization was stored already"
    );
    if backend == Backend::Postgres {
        assert!(
            (1..10).contains(&groups),
            "ten appends made at once went in {groups} groups"
        );
    }
}

/// On one thread every append is queued before the committing task runs, so the ten make one
/// group: the clash inside it waits for a statement of its own, and the taken sequence makes
/// the group's statement fail and its appends go in one at a time.
#[tokio::test(flavor = "current_thread")]
async fn appends_queued_together_on_postgres_make_one_group_and_keep_their_own_outcomes() {
    let (conflicts, groups, appends) = ten_appends_at_once(Backend::Postgres).await;
    assert_eq!(
        (groups, appends),
        (1, 10),
        "the ten appends were taken as one group"
    );
    assert_eq!(
        conflicts,
        vec![8, 9],
        "the later append of a sequence and the already stored one conflict"
    );
}

/// A ledger, a repository of its own, and `count` organizations stored at sequence 1 through
/// it (their data keys exist, so a later append reaches the group's queue in its first poll).
async fn organizations_at_sequence_one(
    backend: Backend,
    count: usize,
) -> (
    TestLedger,
    orgledger::store::OrganizationRepository,
    Vec<String>,
) {
    use cqrs_es::persist::PersistedEventRepository;

    let ledger = spawn_ledger(backend).await;
    let repository = bare_repository(&ledger);
    let ids: Vec<String> = (0..count).map(|_| Uuid::now_v7().to_string()).collect();
    for id in &ids {
        repository
            .persist::<Organization>(&[opaque_event(id, 1)], None)
            .await
            .unwrap();
    }
    (ledger, repository, ids)
}

/// Stores sequence 1 of eight organizations, then makes ten appends at once: sequence 2 of
/// each, sequence 2 of the first again, sequence 1 of the second again. Checks that exactly
/// two conflict and each organization holds two events; returns the indexes of the
/// conflicting appends, and how many groups the ten were committed in and how many appends
/// those groups carried (PostgreSQL).
async fn ten_appends_at_once(backend: Backend) -> (Vec<usize>, u64, u64) {
    use cqrs_es::persist::{PersistedEventRepository, PersistenceError};

    let (_ledger, repository, ids) = organizations_at_sequence_one(backend, 8).await;
    let stats = repository.group_stats();
    let (groups_before, appends_before) = (stats.groups(), stats.appends());
    // Every organization's data key is known now, so each append reaches the group's queue
    // in its first poll.
    let mut appends: Vec<SerializedEvent> = ids.iter().map(|id| opaque_event(id, 2)).collect();
    appends.push(opaque_event(&ids[0], 2));
    appends.push(opaque_event(&ids[1], 1));
    let outcomes = futures::future::join_all(
        appends
            .iter()
            .map(|event| repository.persist::<Organization>(std::slice::from_ref(event), None)),
    )
    .await;

    let conflicts: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(index, outcome)| match outcome {
            Ok(()) => None,
            Err(PersistenceError::OptimisticLockError) => Some(index),
            Err(error) => panic!("append {index} failed: {error:?}"),
        })
        .collect();
    assert_eq!(conflicts.len(), 2, "{outcomes:?}");
    for id in &ids {
        assert_eq!(stored_count(&repository, id).await, 2, "{id}");
    }
    (
        conflicts,
        stats.groups() - groups_before,
        stats.appends() - appends_before,
    )
}

/// An append that claims a sequence an earlier append of its group claims too waits for a
/// statement of its own: when the earlier one is refused (here for another of its
/// sequences, already stored), the later one is stored rather than told of a conflict.
#[tokio::test(flavor = "current_thread")]
async fn a_clash_in_a_group_is_stored_when_the_first_claim_is_refused_on_postgres() {
    use cqrs_es::persist::{PersistedEventRepository, PersistenceError};

    let ledger = spawn_ledger(Backend::Postgres).await;
    let repository = bare_repository(&ledger);
    let id = Uuid::now_v7().to_string();
    // The store checks keys, not gaps: sequence 3 stands with 2 free.
    repository
        .persist::<Organization>(&[opaque_event(&id, 1)], None)
        .await
        .unwrap();
    repository
        .persist::<Organization>(&[opaque_event(&id, 3)], None)
        .await
        .unwrap();
    let groups_before = repository.group_stats().groups();

    let first = [opaque_event(&id, 2), opaque_event(&id, 3)];
    let second = [opaque_event(&id, 2)];
    let (first, second) = tokio::join!(
        repository.persist::<Organization>(&first, None),
        repository.persist::<Organization>(&second, None),
    );

    assert_eq!(repository.group_stats().groups() - groups_before, 1);
    assert!(
        matches!(first, Err(PersistenceError::OptimisticLockError)),
        "{first:?}"
    );
    second.expect("the later claim of sequence 2 is stored once the first is refused");
    assert_eq!(stored_count(&repository, &id).await, 3);
}

/// Three organizations at sequence 1, and a trigger on `events` that runs `action` (PL/pgSQL)
/// before inserting any event of the second one. Returns the ledger, a repository of its
/// own and the three ids.
async fn three_organizations_the_server_treats_the_second_of(
    action: &str,
) -> (
    TestLedger,
    orgledger::store::OrganizationRepository,
    Vec<String>,
) {
    let (ledger, repository, ids) = organizations_at_sequence_one(Backend::Postgres, 3).await;
    try_execute(
        ledger.db(),
        &format!(
            "CREATE FUNCTION treat_second() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.aggregate_id = '{}' THEN {action} END IF;
                 RETURN NEW;
             END $$",
            ids[1]
        ),
    )
    .await
    .unwrap();
    try_execute(
        ledger.db(),
        "CREATE TRIGGER treat_second BEFORE INSERT ON events
             FOR EACH ROW EXECUTE FUNCTION treat_second()",
    )
    .await
    .unwrap();
    (ledger, repository, ids)
}

/// Sequence 2 of each of the three, appended at once (one group, on one thread): the outcomes.
async fn second_events_at_once(
    repository: &orgledger::store::OrganizationRepository,
    ids: &[String],
) -> Vec<Result<(), cqrs_es::persist::PersistenceError>> {
    use cqrs_es::persist::PersistedEventRepository;

    let events: Vec<SerializedEvent> = ids.iter().map(|id| opaque_event(id, 2)).collect();
    let groups_before = repository.group_stats().groups();
    let outcomes = futures::future::join_all(
        events
            .iter()
            .map(|event| repository.persist::<Organization>(std::slice::from_ref(event), None)),
    )
    .await;
    assert_eq!(
        repository.group_stats().groups() - groups_before,
        1,
        "the three appends were taken as one group"
    );
    outcomes
}

/// A group the server refuses stored nothing: each append goes in again alone, so one refused
/// append does not take the others down. A serialization failure is a conflict (the command
/// is decided again); any other error is that append's alone.
#[tokio::test(flavor = "current_thread")]
async fn a_group_the_server_refuses_is_stored_again_one_append_at_a_time_on_postgres() {
    use cqrs_es::persist::PersistenceError;

    for (action, conflict) in [
        (
            "RAISE EXCEPTION 'serialization' USING ERRCODE = '40001';",
            true,
        ),
        ("RAISE EXCEPTION 'refused';", false),
    ] {
        let (_ledger, repository, ids) =
            three_organizations_the_server_treats_the_second_of(action).await;

        let outcomes = second_events_at_once(&repository, &ids).await;

        assert!(outcomes[0].is_ok() && outcomes[2].is_ok(), "{outcomes:?}");
        match &outcomes[1] {
            Err(PersistenceError::OptimisticLockError) => assert!(conflict, "{action}"),
            Err(PersistenceError::UnknownError(error)) => {
                assert!(!conflict, "{action}");
                assert!(error.to_string().contains("refused"), "{error}");
            }
            other => panic!("{action}: {other:?}"),
        }
        let mut counts = Vec::new();
        for id in &ids {
            counts.push(stored_count(&repository, id).await);
        }
        assert_eq!(counts, [2, 1, 2], "{action}");
    }
}

/// A connection that breaks while the group's statement runs leaves its outcome unknown, as
/// for a lone INSERT: every append of the group is told the error (none is told it was
/// stored or that it conflicted), and none of it was stored.
#[tokio::test(flavor = "current_thread")]
async fn a_group_whose_connection_is_lost_mid_statement_reports_the_error_to_every_append_on_postgres(
) {
    use cqrs_es::persist::PersistenceError;

    let (ledger, repository, ids) =
        three_organizations_the_server_treats_the_second_of("PERFORM pg_sleep(30);").await;
    let Database::Postgres(pool) = ledger.db().clone() else {
        unreachable!("a PostgreSQL ledger")
    };
    let terminate = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let terminated: Option<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event = 'PgSleep'
                    AND query LIKE 'INSERT INTO events%'",
            )
            .fetch_optional(&pool)
            .await
            .unwrap();
            if terminated == Some(true) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the group never slept"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };

    let (outcomes, ()) = tokio::join!(second_events_at_once(&repository, &ids), terminate);

    for outcome in &outcomes {
        assert!(
            matches!(outcome, Err(PersistenceError::UnknownError(_))),
            "{outcomes:?}"
        );
    }
    for id in &ids {
        assert_eq!(stored_count(&repository, id).await, 1, "{id}");
    }
}

/// `ledger` caches the organization at creation; `other` (a second process) changes it.
async fn two_processes_one_outdated(
    backend: Backend,
) -> (TestLedger, orgledger::ledger::Ledger, Uuid) {
    let ledger = spawn_ledger(backend).await;
    let org = create_org(&ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    let other = ledger.reopen().await;
    (ledger, other, org)
}

async fn a_refusal_decided_on_a_cache_another_process_outdated_is_decided_again(backend: Backend) {
    let (ledger, other, org) = two_processes_one_outdated(backend).await;
    add_member(&other, org, "olivia", "mia", Role::Member).await;
    let (_, latest) = other.load(org).await.unwrap();
    // On the cache alone mia is no member, and the change would be refused.
    let changed = run(&ledger, org, "olivia", set_role("mia", Role::Admin)).await;
    assert_eq!(changed.version, latest + 1);
    assert_eq!(changed.state.members[&uid("mia")].role, Role::Admin);
    let (state, version) = other.load(org).await.unwrap();
    assert_eq!(
        (state.members[&uid("mia")].role.clone(), version),
        (Role::Admin, latest + 1)
    );
}

async fn a_no_op_decided_on_a_cache_another_process_outdated_is_decided_again(backend: Backend) {
    let (ledger, other, org) = two_processes_one_outdated(backend).await;
    add_member(&ledger, org, "olivia", "mia", Role::Member).await;
    let latest = run(&other, org, "olivia", set_role("mia", Role::Admin))
        .await
        .version;
    // On the cache mia is still a member, and making her one would change nothing.
    let changed = run(&ledger, org, "olivia", set_role("mia", Role::Member)).await;
    assert_eq!(changed.events.len(), 1, "{:?}", changed.events);
    assert_eq!(changed.version, latest + 1);
    let (state, _) = other.load(org).await.unwrap();
    assert_eq!(state.members[&uid("mia")].role, Role::Member);
}

async fn a_commit_decided_on_an_outdated_cache_lands_after_the_other_process_commits(
    backend: Backend,
) {
    let (ledger, other, org) = two_processes_one_outdated(backend).await;
    add_member(&ledger, org, "olivia", "mia", Role::Member).await;
    add_member(&other, org, "olivia", "vic", Role::Member).await;
    let (_, latest) = other.load(org).await.unwrap();
    // Valid on the cache too, but its next sequence is vic's invitation's: decided again.
    let changed = run(&ledger, org, "olivia", set_role("mia", Role::Admin)).await;
    assert_eq!(changed.version, latest + 1);
    let (state, version) = other.load(org).await.unwrap();
    assert_eq!(version, latest + 1);
    assert_eq!(state.members[&uid("mia")].role, Role::Admin);
    assert_eq!(state.members[&uid("vic")].role, Role::Member);
    assert_eq!(
        count(ledger.db(), "SELECT count(*) FROM events").await,
        latest as i64 + 1
    );
}

async fn if_match_is_checked_against_the_latest_version_not_an_outdated_cache(backend: Backend) {
    let (ledger, other, org) = two_processes_one_outdated(backend).await;
    let (_, cached) = ledger.load(org).await.unwrap();
    add_member(&other, org, "olivia", "mia", Role::Member).await;
    let (_, latest) = other.load(org).await.unwrap();
    let context = RequestContext::default();
    let update = || {
        OrganizationCommand::UpdateOrganization(UpdateOrganization {
            workflow_mode: Some(WorkflowMode::Founder),
            ..Default::default()
        })
    };
    let stale = ledger
        .run(org, cmd(user("olivia"), update()), &context, Some(cached))
        .await
        .unwrap_err();
    assert!(
        matches!(stale, LedgerError::VersionMismatch { expected, actual }
            if expected == cached && actual == latest),
        "{stale:?}"
    );
    let current = ledger
        .run(org, cmd(user("olivia"), update()), &context, Some(latest))
        .await
        .unwrap();
    assert_eq!(current.version, latest + 1);
}

async fn a_snapshot_another_process_wrote_since_does_not_block_the_next_one(backend: Backend) {
    let (ledger, other, org) = two_processes_one_outdated(backend).await;
    add_member(&ledger, org, "olivia", "mia", Role::Member).await;
    let (_, version) = ledger.load(org).await.unwrap();
    // This process writes snapshot 1, the other snapshot 2 up to just before the third...
    let to_first = SNAPSHOT_EVERY + 1 - version;
    ledger
        .import(org, role_flips(to_first, "mia"), HashMap::new())
        .await
        .unwrap();
    other
        .import(
            org,
            role_flips(2 * SNAPSHOT_EVERY - 2, "mia"),
            HashMap::new(),
        )
        .await
        .unwrap();
    // ...and this one catches its cached state up, still knowing only of snapshot 1.
    let (state, version) = ledger.load(org).await.unwrap();
    assert_eq!(version, 3 * SNAPSHOT_EVERY - 1);
    let target = if state.members[&uid("mia")].role == Role::Admin {
        Role::Member
    } else {
        Role::Admin
    };
    let changed = ledger
        .run(
            org,
            cmd(user("olivia"), set_role("mia", target)),
            &RequestContext::default(),
            None,
        )
        .await
        .expect("the third snapshot is written after the other process's second");
    assert_eq!(changed.version, 3 * SNAPSHOT_EVERY);
    assert_eq!(
        count(ledger.db(), "SELECT max(current_snapshot) FROM snapshots").await,
        3
    );
}

/// A snapshot's number only tells its replacement from a race. One set as high as a column
/// holds (from outside: nothing here writes it) cannot be followed by the next number, so
/// the next snapshot starts again at 1 and replaces it, rather than every later snapshot
/// write of the organization failing the column's check.
async fn a_snapshot_numbered_as_high_as_numbers_go_is_replaced_not_overflowed(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = acme_with_mia(&ledger).await;
    ledger
        .import(org, role_flips(SNAPSHOT_EVERY, "mia"), HashMap::new())
        .await
        .unwrap();
    let first_at = count(ledger.db(), "SELECT last_sequence FROM snapshots").await;
    assert!(first_at > 0, "the import wrote a snapshot");
    try_execute(
        ledger.db(),
        "UPDATE snapshots SET current_snapshot = 9223372036854775807",
    )
    .await
    .unwrap();

    let cold = ledger.reopen().await;
    cold.import(org, role_flips(SNAPSHOT_EVERY, "mia"), HashMap::new())
        .await
        .expect("the next snapshot is written");
    let (_, version) = cold.load(org).await.unwrap();
    assert_eq!(
        count(ledger.db(), "SELECT last_sequence FROM snapshots").await as usize,
        version
    );
    assert_eq!(
        count(ledger.db(), "SELECT current_snapshot FROM snapshots").await,
        1
    );
    add_member(&cold, org, "olivia", "noor", Role::Member).await;
    let fresh = ledger.reopen().await;
    let (loaded, now) = fresh.load(org).await.unwrap();
    assert_eq!(
        fresh.read_stats().events(),
        (now - version) as u64,
        "loads start from it"
    );
    let mut replayed = Organization::default();
    for event in ledger.events(org).await.unwrap() {
        cqrs_es::Aggregate::apply(&mut replayed, event.payload);
    }
    assert_eq!(loaded, replayed);
}

async fn a_command_on_a_cached_organization_reads_nothing_before_it_commits(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = acme_with_mia(&ledger).await;
    let stats = ledger.read_stats();
    let (catch_ups, events) = (stats.catch_ups(), stats.events());
    run(&ledger, org, "olivia", set_role("mia", Role::Admin)).await;
    assert_eq!(
        (stats.catch_ups(), stats.events()),
        (catch_ups, events),
        "decided on the cached state, as it was"
    );
    // A refusal is confirmed on the latest state: one catch-up read.
    let refused = ledger
        .run(
            org,
            cmd(user("olivia"), set_role("nobody", Role::Admin)),
            &RequestContext::default(),
            None,
        )
        .await;
    assert!(refused.is_err());
    assert_eq!(stats.catch_ups(), catch_ups + 1);
}

/// A snapshot's cost grows with the organization, an event's replay does not: a 1,000-member
/// organization is snapshotted every 400 events, not every 50, and a process that never saw
/// it still loads exactly what a full replay gives.
async fn a_large_organization_is_snapshotted_less_often_and_loads_as_a_full_replay(
    backend: Backend,
) {
    let ledger = spawn_ledger(backend).await;
    let org = acme_with_mia(&ledger).await;
    let joins: Vec<OrganizationEvent> = (0..1_000)
        .map(|n| member_joined(&format!("user-{n:04}"), chrono::Utc::now()))
        .collect();
    ledger.import(org, joins, HashMap::new()).await.unwrap();
    let (state, imported) = ledger.load(org).await.unwrap();
    let interval = snapshot_interval(&state);
    assert_eq!(interval, 400);
    let snapshot_at = || async {
        count(
            ledger.db(),
            "SELECT last_sequence FROM snapshots WHERE aggregate_type = 'organization'",
        )
        .await as usize
    };
    assert_eq!(
        snapshot_at().await,
        imported,
        "the import crossed a multiple of 400"
    );

    // Twice the small organizations' interval, short of the next multiple of 400.
    let commands = 2 * SNAPSHOT_EVERY;
    assert!(imported % interval + commands < interval);
    for i in 0..commands {
        let role = if i % 2 == 0 {
            Role::Viewer
        } else {
            Role::Member
        };
        run(&ledger, org, "olivia", set_role("mia", role)).await;
    }
    assert_eq!(
        snapshot_at().await,
        imported,
        "no snapshot since the import"
    );

    let cold = ledger.reopen().await;
    let (loaded, version) = cold.load(org).await.unwrap();
    assert_eq!(version, imported + commands);
    assert_eq!(cold.read_stats().events(), commands as u64);
    let mut replayed = Organization::default();
    for event in ledger.events(org).await.unwrap() {
        cqrs_es::Aggregate::apply(&mut replayed, event.payload);
    }
    assert_eq!(loaded, replayed);
    assert_eq!(loaded.members.len(), 1_002);
}

/// The pools ping only a connection idle for `PING_IDLE_FOR` (a ping on every acquire cost a
/// round trip per statement): one the server closed while it sat idle is found out and
/// replaced before a command uses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_server_closed_while_idle_is_replaced_on_postgres() {
    let ledger = spawn_ledger(Backend::Postgres).await;
    let org = acme_with_mia(&ledger).await;
    let Database::Postgres(pool) = ledger.db().clone() else {
        unreachable!("a PostgreSQL ledger")
    };
    // A connection goes back to the pool on a task of its own after its statement, so the
    // command's answer can come before the pool counts it idle.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while pool.num_idle() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(pool.num_idle() > 0, "the commands left idle connections");

    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&ledger.database.url)
        .await
        .unwrap();
    let closed: i64 = sqlx::query_scalar(
        "WITH others AS MATERIALIZED (
             SELECT pid FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid())
         SELECT count(*) FROM others WHERE pg_terminate_backend(pid)",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(
        closed > 0,
        "the pool's connections were closed by the server"
    );
    tokio::time::sleep(PING_IDLE_FOR * 2).await;

    let committed = run(&ledger, org, "olivia", set_role("mia", Role::Viewer)).await;
    assert_eq!(committed.events.len(), 1);
    assert_eq!(
        count(
            ledger.db(),
            &format!("SELECT count(*) FROM events WHERE aggregate_id = '{org}'")
        )
        .await,
        committed.version as i64
    );
}

/// An import decides nothing and does not retry: within a process it takes its turn with
/// the organization's commands, so one sent beside them lands instead of losing the race
/// for the next sequence.
async fn an_import_beside_commands_on_one_organization_lands_with_them(backend: Backend) {
    let test = spawn_ledger(backend).await;
    let ledger = &test.ledger;
    let org = acme_with_mia(ledger).await;
    for i in 0..8 {
        add_member(ledger, org, "olivia", &format!("m{i}"), Role::Member).await;
    }
    let (_, before) = ledger.load(org).await.unwrap();
    let context = RequestContext::default();
    let commands = (0..8).map(|i| {
        let promote = cmd(user("olivia"), set_role(&format!("m{i}"), Role::Admin));
        ledger.run(org, promote, &context, None)
    });
    let (commands, imported) = tokio::join!(
        futures::future::join_all(commands),
        ledger.import(org, role_flips(100, "mia"), HashMap::new())
    );
    for committed in commands {
        committed.unwrap();
    }
    imported.unwrap();
    let (_, after) = ledger.load(org).await.unwrap();
    assert_eq!(after, before + 8 + 100);
}

/// A store written before slugs were kept unique under racing renames may hold one slug
/// twice: verify names both holders.
async fn verify_names_every_organization_holding_a_slug_another_holds(backend: Backend) {
    let service = spawn_service(backend).await;
    let ledger = &service.ledger;
    let first = create_org(ledger, "Alpha", "alpha", "olivia")
        .await
        .organization_id;
    let second = create_org(ledger, "Beta", "beta", "bob")
        .await
        .organization_id;
    create_org(ledger, "Gamma", "gamma", "gus").await;
    // Appended without the rules, as the race did.
    let renamed = OrganizationEvent::OrganizationUpdated(OrganizationUpdated {
        slug: Some(Change {
            from: "beta".into(),
            to: "alpha".into(),
        }),
        ..Default::default()
    });
    ledger
        .import(second, vec![renamed], HashMap::new())
        .await
        .unwrap();
    service.catch_up().await;

    let report = orgledger::verify::verify(&service, None, false)
        .await
        .unwrap();

    let mut problems: Vec<(Option<String>, String)> = report
        .findings
        .into_iter()
        .map(|finding| (finding.organization_id, finding.problem))
        .collect();
    problems.sort();
    let mut expected = vec![
        (
            Some(first.to_string()),
            format!("its slug \"alpha\" is also held by {second}"),
        ),
        (
            Some(second.to_string()),
            format!("its slug \"alpha\" is also held by {first}"),
        ),
    ];
    expected.sort();
    assert_eq!(problems, expected);
    assert_eq!(report.organizations, 3);
}

/// An organization whose invitations and groups went through every way they change: one
/// invitation pending, one revoked, a link used once of three, a link used up, a group
/// whose members joined, left it, and left the organization.
async fn organization_with_invitations_and_groups(ledger: &Ledger) -> Uuid {
    let org = create_org(ledger, "Initech", "initech", "olivia")
        .await
        .organization_id;
    add_member(ledger, org, "olivia", "mia", Role::Member).await;
    add_member(ledger, org, "olivia", "nina", Role::Member).await;
    add_member(ledger, org, "olivia", "omar", Role::Viewer).await;
    let send = |email: Option<&str>, max_uses: i64| {
        let (send, token) = invitation(email, Role::Viewer, max_uses);
        (
            send.invitation_id,
            token.sha256,
            OrganizationCommand::SendInvitation(send),
        )
    };
    let accept = |token: &str, user: &str| {
        OrganizationCommand::AcceptInvitation(AcceptInvitation {
            token_sha256: token.to_owned(),
            user_id: uid(user),
            email: Email::parse("email", &format!("{user}@example.org")).unwrap(),
            first_name: None,
            last_name: None,
        })
    };
    let (_, _, pending) = send(Some("pam@example.com"), 1);
    run(ledger, org, "olivia", pending).await;
    let (revoked, _, to_revoke) = send(Some("rex@example.com"), 1);
    run(ledger, org, "olivia", to_revoke).await;
    let revoke = RevokeInvitation {
        invitation_id: revoked,
    };
    run(
        ledger,
        org,
        "olivia",
        OrganizationCommand::RevokeInvitation(revoke),
    )
    .await;
    let (_, open_link, link) = send(None, 3);
    run(ledger, org, "olivia", link).await;
    run(ledger, org, "lou", accept(&open_link, "lou")).await;
    let (_, used_up, link) = send(None, 1);
    run(ledger, org, "olivia", link).await;
    run(ledger, org, "uma", accept(&used_up, "uma")).await;
    let group_id = Uuid::now_v7();
    let group = CreateGroup {
        group_id,
        name: "Support \"Ω\"".into(),
        description: None,
    };
    run(
        ledger,
        org,
        "olivia",
        OrganizationCommand::CreateGroup(group),
    )
    .await;
    for user in ["mia", "nina", "omar"] {
        let membership = GroupMembership {
            group_id,
            user_id: uid(user),
        };
        run(
            ledger,
            org,
            "olivia",
            OrganizationCommand::AddGroupMember(membership),
        )
        .await;
    }
    let leaves_group = GroupMembership {
        group_id,
        user_id: uid("omar"),
    };
    run(
        ledger,
        org,
        "olivia",
        OrganizationCommand::RemoveGroupMember(leaves_group),
    )
    .await;
    let removed = RemoveMember {
        user_id: uid("nina"),
    };
    run(
        ledger,
        org,
        "olivia",
        OrganizationCommand::RemoveMember(removed),
    )
    .await;
    org
}

async fn verify_passes_a_history_that_holds_together(backend: Backend) {
    let service = spawn_service(backend).await;
    let ledger = &service.ledger;
    // What jsonb gives back differently from what was written: non-ASCII, escapes, and the
    // sealed client address and agent in the metadata.
    let context = RequestContext {
        request_id: Some("req-ü".into()),
        client_ip: Some("203.0.113.7".into()),
        user_agent: Some("Müller \"agent\" \\ 😀\n".into()),
        idempotency_key: None,
        idempotency_claim: None,
    };
    ledger
        .create_organization(
            create_command("Zürich \"Ω\" Ltd", "zurich", "zoe"),
            true,
            &context,
        )
        .await
        .unwrap();
    let big = acme_with_mia(ledger).await;
    organization_with_invitations_and_groups(ledger).await;
    for _ in 0..SNAPSHOT_EVERY / 2 {
        run(ledger, big, "olivia", set_role("mia", Role::Viewer)).await;
        run(ledger, big, "olivia", set_role("mia", Role::Member)).await;
    }
    let purged = create_org(ledger, "Gone", "gone", "gail")
        .await
        .organization_id;
    add_member(ledger, purged, "gail", "gil", Role::Member).await;
    for _ in 0..SNAPSHOT_EVERY / 2 {
        run(ledger, purged, "gail", set_role("gil", Role::Viewer)).await;
        run(ledger, purged, "gail", set_role("gil", Role::Member)).await;
    }
    let snapshot_of =
        |org: Uuid| format!("SELECT count(*) FROM snapshots WHERE aggregate_id = '{org}'");
    assert_eq!(count(service.db(), &snapshot_of(purged)).await, 1);
    let purge = OrganizationCommand::PurgeOrganization(PurgeOrganization {
        confirm_name: "Gone".into(),
    });
    run(ledger, purged, "gail", purge).await;
    // Purged with settings, providers, roles and service accounts: none of them is left.
    let (settled, ..) = organization_with_settings_and_accounts(ledger).await;
    let purge_settled = OrganizationCommand::PurgeOrganization(PurgeOrganization {
        confirm_name: "Settled".into(),
    });
    run(ledger, settled, "olivia", purge_settled).await;
    // History imported as it was, with no rule checked: its first event is not a creation.
    // Its providers and roles are kept without a directory row, by the replay as by the
    // read models.
    let imported = Uuid::now_v7();
    let mut history = role_flips(2, "ivy");
    history.push(OrganizationEvent::AiProviderAdded(AiProviderAdded {
        provider_id: Uuid::now_v7(),
        name: "Main".into(),
        kind: "openai".into(),
        enabled: true,
        api_key: Secret::from("sk-imported-1234".to_owned()),
        api_key_last4: "1234".into(),
    }));
    history.push(OrganizationEvent::RoleDefined(RoleDefined {
        key: "auditor".into(),
        name: "Auditor".into(),
        permissions: vec![Permission::ReadAudit],
    }));
    ledger
        .import(imported, history, HashMap::new())
        .await
        .unwrap();
    service.catch_up().await;

    let report = orgledger::verify::verify(&service, None, false)
        .await
        .unwrap();

    let imported_finding = orgledger::verify::Finding {
        organization_id: Some(imported.to_string()),
        sequence: Some(1),
        problem: "the first event is MemberRoleChanged, not OrganizationCreated".into(),
    };
    assert_eq!(report.findings, [imported_finding], "{report:?}");
    assert_eq!(report.organizations, 6);
    let stored = count(service.db(), "SELECT count(*) FROM events").await;
    assert_eq!(report.events, stored as u64);
    assert_eq!(
        report.events_authenticated, stored as u64,
        "every event carries a MAC that matches it, imported ones too"
    );
    assert_eq!(
        report.snapshots, 1,
        "the purged organization's went with it"
    );
    assert_eq!(count(service.db(), &snapshot_of(purged)).await, 0);
    assert!(report.read_models_checked);
    assert_eq!(report.events_not_yet_projected, 0);

    let one = orgledger::verify::verify(&service, Some(purged), false)
        .await
        .unwrap();
    assert_eq!((one.organizations, one.findings.len()), (1, 0), "{one:?}");
    assert!(
        !one.read_models_checked,
        "the read models are the whole log's"
    );

    // A snapshot in a state shape this version no longer reads: loads replay past it, so it
    // is counted apart, not a finding.
    let id = big.to_string();
    let key = ledger.keys().get(&id).await.unwrap().expect("a live key");
    let older_shape = key.encrypt(br#"{"members":"kept another way"}"#, id.as_bytes());
    orgledger_projections::with_pool!(service.db(), pool => {
        sqlx::query("UPDATE snapshots SET state = $1 WHERE aggregate_id = $2")
            .bind(older_shape)
            .bind(&id)
            .execute(pool)
            .await
            .unwrap();
    });
    let older = orgledger::verify::verify(&service, Some(big), false)
        .await
        .unwrap();
    assert_eq!(
        (
            older.findings.len(),
            older.snapshots,
            older.snapshots_not_compared
        ),
        (0, 0, 1),
        "{older:?}"
    );
    // Its key destroyed, a purged organization's tombstone is still compared: it holds no
    // personal data.
    let tombstone =
        format!("UPDATE rm_audit_log SET actor_id = 'mallory' WHERE organization_id = '{purged}'");
    assert_eq!(try_execute(service.db(), &tombstone).await, Ok(1));
    let retold = orgledger::verify::verify(&service, Some(purged), false)
        .await
        .unwrap();
    let problems: Vec<&str> = retold.findings.iter().map(|f| f.problem.as_str()).collect();
    assert_eq!(problems.len(), 1, "{retold:?}");
    assert!(
        problems[0].ends_with("is not the one its event makes (actor_id)"),
        "{problems:?}"
    );
    let unknown = Uuid::now_v7();
    let refused = orgledger::verify::verify(&service, Some(unknown), false).await;
    assert!(
        matches!(refused, Err(orgledger::verify::VerifyError::UnknownOrganization(id)) if id == unknown),
        "{refused:?}"
    );
}

/// The last migration before event MACs, on each backend.
fn migration_before_macs(backend: Backend) -> i64 {
    match backend {
        Backend::Postgres => 20261202000008,
        Backend::Sqlite => 20261202000007,
    }
}

async fn a_store_from_before_macs_has_its_events_vouched_for_and_nothing_written_since(
    backend: Backend,
) {
    let database = fresh_database(backend).await;
    let db = Database::connect(&database.url).await.unwrap();
    db.migrate_through(migration_before_macs(backend))
        .await
        .unwrap();
    // A history as a version before MACs stored it: more than one page of marking.
    let master_key = MasterKey::generate();
    let legacy = Uuid::now_v7();
    Ledger::new(db.clone(), master_key.clone())
        .keys()
        .get_or_create(&legacy.to_string())
        .await
        .unwrap();
    let created = OrganizationEvent::OrganizationCreated(OrganizationCreated {
        organization_id: legacy,
        name: "Legacy".into(),
        slug: "legacy".into(),
        kind: OrganizationKind::Team,
        settings: Settings::default(),
        created_at: now(),
    });
    let rows: Vec<String> = std::iter::once(created)
        .chain(role_flips(1_500, "lee"))
        .enumerate()
        .map(|(index, event)| {
            format!(
                "('organization', '{legacy}', {}, '{}', '{}', '{}', '{{}}')",
                index + 1,
                cqrs_es::DomainEvent::event_type(&event),
                cqrs_es::DomainEvent::event_version(&event),
                serde_json::to_string(&event).unwrap().replace('\'', "''")
            )
        })
        .collect();
    try_execute(
        &db,
        &format!(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata) VALUES {}",
            rows.join(", ")
        ),
    )
    .await
    .unwrap();
    // Text that is not JSON where a payload belongs (SQLite's column is only `text`): it
    // cannot be given a MAC.
    let garbled = backend == Backend::Sqlite;
    if garbled {
        try_execute(
            &db,
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata)
             VALUES ('organization', '0190f5a0-0000-7000-8000-000000000002', 1,
                     'OrganizationCreated', '1', 'not json', '{}')",
        )
        .await
        .unwrap();
    }
    db.migrate().await.unwrap();
    // Written since, without the master key: not one of the listed.
    try_execute(
        &db,
        &format!(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata)
             SELECT aggregate_type, aggregate_id, 1502, event_type, event_version, payload,
                    metadata
               FROM events WHERE aggregate_id = '{legacy}' AND sequence = 1501"
        ),
    )
    .await
    .unwrap();
    let service = Orgledger::open(db.clone(), master_key.clone())
        .await
        .unwrap();
    let problems = |report: &orgledger::verify::VerifyReport| -> Vec<(usize, String)> {
        let mut problems: Vec<(usize, String)> = report
            .findings
            .iter()
            .map(|f| (f.sequence.unwrap_or_default(), f.problem.clone()))
            .collect();
        problems.dedup_by(|a, b| a.1 == b.1);
        problems
    };
    let forged = (
        1502,
        "it carries no MAC, and no version before MACs stored it: it was written without the \
         master key"
            .to_owned(),
    );

    let before = orgledger::verify::verify(&service, Some(legacy), false)
        .await
        .unwrap();
    assert_eq!(before.findings.len(), 1502, "each event named");
    assert_eq!(
        problems(&before),
        [
            (
                1,
                "it carries no MAC: a version before MACs stored it (`orgledger migrate \
                 --authenticate-legacy-events` gives it one, on a store whose rows are trusted)"
                    .to_owned()
            ),
            forged.clone()
        ]
    );

    // Only the MAC may change with the mark: not a column the database assigned.
    let junk_mac = match backend {
        Backend::Postgres => format!("'\\x{}'::bytea", "ab".repeat(32)),
        Backend::Sqlite => format!("X'{}'", "ab".repeat(32)),
    };
    if backend == Backend::Postgres {
        let error = try_execute(
            &db,
            &format!(
                "UPDATE events SET mac = {junk_mac}, recorded_at = recorded_at - interval '1 day'
                  WHERE aggregate_id = '{legacy}' AND sequence = 1"
            ),
        )
        .await
        .unwrap_err();
        assert!(error.contains("append-only"), "{error}");
    }
    // Plain UPDATE rights can give a listed event a MAC of their own first: it then reads
    // as altered for good, and the operator's marking goes on around it.
    assert_eq!(
        try_execute(
            &db,
            &format!(
                "UPDATE events SET mac = {junk_mac} WHERE aggregate_id = '{legacy}' AND sequence = 2"
            ),
        )
        .await,
        Ok(1)
    );

    let marked = service.ledger.authenticate_legacy(|_| {}).await.unwrap();
    assert_eq!(
        (marked.marked, marked.unreadable),
        (1500, u64::from(garbled))
    );
    let after = orgledger::verify::verify(&service, Some(legacy), false)
        .await
        .unwrap();
    let altered = (
        2,
        "its MAC does not match it: it was altered, moved from elsewhere, or written without \
         the master key"
            .to_owned(),
    );
    assert_eq!(problems(&after), [altered, forged], "{after:?}");
    assert_eq!(after.events_authenticated, 1500);
    let again = service.ledger.authenticate_legacy(|_| {}).await.unwrap();
    assert_eq!(again.marked, 0, "a MAC once given is not given again");

    // The key is checked against events this version stored, and one of them altered does
    // not refuse the right key.
    let current = acme_with_mia(&service.ledger).await;
    let unguard = match backend {
        Backend::Postgres => "ALTER TABLE events DISABLE TRIGGER USER",
        Backend::Sqlite => "DROP TRIGGER events_refuse_update",
    };
    try_execute(&db, unguard).await.unwrap();
    assert_eq!(
        try_execute(
            &db,
            &format!(
                "UPDATE events SET event_version = 'altered'
                  WHERE aggregate_id = '{current}' AND sequence = 1"
            ),
        )
        .await,
        Ok(1)
    );
    let right_key = service.ledger.authenticate_legacy(|_| {}).await.unwrap();
    assert_eq!(right_key.marked, 0);
    // A mistyped master key: the marks it would make would never match.
    let mistyped = Ledger::new(db.clone(), MasterKey::generate());
    let refused = mistyped.authenticate_legacy(|_| {}).await;
    assert!(
        matches!(&refused, Err(error) if error.to_string().contains("matches none")),
        "{refused:?}"
    );
}

/// A service holding [`organization_with_invitations_and_groups`], projected, which
/// `verify` passes: the starting point of the read models' tamper tests.
async fn an_organization_verify_passes(backend: Backend) -> (TestService, Uuid) {
    let service = spawn_service(backend).await;
    let org = organization_with_invitations_and_groups(&service.ledger).await;
    service.catch_up().await;
    let clean = orgledger::verify::verify(&service, Some(org), false)
        .await
        .unwrap();
    assert_eq!(clean.findings, [], "{clean:?}");
    (service, org)
}

/// The pending invitations and the groups read models are compared with the history too:
/// an invitation offering another role or expiring later, a group that gained a member or
/// another description, are findings; so is a member's profile or joining time rewritten in
/// the members read model (named by its columns alone).
async fn verify_finds_invitations_and_groups_that_differ_from_the_history(backend: Backend) {
    let (service, org) = an_organization_verify_passes(backend).await;
    let db = service.db();
    let pending = format!(
        "SELECT id FROM rm_invitations WHERE organization_id = '{org}' AND email IS NOT NULL \
           AND status = 'pending'"
    );
    let pending: Vec<(String,)> = db.fetch_all(&pending, &[]).await.unwrap();
    assert_eq!(pending.len(), 1, "pam's");
    let pending = &pending[0].0;
    let ended = |status: &str| {
        format!(
            "SELECT id FROM rm_invitations WHERE organization_id = '{org}' AND status = '{status}' \
              ORDER BY id LIMIT 1"
        )
    };
    let accepted: Vec<(String,)> = db.fetch_all(&ended("accepted"), &[]).await.unwrap();
    let accepted = &accepted[0].0;
    let revoked: Vec<(String,)> = db.fetch_all(&ended("revoked"), &[]).await.unwrap();
    let revoked = &revoked[0].0;
    for sql in [
        // Ended invitations are compared too: the replayed state keeps only pending ones.
        format!("UPDATE rm_invitations SET role = 'owner', uses = 0 WHERE id = '{accepted}'"),
        format!("DELETE FROM rm_invitations WHERE id = '{revoked}'"),
        format!(
            "UPDATE rm_invitations SET role = 'admin', expires_at_us = expires_at_us + 86400000000 \
              WHERE id = '{pending}'"
        ),
        format!(
            "UPDATE rm_members \
                SET email = 'mia@elsewhere.example', title = 'CEO', joined_at_us = joined_at_us - 1, \
                    last_name_folded = 'zorro' \
              WHERE organization_id = '{org}' AND user_id = 'mia'"
        ),
        format!(
            "UPDATE rm_groups SET member_ids = '[\"mia\", \"omar\"]', description = 'Sales' \
              WHERE organization_id = '{org}'"
        ),
    ] {
        assert_eq!(try_execute(db, &sql).await, Ok(1), "{sql}");
    }

    let report = orgledger::verify::verify(&service, Some(org), false)
        .await
        .unwrap();

    let problems: Vec<&str> = report.findings.iter().map(|f| f.problem.as_str()).collect();
    let group = count(
        db,
        &format!("SELECT count(*) FROM rm_groups WHERE organization_id = '{org}'"),
    )
    .await;
    assert_eq!(group, 1);
    let group_id: Vec<(String,)> = db
        .fetch_all(
            &format!("SELECT id FROM rm_groups WHERE organization_id = '{org}'"),
            &[],
        )
        .await
        .unwrap();
    let group_id = &group_id[0].0;
    assert_eq!(
        problems,
        [
            "its members read model holds mia differing from its history \
             (email, joined_at, last_name_folded, title)"
                .to_owned(),
            format!(
                "its invitations read model holds {accepted} differing from its history \
                 (role, uses)"
            ),
            format!(
                "its invitations read model holds {pending} differing from its history \
                 (expires_at, role)"
            ),
            format!("its invitations read model lacks {revoked}, which its history holds"),
            format!(
                "its groups read model differs from its history: it holds [{group_id} \
                 \"Support \\\"Ω\\\"\" of [mia, omar]] where the events say [{group_id} \
                 \"Support \\\"Ω\\\"\" of [mia]]"
            ),
            format!(
                "its groups read model holds {group_id} differing from its history \
                 (description)"
            ),
        ],
        "{report:#?}"
    );
}

/// An organization whose settings, AI providers, custom roles and service accounts each
/// changed more than once, left deleted (so its deletion's times are in its directory row).
async fn organization_with_settings_and_accounts(ledger: &Ledger) -> (Uuid, Uuid, Uuid, Uuid) {
    let org = create_org(ledger, "Settled", "settled", "olivia")
        .await
        .organization_id;
    add_member(ledger, org, "olivia", "mia", Role::Member).await;
    let update = OrganizationCommand::UpdateOrganization(UpdateOrganization {
        timezone: Some("Europe/Berlin".into()),
        logo_url: Some(Some("https://example.com/logo.png".into())),
        ..UpdateOrganization::default()
    });
    let restrict = OrganizationCommand::SetClientRestrictions(ClientAccess {
        default: Access::Block,
        clients: [("cursor".to_owned(), Access::Allow)].into(),
    });
    let plan = OrganizationCommand::ChangePlan(ChangePlan {
        plan: "team".into(),
        seats: Some(10),
    });
    for command in [
        update,
        restrict,
        OrganizationCommand::SetSmartToolRouting(true),
        plan,
    ] {
        run(ledger, org, "olivia", command).await;
    }
    let (kept, removed) = (Uuid::now_v7(), Uuid::now_v7());
    for (provider, name) in [(kept, "Main"), (removed, "Spare")] {
        let add = OrganizationCommand::AddAiProvider(AddAiProvider {
            provider_id: provider,
            name: name.into(),
            kind: "openai".into(),
            api_key: Secret::from("sk-first-key-1234".to_owned()),
            enabled: true,
        });
        run(ledger, org, "olivia", add).await;
    }
    let rekeyed = OrganizationCommand::UpdateAiProvider(UpdateAiProvider {
        provider_id: kept,
        enabled: Some(false),
        api_key: Some(Secret::from("sk-second-key-9876".to_owned())),
    });
    let dropped = OrganizationCommand::RemoveAiProvider(AiProviderRef {
        provider_id: removed,
    });
    for command in [rekeyed, dropped] {
        run(ledger, org, "olivia", command).await;
    }
    for key in ["auditor", "helper"] {
        let define = OrganizationCommand::DefineRole(DefineRole {
            key: key.into(),
            name: format!("The {key}"),
            permissions: vec![Permission::ViewOrganization, Permission::ReadAudit],
        });
        run(ledger, org, "olivia", define).await;
    }
    let undefine = OrganizationCommand::DeleteRole(RoleRef {
        key: "helper".into(),
    });
    run(ledger, org, "olivia", undefine).await;
    let (rotated, deleted) = (Uuid::now_v7(), Uuid::now_v7());
    for account in [rotated, deleted] {
        let key = orgledger::tokens::issue("sa");
        let create = OrganizationCommand::CreateServiceAccount(CreateServiceAccount {
            service_account_id: account,
            name: "CI".into(),
            description: Some("builds".into()),
            scopes: vec![Scope::MembersRead, Scope::AuditRead],
            key_prefix: key.secret.chars().take(11).collect(),
            key_sha256: key.sha256,
        });
        run(ledger, org, "olivia", create).await;
    }
    let key = orgledger::tokens::issue("sa");
    let rotate = OrganizationCommand::RotateServiceAccountKey(RotateServiceAccountKey {
        service_account_id: rotated,
        key_prefix: key.secret.chars().take(11).collect(),
        key_sha256: key.sha256,
    });
    let remove = OrganizationCommand::DeleteServiceAccount(ServiceAccountRef {
        service_account_id: deleted,
    });
    let delete = || {
        OrganizationCommand::DeleteOrganization(DeleteOrganization {
            confirm_name: "Settled".into(),
        })
    };
    for command in [
        rotate,
        remove,
        delete(),
        OrganizationCommand::RestoreOrganization,
        delete(),
    ] {
        run(ledger, org, "olivia", command).await;
    }
    (org, kept, rotated, deleted)
}

/// The organization's directory row (its settings among them), its AI providers, its custom
/// roles and its service accounts are compared with the history too: a row that differs is
/// named by the fields that differ, not their values (one is a key's hash); a row only one
/// side holds, by its id.
async fn verify_finds_settings_roles_providers_and_service_accounts_that_differ_from_the_history(
    backend: Backend,
) {
    let service = spawn_service(backend).await;
    let (org, provider, rotated, deleted) =
        organization_with_settings_and_accounts(&service.ledger).await;
    service.catch_up().await;
    let clean = orgledger::verify::verify(&service, Some(org), false)
        .await
        .unwrap();
    assert_eq!(clean.findings, [], "{clean:?}");
    let db = service.db();
    for sql in [
        format!(
            "UPDATE rm_organizations SET timezone = 'UTC', member_count = 7, \
                    client_restrictions = '{{\"default\":\"allow\",\"clients\":{{}}}}', \
                    name_folded = 'zebra' \
              WHERE id = '{org}'"
        ),
        format!("DELETE FROM rm_ai_providers WHERE id = '{provider}'"),
        format!(
            "UPDATE rm_roles SET permissions = '[\"members:read\", \"settings:manage\"]' \
              WHERE organization_id = '{org}' AND key = 'auditor'"
        ),
        format!(
            "UPDATE rm_service_accounts \
                SET scopes = '[\"members:read\", \"members:write\"]', key_sha256 = 'forged' \
              WHERE id = '{rotated}'"
        ),
        format!(
            "INSERT INTO rm_service_accounts (id, organization_id, name, description, scopes, \
                                              key_prefix, key_sha256, created_at_us) \
             VALUES ('{deleted}', '{org}', 'CI', 'builds', '[]', 'sa_x', 'x', 0)"
        ),
    ] {
        assert!(try_execute(db, &sql).await.unwrap() >= 1, "{sql}");
    }

    let report = orgledger::verify::verify(&service, Some(org), false)
        .await
        .unwrap();

    let problems: Vec<&str> = report.findings.iter().map(|f| f.problem.as_str()).collect();
    assert_eq!(
        problems,
        [
            format!(
                "its organizations read model holds {org} differing from its history \
                 (member_count, name_folded, settings.client_restrictions.clients.cursor, \
                 settings.client_restrictions.default, settings.timezone)"
            ),
            format!("its AI providers read model lacks {provider}, which its history holds"),
            "its custom roles read model holds auditor differing from its history \
             (permissions)"
                .to_owned(),
            format!(
                "its service accounts read model holds {rotated} differing from its history \
                 (key_sha256, scopes)"
            ),
            format!("its service accounts read model holds {deleted}, which its history does not"),
        ],
        "{report:#?}"
    );
    for finding in &report.findings {
        assert!(!finding.problem.contains("forged"), "{finding:?}");
    }
}

/// Every audit entry is compared, column by column, with the one its event makes: an entry
/// rewritten in place (who acted, what was done, when) is named with the columns that
/// differ, not their values.
async fn verify_names_audit_entries_that_are_not_the_ones_their_events_make(backend: Backend) {
    let (service, org) = an_organization_verify_passes(backend).await;
    let db = service.db();
    let entry =
        |sequence: u32| format!("WHERE organization_id = '{org}' AND sequence = {sequence}");
    for sql in [
        format!("UPDATE rm_audit_log SET actor_id = 'mallory' {}", entry(2)),
        format!(
            "UPDATE rm_audit_log SET occurred_at_us = occurred_at_us - 1000000 {}",
            entry(3)
        ),
        format!(
            "UPDATE rm_audit_log SET action = 'member.left', details = '{{}}' {}",
            entry(5)
        ),
    ] {
        assert_eq!(try_execute(db, &sql).await, Ok(1), "{sql}");
    }

    let report = orgledger::verify::verify(&service, Some(org), false)
        .await
        .unwrap();

    let findings: Vec<(Option<usize>, &str)> = report
        .findings
        .iter()
        .map(|finding| (finding.sequence, finding.problem.as_str()))
        .collect();
    assert_eq!(
        findings,
        [
            (
                Some(2),
                "its audit entry for event 2 is not the one its event makes (actor_id)"
            ),
            (
                Some(3),
                "its audit entry for event 3 is not the one its event makes (occurred_at)"
            ),
            (
                Some(5),
                "its audit entry for event 5 is not the one its event makes (action, details)"
            ),
        ],
        "{report:#?}"
    );

    // Past ten altered entries, the rest are counted; organizations checked at once still
    // report in the log's order.
    let later = create_org(&service.ledger, "Later", "later", "lia")
        .await
        .organization_id;
    service.catch_up().await;
    let events = count(
        db,
        &format!("SELECT count(*) FROM rm_audit_log WHERE organization_id = '{org}'"),
    )
    .await;
    assert!(events > 12, "{events}");
    for sql in [
        format!("UPDATE rm_audit_log SET request_id = 'forged' WHERE organization_id = '{org}'"),
        format!("UPDATE rm_audit_log SET actor_id = 'mallory' WHERE organization_id = '{later}'"),
    ] {
        assert!(try_execute(db, &sql).await.unwrap() > 0, "{sql}");
    }
    let whole = orgledger::verify::verify(&service, None, false)
        .await
        .unwrap();
    let of = |organization: Uuid| -> Vec<&str> {
        whole
            .findings
            .iter()
            .filter(|f| f.organization_id == Some(organization.to_string()))
            .map(|f| f.problem.as_str())
            .collect()
    };
    let mine = of(org);
    assert_eq!(mine.len(), 11, "{whole:#?}");
    assert!(
        mine[..10].iter().all(|p| p.contains("request_id)")),
        "{mine:?}"
    );
    assert_eq!(
        mine[10],
        format!(
            "and {} more of its audit entries are not the ones their events make",
            events - 10
        )
    );
    assert_eq!(of(later).len(), 2, "{whole:#?}");
    let order: Vec<Option<String>> = whole
        .findings
        .iter()
        .map(|f| f.organization_id.clone())
        .collect();
    let mut grouped = order.clone();
    grouped.dedup();
    assert_eq!(
        grouped,
        [Some(org.to_string()), Some(later.to_string())],
        "{order:?}"
    );
}

async fn verify_names_every_tampering_with_its_organization_and_event(backend: Backend) {
    let service = spawn_service(backend).await;
    let ledger = &service.ledger;
    let snapshotted = acme_with_mia(ledger).await;
    for _ in 0..SNAPSHOT_EVERY / 2 {
        run(ledger, snapshotted, "olivia", set_role("mia", Role::Viewer)).await;
        run(ledger, snapshotted, "olivia", set_role("mia", Role::Member)).await;
    }
    let gapped = create_org(ledger, "Gap", "gap", "gus")
        .await
        .organization_id;
    add_member(ledger, gapped, "gus", "gil", Role::Member).await;
    let foreign = create_org(ledger, "Other", "other", "otto")
        .await
        .organization_id;
    add_member(ledger, foreign, "otto", "ola", Role::Member).await;
    let clean = create_org(ledger, "Clean", "clean", "cleo")
        .await
        .organization_id;
    let keyless = create_org(ledger, "Keyless", "keyless", "kim")
        .await
        .organization_id;
    add_member(ledger, keyless, "kim", "kai", Role::Member).await;
    let swapped = create_org(ledger, "Swapped", "swapped", "sam")
        .await
        .organization_id;
    add_member(ledger, swapped, "sam", "sia", Role::Member).await;
    run(ledger, swapped, "sam", set_role("sia", Role::Viewer)).await;
    run(ledger, swapped, "sam", set_role("sia", Role::Admin)).await;
    let truncated = create_org(ledger, "Truncated", "truncated", "tia")
        .await
        .organization_id;
    add_member(ledger, truncated, "tia", "tom", Role::Member).await;
    let forged = create_org(ledger, "Forged", "forged", "fay")
        .await
        .organization_id;
    add_member(ledger, forged, "fay", "fin", Role::Member).await;
    run(ledger, forged, "fay", set_role("fin", Role::Viewer)).await;
    let stripped = create_org(ledger, "Stripped", "stripped", "sol")
        .await
        .organization_id;
    let vanished = create_org(ledger, "Vanished", "vanished", "val")
        .await
        .organization_id;
    let backdated = create_org(ledger, "Backdated", "backdated", "bea")
        .await
        .organization_id;
    add_member(ledger, backdated, "bea", "ben", Role::Member).await;
    let postdated = create_org(ledger, "Postdated", "postdated", "pia")
        .await
        .organization_id;
    add_member(ledger, postdated, "pia", "pat", Role::Member).await;
    service.catch_up().await;
    let db = service.db();
    let last_of = |org: Uuid| {
        let sql = format!("SELECT max(sequence) FROM events WHERE aggregate_id = '{org}'");
        async move { count(db, &sql).await }
    };
    let (swapped_last, truncated_last, forged_last, vanished_last) = (
        last_of(swapped).await,
        last_of(truncated).await,
        last_of(forged).await,
        last_of(vanished).await,
    );
    let (backdated_last, postdated_last) = (last_of(backdated).await, last_of(postdated).await);

    // What only someone with the database's own rights can do: the triggers go first.
    let unguard: &[&str] = match backend {
        Backend::Postgres => &["ALTER TABLE events DISABLE TRIGGER USER"],
        Backend::Sqlite => &[
            "DROP TRIGGER events_refuse_update",
            "DROP TRIGGER events_refuse_delete",
            "DROP TRIGGER event_log_refuse_update",
        ],
    };
    for sql in unguard {
        try_execute(db, sql).await.unwrap();
    }
    // The recording times, which the database sets and no MAC covers: a last event moved a
    // day before the one it follows, and another a year ahead.
    let retimed = match backend {
        Backend::Postgres => [
            format!(
                "UPDATE events SET recorded_at = recorded_at - interval '1 day'
                  WHERE aggregate_id = '{backdated}' AND sequence = {backdated_last}"
            ),
            format!(
                "UPDATE events SET recorded_at = recorded_at + interval '1 year'
                  WHERE aggregate_id = '{postdated}' AND sequence = {postdated_last}"
            ),
        ],
        Backend::Sqlite => [
            format!(
                "UPDATE event_log SET recorded_at = strftime('%Y-%m-%dT%H:%M:%fZ', recorded_at, '-1 day')
                  WHERE aggregate_id = '{backdated}' AND sequence = {backdated_last}"
            ),
            format!(
                "UPDATE event_log SET recorded_at = strftime('%Y-%m-%dT%H:%M:%fZ', recorded_at, '+1 year')
                  WHERE aggregate_id = '{postdated}' AND sequence = {postdated_last}"
            ),
        ],
    };
    for sql in &retimed {
        assert_eq!(try_execute(db, sql).await, Ok(1), "{sql}");
    }
    // The read models, which no MAC covers either: a member made owner, an entry gone.
    let rewritten = [
        format!(
            "UPDATE rm_members SET role = 'owner'
              WHERE organization_id = '{postdated}' AND user_id = 'pat'"
        ),
        format!("DELETE FROM rm_audit_log WHERE organization_id = '{backdated}' AND sequence = 2"),
    ];
    for sql in &rewritten {
        assert_eq!(try_execute(db, sql).await, Ok(1), "{sql}");
    }
    let tamper = [
        format!("DELETE FROM events WHERE aggregate_id = '{gapped}' AND sequence = 2"),
        // Event 3 invites with a sealed address; another organization's does not open here.
        format!(
            "UPDATE events SET payload = (SELECT payload FROM events
                 WHERE aggregate_id = '{snapshotted}' AND sequence = 3)
              WHERE aggregate_id = '{foreign}' AND sequence = 3"
        ),
        format!(
            "UPDATE snapshots SET last_sequence = last_sequence - 1
              WHERE aggregate_id = '{snapshotted}'"
        ),
        // Unsealed, its personal data would read as erased with no error.
        format!("DELETE FROM organization_keys WHERE organization_id = '{keyless}'"),
        // The admin promotion read back as the viewer one: the same organization's, so it
        // opens and replays; only its MAC tells.
        format!(
            "UPDATE events SET payload = (SELECT payload FROM events
                 WHERE aggregate_id = '{swapped}' AND sequence = {swapped_last} - 1)
              WHERE aggregate_id = '{swapped}' AND sequence = {swapped_last}"
        ),
        // The last event gone: no gap shows it, the read models' versions do.
        format!(
            "DELETE FROM events WHERE aggregate_id = '{truncated}' AND sequence = {truncated_last}"
        ),
        // A copy of the last event written one further, as SQL writes it: with no MAC.
        format!(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata)
             SELECT aggregate_type, aggregate_id, sequence + 1, event_type, event_version,
                    payload, metadata
               FROM events WHERE aggregate_id = '{forged}' AND sequence = {forged_last}"
        ),
        // A MAC removed, so that the event would pass for one stored before MACs.
        format!("UPDATE events SET mac = NULL WHERE aggregate_id = '{stripped}' AND sequence = 1"),
        // Every event of an organization gone.
        format!("DELETE FROM events WHERE aggregate_id = '{vanished}'"),
    ];
    for sql in &tamper {
        let rows = if sql.contains(&vanished.to_string()) {
            vanished_last as u64
        } else {
            1
        };
        assert_eq!(try_execute(db, sql).await, Ok(rows), "{sql}");
    }
    let snapshot_at = count(db, "SELECT last_sequence FROM snapshots").await as usize;

    // Another process: this one holds the data keys it used in memory.
    let auditor = service.reopen().await;
    let report = orgledger::verify::verify(&auditor, None, false)
        .await
        .unwrap();

    let found: Vec<(String, Option<usize>)> = report
        .findings
        .iter()
        .map(|finding| {
            (
                finding.organization_id.clone().unwrap_or_default(),
                finding.sequence,
            )
        })
        .collect();
    let at = |sequence: i64| Some(sequence as usize);
    let mut expected = vec![
        (gapped.to_string(), Some(3)),
        (foreign.to_string(), Some(3)),
        // Its MAC does not match the payload pasted in either.
        (foreign.to_string(), Some(3)),
        (snapshotted.to_string(), Some(snapshot_at)),
        (keyless.to_string(), None),
        (swapped.to_string(), at(swapped_last)),
        (truncated.to_string(), at(truncated_last)),
        (forged.to_string(), at(forged_last + 1)),
        (stripped.to_string(), Some(1)),
        (vanished.to_string(), Some(1)),
        (backdated.to_string(), at(backdated_last)),
        (backdated.to_string(), None),
        (postdated.to_string(), at(postdated_last)),
        (postdated.to_string(), None),
        // Its last event read back as the one before, and its owner's joining gone: the
        // members read model, which applied the events as written, differs from the history;
        // so does the audit entry written for the event as it was.
        (swapped.to_string(), None),
        (swapped.to_string(), at(swapped_last)),
        // Without its second event the replay has no owner: the members read model and the
        // directory's member count both differ from it.
        (gapped.to_string(), None),
        (gapped.to_string(), None),
    ];
    expected.sort();
    let mut found_sorted = found.clone();
    found_sorted.sort();
    assert_eq!(found_sorted, expected, "{report:#?}");
    assert_eq!(
        report.organizations, 11,
        "the vanished one is not in the log"
    );
    let problems: Vec<&str> = report.findings.iter().map(|f| f.problem.as_str()).collect();
    let about = |org: Uuid| -> Vec<&str> {
        report
            .findings
            .iter()
            .filter(|f| f.organization_id == Some(org.to_string()))
            .map(|f| f.problem.as_str())
            .collect()
    };
    assert_eq!(
        about(swapped),
        [
            "its MAC does not match it: it was altered, moved from elsewhere, or written \
          without the master key",
            "its members read model differs from its history: it holds [sia as admin] where \
             the events say [sia as viewer]",
            format!(
                "its audit entry for event {swapped_last} is not the one its event makes \
                 (details)"
            )
            .as_str()
        ]
    );
    assert_eq!(
        about(truncated),
        [format!(
            "event {truncated_last} is missing: the read models applied up to event \
             {truncated_last}"
        )]
    );
    let unmarked = "it carries no MAC, and no version before MACs stored it: it was written \
                    without the master key";
    assert_eq!(about(forged), [unmarked]);
    assert!(
        about(backdated).iter().any(|p| p
            .contains(&format!("before event {}", backdated_last - 1))
            && p.contains("recording times were altered")),
        "{problems:?}"
    );
    assert!(
        about(backdated).contains(
            &format!(
                "its audit log holds {} entries where its history has one for each of its \
             {backdated_last} events",
                backdated_last - 1
            )
            .as_str()
        ),
        "{problems:?}"
    );
    assert!(
        about(postdated)
            .iter()
            .any(|p| p.contains("later than now")),
        "{problems:?}"
    );
    assert!(
        about(postdated).contains(
            &"its members read model differs from its history: it holds [pat as owner] where \
              the events say [pat as member]"
        ),
        "{problems:?}"
    );
    assert_eq!(about(stripped), [unmarked]);
    assert_eq!(
        about(vanished),
        [format!(
            "events 1 to {vanished_last} are missing: the read models applied up to event \
             {vanished_last}"
        )]
    );
    assert!(
        about(foreign)
            .iter()
            .any(|p| p.starts_with("its MAC does not match")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("event 2 is missing")),
        "{problems:?}"
    );
    // Relabelled as standing one event earlier, it no longer opens: sealed to its event.
    assert!(
        about(snapshotted)
            .iter()
            .any(|p| p.starts_with("its snapshot cannot be opened")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("it cannot be read") && p.contains("authentication")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("data key is missing though it was never purged")),
        "{problems:?}"
    );
    assert_eq!(
        report.events,
        count(db, "SELECT count(*) FROM events").await as u64 - 1,
        "every event but the unreadable one, those after it included"
    );
    let untouched = orgledger::verify::verify(&service, Some(clean), false)
        .await
        .unwrap();
    assert_eq!(untouched.findings, [], "{untouched:?}");
    // Asked for by name, an organization whose every event is gone is a finding, not unknown.
    let gone = orgledger::verify::verify(&service, Some(vanished), false)
        .await
        .unwrap();
    assert_eq!(
        (gone.organizations, gone.findings.len()),
        (0, 1),
        "{gone:?}"
    );

    // Nothing is decided on an event edited in place: loading it fails, in a process that
    // never saw it; a command on it is refused with nothing stored.
    let altered = auditor.ledger.load(swapped).await;
    assert!(
        matches!(&altered, Err(error) if error.to_string().contains("does not match its MAC")),
        "{altered:?}"
    );
    let before = count(db, "SELECT count(*) FROM events").await;
    let command = auditor
        .run(
            swapped,
            cmd(user("sam"), set_role("sia", Role::Member)),
            &RequestContext::default(),
            None,
        )
        .await;
    assert!(command.is_err(), "{command:?}");
    assert_eq!(count(db, "SELECT count(*) FROM events").await, before);
    // Nor on a row added without a MAC, or one whose MAC was stripped.
    for (organization, problem) in [(forged, "carries no MAC"), (stripped, "carries no MAC")] {
        let refused = auditor.ledger.load(organization).await;
        assert!(
            matches!(&refused, Err(error) if error.to_string().contains(problem)),
            "{refused:?}"
        );
    }
    assert!(auditor.ledger.load(clean).await.is_ok());
}

/// The log keeps the postgres-es / sqlite-es table layout: their stock repositories read
/// back what this one appends (personal fields sealed), in order, with nothing missing.
async fn the_log_keeps_the_layout_stock_postgres_es_and_sqlite_es_read(backend: Backend) {
    use cqrs_es::persist::PersistedEventRepository;
    use cqrs_es::DomainEvent;
    let ledger = spawn_ledger(backend).await;
    let org = acme_with_mia(&ledger).await;
    run(&ledger, org, "olivia", set_role("mia", Role::Admin)).await;
    let ours: Vec<(usize, String)> = ledger
        .events(org)
        .await
        .unwrap()
        .iter()
        .map(|event| (event.sequence, event.payload.event_type()))
        .collect();
    let id = org.to_string();
    let stock = match ledger.db() {
        Database::Postgres(pool) => postgres_es::PostgresEventRepository::new(pool.clone())
            .get_events::<Organization>(&id)
            .await
            .unwrap(),
        Database::Sqlite(pool) => sqlite_es::SqliteEventRepository::new(pool.clone())
            .get_events::<Organization>(&id)
            .await
            .unwrap(),
    };
    let theirs: Vec<(usize, String)> = stock
        .iter()
        .map(|event| (event.sequence, event.event_type.clone()))
        .collect();
    assert_eq!(theirs, ours);
    assert!(ours.len() >= 4, "{ours:?}");
}

/// Once its events are stored, a command succeeds whatever its wait for the read models
/// meets: not learning whether they show it is `pending`, never an error that would invite
/// running the command again.
async fn a_stored_command_whose_wait_fails_answers_pending_not_an_error(backend: Backend) {
    let service = spawn_service_waiting(backend, std::time::Duration::from_millis(200)).await;
    let org = acme_with_mia(&service.ledger).await;
    let before = count(service.db(), "SELECT count(*) FROM events").await;
    // The table the wait asks, gone: every look at it fails.
    try_execute(service.db(), "DROP TABLE projected_versions")
        .await
        .unwrap();
    let outcome = service
        .run_as(org, "olivia", set_role("mia", Role::Admin))
        .await;
    assert!(!outcome.consistent);
    assert_eq!(
        count(service.db(), "SELECT count(*) FROM events").await,
        before + 1
    );
}

/// The fence of a keyed command: its events are stored only while its idempotency claim is
/// unanswered and still its own. A retry that took the claim over (its lease lapsed), or an
/// answer already kept, leaves the late holder's append nothing to store, whether it goes in
/// a group commit (PostgreSQL) or in a transaction of its own with a snapshot.
async fn an_append_under_an_idempotency_claim_no_longer_its_own_stores_nothing(backend: Backend) {
    let ledger = spawn_ledger(backend).await;
    let org = acme_with_mia(&ledger).await;
    let db = ledger.db();
    try_execute(
        db,
        "INSERT INTO idempotency_keys (scope, key, fingerprint, created_at_us, claim_id)
         VALUES ('scope', 'key', 'fingerprint', 0, 'claim-1')",
    )
    .await
    .unwrap();
    let keyed = |claim: &str| RequestContext {
        idempotency_claim: Some(claim.into()),
        ..RequestContext::default()
    };
    let role = |role: Role| cmd(user("olivia"), set_role("mia", role));
    let stored = || async { ledger.events(org).await.unwrap().len() };

    let held = ledger
        .run(org, role(Role::Viewer), &keyed("claim-1"), None)
        .await
        .expect("a held claim's command is stored");
    assert_eq!(stored().await, held.version);

    try_execute(db, "UPDATE idempotency_keys SET claim_id = 'claim-2'")
        .await
        .unwrap();
    for (claim, why) in [
        ("claim-1", "taken over by a retry"),
        ("claim-0", "never claimed"),
    ] {
        let late = ledger
            .run(org, role(Role::Admin), &keyed(claim), None)
            .await
            .expect_err(why);
        assert!(
            matches!(late, LedgerError::ClaimTakenOver),
            "{why}: {late:?}"
        );
        assert_eq!(stored().await, held.version, "{why}: nothing stored");
    }

    // The holder that took it over stores, up to the event before a snapshot is due: the
    // next keyed command then commits alone, with its snapshot.
    while (stored().await + 1) % SNAPSHOT_EVERY != 0 {
        let role = if stored().await % 2 == 0 {
            Role::Member
        } else {
            Role::Viewer
        };
        ledger
            .run(
                org,
                cmd(user("olivia"), set_role("mia", role)),
                &keyed("claim-2"),
                None,
            )
            .await
            .expect("the new holder's commands are stored");
    }
    let before = stored().await;
    try_execute(db, "UPDATE idempotency_keys SET status = 201")
        .await
        .unwrap();
    let answered = ledger
        .run(org, role(Role::Admin), &keyed("claim-2"), None)
        .await
        .expect_err("an answered claim takes no more events");
    assert!(
        matches!(answered, LedgerError::ClaimTakenOver),
        "{answered:?}"
    );
    assert_eq!(stored().await, before);

    // Without a claim the command is stored as ever, its snapshot with it.
    let unkeyed = ledger
        .run(org, role(Role::Admin), &RequestContext::default(), None)
        .await
        .unwrap();
    assert_eq!(unkeyed.version, before + 1);
    assert_eq!(unkeyed.version % SNAPSHOT_EVERY, 0);
}

async fn verify_compares_each_kept_snapshot_with_the_replay_where_it_stands(backend: Backend) {
    let service = spawn_service(backend).await;
    let ledger = &service.ledger;
    let org = acme_with_mia(ledger).await;
    for _ in 0..SNAPSHOT_EVERY * 3 / 2 {
        run(ledger, org, "olivia", set_role("mia", Role::Viewer)).await;
        run(ledger, org, "olivia", set_role("mia", Role::Member)).await;
    }
    let sequences = ledger.snapshot_sequences(org).await.unwrap();
    assert!(sequences.len() >= 3, "{sequences:?}");
    let report = orgledger::verify::verify(&service, Some(org), false)
        .await
        .unwrap();
    assert!(report.findings.is_empty(), "{:?}", report.findings);
    assert_eq!(report.snapshots, sequences.len(), "each compared");

    // The second kept snapshot's bytes altered, so that it does not open: a past moment it
    // stood for starts from the one before it instead, and answers what the events say.
    let (first, second) = (sequences[0], sequences[1]);
    let id = org.to_string();
    let replace =
        "UPDATE past_snapshots SET state = $1 WHERE aggregate_id = $2 AND last_sequence = $3";
    orgledger_projections::with_pool!(service.db(), pool => {
        sqlx::query(replace)
            .bind(b"not a sealed state".to_vec())
            .bind(&id)
            .bind(second as i64)
            .execute(pool)
            .await
            .unwrap();
    });
    let mut replayed = Organization::default();
    for event in ledger.events(org).await.unwrap() {
        if event.sequence > second + 1 {
            break;
        }
        cqrs_es::Aggregate::apply(&mut replayed, event.payload);
    }
    let cold = service.reopen().await.ledger;
    let past =
        orgledger::history::state_as_of(&cold, org, orgledger::history::AsOf::Sequence(second + 1))
            .await
            .expect("answered around the snapshot that does not open")
            .expect("it existed then");
    assert_eq!(past.as_of_sequence, second + 1);
    assert_eq!(past.organization, replayed);
    let stats = cold.read_stats();
    assert_eq!(
        stats.snapshots(),
        2,
        "the one at {second}, then the one at {first}"
    );
    assert_eq!(
        stats.events() as usize,
        second + 1 - first,
        "read from the one that opens"
    );

    // The first replaced by a state sealed as the store seals one, for its event, so that
    // it opens, but renamed.
    let SnapshotRead::Usable(mut renamed) = ledger.snapshot_standing_at(org, first).await.unwrap()
    else {
        panic!("the first kept snapshot is usable");
    };
    renamed.name = "Not what happened".into();
    let key = ledger.keys().get(&id).await.unwrap().expect("a live key");
    let mut plaintext = vec![1_u8];
    plaintext.extend(lz4_flex::compress_prepend_size(
        serde_json::to_string(&renamed).unwrap().as_bytes(),
    ));
    let sealed = key.encrypt(
        &plaintext,
        format!("orgledger snapshot\0{id}\0{first}").as_bytes(),
    );
    orgledger_projections::with_pool!(service.db(), pool => {
        sqlx::query(replace)
            .bind(sealed)
            .bind(&id)
            .bind(first as i64)
            .execute(pool)
            .await
            .unwrap();
    });

    let report = orgledger::verify::verify(&service, Some(org), false)
        .await
        .unwrap();
    let found: Vec<(Option<usize>, &str)> = report
        .findings
        .iter()
        .map(|finding| (finding.sequence, finding.problem.as_str()))
        .collect();
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(
        found[0],
        (
            Some(first),
            format!("its past snapshot at event {first} differs from the replay of its events")
                .as_str()
        )
    );
    assert_eq!(found[1].0, Some(second));
    assert!(
        found[1].1.starts_with(&format!(
            "its past snapshot at event {second} cannot be opened"
        )),
        "{found:?}"
    );

    // The event the first kept snapshot stands at made unreadable: that is the finding; the
    // kept snapshots from there on are not compared with a replay that skipped it, nor said
    // to stand on a missing event.
    let db = service.db();
    let unguard: &[&str] = match backend {
        Backend::Postgres => &["ALTER TABLE events DISABLE TRIGGER USER"],
        Backend::Sqlite => &["DROP TRIGGER events_refuse_update"],
    };
    for sql in unguard {
        try_execute(db, sql).await.unwrap();
    }
    let garbled = match backend {
        Backend::Postgres => "'{\"NoSuchEvent\": {}}'::jsonb",
        Backend::Sqlite => "'{\"NoSuchEvent\": {}}'",
    };
    try_execute(
        db,
        &format!(
            "UPDATE events SET payload = {garbled} WHERE aggregate_id = '{org}' AND sequence = {first}"
        ),
    )
    .await
    .unwrap();
    let report = orgledger::verify::verify(&service, Some(org), false)
        .await
        .unwrap();
    assert!(
        report
            .findings
            .iter()
            .any(|finding| finding.sequence == Some(first)
                && finding.problem.starts_with("it cannot be read")),
        "{:?}",
        report.findings
    );
    assert!(
        report
            .findings
            .iter()
            .all(|finding| !finding.problem.contains("snapshot")),
        "{:?}",
        report.findings
    );
}
