//! Typed configuration: every setting is an environment variable and a flag of the same name.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use crate::store::MasterKey;

/// Where the data lives and the key that protects it. `Debug` hides the URL's password and the
/// key.
#[derive(Clone, Args)]
pub struct StoreConfig {
    /// `postgres://...` for PostgreSQL, `sqlite://PATH` for the embedded store (`serve` and
    /// `migrate` create a missing file; the other commands refuse it).
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://orgledger.db"
    )]
    pub database_url: String,

    /// Base64 of 32 random bytes (`orgledger master-key` makes one). It wraps every
    /// organization's data key. Required with PostgreSQL; with SQLite it is generated on first
    /// start and kept in `<database file>.master-key`.
    #[arg(
        long = "orgledger-master-key",
        visible_alias = "master-key",
        global = true,
        env = "ORGLEDGER_MASTER_KEY",
        hide_env_values = true
    )]
    pub master_key: Option<String>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("master_key", &self.master_key.as_ref().map(|_| "***"))
            .finish()
    }
}

impl StoreConfig {
    pub fn is_sqlite(&self) -> bool {
        self.database_url.starts_with("sqlite:")
    }

    /// The SQLite database file, if this is the embedded store.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        let rest = self.database_url.strip_prefix("sqlite:")?;
        let path = rest.trim_start_matches("//");
        let path = path.split('?').next().unwrap_or(path);
        (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
    }

    /// A file kept beside the SQLite database: `orgledger.db` → `orgledger.db.<suffix>`.
    pub fn beside_data(&self, suffix: &str) -> Option<PathBuf> {
        self.sqlite_path().map(|path| {
            let mut name = path.into_os_string();
            name.push(format!(".{suffix}"));
            PathBuf::from(name)
        })
    }

    /// The configured master key; for SQLite, the one kept beside the data, or a new one the
    /// caller keeps ([`GeneratedKey::keep`]) once the store has taken it.
    pub fn master_key(&self) -> anyhow::Result<(MasterKey, Option<GeneratedKey>)> {
        self.master_key_making(true)
    }

    /// Refuses, before anything is opened or created, a store no command could open: an
    /// unsupported URL, an SQLite URL that names no file, a PostgreSQL store without its
    /// master key (a command refused for want of it then leaves the store as it was).
    pub fn refuse_unopenable(&self) -> anyhow::Result<()> {
        if self.beside_data("master-key").is_none() {
            self.existing_master_key()?;
        }
        Ok(())
    }

    /// As [`StoreConfig::master_key`], but never creating one: for commands that only read.
    pub fn existing_master_key(&self) -> anyhow::Result<MasterKey> {
        self.master_key_making(false).map(|(key, _)| key)
    }

    fn master_key_making(&self, create: bool) -> anyhow::Result<(MasterKey, Option<GeneratedKey>)> {
        let postgres = ["postgres:", "postgresql:"]
            .iter()
            .any(|scheme| self.database_url.starts_with(scheme));
        if !postgres && !self.is_sqlite() {
            bail!(
                "unsupported DATABASE_URL {:?}: use postgres://... or sqlite://PATH",
                redact_url(&self.database_url)
            );
        }
        if self.is_sqlite() && self.sqlite_path().is_none() {
            // sqlx would open a store in memory, one per connection: migrated on one, empty on
            // the next, and gone at exit.
            bail!(
                "{} names no file: use sqlite://PATH",
                redact_url(&self.database_url)
            );
        }
        if let Some(encoded) = &self.master_key {
            let key = MasterKey::from_base64(encoded)
                .context("ORGLEDGER_MASTER_KEY must be base64 of exactly 32 bytes")?;
            // Two keys for one store: data sealed under the configured one would not open
            // under the kept one, the one backed up beside the data, at a later start. Said,
            // not refused: the store refuses a key that does not open its data, and a stale
            // file beside a store sealed under the configured key is no fault.
            let kept = self
                .beside_data("master-key")
                .and_then(|path| Some((std::fs::read_to_string(&path).ok()?, path)));
            if let Some((kept, path)) = kept {
                if MasterKey::from_base64(&kept)
                    .is_some_and(|kept| kept.to_base64() != key.to_base64())
                {
                    tracing::warn!(
                        path = %path.display(),
                        "ORGLEDGER_MASTER_KEY is not the master key kept beside the data: what is \
                         sealed under one does not open under the other; keep one of them"
                    );
                }
            }
            return Ok((key, None));
        }
        let Some(path) = self.beside_data("master-key") else {
            bail!(
                "ORGLEDGER_MASTER_KEY is required with {}: generate one with `orgledger master-key`",
                redact_url(&self.database_url)
            );
        };
        if path.exists() {
            let encoded = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            return MasterKey::from_base64(&encoded)
                .with_context(|| format!("{} does not hold a valid master key", path.display()))
                .map(|key| (key, None));
        }
        if !create {
            bail!(
                "no master key: ORGLEDGER_MASTER_KEY is unset and {} does not exist",
                path.display()
            );
        }
        let key = MasterKey::generate();
        let generated = GeneratedKey {
            encoded: key.to_base64(),
            path,
        };
        Ok((key, Some(generated)))
    }
}

/// A master key generated for a SQLite store without a key file. It is written only once
/// the store has taken it: a store written under another key (its file lost) refuses it, and
/// must not be left beside a file that does not open it.
pub struct GeneratedKey {
    path: PathBuf,
    encoded: String,
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl GeneratedKey {
    /// Writes the key beside the data. `Ok(false)`: another process started on the same new
    /// store (a `migrate` beside a `serve`) kept its own key first; this one is not kept, and
    /// the caller must reopen the store with the kept one.
    pub fn keep(self) -> anyhow::Result<bool> {
        match write_secret_file(&self.path, &self.encoded)? {
            Written::Now => {
                tracing::warn!(path = %self.path.display(), "generated a new master key; back it up with the database");
                Ok(true)
            }
            Written::Before => Ok(false),
        }
    }

    /// True once another process has kept its own key where this one would go.
    pub fn kept_elsewhere(&self) -> bool {
        self.path.exists()
    }
}

/// Where the platform tokens come from.
#[derive(Debug, PartialEq, Eq)]
pub enum PlatformTokenSource {
    /// Configured (`ORGLEDGER_API_TOKEN`), or generated for a SQLite store and kept in a
    /// file beside it (`<database file>.api-token`).
    Tokens(Vec<String>),
    /// PostgreSQL with none configured: generated once and kept beside the data, in the
    /// database that every process serving it shares (see [`platform_tokens_kept_in`]).
    /// `legacy` is where earlier versions kept it: their working directory.
    KeptInDatabase { legacy: PathBuf },
}

/// The platform tokens: configured, or generated once, printed once and kept beside the
/// data.
pub fn platform_tokens(
    store: &StoreConfig,
    configured: Option<&str>,
) -> anyhow::Result<PlatformTokenSource> {
    if let Some(list) = configured {
        let tokens: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .map(str::to_owned)
            .collect();
        if tokens.is_empty() {
            bail!("ORGLEDGER_API_TOKEN is set but holds no token");
        }
        return Ok(PlatformTokenSource::Tokens(tokens));
    }
    let legacy = PathBuf::from(LEGACY_TOKEN_FILE);
    let Some(path) = store.beside_data("api-token") else {
        return Ok(PlatformTokenSource::KeptInDatabase { legacy });
    };
    if path.exists() {
        if legacy.exists() {
            tracing::warn!(
                path = %legacy.display(),
                "ignoring the platform token an earlier version kept in the working directory: this store keeps its own"
            );
        }
        return kept_platform_token(&path).map(PlatformTokenSource::Tokens);
    }
    // One an earlier version kept in the working directory is adopted by a store that keeps
    // none yet, once: the file is then renamed, so that deleting the kept one to replace a
    // leaked token generates a new one rather than adopting the old one again.
    let legacy_token = legacy_platform_token(&legacy);
    let token = legacy_token
        .clone()
        .unwrap_or_else(|| crate::tokens::issue("olg").secret);
    match write_secret_file(&path, &token)? {
        Written::Now if legacy_token.is_some() => {
            let mut adopted = legacy.clone().into_os_string();
            adopted.push(".adopted");
            if let Err(error) = std::fs::rename(&legacy, &adopted) {
                tracing::warn!(%error, path = %legacy.display(), "could not rename the adopted platform token file");
            }
            tracing::warn!(
                from = %legacy.display(),
                to = %path.display(),
                "adopted the platform token an earlier version kept in the working directory"
            );
            Ok(PlatformTokenSource::Tokens(vec![token]))
        }
        Written::Now => {
            show_generated_token(&format!(
                "Generated a platform token (shown once; kept in {}):\n{token}",
                path.display()
            ));
            Ok(PlatformTokenSource::Tokens(vec![token]))
        }
        // Another process on the same new store generated one first: it is the one kept.
        Written::Before => kept_platform_token(&path).map(PlatformTokenSource::Tokens),
    }
}

/// Where versions before the token was kept beside the data kept a generated one.
const LEGACY_TOKEN_FILE: &str = "orgledger.api-token";

/// The token in `legacy`, if it holds one; a file that cannot be read is passed over.
fn legacy_platform_token(legacy: &std::path::Path) -> Option<String> {
    if !legacy.exists() {
        return None;
    }
    match kept_platform_token(legacy) {
        Ok(mut tokens) => tokens.pop(),
        Err(error) => {
            tracing::warn!(%error, "ignoring a platform token file an earlier version kept");
            None
        }
    }
}

/// PostgreSQL: the SHA-256 of the platform token generated for this database, which every
/// process serving it accepts, whatever its working directory; generated, its digest kept
/// and the token printed once, by the one process whose digest the database took. The token
/// itself is never stored: lost, it is replaced by deleting the `generated_platform_token`
/// row (a new one is generated at the next start), or by configuring `ORGLEDGER_API_TOKEN`.
///
/// `legacy` is where earlier versions kept a generated token: their working directory. One
/// found there is adopted when the database keeps none yet, and otherwise still accepted by
/// this process, as before the upgrade, with a warning when it is not the one kept.
pub async fn platform_tokens_kept_in(
    database: &orgledger_projections::Database,
    legacy: &std::path::Path,
) -> anyhow::Result<Vec<[u8; 32]>> {
    let orgledger_projections::Database::Postgres(pool) = database else {
        bail!("a SQLite store keeps its platform token in a file beside it");
    };
    let legacy_token = legacy_platform_token(legacy);
    let kept = "SELECT token_sha256 FROM generated_platform_token WHERE id = 1";
    let mut kept_digest: Option<String> = sqlx::query_scalar(kept).fetch_optional(pool).await?;
    if kept_digest.is_none() {
        let token = legacy_token
            .clone()
            .unwrap_or_else(|| crate::tokens::issue("olg").secret);
        let taken = sqlx::query(
            "INSERT INTO generated_platform_token (id, token_sha256) VALUES (1, $1)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(crate::tokens::sha256_hex(&token))
        .execute(pool)
        .await?
        .rows_affected()
            == 1;
        if taken && legacy_token.is_none() {
            show_generated_token(&format!(
                "Generated a platform token (shown once; the database keeps only its SHA-256):\n{token}"
            ));
        }
        kept_digest = Some(sqlx::query_scalar(kept).fetch_one(pool).await?);
    }
    let digest = |hex_digest: &str| -> anyhow::Result<[u8; 32]> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_digest.trim(), &mut digest)
            .context("the generated_platform_token row does not hold a SHA-256")?;
        Ok(digest)
    };
    let mut digests = vec![digest(kept_digest.as_deref().unwrap_or_default())?];
    if let Some(token) = legacy_token {
        let legacy_digest = digest(&crate::tokens::sha256_hex(&token))?;
        if legacy_digest != digests[0] {
            tracing::warn!(
                path = %legacy.display(),
                "the platform token in this file is not the one the database keeps: accepted by this process only"
            );
            digests.push(legacy_digest);
        }
    }
    tracing::info!("using the platform token generated for this database");
    Ok(digests)
}

fn kept_platform_token(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let token =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        // Served with it, every request would be refused as unauthenticated.
        bail!(
            "{} holds no platform token: remove it to have one generated, or set ORGLEDGER_API_TOKEN",
            path.display()
        );
    }
    tracing::info!(path = %path.display(), "using the platform token kept beside the data");
    Ok(vec![token.to_owned()])
}

/// Whether [`write_secret_file`] wrote the file, or found one there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Now,
    Before,
}

/// How secret files written aside are named, until they are linked into place.
const WRITTEN_ASIDE: &str = ".orgledger-secret";

const ASIDE_RANDOM_CHARACTERS: usize = 6;

/// An aside file older than this was left by a crash: writing one takes milliseconds.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// Writes a file readable by its owner only, unless one is already there. It appears whole
/// or not at all (written aside, then linked into place): a process starting beside this
/// one never reads it empty or half-written.
pub fn write_secret_file(path: &std::path::Path, contents: &str) -> anyhow::Result<Written> {
    use std::io::Write;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => std::path::Path::new("."),
    };
    remove_abandoned_secret_files(directory);
    // `tempfile` creates it readable by its owner only.
    let mut file = tempfile::Builder::new()
        .prefix(WRITTEN_ASIDE)
        .rand_bytes(ASIDE_RANDOM_CHARACTERS)
        .tempfile_in(directory)
        .with_context(|| format!("creating a file in {}", directory.display()))?;
    file.write_all(contents.as_bytes())?;
    file.as_file().sync_all()?;
    match file.persist_noclobber(path) {
        Ok(_) => {
            // The link itself is durable once the directory is.
            #[cfg(unix)]
            std::fs::File::open(directory)
                .and_then(|directory| directory.sync_all())
                .with_context(|| format!("syncing {}", directory.display()))?;
            Ok(Written::Now)
        }
        Err(error) if error.error.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(Written::Before)
        }
        Err(error) => Err(error.error).with_context(|| format!("creating {}", path.display())),
    }
}

/// Removes the files a crash left written aside in `directory` (each holds a secret that was
/// never linked into place, so never used). Best effort: one that cannot be removed is left
/// for the next write.
fn remove_abandoned_secret_files(directory: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        // The names `write_secret_file` gives: the prefix and six random letters or
        // digits. Regular files only (the type as listed: links are not followed).
        let name = entry.file_name();
        let written_aside = name
            .to_str()
            .and_then(|name| name.strip_prefix(WRITTEN_ASIDE))
            .is_some_and(|random| {
                random.len() == ASIDE_RANDOM_CHARACTERS
                    && random.bytes().all(|b| b.is_ascii_alphanumeric())
            });
        if !written_aside || !entry.file_type().is_ok_and(|kind| kind.is_file()) {
            continue;
        }
        let abandoned = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .ok()
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age >= ABANDONED_AFTER);
        if abandoned && std::fs::remove_file(entry.path()).is_ok() {
            tracing::info!(path = %entry.path().display(), "removed a secret file a crash left unfinished");
        }
    }
}

/// The URL without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    // libpq takes a password in the query string too (`?password=`, `?sslpassword=`).
    if let Some((base, query)) = url.split_once('?') {
        let query: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _))
                    if name.eq_ignore_ascii_case("password")
                        || name.eq_ignore_ascii_case("sslpassword") =>
                {
                    format!("{name}=***")
                }
                _ => pair.to_owned(),
            })
            .collect();
        return format!("{}?{}", redact_url(base), query.join("&"));
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Prints a generated platform token on standard output; one that cannot be printed (no
/// standard output) is logged as lost, never as itself, and the start goes on.
fn show_generated_token(message: &str) {
    use std::io::Write as _;
    if let Err(error) = writeln!(std::io::stdout().lock(), "{message}") {
        tracing::warn!(%error, "the generated platform token could not be printed: configure ORGLEDGER_API_TOKEN, or delete the kept token to have another generated at the next start");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(url: &str) -> StoreConfig {
        StoreConfig {
            database_url: url.to_owned(),
            master_key: None,
        }
    }

    #[test]
    fn files_beside_the_data_follow_the_sqlite_path() {
        assert_eq!(
            store("sqlite://data/org.db").beside_data("master-key"),
            Some(PathBuf::from("data/org.db.master-key"))
        );
        assert_eq!(
            store("sqlite:org.db?mode=rwc").sqlite_path(),
            Some(PathBuf::from("org.db"))
        );
        assert_eq!(
            store("postgres://localhost/x").beside_data("master-key"),
            None
        );
    }

    #[test]
    fn an_unsupported_url_is_named_before_any_key_is_asked_for() {
        let error = store("mysql://x").master_key().unwrap_err().to_string();
        assert!(error.contains("unsupported DATABASE_URL"), "{error}");
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("postgres://u:a@h/db?sslmode=require&password=b&SSLPASSWORD=c"),
            "postgres://u:***@h/db?sslmode=require&password=***&SSLPASSWORD=***"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
    }

    #[test]
    fn a_sqlite_url_without_a_file_is_refused() {
        for url in [
            "sqlite://",
            "sqlite:",
            "sqlite::memory:",
            "sqlite://?mode=rwc",
        ] {
            let mut store = store(url);
            let error = store.master_key().unwrap_err().to_string();
            assert!(error.contains("names no file"), "{url}: {error}");
            store.master_key = Some(MasterKey::generate().to_base64());
            assert!(store.existing_master_key().is_err(), "{url}");
        }
    }

    #[test]
    fn a_secret_file_is_written_once_whole_and_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("org.db.master-key");
        assert_eq!(write_secret_file(&path, "first").unwrap(), Written::Now);
        assert_eq!(write_secret_file(&path, "second").unwrap(), Written::Before);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "only its owner reads it");
        }
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            ["org.db.master-key"],
            "nothing written aside is left"
        );
    }

    #[test]
    fn secret_files_a_crash_left_written_aside_are_removed_by_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let aside = |name: &str, age: std::time::Duration| {
            let path = dir.path().join(name);
            let file = std::fs::File::create(&path).unwrap();
            file.set_modified(std::time::SystemTime::now() - age)
                .unwrap();
            path
        };
        let abandoned = aside(".orgledger-secretAbC123", ABANDONED_AFTER * 2);
        // Another process's, being written now: not touched.
        let in_progress = aside(".orgledger-secretXyZ789", std::time::Duration::ZERO);
        let unrelated = aside("org.db-wal", ABANDONED_AFTER * 2);
        let kept_by_hand = aside(".orgledger-secrets.bak", ABANDONED_AFTER * 2);
        let path = dir.path().join("org.db.api-token");
        assert_eq!(write_secret_file(&path, "token").unwrap(), Written::Now);
        assert!(!abandoned.exists(), "the abandoned one is removed");
        assert!(in_progress.exists(), "a recent one is another writer's");
        assert!(unrelated.exists(), "only secret files written aside");
        assert!(
            kept_by_hand.exists(),
            "only the names they are written aside under"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "token");
    }

    #[test]
    fn an_empty_platform_token_file_is_refused_not_served_with() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&format!("sqlite://{}/org.db", dir.path().display()));
        std::fs::write(dir.path().join("org.db.api-token"), " \n").unwrap();
        let error = platform_tokens(&store, None).unwrap_err().to_string();
        assert!(error.contains("holds no platform token"), "{error}");
    }

    #[test]
    fn a_generated_platform_token_is_kept_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&format!("sqlite://{}/org.db", dir.path().display()));
        let tokens = |configured| match platform_tokens(&store, configured).unwrap() {
            PlatformTokenSource::Tokens(tokens) => tokens,
            elsewhere => panic!("a SQLite store keeps its token in a file: {elsewhere:?}"),
        };
        let first = tokens(None);
        let kept = dir.path().join("org.db.api-token");
        assert_eq!(std::fs::read_to_string(&kept).unwrap(), first[0]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&kept).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "only its owner reads it");
        }
        assert_eq!(tokens(None), first, "reused on the next start");
        assert_eq!(tokens(Some(" a , b ,")), ["a", "b"]);
        assert!(platform_tokens(&store, Some(" , ")).is_err());
        assert_eq!(
            platform_tokens(&self::store("postgres://db/orgs"), None).unwrap(),
            PlatformTokenSource::KeptInDatabase {
                legacy: PathBuf::from(LEGACY_TOKEN_FILE)
            }
        );
    }

    #[test]
    fn postgres_without_a_master_key_is_refused() {
        let error = store("postgres://localhost/x").master_key().unwrap_err();
        assert!(error
            .to_string()
            .contains("ORGLEDGER_MASTER_KEY is required"));
    }
}
