//! The organization directory: one row per organization that is not purged.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orgledger_domain::OrganizationEvent as E;
use serde::{Deserialize, Serialize};

use crate::cursor::{contains_pattern, fold, paginate, Cursor, CursorError, List};
use crate::db::{index, value_rows, Arg, Backend, Conn, Database, Index, MAX_ROWS_PER_STATEMENT};
use crate::feed::RecordedEvent;
use crate::projector::Projection;
use crate::BatchMap;
use crate::{args, from_micros, to_micros, Page};

pub struct OrganizationsProjection {
    name: String,
    table: String,
    providers: String,
    roles: String,
}

impl OrganizationsProjection {
    pub fn new(suffix: &str) -> Self {
        Self {
            name: format!("organizations{suffix}"),
            table: format!("rm_organizations{suffix}"),
            providers: format!("rm_ai_providers{suffix}"),
            roles: format!("rm_roles{suffix}"),
        }
    }
}

const DEFAULT_CLIENT_ACCESS: &str = r#"{"default":"allow","clients":{}}"#;

#[async_trait]
impl Projection for OrganizationsProjection {
    fn name(&self) -> &str {
        &self.name
    }

    fn tables(&self) -> Vec<(&'static str, String)> {
        vec![
            ("rm_organizations", self.table.clone()),
            ("rm_ai_providers", self.providers.clone()),
            ("rm_roles", self.roles.clone()),
        ]
    }

    /// 3: `name_folded`, for `q` (see `cursor::fold`).
    fn schema_version(&self) -> i64 {
        3
    }

    fn create_tables(&self, _backend: Backend) -> Vec<String> {
        let t = &self.table;
        vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    id TEXT PRIMARY KEY,
                    name TEXT NOT NULL,
                    name_folded TEXT NOT NULL,
                    slug TEXT NOT NULL,
                    kind TEXT NOT NULL,
                    status TEXT NOT NULL,
                    created_at_us BIGINT NOT NULL,
                    deleted_at_us BIGINT,
                    purge_after_us BIGINT,
                    member_count BIGINT NOT NULL DEFAULT 0,
                    version BIGINT NOT NULL,
                    timezone TEXT NOT NULL,
                    logo_url TEXT,
                    workflow_mode TEXT NOT NULL,
                    default_invite_expiry_days BIGINT NOT NULL,
                    client_restrictions TEXT NOT NULL DEFAULT '{DEFAULT_CLIENT_ACCESS}',
                    smart_tool_routing BIGINT NOT NULL DEFAULT 0,
                    plan TEXT,
                    seats BIGINT
                )"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {providers} (
                    organization_id TEXT NOT NULL,
                    id TEXT NOT NULL,
                    name TEXT NOT NULL,
                    kind TEXT NOT NULL,
                    enabled BIGINT NOT NULL,
                    api_key_last4 TEXT NOT NULL,
                    PRIMARY KEY (organization_id, id)
                )",
                providers = self.providers
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {roles} (
                    organization_id TEXT NOT NULL,
                    key TEXT NOT NULL,
                    name TEXT NOT NULL,
                    permissions TEXT NOT NULL,
                    PRIMARY KEY (organization_id, key)
                )",
                roles = self.roles
            ),
        ]
    }

    fn indexes(&self) -> Vec<Index> {
        let t = &self.table;
        vec![
            index(t, "_by_created", "created_at_us, id"),
            index(t, "_by_purge", "status, purge_after_us"),
        ]
    }

    async fn apply(&self, conn: &mut Conn<'_>, event: &RecordedEvent) -> Result<(), sqlx::Error> {
        self.apply_all(conn, &[event])
            .await
            .map_err(|(_, error)| error)
    }

    /// Applies each event, then sets each organization's `version` once for the batch. Joins
    /// and departures move `member_count` once per organization for the batch: an addition
    /// commutes with every other change but its organization's creation and purge, which
    /// first flush the counts, so a count never lands before its organization's row exists
    /// or after it is gone.
    async fn apply_all(
        &self,
        conn: &mut Conn<'_>,
        events: &[&RecordedEvent],
    ) -> Result<(), (usize, sqlx::Error)> {
        // By organization: (value, index of the event it came from).
        let mut versions: BatchMap<&str, (i64, usize)> = BatchMap::default();
        let mut counts: BatchMap<&str, (i64, usize)> = BatchMap::default();
        for (index, event) in events.iter().enumerate() {
            let id = event.organization_id.as_str();
            let delta = match &event.event {
                E::MemberJoined(_) => 1,
                E::MemberRemoved(_) | E::MemberLeft(_) => -1,
                _ => 0,
            };
            if delta == 0 {
                let creates_or_purges = matches!(
                    event.event,
                    E::OrganizationCreated(_) | E::OrganizationPurged(_)
                );
                if creates_or_purges && counts.contains_key(id) {
                    self.move_member_counts(conn, &mut counts).await?;
                }
                self.change(conn, event)
                    .await
                    .map_err(|error| (index, error))?;
            } else {
                counts.entry(id).or_insert((0, index)).0 += delta;
            }
            versions.insert(id, (event.sequence, index));
        }
        self.move_member_counts(conn, &mut counts).await?;
        self.update_each(conn, "version = moved.value", &versions)
            .await
    }
}

impl OrganizationsProjection {
    /// Applies and clears pending member_count deltas (with their first event's index).
    async fn move_member_counts(
        &self,
        conn: &mut Conn<'_>,
        counts: &mut BatchMap<&str, (i64, usize)>,
    ) -> Result<(), (usize, sqlx::Error)> {
        self.update_each(conn, "member_count = member_count + moved.value", counts)
            .await?;
        counts.clear();
        Ok(())
    }

    /// Applies `assignment` (over `moved.value`) to each organization's `(value, event
    /// index)` in one statement per chunk, not one per organization.
    async fn update_each(
        &self,
        conn: &mut Conn<'_>,
        assignment: &str,
        rows: &BatchMap<&str, (i64, usize)>,
    ) -> Result<(), (usize, sqlx::Error)> {
        let t = &self.table;
        let rows: Vec<(&str, i64, usize)> = rows
            .iter()
            .map(|(id, (value, index))| (*id, *value, *index))
            .collect();
        for chunk in rows.chunks(MAX_ROWS_PER_STATEMENT) {
            let sql = format!(
                "WITH moved (id, value) AS (VALUES {})
                 UPDATE {t} SET {assignment} FROM moved WHERE {t}.id = moved.id",
                value_rows(chunk.len(), 2, 1)
            );
            let args: Vec<Arg> = chunk
                .iter()
                .flat_map(|(id, value, _)| args![*id, *value])
                .collect();
            let first = chunk.iter().map(|(_, _, index)| *index).min().unwrap_or(0);
            conn.execute(&sql, &args)
                .await
                .map_err(|error| (first, error))?;
        }
        Ok(())
    }

    /// What one event changes, except `version` (set per batch by `apply_all`) and
    /// `member_count` (moved per run by `apply_all`).
    async fn change(&self, conn: &mut Conn<'_>, event: &RecordedEvent) -> Result<(), sqlx::Error> {
        let t = &self.table;
        let id = event.organization_id.as_str();
        match &event.event {
            E::OrganizationCreated(e) => {
                let sql = format!(
                    "INSERT INTO {t} (id, name, slug, kind, status, created_at_us, version,
                                      timezone, logo_url, workflow_mode, default_invite_expiry_days,
                                      name_folded)
                     VALUES ($1, $2, $3, $4, 'active', $5, $6, $7, $8, $9, $10, $11)
                     ON CONFLICT (id) DO NOTHING"
                );
                let args = args![
                    id,
                    &e.name,
                    &e.slug,
                    enum_text(&e.kind),
                    to_micros(e.created_at),
                    event.sequence,
                    &e.settings.timezone,
                    &e.settings.logo_url,
                    enum_text(&e.settings.workflow_mode),
                    i64::from(e.settings.default_invite_expiry_days),
                    fold(&e.name)
                ];
                conn.execute(&sql, &args).await?;
                return Ok(());
            }
            E::OrganizationUpdated(e) => {
                if let Some(change) = &e.name {
                    set(conn, t, id, "name", &change.to).await?;
                    set(conn, t, id, "name_folded", &fold(&change.to)).await?;
                }
                if let Some(change) = &e.slug {
                    set(conn, t, id, "slug", &change.to).await?;
                }
                if let Some(change) = &e.timezone {
                    set(conn, t, id, "timezone", &change.to).await?;
                }
                if let Some(change) = &e.logo_url {
                    let sql = format!("UPDATE {t} SET logo_url = $2 WHERE id = $1");
                    conn.execute(&sql, &args![id, &change.to]).await?;
                }
                if let Some(change) = &e.workflow_mode {
                    set(conn, t, id, "workflow_mode", &enum_text(&change.to)).await?;
                }
                if let Some(change) = &e.default_invite_expiry_days {
                    let sql =
                        format!("UPDATE {t} SET default_invite_expiry_days = $2 WHERE id = $1");
                    conn.execute(&sql, &args![id, i64::from(change.to)]).await?;
                }
            }
            E::OrganizationDeleted(e) => {
                let sql = format!(
                    "UPDATE {t} SET status = 'deleted', deleted_at_us = $2, purge_after_us = $3
                      WHERE id = $1"
                );
                let args = args![id, to_micros(e.deleted_at), to_micros(e.purge_after)];
                conn.execute(&sql, &args).await?;
            }
            E::OrganizationRestored(_) => {
                let sql = format!(
                    "UPDATE {t} SET status = 'active', deleted_at_us = NULL, purge_after_us = NULL
                      WHERE id = $1"
                );
                conn.execute(&sql, &args![id]).await?;
            }
            E::OrganizationPurged(_) => {
                conn.execute(&format!("DELETE FROM {t} WHERE id = $1"), &args![id])
                    .await?;
                for table in [&self.providers, &self.roles] {
                    let sql = format!("DELETE FROM {table} WHERE organization_id = $1");
                    conn.execute(&sql, &args![id]).await?;
                }
                return Ok(());
            }
            E::ClientRestrictionsChanged(e) => {
                let sql = format!("UPDATE {t} SET client_restrictions = $2 WHERE id = $1");
                let json = serde_json::to_string(&e.to).expect("settings serialize");
                conn.execute(&sql, &args![id, json]).await?;
            }
            E::SmartToolRoutingChanged(e) => {
                let sql = format!("UPDATE {t} SET smart_tool_routing = $2 WHERE id = $1");
                conn.execute(&sql, &args![id, i64::from(e.enabled.to)])
                    .await?;
            }
            E::PlanChanged(e) => {
                let sql = format!("UPDATE {t} SET plan = $2, seats = $3 WHERE id = $1");
                let args = args![id, e.plan.to.clone(), e.seats.to.map(i64::from)];
                conn.execute(&sql, &args).await?;
            }
            E::AiProviderAdded(e) => {
                let sql = format!(
                    "INSERT INTO {} (organization_id, id, name, kind, enabled, api_key_last4)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (organization_id, id) DO NOTHING",
                    self.providers
                );
                let args = args![
                    id,
                    e.provider_id.to_string(),
                    &e.name,
                    &e.kind,
                    i64::from(e.enabled),
                    &e.api_key_last4
                ];
                conn.execute(&sql, &args).await?;
            }
            E::AiProviderUpdated(e) => {
                if let Some(change) = &e.enabled {
                    let sql = format!(
                        "UPDATE {} SET enabled = $3 WHERE organization_id = $1 AND id = $2",
                        self.providers
                    );
                    conn.execute(
                        &sql,
                        &args![id, e.provider_id.to_string(), i64::from(change.to)],
                    )
                    .await?;
                }
                if let Some(change) = &e.api_key_last4 {
                    let sql = format!(
                        "UPDATE {} SET api_key_last4 = $3 WHERE organization_id = $1 AND id = $2",
                        self.providers
                    );
                    conn.execute(&sql, &args![id, e.provider_id.to_string(), &change.to])
                        .await?;
                }
            }
            E::AiProviderRemoved(e) => {
                let sql = format!(
                    "DELETE FROM {} WHERE organization_id = $1 AND id = $2",
                    self.providers
                );
                conn.execute(&sql, &args![id, e.provider_id.to_string()])
                    .await?;
            }
            E::RoleDefined(e) => {
                let permissions: Vec<&str> = e
                    .permissions
                    .iter()
                    .filter_map(|p| p.grantable_name())
                    .collect();
                let sql = format!(
                    "INSERT INTO {} (organization_id, key, name, permissions) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (organization_id, key) DO NOTHING",
                    self.roles
                );
                let args = args![
                    id,
                    &e.key,
                    &e.name,
                    serde_json::to_string(&permissions).expect("names serialize")
                ];
                conn.execute(&sql, &args).await?;
            }
            E::RoleDeleted(e) => {
                let sql = format!(
                    "DELETE FROM {} WHERE organization_id = $1 AND key = $2",
                    self.roles
                );
                conn.execute(&sql, &args![id, &e.key]).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

async fn set(
    conn: &mut Conn<'_>,
    table: &str,
    id: &str,
    column: &str,
    value: &str,
) -> Result<(), sqlx::Error> {
    let sql = format!("UPDATE {table} SET {column} = $2 WHERE id = $1");
    conn.execute(&sql, &args![id, value]).await?;
    Ok(())
}

/// A unit enum's serde name (`Team` → `team`).
pub(crate) fn enum_text<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => text,
        other => unreachable!("a unit enum serializes to a string, got {other:?}"),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettingsView {
    pub timezone: String,
    pub logo_url: Option<String>,
    pub workflow_mode: String,
    pub default_invite_expiry_days: i64,
    pub client_restrictions: serde_json::Value,
    pub smart_tool_routing: bool,
    pub plan: Option<String>,
    pub seats: Option<i64>,
}

/// An organization as the contract shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrganizationView {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub kind: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub purge_after: Option<DateTime<Utc>>,
    pub member_count: i64,
    pub version: i64,
    pub settings: SettingsView,
}

#[derive(sqlx::FromRow)]
struct OrganizationRow {
    id: String,
    name: String,
    slug: String,
    kind: String,
    status: String,
    created_at_us: i64,
    deleted_at_us: Option<i64>,
    purge_after_us: Option<i64>,
    member_count: i64,
    version: i64,
    timezone: String,
    logo_url: Option<String>,
    workflow_mode: String,
    default_invite_expiry_days: i64,
    client_restrictions: String,
    smart_tool_routing: i64,
    plan: Option<String>,
    seats: Option<i64>,
}

impl From<OrganizationRow> for OrganizationView {
    fn from(row: OrganizationRow) -> Self {
        Self {
            id: row.id,
            name: row.name,
            slug: row.slug,
            kind: row.kind,
            status: row.status,
            created_at: from_micros(row.created_at_us),
            deleted_at: row.deleted_at_us.map(from_micros),
            purge_after: row.purge_after_us.map(from_micros),
            member_count: row.member_count,
            version: row.version,
            settings: SettingsView {
                timezone: row.timezone,
                logo_url: row.logo_url,
                workflow_mode: row.workflow_mode,
                default_invite_expiry_days: row.default_invite_expiry_days,
                client_restrictions: serde_json::from_str(&row.client_restrictions)
                    .unwrap_or(serde_json::Value::Null),
                smart_tool_routing: row.smart_tool_routing != 0,
                plan: row.plan,
                seats: row.seats,
            },
        }
    }
}

const COLUMNS: &str = "id, name, slug, kind, status, created_at_us, deleted_at_us, purge_after_us,
    member_count, version, timezone, logo_url, workflow_mode, default_invite_expiry_days,
    client_restrictions, smart_tool_routing, plan, seats";

pub async fn get(database: &Database, id: &str) -> Result<Option<OrganizationView>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM rm_organizations WHERE id = $1");
    let row: Option<OrganizationRow> = crate::with_pool!(database, pool => {
        sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?
    });
    Ok(row.map(Into::into))
}

/// Filters of the organization directory.
#[derive(Debug, Clone, Default)]
pub struct OrganizationFilter {
    pub q: Option<String>,
    pub status: Option<String>,
    pub limit: usize,
    pub cursor: Option<String>,
}

pub async fn list(
    database: &Database,
    filter: &OrganizationFilter,
) -> Result<Result<Page<OrganizationView>, CursorError>, sqlx::Error> {
    let after = match filter
        .cursor
        .as_deref()
        .map(|raw| Cursor::<(i64, String)>::decode(raw, List::Organizations))
    {
        Some(Ok(Cursor(key))) => Some(key),
        Some(Err(error)) => return Ok(Err(error)),
        None => None,
    };
    let (after_at, after_id) = after.unwrap_or((i64::MIN, String::new()));
    let sql = format!(
        "SELECT {COLUMNS} FROM rm_organizations
          WHERE (created_at_us, id) > ($1, $2)
            AND ($3 IS NULL OR status = $3)
            AND ($4 IS NULL OR name_folded LIKE $4 ESCAPE '\\' OR slug LIKE $4 ESCAPE '\\')
          ORDER BY created_at_us, id
          LIMIT $5"
    );
    let q = filter.q.as_deref().map(contains_pattern);
    let rows: Vec<OrganizationRow> = crate::with_pool!(database, pool => {
        sqlx::query_as(&sql)
            .bind(after_at)
            .bind(&after_id)
            .bind(&filter.status)
            .bind(&q)
            .bind(filter.limit as i64 + 1)
            .fetch_all(pool)
            .await?
    });
    let views: Vec<OrganizationView> = rows.into_iter().map(Into::into).collect();
    Ok(Ok(paginate(
        views,
        filter.limit,
        List::Organizations,
        |org| (to_micros(org.created_at), org.id.clone()),
    )))
}

/// Soft-deleted organizations whose restore window has elapsed by `now`.
pub async fn due_for_purge(
    database: &Database,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    let sql = "SELECT id, name FROM rm_organizations
                WHERE status = 'deleted' AND purge_after_us <= $1
                ORDER BY purge_after_us LIMIT $2";
    let rows: Vec<(String, String)> = crate::with_pool!(database, pool => {
        sqlx::query_as(sql).bind(to_micros(now)).bind(limit).fetch_all(pool).await?
    });
    Ok(rows)
}

/// An AI provider as shown: never its key, only the key's last four characters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct AiProviderView {
    pub id: String,
    pub name: String,
    pub kind: String,
    #[sqlx(try_from = "i64")]
    pub enabled: IntBool,
    pub api_key_last4: String,
}

/// A boolean stored as 0/1 on both backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IntBool(pub bool);

impl From<i64> for IntBool {
    fn from(value: i64) -> Self {
        Self(value != 0)
    }
}

pub async fn ai_providers(
    database: &Database,
    organization_id: &str,
) -> Result<Vec<AiProviderView>, sqlx::Error> {
    let sql = "SELECT id, name, kind, enabled, api_key_last4 FROM rm_ai_providers
                WHERE organization_id = $1 ORDER BY id";
    let rows: Vec<AiProviderView> = crate::with_pool!(database, pool => {
        sqlx::query_as(sql).bind(organization_id).fetch_all(pool).await?
    });
    Ok(rows)
}

/// A custom role and the contract names of its permissions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomRoleView {
    pub key: String,
    pub name: String,
    pub permissions: Vec<String>,
}

pub async fn custom_roles(
    database: &Database,
    organization_id: &str,
) -> Result<Vec<CustomRoleView>, sqlx::Error> {
    let sql = "SELECT key, name, permissions FROM rm_roles WHERE organization_id = $1 ORDER BY key";
    let rows: Vec<(String, String, String)> = crate::with_pool!(database, pool => {
        sqlx::query_as(sql).bind(organization_id).fetch_all(pool).await?
    });
    Ok(rows
        .into_iter()
        .map(|(key, name, permissions)| CustomRoleView {
            key,
            name,
            permissions: serde_json::from_str(&permissions).unwrap_or_default(),
        })
        .collect())
}

/// The permissions of one custom role, if the organization defines it.
pub async fn custom_role_permissions(
    database: &Database,
    organization_id: &str,
    key: &str,
) -> Result<Option<Vec<String>>, sqlx::Error> {
    let sql = "SELECT permissions FROM rm_roles WHERE organization_id = $1 AND key = $2";
    let row: Option<String> = crate::with_pool!(database, pool => {
        sqlx::query_scalar(sql).bind(organization_id).bind(key).fetch_optional(pool).await?
    });
    Ok(row.map(|permissions| serde_json::from_str(&permissions).unwrap_or_default()))
}
