//! Read models and the durable projector on real PostgreSQL and real SQLite.

mod support;

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;

use futures::StreamExt;
use orgledger::exports::data_export;
use orgledger::history::{raw_events, state_as_of, AsOf};
use orgledger::ledger::RequestContext;
use orgledger_domain::*;
use orgledger_projections::audit::{self, AuditFilter};
use orgledger_projections::exports::{audit_log, AuditFormat};
use orgledger_projections::invitations::{self, InvitationFilter};
use orgledger_projections::members::{self, MemberFilter};
use orgledger_projections::{organizations, projection_named, Database, PROJECTION_NAMES};
use support::*;
use uuid::Uuid;

on_both_backends!(
    processes_starting_together_on_a_new_database_all_prepare_the_read_models,
    read_models_show_each_command_when_it_returns,
    commands_time_their_commit_apart_from_their_wait_for_the_read_models,
    events_committed_while_no_projector_ran_are_applied_once_after_restart,
    a_failing_projection_stops_reports_and_resumes_without_skipping,
    while_one_projection_fails_the_runner_keeps_the_others_current,
    a_projection_ahead_of_the_shared_batch_keeps_its_checkpoint,
    a_projection_without_a_checkpoint_is_refused_rather_than_run_from_the_start,
    a_rebuild_swaps_in_fresh_tables_while_reads_keep_working,
    rebuilding_every_read_model_at_once_reproduces_them_from_one_read_of_the_log,
    a_rebuild_of_many_batches_reproduces_every_read_model_and_the_roles_last_given,
    audit_entries_copied_in_bulk_equal_those_inserted_a_few_at_a_time,
    rows_inserted_as_one_run_keep_their_values_and_the_first_of_a_key_wins,
    a_read_model_of_an_older_schema_is_rebuilt_before_the_service_opens,
    a_rebuild_asked_for_replays_an_older_schema_once,
    an_event_the_new_schema_cannot_take_leaves_the_service_open_and_reports_it,
    member_pages_are_stable_under_concurrent_inserts,
    audit_log_filters_select_the_right_entries,
    audit_exports_parse_back_as_csv_and_json,
    the_data_export_is_complete_and_holds_no_secret,
    a_data_exports_log_ends_at_its_organizations_version_whatever_lands_meanwhile,
    raw_events_and_past_states_come_from_the_log,
    a_past_state_read_from_a_snapshot_equals_the_replay_from_the_first_event,
    organizations_past_their_restore_window_are_purged_by_system,
    status_reports_positions_and_backlog,
    a_second_process_opens_and_rebuilds_beside_a_busy_writer,
    the_copy_of_a_rebuild_that_died_is_dropped_by_the_next_one,
    the_copies_of_a_rebuild_that_died_go_with_a_purge_and_at_the_next_start,
    the_runner_stops_when_nothing_is_left_that_could_stop_it,
);

fn member_filter() -> MemberFilter {
    MemberFilter {
        limit: 50,
        ..MemberFilter::default()
    }
}

/// The user ids of every page of `org`'s members from `filter`'s cursor on, following
/// each page's cursor.
async fn member_ids(db: &Database, org: &str, mut filter: MemberFilter) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let page = members::list(db, org, &filter).await.unwrap().unwrap();
        ids.extend(page.items.into_iter().map(|m| m.user_id));
        match page.next_cursor {
            Some(next) => filter.cursor = Some(next),
            None => return ids,
        }
    }
}

/// The first 50 audit entries of `org` with `action`.
async fn audit_of(db: &Database, org: &str, action: &str) -> Vec<audit::AuditEntryView> {
    let filter = AuditFilter {
        action: Some(action.to_owned()),
        ..AuditFilter::default()
    };
    audit::list(db, org, &filter, 50, None)
        .await
        .unwrap()
        .unwrap()
        .items
}

/// Imports `count` role changes of mia (member and admin in turn) into `org`'s log, no rule
/// checked and no runner woken: a bulk import.
async fn import_role_flips(service: &TestService, org: Uuid, count: usize) {
    service
        .ledger
        .import(
            org,
            role_flips(count, "mia"),
            std::collections::HashMap::new(),
        )
        .await
        .unwrap();
}

/// Another process (the CLI's `projections rebuild`) opening the store and rebuilding while
/// the service writes: on SQLite a transaction that read before writing failed at once with
/// "database is locked" when a write came between; write transactions now take the lock
/// first and wait their turn.
async fn a_second_process_opens_and_rebuilds_beside_a_busy_writer(backend: Backend) {
    let mut service = spawn_service(backend).await;
    let org = acme_with_mia(&service.ledger).await;
    service.start_projections();
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = tokio::spawn({
        let service = service.service.clone();
        let writing = writing.clone();
        async move {
            let mut written = 0;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                let flips = role_flips(5, "mia");
                service
                    .ledger
                    .import(org, flips, std::collections::HashMap::new())
                    .await
                    .unwrap();
                written += 1;
            }
            written
        }
    });
    for _ in 0..3 {
        let other = service.reopen().await;
        other.projector.rebuild_all(false).await.unwrap();
        other.close().await;
    }
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    assert!(
        writer.await.unwrap() > 0,
        "the writer wrote beside the rebuilds"
    );
}

/// A rebuild killed midway leaves its copies; the next rebuild drops those no rebuild has
/// touched for minutes and leaves a copy of a rebuild still running alone.
async fn the_copy_of_a_rebuild_that_died_is_dropped_by_the_next_one(backend: Backend) {
    let service = spawn_service(backend).await;
    acme_with_mia(&service.ledger).await;
    service.catch_up().await;
    let now = orgledger_projections::to_micros(chrono::Utc::now());
    for (name, suffix, moved_at) in [
        ("members", "__rb1", now - 2 * 3_600_000_000),
        ("audit_log", "__rb2", now),
    ] {
        let copy = projection_named(name, suffix).unwrap();
        for statement in copy.create_tables(service.db().backend()) {
            try_execute(service.db(), &statement).await.unwrap();
        }
        let checkpoint = format!(
            "INSERT INTO projection_checkpoints (name, schema_version, updated_at_us)
             VALUES ('{name}{suffix}', 1, {moved_at})"
        );
        try_execute(service.db(), &checkpoint).await.unwrap();
    }
    service.projector.rebuild_all(false).await.unwrap();
    let db = service.db();
    let checkpoint_of =
        |name: &str| format!("SELECT count(*) FROM projection_checkpoints WHERE name = '{name}'");
    assert_eq!(count(db, &checkpoint_of("members__rb1")).await, 0);
    assert_eq!(count(db, &checkpoint_of("audit_log__rb2")).await, 1);
    assert!(try_execute(db, "SELECT 1 FROM rm_members__rb1")
        .await
        .is_err());
    assert!(try_execute(db, "SELECT 1 FROM rm_audit_log__rb2")
        .await
        .is_ok());
}

/// PostgreSQL: a rebuild stopped while an index build of its copy runs (here, waits for a
/// lock the test holds) cancels the build on the server, rather than leaving it to run to
/// its end before the copy, personal data in clear, can be dropped. A session that keeps
/// its lock on the copy holds the drop up 5 s at most: the copy is then left to the sweep
/// of abandoned copies, and the rebuild says so.
#[tokio::test]
async fn a_rebuild_stopped_during_an_index_build_cancels_it_on_the_server() {
    for lock_kept in [false, true] {
        stopped_during_an_index_build(lock_kept).await;
    }
}

async fn stopped_during_an_index_build(lock_kept: bool) {
    use orgledger_projections::ProjectionError;
    use sqlx::{Connection, Executor};
    let service = spawn_service(Backend::Postgres).await;
    acme_with_mia(&service.ledger).await;
    service.catch_up().await;
    let url = service.database.url.clone();
    let entries = "SELECT count(*) FROM rm_audit_log";
    let entries_before = count(service.db(), entries).await;
    // The log held: the rebuild makes its copy, then waits to read it.
    let mut log_held = sqlx::PgConnection::connect(&url).await.unwrap();
    log_held
        .execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let projector = service.projector.clone();
    let rebuild = tokio::spawn(async move {
        projector
            .rebuild_unless_stopped(&["audit_log"], false, async {
                let _ = stopped.await;
            })
            .await
    });
    let mut watcher = sqlx::PgConnection::connect(&url).await.unwrap();
    let (copy, mut copy_held) =
        hold_the_audit_copy_at_its_index_build(&url, &mut watcher, &mut log_held).await;
    let index_builds = INDEX_BUILDS_ON;

    stop.send(()).unwrap();
    // Gone while the test still holds its lock: cancelled, not finished.
    poll_until(
        &mut watcher,
        "index builds still running 30 s after the stop",
        index_builds,
        &copy,
        |running: &i64| *running == 0,
    )
    .await;
    let copies = "SELECT (SELECT count(*) FROM pg_class WHERE relname LIKE '%!_!_rb%' ESCAPE '!')
                       + (SELECT count(*) FROM projection_checkpoints WHERE name LIKE '%!_!_rb%' ESCAPE '!')";
    if lock_kept {
        let stopped = tokio::time::timeout(Duration::from_secs(15), rebuild)
            .await
            .expect("the drop waits 5 s at most")
            .unwrap();
        assert!(
            matches!(stopped, Err(ProjectionError::StoppedCopiesLeft)),
            "{stopped:?}"
        );
        copy_held.execute("ROLLBACK").await.unwrap();
        assert!(count(service.db(), copies).await > 0, "the copy is left");
    } else {
        copy_held.execute("ROLLBACK").await.unwrap();
        let stopped = tokio::time::timeout(Duration::from_secs(30), rebuild)
            .await
            .expect("the copies dropped once the lock went")
            .unwrap();
        assert!(
            matches!(stopped, Err(ProjectionError::Stopped)),
            "{stopped:?}"
        );
        assert_eq!(count(service.db(), copies).await, 0, "copies left behind");
    }
    assert_eq!(count(service.db(), entries).await, entries_before);
}

/// Makes the copy `name` + `suffix` of a read model, holding the live table's rows, as a
/// rebuild leaves it, last touched at `touched_at_us`.
async fn leave_copy(service: &TestService, name: &str, suffix: &str, touched_at_us: i64) {
    let copy = projection_named(name, suffix).unwrap();
    for statement in copy.create_tables(service.db().backend()) {
        try_execute(service.db(), &statement).await.unwrap();
    }
    let live = projection_named(name, "").unwrap();
    for ((_, live), (_, copied)) in live.tables().iter().zip(copy.tables()) {
        let fill = format!("INSERT INTO {copied} SELECT * FROM {live}");
        try_execute(service.db(), &fill).await.unwrap();
    }
    let checkpoint = format!(
        "INSERT INTO projection_checkpoints (name, schema_version, updated_at_us)
         VALUES ('{name}{suffix}', 1, {touched_at_us})"
    );
    try_execute(service.db(), &checkpoint).await.unwrap();
}

/// The copies of a rebuild that died hold read-model rows, personal data among them, that
/// a purge does not reach: the runner drops them once it has applied a purge, and a process
/// drops them as it opens. A copy a live rebuild keeps touching stays.
async fn the_copies_of_a_rebuild_that_died_go_with_a_purge_and_at_the_next_start(backend: Backend) {
    let mut service = spawn_service(backend).await;
    let org = acme_with_mia(&service.ledger).await;
    service.catch_up().await;
    let now = orgledger_projections::to_micros(chrono::Utc::now());
    let minutes_ago = now - 3 * 60_000_000;
    leave_copy(&service, "members", "__rb71", minutes_ago).await;
    leave_copy(&service, "audit_log", "__rb72", now).await;
    let db = service.db().clone();
    let mia_in_copy = "SELECT count(*) FROM rm_members__rb71 WHERE email = 'mia@example.com'";
    assert_eq!(
        count(&db, mia_in_copy).await,
        1,
        "the copy holds Mia's address"
    );
    service.start_projections();
    let purge = OrganizationCommand::PurgeOrganization(PurgeOrganization {
        confirm_name: "Acme".into(),
    });
    service.run_as(org, "olivia", purge).await;
    let gone = |table: &'static str| {
        let db = db.clone();
        async move {
            try_execute(&db, &format!("SELECT 1 FROM {table}"))
                .await
                .is_err()
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !gone("rm_members__rb71").await {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead rebuild's copy outlived the purge"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let checkpoint_of =
        |name: &str| format!("SELECT count(*) FROM projection_checkpoints WHERE name = '{name}'");
    assert_eq!(count(&db, &checkpoint_of("members__rb71")).await, 0);
    assert!(
        !gone("rm_audit_log__rb72").await,
        "a live rebuild's copy stays"
    );
    service.stop_projections().await;

    // Its rebuild died since: the next process to open drops it.
    let touched = format!(
        "UPDATE projection_checkpoints SET updated_at_us = {minutes_ago} WHERE name = 'audit_log__rb72'"
    );
    assert_eq!(try_execute(&db, &touched).await, Ok(1));
    let reopened = service.reopen().await;
    assert!(gone("rm_audit_log__rb72").await);
    assert_eq!(count(&db, &checkpoint_of("audit_log__rb72")).await, 0);
    reopened.close().await;
}

/// The runner stops when its stop signal's sender goes away without a word (its owner
/// failed on the way out): nothing could stop it later, so it must not run, or spin, on.
async fn the_runner_stops_when_nothing_is_left_that_could_stop_it(backend: Backend) {
    let service = spawn_service(backend).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = service.projector.spawn(stopped);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while service.projector.leading().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the runner never led");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stop);
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the runner ends")
            .unwrap();
    }
    assert!(service.projector.leading().is_empty());
}

/// A runner whose lock's session ends (cut off, or ended by the server once a hung leader
/// stopped pinging it) stops running the projections, and one process leads again, alone;
/// the read models keep up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_loses_its_lock_stops_and_one_process_leads_again_on_postgres() {
    let mut first = spawn_service(Backend::Postgres).await;
    let Database::Postgres(pool) = first.db().clone() else {
        unreachable!("a PostgreSQL service")
    };
    let org = acme_with_mia(&first.ledger).await;
    first.start_projections();
    let second = first.reopen().await;
    let (stop_second, second_stopped) = tokio::sync::watch::channel(false);
    second.projector.spawn(second_stopped);
    let holder = "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                   WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()";
    let leaders = || {
        [&first.projector, &second.projector]
            .iter()
            .filter(|projector| !projector.leading().is_empty())
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let lost: i32 = loop {
        if let (1, Ok(pid)) = (leaders(), sqlx::query_scalar(holder).fetch_one(&pool).await) {
            break pid;
        }
        assert!(std::time::Instant::now() < deadline, "nobody leads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(lost)
        .execute(&pool)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let holder = sqlx::query_scalar::<_, i32>(holder)
            .fetch_optional(&pool)
            .await
            .unwrap();
        if leaders() == 1 && holder.is_some_and(|pid| pid != lost) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} processes lead",
            leaders()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past a ping of the old leader's: still one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(leaders(), 1, "both processes run the projections");
    let promoted = second
        .run(
            org,
            cmd(
                user("olivia"),
                OrganizationCommand::UpdateMember(UpdateMember {
                    user_id: uid("mia"),
                    role: Some(Role::Admin),
                    first_name: None,
                    last_name: None,
                    title: None,
                    image_url: None,
                    locked_fields: None,
                }),
            ),
            &RequestContext::default(),
            None,
        )
        .await
        .unwrap();
    assert!(promoted.consistent, "the read models keep up");
    let _ = stop_second.send(true);
    first.stop_projections().await;
    second.close().await;
}

/// The declared type of the audit log's organization column, lower-cased.
async fn audit_organization_type(db: &Database) -> String {
    let declared: String = match db {
        Database::Postgres(pool) => sqlx::query_scalar(
            "SELECT data_type::text FROM information_schema.columns
              WHERE table_name = 'rm_audit_log' AND column_name = 'organization_id'",
        )
        .fetch_one(pool)
        .await
        .unwrap(),
        Database::Sqlite(pool) => sqlx::query_scalar(
            "SELECT type FROM pragma_table_info('rm_audit_log') WHERE name = 'organization_id'",
        )
        .fetch_one(pool)
        .await
        .unwrap(),
    };
    declared.to_lowercase()
}

async fn create(service: &TestService, name: &str, slug: &str, owner: &str) -> Uuid {
    service
        .create_organization(
            create_command(name, slug, owner),
            true,
            &RequestContext::default(),
        )
        .await
        .expect("create")
        .committed
        .organization_id
}

async fn read_models_show_each_command_when_it_returns(backend: Backend) {
    let mut service = spawn_service(backend).await;
    service.start_projections();
    let org = create(&service, "Acme", "acme", "olivia").await;
    let id = org.to_string();
    let view = organizations::get(service.db(), &id)
        .await
        .unwrap()
        .expect("the directory shows it");
    assert_eq!(
        (view.slug.as_str(), view.member_count, view.version),
        ("acme", 1, 2)
    );

    let token = orgledger::tokens::issue("inv");
    let send = SendInvitation {
        invitation_id: Uuid::now_v7(),
        email: Some(Email::parse("email", "nina@example.com").unwrap()),
        role: Role::Member,
        first_name: Some("Nina".into()),
        last_name: None,
        title: Some("CFO".into()),
        group_id: None,
        expires_in_days: None,
        max_uses: MaxUses::ONE,
        token_sha256: token.sha256.clone(),
    };
    let outcome = service
        .run_as(org, "olivia", OrganizationCommand::SendInvitation(send))
        .await;
    assert!(outcome.consistent);
    let pending = invitations::list(
        service.db(),
        &id,
        &InvitationFilter {
            status: Some("pending".into()),
            limit: 50,
            cursor: None,
        },
        chrono::Utc::now(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(pending.items.len(), 1);
    assert_eq!(pending.items[0].email.as_deref(), Some("nina@example.com"));
    // Past its expiry (seven days by default) it reads as expired, and is listed under that
    // status only: `expired` is worked out when read, never stored.
    let later = pending.items[0].expires_at + chrono::Duration::seconds(1);
    for (status, expected) in [
        (Some("pending"), vec![]),
        (Some("expired"), vec!["expired"]),
        (None, vec!["expired"]),
    ] {
        let listed = invitations::list(
            service.db(),
            &id,
            &InvitationFilter {
                status: status.map(str::to_owned),
                limit: 50,
                cursor: None,
            },
            later,
        )
        .await
        .unwrap()
        .unwrap();
        let statuses: Vec<&str> = listed.items.iter().map(|i| i.status.as_str()).collect();
        assert_eq!(statuses, expected, "{status:?}");
    }
    assert_eq!(
        pending.items[0].expires_at - pending.items[0].sent_at,
        chrono::Duration::days(7)
    );
    assert_eq!(
        invitations::organization_of_token(service.db(), &token.sha256)
            .await
            .unwrap(),
        Some(id.clone()),
        "the token hash finds the organization for acceptance"
    );

    let accept = AcceptInvitation {
        token_sha256: token.sha256.clone(),
        user_id: uid("nina"),
        email: Email::parse("email", "nina@example.com").unwrap(),
        first_name: None,
        last_name: None,
    };
    service
        .run_as(org, "nina", OrganizationCommand::AcceptInvitation(accept))
        .await;
    let nina = members::get(service.db(), &id, "nina")
        .await
        .unwrap()
        .expect("nina is a member");
    assert_eq!(nina.title.as_deref(), Some("CFO"));
    assert_eq!(nina.locked_fields, vec!["first_name", "title"]);
    let accepted = invitations::list(
        service.db(),
        &id,
        &InvitationFilter {
            status: Some("accepted".into()),
            limit: 50,
            cursor: None,
        },
        chrono::Utc::now(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(accepted.items.len(), 1);
    assert_eq!(
        invitations::organization_of_token(service.db(), &token.sha256)
            .await
            .unwrap(),
        None
    );

    service
        .run_as(org, "olivia", set_role("nina", Role::Admin))
        .await;
    let entries = audit_of(service.db(), &id, "member.role_changed").await;
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].details,
        serde_json::json!({"from": "member", "to": "admin"})
    );
    assert_eq!(entries[0].resource.id, "nina");
    assert_eq!(entries[0].actor.id, "olivia");

    let mine = members::organizations_of(service.db(), "nina", 50, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(mine.items.len(), 1);
    assert_eq!(
        (
            mine.items[0].organization.slug.as_str(),
            mine.items[0].role.as_str()
        ),
        ("acme", "admin")
    );
    let view = organizations::get(service.db(), &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.member_count, 2);

    let delete = OrganizationCommand::DeleteOrganization(DeleteOrganization {
        confirm_name: "Acme".into(),
    });
    service.run_as(org, "olivia", delete).await;
    let view = organizations::get(service.db(), &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        view.status, "deleted",
        "soft-deleted organizations stay readable"
    );
    assert!(view.purge_after.is_some());
}

async fn commands_time_their_commit_apart_from_their_wait_for_the_read_models(backend: Backend) {
    use orgledger::ledger::LedgerError;

    // No projection runs at first: a command that commits waits out the whole bounded wait.
    let mut service = spawn_service_waiting(backend, Duration::from_millis(200)).await;
    let context = RequestContext::default();
    let before = service.command_times();
    let outside = std::time::Instant::now();
    let created = service
        .create_organization(create_command("Acme", "acme", "olivia"), true, &context)
        .await
        .unwrap();
    let org = created.committed.organization_id;
    let refused = service
        .run(
            org,
            cmd(user("mallory"), set_role("olivia", Role::Member)),
            &context,
            None,
        )
        .await;
    let outside = outside.elapsed();
    assert!(!created.consistent);
    assert!(
        matches!(refused, Err(LedgerError::Rejected(_))),
        "{refused:?}"
    );
    let pending = service.command_times() - before;
    assert_eq!(
        pending.commands, 1,
        "a refused command is not timed: {pending:?}"
    );
    assert!(pending.waiting >= Duration::from_millis(200), "{pending:?}");
    assert!(pending.committing > Duration::ZERO, "{pending:?}");
    assert!(
        pending.committing + pending.waiting <= outside,
        "the two stretches do not overlap: {pending:?} within {outside:?}"
    );

    // With the runner on, the wait ends when the read models show the command.
    service
        .service
        .set_consistency_wait(orgledger::service::DEFAULT_CONSISTENCY_WAIT);
    service.start_projections();
    let before_live = service.command_times();
    let outcome = service
        .run_as(
            org,
            "olivia",
            OrganizationCommand::SetSmartToolRouting(true),
        )
        .await;
    assert!(outcome.consistent);
    let live = service.command_times() - before_live;
    assert_eq!(live.commands, 1, "{live:?}");
    assert!(live.waiting > Duration::ZERO, "{live:?}");
}

async fn events_committed_while_no_projector_ran_are_applied_once_after_restart(backend: Backend) {
    let service = spawn_service(backend).await;
    // Commands commit, but the process "dies" before any projection runs.
    let org = acme_with_mia(&service.ledger).await;
    let (_, version) = service.ledger.load(org).await.unwrap();
    service.db().close().await;

    let restarted = service.reopen().await;
    let read = restarted.projector.catch_up().await.unwrap();
    assert_eq!(read, version, "one read of the log serves every projection");
    let counters = restarted.projector.counters();
    for name in PROJECTION_NAMES {
        assert_eq!(
            counters.get(*name).map(|c| c.events_applied),
            Some(version as u64),
            "{name} read every event once"
        );
        assert_eq!(
            counters.get(*name).map(|c| c.batches_applied),
            Some(1),
            "{name} applied them in one batch"
        );
    }
    assert_eq!(
        restarted.projector.catch_up().await.unwrap(),
        0,
        "a second run finds nothing"
    );
    let id = org.to_string();
    let page = members::list(restarted.database(), &id, &member_filter())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(page.items.len(), 2);
    let log = audit::list(
        restarted.database(),
        &id,
        &AuditFilter::default(),
        500,
        None,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        log.items.len(),
        version,
        "one audit entry per event, none doubled"
    );
    let org_view = organizations::get(restarted.database(), &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (org_view.member_count, org_view.version),
        (2, version as i64)
    );
}

/// An organization, projected; then the members table is moved away, so the members
/// projection fails on the organization's next event.
async fn with_members_table_away(service: &TestService) -> Uuid {
    let org = create_org(&service.ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    service.catch_up().await;
    try_execute(
        service.db(),
        "ALTER TABLE rm_members RENAME TO rm_members_away",
    )
    .await
    .unwrap();
    org
}

/// Where the projection `name` stands.
async fn status_of(service: &TestService, name: &str) -> orgledger_projections::ProjectionStatus {
    let statuses = service.projector.status().await.unwrap();
    statuses
        .into_iter()
        .find(|status| status.name == name)
        .unwrap_or_else(|| panic!("no status for {name}"))
}

async fn bring_members_table_back(service: &TestService) {
    try_execute(
        service.db(),
        "ALTER TABLE rm_members_away RENAME TO rm_members",
    )
    .await
    .unwrap();
}

async fn a_failing_projection_stops_reports_and_resumes_without_skipping(backend: Backend) {
    let service = spawn_service(backend).await;
    let org = with_members_table_away(&service).await;
    add_member(&service.ledger, org, "olivia", "mia", Role::Member).await;

    let members_projection = projection_named("members", "").unwrap();
    // On PostgreSQL a write in flight in this database can hold the feed back for a
    // moment; the failing event is reached within a few batches.
    let mut attempts = 0;
    let error = loop {
        match service
            .projector
            .run_batch(members_projection.as_ref())
            .await
        {
            Err(error) => break error,
            Ok(_) => {
                attempts += 1;
                assert!(attempts < 100, "the failing event was never reached");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(
        error.to_string().contains("MemberJoined") || error.to_string().contains("rm_members"),
        "{error}"
    );
    let statuses = service.projector.status().await.unwrap();
    let status = statuses.iter().find(|s| s.name == "members").unwrap();
    assert!(status.last_error.is_some(), "the failure is reported");
    let failed_event = status.failed_event.clone().unwrap_or_default();
    assert!(failed_event.contains("MemberJoined #5"), "{failed_event}");
    assert!(
        (1..=3).contains(&status.backlog),
        "nothing was skipped: the failed event is still ahead ({})",
        status.backlog
    );
    // Other projections carry on.
    let audit_projection = projection_named("audit_log", "").unwrap();
    assert!(
        service
            .projector
            .run_batch(audit_projection.as_ref())
            .await
            .unwrap()
            > 0
    );

    bring_members_table_back(&service).await;
    service.catch_up().await;
    let page = members::list(service.db(), &org.to_string(), &member_filter())
        .await
        .unwrap()
        .unwrap();
    let ids: Vec<_> = page.items.iter().map(|m| m.user_id.as_str()).collect();
    assert_eq!(ids, ["olivia", "mia"]);
    let status = status_of(&service, "members").await;
    assert_eq!((status.backlog, status.last_error), (0, None));
}

/// SQLite keeps the recording time as text. One that does not parse stops the projections
/// at its event, rather than being replaced by another time in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_recording_time_stops_the_projections_at_its_event_on_sqlite() {
    let service = spawn_service(Backend::Sqlite).await;
    let org = create_org(&service.ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    service.catch_up().await;
    let entries = "SELECT count(*) FROM rm_audit_log";
    let before = count(service.db(), entries).await;
    add_member(&service.ledger, org, "olivia", "mia", Role::Member).await;
    try_execute(service.db(), "DROP TRIGGER event_log_refuse_update")
        .await
        .unwrap();
    let spoiled = try_execute(
        service.db(),
        &format!(
            "UPDATE event_log SET recorded_at = 'yesterday'
              WHERE aggregate_id = '{org}'
                AND sequence = (SELECT max(sequence) FROM event_log WHERE aggregate_id = '{org}')"
        ),
    )
    .await
    .unwrap();
    assert_eq!(spoiled, 1);

    let audit_projection = projection_named("audit_log", "").unwrap();
    let error = service
        .projector
        .run_batch(audit_projection.as_ref())
        .await
        .expect_err("the unreadable time is a read error");
    assert!(error.to_string().contains("recorded_at"), "{error}");
    let status = status_of(&service, "audit_log").await;
    assert!(status.last_error.is_some(), "the failure is reported");
    assert!(status.backlog >= 1, "the event was not skipped");
    assert_eq!(
        count(service.db(), entries).await,
        before,
        "no entry of the batch was written, none with a made-up time"
    );
}

async fn while_one_projection_fails_the_runner_keeps_the_others_current(backend: Backend) {
    let mut service = spawn_service(backend).await;
    let org = with_members_table_away(&service).await;
    let id = org.to_string();
    let audited = |service: &TestService| {
        let db = service.db().clone();
        let id = id.clone();
        async move {
            audit::list(&db, &id, &AuditFilter::default(), 500, None)
                .await
                .unwrap()
                .unwrap()
                .items
                .len()
        }
    };
    let before = audited(&service).await;
    service.start_projections();
    add_member(&service.ledger, org, "olivia", "mia", Role::Member).await;
    service.projector.wake();
    let mut waited = 0;
    let members_status = loop {
        let statuses = service.projector.status().await.unwrap();
        let members_status = statuses
            .iter()
            .find(|s| s.name == "members")
            .unwrap()
            .clone();
        let audit_backlog = statuses
            .iter()
            .find(|s| s.name == "audit_log")
            .unwrap()
            .backlog;
        if members_status.last_error.is_some() && audit_backlog == 0 {
            break members_status;
        }
        waited += 1;
        assert!(
            waited < 250,
            "the runner never passed the failing projection: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        audited(&service).await > before,
        "the audit log took the new member's events while members was failing"
    );
    assert!(
        members_status.backlog > 0,
        "the failed event stays ahead of the members checkpoint"
    );

    bring_members_table_back(&service).await;
    let mut waited = 0;
    loop {
        let page = members::list(service.db(), &id, &member_filter())
            .await
            .unwrap()
            .unwrap();
        let ids: Vec<_> = page.items.iter().map(|m| m.user_id.clone()).collect();
        if ids == ["olivia", "mia"] {
            break;
        }
        waited += 1;
        assert!(waited < 500, "members never resumed: {ids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.stop_projections().await;
    let (_, version) = service.ledger.load(org).await.unwrap();
    for status in service.projector.status().await.unwrap() {
        assert_eq!(
            (status.backlog, status.last_error.as_deref()),
            (0, None),
            "{}",
            status.name
        );
        assert_eq!(
            status.events_applied, version as i64,
            "{} read each event once: the projections ahead kept their checkpoints while \
             members caught up",
            status.name
        );
    }
}

async fn the_swapped_in_tables_keep_being_maintained(service: &TestService, org: Uuid) {
    add_member(&service.ledger, org, "olivia", "late", Role::Viewer).await;
    service.catch_up().await;
    assert!(members::get(service.db(), &org.to_string(), "late")
        .await
        .unwrap()
        .is_some());
}

/// On PostgreSQL a run of 256 or more audit entries goes in by `COPY`, fewer by INSERT: the
/// live runner writes this history a few events at a time, the rebuild in one run.
async fn audit_entries_copied_in_bulk_equal_those_inserted_a_few_at_a_time(backend: Backend) {
    let service = spawn_service(backend).await;
    let org = acme_with_mia(&service.ledger).await;
    // Every character COPY's text format escapes, in a name no request could set (the rules
    // refuse control characters), so it is imported.
    let awkward = "tab\there, line\nbreak, back\\slash \\N, \"quoted\", \r, \u{e9}t\u{e9}";
    let rename = OrganizationEvent::OrganizationUpdated(OrganizationUpdated {
        name: Some(Change {
            from: "Acme".into(),
            to: awkward.into(),
        }),
        ..Default::default()
    });
    service
        .ledger
        .import(org, vec![rename], std::collections::HashMap::new())
        .await
        .unwrap();
    service.catch_up().await;
    for _ in 0..3 {
        import_role_flips(&service, org, 100).await;
        service.catch_up().await;
    }
    let before = dump_read_models(service.db()).await;

    let report = service.projector.rebuild_all(false).await.unwrap();
    assert!(report.events > 300, "one run of {} entries", report.events);
    assert_eq!(dump_read_models(service.db()).await, before);
    let renamed = audit_of(service.db(), &org.to_string(), "organization.updated").await;
    assert_eq!(renamed.len(), 1);
    assert_eq!(renamed[0].details["name"]["to"], awkward);
}

/// `Conn::insert_rows`, which writes runs of joins: one statement of arrays on PostgreSQL,
/// multi-row INSERTs of at most 2,000 rows on SQLite.
async fn rows_inserted_as_one_run_keep_their_values_and_the_first_of_a_key_wins(backend: Backend) {
    use orgledger_projections::{args, Arg};
    let service = spawn_service(backend).await;
    let mut tx = service.db().begin().await.unwrap();
    let mut conn = tx.conn();
    conn.execute(
        "CREATE TABLE insert_rows_probe (k TEXT PRIMARY KEY, n BIGINT, note TEXT)",
        &[],
    )
    .await
    .unwrap();
    let awkward = "tab\there, line\nbreak, back\\slash \\N, \"quoted\", {a,b}, \u{e9}";
    let mut rows: Vec<Vec<Arg>> = vec![
        Vec::from(args!["a", 1_i64, Some(awkward.to_owned())]),
        Vec::from(args!["b", None::<i64>, None::<String>]),
        Vec::from(args!["a", 2_i64, Some("the second a".to_owned())]),
    ];
    // Enough more to take SQLite past one statement's rows.
    rows.extend((0..4_500_i64).map(|n| Vec::from(args![format!("n{n:05}"), n, None::<String>])));
    conn.insert_rows(
        "insert_rows_probe",
        &["k", "n", "note"],
        rows,
        "ON CONFLICT (k) DO NOTHING",
    )
    .await
    .unwrap();

    let first: Vec<(String, Option<i64>, Option<String>)> = conn
        .fetch_all(
            "SELECT k, n, note FROM insert_rows_probe WHERE k IN ('a', 'b') ORDER BY k",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        first,
        vec![
            ("a".to_owned(), Some(1), Some(awkward.to_owned())),
            ("b".to_owned(), None, None),
        ]
    );
    let count = conn
        .fetch_i64("SELECT count(*) FROM insert_rows_probe", &[])
        .await
        .unwrap();
    assert_eq!(count, Some(4_502));
    let last = conn
        .fetch_i64("SELECT n FROM insert_rows_probe WHERE k = 'n04499'", &[])
        .await
        .unwrap();
    assert_eq!(last, Some(4_499));

    // Without the clause a key that exists fails the call.
    let again = vec![Vec::from(args!["a", 3_i64, None::<String>])];
    let refused = conn
        .insert_rows("insert_rows_probe", &["k", "n", "note"], again, "")
        .await;
    assert!(matches!(refused, Err((0, _))), "{refused:?}");
    tx.rollback().await.unwrap();
}

/// The audit log's schema 3 made its organization a `uuid` on PostgreSQL (schema 2 made its
/// key an index): a table of schema 2, organization as text, is rebuilt into the new shape
/// and swapped in before the service opens, not kept and written with the new rows, nor
/// emptied and served while it fills again.
async fn a_read_model_of_an_older_schema_is_rebuilt_before_the_service_opens(backend: Backend) {
    let service = spawn_service(backend).await;
    let org = acme_with_mia(&service.ledger).await;
    service.catch_up().await;
    let before = dump_read_models(service.db()).await;
    match service.db() {
        Database::Postgres(pool) => {
            sqlx::query("ALTER TABLE rm_audit_log ALTER COLUMN organization_id TYPE TEXT")
                .execute(pool)
                .await
                .unwrap();
            sqlx::query(
                "UPDATE projection_checkpoints SET schema_version = 2 WHERE name = 'audit_log'",
            )
            .execute(pool)
            .await
            .unwrap();
        }
        Database::Sqlite(pool) => {
            sqlx::query(
                "UPDATE projection_checkpoints SET schema_version = 2 WHERE name = 'audit_log'",
            )
            .execute(pool)
            .await
            .unwrap();
        }
    }
    assert_eq!(audit_organization_type(service.db()).await, "text");

    let reopened = service.reopen().await;
    // Complete as soon as the service is open, with nothing left to apply: replayed from the
    // start into a new table (an entry applied on top of the old rows would break the key).
    assert_eq!(dump_read_models(reopened.database()).await, before);
    assert_eq!(reopened.projector.catch_up().await.unwrap(), 0);
    let expected = match backend {
        Backend::Postgres => "uuid",
        Backend::Sqlite => "text",
    };
    assert_eq!(audit_organization_type(reopened.database()).await, expected);
    let joined = audit_of(reopened.database(), &org.to_string(), "member.joined").await;
    assert_eq!(joined.len(), 2, "olivia's and mia's: {joined:?}");
    assert!(joined
        .iter()
        .all(|entry| entry.id == format!("{org}:{}", entry.sequence)));
    // Entries are found by the id's canonical form only, as when the column was text: not
    // by another spelling of the same UUID, nor by anything that is not one.
    let upper = org.to_string().to_uppercase();
    assert!(audit_of(reopened.database(), &upper, "member.joined")
        .await
        .is_empty());
    assert!(audit_of(reopened.database(), "acme", "member.joined")
        .await
        .is_empty());
    let status = reopened.projector.status().await.unwrap();
    assert!(status.iter().all(|s| s.last_error.is_none()), "{status:?}");
    // The swap recorded the new schema: the next start rebuilds nothing.
    let schema = "SELECT schema_version FROM projection_checkpoints WHERE name = 'audit_log'";
    assert_eq!(
        count(reopened.database(), schema).await,
        projection_named("audit_log", "").unwrap().schema_version()
    );
    assert_eq!(
        index_names(reopened.database(), "rm_audit_log").await,
        [
            "rm_audit_log_by_action",
            "rm_audit_log_by_actor",
            "rm_audit_log_by_resource",
            "rm_audit_log_by_time",
            "rm_audit_log_key",
        ]
    );
}

/// `projections rebuild` opens the service without the start-up rebuild of the read models
/// it is about to rebuild: an older-schema audit log is replayed once, by the rebuild asked
/// for, not a first time on the way in.
async fn a_rebuild_asked_for_replays_an_older_schema_once(backend: Backend) {
    let service = spawn_service(backend).await;
    acme_with_mia(&service.ledger).await;
    service.catch_up().await;
    let before = dump_read_models(service.db()).await;
    let outdated = "UPDATE projection_checkpoints SET schema_version = 2 WHERE name = 'audit_log'";
    try_execute(service.db(), outdated).await.unwrap();
    if backend == Backend::Postgres {
        let text = "ALTER TABLE rm_audit_log ALTER COLUMN organization_id TYPE TEXT";
        try_execute(service.db(), text).await.unwrap();
    }
    let schema = "SELECT schema_version FROM projection_checkpoints WHERE name = 'audit_log'";
    let current = projection_named("audit_log", "").unwrap().schema_version();

    let database = Database::connect(&service.database.url).await.unwrap();
    let reopened = orgledger::service::Orgledger::open_to_rebuild(
        database,
        service.master_key.clone(),
        &["audit_log"],
    )
    .await
    .unwrap();
    // Left as it was for the rebuild: the old schema, and the rows it had.
    assert_eq!(count(reopened.database(), schema).await, 2);
    assert_eq!(dump_read_models(reopened.database()).await, before);
    if backend == Backend::Postgres {
        assert_eq!(audit_organization_type(reopened.database()).await, "text");
    }

    let events = count(reopened.database(), "SELECT count(*) FROM events").await;
    let report = reopened
        .projector
        .rebuild("audit_log", false)
        .await
        .unwrap();
    assert_eq!(report.events as i64, events);
    assert_eq!(count(reopened.database(), schema).await, current);
    assert_eq!(dump_read_models(reopened.database()).await, before);
    if backend == Backend::Postgres {
        assert_eq!(audit_organization_type(reopened.database()).await, "uuid");
    }
}

/// A start-up rebuild into a new schema that fails on an event (here one whose organization
/// is not a UUID, which the audit log refuses) would fail every start: the service opens
/// with that read model emptied and replayed in place, held back by the event's batch and
/// reporting it.
async fn an_event_the_new_schema_cannot_take_leaves_the_service_open_and_reports_it(
    backend: Backend,
) {
    let service = spawn_service(backend).await;
    let org = acme_with_mia(&service.ledger).await;
    service.catch_up().await;
    let outdated = "UPDATE projection_checkpoints SET schema_version = 2 WHERE name = 'audit_log'";
    let bad_event = r#"INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                           event_version, payload, metadata)
        VALUES ('organization', 'not-a-uuid', 1, 'MemberRoleChanged', '1',
                '{"MemberRoleChanged": {"user_id": "mia", "from": "member", "to": "admin"}}',
                '{"actor_type": "user", "actor_id": "olivia", "occurred_at": "2026-11-22T10:00:00Z"}')"#;
    for sql in [outdated, bad_event] {
        try_execute(service.db(), sql).await.unwrap();
    }

    let reopened = service.reopen().await;
    reopened.projector.catch_up().await.unwrap_err();
    let status = reopened.projector.status().await.unwrap();
    let audit = status.iter().find(|s| s.name == "audit_log").unwrap();
    assert!(
        audit
            .failed_event
            .as_deref()
            .unwrap_or_default()
            .contains("not-a-uuid"),
        "{audit:?}"
    );
    // Emptied and made again in the new schema, to be replayed in place.
    let expected = match backend {
        Backend::Postgres => "uuid",
        Backend::Sqlite => "text",
    };
    assert_eq!(audit_organization_type(reopened.database()).await, expected);
    let schema = "SELECT schema_version FROM projection_checkpoints WHERE name = 'audit_log'";
    assert_eq!(
        count(reopened.database(), schema).await,
        projection_named("audit_log", "").unwrap().schema_version()
    );
    // Commands still run.
    run(
        &reopened.ledger,
        org,
        "olivia",
        set_role("mia", Role::Admin),
    )
    .await;
}

async fn rebuilding_every_read_model_at_once_reproduces_them_from_one_read_of_the_log(
    backend: Backend,
) {
    let service = spawn_service(backend).await;
    let org = create_org(&service.ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    for i in 0..12 {
        let member = format!("m{i:02}");
        add_member(&service.ledger, org, "olivia", &member, Role::Member).await;
        run(
            &service.ledger,
            org,
            "olivia",
            set_role(&member, Role::Admin),
        )
        .await;
    }
    let (_, version) = service.ledger.load(org).await.unwrap();
    service.catch_up().await;
    let before = dump_read_models(service.db()).await;
    let tables: Vec<String> = PROJECTION_NAMES
        .iter()
        .flat_map(|name| projection_named(name, "").unwrap().tables())
        .map(|(live, _)| live.to_owned())
        .collect();
    let mut indexes_before = Vec::new();
    for table in &tables {
        indexes_before.push(index_names(service.db(), table).await);
    }

    let report = service.projector.rebuild_all(false).await.unwrap();
    assert_eq!(
        report.events, version as u64,
        "the log was read once for all six read models"
    );
    let phases =
        report.replay_seconds + report.index_seconds + report.analyze_seconds + report.swap_seconds;
    assert!(
        report.replay_seconds > 0.0
            && report.swap_seconds > 0.0
            && (phases - report.seconds).abs() < 1e-6,
        "{report:?}"
    );
    assert_eq!(dump_read_models(service.db()).await, before);
    // Fresh tables come with statistics on PostgreSQL: autovacuum would not analyze these
    // for a while.
    if let Database::Postgres(pool) = service.db() {
        for table in ["rm_members", "rm_audit_log", "rm_organizations"] {
            assert!(
                has_planner_statistics(pool, table).await,
                "{table} has no planner statistics after the rebuild"
            );
        }
    }
    let counted: Vec<String> = service.projector.counters().into_keys().collect();
    assert!(
        counted
            .iter()
            .all(|name| PROJECTION_NAMES.contains(&name.as_str())),
        "the rebuild's copies never become metric labels: {counted:?}"
    );
    let statuses = service.projector.status().await.unwrap();
    assert!(
        statuses
            .iter()
            .all(|status| status.backlog == 0 && status.last_error.is_none()),
        "{statuses:?}"
    );
    // The rebuilt tables carry the live index names, and a restart adds no second set.
    let reopened = service.reopen().await;
    assert_eq!(
        index_names(reopened.database(), "rm_audit_log").await,
        [
            "rm_audit_log_by_action",
            "rm_audit_log_by_actor",
            "rm_audit_log_by_resource",
            "rm_audit_log_by_time",
            "rm_audit_log_key",
        ]
    );
    for (table, before) in tables.iter().zip(&indexes_before) {
        assert_eq!(
            &index_names(reopened.database(), table).await,
            before,
            "{table} keeps exactly its indexes through a rebuild and a restart"
        );
    }
    drop(reopened);
    the_swapped_in_tables_keep_being_maintained(&service, org).await;
}

/// A log of several batches, live (500 events) and rebuilt (5,000): members join and change
/// role within one batch, written as one INSERT and then one UPDATE, so each ends with the
/// role the log last gave them; their organization's count moves once a batch.
async fn a_rebuild_of_many_batches_reproduces_every_read_model_and_the_roles_last_given(
    backend: Backend,
) {
    let service = spawn_service(backend).await;
    let mut roles = Vec::new();
    for (o, name) in ["Acme", "Globex", "Initech"].into_iter().enumerate() {
        let org = create_org(&service.ledger, name, &name.to_lowercase(), "olivia")
            .await
            .organization_id;
        let mut events = Vec::new();
        let mut expected = vec![("olivia".to_owned(), "owner".to_owned())];
        for k in 0..40 {
            let user = format!("u{o}{k:02}");
            events.push(member_joined(&user, chrono::Utc::now()));
            // member, admin, member, ...: an odd number of flips leaves an admin.
            let flips = 150 + k % 2;
            events.extend(role_flips(flips, &user));
            let role = if flips % 2 == 1 { "admin" } else { "member" };
            expected.push((user, role.to_owned()));
        }
        service
            .ledger
            .import(org, events, std::collections::HashMap::new())
            .await
            .unwrap();
        expected.sort();
        roles.push((org, expected));
    }
    service.catch_up().await;
    let before = dump_read_models(service.db()).await;

    let mut logged = 0;
    for (org, _) in &roles {
        logged += service.ledger.load(*org).await.unwrap().1;
    }
    assert!(logged > 3 * 5_000, "{logged} events");
    let report = service.projector.rebuild_all(false).await.unwrap();
    assert_eq!(report.events, logged as u64);
    assert_eq!(dump_read_models(service.db()).await, before);
    for (org, expected) in roles {
        let page = members::list(service.db(), &org.to_string(), &member_filter())
            .await
            .unwrap()
            .unwrap();
        let mut listed: Vec<(String, String)> = page
            .items
            .into_iter()
            .map(|member| (member.user_id, member.role))
            .collect();
        listed.sort();
        assert_eq!(listed, expected);
        let organization = organizations::get(service.db(), &org.to_string())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(organization.member_count, 41);
    }
}

/// The backlog's `ANALYZE` is PostgreSQL's: SQLite's planner uses an index without
/// statistics, and nothing gathers them there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_up_backlog_leaves_the_read_models_analyzed_on_postgres() {
    let mut service = spawn_service(Backend::Postgres).await;
    let Database::Postgres(pool) = service.db().clone() else {
        unreachable!("a PostgreSQL service")
    };
    let org = acme_with_mia(&service.ledger).await;
    service.catch_up().await;
    // A bulk import while no runner runs: a backlog of exactly twelve full live batches,
    // which the runner finds caught up only by reading nothing.
    for _ in 0..6 {
        import_role_flips(&service, org, 1_000).await;
    }
    service.start_projections();
    // The ANALYZE runs beside the runner; autovacuum's would count separately.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !analyzed_by_hand(&pool, "rm_audit_log").await {
        assert!(
            std::time::Instant::now() < deadline,
            "the audit log was not analyzed after the backlog"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(has_planner_statistics(&pool, "rm_members").await);
}

async fn a_projection_without_a_checkpoint_is_refused_rather_than_run_from_the_start(
    backend: Backend,
) {
    let service = spawn_service(backend).await;
    create_org(&service.ledger, "Acme", "acme", "olivia").await;
    let unprepared = projection_named("members", "__never_prepared").unwrap();
    let error = service
        .projector
        .run_batch(unprepared.as_ref())
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("members__never_prepared has no checkpoint"),
        "{error}"
    );
}

async fn a_projection_ahead_of_the_shared_batch_keeps_its_checkpoint(backend: Backend) {
    let service = spawn_service(backend).await;
    let org = acme_with_mia(&service.ledger).await;
    service.catch_up().await;
    // More events than one live batch holds.
    import_role_flips(&service, org, 1_200).await;
    // The audit log alone runs ahead to the end of the log...
    let audit_projection = projection_named("audit_log", "").unwrap();
    let mut waited = 0;
    while service
        .projector
        .status()
        .await
        .unwrap()
        .iter()
        .any(|s| s.name == "audit_log" && s.backlog > 0)
    {
        service
            .projector
            .run_batch(audit_projection.as_ref())
            .await
            .unwrap();
        waited += 1;
        assert!(waited < 200, "the audit log never caught up");
    }
    // ...then shared batches bring the others level, passing it by.
    service.catch_up().await;
    let (_, version) = service.ledger.load(org).await.unwrap();
    for status in service.projector.status().await.unwrap() {
        assert_eq!(
            status.events_applied, version as i64,
            "{} read each event once",
            status.name
        );
    }
    let entries = audit::list(
        service.db(),
        &org.to_string(),
        &AuditFilter::default(),
        5,
        None,
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!entries.items.is_empty());
    let member = members::get(service.db(), &org.to_string(), "mia")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(member.role, "member", "the last of the flips wins");
}

async fn a_rebuild_swaps_in_fresh_tables_while_reads_keep_working(backend: Backend) {
    let service = spawn_service(backend).await;
    let org = create_org(&service.ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    for i in 0..15 {
        add_member(
            &service.ledger,
            org,
            "olivia",
            &format!("m{i:02}"),
            Role::Member,
        )
        .await;
    }
    service.catch_up().await;
    let before = dump_read_models(service.db()).await;

    let reader_db = service.db().clone();
    let id = org.to_string();
    let reader = tokio::spawn(async move {
        let mut reads = 0;
        for _ in 0..200 {
            let page = members::list(&reader_db, &id, &member_filter())
                .await
                .expect("reads keep working");
            assert_eq!(
                page.unwrap().items.len(),
                16,
                "readers never see a half-built table"
            );
            reads += 1;
            tokio::task::yield_now().await;
        }
        reads
    });
    for name in orgledger_projections::PROJECTION_NAMES {
        let report = service.projector.rebuild(name, false).await.unwrap();
        assert!(report.events > 0);
        println!(
            "rebuilt {name}: {} events, {:.0} events/s",
            report.events, report.events_per_second
        );
    }
    assert_eq!(reader.await.unwrap(), 200);
    assert_eq!(dump_read_models(service.db()).await, before);
    the_swapped_in_tables_keep_being_maintained(&service, org).await;
}

async fn member_pages_are_stable_under_concurrent_inserts(backend: Backend) {
    let service = spawn_service(backend).await;
    let org = create_org(&service.ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    for i in 0..5 {
        add_member(
            &service.ledger,
            org,
            "olivia",
            &format!("a{i}"),
            Role::Member,
        )
        .await;
    }
    service.catch_up().await;
    let id = org.to_string();
    let first = members::list(
        service.db(),
        &id,
        &MemberFilter {
            limit: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(first.items.len(), 3);
    // Members join between the pages.
    add_member(&service.ledger, org, "olivia", "z-late", Role::Member).await;
    service.catch_up().await;
    let mut seen: Vec<String> = first.items.iter().map(|m| m.user_id.clone()).collect();
    if let Some(next) = first.next_cursor {
        let filter = MemberFilter {
            limit: 3,
            cursor: Some(next),
            ..Default::default()
        };
        seen.extend(member_ids(service.db(), &id, filter).await);
    }
    assert_eq!(
        seen,
        ["olivia", "a0", "a1", "a2", "a3", "a4", "z-late"],
        "no member skipped or repeated"
    );
    // Members who joined at the same instant are ordered by user id, and a page boundary
    // between them splits them exactly.
    let instant = chrono::Utc::now() + chrono::Duration::days(1);
    let same_instant: Vec<OrganizationEvent> = ["t-c", "t-a", "t-b"]
        .into_iter()
        .map(|user| member_joined(user, instant))
        .collect();
    service
        .ledger
        .import(org, same_instant, std::collections::HashMap::new())
        .await
        .unwrap();
    service.catch_up().await;
    let filter = MemberFilter {
        limit: 1,
        q: Some("t-".into()),
        ..Default::default()
    };
    assert_eq!(
        member_ids(service.db(), &id, filter).await,
        ["t-a", "t-b", "t-c"]
    );
    let bad = members::list(
        service.db(),
        &id,
        &MemberFilter {
            limit: 3,
            cursor: Some("garbage".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(bad.is_err(), "a forged cursor is refused, not a crash");
    let admins = members::list(
        service.db(),
        &id,
        &MemberFilter {
            limit: 50,
            q: Some("A3@EXAMPLE".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(admins.items.len(), 1);
}

async fn audit_log_filters_select_the_right_entries(backend: Backend) {
    let service = spawn_service(backend).await;
    let org = acme_with_mia(&service.ledger).await;
    run(&service.ledger, org, "olivia", set_role("mia", Role::Admin)).await;
    service.catch_up().await;
    let id = org.to_string();
    let all = audit::list(service.db(), &id, &AuditFilter::default(), 100, None)
        .await
        .unwrap()
        .unwrap();
    let actions: Vec<_> = all.items.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "organization.created",
            "member.joined",
            "invitation.sent",
            "invitation.accepted",
            "member.joined",
            "member.role_changed"
        ]
    );
    let by = |filter: AuditFilter| {
        let db = service.db().clone();
        let id = id.clone();
        async move {
            audit::list(&db, &id, &filter, 100, None)
                .await
                .unwrap()
                .unwrap()
                .items
                .into_iter()
                .map(|e| e.sequence)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        by(AuditFilter {
            action: Some("member.*".into()),
            ..Default::default()
        })
        .await,
        [2, 5, 6]
    );
    assert_eq!(
        by(AuditFilter {
            actor: Some("mia".into()),
            ..Default::default()
        })
        .await,
        [4, 5]
    );
    assert_eq!(
        by(AuditFilter {
            resource_type: Some("invitation".into()),
            ..Default::default()
        })
        .await,
        [3, 4]
    );
    assert_eq!(
        by(AuditFilter {
            q: Some("MIA@example".into()),
            ..Default::default()
        })
        .await,
        [3, 4, 5]
    );
    let sixth = all.items[5].occurred_at;
    assert_eq!(
        by(AuditFilter {
            from: Some(sixth),
            ..Default::default()
        })
        .await,
        [6]
    );
    assert_eq!(
        by(AuditFilter {
            to: Some(sixth),
            ..Default::default()
        })
        .await,
        [1, 2, 3, 4, 5]
    );
    let page = audit::list(service.db(), &id, &AuditFilter::default(), 4, None)
        .await
        .unwrap()
        .unwrap();
    let rest = audit::list(
        service.db(),
        &id,
        &AuditFilter::default(),
        4,
        page.next_cursor.as_deref(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        rest.items.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [5, 6]
    );
}

async fn collect(stream: orgledger_projections::exports::ByteStream) -> Vec<u8> {
    let chunks: Vec<_> = stream.collect().await;
    chunks
        .into_iter()
        .flat_map(|chunk| chunk.expect("export chunk"))
        .collect()
}

async fn audit_exports_parse_back_as_csv_and_json(backend: Backend) {
    let service = spawn_service(backend).await;
    let org = create_org(&service.ledger, "Acme, \"Quoted\" Inc", "acme", "olivia")
        .await
        .organization_id;
    add_member(&service.ledger, org, "olivia", "mia", Role::Member).await;
    service.catch_up().await;
    let id = org.to_string();
    let csv_bytes = collect(audit_log(
        service.db().clone(),
        id.clone(),
        AuditFilter::default(),
        AuditFormat::Csv,
    ))
    .await;
    let mut reader = csv::Reader::from_reader(csv_bytes.as_slice());
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        header,
        [
            "sequence",
            "occurred_at",
            "actor_type",
            "actor_id",
            "action",
            "resource_type",
            "resource_id",
            "details"
        ]
    );
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(records.len(), 5);
    assert_eq!(&records[0][4], "organization.created");
    let details: serde_json::Value = serde_json::from_str(&records[0][7]).unwrap();
    assert_eq!(
        details["name"], "Acme, \"Quoted\" Inc",
        "quotes and commas survive RFC 4180 quoting"
    );
    assert!(csv_bytes.windows(2).any(|w| w == b"\r\n"), "CRLF line ends");

    let json_bytes = collect(audit_log(
        service.db().clone(),
        id.clone(),
        AuditFilter::default(),
        AuditFormat::Json,
    ))
    .await;
    let entries: Vec<audit::AuditEntryView> = serde_json::from_slice(&json_bytes).unwrap();
    assert_eq!(entries.len(), 5);
    let bounded = AuditFilter {
        from: Some(entries[3].occurred_at),
        ..Default::default()
    };
    let json_bytes = collect(audit_log(
        service.db().clone(),
        id,
        bounded,
        AuditFormat::Json,
    ))
    .await;
    let entries: Vec<audit::AuditEntryView> = serde_json::from_slice(&json_bytes).unwrap();
    assert_eq!(
        entries.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [4, 5]
    );
}

/// An export's organization, audit entries and events stand at one version: a command that
/// lands while it streams is in neither its audit log nor its events. The stream's channel
/// holds four chunks, so once the head is taken the writer is held with the log still unread
/// while the organization changes.
async fn a_data_exports_log_ends_at_its_organizations_version_whatever_lands_meanwhile(
    backend: Backend,
) {
    let service = spawn_service(backend).await;
    let org = create_org(&service.ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    add_member(&service.ledger, org, "olivia", "mia", Role::Member).await;
    service.catch_up().await;
    let view = organizations::get(service.db(), &org.to_string())
        .await
        .unwrap()
        .unwrap();
    let version = view.version;
    let mut stream = data_export(service.service.clone(), view);
    let mut bytes = stream.next().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    add_member(&service.ledger, org, "olivia", "max", Role::Member).await;
    run(
        &service.ledger,
        org,
        "olivia",
        OrganizationCommand::CreateGroup(CreateGroup {
            group_id: Uuid::now_v7(),
            name: "Late".into(),
            description: None,
        }),
    )
    .await;
    service.catch_up().await;
    while let Some(chunk) = stream.next().await {
        bytes.extend(chunk.unwrap());
    }
    let export: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(export["organization"]["version"], version);
    for section in ["audit_log", "events"] {
        let sequences: Vec<i64> = export[section]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["sequence"].as_i64().unwrap())
            .collect();
        assert_eq!(
            sequences,
            (1..=version).collect::<Vec<_>>(),
            "{section} ends at the organization's version"
        );
    }
    let later = organizations::get(service.db(), &org.to_string())
        .await
        .unwrap()
        .unwrap();
    assert!(
        later.version > version,
        "the organization moved on meanwhile"
    );
}

async fn the_data_export_is_complete_and_holds_no_secret(backend: Backend) {
    let service = spawn_service(backend).await;
    let org = create_org(&service.ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    let secret = add_member(&service.ledger, org, "olivia", "mia", Role::Member).await;
    let pending = orgledger::tokens::issue("inv");
    let send = SendInvitation {
        invitation_id: Uuid::now_v7(),
        email: Some(Email::parse("email", "zed@example.com").unwrap()),
        role: Role::Viewer,
        first_name: None,
        last_name: None,
        title: None,
        group_id: None,
        expires_in_days: None,
        max_uses: MaxUses::ONE,
        token_sha256: pending.sha256.clone(),
    };
    run(
        &service.ledger,
        org,
        "olivia",
        OrganizationCommand::SendInvitation(send),
    )
    .await;
    let group_id = Uuid::now_v7();
    run(
        &service.ledger,
        org,
        "olivia",
        OrganizationCommand::CreateGroup(CreateGroup {
            group_id,
            name: "Design".into(),
            description: None,
        }),
    )
    .await;
    run(
        &service.ledger,
        org,
        "olivia",
        OrganizationCommand::AddGroupMember(GroupMembership {
            group_id,
            user_id: uid("mia"),
        }),
    )
    .await;
    let key = orgledger::tokens::issue("sa");
    run(
        &service.ledger,
        org,
        "olivia",
        OrganizationCommand::CreateServiceAccount(CreateServiceAccount {
            service_account_id: Uuid::now_v7(),
            name: "CI".into(),
            description: None,
            scopes: vec![Scope::MembersRead],
            key_prefix: key.secret.chars().take(11).collect(),
            key_sha256: key.sha256.clone(),
        }),
    )
    .await;
    service.catch_up().await;
    let view = organizations::get(service.db(), &org.to_string())
        .await
        .unwrap()
        .unwrap();
    let bytes = collect(data_export(service.service.clone(), view)).await;
    let text = String::from_utf8(bytes.clone()).unwrap();
    for forbidden in [
        secret.as_str(),
        pending.secret.as_str(),
        pending.sha256.as_str(),
        key.secret.as_str(),
        key.sha256.as_str(),
        "token_sha256",
        "key_sha256",
        "enc:v1:",
    ] {
        assert!(
            !text.contains(forbidden),
            "the export contains {forbidden:?}"
        );
    }
    let export: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(export["format_version"], 1);
    assert_eq!(export["organization"]["slug"], "acme");
    assert_eq!(export["members"].as_array().unwrap().len(), 2);
    assert_eq!(export["invitations"].as_array().unwrap().len(), 2);
    let groups = export["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0]["name"], "Design");
    assert_eq!(groups[0]["member_ids"], serde_json::json!(["mia"]));
    let accounts = export["service_accounts"].as_array().unwrap();
    assert_eq!(accounts.len(), 1, "{accounts:?}");
    assert_eq!(accounts[0]["name"], "CI");
    assert_eq!(accounts[0]["scopes"], serde_json::json!(["members:read"]));
    let (_, version) = service.ledger.load(org).await.unwrap();
    assert_eq!(export["audit_log"].as_array().unwrap().len(), version);
    assert_eq!(export["events"].as_array().unwrap().len(), version);
    assert_eq!(
        export["events"][1]["payload"]["MemberJoined"]["email"],
        "olivia@example.com"
    );
}

/// The organization as of each moment, replayed the plain way: every event from the first.
fn replayed_as_of(
    events: &[cqrs_es::EventEnvelope<Organization>],
    as_of: AsOf,
) -> Option<(Organization, usize)> {
    let mut state = Organization::default();
    let mut sequence = 0;
    // Whether the event before was not its command's last: a sequence stands for the state
    // its whole command left.
    let mut command_goes_on = false;
    for event in events {
        let included = match as_of {
            AsOf::Sequence(last) => event.sequence <= last || command_goes_on,
            AsOf::Time(at) => {
                event.metadata["occurred_at"]
                    .parse::<chrono::DateTime<chrono::Utc>>()
                    .unwrap()
                    <= at
            }
        };
        if !included {
            break;
        }
        cqrs_es::Aggregate::apply(&mut state, event.payload.clone());
        sequence = event.sequence;
        command_goes_on =
            event.metadata.get("command_continues").map(String::as_str) == Some("true");
    }
    (sequence > 0).then_some((state, sequence))
}

/// More than a page of history, a snapshot in the middle of it, and events after it: a past
/// state started from the snapshot (when it stands at or before the moment) or paged through
/// from the first event is the same as the plain replay of the whole log.
async fn a_past_state_read_from_a_snapshot_equals_the_replay_from_the_first_event(
    backend: Backend,
) {
    let service = spawn_service(backend).await;
    let org = acme_with_mia(&service.ledger).await;
    let start = chrono::Utc::now();
    // `flips` role changes of mia in one commit, occurred `seconds` after `start`.
    let flips_at = |org: Uuid, seconds: i64, flips: usize| {
        let at = (start + chrono::Duration::seconds(seconds)).to_rfc3339();
        let metadata = [("occurred_at".to_owned(), at)].into();
        let ledger = &service.ledger;
        async move {
            ledger
                .import(org, role_flips(flips, "mia"), metadata)
                .await
                .unwrap();
        }
    };
    flips_at(org, 1, 700).await;
    flips_at(org, 90, 600).await;
    let (_, snapshot_at) = service.ledger.snapshot(org).await.unwrap().unwrap();
    flips_at(org, 91, 7).await;
    let events = service.ledger.events(org).await.unwrap();
    let last = events.last().unwrap().sequence;
    // Imported history says nothing of its commands: none of its events is marked as one
    // that a command goes on after (only the first, the creation, is).
    let marked: Vec<usize> = events
        .iter()
        .filter(|event| event.metadata.contains_key("command_continues"))
        .map(|event| event.sequence)
        .collect();
    assert_eq!(marked, [1, 4], "the creation and mia's acceptance only");
    assert!(
        snapshot_at > 1_000 && snapshot_at < last,
        "snapshot at {snapshot_at} of {last}"
    );

    let moments = [
        AsOf::Sequence(1),
        AsOf::Sequence(704),
        AsOf::Sequence(snapshot_at - 1),
        AsOf::Sequence(snapshot_at),
        AsOf::Sequence(snapshot_at + 3),
        AsOf::Sequence(last + 100),
        AsOf::Time(start - chrono::Duration::days(1)),
        AsOf::Time(start),
        AsOf::Time(start + chrono::Duration::milliseconds(1_500)),
        AsOf::Time(start + chrono::Duration::milliseconds(2_500)),
        AsOf::Time(start + chrono::Duration::seconds(60)),
        AsOf::Time(start + chrono::Duration::seconds(61)),
        AsOf::Time(start + chrono::Duration::seconds(62)),
        AsOf::Time(start + chrono::Duration::seconds(149)),
        AsOf::Time(start + chrono::Duration::seconds(150)),
        AsOf::Time(start + chrono::Duration::days(1)),
    ];
    for as_of in moments {
        let past = state_as_of(&service.ledger, org, as_of).await.unwrap();
        let replayed = replayed_as_of(&events, as_of);
        // The instant it stood at: the one asked for, or when the event asked for occurred
        // (read apart when the start is a snapshot at that very event), or now past the
        // log's end, where it still stands.
        if let (Some(past), Some((_, sequence))) = (&past, &replayed) {
            match as_of {
                AsOf::Time(at) => assert_eq!(past.moment, at),
                AsOf::Sequence(asked) if asked > last => {
                    let now = chrono::Utc::now();
                    assert!(
                        past.moment <= now && past.moment > now - chrono::Duration::seconds(60)
                    );
                }
                AsOf::Sequence(_) => assert_eq!(
                    past.moment,
                    events[sequence - 1].metadata["occurred_at"]
                        .parse::<chrono::DateTime<chrono::Utc>>()
                        .unwrap(),
                    "{as_of:?}"
                ),
            }
        }
        let past = past.map(|past| (past.organization, past.as_of_sequence));
        assert_eq!(past, replayed, "{as_of:?}");
    }
    // The latest state is read from the snapshot and the few events after it.
    let stats = service.ledger.read_stats();
    let read_before = stats.events();
    let latest = state_as_of(&service.ledger, org, AsOf::Sequence(last))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.as_of_sequence, last);
    let read = stats.events() - read_before;
    assert!(read <= 10, "{read} events read for the latest state");
    // The snapshot the current one replaced is kept: a moment between the two starts from
    // it and reads only the events after it.
    let sequences = service.ledger.snapshot_sequences(org).await.unwrap();
    assert!(
        sequences.len() >= 2 && sequences.last() == Some(&snapshot_at),
        "{sequences:?}"
    );
    let past = sequences[0];
    let (snapshots_before, read_before) = (stats.snapshots(), stats.events());
    let between = state_as_of(&service.ledger, org, AsOf::Sequence(past + 1))
        .await
        .unwrap()
        .unwrap();
    // Past the event asked for only to its command's end.
    let through = replayed_as_of(&events, AsOf::Sequence(past + 1)).unwrap().1;
    assert_eq!(between.as_of_sequence, through);
    assert_eq!(
        stats.snapshots() - snapshots_before,
        1,
        "one snapshot opened"
    );
    assert_eq!(
        stats.events() - read_before,
        (through - past) as u64,
        "only the events after it read"
    );
    // By time too: a minute after the first import's events (the room left for commits
    // out of order), before the second's, starts from the snapshot between them.
    let snapshots_before = stats.snapshots();
    let by_time = state_as_of(
        &service.ledger,
        org,
        AsOf::Time(start + chrono::Duration::seconds(62)),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(by_time.as_of_sequence, past);
    assert_eq!(
        stats.snapshots() - snapshots_before,
        1,
        "one snapshot opened"
    );
    // A moment before every snapshot opens none, and replays from the first event.
    let snapshots_before = stats.snapshots();
    state_as_of(&service.ledger, org, AsOf::Sequence(past - 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stats.snapshots(), snapshots_before, "a snapshot was opened");

    // Commands commit in the order they finish, not the one they began in: an event may
    // have occurred after one that follows it. A moment between the two is not taken from a
    // snapshot that holds the later-occurring event.
    let reordered = create_org(&service.ledger, "Beta", "beta", "olivia")
        .await
        .organization_id;
    add_member(&service.ledger, reordered, "olivia", "mia", Role::Member).await;
    flips_at(reordered, 120, 700).await;
    flips_at(reordered, 1, 600).await;
    let events = service.ledger.events(reordered).await.unwrap();
    for as_of in [
        AsOf::Time(start + chrono::Duration::seconds(60)),
        AsOf::Time(start + chrono::Duration::seconds(200)),
    ] {
        let past = state_as_of(&service.ledger, reordered, as_of)
            .await
            .unwrap()
            .map(|past| (past.organization, past.as_of_sequence));
        assert_eq!(past, replayed_as_of(&events, as_of), "{as_of:?}");
    }
}

async fn raw_events_and_past_states_come_from_the_log(backend: Backend) {
    let service = spawn_service(backend).await;
    let org = acme_with_mia(&service.ledger).await;
    let before_promotion = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    run(&service.ledger, org, "olivia", set_role("mia", Role::Admin)).await;

    let events = raw_events(&service.ledger, org, 0, 100).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(
        events[1].payload["MemberJoined"]["email"],
        "olivia@example.com"
    );
    assert_eq!(events[5].event_type, "MemberRoleChanged");
    let page = raw_events(&service.ledger, org, 4, 1).await.unwrap();
    assert_eq!(page.iter().map(|e| e.sequence).collect::<Vec<_>>(), [5]);

    let at_five = state_as_of(&service.ledger, org, AsOf::Sequence(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(at_five.as_of_sequence, 5);
    assert_eq!(at_five.organization.members[&uid("mia")].role, Role::Member);
    // A command's events are one moment: its creation with its first owner, an acceptance
    // with the member it makes. A sequence inside one stands for the state it left, which
    // its events' metadata tells (every one but the last goes on).
    let continues: Vec<Option<&str>> = events
        .iter()
        .map(|event| event.metadata["command_continues"].as_str())
        .collect();
    assert_eq!(
        continues,
        [Some("true"), None, None, Some("true"), None, None]
    );
    let created = state_as_of(&service.ledger, org, AsOf::Sequence(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(created.as_of_sequence, 2);
    assert_eq!(
        created.organization.members[&uid("olivia")].role,
        Role::Owner
    );
    let accepted = state_as_of(&service.ledger, org, AsOf::Sequence(4))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(accepted.as_of_sequence, 5);
    assert!(accepted.organization.members.contains_key(&uid("mia")));
    assert!(accepted.organization.invitations.is_empty());
    let then = state_as_of(&service.ledger, org, AsOf::Time(before_promotion))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(then.as_of_sequence, 5);
    let long_ago = chrono::Utc::now() - chrono::Duration::days(365);
    assert!(state_as_of(&service.ledger, org, AsOf::Time(long_ago))
        .await
        .unwrap()
        .is_none());

    let purge = OrganizationCommand::PurgeOrganization(PurgeOrganization {
        confirm_name: "Acme".into(),
    });
    run(&service.ledger, org, "olivia", purge).await;
    let erased = raw_events(&service.ledger, org, 0, 100).await.unwrap();
    assert_eq!(erased[1].payload["MemberJoined"]["email"], ERASED);
    assert_eq!(erased.last().unwrap().event_type, "OrganizationPurged");
    // Purged, the organization no longer stands; before the purge it stood, erased.
    let now = chrono::Utc::now();
    assert!(state_as_of(&service.ledger, org, AsOf::Time(now))
        .await
        .unwrap()
        .is_none());
    let before_purge = state_as_of(&service.ledger, org, AsOf::Sequence(6))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(before_purge.organization.members.len(), 2);
    assert_eq!(
        before_purge.organization.members[&uid("mia")]
            .email
            .as_str(),
        ERASED
    );
}

async fn organizations_past_their_restore_window_are_purged_by_system(backend: Backend) {
    let service = spawn_service(backend).await;
    let org = acme_with_mia(&service.ledger).await;
    let recent = create_org(&service.ledger, "Recent", "recent", "rita")
        .await
        .organization_id;
    let long_ago = chrono::Utc::now() - chrono::Duration::days(31);
    let delete = |name: &str| {
        OrganizationCommand::DeleteOrganization(DeleteOrganization {
            confirm_name: name.into(),
        })
    };
    service
        .ledger
        .run(
            org,
            Command::new(user("olivia"), long_ago, delete("Acme")),
            &RequestContext::default(),
            None,
        )
        .await
        .unwrap();
    run(&service.ledger, recent, "rita", delete("Recent")).await;
    service.catch_up().await;

    assert_eq!(service.purge_expired().await.unwrap(), 1);
    service.catch_up().await;
    let id = org.to_string();
    assert!(organizations::get(service.db(), &id)
        .await
        .unwrap()
        .is_none());
    assert!(members::list(service.db(), &id, &member_filter())
        .await
        .unwrap()
        .unwrap()
        .items
        .is_empty());
    let log = audit::list(service.db(), &id, &AuditFilter::default(), 100, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(log.items.len(), 1, "only the tombstone remains");
    assert_eq!(
        (
            log.items[0].action.as_str(),
            log.items[0].actor.kind.as_str()
        ),
        ("organization.purged", "system")
    );
    assert!(!dump_read_models(service.db())
        .await
        .join("\n")
        .contains("mia@example.com"));
    let recent_view = organizations::get(service.db(), &recent.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recent_view.status, "deleted", "inside its window, it waits");

    // A rebuild's audit copy has no key during its replay and removes what the purge
    // deleted in one pass at its end: the same read models.
    let before = dump_read_models(service.db()).await;
    service.projector.rebuild_all(false).await.unwrap();
    assert_eq!(dump_read_models(service.db()).await, before);
}

async fn status_reports_positions_and_backlog(backend: Backend) {
    let service = spawn_service(backend).await;
    create_org(&service.ledger, "Acme", "acme", "olivia").await;
    let statuses = service.projector.status().await.unwrap();
    assert_eq!(statuses.len(), PROJECTION_NAMES.len());
    assert!(statuses
        .iter()
        .all(|s| s.backlog == 2 && s.events_applied == 0));
    service.catch_up().await;
    let statuses = service.projector.status().await.unwrap();
    assert!(statuses
        .iter()
        .all(|s| s.backlog == 0 && s.events_applied == 2 && s.position > 0));
}

/// PostgreSQL assigns positions at insert, so a transaction can commit after a later one.
/// (SQLite admits one writer at a time: no such interleaving exists there.) A write held
/// open in another database all along neither lets the late one be skipped nor holds the
/// rest back once it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_commits_late_is_not_skipped_on_postgres() {
    let service = spawn_service(Backend::Postgres).await;
    let org = acme_with_mia(&service.ledger).await;
    service.projector.apply_available().await.unwrap();
    let (_, version) = service.ledger.load(org).await.unwrap();
    let Database::Postgres(pool) = service.db() else {
        unreachable!()
    };
    let elsewhere = a_write_held_open_in_another_database().await;

    // A writer takes the next position and holds its transaction open...
    let mut slow = pool.begin().await.unwrap();
    let payload = serde_json::json!({"MemberRoleChanged": {"user_id": "mia", "from": "member", "to": "viewer"}});
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
         VALUES ('organization', $1, $2, 'MemberRoleChanged', '1', $3, '{}'::jsonb)",
    )
    .bind(org.to_string())
    .bind(version as i64 + 1)
    .bind(&payload)
    .execute(&mut *slow)
    .await
    .unwrap();
    // ...while others commit later positions, and the projector runs.
    let other = create_org(&service.ledger, "Beta", "beta", "bob")
        .await
        .organization_id;
    service.projector.apply_available().await.unwrap();
    let other_view = organizations::get(service.db(), &other.to_string())
        .await
        .unwrap();
    assert!(
        other_view.is_none(),
        "events behind an open transaction wait for it"
    );

    slow.commit().await.unwrap();
    service.catch_up().await;
    let mia = members::get(service.db(), &org.to_string(), "mia")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        mia.role, "viewer",
        "the late commit was applied, not skipped"
    );
    assert!(organizations::get(service.db(), &other.to_string())
        .await
        .unwrap()
        .is_some());
    elsewhere.close().await.unwrap();
}

/// A write transaction open in another database of the same server is no transaction of
/// this log: the projections read past it once its events have waited a moment (10 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_open_in_another_database_holds_no_read_model_back() {
    let service = spawn_service(Backend::Postgres).await;
    let elsewhere = a_write_held_open_in_another_database().await;
    let org = create_org(&service.ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while service.projector.apply_available().await.unwrap() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was read past the other database's write"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(organizations::get(service.db(), &org.to_string())
        .await
        .unwrap()
        .is_some());
    let statuses = service.projector.status().await.unwrap();
    assert!(
        statuses.iter().all(|status| status.backlog == 0),
        "{statuses:?}"
    );
    elsewhere.close().await.unwrap();
}

/// The live runner reads an organization's versions in the statement that locks the
/// checkpoints, so in a snapshot taken before the lock was granted. When the holder of the
/// lock changed the checkpoint, the versions it recorded must be read again: here it marked
/// the waiting event as applied to members, so members skips it and the others apply it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_waited_for_the_checkpoint_lock_reads_the_versions_again() {
    let mut service = spawn_service(Backend::Postgres).await;
    service.start_projections();
    while service.projector.leading().len() < PROJECTION_NAMES.len() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let org = create(&service, "Acme", "acme", "olivia").await;
    add_member(&service.ledger, org, "olivia", "mia", Role::Member).await;
    let (_, joined) = service.ledger.load(org).await.unwrap();
    service.projector.committed();
    assert!(service
        .projector
        .wait_for(&org.to_string(), joined as i64, Duration::from_secs(10))
        .await
        .unwrap());
    let Database::Postgres(pool) = service.db().clone() else {
        unreachable!("a PostgreSQL service")
    };

    // A role change committed before the lock is taken (a lock holder's transaction would
    // hold it back from the feed). Should the runner's poll apply it first, try another.
    let mut imported = 0;
    let (mut holder, version, before, changed_to) = loop {
        // Nothing of this organization is pending here (a retry's event was applied), so the
        // read model shows mia's role, and the change goes away from it.
        let current = members::get(service.db(), &org.to_string(), "mia")
            .await
            .unwrap()
            .unwrap()
            .role;
        let (flip, changed_to) = if current == "admin" {
            (1, "member")
        } else {
            (0, "admin")
        };
        service
            .ledger
            .import(
                org,
                vec![role_flips(2, "mia").swap_remove(flip)],
                std::collections::HashMap::new(),
            )
            .await
            .unwrap();
        imported += 1;
        let (_, version) = service.ledger.load(org).await.unwrap();
        let mut holder = pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM projection_checkpoints WHERE name = 'members' FOR UPDATE")
            .execute(&mut *holder)
            .await
            .unwrap();
        let applied: i64 = sqlx::query_scalar(
            "SELECT version FROM projected_versions
              WHERE projection = 'members' AND organization_id = $1",
        )
        .bind(org.to_string())
        .fetch_one(&mut *holder)
        .await
        .unwrap();
        if applied < version as i64 {
            break (holder, version, current, changed_to);
        }
        holder.rollback().await.unwrap();
    };
    service.projector.committed();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'
                AND query LIKE '%WITH locked AS MATERIALIZED%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the runner's batch waits for the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sqlx::query(
        "UPDATE projected_versions SET version = $1
          WHERE projection = 'members' AND organization_id = $2",
    )
    .bind(version as i64)
    .bind(org.to_string())
    .execute(&mut *holder)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE projection_checkpoints SET updated_at_us = updated_at_us WHERE name = 'members'",
    )
    .execute(&mut *holder)
    .await
    .unwrap();
    holder.commit().await.unwrap();

    assert!(service
        .projector
        .wait_for(&org.to_string(), version as i64, Duration::from_secs(10))
        .await
        .unwrap());
    let mia = members::get(service.db(), &org.to_string(), "mia")
        .await
        .unwrap()
        .unwrap();
    assert_ne!(before, changed_to);
    assert_eq!(
        mia.role, before,
        "members skipped the event its re-read versions show as applied"
    );
    let changes = audit_of(service.db(), &org.to_string(), "member.role_changed").await;
    assert_eq!(changes.len(), imported, "the audit log applied the event");
}

/// One active runner per projection across processes; another takes over when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_takes_over_projections_when_the_first_stops() {
    let mut first = spawn_service(Backend::Postgres).await;
    first.start_projections();
    let org = create(&first, "Acme", "acme", "olivia").await;
    let second = first.reopen().await;
    let second = std::sync::Arc::new(second);
    let (stop_second, stopped) = tokio::sync::watch::channel(false);
    second.projector.spawn(stopped);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        second.projector.leading().len(),
        0,
        "the first process leads every projection"
    );
    assert_eq!(first.projector.leading().len(), PROJECTION_NAMES.len());

    first.stop_projections().await;
    first.db().close().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while second.projector.leading().len() < PROJECTION_NAMES.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "the second process took over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outcome = second
        .run(
            org,
            cmd(user("olivia"), set_role("olivia", Role::Owner)),
            &RequestContext::default(),
            None,
        )
        .await
        .unwrap();
    assert!(outcome.consistent);
    join_via(&second, org, "mia").await;
    drop(stop_second);
}

/// An append notifies nobody inside its own transaction (PostgreSQL would then commit every
/// append alone, one at a time); the process that appended notifies after its commit when the
/// active runner is another process's, which is then woken without waiting for its poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_without_the_active_runner_notifies_it_after_each_commit() {
    let mut first = spawn_service(Backend::Postgres).await;
    first.start_projections();
    // Once it leads, the first process wakes its own runner and notifies nobody.
    while first.projector.leading().len() < PROJECTION_NAMES.len() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let org = create(&first, "Acme", "acme", "olivia").await;
    let Database::Postgres(pool) = first.db().clone() else {
        unreachable!("a PostgreSQL service")
    };
    let notifying_triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'events'::regclass AND NOT tgisinternal
           AND tgfoid IN (SELECT oid FROM pg_proc WHERE prosrc ILIKE '%notify%')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        notifying_triggers, 0,
        "no trigger notifies inside an append"
    );
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen("orgledger_events").await.unwrap();

    // The second process runs no projections: the first leads them all.
    let second = first.reopen().await;
    join_via(&second, org, "mia").await;
    let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification after the commit")
        .unwrap();
    assert_eq!(notification.channel(), "orgledger_events");
    let invited = invitations::list(
        first.db(),
        &org.to_string(),
        &InvitationFilter {
            limit: 50,
            ..InvitationFilter::default()
        },
        chrono::Utc::now(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        invited.items.len(),
        1,
        "the first process's runner applied the second's invitation"
    );
}

async fn join_via(service: &orgledger::service::Orgledger, org: Uuid, user_id: &str) {
    let token = orgledger::tokens::issue("inv");
    let address = format!("{user_id}@example.com");
    let send = SendInvitation {
        invitation_id: Uuid::now_v7(),
        email: Some(Email::parse("email", &address).unwrap()),
        role: Role::Member,
        first_name: None,
        last_name: None,
        title: None,
        group_id: None,
        expires_in_days: None,
        max_uses: MaxUses::ONE,
        token_sha256: token.sha256.clone(),
    };
    let outcome = service
        .run(
            org,
            cmd(user("olivia"), OrganizationCommand::SendInvitation(send)),
            &RequestContext::default(),
            None,
        )
        .await
        .unwrap();
    assert!(
        outcome.consistent,
        "projected by the process that took over"
    );
    let found = members::get(service.database(), &org.to_string(), "olivia")
        .await
        .unwrap();
    assert!(found.is_some());
}

/// Only the runner's own connections commit asynchronously: the ledger's, which write the
/// events, keys and idempotency records, stay durable at commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_runners_connections_commit_asynchronously() {
    let service = spawn_service(Backend::Postgres).await;
    let setting = |db: Database| async move {
        let Database::Postgres(pool) = db else {
            unreachable!("a PostgreSQL service")
        };
        sqlx::query_scalar::<_, String>("SHOW synchronous_commit")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(setting(service.db().clone()).await, "on");
    assert_eq!(
        setting(service.service.projector.database().clone()).await,
        "off"
    );
}

/// Four processes opening a new database at once (`migrate` beside `serve`, or replicas)
/// each create the read models' tables: on PostgreSQL two creates of one table at once fail
/// on the catalog's unique index, `IF NOT EXISTS` or not.
async fn processes_starting_together_on_a_new_database_all_prepare_the_read_models(
    backend: Backend,
) {
    let database = fresh_database(backend).await;
    let db = Database::connect(&database.url).await.expect("connect");
    db.migrate().await.expect("migrate");
    let master_key = orgledger::store::MasterKey::generate();

    let opened = futures::future::join_all(
        (0..4).map(|_| orgledger::service::Orgledger::open(db.clone(), master_key.clone())),
    )
    .await;

    for open in &opened {
        assert!(open.is_ok(), "{:?}", open.as_ref().err());
    }
    let service = opened.into_iter().next().unwrap().unwrap();
    let statuses = service.projector.status().await.unwrap();
    assert_eq!(statuses.len(), PROJECTION_NAMES.len());
}
