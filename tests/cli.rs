//! The `orgledger` binary's commands, run as an operator runs them.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn orgledger(args: &[&str], database_url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orgledger"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env(
            "ORGLEDGER_MASTER_KEY",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

/// As an operator runs it with SQLite's defaults: the master key kept beside the data.
fn orgledger_with_key_beside_data(args: &[&str], database_url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orgledger"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("ORGLEDGER_MASTER_KEY")
        .env("RUST_LOG", "warn")
        .output()
        .expect("the binary runs")
}

#[test]
fn projections_status_on_a_mistyped_sqlite_path_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("orgledgr.db");
    let url = format!("sqlite://{}", missing.display());

    for status in [
        orgledger(&["projections", "status"], &url),
        orgledger_with_key_beside_data(&["projections", "rebuild"], &url),
    ] {
        assert!(!status.status.success());
        let stderr = String::from_utf8_lossy(&status.stderr);
        assert!(
            stderr.contains("does not exist") && stderr.contains("orgledgr.db"),
            "{stderr}"
        );
    }
    assert!(!missing.exists(), "an empty store was created");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn projections_status_opens_a_store_that_migrate_created() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());

    let migrated = orgledger(&["migrate"], &url);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let status = orgledger(&["projections", "status"], &url);

    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains("audit_log"));
}

/// `projections rebuild` on a store whose audit log is in an older schema replays it once:
/// the start-up rebuild that `serve` would run first is left to the rebuild asked for.
#[tokio::test]
async fn projections_rebuild_replays_an_older_schema_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
    let migrated = orgledger(&["migrate"], &url);
    assert!(migrated.status.success());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let schema = "SELECT schema_version FROM projection_checkpoints WHERE name = 'audit_log'";
    let current: i64 = sqlx::query_scalar(schema).fetch_one(&pool).await.unwrap();
    sqlx::query("UPDATE projection_checkpoints SET schema_version = 2 WHERE name = 'audit_log'")
        .execute(&pool)
        .await
        .unwrap();

    let rebuilt = orgledger(&["projections", "rebuild", "audit_log"], &url);

    let stderr = String::from_utf8_lossy(&rebuilt.stderr);
    assert!(rebuilt.status.success(), "{stderr}");
    assert!(
        !stderr.contains("rebuilding into new tables before serving"),
        "rebuilt on the way in as well: {stderr}"
    );
    assert!(String::from_utf8_lossy(&rebuilt.stdout).contains("rebuilt audit_log"));
    let after: i64 = sqlx::query_scalar(schema).fetch_one(&pool).await.unwrap();
    assert_eq!(after, current);
}

#[test]
fn an_unreachable_postgres_is_reported_at_once_with_its_cause() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/orgledger");
    let started = Instant::now();

    let migrated = orgledger(&["migrate"], &url);

    assert!(!migrated.status.success());
    let stderr = String::from_utf8_lossy(&migrated.stderr);
    assert!(stderr.to_lowercase().contains("refused"), "{stderr}");
    // The pool alone would have retried for its 10 s acquire timeout and then said only
    // that it timed out.
    assert!(started.elapsed() < Duration::from_secs(5), "{stderr}");
}

#[test]
fn a_postgres_that_never_answers_is_reported_once_its_connect_timeout_passes() {
    // Accepts the connection and then says nothing, as a hung server does.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let accepted: Vec<_> = silent.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(15));
        drop(accepted);
    });
    let url = format!("postgres://postgres@127.0.0.1:{port}/orgledger");
    let started = Instant::now();

    let migrated = orgledger(&["migrate"], &url);

    assert!(!migrated.status.success());
    let stderr = String::from_utf8_lossy(&migrated.stderr);
    assert!(stderr.contains("did not answer within 10s"), "{stderr}");
    // Once, not again by the pool for as long.
    assert!(started.elapsed() < Duration::from_secs(14), "{stderr}");
    drop(held);
}
