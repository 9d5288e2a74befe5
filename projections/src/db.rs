use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, PgPool, SqlitePool};

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// Holds the URL's scheme only: the rest may carry a password.
    #[error("unsupported DATABASE_URL scheme {0:?}: use postgres://... or sqlite://PATH")]
    UnsupportedUrl(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("{0} does not exist: this command opens an existing store (`orgledger migrate` or `orgledger serve` creates one)")]
    NoSuchStore(PathBuf),
    #[error("the database server did not answer within {0:?}")]
    NoAnswer(Duration),
    #[error(
        "{0} holds another application's tables and none of orgledger's migrations: \
             DATABASE_URL must name an orgledger store, or a file that does not exist yet"
    )]
    ForeignStore(PathBuf),
}

/// How long the first connection of a PostgreSQL pool may take (the pool's own acquire
/// timeout, too).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A pooled connection idle at least this long is pinged before it is handed out. Shorter
/// than a server restart takes, longer than connections sit idle under load.
pub const PING_IDLE_FOR: Duration = Duration::from_millis(100);

/// PostgreSQL pools. sqlx pings a connection when it goes back to the pool and, by default,
/// again when it comes out: a round trip on the path of every statement. Here only a
/// connection idle for [`PING_IDLE_FOR`] is pinged on the way out (one that sat through a
/// server restart, say); one in use a moment ago passed its ping on the way back.
fn pg_pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IDLE_FOR {
                    sqlx::Connection::ping(connection).await?;
                }
                Ok(true)
            })
        })
}

/// Which engine a [`Database`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// The column type of a UUID: PostgreSQL's 16-byte `uuid` (half the width of its text
    /// in every index that leads with it), SQLite's text.
    pub fn uuid_column(self) -> &'static str {
        match self {
            Self::Postgres => "UUID",
            Self::Sqlite => "TEXT",
        }
    }
}

/// Runs `$body` with `$pool` bound to the PostgreSQL or the SQLite pool: the same code,
/// compiled once per backend.
#[macro_export]
macro_rules! with_pool {
    ($database:expr, $pool:ident => $body:expr) => {
        match $database {
            $crate::Database::Postgres($pool) => $body,
            $crate::Database::Sqlite($pool) => $body,
        }
    };
}

/// A connection pool to the one database that holds events, keys and read models.
#[derive(Debug, Clone)]
pub enum Database {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// sqlx logs a slow statement with its whole text, which for a batch of a rebuild is a
/// multi-row INSERT of 100 KB or more, at `WARN` by default: in the middle of a progress
/// bar and of the service's log. Requests and batches are timed by the service itself.
const SLOW_STATEMENT_LOG: (log::LevelFilter, Duration) =
    (log::LevelFilter::Debug, Duration::from_secs(1));

/// What a pool's connections may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    ReadWrite,
    ReadOnly,
}

impl Database {
    /// Connects to `postgres://...` or `sqlite://PATH` (the file is created if missing).
    pub async fn connect(url: &str) -> Result<Self, DatabaseError> {
        Self::connect_for(url, Access::ReadWrite).await
    }

    /// Connects to a store that must exist, to read only (`orgledger verify` and `export`): PostgreSQL
    /// sessions default to read-only transactions; SQLite opens the file read-only and sets
    /// no pragma that writes (the journal mode stays the file's own).
    pub async fn connect_read_only(url: &str) -> Result<Self, DatabaseError> {
        Self::refuse_missing_file(url)?;
        Self::connect_for(url, Access::ReadOnly).await
    }

    async fn connect_for(url: &str, access: Access) -> Result<Self, DatabaseError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)?
                .log_slow_statements(SLOW_STATEMENT_LOG.0, SLOW_STATEMENT_LOG.1);
            let options = match access {
                Access::ReadWrite => options,
                Access::ReadOnly => options.options([("default_transaction_read_only", "on")]),
            };
            // A pool that cannot connect says only that it timed out, after its acquire
            // timeout; one connection made first says why (refused, authentication, no such
            // database) at once, or that the server did not answer in time.
            match tokio::time::timeout(CONNECT_TIMEOUT, options.connect()).await {
                Ok(Ok(probe)) => drop(sqlx::Connection::close(probe).await),
                Ok(Err(error)) => return Err(error.into()),
                Err(_) => return Err(DatabaseError::NoAnswer(CONNECT_TIMEOUT)),
            }
            let pool = pg_pool_options(16).connect_with(options).await?;
            Ok(Self::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            // WAL lets reads run beside the one writer; FULL sync makes a committed event
            // survive power loss, not just a process crash.
            let options = SqliteConnectOptions::from_str(url)?
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true)
                .log_slow_statements(SLOW_STATEMENT_LOG.0, SLOW_STATEMENT_LOG.1);
            let options = match access {
                // Deleted rows are overwritten with zeros: a purge's read-model rows (emails,
                // names) do not linger in freed pages of the file.
                Access::ReadWrite => options
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .pragma("secure_delete", "on"),
                Access::ReadOnly => options.read_only(true),
            };
            if matches!(access, Access::ReadWrite) {
                create_private(options.get_filename());
            }
            // A new file's first connections switch it to WAL, which needs the file to
            // itself: SQLite answers "database is locked" there without waiting out the busy
            // timeout when another process opens the same new file at that moment. Retried
            // within the same bound.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let opened = SqlitePoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(options.clone())
                    .await;
                match opened {
                    Ok(pool) => return Ok(Self::Sqlite(pool)),
                    Err(sqlx::Error::Database(error))
                        if error.code().as_deref() == Some("5")
                            && tokio::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        } else {
            let scheme = url
                .split_once("://")
                .map(|(scheme, _)| scheme)
                .filter(|scheme| {
                    scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                })
                .unwrap_or("");
            Err(DatabaseError::UnsupportedUrl(scheme.to_owned()))
        }
    }

    /// Connects like [`Database::connect`], to a store that must exist already: a SQLite
    /// path naming no file is an error rather than a new, empty store that a mistyped path
    /// would pass for.
    pub async fn connect_existing(url: &str) -> Result<Self, DatabaseError> {
        Self::refuse_missing_file(url)?;
        Self::connect(url).await
    }

    fn refuse_missing_file(url: &str) -> Result<(), DatabaseError> {
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?;
            let file = options.get_filename();
            if !file.exists() {
                return Err(DatabaseError::NoSuchStore(file.to_path_buf()));
            }
        }
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Postgres(_) => Backend::Postgres,
            Self::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Applies pending migrations of this backend.
    pub async fn migrate(&self) -> Result<(), DatabaseError> {
        self.migrate_through(i64::MAX).await
    }

    /// Applies the pending migrations up to `version` (their file names' numbers): a store
    /// as an older version left it, for tests of what an upgrade does to it.
    pub async fn migrate_through(&self, version: i64) -> Result<(), DatabaseError> {
        let up_to = |mut migrator: sqlx::migrate::Migrator| {
            let kept: Vec<_> = migrator
                .iter()
                .filter(|migration| migration.version <= version)
                .cloned()
                .collect();
            migrator.migrations = kept.into();
            migrator
        };
        match self {
            Self::Postgres(pool) => {
                up_to(sqlx::migrate!("../migrations/postgres"))
                    .run(pool)
                    .await?;
            }
            Self::Sqlite(pool) => {
                self.refuse_another_applications_file().await?;
                // sqlx takes no lock across processes on SQLite: two processes starting on a
                // new store (a `migrate` beside a `serve`) both apply a migration, and the one
                // whose statements wait out the other's transaction fails on what it created.
                // Each migration commits with its record, so a failure after which more are
                // recorded is the other process's progress: run again from there.
                let migrator = up_to(sqlx::migrate!("../migrations/sqlite"));
                let mut attempts = 0;
                loop {
                    let before = applied_migrations(pool).await;
                    match migrator.run(pool).await {
                        Ok(()) => break,
                        Err(error) => {
                            attempts += 1;
                            if attempts > migrator.iter().count()
                                || applied_migrations(pool).await <= before
                            {
                                return Err(error.into());
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Refuses an SQLite file that holds tables but none of orgledger's migrations: another
    /// application's database, which `migrate` must not add its tables to, nor a reader take
    /// for a store whose migrations are merely behind.
    pub async fn refuse_another_applications_file(&self) -> Result<(), DatabaseError> {
        let Self::Sqlite(pool) = self else {
            return Ok(());
        };
        let (migrations, tables): (i64, i64) = sqlx::query_as(
            "SELECT coalesce(sum(name = '_sqlx_migrations'), 0), count(*) FROM sqlite_master
              WHERE type = 'table' AND name NOT LIKE 'sqlite!_%' ESCAPE '!'",
        )
        .fetch_one(pool)
        .await?;
        if migrations == 0 && tables > 0 {
            return Err(DatabaseError::ForeignStore(
                pool.connect_options().get_filename().to_owned(),
            ));
        }
        Ok(())
    }

    /// True when every known migration has been applied.
    /// An error when the database cannot be asked, so it is not taken for one whose
    /// migrations are pending.
    pub async fn is_migrated(&self) -> Result<bool, DatabaseError> {
        const APPLIED: &str = "SELECT count(*) FROM _sqlx_migrations WHERE success";
        let (known, applied) = match self {
            Self::Postgres(pool) => (
                sqlx::migrate!("../migrations/postgres").iter().count(),
                sqlx::query_scalar::<_, i64>(APPLIED).fetch_one(pool).await,
            ),
            Self::Sqlite(pool) => (
                sqlx::migrate!("../migrations/sqlite").iter().count(),
                sqlx::query_scalar::<_, i64>(APPLIED).fetch_one(pool).await,
            ),
        };
        let applied = match applied {
            Ok(applied) => applied,
            // A store never migrated has no table of migrations yet; any other error (a
            // server that refuses connections answers with one too) is not an answer.
            Err(sqlx::Error::Database(error)) if is_missing_table(error.as_ref()) => 0,
            Err(error) => return Err(error.into()),
        };
        Ok(applied as usize >= known)
    }

    /// Begins a transaction on either backend.
    pub async fn begin(&self) -> Result<Transaction, sqlx::Error> {
        Ok(match self {
            Self::Postgres(pool) => Transaction::Postgres(pool.begin().await?),
            // Every transaction here writes. A deferred one that reads first fails at once
            // ("database is locked", no busy wait) when another connection writes between
            // its read and its first write; an immediate one waits for the lock instead.
            Self::Sqlite(pool) => Transaction::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    /// A pool of its own over the same PostgreSQL database, for the projection runner: the
    /// requests wait on it, so it must not queue behind them for a connection. Its commits
    /// are asynchronous: read models are derived from the log, a batch's rows, versions and
    /// checkpoints commit together, so a server crash loses at most the last few batches,
    /// whole, and the runner applies them again from its checkpoints; visibility does not
    /// wait for the flush, so read-your-writes holds. Events are never written through it.
    /// A transaction left open by a runner that stopped answering (a hung process) is ended
    /// by the server after 30 s idle, so the row locks it holds on the checkpoints do not
    /// stall whichever process leads next. SQLite has one writer whatever the pool, so it
    /// shares the pool.
    pub fn separate_pool(&self, max_connections: u32) -> Self {
        match self {
            Self::Postgres(pool) => {
                Self::Postgres(pg_pool_options(max_connections).connect_lazy_with(
                    (*pool.connect_options()).clone().options([
                        ("synchronous_commit", "off"),
                        ("idle_in_transaction_session_timeout", "30000"),
                    ]),
                ))
            }
            Self::Sqlite(_) => self.clone(),
        }
    }

    pub async fn close(&self) {
        match self {
            Self::Postgres(pool) => pool.close().await,
            Self::Sqlite(pool) => pool.close().await,
        }
    }
}

/// A transaction on either backend.
pub enum Transaction {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

impl Transaction {
    pub fn conn(&mut self) -> Conn<'_> {
        match self {
            Self::Postgres(tx) => Conn::Postgres(tx),
            Self::Sqlite(tx) => Conn::Sqlite(tx),
        }
    }

    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres(tx) => tx.commit().await,
            Self::Sqlite(tx) => tx.commit().await,
        }
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres(tx) => tx.rollback().await,
            Self::Sqlite(tx) => tx.rollback().await,
        }
    }
}

/// A value bound to a statement that runs unchanged on both backends.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Text(Option<String>),
    Int(Option<i64>),
    /// For a [`Backend::uuid_column`]: bound as `uuid` on PostgreSQL, as its hyphenated
    /// text on SQLite. Never bind a `Uuid` to a SQLite statement directly: sqlx writes it
    /// as a 16-byte blob, which matches no text.
    Uuid(uuid::Uuid),
}

impl From<uuid::Uuid> for Arg {
    fn from(value: uuid::Uuid) -> Self {
        Self::Uuid(value)
    }
}

impl From<&str> for Arg {
    fn from(value: &str) -> Self {
        Self::Text(Some(value.to_owned()))
    }
}
impl From<String> for Arg {
    fn from(value: String) -> Self {
        Self::Text(Some(value))
    }
}
impl From<&String> for Arg {
    fn from(value: &String) -> Self {
        Self::Text(Some(value.clone()))
    }
}
impl From<Option<String>> for Arg {
    fn from(value: Option<String>) -> Self {
        Self::Text(value)
    }
}
impl From<&Option<String>> for Arg {
    fn from(value: &Option<String>) -> Self {
        Self::Text(value.clone())
    }
}
impl From<i64> for Arg {
    fn from(value: i64) -> Self {
        Self::Int(Some(value))
    }
}
impl From<Option<i64>> for Arg {
    fn from(value: Option<i64>) -> Self {
        Self::Int(value)
    }
}

/// `args![a, b, c]`: statement arguments from anything convertible to [`Arg`].
#[macro_export]
macro_rules! args {
    ($($value:expr),* $(,)?) => { [$($crate::Arg::from($value)),*] };
}

/// A connection inside a transaction, on either backend.
pub enum Conn<'c> {
    Postgres(&'c mut sqlx::PgConnection),
    Sqlite(&'c mut sqlx::SqliteConnection),
}

macro_rules! bind_all {
    ($sql:expr, $args:expr, $uuid:expr) => {{
        let mut query = sqlx::query($sql);
        for arg in $args {
            query = match arg {
                Arg::Text(value) => query.bind(value.clone()),
                Arg::Int(value) => query.bind(*value),
                Arg::Uuid(value) => query.bind($uuid(*value)),
            };
        }
        query
    }};
}

/// Creates the SQLite file at `path`, if missing, readable by its owner only: its read
/// models hold members' addresses in clear. SQLite gives the `-wal` and `-shm` files it makes
/// beside it the same mode. A file that exists keeps its own; a failure here leaves the
/// error to SQLite's open.
fn create_private(path: &std::path::Path) {
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    drop(file.open(path));
}

/// Whether `error` is about the connection or the server rather than the statement's data:
/// the connection lost or refused, the server shutting down or out of resources, the
/// statement cancelled, or the database busy ([`is_busy`]).
pub fn is_about_the_connection(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(database_error) => {
            // SQLSTATE classes 08 (connection exception), 53 (insufficient resources), 57
            // (operator intervention: shutdown, cancel) and 58 (system error).
            let class = database_error
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .map(|error| &error.code()[..2]);
            matches!(class, Some("08" | "53" | "57" | "58")) || is_busy(error)
        }
        _ => false,
    }
}

/// Whether `error` says the database did not take the statement: too busy to in time
/// (SQLite's write lock still held when its busy timeout ran out, no pooled connection free
/// within the pool's acquire timeout), or refusing new connections (starting up or shutting
/// down, out of connections, or the database closed to them). Not a fault of the request,
/// nor of the data, and nothing of the statement ran: a retry may pass. A connection that
/// broke while a statement ran is not among them: its outcome is unknown.
pub fn is_busy(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(error) => {
            if let Some(error) = error.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                // What a server answers a new connection it refuses: cannot connect now
                // (starting up, shutting down), too many connections, could not establish
                // or rejected; and, by its message (55000 is also raised for unrelated
                // states), a database closed to connections (`ALLOW_CONNECTIONS false`).
                return matches!(error.code(), "57P03" | "53300" | "08001" | "08004")
                    || (error.code() == "55000"
                        && error
                            .message()
                            .contains("not currently accepting connections"));
            }
            // SQLite: SQLITE_BUSY and SQLITE_LOCKED, with their extended codes (the low
            // byte).
            error
                .try_downcast_ref::<sqlx::sqlite::SqliteError>()
                .is_some()
                && error
                    .code()
                    .and_then(|code| code.parse::<i32>().ok())
                    .is_some_and(|code| matches!(code & 0xff, 5 | 6))
        }
        _ => false,
    }
}

/// Whether the database said a table does not exist: PostgreSQL's `undefined_table`, or
/// SQLite's "no such table" (its code is the generic `SQLITE_ERROR`).
fn is_missing_table(error: &dyn sqlx::error::DatabaseError) -> bool {
    match error.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        Some(error) => error.code() == "42P01",
        None => error.message().starts_with("no such table"),
    }
}

fn sqlite_uuid(value: uuid::Uuid) -> String {
    value.to_string()
}

/// `sql` for SQLite: when its `$n` placeholders are `$1, $2, ..` in order, each used once,
/// they become plain `?`. SQLite looks a numbered or named placeholder up in a list, when it
/// parses the statement and again when each value is bound, so a statement's cost grows with
/// the square of its placeholders: a 2,000-row INSERT of 22,000 took 2.5 s where `?` takes
/// 20 ms. Any other use of `$n` is left as written. Quoted text is skipped.
fn sqlite_statement(sql: &str) -> std::borrow::Cow<'_, str> {
    if !sql.contains('$') {
        return std::borrow::Cow::Borrowed(sql);
    }
    let bytes = sql.as_bytes();
    let mut rewritten = String::with_capacity(sql.len());
    let (mut next, mut copied, mut at) = (1_usize, 0, 0);
    while at < bytes.len() {
        match bytes[at] {
            quote @ (b'\'' | b'"') => {
                at += 1;
                while at < bytes.len() && bytes[at] != quote {
                    at += 1;
                }
                at += 1;
            }
            b'$' => {
                let digits = bytes[at + 1..]
                    .iter()
                    .take_while(|byte| byte.is_ascii_digit())
                    .count();
                if digits == 0 {
                    at += 1;
                    continue;
                }
                let number = &sql[at + 1..at + 1 + digits];
                if number.parse::<usize>().ok() != Some(next) {
                    return std::borrow::Cow::Borrowed(sql);
                }
                rewritten.push_str(&sql[copied..at]);
                rewritten.push('?');
                next += 1;
                at += 1 + digits;
                copied = at;
            }
            _ => at += 1,
        }
    }
    if next == 1 {
        return std::borrow::Cow::Borrowed(sql);
    }
    rewritten.push_str(&sql[copied..]);
    std::borrow::Cow::Owned(rewritten)
}

impl Database {
    /// Runs a statement on the pool, its `args` bound as [`Conn::execute`] binds them;
    /// returns the rows it affected.
    pub async fn execute(&self, sql: &str, args: &[Arg]) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Self::Postgres(pool) => bind_all!(sql, args, std::convert::identity)
                .execute(pool)
                .await?
                .rows_affected(),
            Self::Sqlite(pool) => {
                let sql = sqlite_statement(sql);
                bind_all!(&sql, args, sqlite_uuid)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
        })
    }

    /// All rows of a read on the pool, each decoded as `T`, its `args` bound as
    /// [`Conn::fetch_all`] binds them.
    pub async fn fetch_all<T>(&self, sql: &str, args: &[Arg]) -> Result<Vec<T>, sqlx::Error>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
    {
        match self {
            Self::Postgres(pool) => bind_all!(sql, args, std::convert::identity)
                .fetch_all(pool)
                .await?
                .iter()
                .map(T::from_row)
                .collect(),
            Self::Sqlite(pool) => {
                let sql = sqlite_statement(sql);
                bind_all!(&sql, args, sqlite_uuid)
                    .fetch_all(pool)
                    .await?
                    .iter()
                    .map(T::from_row)
                    .collect()
            }
        }
    }
}

impl Conn<'_> {
    /// Runs a statement; returns the rows it affected.
    pub async fn execute(&mut self, sql: &str, args: &[Arg]) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Self::Postgres(conn) => bind_all!(sql, args, std::convert::identity)
                .execute(&mut **conn)
                .await?
                .rows_affected(),
            Self::Sqlite(conn) => {
                let sql = sqlite_statement(sql);
                bind_all!(&sql, args, sqlite_uuid)
                    .execute(&mut **conn)
                    .await?
                    .rows_affected()
            }
        })
    }

    /// The first column of the first row, if any, as an integer.
    pub async fn fetch_i64(&mut self, sql: &str, args: &[Arg]) -> Result<Option<i64>, sqlx::Error> {
        use sqlx::Row;
        Ok(match self {
            Self::Postgres(conn) => bind_all!(sql, args, std::convert::identity)
                .fetch_optional(&mut **conn)
                .await?
                .map(|row| row.get::<i64, _>(0)),
            Self::Sqlite(conn) => {
                let sql = sqlite_statement(sql);
                bind_all!(&sql, args, sqlite_uuid)
                    .fetch_optional(&mut **conn)
                    .await?
                    .map(|row| row.get::<i64, _>(0))
            }
        })
    }

    /// All rows, each decoded as `T` (a tuple or a `FromRow` struct).
    pub async fn fetch_all<T>(&mut self, sql: &str, args: &[Arg]) -> Result<Vec<T>, sqlx::Error>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>,
    {
        match self {
            Self::Postgres(conn) => bind_all!(sql, args, std::convert::identity)
                .fetch_all(&mut **conn)
                .await?
                .iter()
                .map(T::from_row)
                .collect(),
            Self::Sqlite(conn) => {
                let sql = sqlite_statement(sql);
                bind_all!(&sql, args, sqlite_uuid)
                    .fetch_all(&mut **conn)
                    .await?
                    .iter()
                    .map(T::from_row)
                    .collect()
            }
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Postgres(_) => Backend::Postgres,
            Self::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Appends `rows` (each `columns.len()` values) to `table`, making each row only when it
    /// is sent: on PostgreSQL a run of at least [`COPY_MIN_ROWS`] goes in by `COPY ... FROM
    /// STDIN`, which skips parsing and planning a statement of thousands of parameters, in
    /// chunks, so the server inserts one chunk while the next is made; otherwise multi-row
    /// INSERTs. A row whose key exists fails the call (there is no `ON CONFLICT` for `COPY`):
    /// callers append only what their checkpoint and versions say is new. Returns, with the
    /// error, the index of the first row of the failing statement (0 for a `COPY`, which is
    /// one statement).
    pub async fn append_rows<R>(
        &mut self,
        table: &str,
        columns: &[&str],
        rows: R,
    ) -> Result<(), (usize, sqlx::Error)>
    where
        R: ExactSizeIterator<Item = Vec<Arg>> + Send,
    {
        if let Self::Postgres(conn) = self {
            if rows.len() >= COPY_MIN_ROWS {
                let statement = format!("COPY {table} ({}) FROM STDIN", columns.join(", "));
                return copy_in(conn, &statement, rows)
                    .await
                    .map_err(|error| (0, error));
            }
        }
        self.insert_values(table, columns, rows, "").await
    }

    /// Multi-row INSERTs of `rows`, each statement within both backends' parameter limits,
    /// `then` ending each; with the error, the index of the failing statement's first row.
    async fn insert_values(
        &mut self,
        table: &str,
        columns: &[&str],
        rows: impl Iterator<Item = Vec<Arg>> + Send,
        then: &str,
    ) -> Result<(), (usize, sqlx::Error)> {
        let chunk_rows = MAX_ROWS_PER_STATEMENT.min(32_766 / columns.len().max(1));
        let names = columns.join(", ");
        let mut rows = rows.peekable();
        let mut first = 0;
        while rows.peek().is_some() {
            let chunk: Vec<Vec<Arg>> = rows.by_ref().take(chunk_rows).collect();
            let sql = format!(
                "INSERT INTO {table} ({names}) VALUES {} {then}",
                value_rows(chunk.len(), columns.len(), 1)
            );
            let count = chunk.len();
            let args: Vec<Arg> = chunk.into_iter().flatten().collect();
            self.execute(&sql, &args)
                .await
                .map_err(|error| (first, error))?;
            first += count;
        }
        Ok(())
    }

    /// Inserts `rows` (each `columns.len()` values, of the same kinds row after row) into
    /// `table`, `then` (an `ON CONFLICT` clause, or empty) deciding what a row whose key
    /// exists does. On PostgreSQL that is one statement whatever the count: a column is one
    /// array parameter, unnested, so the statement is parsed and planned once per connection
    /// instead of once per multi-row INSERT of thousands of parameters. SQLite has no arrays:
    /// multi-row INSERTs. Returns, with the error, the index of the first row of the failing
    /// statement (0 on PostgreSQL), or on PostgreSQL of a row of another width or kind,
    /// refused before anything is sent.
    pub async fn insert_rows(
        &mut self,
        table: &str,
        columns: &[&str],
        rows: Vec<Vec<Arg>>,
        then: &str,
    ) -> Result<(), (usize, sqlx::Error)> {
        if rows.is_empty() {
            return Ok(());
        }
        match self {
            Self::Postgres(conn) => {
                let arrays = ColumnArrays::of(columns.len(), rows)?;
                let sql = format!(
                    "INSERT INTO {table} ({}) SELECT * FROM UNNEST({}) {then}",
                    columns.join(", "),
                    arrays.placeholders()
                );
                arrays
                    .bind(sqlx::query(&sql))
                    .execute(&mut **conn)
                    .await
                    .map_err(|error| (0, error))?;
                Ok(())
            }
            Self::Sqlite(_) => {
                self.insert_values(table, columns, rows.into_iter(), then)
                    .await
            }
        }
    }

    /// Runs several statements of DDL.
    pub async fn execute_script(&mut self, statements: &[String]) -> Result<(), sqlx::Error> {
        for statement in statements {
            self.execute(statement, &[]).await?;
        }
        Ok(())
    }
}

/// Rows turned into one PostgreSQL array per column, for `UNNEST`. A column's kind is its
/// first row's; a value of another kind in it is a caller's bug.
enum ColumnArray {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Uuid(Vec<uuid::Uuid>),
}

struct ColumnArrays(Vec<ColumnArray>);

impl ColumnArrays {
    /// Fails, with the row's index, on a row of another width or a value of another kind
    /// than its column's: a caller's bug, refused rather than sent misaligned.
    fn of(width: usize, rows: Vec<Vec<Arg>>) -> Result<Self, (usize, sqlx::Error)> {
        let count = rows.len();
        let mut arrays: Vec<ColumnArray> = rows
            .first()
            .map(|row| {
                row.iter()
                    .map(|value| match value {
                        Arg::Text(_) => ColumnArray::Text(Vec::with_capacity(count)),
                        Arg::Int(_) => ColumnArray::Int(Vec::with_capacity(count)),
                        Arg::Uuid(_) => ColumnArray::Uuid(Vec::with_capacity(count)),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let refused = |index: usize, why: String| (index, sqlx::Error::Encode(why.into()));
        for (index, row) in rows.into_iter().enumerate() {
            if row.len() != width {
                return Err(refused(
                    index,
                    format!("{} values for {width} columns", row.len()),
                ));
            }
            for (array, value) in arrays.iter_mut().zip(row) {
                match (array, value) {
                    (ColumnArray::Text(values), Arg::Text(value)) => values.push(value),
                    (ColumnArray::Int(values), Arg::Int(value)) => values.push(value),
                    (ColumnArray::Uuid(values), Arg::Uuid(value)) => values.push(value),
                    (_, value) => {
                        return Err(refused(
                            index,
                            format!("{value:?} in a column of another kind"),
                        ))
                    }
                }
            }
        }
        Ok(Self(arrays))
    }

    /// `$1::text[], $2::bigint[], ..`
    fn placeholders(&self) -> String {
        self.0
            .iter()
            .enumerate()
            .map(|(index, array)| {
                let kind = match array {
                    ColumnArray::Text(_) => "text",
                    ColumnArray::Int(_) => "bigint",
                    ColumnArray::Uuid(_) => "uuid",
                };
                format!("${}::{kind}[]", index + 1)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn bind(
        self,
        mut query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
        for array in self.0 {
            query = match array {
                ColumnArray::Text(values) => query.bind(values),
                ColumnArray::Int(values) => query.bind(values),
                ColumnArray::Uuid(values) => query.bind(values),
            };
        }
        query
    }
}

/// Streams `rows` into `statement` (a `COPY ... FROM STDIN`), [`COPY_CHUNK_ROWS`] at a time.
/// A failed send aborts the copy, so that a connection that still works can roll back; a row
/// the server refuses fails `finish`, which reads the server's reply to the end.
async fn copy_in(
    conn: &mut sqlx::PgConnection,
    statement: &str,
    rows: impl Iterator<Item = Vec<Arg>> + Send,
) -> Result<(), sqlx::Error> {
    let mut copy = conn.copy_in_raw(statement).await?;
    let mut rows = rows.peekable();
    let mut text = CopyText::default();
    while rows.peek().is_some() {
        text.bytes.clear();
        for row in rows.by_ref().take(COPY_CHUNK_ROWS) {
            text.row(&row);
        }
        if let Err(error) = copy.send(text.bytes.as_slice()).await {
            drop(copy.abort("send failed").await);
            return Err(error);
        }
    }
    copy.finish().await?;
    Ok(())
}

/// Rows in the text format of PostgreSQL's `COPY`: tab-separated, `\N` for NULL, and
/// backslash escapes for the characters that would end a field or a row.
#[derive(Default)]
struct CopyText {
    bytes: Vec<u8>,
}

impl CopyText {
    fn row(&mut self, values: &[Arg]) {
        for (index, value) in values.iter().enumerate() {
            if index > 0 {
                self.bytes.push(b'\t');
            }
            match value {
                Arg::Text(Some(text)) => self.escaped(text),
                Arg::Uuid(value) => self.bytes.extend_from_slice(
                    value
                        .hyphenated()
                        .encode_lower(&mut uuid::Uuid::encode_buffer())
                        .as_bytes(),
                ),
                Arg::Int(Some(number)) => self
                    .bytes
                    .extend_from_slice(itoa::Buffer::new().format(*number).as_bytes()),
                Arg::Text(None) | Arg::Int(None) => self.bytes.extend_from_slice(b"\\N"),
            }
        }
        self.bytes.push(b'\n');
    }

    /// Copies the text in runs between the bytes that need escaping (most texts have none).
    fn escaped(&mut self, text: &str) {
        let bytes = text.as_bytes();
        let mut run = 0;
        for (at, byte) in bytes.iter().enumerate() {
            let escape: &[u8] = match byte {
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                _ => continue,
            };
            self.bytes.extend_from_slice(&bytes[run..at]);
            self.bytes.extend_from_slice(escape);
            run = at + 1;
        }
        self.bytes.extend_from_slice(&bytes[run..]);
    }
}

/// The fewest rows [`Conn::append_rows`] sends by `COPY`: below it, the extra round trip
/// of starting a copy costs more than the parse it saves (a live batch is a few dozen rows).
pub const COPY_MIN_ROWS: usize = 256;

/// Rows per message of a `COPY`: small enough that the server starts on the first while
/// the rest are made, large enough that a message carries many rows.
const COPY_CHUNK_ROWS: usize = 250;

/// `($first, ..), (..)`: placeholders for `rows` rows of `columns` parameters each, numbered
/// from `first`; both backends take `$n`.
pub fn value_rows(rows: usize, columns: usize, first: usize) -> String {
    let mut sql = String::with_capacity(rows * columns * 5);
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            sql.push('$');
            sql.push_str(&(first + row * columns + column).to_string());
        }
        sql.push(')');
    }
    sql
}

/// `$first, .., $(first + count - 1)`: the inside of an `IN (...)` list.
pub fn in_list(count: usize, first: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A secondary index of one copy of a read-model table.
pub struct Index {
    pub table: String,
    /// Appended to the table's name to name the index, so each copy's index has its own name
    /// and a swapped-in copy's can take the live one's.
    pub suffix: &'static str,
    pub columns: &'static str,
    pub unique: bool,
}

impl Index {
    pub fn name(&self) -> String {
        format!("{}{}", self.table, self.suffix)
    }

    pub fn create(&self) -> String {
        format!(
            "CREATE {}INDEX IF NOT EXISTS {} ON {} ({})",
            if self.unique { "UNIQUE " } else { "" },
            self.name(),
            self.table,
            self.columns
        )
    }
}

pub fn index(table: &str, suffix: &'static str, columns: &'static str) -> Index {
    Index {
        table: table.to_owned(),
        suffix,
        columns,
        unique: false,
    }
}

pub fn unique_index(table: &str, suffix: &'static str, columns: &'static str) -> Index {
    Index {
        unique: true,
        ..index(table, suffix, columns)
    }
}

/// Most rows one multi-row statement carries: keeps every statement within both backends'
/// parameter limits (SQLite: 32,766) for up to 16 columns.
pub const MAX_ROWS_PER_STATEMENT: usize = 2_000;

/// How many migrations SQLite's store records as applied; none before its table exists.
async fn applied_migrations(pool: &SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_or_a_busy_pool_is_about_the_connection_not_the_data() {
        let lost = || std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        for about_the_connection in [
            sqlx::Error::Io(lost()),
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
        ] {
            assert!(
                is_about_the_connection(&about_the_connection),
                "{about_the_connection}"
            );
        }
        for about_the_data in [
            sqlx::Error::RowNotFound,
            sqlx::Error::ColumnNotFound("x".into()),
            sqlx::Error::Protocol("unexpected".into()),
        ] {
            assert!(
                !is_about_the_connection(&about_the_data),
                "{about_the_data}"
            );
        }
    }

    #[tokio::test]
    async fn an_unsupported_url_is_refused_by_its_scheme_alone() {
        for (url, scheme) in [
            ("postgresq://admin:hunter2@db/orgs", "postgresq"),
            ("admin:hunter2@db/orgs", ""),
            ("a:hunter2@b://c", ""),
        ] {
            let error = Database::connect(url).await.unwrap_err().to_string();
            assert!(!error.contains("hunter2"), "{error}");
            assert!(error.contains(&format!("{scheme:?}")), "{error}");
        }
    }

    #[test]
    fn value_rows_numbers_parameters_row_by_row() {
        assert_eq!(value_rows(2, 3, 1), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(value_rows(1, 2, 4), "($4, $5)");
        assert_eq!(value_rows(0, 2, 1), "");
    }

    #[test]
    fn sqlite_takes_placeholders_in_order_as_plain_question_marks() {
        assert_eq!(
            sqlite_statement("INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)"),
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?)"
        );
        assert_eq!(
            sqlite_statement(
                "SELECT x FROM t WHERE j = json_extract(m, '$.key $9') AND \"c$2\" = $1 AND y = $2"
            ),
            "SELECT x FROM t WHERE j = json_extract(m, '$.key $9') AND \"c$2\" = ? AND y = ?"
        );
        let written_as_is = [
            "UPDATE t SET a = $2 WHERE id = $1",
            "SELECT * FROM t WHERE a = $1 OR b = $1",
            "SELECT * FROM t WHERE a = $2",
            "SELECT 1",
        ];
        for sql in written_as_is {
            assert!(
                matches!(sqlite_statement(sql), std::borrow::Cow::Borrowed(same) if same == sql),
                "{sql}"
            );
        }
        let rows = value_rows(2_000, 11, 1);
        assert_eq!(sqlite_statement(&rows).matches('?').count(), 22_000);
        assert!(!sqlite_statement(&rows).contains('$'));
    }

    #[test]
    fn copy_text_escapes_what_would_end_a_field_or_a_row() {
        let mut text = CopyText::default();
        text.row(&args!["a\tb\nc\\d\re", 7_i64, None::<String>]);
        text.row(&args!["", Some(-1_i64)]);
        text.row(&args!["\\ünï\ncode\t", i64::MIN]);
        assert_eq!(
            String::from_utf8(text.bytes).unwrap(),
            "a\\tb\\nc\\\\d\\re\t7\t\\N\n\t-1\n\\\\ünï\\ncode\\t\t-9223372036854775808\n"
        );
    }

    #[test]
    fn column_arrays_refuse_a_row_of_another_width_or_kind_naming_it() {
        let rows = |last: Vec<Arg>| {
            vec![
                Vec::from(args!["a", 1_i64]),
                Vec::from(args!["b", None::<i64>]),
                last,
            ]
        };
        let arrays = ColumnArrays::of(2, rows(Vec::from(args!["c", 3_i64]))).unwrap();
        assert_eq!(arrays.placeholders(), "$1::text[], $2::bigint[]");
        for wrong in [Vec::from(args!["c", "3"]), Vec::from(args!["c"])] {
            let refused = ColumnArrays::of(2, rows(wrong)).err();
            assert!(
                matches!(refused, Some((2, sqlx::Error::Encode(_)))),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn in_list_numbers_parameters_from_first() {
        assert_eq!(in_list(3, 2), "$2, $3, $4");
        assert_eq!(in_list(0, 1), "");
    }
}
