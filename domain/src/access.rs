//! Who acts, and what their role lets them do. Every authorization decision, for built-in
//! and (later) custom roles alike, goes through [`Role::permits`].

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::values::UserId;

/// Whoever issues a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "id", rename_all = "snake_case")]
pub enum Actor {
    /// An end user, authorized by their role in the organization.
    User(UserId),
    /// A service account of one organization, limited to its scopes.
    ServiceAccount(Uuid),
    /// The trusted platform itself (auditors' reads, owner-named creates, scheduled purges).
    System,
}

impl Actor {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::User(_) => "user",
            Self::ServiceAccount(_) => "service_account",
            Self::System => "system",
        }
    }

    /// The actor's id as the audit log shows it (`system` for the platform).
    pub fn id(&self) -> String {
        match self {
            Self::User(id) => id.to_string(),
            Self::ServiceAccount(id) => id.to_string(),
            Self::System => "system".to_owned(),
        }
    }
}

/// A member's role in an organization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Admin,
    Member,
    Viewer,
}

/// What a role may do. Owner-only powers are the last four.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// View the organization, its members and groups.
    ViewOrganization,
    /// Invite, resend and revoke invitations.
    InviteMembers,
    /// Change roles below owner, edit member profiles, remove members.
    ManageMembers,
    /// Manage groups, service accounts, settings and security.
    ManageSettings,
    /// Read the audit log, history and exports.
    ReadAudit,
    /// Billing and plan.
    ManageBilling,
    /// Transfer ownership.
    TransferOwnership,
    /// Soft delete, restore and purge.
    DeleteOrganization,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Owner, Role::Admin, Role::Member, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Member => "member",
            Self::Viewer => "viewer",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|role| role.as_str() == raw)
    }

    /// The contract's permission table, in one place.
    pub fn permits(self, permission: Permission) -> bool {
        use Permission::*;
        match self {
            Self::Owner => true,
            Self::Admin => matches!(
                permission,
                ViewOrganization | InviteMembers | ManageMembers | ManageSettings | ReadAudit
            ),
            Self::Member | Self::Viewer => matches!(permission, ViewOrganization),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Permission::*;

    #[test]
    fn the_permission_table_matches_the_contract() {
        let table = [
            (ViewOrganization, [true, true, true, true]),
            (InviteMembers, [true, true, false, false]),
            (ManageMembers, [true, true, false, false]),
            (ManageSettings, [true, true, false, false]),
            (ReadAudit, [true, true, false, false]),
            (ManageBilling, [true, false, false, false]),
            (TransferOwnership, [true, false, false, false]),
            (DeleteOrganization, [true, false, false, false]),
        ];
        for (permission, expected) in table {
            for (role, allowed) in Role::ALL.into_iter().zip(expected) {
                assert_eq!(role.permits(permission), allowed, "{role:?} {permission:?}");
            }
        }
    }

    #[test]
    fn roles_round_trip_through_their_names() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Role::parse("superuser"), None);
    }
}
