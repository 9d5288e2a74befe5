//! Per-organization data keys, wrapped by the master key and stored in `organization_keys`.
//! Destroying an organization's key is what erases its personal data (crypto-shredding).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use super::{DataKey, Database, EventMacKey, StoreError};

/// How long an unwrapped key is reused in this process. Purge evicts it here at once;
/// another process may still hold it in memory (never on disk) for at most this long.
const CACHE_TTL: Duration = Duration::from_secs(10);

/// The key that wraps every data key. It comes from configuration and never enters the
/// database.
#[derive(Clone, Debug)]
pub struct MasterKey(DataKey);

impl MasterKey {
    pub fn generate() -> Self {
        Self(DataKey::generate())
    }

    /// Parses 32 bytes in standard base64.
    pub fn from_base64(encoded: &str) -> Option<Self> {
        let bytes = BASE64.decode(encoded.trim()).ok()?;
        DataKey::from_bytes(&bytes).map(Self)
    }

    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0.as_bytes())
    }
}

/// Unwrapped keys, and the organizations whose key this process destroyed: a destroyed key
/// never comes back into the cache, even from a read that raced with its destruction.
#[derive(Default)]
struct KeyCache {
    keys: HashMap<String, (Instant, DataKey)>,
    destroyed: HashSet<String>,
}

#[derive(Clone)]
pub struct DataKeys {
    database: Database,
    master: MasterKey,
    event_macs: EventMacKey,
    cache: Arc<Mutex<KeyCache>>,
}

impl DataKeys {
    pub fn new(database: Database, master: MasterKey) -> Self {
        Self {
            database,
            event_macs: EventMacKey::derive(master.0.as_bytes()),
            master,
            cache: Arc::default(),
        }
    }

    /// The organization's key, or `None` once it has been destroyed (or never existed).
    pub async fn get(&self, organization_id: &str) -> Result<Option<DataKey>, StoreError> {
        if self.is_destroyed(organization_id) {
            return Ok(None);
        }
        if let Some(key) = self.cached(organization_id) {
            return Ok(Some(key));
        }
        let wrapped = self.load_wrapped(organization_id).await?;
        let Some(wrapped) = wrapped else {
            return Ok(None);
        };
        let key = self.unwrap_key(organization_id, &wrapped)?;
        self.remember(organization_id, &key);
        Ok(Some(key))
    }

    /// The organization's key, created on first use. Only the first event of an
    /// organization may create one: a destroyed key never comes back.
    pub async fn get_or_create(&self, organization_id: &str) -> Result<DataKey, StoreError> {
        if let Some(key) = self.get(organization_id).await? {
            return Ok(key);
        }
        let key = DataKey::generate();
        let wrapped = self
            .master
            .0
            .encrypt(key.as_bytes(), organization_id.as_bytes());
        match &self.database {
            Database::Postgres(pool) => {
                sqlx::query(
                    "INSERT INTO organization_keys (organization_id, wrapped_key) VALUES ($1, $2)
                     ON CONFLICT (organization_id) DO NOTHING",
                )
                .bind(organization_id)
                .bind(&wrapped)
                .execute(pool)
                .await?;
            }
            Database::Sqlite(pool) => {
                sqlx::query(
                    "INSERT INTO organization_keys (organization_id, wrapped_key) VALUES (?1, ?2)
                     ON CONFLICT (organization_id) DO NOTHING",
                )
                .bind(organization_id)
                .bind(&wrapped)
                .execute(pool)
                .await?;
            }
        }
        // A concurrent creator may have won; whichever key is stored is the key.
        self.get(organization_id)
            .await?
            .ok_or_else(|| StoreError::Integrity(format!("data key of {organization_id} vanished")))
    }

    /// The key every event's MAC is made with, derived from the master key.
    pub fn event_macs(&self) -> &EventMacKey {
        &self.event_macs
    }

    /// Seals a blob that is not an organization's (e.g. a stored response holding a token
    /// shown once) with the master key itself, bound to `purpose`.
    pub fn seal_blob(&self, purpose: &str, plaintext: &[u8]) -> Vec<u8> {
        self.master.0.encrypt(plaintext, purpose.as_bytes())
    }

    pub fn open_blob(&self, purpose: &str, sealed: &[u8]) -> Result<Vec<u8>, StoreError> {
        Ok(self.master.0.decrypt(sealed, purpose.as_bytes())?)
    }

    /// Destroys the organization's key. Idempotent.
    pub async fn destroy(&self, organization_id: &str) -> Result<(), StoreError> {
        {
            let mut cache = self.cache.lock().expect("key cache poisoned");
            cache.keys.remove(organization_id);
            cache.destroyed.insert(organization_id.to_owned());
        }
        match &self.database {
            Database::Postgres(pool) => {
                sqlx::query("DELETE FROM organization_keys WHERE organization_id = $1")
                    .bind(organization_id)
                    .execute(pool)
                    .await?;
            }
            Database::Sqlite(pool) => {
                sqlx::query("DELETE FROM organization_keys WHERE organization_id = ?1")
                    .bind(organization_id)
                    .execute(pool)
                    .await?;
            }
        }
        Ok(())
    }

    fn is_destroyed(&self, organization_id: &str) -> bool {
        let cache = self.cache.lock().expect("key cache poisoned");
        cache.destroyed.contains(organization_id)
    }

    fn cached(&self, organization_id: &str) -> Option<DataKey> {
        let cache = self.cache.lock().expect("key cache poisoned");
        cache
            .keys
            .get(organization_id)
            .filter(|(at, _)| at.elapsed() < CACHE_TTL)
            .map(|(_, key)| key.clone())
    }

    fn remember(&self, organization_id: &str, key: &DataKey) {
        let mut cache = self.cache.lock().expect("key cache poisoned");
        if cache.destroyed.contains(organization_id) {
            return;
        }
        if cache.keys.len() > 10_000 {
            cache.keys.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
        }
        cache
            .keys
            .insert(organization_id.to_owned(), (Instant::now(), key.clone()));
    }

    async fn load_wrapped(&self, organization_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let wrapped = match &self.database {
            Database::Postgres(pool) => {
                sqlx::query_scalar(
                    "SELECT wrapped_key FROM organization_keys WHERE organization_id = $1",
                )
                .bind(organization_id)
                .fetch_optional(pool)
                .await?
            }
            Database::Sqlite(pool) => {
                sqlx::query_scalar(
                    "SELECT wrapped_key FROM organization_keys WHERE organization_id = ?1",
                )
                .bind(organization_id)
                .fetch_optional(pool)
                .await?
            }
        };
        Ok(wrapped)
    }

    /// Refuses a master key that does not open the stored organization keys (one is tried;
    /// one master key wraps them all). A mistyped key would otherwise seal new
    /// organizations under itself and fail on every old one, and the projections would
    /// stall on the first event they cannot open once the right key is back. False when
    /// there was none to try (no organization, or every one purged).
    pub async fn verify_master_key(&self) -> Result<bool, StoreError> {
        const SAMPLE: &str =
            "SELECT organization_id, wrapped_key FROM organization_keys ORDER BY organization_id LIMIT 1";
        let sample: Option<(String, Vec<u8>)> = match &self.database {
            Database::Postgres(pool) => sqlx::query_as(SAMPLE).fetch_optional(pool).await?,
            Database::Sqlite(pool) => sqlx::query_as(SAMPLE).fetch_optional(pool).await?,
        };
        match sample {
            Some((organization_id, wrapped))
                if self.unwrap_key(&organization_id, &wrapped).is_err() =>
            {
                Err(StoreError::Integrity(
                    "the master key does not open this database's organization keys: \
                     ORGLEDGER_MASTER_KEY must be the key the database was created with"
                        .to_owned(),
                ))
            }
            sample => Ok(sample.is_some()),
        }
    }

    fn unwrap_key(&self, organization_id: &str, wrapped: &[u8]) -> Result<DataKey, StoreError> {
        let bytes = self.master.0.decrypt(wrapped, organization_id.as_bytes())?;
        DataKey::from_bytes(&bytes).ok_or_else(|| {
            StoreError::Integrity(format!("data key of {organization_id} has a bad length"))
        })
    }
}
