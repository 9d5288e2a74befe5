//! Members of each organization, and each user's organizations.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orgledger_domain::OrganizationEvent as E;
use serde::{Deserialize, Serialize};

use crate::cursor::{contains_pattern, fold, paginate, Cursor, CursorError, List};
use crate::db::{index, value_rows, Arg, Backend, Conn, Database, Index, MAX_ROWS_PER_STATEMENT};
use crate::feed::RecordedEvent;
use crate::organizations::enum_text;
use crate::projector::Projection;
use crate::BatchMap;
use crate::{args, from_micros, to_micros, Page};

pub struct MembersProjection {
    name: String,
    table: String,
}

impl MembersProjection {
    pub fn new(suffix: &str) -> Self {
        Self {
            name: format!("members{suffix}"),
            table: format!("rm_members{suffix}"),
        }
    }
}

#[async_trait]
impl Projection for MembersProjection {
    fn name(&self) -> &str {
        &self.name
    }

    fn tables(&self) -> Vec<(&'static str, String)> {
        vec![("rm_members", self.table.clone())]
    }

    /// 2: folded copies of the names, for `q` (see `cursor::fold`).
    fn schema_version(&self) -> i64 {
        2
    }

    fn create_tables(&self, _backend: Backend) -> Vec<String> {
        let t = &self.table;
        vec![format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                    organization_id TEXT NOT NULL,
                    user_id TEXT NOT NULL,
                    email TEXT NOT NULL,
                    first_name TEXT,
                    last_name TEXT,
                    first_name_folded TEXT,
                    last_name_folded TEXT,
                    title TEXT,
                    image_url TEXT,
                    role TEXT NOT NULL,
                    joined_at_us BIGINT NOT NULL,
                    group_ids TEXT NOT NULL,
                    locked_fields TEXT NOT NULL,
                    PRIMARY KEY (organization_id, user_id)
                )"
        )]
    }

    fn indexes(&self) -> Vec<Index> {
        let t = &self.table;
        vec![
            index(t, "_by_joined", "organization_id, joined_at_us, user_id"),
            index(t, "_by_user", "user_id, joined_at_us"),
        ]
    }

    async fn apply(&self, conn: &mut Conn<'_>, event: &RecordedEvent) -> Result<(), sqlx::Error> {
        self.apply_all(conn, &[event])
            .await
            .map_err(|(_, error)| error)
    }

    /// Runs of joins go in as multi-row INSERTs, and runs of role changes (which only set one
    /// column) as one UPDATE with the last role per member, written after the joins. Joins
    /// and role changes share a run: a member's role changes follow their join in the log,
    /// and a join after a role change of the same member first writes the UPDATE, so the
    /// order of the log holds for every member. Any other event that writes members first
    /// writes the run.
    async fn apply_all(
        &self,
        conn: &mut Conn<'_>,
        events: &[&RecordedEvent],
    ) -> Result<(), (usize, sqlx::Error)> {
        let mut joins: Vec<(usize, &RecordedEvent)> = Vec::new();
        let mut roles = RoleChanges::default();
        for (index, event) in events.iter().enumerate() {
            let org = event.organization_id.as_str();
            match &event.event {
                E::MemberJoined(e) => {
                    if roles.contains_key(&(org, e.user_id.as_str())) {
                        self.set_roles(conn, &mut roles).await?;
                    }
                    joins.push((index, event));
                }
                E::MemberRoleChanged(e) => {
                    roles.insert((org, e.user_id.as_str()), (e.to.as_str(), index));
                }
                E::OwnershipTransferred(e) => {
                    roles.insert((org, e.to_user_id.as_str()), ("owner", index));
                    roles.insert((org, e.from_user_id.as_str()), ("admin", index));
                }
                other => {
                    // Only an event that writes members must wait for the run before it:
                    // one that does not (an invitation, say) leaves it growing.
                    if changes_members(other) {
                        self.insert_joins(conn, &mut joins).await?;
                        self.set_roles(conn, &mut roles).await?;
                    }
                    self.apply_other(conn, event)
                        .await
                        .map_err(|error| (index, error))?;
                }
            }
        }
        self.insert_joins(conn, &mut joins).await?;
        self.set_roles(conn, &mut roles).await
    }
}

/// Whether `apply_other` writes members for `event`: each of its arms must be listed here.
fn changes_members(event: &E) -> bool {
    matches!(
        event,
        E::MemberProfileUpdated(_)
            | E::MemberRemoved(_)
            | E::MemberLeft(_)
            | E::OrganizationPurged(_)
            | E::GroupMemberAdded(_)
            | E::GroupMemberRemoved(_)
            | E::GroupDeleted(_)
    )
}

/// `(organization, user)` to `(role, index of the event that set it)`.
type RoleChanges<'e> = BatchMap<(&'e str, &'e str), (&'e str, usize)>;

impl MembersProjection {
    /// Every event but joins and role changes, which `apply_all` writes in runs. An event it
    /// writes for must be in `changes_members`.
    async fn apply_other(
        &self,
        conn: &mut Conn<'_>,
        event: &RecordedEvent,
    ) -> Result<(), sqlx::Error> {
        let t = &self.table;
        let org = event.organization_id.as_str();
        match &event.event {
            E::MemberProfileUpdated(e) => {
                let user = e.user_id.as_str();
                for (column, change) in [("first_name", &e.first_name), ("last_name", &e.last_name)]
                {
                    if let Some(change) = change {
                        let sql = format!(
                            "UPDATE {t} SET {column} = $3, {column}_folded = $4
                              WHERE organization_id = $1 AND user_id = $2"
                        );
                        let folded = change.to.as_deref().map(fold);
                        conn.execute(&sql, &args![org, user, &change.to, folded])
                            .await?;
                    }
                }
                for (column, change) in [("title", &e.title), ("image_url", &e.image_url)] {
                    if let Some(change) = change {
                        let sql = format!(
                            "UPDATE {t} SET {column} = $3 WHERE organization_id = $1 AND user_id = $2"
                        );
                        conn.execute(&sql, &args![org, user, &change.to]).await?;
                    }
                }
                if let Some(change) = &e.locked_fields {
                    let sql = format!(
                        "UPDATE {t} SET locked_fields = $3 WHERE organization_id = $1 AND user_id = $2"
                    );
                    let locked: Vec<String> = change.to.iter().map(enum_text).collect();
                    conn.execute(&sql, &args![org, user, json_text(&locked)])
                        .await?;
                }
            }
            E::MemberRemoved(orgledger_domain::MemberRemoved { user_id, .. })
            | E::MemberLeft(orgledger_domain::MemberLeft { user_id, .. }) => {
                let sql = format!("DELETE FROM {t} WHERE organization_id = $1 AND user_id = $2");
                conn.execute(&sql, &args![org, user_id.as_str()]).await?;
            }
            E::OrganizationPurged(_) => {
                let sql = format!("DELETE FROM {t} WHERE organization_id = $1");
                conn.execute(&sql, &args![org]).await?;
            }
            E::GroupMemberAdded(e) => {
                let group = e.group_id.to_string();
                self.edit_groups(conn, org, Some(e.user_id.as_str()), |groups| {
                    if !groups.contains(&group) {
                        groups.push(group.clone());
                    }
                })
                .await?;
            }
            E::GroupMemberRemoved(e) => {
                let group = e.group_id.to_string();
                self.edit_groups(conn, org, Some(e.user_id.as_str()), |groups| {
                    groups.retain(|g| *g != group)
                })
                .await?;
            }
            E::GroupDeleted(e) => {
                let group = e.group_id.to_string();
                self.edit_groups(conn, org, None, |groups| groups.retain(|g| *g != group))
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Inserts and clears a run of `MemberJoined` events.
    async fn insert_joins(
        &self,
        conn: &mut Conn<'_>,
        joins: &mut Vec<(usize, &RecordedEvent)>,
    ) -> Result<(), (usize, sqlx::Error)> {
        let Some(first) = joins.first().map(|(index, _)| *index) else {
            return Ok(());
        };
        let rows: Vec<Vec<Arg>> = joins
            .iter()
            .filter_map(|(_, event)| match &event.event {
                E::MemberJoined(e) => {
                    Some(Vec::from(joined_row(event.organization_id.as_str(), e)))
                }
                _ => None,
            })
            .collect();
        conn.insert_rows(
            &self.table,
            JOINED_COLUMN_NAMES,
            rows,
            "ON CONFLICT (organization_id, user_id) DO NOTHING",
        )
        .await
        .map_err(|(row, error)| (joins.get(row).map_or(first, |(index, _)| *index), error))?;
        joins.clear();
        Ok(())
    }

    /// Writes and clears a run of role changes.
    async fn set_roles(
        &self,
        conn: &mut Conn<'_>,
        roles: &mut RoleChanges<'_>,
    ) -> Result<(), (usize, sqlx::Error)> {
        let rows: Vec<_> = roles.drain().collect();
        for chunk in rows.chunks(MAX_ROWS_PER_STATEMENT) {
            let t = &self.table;
            let sql = format!(
                "WITH changed (organization_id, user_id, role) AS (VALUES {})
                 UPDATE {t} SET role = changed.role FROM changed
                  WHERE {t}.organization_id = changed.organization_id
                    AND {t}.user_id = changed.user_id",
                value_rows(chunk.len(), 3, 1)
            );
            let args: Vec<Arg> = chunk
                .iter()
                .flat_map(|((org, user), (role, _))| args![*org, *user, *role])
                .collect();
            let first = chunk
                .iter()
                .map(|(_, (_, index))| *index)
                .min()
                .unwrap_or(0);
            conn.execute(&sql, &args)
                .await
                .map_err(|error| (first, error))?;
        }
        Ok(())
    }

    /// Rewrites the group list of one member, or of every member of the organization.
    async fn edit_groups(
        &self,
        conn: &mut Conn<'_>,
        org: &str,
        user: Option<&str>,
        edit: impl Fn(&mut Vec<String>),
    ) -> Result<(), sqlx::Error> {
        let t = &self.table;
        let sql = format!(
            "SELECT user_id, group_ids FROM {t} WHERE organization_id = $1 AND ($2 IS NULL OR user_id = $2)"
        );
        for (user_id, groups) in conn
            .fetch_all::<(String, String)>(&sql, &args![org, user.map(str::to_owned)])
            .await?
        {
            let mut groups: Vec<String> = serde_json::from_str(&groups).unwrap_or_default();
            let before = groups.clone();
            edit(&mut groups);
            if groups != before {
                let sql = format!(
                    "UPDATE {t} SET group_ids = $3 WHERE organization_id = $1 AND user_id = $2"
                );
                conn.execute(&sql, &args![org, user_id, json_text(&groups)])
                    .await?;
            }
        }
        Ok(())
    }
}

const JOINED_COLUMNS: usize = JOINED_COLUMN_NAMES.len();

const JOINED_COLUMN_NAMES: &[&str] = &[
    "organization_id",
    "user_id",
    "email",
    "first_name",
    "last_name",
    "title",
    "image_url",
    "role",
    "joined_at_us",
    "group_ids",
    "locked_fields",
    "first_name_folded",
    "last_name_folded",
];

/// The row a `MemberJoined` inserts, in column order.
fn joined_row(org: &str, e: &orgledger_domain::MemberJoined) -> [Arg; JOINED_COLUMNS] {
    args![
        org,
        e.user_id.as_str(),
        &e.email,
        &e.first_name,
        &e.last_name,
        &e.title,
        &e.image_url,
        e.role.as_str(),
        to_micros(e.joined_at),
        json_text(
            &e.group_ids
                .iter()
                .map(|id| id.to_string())
                .collect::<Vec<_>>()
        ),
        json_text(&e.locked_fields),
        e.first_name.as_deref().map(fold),
        e.last_name.as_deref().map(fold)
    ]
}

pub(crate) fn json_text<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("read-model JSON serializes")
}

/// A member as the contract shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub user_id: String,
    /// `None` when not known: a user who created the organization without giving one
    /// (stored as the empty text).
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub title: Option<String>,
    pub image_url: Option<String>,
    pub role: String,
    pub joined_at: DateTime<Utc>,
    pub groups: Vec<String>,
    pub locked_fields: Vec<String>,
}

#[derive(sqlx::FromRow)]
struct MemberRow {
    user_id: String,
    email: String,
    first_name: Option<String>,
    last_name: Option<String>,
    title: Option<String>,
    image_url: Option<String>,
    role: String,
    joined_at_us: i64,
    group_ids: String,
    locked_fields: String,
}

impl From<MemberRow> for MemberView {
    fn from(row: MemberRow) -> Self {
        Self {
            user_id: row.user_id,
            email: (!row.email.is_empty()).then_some(row.email),
            first_name: row.first_name,
            last_name: row.last_name,
            title: row.title,
            image_url: row.image_url,
            role: row.role,
            joined_at: from_micros(row.joined_at_us),
            // Sorted, as the organization's state and past states list them; stored in
            // the order the member joined them.
            groups: {
                let mut groups: Vec<String> =
                    serde_json::from_str(&row.group_ids).unwrap_or_default();
                groups.sort_unstable();
                groups
            },
            locked_fields: serde_json::from_str(&row.locked_fields).unwrap_or_default(),
        }
    }
}

const COLUMNS: &str = "user_id, email, first_name, last_name, title, image_url, role,
    joined_at_us, group_ids, locked_fields";

pub async fn get(
    database: &Database,
    organization_id: &str,
    user_id: &str,
) -> Result<Option<MemberView>, sqlx::Error> {
    let sql =
        format!("SELECT {COLUMNS} FROM rm_members WHERE organization_id = $1 AND user_id = $2");
    let row: Option<MemberRow> = crate::with_pool!(database, pool => {
        sqlx::query_as(&sql).bind(organization_id).bind(user_id).fetch_optional(pool).await?
    });
    Ok(row.map(Into::into))
}

#[derive(Debug, Clone, Default)]
pub struct MemberFilter {
    pub role: Option<String>,
    pub q: Option<String>,
    pub limit: usize,
    pub cursor: Option<String>,
}

/// Members by `joined_at, user_id`; `q` matches name or email.
pub async fn list(
    database: &Database,
    organization_id: &str,
    filter: &MemberFilter,
) -> Result<Result<Page<MemberView>, CursorError>, sqlx::Error> {
    let after = match filter
        .cursor
        .as_deref()
        .map(|raw| Cursor::<(i64, String)>::decode(raw, List::Members(organization_id)))
    {
        Some(Ok(Cursor(key))) => Some(key),
        Some(Err(error)) => return Ok(Err(error)),
        None => None,
    };
    let (after_at, after_user) = after.unwrap_or((i64::MIN, String::new()));
    let sql = format!(
        "SELECT {COLUMNS} FROM rm_members
          WHERE organization_id = $1
            AND (joined_at_us, user_id) > ($2, $3)
            AND ($4 IS NULL OR role = $4)
            AND ($5 IS NULL
                 OR email LIKE $5 ESCAPE '\\'
                 OR coalesce(first_name_folded, '') || ' ' || coalesce(last_name_folded, '') LIKE $5 ESCAPE '\\')
          ORDER BY joined_at_us, user_id
          LIMIT $6"
    );
    let q = filter.q.as_deref().map(contains_pattern);
    let rows: Vec<MemberRow> = crate::with_pool!(database, pool => {
        sqlx::query_as(&sql)
            .bind(organization_id)
            .bind(after_at)
            .bind(&after_user)
            .bind(&filter.role)
            .bind(&q)
            .bind(filter.limit as i64 + 1)
            .fetch_all(pool)
            .await?
    });
    let views: Vec<MemberView> = rows.into_iter().map(Into::into).collect();
    Ok(Ok(paginate(
        views,
        filter.limit,
        List::Members(organization_id),
        |member| (to_micros(member.joined_at), member.user_id.clone()),
    )))
}

/// The role of `user_id` in the organization, if a member.
pub async fn role_of(
    database: &Database,
    organization_id: &str,
    user_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    let sql = "SELECT role FROM rm_members WHERE organization_id = $1 AND user_id = $2";
    let role: Option<String> = crate::with_pool!(database, pool => {
        sqlx::query_scalar(sql).bind(organization_id).bind(user_id).fetch_optional(pool).await?
    });
    Ok(role)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrganizationSummary {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub kind: String,
    /// `active` or `deleted` (soft-deleted, restorable by an owner until it is purged).
    pub status: String,
}

/// One organization of a user, with the user's role there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserOrganizationView {
    pub organization: OrganizationSummary,
    pub role: String,
    pub joined_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct UserOrganizationRow {
    id: String,
    name: String,
    slug: String,
    kind: String,
    status: String,
    role: String,
    joined_at_us: i64,
}

pub async fn organizations_of(
    database: &Database,
    user_id: &str,
    limit: usize,
    cursor: Option<&str>,
) -> Result<Result<Page<UserOrganizationView>, CursorError>, sqlx::Error> {
    let after = match cursor
        .map(|raw| Cursor::<(i64, String)>::decode(raw, List::UserOrganizations(user_id)))
    {
        Some(Ok(Cursor(key))) => Some(key),
        Some(Err(error)) => return Ok(Err(error)),
        None => None,
    };
    let (after_at, after_id) = after.unwrap_or((i64::MIN, String::new()));
    let sql = "SELECT o.id, o.name, o.slug, o.kind, o.status, m.role, m.joined_at_us
                 FROM rm_members m JOIN rm_organizations o ON o.id = m.organization_id
                WHERE m.user_id = $1
                  AND (m.joined_at_us, m.organization_id) > ($2, $3)
                ORDER BY m.joined_at_us, o.id
                LIMIT $4";
    let rows: Vec<UserOrganizationRow> = crate::with_pool!(database, pool => {
        sqlx::query_as(sql)
            .bind(user_id)
            .bind(after_at)
            .bind(&after_id)
            .bind(limit as i64 + 1)
            .fetch_all(pool)
            .await?
    });
    let views: Vec<UserOrganizationView> = rows
        .into_iter()
        .map(|row| UserOrganizationView {
            organization: OrganizationSummary {
                id: row.id,
                name: row.name,
                slug: row.slug,
                kind: row.kind,
                status: row.status,
            },
            role: row.role,
            joined_at: from_micros(row.joined_at_us),
        })
        .collect();
    Ok(Ok(paginate(
        views,
        limit,
        List::UserOrganizations(user_id),
        |view| (to_micros(view.joined_at), view.organization.id.clone()),
    )))
}
