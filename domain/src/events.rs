//! The stored event schema. Events are forever: a field is never renamed or retyped in place.
//! A change of shape bumps that event's `event_version` and adds an upcaster in
//! [`crate::upcasting`] that lifts older payloads.
//!
//! Personal data lives only in fields named in [`PERSONAL_DATA_FIELDS`]; the store encrypts
//! every string under those keys with the organization's data key, and purge destroys that key.

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::access::{Actor, Permission, Role, Scope};
use crate::organization::{ClientAccess, OrganizationKind, Settings, WorkflowMode};
use crate::values::{LockedField, Secret, UserId};

/// Keys whose values are personal data, wherever they appear in a payload or metadata.
pub const PERSONAL_DATA_FIELDS: &[&str] = &[
    "email",
    "first_name",
    "last_name",
    "title",
    "image_url",
    "client_ip",
    "user_agent",
];

/// Keys whose values are secrets: sealed like personal data, never returned or exported.
pub const SECRET_FIELDS: &[&str] = &["api_key"];

/// Objects whose keys are names users chose, not field names (a client restriction's
/// `clients`): a client called `email` is neither personal data nor sealed.
pub const USER_KEYED_FIELDS: &[&str] = &["clients"];

/// What a personal-data string reads as once its organization's key is destroyed.
pub const ERASED: &str = "[erased]";

/// A field's value before and after a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change<T> {
    pub from: T,
    pub to: T,
}

impl<T: PartialEq> Change<T> {
    /// `Some` only when the value really changes.
    pub fn between(from: T, to: T) -> Option<Self> {
        (from != to).then_some(Self { from, to })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrganizationCreated {
    pub organization_id: Uuid,
    pub name: String,
    pub slug: String,
    pub kind: OrganizationKind,
    pub settings: Settings,
    pub created_at: DateTime<Utc>,
}

/// Only the fields that changed are present.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OrganizationUpdated {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Change<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slug: Option<Change<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<Change<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logo_url: Option<Change<Option<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_mode: Option<Change<WorkflowMode>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_invite_expiry_days: Option<Change<u16>>,
}

impl OrganizationUpdated {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrganizationDeleted {
    pub deleted_at: DateTime<Utc>,
    pub purge_after: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrganizationRestored {
    pub restored_at: DateTime<Utc>,
}

/// The tombstone: the organization's data key is destroyed once this is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrganizationPurged {
    pub purged_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OwnershipTransferred {
    pub from_user_id: UserId,
    pub to_user_id: UserId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvitationSent {
    pub invitation_id: Uuid,
    /// `None` for a shareable link that anyone holding the token may accept.
    pub email: Option<String>,
    pub role: Role,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub title: Option<String>,
    pub group_id: Option<Uuid>,
    pub max_uses: u32,
    /// SHA-256 of the token, hex. The token itself is never stored.
    pub token_sha256: String,
    pub invited_by: Actor,
    pub sent_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvitationResent {
    pub invitation_id: Uuid,
    pub token_sha256: String,
    pub sent_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvitationRevoked {
    pub invitation_id: Uuid,
    pub revoked_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvitationAccepted {
    pub invitation_id: Uuid,
    pub user_id: UserId,
    pub email: String,
    pub accepted_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberJoined {
    pub user_id: UserId,
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub title: Option<String>,
    pub image_url: Option<String>,
    pub role: Role,
    pub locked_fields: Vec<LockedField>,
    pub group_ids: Vec<Uuid>,
    pub invitation_id: Option<Uuid>,
    pub joined_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberRoleChanged {
    pub user_id: UserId,
    pub from: Role,
    pub to: Role,
}

/// Only the fields that changed are present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberProfileUpdated {
    pub user_id: UserId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<Change<Option<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<Change<Option<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<Change<Option<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<Change<Option<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_fields: Option<Change<Vec<LockedField>>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberRemoved {
    pub user_id: UserId,
    pub removed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberLeft {
    pub user_id: UserId,
    pub left_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupCreated {
    pub group_id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupUpdated {
    pub group_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Change<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<Change<Option<String>>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupDeleted {
    pub group_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMemberAdded {
    pub group_id: Uuid,
    pub user_id: UserId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMemberRemoved {
    pub group_id: Uuid,
    pub user_id: UserId,
}

/// A service account and the hash of its key (the key itself is never stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceAccountCreated {
    pub service_account_id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub scopes: Vec<Scope>,
    pub key_prefix: String,
    pub key_sha256: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceAccountKeyRotated {
    pub service_account_id: Uuid,
    pub key_prefix: String,
    pub key_sha256: String,
    pub rotated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceAccountDeleted {
    pub service_account_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRestrictionsChanged {
    pub from: ClientAccess,
    pub to: ClientAccess,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SmartToolRoutingChanged {
    pub enabled: Change<bool>,
}

/// `api_key` is a secret field: sealed with the organization's key, never shown again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AiProviderAdded {
    pub provider_id: Uuid,
    pub name: String,
    pub kind: String,
    pub enabled: bool,
    pub api_key: Secret,
    pub api_key_last4: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AiProviderUpdated {
    pub provider_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<Change<bool>>,
    /// A replaced key (sealed), and its new last four characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_last4: Option<Change<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AiProviderRemoved {
    pub provider_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanChanged {
    pub plan: Change<Option<String>>,
    pub seats: Change<Option<u32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleDefined {
    pub key: String,
    pub name: String,
    pub permissions: Vec<Permission>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleDeleted {
    pub key: String,
}

/// Everything that can happen to an organization, in the past tense.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrganizationEvent {
    OrganizationCreated(OrganizationCreated),
    OrganizationUpdated(OrganizationUpdated),
    OrganizationDeleted(OrganizationDeleted),
    OrganizationRestored(OrganizationRestored),
    OrganizationPurged(OrganizationPurged),
    OwnershipTransferred(OwnershipTransferred),
    InvitationSent(InvitationSent),
    InvitationResent(InvitationResent),
    InvitationRevoked(InvitationRevoked),
    InvitationAccepted(InvitationAccepted),
    MemberJoined(MemberJoined),
    MemberRoleChanged(MemberRoleChanged),
    MemberProfileUpdated(MemberProfileUpdated),
    MemberRemoved(MemberRemoved),
    MemberLeft(MemberLeft),
    GroupCreated(GroupCreated),
    GroupUpdated(GroupUpdated),
    GroupDeleted(GroupDeleted),
    GroupMemberAdded(GroupMemberAdded),
    GroupMemberRemoved(GroupMemberRemoved),
    ServiceAccountCreated(ServiceAccountCreated),
    ServiceAccountKeyRotated(ServiceAccountKeyRotated),
    ServiceAccountDeleted(ServiceAccountDeleted),
    ClientRestrictionsChanged(ClientRestrictionsChanged),
    SmartToolRoutingChanged(SmartToolRoutingChanged),
    AiProviderAdded(AiProviderAdded),
    AiProviderUpdated(AiProviderUpdated),
    AiProviderRemoved(AiProviderRemoved),
    PlanChanged(PlanChanged),
    RoleDefined(RoleDefined),
    RoleDeleted(RoleDeleted),
}

impl OrganizationEvent {
    /// The current schema version of each event type. Bump it with an upcaster when the shape
    /// of a payload changes.
    pub fn current_version(event_type: &str) -> &'static str {
        match event_type {
            "InvitationSent" => "2",
            _ => "1",
        }
    }
}

impl DomainEvent for OrganizationEvent {
    fn event_type(&self) -> String {
        let name = match self {
            Self::OrganizationCreated(_) => "OrganizationCreated",
            Self::OrganizationUpdated(_) => "OrganizationUpdated",
            Self::OrganizationDeleted(_) => "OrganizationDeleted",
            Self::OrganizationRestored(_) => "OrganizationRestored",
            Self::OrganizationPurged(_) => "OrganizationPurged",
            Self::OwnershipTransferred(_) => "OwnershipTransferred",
            Self::InvitationSent(_) => "InvitationSent",
            Self::InvitationResent(_) => "InvitationResent",
            Self::InvitationRevoked(_) => "InvitationRevoked",
            Self::InvitationAccepted(_) => "InvitationAccepted",
            Self::MemberJoined(_) => "MemberJoined",
            Self::MemberRoleChanged(_) => "MemberRoleChanged",
            Self::MemberProfileUpdated(_) => "MemberProfileUpdated",
            Self::MemberRemoved(_) => "MemberRemoved",
            Self::MemberLeft(_) => "MemberLeft",
            Self::GroupCreated(_) => "GroupCreated",
            Self::GroupUpdated(_) => "GroupUpdated",
            Self::GroupDeleted(_) => "GroupDeleted",
            Self::GroupMemberAdded(_) => "GroupMemberAdded",
            Self::GroupMemberRemoved(_) => "GroupMemberRemoved",
            Self::ServiceAccountCreated(_) => "ServiceAccountCreated",
            Self::ServiceAccountKeyRotated(_) => "ServiceAccountKeyRotated",
            Self::ServiceAccountDeleted(_) => "ServiceAccountDeleted",
            Self::ClientRestrictionsChanged(_) => "ClientRestrictionsChanged",
            Self::SmartToolRoutingChanged(_) => "SmartToolRoutingChanged",
            Self::AiProviderAdded(_) => "AiProviderAdded",
            Self::AiProviderUpdated(_) => "AiProviderUpdated",
            Self::AiProviderRemoved(_) => "AiProviderRemoved",
            Self::PlanChanged(_) => "PlanChanged",
            Self::RoleDefined(_) => "RoleDefined",
            Self::RoleDeleted(_) => "RoleDeleted",
        };
        name.to_owned()
    }

    fn event_version(&self) -> String {
        Self::current_version(&self.event_type()).to_owned()
    }
}
