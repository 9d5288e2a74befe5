//! Commands: what an actor asks of an organization. Each carries its actor and the time it is
//! decided at, so the aggregate needs no clock; ids and token hashes are chosen by the caller.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::access::{Actor, Role};
use crate::organization::{OrganizationKind, WorkflowMode};
use crate::values::{Email, ExpiryDays, LockedField, MaxUses, OrganizationName, Slug, UserId};

/// A command with who issues it and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub actor: Actor,
    pub at: DateTime<Utc>,
    pub body: OrganizationCommand,
}

impl Command {
    pub fn new(actor: Actor, at: DateTime<Utc>, body: OrganizationCommand) -> Self {
        Self { actor, at, body }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum OrganizationCommand {
    CreateOrganization(CreateOrganization),
    UpdateOrganization(UpdateOrganization),
    DeleteOrganization(DeleteOrganization),
    RestoreOrganization,
    PurgeOrganization(PurgeOrganization),
    TransferOwnership(TransferOwnership),
    SendInvitation(SendInvitation),
    ResendInvitation(ResendInvitation),
    RevokeInvitation(RevokeInvitation),
    AcceptInvitation(AcceptInvitation),
    UpdateMember(UpdateMember),
    RemoveMember(RemoveMember),
    LeaveOrganization,
}

/// The first owner of a new organization.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMember {
    pub user_id: UserId,
    /// Unknown when a user creates an organization without giving their profile.
    pub email: Option<Email>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CreateOrganization {
    pub organization_id: Uuid,
    pub name: OrganizationName,
    /// Already resolved by the caller: given, or derived from the name and reserved.
    pub slug: Slug,
    pub kind: OrganizationKind,
    pub owner: NewMember,
}

/// A patch: `None` leaves a field as it is; `Some(None)` clears a nullable one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpdateOrganization {
    pub name: Option<OrganizationName>,
    pub slug: Option<Slug>,
    pub timezone: Option<String>,
    pub logo_url: Option<Option<String>>,
    pub workflow_mode: Option<WorkflowMode>,
    pub default_invite_expiry_days: Option<ExpiryDays>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeleteOrganization {
    pub confirm_name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PurgeOrganization {
    pub confirm_name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TransferOwnership {
    pub new_owner_id: UserId,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SendInvitation {
    pub invitation_id: Uuid,
    /// `None` makes a shareable link invitation.
    pub email: Option<Email>,
    pub role: Role,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub title: Option<String>,
    pub group_id: Option<Uuid>,
    /// `None` takes the organization's `default_invite_expiry_days`.
    pub expires_in_days: Option<ExpiryDays>,
    pub max_uses: MaxUses,
    pub token_sha256: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResendInvitation {
    pub invitation_id: Uuid,
    pub token_sha256: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RevokeInvitation {
    pub invitation_id: Uuid,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AcceptInvitation {
    pub token_sha256: String,
    pub user_id: UserId,
    pub email: Email,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// A patch of one member: role, profile and locks. `Some(None)` clears a profile field.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateMember {
    pub user_id: UserId,
    pub role: Option<Role>,
    pub first_name: Option<Option<String>>,
    pub last_name: Option<Option<String>>,
    pub title: Option<Option<String>>,
    pub image_url: Option<Option<String>>,
    pub locked_fields: Option<Vec<LockedField>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RemoveMember {
    pub user_id: UserId,
}

impl UpdateMember {
    /// A patch of `user_id` that changes nothing yet.
    pub fn of(user_id: UserId) -> Self {
        Self {
            user_id,
            role: None,
            first_name: None,
            last_name: None,
            title: None,
            image_url: None,
            locked_fields: None,
        }
    }
}
