//! Service accounts, and the key-hash index that authenticates their requests in one lookup.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orgledger_domain::OrganizationEvent as E;
use serde::{Deserialize, Serialize};

use crate::db::{index, unique_index, Backend, Conn, Database, Index};
use crate::feed::RecordedEvent;
use crate::members::json_text;
use crate::projector::Projection;
use crate::{args, from_micros, to_micros};

pub struct ServiceAccountsProjection {
    name: String,
    table: String,
}

impl ServiceAccountsProjection {
    pub fn new(suffix: &str) -> Self {
        Self {
            name: format!("service_accounts{suffix}"),
            table: format!("rm_service_accounts{suffix}"),
        }
    }
}

#[async_trait]
impl Projection for ServiceAccountsProjection {
    fn name(&self) -> &str {
        &self.name
    }

    fn tables(&self) -> Vec<(&'static str, String)> {
        vec![("rm_service_accounts", self.table.clone())]
    }

    fn create_tables(&self, _backend: Backend) -> Vec<String> {
        let t = &self.table;
        vec![format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                    id TEXT PRIMARY KEY,
                    organization_id TEXT NOT NULL,
                    name TEXT NOT NULL,
                    description TEXT,
                    scopes TEXT NOT NULL,
                    key_prefix TEXT NOT NULL,
                    key_sha256 TEXT NOT NULL,
                    created_at_us BIGINT NOT NULL,
                    last_rotated_at_us BIGINT
                )"
        )]
    }

    fn indexes(&self) -> Vec<Index> {
        let t = &self.table;
        vec![
            index(t, "_by_organization", "organization_id, created_at_us"),
            unique_index(t, "_by_key", "key_sha256"),
        ]
    }

    async fn apply(&self, conn: &mut Conn<'_>, event: &RecordedEvent) -> Result<(), sqlx::Error> {
        let t = &self.table;
        let org = event.organization_id.as_str();
        match &event.event {
            E::ServiceAccountCreated(e) => {
                let scopes: Vec<&str> = e.scopes.iter().map(|s| s.as_str()).collect();
                let sql = format!(
                    "INSERT INTO {t} (id, organization_id, name, description, scopes, key_prefix,
                                      key_sha256, created_at_us)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING"
                );
                let args = args![
                    e.service_account_id.to_string(),
                    org,
                    &e.name,
                    &e.description,
                    json_text(&scopes),
                    &e.key_prefix,
                    &e.key_sha256,
                    to_micros(e.created_at)
                ];
                conn.execute(&sql, &args).await?;
            }
            E::ServiceAccountKeyRotated(e) => {
                let sql = format!(
                    "UPDATE {t} SET key_prefix = $2, key_sha256 = $3, last_rotated_at_us = $4 WHERE id = $1"
                );
                let args = args![
                    e.service_account_id.to_string(),
                    &e.key_prefix,
                    &e.key_sha256,
                    to_micros(e.rotated_at)
                ];
                conn.execute(&sql, &args).await?;
            }
            E::ServiceAccountDeleted(e) => {
                conn.execute(
                    &format!("DELETE FROM {t} WHERE id = $1"),
                    &args![e.service_account_id.to_string()],
                )
                .await?;
            }
            E::OrganizationPurged(_) => {
                conn.execute(
                    &format!("DELETE FROM {t} WHERE organization_id = $1"),
                    &args![org],
                )
                .await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// A service account as shown: never its key or the key's hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceAccountView {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub scopes: Vec<String>,
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_rotated_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct AccountRow {
    id: String,
    organization_id: String,
    name: String,
    description: Option<String>,
    scopes: String,
    key_prefix: String,
    created_at_us: i64,
    last_rotated_at_us: Option<i64>,
}

impl From<AccountRow> for ServiceAccountView {
    fn from(row: AccountRow) -> Self {
        Self {
            id: row.id,
            name: row.name,
            description: row.description,
            scopes: serde_json::from_str(&row.scopes).unwrap_or_default(),
            key_prefix: row.key_prefix,
            created_at: from_micros(row.created_at_us),
            last_rotated_at: row.last_rotated_at_us.map(from_micros),
        }
    }
}

const COLUMNS: &str =
    "id, organization_id, name, description, scopes, key_prefix, created_at_us, last_rotated_at_us";

pub async fn list(
    database: &Database,
    organization_id: &str,
) -> Result<Vec<ServiceAccountView>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM rm_service_accounts WHERE organization_id = $1 ORDER BY created_at_us, id"
    );
    let rows: Vec<AccountRow> = crate::with_pool!(database, pool => {
        sqlx::query_as(&sql).bind(organization_id).fetch_all(pool).await?
    });
    Ok(rows.into_iter().map(Into::into).collect())
}

/// The account holding a key (by the key's hash) and its organization: one indexed lookup.
pub async fn by_key(
    database: &Database,
    key_sha256: &str,
) -> Result<Option<(String, ServiceAccountView)>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM rm_service_accounts WHERE key_sha256 = $1");
    let row: Option<AccountRow> = crate::with_pool!(database, pool => {
        sqlx::query_as(&sql).bind(key_sha256).fetch_optional(pool).await?
    });
    Ok(row.map(|row| (row.organization_id.clone(), row.into())))
}
