//! The test harness: a fresh database per test, on PostgreSQL and on SQLite.
#![allow(dead_code)]

use std::str::FromStr;

use chrono::{DateTime, Utc};
use orgledger::ledger::{Committed, Ledger, RequestContext};
use orgledger::store::{Database, MasterKey};
use orgledger_domain::*;
use sqlx::Connection;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Runs `async fn name(backend: Backend)` once per backend, as `name::postgres` and
/// `name::sqlite`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::support::Backend::Postgres).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::support::Backend::Sqlite).await
            }
        }
    )*};
}

/// A database that exists for one test.
pub struct TestDatabase {
    pub url: String,
    pub backend: Backend,
    _dir: Option<tempfile::TempDir>,
}

/// The PostgreSQL server tests create their databases on.
pub fn postgres_admin_url() -> String {
    std::env::var("ORGLEDGER_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A write transaction held open in another database of the server, as another service's
/// or an idle session's would be: it has a transaction id older than every event to come.
pub async fn a_write_held_open_in_another_database() -> sqlx::PgConnection {
    let mut elsewhere = sqlx::PgConnection::connect(&postgres_admin_url())
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut elsewhere).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut elsewhere)
        .await
        .unwrap();
    elsewhere
}

pub async fn fresh_database(backend: Backend) -> TestDatabase {
    match backend {
        Backend::Postgres => {
            let admin = postgres_admin_url();
            let name = format!("orgledger_test_{}", Uuid::now_v7().simple());
            let mut connection = sqlx::PgConnection::connect(&admin)
                .await
                .unwrap_or_else(|error| panic!("PostgreSQL at {admin} is unreachable: {error}"));
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut connection)
                .await
                .expect("CREATE DATABASE");
            let options = sqlx::postgres::PgConnectOptions::from_str(&admin).unwrap();
            let url = format!(
                "postgres://{}@{}:{}/{name}",
                options.get_username(),
                options.get_host(),
                options.get_port()
            );
            TestDatabase {
                url,
                backend,
                _dir: None,
            }
        }
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!("sqlite://{}", dir.path().join("orgledger.db").display());
            TestDatabase {
                url,
                backend,
                _dir: Some(dir),
            }
        }
    }
}

pub struct TestLedger {
    pub ledger: Ledger,
    pub database: TestDatabase,
    pub master_key: MasterKey,
}

impl std::ops::Deref for TestLedger {
    type Target = Ledger;
    fn deref(&self) -> &Ledger {
        &self.ledger
    }
}

impl TestLedger {
    /// A second, independent process's view of the same database.
    pub async fn reopen(&self) -> Ledger {
        let database = Database::connect(&self.database.url).await.unwrap();
        Ledger::new(database, self.master_key.clone())
    }

    pub fn db(&self) -> &Database {
        self.ledger.database()
    }
}

pub async fn spawn_ledger(backend: Backend) -> TestLedger {
    let database = fresh_database(backend).await;
    let db = Database::connect(&database.url).await.expect("connect");
    db.migrate().await.expect("migrate");
    let master_key = MasterKey::generate();
    TestLedger {
        ledger: Ledger::new(db, master_key.clone()),
        database,
        master_key,
    }
}

pub fn uid(id: &str) -> UserId {
    UserId::parse("user_id", id).unwrap()
}

pub fn user(id: &str) -> Actor {
    Actor::User(uid(id))
}

pub fn now() -> DateTime<Utc> {
    Utc::now()
}

pub fn cmd(actor: Actor, body: OrganizationCommand) -> Command {
    Command::new(actor, now(), body)
}

pub fn create_command(name: &str, slug: &str, owner: &str) -> Command {
    cmd(
        user(owner),
        OrganizationCommand::CreateOrganization(CreateOrganization {
            organization_id: Uuid::now_v7(),
            name: OrganizationName::parse("name", name).unwrap(),
            slug: Slug::parse("slug", slug).unwrap(),
            kind: OrganizationKind::Team,
            owner: NewMember {
                user_id: uid(owner),
                email: Some(Email::parse("email", &format!("{owner}@example.com")).unwrap()),
                first_name: Some(format!("{owner}-first")),
                last_name: Some(format!("{owner}-last")),
            },
        }),
    )
}

pub async fn create_org(ledger: &Ledger, name: &str, slug: &str, owner: &str) -> Committed {
    ledger
        .create_organization(
            create_command(name, slug, owner),
            true,
            &RequestContext::default(),
        )
        .await
        .expect("create organization")
}

/// Acme, owned by olivia, with mia as a member.
pub async fn acme_with_mia(ledger: &Ledger) -> Uuid {
    let org = create_org(ledger, "Acme", "acme", "olivia")
        .await
        .organization_id;
    add_member(ledger, org, "olivia", "mia", Role::Member).await;
    org
}

/// An invitation to `email` (a link without one) for `role`, usable `max_uses` times, with
/// a new token: the command and the token's secret and hash.
pub fn invitation(
    email: Option<&str>,
    role: Role,
    max_uses: i64,
) -> (SendInvitation, orgledger::tokens::IssuedSecret) {
    let token = orgledger::tokens::issue("inv");
    let send = SendInvitation {
        invitation_id: Uuid::now_v7(),
        email: email.map(|email| Email::parse("email", email).unwrap()),
        role,
        first_name: None,
        last_name: None,
        title: None,
        group_id: None,
        expires_in_days: None,
        max_uses: MaxUses::new("max_uses", max_uses).unwrap(),
        token_sha256: token.sha256.clone(),
    };
    (send, token)
}

/// Invites `email` with `role` as `by` and accepts as `user_id`; returns the token used.
pub async fn add_member(ledger: &Ledger, org: Uuid, by: &str, user_id: &str, role: Role) -> String {
    let address = format!("{user_id}@example.com");
    let (send, token) = invitation(Some(&address), role, 1);
    run(ledger, org, by, OrganizationCommand::SendInvitation(send)).await;
    let accept = AcceptInvitation {
        token_sha256: token.sha256,
        user_id: uid(user_id),
        email: Email::parse("email", &address).unwrap(),
        first_name: None,
        last_name: None,
    };
    run(
        ledger,
        org,
        user_id,
        OrganizationCommand::AcceptInvitation(accept),
    )
    .await;
    token.secret
}

pub async fn run(ledger: &Ledger, org: Uuid, actor: &str, body: OrganizationCommand) -> Committed {
    ledger
        .run(
            org,
            cmd(user(actor), body),
            &RequestContext::default(),
            None,
        )
        .await
        .unwrap_or_else(|error| panic!("command by {actor} failed: {error}"))
}

pub fn set_role(target: &str, role: Role) -> OrganizationCommand {
    OrganizationCommand::UpdateMember(UpdateMember {
        role: Some(role),
        ..UpdateMember::of(uid(target))
    })
}

/// A snapshot row's payload (an older one's JSON) and state (ciphertext).
type SnapshotRow = (Option<String>, Option<Vec<u8>>);

/// Snapshot rows as text: the JSON payload of an older one, or the state's bytes as they are
/// (clear text in them would show).
fn snapshot_text(rows: Vec<SnapshotRow>) -> String {
    rows.into_iter()
        .map(|(payload, state)| {
            let state = state.map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
            format!(
                "{}{}",
                payload.unwrap_or_default(),
                state.unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every stored row of events and snapshots, as text, for grepping.
pub async fn raw_rows(db: &Database) -> String {
    // CAST rather than `::`: the same statements run on both backends.
    const EVENTS: &str =
        "SELECT CAST(payload AS TEXT) || ' ' || CAST(metadata AS TEXT) FROM events";
    const SNAPSHOTS: &str = "SELECT CAST(payload AS TEXT), state FROM snapshots";
    let events: Vec<String> = orgledger_projections::with_pool!(db, pool => {
        sqlx::query_scalar(EVENTS).fetch_all(pool).await.unwrap()
    });
    let snapshots: Vec<SnapshotRow> = orgledger_projections::with_pool!(db, pool => {
        sqlx::query_as(SNAPSHOTS).fetch_all(pool).await.unwrap()
    });
    format!("{}\n{}", events.join("\n"), snapshot_text(snapshots))
}

/// Runs a statement and returns its error message, if any.
pub async fn try_execute(db: &Database, sql: &str) -> Result<u64, String> {
    match db {
        Database::Postgres(pool) => sqlx::query(sql)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()),
        Database::Sqlite(pool) => sqlx::query(sql)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()),
    }
    .map_err(|error| error.to_string())
}

pub async fn count(db: &Database, sql: &str) -> i64 {
    match db {
        Database::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        Database::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
    }
}

/// `count` role changes of `user`, member to admin and back: history made fast.
pub fn role_flips(count: usize, user: &str) -> Vec<OrganizationEvent> {
    (0..count)
        .map(|i| {
            let (from, to) = if i % 2 == 0 {
                (Role::Member, Role::Admin)
            } else {
                (Role::Admin, Role::Member)
            };
            OrganizationEvent::MemberRoleChanged(MemberRoleChanged {
                user_id: uid(user),
                from,
                to,
            })
        })
        .collect()
}

/// `user` joining as a member at `joined_at` (its email `user@example.com`), for imports.
pub fn member_joined(user: &str, joined_at: DateTime<Utc>) -> OrganizationEvent {
    OrganizationEvent::MemberJoined(MemberJoined {
        user_id: uid(user),
        email: format!("{user}@example.com"),
        first_name: None,
        last_name: None,
        title: None,
        image_url: None,
        role: Role::Member,
        locked_fields: vec![],
        group_ids: vec![],
        invitation_id: None,
        joined_at,
    })
}

/// The names of `table`'s indexes, sorted (SQLite's automatic primary-key index excluded).
pub async fn index_names(db: &Database, table: &str) -> Vec<String> {
    let mut names: Vec<String> = match db {
        Database::Postgres(pool) => {
            sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE tablename = $1")
                .bind(table)
                .fetch_all(pool)
                .await
                .unwrap()
        }
        Database::Sqlite(pool) => sqlx::query_scalar(
            "SELECT name FROM sqlite_master
              WHERE type = 'index' AND tbl_name = $1 AND name NOT LIKE 'sqlite_autoindex%'",
        )
        .bind(table)
        .fetch_all(pool)
        .await
        .unwrap(),
    };
    names.sort();
    names
}

/// Whether PostgreSQL's planner has column statistics for `table`. (SQLite's planner does
/// not depend on them to use an index, and nothing gathers them there.)
pub async fn has_planner_statistics(pool: &sqlx::PgPool, table: &str) -> bool {
    count_is_positive(
        pool,
        "SELECT count(*) FROM pg_stats WHERE tablename = $1",
        table,
    )
    .await
}

/// Whether `table` was analyzed by an `ANALYZE` statement, not by autovacuum.
pub async fn analyzed_by_hand(pool: &sqlx::PgPool, table: &str) -> bool {
    count_is_positive(
        pool,
        "SELECT coalesce(sum(analyze_count), 0)::int8 FROM pg_stat_user_tables WHERE relname = $1",
        table,
    )
    .await
}

async fn count_is_positive(pool: &sqlx::PgPool, count_sql: &str, table: &str) -> bool {
    sqlx::query_scalar::<_, i64>(count_sql)
        .bind(table)
        .fetch_one(pool)
        .await
        .unwrap()
        > 0
}

use orgledger::service::Orgledger;
use std::sync::Arc;

/// The service (ledger + projector) over a fresh database. Projection runners start only
/// with [`TestService::start_projections`]; otherwise tests drive them with `catch_up`.
pub struct TestService {
    pub service: Arc<Orgledger>,
    pub database: TestDatabase,
    pub master_key: MasterKey,
    stop: Option<tokio::sync::watch::Sender<bool>>,
}

impl std::ops::Deref for TestService {
    type Target = Orgledger;
    fn deref(&self) -> &Orgledger {
        &self.service
    }
}

impl TestService {
    pub fn start_projections(&mut self) {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        self.service.projector.spawn(stopped);
        self.stop = Some(stop);
    }

    /// Stops this process's projection runners and waits until they release leadership.
    pub async fn stop_projections(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        while !self.service.projector.leading().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Another process's service over the same database.
    pub async fn reopen(&self) -> Orgledger {
        let database = Database::connect(&self.database.url).await.unwrap();
        Orgledger::open(database, self.master_key.clone())
            .await
            .unwrap()
    }

    pub fn db(&self) -> &Database {
        self.service.database()
    }

    pub async fn catch_up(&self) -> usize {
        self.service
            .projector
            .catch_up()
            .await
            .expect("projections catch up")
    }

    pub async fn run_as(
        &self,
        org: Uuid,
        actor: &str,
        body: OrganizationCommand,
    ) -> orgledger::service::Outcome {
        self.service
            .run(
                org,
                cmd(user(actor), body),
                &RequestContext::default(),
                None,
            )
            .await
            .unwrap_or_else(|error| panic!("command by {actor} failed: {error}"))
    }
}

pub async fn spawn_service(backend: Backend) -> TestService {
    spawn_service_waiting(backend, orgledger::service::DEFAULT_CONSISTENCY_WAIT).await
}

/// A service whose commands wait at most `consistency_wait` for the read models.
pub async fn spawn_service_waiting(
    backend: Backend,
    consistency_wait: std::time::Duration,
) -> TestService {
    let database = fresh_database(backend).await;
    let db = Database::connect(&database.url).await.expect("connect");
    db.migrate().await.expect("migrate");
    let master_key = MasterKey::generate();
    let service = Orgledger::open(db, master_key.clone()).await.expect("open");
    service.set_consistency_wait(consistency_wait);
    TestService {
        service: Arc::new(service),
        database,
        master_key,
        stop: None,
    }
}

/// Every row of every read model, as text, in a stable order: for comparing two builds.
pub async fn dump_read_models(db: &Database) -> Vec<String> {
    let tables: [(&str, &[&str], &str); 8] = [
        (
            "rm_organizations",
            &[
                "id",
                "name",
                "name_folded",
                "slug",
                "kind",
                "status",
                "created_at_us",
                "deleted_at_us",
                "purge_after_us",
                "member_count",
                "version",
                "timezone",
                "logo_url",
                "workflow_mode",
                "default_invite_expiry_days",
                "client_restrictions",
                "smart_tool_routing",
                "plan",
                "seats",
            ],
            "id",
        ),
        (
            "rm_members",
            &[
                "organization_id",
                "user_id",
                "email",
                "first_name",
                "last_name",
                "first_name_folded",
                "last_name_folded",
                "title",
                "image_url",
                "role",
                "joined_at_us",
                "group_ids",
                "locked_fields",
            ],
            "organization_id, user_id",
        ),
        (
            "rm_invitations",
            &[
                "id",
                "organization_id",
                "email",
                "role",
                "first_name",
                "last_name",
                "title",
                "group_id",
                "status",
                "invited_by_type",
                "invited_by_id",
                "sent_at_us",
                "expires_at_us",
                "max_uses",
                "uses",
                "token_sha256",
                "accepted_at_us",
                "revoked_at_us",
            ],
            "id",
        ),
        (
            "rm_audit_log",
            &[
                "organization_id",
                "sequence",
                "occurred_at_us",
                "actor_type",
                "actor_id",
                "action",
                "resource_type",
                "resource_id",
                "details",
                "request_id",
                "search_folded",
            ],
            "organization_id, sequence",
        ),
        (
            "rm_groups",
            &[
                "organization_id",
                "id",
                "name",
                "description",
                "member_ids",
                "created_at_us",
            ],
            "organization_id, id",
        ),
        (
            "rm_service_accounts",
            &[
                "id",
                "organization_id",
                "name",
                "description",
                "scopes",
                "key_prefix",
                "key_sha256",
                "created_at_us",
                "last_rotated_at_us",
            ],
            "id",
        ),
        (
            "rm_ai_providers",
            &[
                "organization_id",
                "id",
                "name",
                "kind",
                "enabled",
                "api_key_last4",
            ],
            "organization_id, id",
        ),
        (
            "rm_roles",
            &["organization_id", "key", "name", "permissions"],
            "organization_id, key",
        ),
    ];
    let mut rows = Vec::new();
    for (table, columns, order) in tables {
        let expression = columns
            .iter()
            .map(|c| format!("coalesce(CAST({c} AS TEXT), '~')"))
            .collect::<Vec<_>>()
            .join(" || '|' || ");
        let sql = format!("SELECT '{table}|' || {expression} FROM {table} ORDER BY {order}");
        let table_rows: Vec<String> = match db {
            Database::Postgres(pool) => sqlx::query_scalar(&sql).fetch_all(pool).await.unwrap(),
            Database::Sqlite(pool) => sqlx::query_scalar(&sql).fetch_all(pool).await.unwrap(),
        };
        rows.extend(table_rows);
    }
    rows
}

/// Runs `sql` (one value, `argument` bound as `$1`) every 10 ms until `wanted` takes its
/// value; fails with `what` after 30 s.
pub async fn poll_until<T>(
    connection: &mut sqlx::PgConnection,
    what: &str,
    sql: &str,
    argument: &str,
    wanted: impl Fn(&T) -> bool,
) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let value: T = sqlx::query_scalar(sql)
            .bind(argument)
            .fetch_one(&mut *connection)
            .await
            .unwrap();
        if wanted(&value) {
            return value;
        }
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Index builds running on the table named `$1` (PostgreSQL). The name is bound, not written
/// in: a query naming a rebuild's copy would be taken for one of the rebuild's statements
/// and cancelled with them.
pub const INDEX_BUILDS_ON: &str = "SELECT count(*) FROM pg_stat_activity
      WHERE query LIKE 'CREATE %INDEX%' AND strpos(query, $1) > 0 AND state = 'active'";

/// PostgreSQL, while a rebuild of the audit log waits behind `log_held` (a transaction
/// holding a lock on the events): finds its copy, holds the copy against index builds only
/// (inserts share the lock), frees the log, and waits until an index build of the copy waits
/// on that lock. The copy's name and the connection holding it.
pub async fn hold_the_audit_copy_at_its_index_build(
    url: &str,
    watcher: &mut sqlx::PgConnection,
    log_held: &mut sqlx::PgConnection,
) -> (String, sqlx::PgConnection) {
    use sqlx::Executor;
    let copy: String = poll_until(
        watcher,
        "no copy within 30 s",
        "SELECT coalesce(max(relname::text), '') FROM pg_class
          WHERE relname LIKE $1 ESCAPE '!' AND relkind = 'r'",
        "rm!_audit!_log!_!_rb%",
        |name: &String| !name.is_empty(),
    )
    .await;
    let mut copy_held = sqlx::PgConnection::connect(url).await.unwrap();
    copy_held
        .execute(format!("BEGIN; LOCK TABLE {copy} IN ROW EXCLUSIVE MODE").as_str())
        .await
        .unwrap();
    log_held.execute("ROLLBACK").await.unwrap();
    poll_until(
        watcher,
        "no index build within 30 s",
        INDEX_BUILDS_ON,
        &copy,
        |running: &i64| *running > 0,
    )
    .await;
    (copy, copy_held)
}
