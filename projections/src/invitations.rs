//! Invitations of every status. `expired` is not stored: a pending invitation past its
//! `expires_at` reads as expired.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orgledger_domain::OrganizationEvent as E;
use serde::{Deserialize, Serialize};

use crate::cursor::{paginate, Cursor, CursorError, List};
use crate::db::{index, value_rows, Backend, Conn, Database, Index, MAX_ROWS_PER_STATEMENT};
use crate::feed::RecordedEvent;
use crate::projector::Projection;
use crate::{args, from_micros, to_micros, Page};

pub struct InvitationsProjection {
    name: String,
    table: String,
}

impl InvitationsProjection {
    pub fn new(suffix: &str) -> Self {
        Self {
            name: format!("invitations{suffix}"),
            table: format!("rm_invitations{suffix}"),
        }
    }
}

#[async_trait]
impl Projection for InvitationsProjection {
    fn name(&self) -> &str {
        &self.name
    }

    fn tables(&self) -> Vec<(&'static str, String)> {
        vec![("rm_invitations", self.table.clone())]
    }

    /// 2: listed by id (UUIDv7: the order they were first sent in), not by `sent_at`, which
    /// a resend moves: a page boundary no longer shifts under a client paging through.
    fn schema_version(&self) -> i64 {
        2
    }

    fn create_tables(&self, _backend: Backend) -> Vec<String> {
        let t = &self.table;
        vec![format!(
            "CREATE TABLE IF NOT EXISTS {t} (
                    id TEXT PRIMARY KEY,
                    organization_id TEXT NOT NULL,
                    email TEXT,
                    role TEXT NOT NULL,
                    first_name TEXT,
                    last_name TEXT,
                    title TEXT,
                    group_id TEXT,
                    status TEXT NOT NULL,
                    invited_by_type TEXT NOT NULL,
                    invited_by_id TEXT NOT NULL,
                    sent_at_us BIGINT NOT NULL,
                    expires_at_us BIGINT NOT NULL,
                    max_uses BIGINT NOT NULL,
                    uses BIGINT NOT NULL DEFAULT 0,
                    token_sha256 TEXT,
                    accepted_at_us BIGINT,
                    revoked_at_us BIGINT
                )"
        )]
    }

    fn indexes(&self) -> Vec<Index> {
        let t = &self.table;
        vec![
            // The unfiltered list sorts an organization's invitations found by its prefix,
            // as it did by `sent_at`: one index fewer for every write and every rebuild.
            index(t, "_by_status_and_id", "organization_id, status, id"),
            index(t, "_by_token", "token_sha256"),
        ]
    }

    async fn apply(&self, conn: &mut Conn<'_>, event: &RecordedEvent) -> Result<(), sqlx::Error> {
        let t = &self.table;
        let org = event.organization_id.as_str();
        match &event.event {
            E::InvitationSent(_) => self
                .insert_sent(conn, &[(0, event)])
                .await
                .map_err(|(_, error)| error)?,
            E::InvitationResent(e) => {
                let sql = format!(
                    "UPDATE {t} SET token_sha256 = $2, sent_at_us = $3, expires_at_us = $4 WHERE id = $1"
                );
                let args = args![
                    e.invitation_id.to_string(),
                    &e.token_sha256,
                    to_micros(e.sent_at),
                    to_micros(e.expires_at)
                ];
                conn.execute(&sql, &args).await?;
            }
            E::InvitationRevoked(e) => {
                let sql = format!(
                    "UPDATE {t} SET status = 'revoked', revoked_at_us = $2, token_sha256 = NULL WHERE id = $1"
                );
                let args = args![e.invitation_id.to_string(), to_micros(e.revoked_at)];
                conn.execute(&sql, &args).await?;
            }
            E::InvitationAccepted(e) => {
                // A used-up invitation is accepted and its token dead.
                let sql = format!(
                    "UPDATE {t}
                        SET uses = uses + 1,
                            status = CASE WHEN uses + 1 >= max_uses THEN 'accepted' ELSE status END,
                            token_sha256 = CASE WHEN uses + 1 >= max_uses THEN NULL ELSE token_sha256 END,
                            accepted_at_us = $2
                      WHERE id = $1"
                );
                let args = args![e.invitation_id.to_string(), to_micros(e.accepted_at)];
                conn.execute(&sql, &args).await?;
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

    /// Runs of `InvitationSent` become one multi-row INSERT; other events apply one by one.
    async fn apply_all(
        &self,
        conn: &mut Conn<'_>,
        events: &[&RecordedEvent],
    ) -> Result<(), (usize, sqlx::Error)> {
        let mut sent: Vec<(usize, &RecordedEvent)> = Vec::new();
        for (index, event) in events.iter().enumerate() {
            if matches!(event.event, E::InvitationSent(_)) {
                sent.push((index, event));
                continue;
            }
            // Only an event that writes invitations must wait for the run before it: one
            // that does not (most of a busy log) leaves the run growing.
            if changes_invitations(&event.event) {
                self.insert_sent(conn, &sent).await?;
                sent.clear();
            }
            self.apply(conn, event)
                .await
                .map_err(|error| (index, error))?;
        }
        self.insert_sent(conn, &sent).await
    }
}

/// Whether `apply` writes invitations for an event other than `InvitationSent`: each of its
/// arms must be listed here.
fn changes_invitations(event: &E) -> bool {
    matches!(
        event,
        E::InvitationResent(_)
            | E::InvitationRevoked(_)
            | E::InvitationAccepted(_)
            | E::OrganizationPurged(_)
    )
}

impl InvitationsProjection {
    /// Inserts the invitations of `sent`, `InvitationSent` events with their index in the
    /// batch; a failing statement names its first event.
    async fn insert_sent(
        &self,
        conn: &mut Conn<'_>,
        sent: &[(usize, &RecordedEvent)],
    ) -> Result<(), (usize, sqlx::Error)> {
        for chunk in sent.chunks(MAX_ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO {} (id, organization_id, email, role, first_name, last_name, title,
                                 group_id, invited_by_type, invited_by_id, sent_at_us,
                                 expires_at_us, max_uses, token_sha256, status)
                 VALUES {}
                 ON CONFLICT (id) DO NOTHING",
                self.table,
                value_rows(chunk.len(), 15, 1)
            );
            let mut args = Vec::with_capacity(chunk.len() * 15);
            for (_, event) in chunk {
                if let E::InvitationSent(e) = &event.event {
                    args.extend(args![
                        e.invitation_id.to_string(),
                        event.organization_id.as_str(),
                        &e.email,
                        e.role.as_str(),
                        &e.first_name,
                        &e.last_name,
                        &e.title,
                        e.group_id.map(|id| id.to_string()),
                        e.invited_by.kind(),
                        e.invited_by.id(),
                        to_micros(e.sent_at),
                        to_micros(e.expires_at),
                        i64::from(e.max_uses),
                        &e.token_sha256,
                        "pending"
                    ]);
                }
            }
            conn.execute(&sql, &args)
                .await
                .map_err(|error| (chunk[0].0, error))?;
        }
        Ok(())
    }
}

/// Who sent an invitation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorView {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
}

/// An invitation as the contract shows it; never its token or token hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvitationView {
    pub id: String,
    pub email: Option<String>,
    pub role: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub title: Option<String>,
    pub group_id: Option<String>,
    pub status: String,
    pub invited_by: ActorView,
    pub sent_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub max_uses: i64,
    pub uses: i64,
}

#[derive(sqlx::FromRow)]
struct InvitationRow {
    id: String,
    email: Option<String>,
    role: String,
    first_name: Option<String>,
    last_name: Option<String>,
    title: Option<String>,
    group_id: Option<String>,
    status: String,
    invited_by_type: String,
    invited_by_id: String,
    sent_at_us: i64,
    expires_at_us: i64,
    max_uses: i64,
    uses: i64,
}

impl InvitationRow {
    fn view(self, now: DateTime<Utc>) -> InvitationView {
        let expires_at = from_micros(self.expires_at_us);
        let status = if self.status == "pending" && now >= expires_at {
            "expired".to_owned()
        } else {
            self.status
        };
        InvitationView {
            id: self.id,
            email: self.email,
            role: self.role,
            first_name: self.first_name,
            last_name: self.last_name,
            title: self.title,
            group_id: self.group_id,
            status,
            invited_by: ActorView {
                kind: self.invited_by_type,
                id: self.invited_by_id,
            },
            sent_at: from_micros(self.sent_at_us),
            expires_at,
            max_uses: self.max_uses,
            uses: self.uses,
        }
    }
}

const COLUMNS: &str = "id, email, role, first_name, last_name, title, group_id, status,
    invited_by_type, invited_by_id, sent_at_us, expires_at_us, max_uses, uses";

pub async fn get(
    database: &Database,
    organization_id: &str,
    id: &str,
    now: DateTime<Utc>,
) -> Result<Option<InvitationView>, sqlx::Error> {
    let sql =
        format!("SELECT {COLUMNS} FROM rm_invitations WHERE organization_id = $1 AND id = $2");
    let row: Option<InvitationRow> = crate::with_pool!(database, pool => {
        sqlx::query_as(&sql).bind(organization_id).bind(id).fetch_optional(pool).await?
    });
    Ok(row.map(|row| row.view(now)))
}

/// The organization holding a live invitation token (by its hash), for accepting it.
pub async fn organization_of_token(
    database: &Database,
    token_sha256: &str,
) -> Result<Option<String>, sqlx::Error> {
    let sql = "SELECT organization_id FROM rm_invitations WHERE token_sha256 = $1";
    let organization: Option<String> = crate::with_pool!(database, pool => {
        sqlx::query_scalar(sql).bind(token_sha256).fetch_optional(pool).await?
    });
    Ok(organization)
}

#[derive(Debug, Clone, Default)]
pub struct InvitationFilter {
    /// `pending`, `accepted`, `revoked`, `expired`; `None` lists all.
    pub status: Option<String>,
    pub limit: usize,
    pub cursor: Option<String>,
}

/// Where a page of invitations starts: after an id; a cursor issued before they were listed
/// by id (schema 1) carried `sent_at` too, and goes on from its id.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum InvitationKey {
    Id(String),
    SentAtAndId(i64, String),
}

pub async fn list(
    database: &Database,
    organization_id: &str,
    filter: &InvitationFilter,
    now: DateTime<Utc>,
) -> Result<Result<Page<InvitationView>, CursorError>, sqlx::Error> {
    let after = match filter
        .cursor
        .as_deref()
        .map(|raw| Cursor::<InvitationKey>::decode(raw, List::Invitations(organization_id)))
    {
        Some(Ok(Cursor(InvitationKey::Id(id) | InvitationKey::SentAtAndId(_, id)))) => Some(id),
        Some(Err(error)) => return Ok(Err(error)),
        None => None,
    };
    let after_id = after.unwrap_or_default();
    // `expired` is pending past expiry; `pending` excludes those.
    let (stored_status, expiry) = match filter.status.as_deref() {
        Some("pending") => (Some("pending"), "AND expires_at_us > $5"),
        Some("expired") => (Some("pending"), "AND expires_at_us <= $5"),
        Some(other) => (Some(other), "AND $5 = $5"),
        None => (None, "AND $5 = $5"),
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM rm_invitations
          WHERE organization_id = $1
            AND id > $2
            AND ($3 IS NULL OR status = $3)
            {expiry}
          ORDER BY id
          LIMIT $4"
    );
    let rows: Vec<InvitationRow> = crate::with_pool!(database, pool => {
        sqlx::query_as(&sql)
            .bind(organization_id)
            .bind(&after_id)
            .bind(stored_status)
            .bind(filter.limit as i64 + 1)
            .bind(to_micros(now))
            .fetch_all(pool)
            .await?
    });
    let views: Vec<InvitationView> = rows.into_iter().map(|row| row.view(now)).collect();
    Ok(Ok(paginate(
        views,
        filter.limit,
        List::Invitations(organization_id),
        |invitation| invitation.id.clone(),
    )))
}
