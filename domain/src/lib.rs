//! The organization aggregate of orgledger: commands, events and the rules that decide
//! between them.
//!
//! Everything here is pure. The clock, ids and token hashes arrive inside the command, so a
//! decision depends on nothing but the aggregate's state and the command it is given.

mod access;
mod administration;
mod commands;
mod error;
mod events;
mod invitations;
mod members;
mod organization;
mod upcasting;
mod values;

pub use access::{is_role_key, Actor, Grant, Permission, Role, Scope};
pub use commands::{
    AcceptInvitation, AddAiProvider, AiProviderRef, ChangePlan, Command, CreateGroup,
    CreateOrganization, CreateServiceAccount, DefineRole, DeleteOrganization, GroupMembership,
    GroupRef, NewMember, OrganizationCommand, PurgeOrganization, RemoveMember, ResendInvitation,
    RevokeInvitation, RoleRef, RotateServiceAccountKey, SendInvitation, ServiceAccountRef,
    TransferOwnership, UpdateAiProvider, UpdateGroup, UpdateMember, UpdateOrganization,
};
pub use error::{FieldError, OrganizationError};
pub use events::{
    AiProviderAdded, AiProviderRemoved, AiProviderUpdated, Change, ClientRestrictionsChanged,
    GroupCreated, GroupDeleted, GroupMemberAdded, GroupMemberRemoved, GroupUpdated,
    InvitationAccepted, InvitationResent, InvitationRevoked, InvitationSent, MemberJoined,
    MemberLeft, MemberProfileUpdated, MemberRemoved, MemberRoleChanged, OrganizationCreated,
    OrganizationDeleted, OrganizationEvent, OrganizationPurged, OrganizationRestored,
    OrganizationUpdated, OwnershipTransferred, PlanChanged, RoleDefined, RoleDeleted,
    ServiceAccountCreated, ServiceAccountDeleted, ServiceAccountKeyRotated,
    SmartToolRoutingChanged, ERASED, PERSONAL_DATA_FIELDS, SECRET_FIELDS, USER_KEYED_FIELDS,
};
pub use organization::{
    Access, AiProvider, ClientAccess, CustomRole, Group, Invitation, Lifecycle, Member,
    Organization, OrganizationKind, Plan, ServiceAccount, Settings, StateRules, WorkflowMode,
    NO_SUCH_ROLE, RESTORE_WINDOW_DAYS,
};
pub use upcasting::upcasters;
pub use values::{Email, ExpiryDays, LockedField, MaxUses, OrganizationName, Secret, Slug, UserId};
