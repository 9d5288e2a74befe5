//! The organization aggregate of orgledger: commands, events and the rules that decide
//! between them.
//!
//! Everything here is pure. The clock, ids and token hashes arrive inside the command, so a
//! decision depends on nothing but the aggregate's state and the command it is given.

mod access;
mod commands;
mod error;
mod events;
mod invitations;
mod members;
mod organization;
mod upcasting;
mod values;

pub use access::{Actor, Permission, Role};
pub use commands::{
    AcceptInvitation, Command, CreateOrganization, DeleteOrganization, NewMember,
    OrganizationCommand, PurgeOrganization, RemoveMember, ResendInvitation, RevokeInvitation,
    SendInvitation, TransferOwnership, UpdateMember, UpdateOrganization,
};
pub use error::{FieldError, OrganizationError};
pub use events::{
    Change, InvitationAccepted, InvitationResent, InvitationRevoked, InvitationSent, MemberJoined,
    MemberLeft, MemberProfileUpdated, MemberRemoved, MemberRoleChanged, OrganizationCreated,
    OrganizationDeleted, OrganizationEvent, OrganizationPurged, OrganizationRestored,
    OrganizationUpdated, OwnershipTransferred, ERASED, PERSONAL_DATA_FIELDS,
};
pub use organization::{
    Invitation, Lifecycle, Member, Organization, OrganizationKind, Settings, WorkflowMode,
    RESTORE_WINDOW_DAYS,
};
pub use upcasting::upcasters;
pub use values::{Email, ExpiryDays, LockedField, MaxUses, OrganizationName, Slug, UserId};
