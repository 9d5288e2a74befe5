//! Groups and their members.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orgledger_domain::OrganizationEvent as E;
use serde::{Deserialize, Serialize};

use crate::db::{index, Backend, Conn, Database, Index};
use crate::feed::RecordedEvent;
use crate::members::json_text;
use crate::projector::Projection;
use crate::{args, from_micros, to_micros};

pub struct GroupsProjection {
    name: String,
    table: String,
}

impl GroupsProjection {
    pub fn new(suffix: &str) -> Self {
        Self {
            name: format!("groups{suffix}"),
            table: format!("rm_groups{suffix}"),
        }
    }

    /// Rewrites a group's member list.
    async fn edit_members(
        &self,
        conn: &mut Conn<'_>,
        org: &str,
        group: &str,
        edit: impl Fn(&mut Vec<String>),
    ) -> Result<(), sqlx::Error> {
        let t = &self.table;
        let sql = format!("SELECT id, member_ids FROM {t} WHERE organization_id = $1 AND id = $2");
        for (id, members) in conn
            .fetch_all::<(String, String)>(&sql, &args![org, group])
            .await?
        {
            let mut members: Vec<String> = serde_json::from_str(&members).unwrap_or_default();
            edit(&mut members);
            let sql =
                format!("UPDATE {t} SET member_ids = $3 WHERE organization_id = $1 AND id = $2");
            conn.execute(&sql, &args![org, id, json_text(&members)])
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Projection for GroupsProjection {
    fn name(&self) -> &str {
        &self.name
    }

    fn tables(&self) -> Vec<(&'static str, String)> {
        vec![("rm_groups", self.table.clone())]
    }

    fn create_tables(&self, _backend: Backend) -> Vec<String> {
        let t = &self.table;
        vec![format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                    organization_id TEXT NOT NULL,
                    id TEXT NOT NULL,
                    name TEXT NOT NULL,
                    description TEXT,
                    member_ids TEXT NOT NULL,
                    created_at_us BIGINT NOT NULL,
                    PRIMARY KEY (organization_id, id)
                )"
        )]
    }

    fn indexes(&self) -> Vec<Index> {
        let t = &self.table;
        vec![index(
            t,
            "_by_created",
            "organization_id, created_at_us, id",
        )]
    }

    async fn apply(&self, conn: &mut Conn<'_>, event: &RecordedEvent) -> Result<(), sqlx::Error> {
        let t = &self.table;
        let org = event.organization_id.as_str();
        match &event.event {
            E::GroupCreated(e) => {
                let sql = format!(
                    "INSERT INTO {t} (organization_id, id, name, description, member_ids, created_at_us)
                     VALUES ($1, $2, $3, $4, '[]', $5) ON CONFLICT (organization_id, id) DO NOTHING"
                );
                let args = args![
                    org,
                    e.group_id.to_string(),
                    &e.name,
                    &e.description,
                    to_micros(e.created_at)
                ];
                conn.execute(&sql, &args).await?;
            }
            E::GroupUpdated(e) => {
                if let Some(change) = &e.name {
                    let sql =
                        format!("UPDATE {t} SET name = $3 WHERE organization_id = $1 AND id = $2");
                    conn.execute(&sql, &args![org, e.group_id.to_string(), &change.to])
                        .await?;
                }
                if let Some(change) = &e.description {
                    let sql = format!(
                        "UPDATE {t} SET description = $3 WHERE organization_id = $1 AND id = $2"
                    );
                    conn.execute(&sql, &args![org, e.group_id.to_string(), &change.to])
                        .await?;
                }
            }
            E::GroupDeleted(e) => {
                let sql = format!("DELETE FROM {t} WHERE organization_id = $1 AND id = $2");
                conn.execute(&sql, &args![org, e.group_id.to_string()])
                    .await?;
            }
            E::GroupMemberAdded(e) => {
                let user = e.user_id.to_string();
                self.edit_members(conn, org, &e.group_id.to_string(), |members| {
                    if !members.contains(&user) {
                        members.push(user.clone());
                    }
                })
                .await?;
            }
            E::GroupMemberRemoved(e) => {
                let user = e.user_id.to_string();
                self.edit_members(conn, org, &e.group_id.to_string(), |members| {
                    members.retain(|m| *m != user)
                })
                .await?;
            }
            E::MemberJoined(e) => {
                let user = e.user_id.to_string();
                for group in &e.group_ids {
                    self.edit_members(conn, org, &group.to_string(), |members| {
                        if !members.contains(&user) {
                            members.push(user.clone());
                        }
                    })
                    .await?;
                }
            }
            E::MemberRemoved(orgledger_domain::MemberRemoved { user_id, .. })
            | E::MemberLeft(orgledger_domain::MemberLeft { user_id, .. }) => {
                let user = user_id.to_string();
                let sql = format!("SELECT id, member_ids FROM {t} WHERE organization_id = $1");
                for (group, _) in conn
                    .fetch_all::<(String, String)>(&sql, &args![org])
                    .await?
                {
                    self.edit_members(conn, org, &group, |members| members.retain(|m| *m != user))
                        .await?;
                }
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

/// A group as the contract shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupView {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub member_ids: Vec<String>,
    pub created_at: DateTime<Utc>,
}

type GroupRow = (String, String, Option<String>, String, i64);

fn view((id, name, description, member_ids, created_at_us): GroupRow) -> GroupView {
    GroupView {
        id,
        name,
        description,
        // Sorted, as the organization's state and past states list them; stored in the
        // order they joined.
        member_ids: {
            let mut member_ids: Vec<String> = serde_json::from_str(&member_ids).unwrap_or_default();
            member_ids.sort_unstable();
            member_ids
        },
        created_at: from_micros(created_at_us),
    }
}

pub async fn get(
    database: &Database,
    organization_id: &str,
    id: &str,
) -> Result<Option<GroupView>, sqlx::Error> {
    let sql = "SELECT id, name, description, member_ids, created_at_us FROM rm_groups
                WHERE organization_id = $1 AND id = $2";
    let row: Option<GroupRow> = crate::with_pool!(database, pool => {
        sqlx::query_as(sql).bind(organization_id).bind(id).fetch_optional(pool).await?
    });
    Ok(row.map(view))
}

/// Every group of the organization, oldest first.
pub async fn list(
    database: &Database,
    organization_id: &str,
) -> Result<Vec<GroupView>, sqlx::Error> {
    let sql = "SELECT id, name, description, member_ids, created_at_us FROM rm_groups
                WHERE organization_id = $1 ORDER BY created_at_us, id";
    let rows: Vec<GroupRow> = crate::with_pool!(database, pool => {
        sqlx::query_as(sql).bind(organization_id).fetch_all(pool).await?
    });
    Ok(rows.into_iter().map(view).collect())
}
