//! Who acts, and what they may do. Every authorization decision, for built-in roles, custom
//! roles and service-account scopes alike, goes through [`Grant::permits`].

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::error::FieldError;
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

/// What can be allowed. The last four are owner-only: no custom role or scope grants them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// View the organization, its members and groups (`members:read`).
    ViewOrganization,
    /// Invite, resend and revoke invitations (`members:invite`).
    InviteMembers,
    /// Change roles below owner, edit member profiles, remove members (`members:manage`).
    ManageMembers,
    /// Manage groups (`groups:manage`).
    ManageGroups,
    /// Manage service accounts (`service_accounts:manage`).
    ManageServiceAccounts,
    /// Manage settings and security (`settings:manage`).
    ManageSettings,
    /// Read the audit log and history (`audit:read`).
    ReadAudit,
    /// Read exports (`export:read`).
    ReadExport,
    /// Billing and plan.
    ManageBilling,
    /// Transfer ownership.
    TransferOwnership,
    /// Soft delete, restore and purge.
    DeleteOrganization,
    /// Define and delete custom roles.
    ManageRoles,
}

impl Permission {
    pub const ALL: [Permission; 12] = [
        Permission::ViewOrganization,
        Permission::InviteMembers,
        Permission::ManageMembers,
        Permission::ManageGroups,
        Permission::ManageServiceAccounts,
        Permission::ManageSettings,
        Permission::ReadAudit,
        Permission::ReadExport,
        Permission::ManageBilling,
        Permission::TransferOwnership,
        Permission::DeleteOrganization,
        Permission::ManageRoles,
    ];

    /// The permissions a custom role may hold, by their contract names.
    pub const GRANTABLE: [(Permission, &'static str); 8] = [
        (Permission::ViewOrganization, "members:read"),
        (Permission::InviteMembers, "members:invite"),
        (Permission::ManageMembers, "members:manage"),
        (Permission::ManageGroups, "groups:manage"),
        (Permission::ManageServiceAccounts, "service_accounts:manage"),
        (Permission::ManageSettings, "settings:manage"),
        (Permission::ReadAudit, "audit:read"),
        (Permission::ReadExport, "export:read"),
    ];

    /// A grantable permission by its contract name; owner-only powers have none.
    pub fn parse_grantable(raw: &str) -> Option<Self> {
        Self::GRANTABLE
            .iter()
            .find(|(_, name)| *name == raw)
            .map(|(permission, _)| *permission)
    }

    pub fn grantable_name(self) -> Option<&'static str> {
        Self::GRANTABLE
            .iter()
            .find(|(permission, _)| *permission == self)
            .map(|(_, name)| *name)
    }
}

/// What a service account may do, by its contract names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    #[serde(rename = "members:read")]
    MembersRead,
    #[serde(rename = "members:write")]
    MembersWrite,
    #[serde(rename = "invitations:write")]
    InvitationsWrite,
    #[serde(rename = "groups:write")]
    GroupsWrite,
    #[serde(rename = "settings:write")]
    SettingsWrite,
    #[serde(rename = "audit:read")]
    AuditRead,
    #[serde(rename = "export:read")]
    ExportRead,
}

impl Scope {
    pub const ALL: [(Scope, &'static str); 7] = [
        (Scope::MembersRead, "members:read"),
        (Scope::MembersWrite, "members:write"),
        (Scope::InvitationsWrite, "invitations:write"),
        (Scope::GroupsWrite, "groups:write"),
        (Scope::SettingsWrite, "settings:write"),
        (Scope::AuditRead, "audit:read"),
        (Scope::ExportRead, "export:read"),
    ];

    pub fn parse(field: &str, raw: &str) -> Result<Self, FieldError> {
        Self::ALL
            .iter()
            .find(|(_, name)| *name == raw)
            .map(|(scope, _)| *scope)
            .ok_or_else(|| {
                FieldError::new(
                    field,
                    "must be one of members:read, members:write, invitations:write, groups:write, settings:write, audit:read, export:read",
                )
            })
    }

    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(scope, _)| *scope == self)
            .map_or("", |(_, name)| name)
    }

    /// The one permission a scope allows.
    pub(crate) fn permission(self) -> Permission {
        match self {
            Self::MembersRead => Permission::ViewOrganization,
            Self::MembersWrite => Permission::ManageMembers,
            Self::InvitationsWrite => Permission::InviteMembers,
            Self::GroupsWrite => Permission::ManageGroups,
            Self::SettingsWrite => Permission::ManageSettings,
            Self::AuditRead => Permission::ReadAudit,
            Self::ExportRead => Permission::ReadExport,
        }
    }
}

/// A member's role: one of the four built-in roles, or a custom role by its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Owner,
    Admin,
    Member,
    Viewer,
    Custom(String),
}

impl Role {
    pub const BUILT_IN: [Role; 4] = [Role::Owner, Role::Admin, Role::Member, Role::Viewer];

    pub fn as_str(&self) -> &str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Member => "member",
            Self::Viewer => "viewer",
            Self::Custom(key) => key,
        }
    }

    /// A built-in role, or a custom role key (`^[a-z][a-z0-9_]{1,31}$`).
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "owner" => Some(Self::Owner),
            "admin" => Some(Self::Admin),
            "member" => Some(Self::Member),
            "viewer" => Some(Self::Viewer),
            key if is_role_key(key) => Some(Self::Custom(key.to_owned())),
            _ => None,
        }
    }

    pub fn is_built_in(&self) -> bool {
        !matches!(self, Self::Custom(_))
    }

    /// What a built-in role allows: the contract's permission table.
    fn built_in_permits(&self, permission: Permission) -> bool {
        use Permission::*;
        match self {
            Self::Owner => true,
            Self::Admin => matches!(
                permission,
                ViewOrganization
                    | InviteMembers
                    | ManageMembers
                    | ManageGroups
                    | ManageServiceAccounts
                    | ManageSettings
                    | ReadAudit
                    | ReadExport
            ),
            Self::Member | Self::Viewer => matches!(permission, ViewOrganization),
            Self::Custom(_) => false,
        }
    }
}

/// `^[a-z][a-z0-9_]{1,31}$`.
pub fn is_role_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    (2..=32).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

impl Serialize for Role {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        // Stored roles are trusted: a key stored before a rule tightened still loads.
        Ok(Role::parse(&raw).unwrap_or(Role::Custom(raw)))
    }
}

/// Everything an actor holds in an organization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant<'a> {
    BuiltIn(&'a Role),
    /// A custom role's permissions.
    Custom(&'a [Permission]),
    /// A service account's scopes.
    Scopes(&'a [Scope]),
    Nothing,
}

impl Grant<'_> {
    /// The one permission check of orgledger.
    pub fn permits(&self, permission: Permission) -> bool {
        match self {
            Self::BuiltIn(role) => role.built_in_permits(permission),
            Self::Custom(permissions) => {
                permission.grantable_name().is_some() && permissions.contains(&permission)
            }
            Self::Scopes(scopes) => scopes.iter().any(|scope| scope.permission() == permission),
            Self::Nothing => false,
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
            (ManageGroups, [true, true, false, false]),
            (ManageServiceAccounts, [true, true, false, false]),
            (ManageSettings, [true, true, false, false]),
            (ReadAudit, [true, true, false, false]),
            (ReadExport, [true, true, false, false]),
            (ManageBilling, [true, false, false, false]),
            (TransferOwnership, [true, false, false, false]),
            (DeleteOrganization, [true, false, false, false]),
            (ManageRoles, [true, false, false, false]),
        ];
        for (permission, expected) in table {
            for (role, allowed) in Role::BUILT_IN.iter().zip(expected) {
                assert_eq!(
                    Grant::BuiltIn(role).permits(permission),
                    allowed,
                    "{role:?} {permission:?}"
                );
            }
        }
    }

    #[test]
    fn custom_roles_and_scopes_never_reach_owner_powers() {
        let everything: Vec<Permission> = Permission::GRANTABLE.iter().map(|(p, _)| *p).collect();
        let custom = Grant::Custom(&everything);
        let scopes: Vec<Scope> = Scope::ALL.iter().map(|(s, _)| *s).collect();
        let account = Grant::Scopes(&scopes);
        for owner_only in [
            ManageBilling,
            TransferOwnership,
            DeleteOrganization,
            ManageRoles,
        ] {
            assert!(!custom.permits(owner_only));
            assert!(!account.permits(owner_only));
        }
        assert!(custom.permits(ReadExport));
        assert!(Grant::Scopes(&[Scope::MembersRead]).permits(ViewOrganization));
        assert!(!Grant::Scopes(&[Scope::MembersRead]).permits(ManageMembers));
    }

    #[test]
    fn roles_round_trip_through_their_names() {
        for role in Role::BUILT_IN {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(
            Role::parse("organizer"),
            Some(Role::Custom("organizer".into()))
        );
        assert_eq!(Role::parse("Organizer"), None);
        assert_eq!(Role::parse("x"), None);
        let json = serde_json::to_string(&Role::Custom("guest".into())).unwrap();
        assert_eq!(json, "\"guest\"");
        assert_eq!(
            serde_json::from_str::<Role>("\"admin\"").unwrap(),
            Role::Admin
        );
    }
}
