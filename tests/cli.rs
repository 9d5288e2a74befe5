//! The `orgledger` binary's commands, run as an operator runs them.

mod support;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The master key [`orgledger`] passes: 32 zero bytes.
const ZERO_KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// The binary with `args` on `database_url` under [`ZERO_KEY`], logging warnings only.
fn orgledger_command(args: &[&str], database_url: &str) -> Command {
    let mut command = key_beside_data_command(args, database_url);
    command.env("ORGLEDGER_MASTER_KEY", ZERO_KEY);
    command
}

/// The same with SQLite's defaults: the master key kept beside the data.
fn key_beside_data_command(args: &[&str], database_url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_orgledger"));
    command
        .args(args)
        .env("DATABASE_URL", database_url)
        .env_remove("ORGLEDGER_MASTER_KEY")
        .env("RUST_LOG", "warn");
    command
}

fn orgledger(args: &[&str], database_url: &str) -> Output {
    orgledger_command(args, database_url)
        .output()
        .expect("the binary runs")
}

/// As an operator runs it with SQLite's defaults: the master key kept beside the data.
fn orgledger_with_key_beside_data(args: &[&str], database_url: &str) -> Output {
    key_beside_data_command(args, database_url)
        .output()
        .expect("the binary runs")
}

/// A SQLite store in `dir`, migrated by the binary, and a ledger on it under the master key
/// [`orgledger`] passes (32 zero bytes): its URL, database and ledger.
async fn sqlite_store_under_the_zero_key(
    dir: &tempfile::TempDir,
) -> (
    String,
    orgledger::store::Database,
    orgledger::ledger::Ledger,
) {
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
    assert!(orgledger(&["migrate"], &url).status.success());
    let key = orgledger::store::MasterKey::from_base64(ZERO_KEY).unwrap();
    let database = orgledger::store::Database::connect(&url).await.unwrap();
    let ledger = orgledger::ledger::Ledger::new(database.clone(), key);
    (url, database, ledger)
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

/// `serve` on an address it cannot listen on fails before it touches the store: no file,
/// no master key and no platform token are made (a token printed by a start that then
/// failed would be lost, since the next start prints none).
#[test]
fn serve_on_an_address_taken_fails_and_creates_nothing() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
    for bind in [address.as_str(), "not-an-address"] {
        let served = key_beside_data_command(&["serve", "--bind", bind], &url)
            // Set for other programs, it prints no backtrace here.
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        assert_eq!(served.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&served.stderr);
        // One line, its cause after a colon.
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with(&format!("Error: cannot listen on {bind}: ")),
            "{stderr}"
        );
        let stdout = String::from_utf8_lossy(&served.stdout);
        assert!(
            !format!("{stdout}{stderr}").contains("Generated a platform token"),
            "{stdout}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

/// Only `serve` and `migrate` set a store up: `projections` refuses one never migrated, and
/// a command refused for want of the master key leaves the store as it was.
#[tokio::test]
async fn commands_that_are_refused_leave_a_new_store_as_it_was() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orgledger.db");
    std::fs::File::create(&file).unwrap();
    let url = format!("sqlite://{}", file.display());
    for args in [&["projections", "status"][..], &["projections", "rebuild"]] {
        let refused = orgledger(args, &url);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("run `orgledger migrate` first"), "{stderr}");
    }
    let mut sqlite = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlite_master")
        .fetch_one(&mut sqlite)
        .await
        .unwrap();
    assert_eq!(tables, 0, "nothing migrated");

    let database = support::fresh_database(support::Backend::Postgres).await;
    for args in [&["migrate"][..], &["projections", "status"]] {
        let refused = orgledger_with_key_beside_data(args, &database.url);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("ORGLEDGER_MASTER_KEY is required"),
            "{stderr}"
        );
    }
    let mut connection = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&mut connection)
    .await
    .unwrap();
    assert_eq!(tables, 0, "nothing migrated");

    // A store in memory is refused before sqlx opens one, so no file appears where it runs.
    let here = tempfile::tempdir().unwrap();
    for args in [&["migrate"][..], &["verify"], &["projections", "status"]] {
        let refused = Command::new(env!("CARGO_BIN_EXE_orgledger"))
            .args(args)
            .current_dir(here.path())
            .env("DATABASE_URL", "sqlite::memory:")
            .env_remove("ORGLEDGER_MASTER_KEY")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains("names no file"), "{args:?}: {stderr}");
    }
    let left: Vec<_> = std::fs::read_dir(here.path()).unwrap().collect();
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
    // Its read models hold addresses in clear: the file is its owner's alone, whatever the
    // umask.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("orgledger.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    let status = orgledger(&["projections", "status"], &url);

    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains("audit_log"));
}

#[test]
fn a_reader_that_leaves_early_costs_a_command_neither_a_panic_nor_its_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
    assert!(orgledger(&["migrate"], &url).status.success());
    for args in [&["projections", "status"][..], &["verify", "--json"]] {
        let output = with_its_reader_gone(orgledger_command(args, &url));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// A failing command whose standard error is gone (its terminal closed) still exits 1 with
/// its own status, not 101 from a panic while printing its error.
#[test]
fn a_command_whose_standard_error_is_gone_still_ends_with_its_own_status() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("missing.db").display());
    let mut child = orgledger_command(&["projections", "status"], &url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    assert_eq!(child.wait().unwrap().code(), Some(1));
}

/// Runs `command` as `| head -0` would: its standard output's reader gone before it writes.
fn with_its_reader_gone(mut command: Command) -> Output {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

/// An export to standard output whose reader left early is incomplete, and says so: a
/// failing exit status, no line claiming it was exported.
#[tokio::test]
async fn an_export_whose_reader_left_early_says_it_is_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    let (url, org) = an_organization_to_export(&dir).await;
    let output = with_its_reader_gone(orgledger_command(
        &["export", "--organization", &org, "-o", "-"],
        &url,
    ));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the export is incomplete"), "{stderr}");
    assert!(!stderr.contains("exported organization"), "{stderr}");
}

/// A SQLite store in `dir` holding Acme (Olivia and Mia), its read models built by the
/// binary: its URL and Acme's id.
async fn an_organization_to_export(dir: &tempfile::TempDir) -> (String, String) {
    let (url, database, ledger) = sqlite_store_under_the_zero_key(dir).await;
    let org = support::acme_with_mia(&ledger).await.to_string();
    database.close().await;
    assert!(orgledger(&["projections", "rebuild"], &url)
        .status
        .success());
    (url, org)
}

/// `orgledger export` of `org` to `output`.
fn export(org: &str, output: &std::path::Path, url: &str) -> Output {
    let output = output.to_str().unwrap();
    orgledger(&["export", "--organization", org, "-o", output], url)
}

/// The export is renamed over its output once complete: a FIFO, a symbolic link or a
/// directory there is refused and left as it was.
#[tokio::test]
async fn an_export_is_written_only_over_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let (url, org) = an_organization_to_export(&dir).await;
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let target = dir.path().join("target.json");
    std::fs::write(&target, "kept").unwrap();
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for (output, kind) in [
        (&fifo, "not a regular file"),
        (&link, "a symbolic link"),
        (&dir.path().to_path_buf(), "a directory"),
    ] {
        let refused = export(&org, output, &url);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(refused.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(kind), "{output:?}: {stderr}");
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "kept");
}

/// An export killed outright leaves its file, personal data in clear, beside the target: the
/// next export into that directory removes it once untouched for a minute, and leaves one
/// still being written (locked) or just made.
#[tokio::test]
async fn an_export_removes_the_file_a_killed_export_left() {
    let dir = tempfile::tempdir().unwrap();
    let (url, org) = an_organization_to_export(&dir).await;
    let two_minutes_ago = std::time::SystemTime::now() - Duration::from_secs(120);
    let left_at = |name: &str, touched: std::time::SystemTime| {
        let path = dir.path().join(name);
        std::fs::write(&path, "mia@example.com").unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(touched).unwrap();
        (path, file)
    };
    let (dead, _) = left_at(".orgledger-export-dead01", two_minutes_ago);
    let (live, held) = left_at(".orgledger-export-live01", two_minutes_ago);
    held.lock().unwrap();
    // Just made, not yet locked by the export making it.
    let (new, _) = left_at(".orgledger-export-new001", std::time::SystemTime::now());
    let output = dir.path().join("acme.json");
    let exported = export(&org, &output, &url);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    assert!(!dead.exists(), "the killed export's file is removed");
    assert!(live.exists(), "a file still being written stays");
    assert!(new.exists(), "a file just made stays");
    assert!(output.exists());
    drop(held);
}

/// `projections status` only reads: it answers on a PostgreSQL session that may not write.
#[tokio::test]
async fn projections_status_reads_a_store_it_may_not_write() {
    let database = support::fresh_database(support::Backend::Postgres).await;
    assert!(orgledger(&["migrate"], &database.url).status.success());
    let separator = if database.url.contains('?') { '&' } else { '?' };
    let read_only = format!(
        "{}{separator}options=-c%20default_transaction_read_only%3Don",
        database.url
    );
    let status = orgledger(&["projections", "status"], &read_only);
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

/// A rebuild stopped by a signal before its copies are swapped in drops them at once (they
/// hold personal data in clear), leaves the live read models as they were, and says so with
/// a failing exit status.
#[tokio::test]
async fn a_rebuild_stopped_by_a_signal_drops_its_copies_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (url, database, ledger) = sqlite_store_under_the_zero_key(&dir).await;
    let org = support::acme_with_mia(&ledger).await;
    ledger
        .import(org, support::role_flips(40_000, "mia"), Default::default())
        .await
        .unwrap();
    database.close().await;
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let copies = "SELECT (SELECT count(*) FROM projection_checkpoints WHERE name LIKE '%!_!_rb%' ESCAPE '!')
                       + (SELECT count(*) FROM sqlite_master WHERE name LIKE '%!_!_rb%' ESCAPE '!')";
    let live_rows = "SELECT count(*) FROM rm_members";
    let members_before: i64 = sqlx::query_scalar(live_rows)
        .fetch_one(&pool)
        .await
        .unwrap();

    let mut rebuild = orgledger_command(&["projections", "rebuild"], &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let made: i64 = sqlx::query_scalar(copies).fetch_one(&pool).await.unwrap();
        if made > 0 {
            break;
        }
        assert!(
            rebuild.try_wait().unwrap().is_none(),
            "it ended before its copies were seen"
        );
        assert!(Instant::now() < deadline, "no copy made within a minute");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent = Command::new("kill")
        .args(["-TERM", &rebuild.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let stopped = rebuild.wait_with_output().unwrap();

    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert_eq!(stopped.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stopped before its copies were swapped in"),
        "{stderr}"
    );
    let left: i64 = sqlx::query_scalar(copies).fetch_one(&pool).await.unwrap();
    assert_eq!(left, 0, "copies left behind");
    let members_after: i64 = sqlx::query_scalar(live_rows)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(members_after, members_before);
}

/// A second signal to a rebuild that is dropping its copies ends the process there, exit 1,
/// saying the copies may be left (the sweep drops them once untouched for 2 minutes). Here
/// the drop waits on a lock the test holds on a copy (PostgreSQL).
#[tokio::test]
async fn a_second_signal_ends_a_stopping_rebuild_at_once() {
    use sqlx::{Connection, Executor};
    let database = support::fresh_database(support::Backend::Postgres).await;
    let url = database.url.clone();
    assert!(orgledger(&["migrate"], &url).status.success());
    let key = orgledger::store::MasterKey::from_base64(ZERO_KEY).unwrap();
    let store = orgledger::store::Database::connect(&url).await.unwrap();
    support::acme_with_mia(&orgledger::ledger::Ledger::new(store.clone(), key)).await;
    store.close().await;
    // The log held against the rebuild's `ANALYZE` only: it makes its copies, then waits.
    let mut log_held = sqlx::PgConnection::connect(&url).await.unwrap();
    log_held
        .execute("BEGIN; LOCK TABLE events IN SHARE UPDATE EXCLUSIVE MODE")
        .await
        .unwrap();
    let rebuild = orgledger_command(&["projections", "rebuild", "audit_log"], &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut watcher = sqlx::PgConnection::connect(&url).await.unwrap();
    let (copy, mut copy_held) =
        support::hold_the_audit_copy_at_its_index_build(&url, &mut watcher, &mut log_held).await;
    let index_builds = support::INDEX_BUILDS_ON;
    let signal = || {
        let sent = Command::new("kill")
            .args(["-TERM", &rebuild.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    signal();
    // The first stop has run once its index builds are cancelled; its drop now waits on the
    // test's lock (5 s at most), and the second signal ends it.
    support::poll_until(
        &mut watcher,
        "index builds not cancelled",
        index_builds,
        &copy,
        |n: &i64| *n == 0,
    )
    .await;
    let drops = "SELECT count(*) FROM pg_stat_activity
          WHERE query LIKE 'DROP TABLE%' AND strpos(query, $1) > 0 AND wait_event_type = 'Lock'";
    support::poll_until(&mut watcher, "no drop waiting", drops, &copy, |n: &i64| {
        *n > 0
    })
    .await;
    let signalled = Instant::now();
    signal();
    let ended = tokio::task::spawn_blocking(move || rebuild.wait_with_output().unwrap())
        .await
        .unwrap();
    let took = signalled.elapsed();
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert_eq!(ended.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("stopped twice"), "{stderr}");
    assert!(
        took < Duration::from_secs(3),
        "ended {took:?} after the second signal"
    );
    copy_held.execute("ROLLBACK").await.unwrap();
}

/// A rebuild draws its progress, stage by stage, on a terminal (here a pseudo-terminal made
/// by util-linux's `script`), and nothing of it into a pipe or a log file.
#[test]
fn a_rebuild_shows_its_progress_on_a_terminal_and_only_there() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
    assert!(orgledger(&["migrate"], &url).status.success());
    let binary = env!("CARGO_BIN_EXE_orgledger");
    let on_terminal = Command::new("script")
        .args(["--quiet", "--return", "--command"])
        .arg(format!("'{binary}' projections rebuild"))
        .arg("/dev/null")
        .env("DATABASE_URL", &url)
        .env(
            "ORGLEDGER_MASTER_KEY",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
        .env("RUST_LOG", "warn")
        .output()
        .expect("util-linux's script runs");
    let drawn = String::from_utf8_lossy(&on_terminal.stdout);
    assert!(on_terminal.status.success(), "{drawn}");
    assert!(drawn.contains("replaying ["), "{drawn}");
    assert!(drawn.contains("rebuilt all 6 projections"), "{drawn}");
    let piped = orgledger(&["projections", "rebuild"], &url);
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(piped.status.success(), "{stderr}");
    assert!(!stderr.contains("replaying"), "{stderr}");
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

/// `orgledger serve` with its flags, its output collected: stdout whole, stderr (JSON log
/// lines) as they come; the listening address once it is logged.
struct Served {
    child: std::process::Child,
    address: String,
    stdout: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

fn serve_logging_everything(database_url: &str, flags: &[&str]) -> Served {
    serve_from(&std::env::current_dir().unwrap(), database_url, flags, None)
}

/// `serve` started in `directory`, with `master_key` (none: the one kept beside the data),
/// once it is ready.
fn serve_from(
    directory: &std::path::Path,
    database_url: &str,
    flags: &[&str],
    master_key: Option<&str>,
) -> Served {
    let (served, ready) = serve_starting(directory, database_url, flags, master_key);
    ready
        .recv_timeout(Duration::from_secs(60))
        .expect("the server gets ready");
    served
}

/// `serve` started, as soon as it listens: with what says when it is ready.
fn serve_starting(
    directory: &std::path::Path,
    database_url: &str,
    flags: &[&str],
    master_key: Option<&str>,
) -> (Served, std::sync::mpsc::Receiver<()>) {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let mut command = Command::new(env!("CARGO_BIN_EXE_orgledger"));
    command
        .current_dir(directory)
        .args(["serve", "--orgledger-bind", "127.0.0.1:0"])
        .args(flags)
        .env("DATABASE_URL", database_url)
        .env_remove("ORGLEDGER_MASTER_KEY")
        .env_remove("ORGLEDGER_API_TOKEN")
        .env_remove("ORGLEDGER_BIND")
        .env("RUST_LOG", "trace");
    if let Some(key) = master_key {
        command.env("ORGLEDGER_MASTER_KEY", key);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut out = child.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut all = String::new();
        drop(out.read_to_string(&mut all));
        all
    });
    let err = child.stderr.take().unwrap();
    let (found, address) = std::sync::mpsc::channel();
    let (got_ready, ready) = std::sync::mpsc::channel();
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) {
                if entry["message"] == "orgledger starting" {
                    let _ = found.send(entry["address"].as_str().unwrap_or_default().to_owned());
                }
                if entry["message"] == "orgledger ready" {
                    let _ = got_ready.send(());
                }
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let address = address
        .recv_timeout(Duration::from_secs(60))
        .expect("the server listens");
    let served = Served {
        child,
        address: format!("http://{address}"),
        stdout,
        stderr,
    };
    (served, ready)
}

impl Served {
    /// Stops the server; everything it wrote.
    fn stop(mut self) -> (String, String) {
        // Its last requests' log lines are written before their responses.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        (self.stdout.join().unwrap(), self.stderr.join().unwrap())
    }

    /// Sends SIGTERM and waits up to `within` for the process to end: its exit status and
    /// its log.
    fn terminate(mut self, within: Duration) -> (std::process::ExitStatus, String) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let started = Instant::now();
        let exit = loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                break exit;
            }
            if started.elapsed() > within {
                self.child.kill().unwrap();
                panic!("still running {within:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (exit, self.stderr.join().unwrap())
    }
}

/// While its store is being opened (here: held by another writer), `serve` already listens:
/// the process is up, not ready, and a request is told to retry rather than refused a
/// connection. Once the store is free it answers as usual.
#[tokio::test]
async fn serve_answers_while_its_store_is_being_opened() {
    for backend in [support::Backend::Sqlite, support::Backend::Postgres] {
        let (database, held, directory) = a_migrated_store_held_at_startup(backend).await;
        let (server, ready) = serve_starting(directory.path(), &database.url, &[], Some(ZERO_KEY));
        let client = reqwest::Client::new();
        let get = |path: &str| client.get(format!("{}{path}", server.address)).send();

        let up = get("/healthz").await.unwrap();
        assert_eq!(up.status(), reqwest::StatusCode::OK, "{backend:?}");
        let not_ready = get("/readyz").await.unwrap();
        assert_eq!(not_ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
        let problem: serde_json::Value = not_ready.json().await.unwrap();
        assert_eq!(problem["code"], "not_ready", "{problem}");
        let command = client
            .post(format!("{}/v1/organizations", server.address))
            .json(&serde_json::json!({"name": "Acme"}))
            .send()
            .await
            .unwrap();
        assert_eq!(command.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(command.headers()["retry-after"], "1");
        assert_eq!(
            command.headers()["content-type"],
            "application/problem+json"
        );
        let problem: serde_json::Value = command.json().await.unwrap();
        assert_eq!(problem["code"], "starting", "{problem}");
        // Through the same layers as once ready: request ids, methods.
        let identified = client
            .get(format!("{}/v1/organizations", server.address))
            .header("X-Request-Id", "probe-1")
            .send()
            .await
            .unwrap();
        assert_eq!(identified.headers()["x-request-id"], "probe-1");
        let posted = client
            .post(format!("{}/healthz", server.address))
            .send()
            .await
            .unwrap();
        assert_eq!(posted.status(), reqwest::StatusCode::METHOD_NOT_ALLOWED);
        assert!(
            ready.try_recv().is_err(),
            "{backend:?}: ready while the store was held"
        );

        held.release().await;
        ready
            .recv_timeout(Duration::from_secs(30))
            .expect("ready once the store is free");
        let ready_now = get("/readyz").await.unwrap();
        assert_eq!(ready_now.status(), reqwest::StatusCode::OK, "{backend:?}");
        // The API itself answers now: no token is a 401, not a 503.
        let unauthenticated = get("/v1/organizations").await.unwrap();
        assert_eq!(unauthenticated.status(), reqwest::StatusCode::UNAUTHORIZED);
        server.stop();
    }
}

/// A stop (SIGTERM) while the store is still being opened ends `serve` there, cleanly, however
/// long the store would have kept it waiting; the next start opens the store as usual.
#[tokio::test]
async fn serve_stopped_while_its_store_is_being_opened_stops_at_once() {
    for backend in [support::Backend::Sqlite, support::Backend::Postgres] {
        let (database, held, directory) = a_migrated_store_held_at_startup(backend).await;
        let (server, ready) = serve_starting(directory.path(), &database.url, &[], Some(ZERO_KEY));
        let starting = reqwest::get(format!("{}/v1/organizations", server.address))
            .await
            .unwrap();
        assert_eq!(starting.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
        let (exit, log) = server.terminate(Duration::from_secs(5));
        assert!(exit.success(), "{backend:?}: {exit:?}\n{log}");
        assert!(log.contains("stopped before the store was open"), "{log}");
        assert!(ready.try_recv().is_err(), "{backend:?}: got ready");
        held.release().await;
        let again = serve_from(directory.path(), &database.url, &[], Some(ZERO_KEY));
        let ready_now = reqwest::get(format!("{}/readyz", again.address))
            .await
            .unwrap();
        assert_eq!(ready_now.status(), reqwest::StatusCode::OK, "{backend:?}");
        again.stop();
    }
}

/// A migrated store on `backend`, held as `serve` would open it, and a working directory.
async fn a_migrated_store_held_at_startup(
    backend: support::Backend,
) -> (support::TestDatabase, HeldStore, tempfile::TempDir) {
    let database = support::fresh_database(backend).await;
    assert!(orgledger(&["migrate"], &database.url).status.success());
    let held = hold_the_store_at_startup(&database).await;
    (database, held, tempfile::tempdir().unwrap())
}

/// A connection holding what `serve` must take at start-up: SQLite's write lock, or
/// PostgreSQL's migrations table, which it reads first.
enum HeldStore {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

async fn hold_the_store_at_startup(database: &support::TestDatabase) -> HeldStore {
    use sqlx::{Connection, Executor};
    match database.backend {
        support::Backend::Sqlite => {
            let mut connection = sqlx::SqliteConnection::connect(&database.url)
                .await
                .unwrap();
            connection.execute("BEGIN IMMEDIATE").await.unwrap();
            HeldStore::Sqlite(connection)
        }
        support::Backend::Postgres => {
            let mut connection = sqlx::PgConnection::connect(&database.url).await.unwrap();
            connection
                .execute("BEGIN; LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
                .await
                .unwrap();
            HeldStore::Postgres(connection)
        }
    }
}

impl HeldStore {
    async fn release(self) {
        use sqlx::{Connection, Executor};
        match self {
            Self::Sqlite(mut connection) => {
                connection.execute("ROLLBACK").await.unwrap();
                connection.close().await.unwrap();
            }
            Self::Postgres(mut connection) => {
                connection.execute("ROLLBACK").await.unwrap();
                connection.close().await.unwrap();
            }
        }
    }
}

/// A `RUST_LOG` that is not a filter is said, not silently replaced by the default.
#[test]
fn a_rust_log_that_is_not_a_filter_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
    let migrated = key_beside_data_command(&["migrate"], &url)
        .env("RUST_LOG", "bogus=[[[")
        .output()
        .unwrap();
    assert!(migrated.status.success());
    let stderr = String::from_utf8_lossy(&migrated.stderr);
    assert!(
        stderr.contains("RUST_LOG is not a log filter") && stderr.contains("bogus=[[["),
        "{stderr}"
    );
}

/// A master key configured for a SQLite store that keeps another beside it is said at start:
/// what one seals the other does not open.
#[test]
fn a_configured_master_key_other_than_the_kept_one_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
    assert!(orgledger_with_key_beside_data(&["migrate"], &url)
        .status
        .success());
    assert!(dir.path().join("orgledger.db.master-key").exists());
    let other = orgledger(&["projections", "status"], &url);
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        stderr.contains("ORGLEDGER_MASTER_KEY is not the master key kept beside the data"),
        "{stderr}"
    );
}

/// On SQLite too, a platform token an earlier version kept in its working directory is
/// adopted by a store that keeps none yet (kept beside the data from then on, nothing
/// printed), once: its file is renamed, so that deleting the kept one (to replace a leaked
/// token) generates a new one. A store that keeps its own ignores such a file.
#[tokio::test]
async fn a_sqlite_store_adopts_the_token_an_earlier_version_kept_in_the_working_directory() {
    const KEY: &str = ZERO_KEY;
    const LEGACY: &str = "olg_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let status = |server: &Served, token: &str| {
        let request = reqwest::Client::new()
            .get(format!("{}/v1/organizations", server.address))
            .bearer_auth(token)
            .send();
        async move { request.await.unwrap().status() }
    };
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("orgledger.api-token");
    std::fs::write(&legacy, format!("{LEGACY}\n")).unwrap();
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
    let adopting = serve_from(dir.path(), &url, &[], Some(KEY));
    assert_eq!(status(&adopting, LEGACY).await, reqwest::StatusCode::OK);
    let (printed, log) = adopting.stop();
    assert!(!printed.contains("Generated a platform token"), "{printed}");
    assert!(log.contains("adopted the platform token"), "{log}");
    let kept = dir.path().join("orgledger.db.api-token");
    assert_eq!(std::fs::read_to_string(&kept).unwrap().trim(), LEGACY);
    assert!(!legacy.exists(), "adopted once");
    assert!(dir.path().join("orgledger.api-token.adopted").exists());

    // The leaked token replaced: a new one, printed; the old one refused.
    std::fs::remove_file(&kept).unwrap();
    std::fs::write(&legacy, format!("{LEGACY}\n")).unwrap();
    std::fs::write(&kept, "olg_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb").unwrap();
    let own = serve_from(dir.path(), &url, &[], Some(KEY));
    assert_eq!(
        status(&own, "olg_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb").await,
        reqwest::StatusCode::OK
    );
    assert_eq!(
        status(&own, LEGACY).await,
        reqwest::StatusCode::UNAUTHORIZED
    );
    let (_, log) = own.stop();
    assert!(log.contains("this store keeps its own"), "{log}");
}

/// On PostgreSQL the platform token `serve` generates is kept beside the data, in the
/// database: processes started from any directory accept the one token, printed once, by
/// the first; none is written into a working directory. A token an earlier version kept in
/// its working directory is adopted, not replaced.
#[tokio::test]
async fn processes_on_one_postgres_database_share_the_token_generated_for_it() {
    const KEY: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let accepts = |server: &Served, token: &str| {
        let request = reqwest::Client::new()
            .get(format!("{}/v1/organizations", server.address))
            .bearer_auth(token)
            .send();
        async move { request.await.unwrap().status() == reqwest::StatusCode::OK }
    };
    let generated_once = support::fresh_database(support::Backend::Postgres).await;
    let (here, there) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = serve_from(here.path(), &generated_once.url, &[], Some(KEY));
    let (printed, _) = first.stop();
    let token = printed
        .lines()
        .find(|line| line.starts_with("olg_"))
        .unwrap_or_else(|| panic!("the first start prints its token: {printed}"))
        .to_owned();
    for directory in [here.path(), there.path()] {
        let server = serve_from(directory, &generated_once.url, &[], Some(KEY));
        assert!(accepts(&server, &token).await);
        assert!(!accepts(&server, "olg_another").await);
        let (printed, _) = server.stop();
        assert!(!printed.contains("olg_"), "printed again: {printed}");
        assert!(!directory.join("orgledger.api-token").exists());
    }

    // A process that finds a token an earlier version kept in its directory, other than the
    // one the database keeps, goes on accepting it beside the kept one; no other process does.
    std::fs::write(there.path().join("orgledger.api-token"), "olg_kept-there\n").unwrap();
    let upgraded = serve_from(there.path(), &generated_once.url, &[], Some(KEY));
    let elsewhere = serve_from(here.path(), &generated_once.url, &[], Some(KEY));
    assert!(accepts(&upgraded, &token).await && accepts(&upgraded, "olg_kept-there").await);
    assert!(accepts(&elsewhere, &token).await && !accepts(&elsewhere, "olg_kept-there").await);
    upgraded.stop();
    elsewhere.stop();

    let adopted = support::fresh_database(support::Backend::Postgres).await;
    std::fs::write(
        here.path().join("orgledger.api-token"),
        "olg_kept-by-an-earlier-version\n",
    )
    .unwrap();
    let earlier = serve_from(here.path(), &adopted.url, &[], Some(KEY));
    assert!(accepts(&earlier, "olg_kept-by-an-earlier-version").await);
    let (printed, _) = earlier.stop();
    assert!(!printed.contains("olg_"), "{printed}");
    let elsewhere = serve_from(there.path(), &adopted.url, &[], Some(KEY));
    assert!(accepts(&elsewhere, "olg_kept-by-an-earlier-version").await);
    elsewhere.stop();
}

/// A client that never finishes sending its request does not hold a stop up: once the
/// shutdown grace has passed, its connection is closed and the process exits cleanly.
#[test]
fn a_stop_closes_a_request_that_never_completes_once_its_grace_has_passed() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
    let server = serve_logging_everything(&url, &["--orgledger-shutdown-grace-ms", "300"]);
    let mut stuck =
        std::net::TcpStream::connect(server.address.trim_start_matches("http://")).unwrap();
    stuck
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: orgledger\r\n")
        .unwrap();
    // The head is read in part: the connection has a request in flight.
    std::thread::sleep(Duration::from_millis(300));

    let (exit, log) = server.terminate(Duration::from_secs(20));

    assert!(exit.success(), "{exit:?}");
    assert!(log.contains("after the shutdown grace"), "{log}");
    drop(stuck);
}

/// A SQLite store whose key file was lost refuses a new key, and no file holding that key,
/// which could never open the store, is left beside it.
#[tokio::test]
async fn a_lost_key_file_is_not_replaced_by_a_key_that_cannot_open_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
    let server = serve_logging_everything(&url, &[]);
    let platform = std::fs::read_to_string(dir.path().join("orgledger.db.api-token")).unwrap();
    let created = reqwest::Client::new()
        .post(format!("{}/v1/organizations", server.address))
        .bearer_auth(platform.trim())
        .header("X-Actor-Id", "olivia")
        .json(&serde_json::json!({"name": "Acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), reqwest::StatusCode::CREATED);
    server.stop();
    let key_file = dir.path().join("orgledger.db.master-key");
    std::fs::remove_file(&key_file).unwrap();

    let status = orgledger_with_key_beside_data(&["projections", "status"], &url);

    assert!(!status.status.success());
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(stderr.contains("master key"), "{stderr}");
    assert!(
        stderr.starts_with(&format!("Error: cannot open the store {url}: ")),
        "the store is named: {stderr}"
    );
    assert!(
        !key_file.exists(),
        "a key that does not open the store was kept"
    );
}

/// Every secret the API hands out, and the platform token `serve` generated, stay out of
/// the logs even at `trace`; the generated token is printed once, on the first start only.
#[tokio::test]
async fn serve_prints_its_generated_token_once_and_logs_no_secret_even_at_trace() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
    let server = serve_logging_everything(&url, &[]);
    let token_file = dir.path().join("orgledger.db.api-token");
    let platform = std::fs::read_to_string(&token_file)
        .expect("the generated token is kept beside the data")
        .trim()
        .to_owned();
    let client = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String, actor: &str, body: serde_json::Value| {
        client
            .request(method, format!("{}{path}", server.address))
            .bearer_auth(&platform)
            .header("X-Actor-Id", actor)
            .json(&body)
            .send()
    };
    let json = |response: reqwest::Response| async move {
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(status.is_success(), "{status}: {body}");
        body
    };
    let org = json(
        call(
            reqwest::Method::POST,
            "/v1/organizations".into(),
            "olivia",
            serde_json::json!({"name": "Acme"}),
        )
        .await
        .unwrap(),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let base = format!("/v1/organizations/{org}");
    let invited = json(
        call(
            reqwest::Method::POST,
            format!("{base}/invitations"),
            "olivia",
            serde_json::json!({"email": "nina@example.com", "role": "member"}),
        )
        .await
        .unwrap(),
    )
    .await;
    let invitation = invited["invitation"]["id"].as_str().unwrap();
    let resent = json(
        call(
            reqwest::Method::POST,
            format!("{base}/invitations/{invitation}/resend"),
            "olivia",
            serde_json::json!({}),
        )
        .await
        .unwrap(),
    )
    .await;
    json(
        call(
            reqwest::Method::POST,
            "/v1/invitations/accept".into(),
            "nina",
            serde_json::json!({"token": resent["token"], "user_id": "nina", "email": "nina@example.com"}),
        )
        .await
        .unwrap(),
    )
    .await;
    let service_account = json(
        call(
            reqwest::Method::POST,
            format!("{base}/service-accounts"),
            "olivia",
            serde_json::json!({"name": "CI", "scopes": ["members:read"]}),
        )
        .await
        .unwrap(),
    )
    .await;
    let key = service_account["key"].as_str().unwrap().to_owned();
    let members = client
        .get(format!("{}{base}/members", server.address))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(members.status(), reqwest::StatusCode::OK, "the key works");
    let provider_key = "sk-provider-secret-0123456789";
    json(
        call(
            reqwest::Method::POST,
            format!("{base}/ai-providers"),
            "olivia",
            serde_json::json!({"name": "Main", "kind": "openai", "api_key": provider_key}),
        )
        .await
        .unwrap(),
    )
    .await;
    let (stdout, logs) = server.stop();

    assert_eq!(
        stdout.matches(&platform).count(),
        1,
        "printed once: {stdout}"
    );
    assert!(
        logs.contains(&format!("/invitations/{invitation}/resend")),
        "the trace logged the requests"
    );
    let secrets = [
        ("the platform token", platform.as_str()),
        ("the invitation token", invited["token"].as_str().unwrap()),
        ("the resent token", resent["token"].as_str().unwrap()),
        ("the service account key", key.as_str()),
        ("the provider key", provider_key),
    ];
    for (what, secret) in secrets {
        assert!(secret.len() > 10, "{what}: {secret}");
        assert!(!logs.contains(secret), "{what} is in the logs");
    }

    let again = serve_logging_everything(&url, &[]);
    let kept = client
        .get(format!("{}{base}", again.address))
        .bearer_auth(&platform)
        .header("X-Actor-Id", "olivia")
        .send()
        .await
        .unwrap();
    assert_eq!(
        kept.status(),
        reqwest::StatusCode::OK,
        "the kept token works"
    );
    let (stdout, logs) = again.stop();
    assert!(!stdout.contains(&platform), "printed again: {stdout}");
    assert!(!logs.contains(&platform), "the kept token is in the logs");

    // The same history through the CLI: the data export holds none of those secrets, is
    // for its owner only, and `verify` passes the store.
    let exported = dir.path().join("acme.json");
    let export = orgledger_with_key_beside_data(
        &[
            "export",
            "--organization",
            &org,
            "--output",
            exported.to_str().unwrap(),
        ],
        &url,
    );
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let text = std::fs::read_to_string(&exported).unwrap();
    let document: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(document["organization"]["id"], org.as_str());
    let members: Vec<&str> = document["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|member| member["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(members.contains(&"nina"), "{members:?}");
    for (what, secret) in secrets {
        assert!(!text.contains(secret), "{what} is in the export");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&exported).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "personal data, for its owner only");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".orgledger-export-"))
        .collect();
    assert_eq!(
        leftovers,
        Vec::<String>::new(),
        "a half-written file is left"
    );
    let to_stdout =
        orgledger_with_key_beside_data(&["export", "--organization", &org, "-o", "-"], &url);
    assert!(to_stdout.status.success());
    let streamed: serde_json::Value = serde_json::from_slice(&to_stdout.stdout).unwrap();
    assert_eq!(streamed["members"], document["members"]);
    let verified = orgledger_with_key_beside_data(&["verify"], &url);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    let unknown = dir.path().join("unknown.json");
    let refused = orgledger_with_key_beside_data(
        &[
            "export",
            "--organization",
            "0190f5a0-0000-7000-8000-000000000009",
            "--output",
            unknown.to_str().unwrap(),
        ],
        &url,
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no organization"));
    assert!(!unknown.exists());
}

/// Writes an organization's first event as a row, past every rule and seal.
async fn insert_first_event(
    pool: &sqlx::SqlitePool,
    organization: &str,
    kind: &str,
    payload: &str,
) {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         VALUES ('organization', ?1, 1, ?2, '1', ?3, '{}')",
    )
    .bind(organization)
    .bind(kind)
    .bind(payload)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn verify_passes_an_empty_store_and_fails_naming_an_event_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
    assert!(orgledger(&["migrate"], &url).status.success());

    let clean = orgledger(&["verify"], &url);
    let stdout = String::from_utf8_lossy(&clean.stdout);
    assert!(
        clean.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    assert!(
        stdout.contains("verified 0 organizations, 0 events (0 with a matching MAC), 0 snapshots"),
        "{stdout}"
    );

    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let organization = "0190f5a0-0000-7000-8000-000000000001";
    insert_first_event(&pool, organization, "NoSuchEvent", "{}").await;

    let broken = orgledger(&["verify"], &url);
    let stdout = String::from_utf8_lossy(&broken.stdout);
    assert!(!broken.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("FAIL organization {organization}, event 1:")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "FAIL organization {organization}, event 1: it carries no MAC"
        )),
        "written past the store, it has none: {stdout}"
    );
    assert!(stdout.contains("; 2 problems"), "{stdout}");
    assert!(
        String::from_utf8_lossy(&broken.stderr).contains("verification found 2 problems"),
        "{}",
        String::from_utf8_lossy(&broken.stderr)
    );

    // Vouching for the rows a version before MACs stored does not reach a row written since.
    let marking = orgledger(&["migrate", "--authenticate-legacy-events"], &url);
    assert!(marking.status.success(), "{marking:?}");
    assert!(
        String::from_utf8_lossy(&marking.stdout).contains(
            "events given their MAC: 0; left without one (not JSON, `verify` names them): 0"
        ),
        "{marking:?}"
    );
    let as_json = orgledger(&["verify", "--json"], &url);
    assert_eq!(as_json.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&as_json.stdout).unwrap();
    assert_eq!(report["organizations"], 1, "{report}");
    assert_eq!(report["findings"][0]["organization_id"], organization);
    assert_eq!(report["findings"][0]["sequence"], 1);
    assert_eq!(report["events_authenticated"], 0, "{report}");

    // Text that is not JSON where the payload belongs (SQLite's column is only `text`): a
    // finding, not a crash.
    let garbled = "0190f5a0-0000-7000-8000-000000000002";
    insert_first_event(&pool, garbled, "OrganizationCreated", "not json").await;
    let garbled_run = orgledger(&["verify"], &url);
    let stdout = String::from_utf8_lossy(&garbled_run.stdout);
    assert_eq!(garbled_run.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "FAIL organization {garbled}, event 1: it cannot be read"
        )),
        "{stdout}"
    );
}

#[tokio::test]
async fn verify_tells_a_wrong_master_key_from_altered_events_once_every_organization_is_purged() {
    let dir = tempfile::tempdir().unwrap();
    let (url, database, ledger) = sqlite_store_under_the_zero_key(&dir).await;
    let org = support::acme_with_mia(&ledger).await;
    let purge = orgledger_domain::PurgeOrganization {
        confirm_name: "Acme".into(),
    };
    support::run(
        &ledger,
        org,
        "olivia",
        orgledger_domain::OrganizationCommand::PurgeOrganization(purge),
    )
    .await;
    database.close().await;

    let right_key = orgledger(&["verify"], &url);
    assert_eq!(right_key.status.code(), Some(0), "{right_key:?}");
    // An export of it says it was purged, not that there is no such organization.
    assert!(orgledger(&["projections", "rebuild"], &url)
        .status
        .success());
    let exported = orgledger(
        &["export", "--organization", &org.to_string(), "-o", "-"],
        &url,
    );
    let stderr = String::from_utf8_lossy(&exported.stderr);
    assert_eq!(exported.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("was purged"), "{stderr}");
    let unknown = orgledger(
        &[
            "export",
            "--organization",
            &uuid::Uuid::now_v7().to_string(),
            "-o",
            "-",
        ],
        &url,
    );
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("no organization") && !stderr.contains("purged"),
        "{stderr}"
    );

    // No data key is left to try a key on: the events' MACs tell it is the key, not them.
    let wrong_key = Command::new(env!("CARGO_BIN_EXE_orgledger"))
        .args(["verify"])
        .env("DATABASE_URL", &url)
        .env(
            "ORGLEDGER_MASTER_KEY",
            "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
        )
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&wrong_key.stderr);
    assert_eq!(
        wrong_key.status.code(),
        Some(2),
        "could not check: {stderr}"
    );
    assert!(
        stderr.contains("the master key matches none of the stored events' MACs"),
        "{stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&wrong_key.stdout).contains("FAIL"),
        "no event reported altered: {wrong_key:?}"
    );
}

#[tokio::test]
async fn another_applications_database_is_neither_migrated_nor_read_as_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crm.db");
    let url = format!("sqlite://{}", file.display());
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&file)
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::query("CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    for args in [&["verify"][..], &["migrate"], &["projections", "status"]] {
        let refused = orgledger(args, &url);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("holds another application's tables"),
            "{args:?}: {stderr}"
        );
    }
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(tables, ["customers"], "nothing added to it");

    // A file that is not a database at all is named as such, not as a store to migrate.
    let text = dir.path().join("notes.db");
    std::fs::write(
        &text,
        "not a database, but long enough to have a header of some sort",
    )
    .unwrap();
    let refused = orgledger(&["verify"], &format!("sqlite://{}", text.display()));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a database"), "{stderr}");
}

#[test]
fn verify_changes_nothing_in_a_store_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orgledger.db");
    // An empty file is an SQLite database without a table: its migrations are not applied.
    std::fs::write(&file, b"").unwrap();
    let url = format!("sqlite://{}", file.display());

    let refused = orgledger_with_key_beside_data(&["verify"], &url);

    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "could not check: {stderr}");
    assert!(stderr.contains("run `orgledger migrate` first"), "{stderr}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        0,
        "not a byte written"
    );

    // Migrated, but its key file gone: refused, and no new key made in its place.
    let key_file = dir.path().join("orgledger.db.master-key");
    assert!(orgledger_with_key_beside_data(&["migrate"], &url)
        .status
        .success());
    std::fs::remove_file(&key_file).unwrap();
    let keyless = orgledger_with_key_beside_data(&["verify"], &url);
    let stderr = String::from_utf8_lossy(&keyless.stderr);
    assert_eq!(keyless.status.code(), Some(2), "could not check: {stderr}");
    assert!(stderr.contains("no master key"), "{stderr}");
    assert!(!key_file.exists(), "a master key was made beside the data");
}

#[test]
fn processes_started_together_on_a_new_store_all_open_it_under_one_kept_key() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());

        let started: Vec<_> = (0..4)
            .map(|_| {
                Command::new(env!("CARGO_BIN_EXE_orgledger"))
                    .arg("migrate")
                    .env("DATABASE_URL", &url)
                    .env_remove("ORGLEDGER_MASTER_KEY")
                    .env("RUST_LOG", "warn")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("the binary runs")
            })
            .collect();

        for process in started {
            let done = process.wait_with_output().unwrap();
            assert!(
                done.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&done.stderr)
            );
        }
        let key_file = dir.path().join("orgledger.db.master-key");
        let kept = std::fs::read_to_string(&key_file).unwrap();
        assert_eq!(kept.trim().len(), 44, "one whole key: {kept:?}");
        let strays: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".orgledger-secret"))
            .collect();
        assert!(strays.is_empty(), "round {round}: left behind {strays:?}");
        let verified = orgledger_with_key_beside_data(&["verify"], &url);
        assert!(
            verified.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&verified.stderr)
        );
    }
}

/// An export to a file that a signal stops leaves nothing behind: not the file, and not the
/// partial one beside it, which holds personal data in clear.
#[tokio::test(flavor = "multi_thread")]
async fn an_export_stopped_by_a_signal_leaves_no_file_behind() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
    let database = orgledger::store::Database::connect(&url).await.unwrap();
    database.migrate().await.unwrap();
    // The key `orgledger()` runs the binary with.
    let key = orgledger::store::MasterKey::from_base64(ZERO_KEY).unwrap();
    let service = orgledger::service::Orgledger::open(database, key)
        .await
        .unwrap();
    let org = support::create_org(&service.ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    // Enough members that the export is still being written when the signal lands.
    let joined_at = support::now();
    for batch in 0..15 {
        let joins = (0..2_000)
            .map(|n| support::member_joined(&format!("user-{batch}-{n}"), joined_at))
            .collect();
        service
            .ledger
            .import(org, joins, std::collections::HashMap::new())
            .await
            .unwrap();
    }
    service.projector.catch_up().await.unwrap();
    service.close().await;
    let exports = dir.path().join("exports");
    std::fs::create_dir(&exports).unwrap();
    let output = exports.join("acme.json");
    let files = || std::fs::read_dir(&exports).unwrap().count();

    let mut export = Command::new(env!("CARGO_BIN_EXE_orgledger"))
        .args(["export", "--organization", &org.to_string(), "--output"])
        .arg(&output)
        .env("DATABASE_URL", &url)
        .env(
            "ORGLEDGER_MASTER_KEY",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        )
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Signalled once its partial file exists, while it is being written.
    let deadline = Instant::now() + Duration::from_secs(60);
    while files() == 0 && export.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        export.try_wait().unwrap().is_none(),
        "the export ended before it could be signalled"
    );
    assert_eq!(files(), 1, "its partial file");
    let signalled = Command::new("kill")
        .args(["-TERM", &export.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let stopped = export.wait_with_output().unwrap();

    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(!stopped.status.success(), "{stderr}");
    assert!(stderr.contains("interrupted by a signal"), "{stderr}");
    assert!(
        !stderr.contains("ERROR"),
        "the interruption logged as a failure: {stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&exports).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
