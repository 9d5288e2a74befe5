use serde::Serialize;

/// A field that broke a rule of shape or range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: &str) -> Self {
        Self {
            field: field.to_owned(),
            message: message.to_owned(),
        }
    }
}

/// Every way a command on an organization can be refused. Each variant is one error code of
/// the contract; [`OrganizationError::code`] gives it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrganizationError {
    #[error("this command needs an acting user (X-Actor-Id)")]
    ActorRequired,
    #[error("the actor is not allowed to do this")]
    PermissionDenied,
    /// A service account's command whose key was rotated after the request was
    /// authenticated and before the command was decided (an account deleted meanwhile is
    /// refused as a stranger: `PermissionDenied`).
    #[error("the service account's key was rotated; a valid bearer token is required")]
    KeyRevoked,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("the organization already exists")]
    AlreadyExists,
    #[error("an organization must keep at least one owner")]
    LastOwner,
    #[error("members cannot remove themselves; they leave instead")]
    CannotRemoveSelf,
    #[error("ownership can only be transferred to an admin")]
    TargetNotAdmin,
    #[error("the organization is deleted; only restore and purge are accepted")]
    OrganizationDeleted,
    #[error("the organization is not deleted")]
    OrganizationNotDeleted,
    #[error("the 30-day restore window has elapsed")]
    RestoreWindowElapsed,
    #[error("confirm_name does not match the organization's name")]
    ConfirmationMismatch,
    #[error("the slug is already taken")]
    SlugTaken,
    #[error("the user is already a member")]
    AlreadyMember,
    #[error("a pending invitation for this email already exists")]
    InvitationPending,
    /// A link accepted by an email that has an invitation of its own pending.
    #[error("an invitation addressed to this email is pending: accept that one, or ask for it to be revoked")]
    OwnInvitationPending,
    #[error("the invitation has expired")]
    InvitationExpired,
    #[error("the invitation token is unknown, revoked, superseded or used")]
    InvalidInvitation,
    #[error("the accepting email differs from the invited one")]
    EmailMismatch,
    #[error("the field {0} is locked by an organization admin")]
    FieldLocked(&'static str),
    #[error("a personal organization has a single member and takes no invitations")]
    PersonalOrganization,
    #[error("members and pending invitations would exceed the plan's seats")]
    SeatLimitReached,
    #[error("a group with this name already exists")]
    GroupExists,
    #[error("a role with this key already exists")]
    RoleExists,
    #[error("the role is held by a member or a pending invitation")]
    RoleInUse,
    #[error("the user already has a personal organization")]
    PersonalOrganizationExists,
    #[error("the request is invalid")]
    Validation(Vec<FieldError>),
}

impl OrganizationError {
    /// Refusals that do not depend on the version the caller last saw: who is asking and
    /// whether the organization exists at all. They answer before an `If-Match` is compared
    /// (RFC 9110, section 13.2.1), so a stranger learns nothing of the version.
    pub fn precedes_preconditions(&self) -> bool {
        matches!(
            self,
            Self::ActorRequired
                | Self::PermissionDenied
                | Self::KeyRevoked
                | Self::NotFound("organization")
        )
    }

    /// The contract's error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::ActorRequired => "actor_required",
            Self::PermissionDenied => "permission_denied",
            Self::KeyRevoked => "unauthenticated",
            Self::NotFound(_) => "not_found",
            Self::AlreadyExists => "organization_exists",
            Self::LastOwner => "last_owner",
            Self::CannotRemoveSelf => "cannot_remove_self",
            Self::TargetNotAdmin => "target_not_admin",
            Self::OrganizationDeleted => "organization_deleted",
            Self::OrganizationNotDeleted => "organization_not_deleted",
            Self::RestoreWindowElapsed => "restore_window_elapsed",
            Self::ConfirmationMismatch => "confirmation_mismatch",
            Self::SlugTaken => "slug_taken",
            Self::AlreadyMember => "already_member",
            Self::InvitationPending | Self::OwnInvitationPending => "invitation_pending",
            Self::InvitationExpired => "invitation_expired",
            Self::InvalidInvitation => "invalid_invitation",
            Self::EmailMismatch => "email_mismatch",
            Self::FieldLocked(_) => "field_locked",
            Self::PersonalOrganization => "personal_organization",
            Self::SeatLimitReached => "seat_limit_reached",
            Self::GroupExists => "group_exists",
            Self::RoleExists => "role_exists",
            Self::RoleInUse => "role_in_use",
            Self::PersonalOrganizationExists => "personal_organization_exists",
            Self::Validation(_) => "validation_failed",
        }
    }

    pub fn validation(field: &str, message: &str) -> Self {
        Self::Validation(vec![FieldError::new(field, message)])
    }
}

impl From<FieldError> for OrganizationError {
    fn from(error: FieldError) -> Self {
        Self::Validation(vec![error])
    }
}

#[cfg(test)]
mod tests {
    use super::OrganizationError::*;

    #[test]
    fn only_refusals_of_the_caller_precede_an_if_match() {
        for refusal in [
            ActorRequired,
            PermissionDenied,
            KeyRevoked,
            NotFound("organization"),
        ] {
            assert!(refusal.precedes_preconditions(), "{refusal:?}");
        }
        for refusal in [
            NotFound("member"),
            LastOwner,
            OrganizationDeleted,
            SlugTaken,
        ] {
            assert!(!refusal.precedes_preconditions(), "{refusal:?}");
        }
    }
}
