//! The organization aggregate: its state, how events change it ([`Organization::apply`]), and
//! the entry point for decisions ([`Organization::decide`]).

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::access::{Actor, Grant, Permission, Role, Scope};
use crate::commands::{
    Command, CreateOrganization, DeleteOrganization, OrganizationCommand, PurgeOrganization,
    TransferOwnership, UpdateOrganization,
};
use crate::error::OrganizationError;
use crate::events::*;
use crate::invitations::validate_profile_text;
use crate::values::refuse_reordering;
use crate::values::{LockedField, UserId};

/// Days a soft-deleted organization can still be restored.
pub const RESTORE_WINDOW_DAYS: i64 = 30;

/// What is said of a role key that is neither built in nor defined by the organization.
pub const NO_SUCH_ROLE: &str = "is neither a built-in role nor one this organization defined";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OrganizationKind {
    #[default]
    Team,
    Personal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowMode {
    Founder,
    #[default]
    Organization,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub timezone: String,
    pub logo_url: Option<String>,
    pub workflow_mode: WorkflowMode,
    pub default_invite_expiry_days: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            timezone: "UTC".to_owned(),
            logo_url: None,
            workflow_mode: WorkflowMode::default(),
            default_invite_expiry_days: 7,
        }
    }
}

/// Where an organization is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Lifecycle {
    #[default]
    Unborn,
    Active,
    Deleted {
        deleted_at: DateTime<Utc>,
        purge_after: DateTime<Utc>,
    },
    Purged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub title: Option<String>,
    pub image_url: Option<String>,
    pub role: Role,
    pub locked_fields: Vec<LockedField>,
    pub group_ids: Vec<Uuid>,
    pub joined_at: DateTime<Utc>,
}

/// An invitation that can still be accepted (or has expired without being revoked).
/// Accepted, used-up and revoked invitations leave the state: only read models keep them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invitation {
    pub email: Option<String>,
    pub role: Role,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub title: Option<String>,
    pub group_id: Option<Uuid>,
    pub max_uses: u32,
    pub uses: u32,
    pub token_sha256: String,
    pub invited_by: Actor,
    pub sent_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl Invitation {
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        now >= self.expires_at
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub description: Option<String>,
    pub member_ids: std::collections::BTreeSet<UserId>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAccount {
    pub name: String,
    pub description: Option<String>,
    pub scopes: Vec<Scope>,
    pub key_prefix: String,
    pub key_sha256: String,
    pub created_at: DateTime<Utc>,
    pub last_rotated_at: Option<DateTime<Utc>>,
}

/// `allow` or `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    #[default]
    Allow,
    Block,
}

/// Which AI clients may reach the organization: a default and per-client overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClientAccess {
    pub default: Access,
    pub clients: BTreeMap<String, Access>,
}

/// An AI provider; its API key lives only (sealed) in events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AiProvider {
    pub name: String,
    pub kind: String,
    pub enabled: bool,
    pub api_key_last4: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Plan {
    pub name: Option<String>,
    pub seats: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomRole {
    pub name: String,
    pub permissions: Vec<Permission>,
}

/// The state the rules need, and no more: it stays small whatever the length of history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Organization {
    pub id: Option<Uuid>,
    pub name: String,
    pub slug: String,
    pub kind: OrganizationKind,
    pub settings: Settings,
    pub lifecycle: Lifecycle,
    pub created_at: Option<DateTime<Utc>>,
    pub members: OrdMap<UserId, Member>,
    pub invitations: OrdMap<Uuid, Invitation>,
    #[serde(default)]
    pub groups: OrdMap<Uuid, Group>,
    #[serde(default)]
    pub service_accounts: OrdMap<Uuid, ServiceAccount>,
    #[serde(default)]
    pub client_restrictions: ClientAccess,
    #[serde(default)]
    pub smart_tool_routing: bool,
    #[serde(default)]
    pub ai_providers: OrdMap<Uuid, AiProvider>,
    #[serde(default)]
    pub plan: Plan,
    #[serde(default)]
    pub roles: OrdMap<String, CustomRole>,
    /// The rules that derived this state from its events.
    #[serde(default = "StateRules::unnamed")]
    pub rules: StateRules,
}

/// The rules by which events build an [`Organization`]. A snapshot derived under older rules
/// may differ from a replay under these, so a load ignores it and replays the events. Bump
/// [`StateRules::CURRENT`] whenever `apply` derives something differently from the same
/// events.
///
/// 2: a member who joins through an invitation into a group is among the group's members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StateRules(pub u32);

impl StateRules {
    pub const CURRENT: Self = Self(2);

    /// Snapshots written before states named their rules.
    fn unnamed() -> Self {
        Self(1)
    }
}

impl Default for StateRules {
    fn default() -> Self {
        Self::CURRENT
    }
}

/// What an actor may do here: a member's role, or a service account's scopes.
pub(crate) struct Authority<'a> {
    pub user: Option<&'a UserId>,
    pub role: Option<&'a Role>,
    account: Option<&'a ServiceAccount>,
}

impl Authority<'_> {
    pub fn is_owner(&self) -> bool {
        self.role == Some(&Role::Owner)
    }
}

impl Aggregate for Organization {
    const TYPE: &'static str = "organization";
    type Command = Command;
    type Event = OrganizationEvent;
    type Error = OrganizationError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Command,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), OrganizationError> {
        for event in self.decide(&command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: OrganizationEvent) {
        match event {
            OrganizationEvent::OrganizationCreated(e) => {
                self.id = Some(e.organization_id);
                self.name = e.name;
                self.slug = e.slug;
                self.kind = e.kind;
                self.settings = e.settings;
                self.lifecycle = Lifecycle::Active;
                self.created_at = Some(e.created_at);
            }
            OrganizationEvent::OrganizationUpdated(e) => {
                let settings = &mut self.settings;
                if let Some(change) = e.name {
                    self.name = change.to;
                }
                if let Some(change) = e.slug {
                    self.slug = change.to;
                }
                if let Some(change) = e.timezone {
                    settings.timezone = change.to;
                }
                if let Some(change) = e.logo_url {
                    settings.logo_url = change.to;
                }
                if let Some(change) = e.workflow_mode {
                    settings.workflow_mode = change.to;
                }
                if let Some(change) = e.default_invite_expiry_days {
                    settings.default_invite_expiry_days = change.to;
                }
            }
            OrganizationEvent::OrganizationDeleted(e) => {
                self.lifecycle = Lifecycle::Deleted {
                    deleted_at: e.deleted_at,
                    purge_after: e.purge_after,
                };
            }
            OrganizationEvent::OrganizationRestored(_) => self.lifecycle = Lifecycle::Active,
            OrganizationEvent::OrganizationPurged(_) => {
                let id = self.id;
                *self = Self {
                    id,
                    lifecycle: Lifecycle::Purged,
                    ..Self::default()
                };
            }
            OrganizationEvent::OwnershipTransferred(e) => {
                if let Some(member) = self.members.get_mut(&e.to_user_id) {
                    member.role = Role::Owner;
                }
                if let Some(member) = self.members.get_mut(&e.from_user_id) {
                    member.role = Role::Admin;
                }
            }
            OrganizationEvent::InvitationSent(e) => {
                self.invitations.insert(
                    e.invitation_id,
                    Invitation {
                        email: e.email,
                        role: e.role,
                        first_name: e.first_name,
                        last_name: e.last_name,
                        title: e.title,
                        group_id: e.group_id,
                        max_uses: e.max_uses,
                        uses: 0,
                        token_sha256: e.token_sha256,
                        invited_by: e.invited_by,
                        sent_at: e.sent_at,
                        expires_at: e.expires_at,
                    },
                );
            }
            OrganizationEvent::InvitationResent(e) => {
                if let Some(invitation) = self.invitations.get_mut(&e.invitation_id) {
                    invitation.token_sha256 = e.token_sha256;
                    invitation.sent_at = e.sent_at;
                    invitation.expires_at = e.expires_at;
                }
            }
            OrganizationEvent::InvitationRevoked(e) => {
                self.invitations.remove(&e.invitation_id);
            }
            OrganizationEvent::InvitationAccepted(e) => {
                if let Some(invitation) = self.invitations.get_mut(&e.invitation_id) {
                    invitation.uses += 1;
                    if invitation.uses >= invitation.max_uses {
                        self.invitations.remove(&e.invitation_id);
                    }
                }
            }
            OrganizationEvent::MemberJoined(e) => {
                for group_id in &e.group_ids {
                    if let Some(group) = self.groups.get_mut(group_id) {
                        group.member_ids.insert(e.user_id.clone());
                    }
                }
                self.members.insert(
                    e.user_id,
                    Member {
                        email: e.email,
                        first_name: e.first_name,
                        last_name: e.last_name,
                        title: e.title,
                        image_url: e.image_url,
                        role: e.role,
                        locked_fields: e.locked_fields,
                        group_ids: e.group_ids,
                        joined_at: e.joined_at,
                    },
                );
            }
            OrganizationEvent::MemberRoleChanged(e) => {
                if let Some(member) = self.members.get_mut(&e.user_id) {
                    member.role = e.to;
                }
            }
            OrganizationEvent::MemberProfileUpdated(e) => {
                if let Some(member) = self.members.get_mut(&e.user_id) {
                    if let Some(change) = e.first_name {
                        member.first_name = change.to;
                    }
                    if let Some(change) = e.last_name {
                        member.last_name = change.to;
                    }
                    if let Some(change) = e.title {
                        member.title = change.to;
                    }
                    if let Some(change) = e.image_url {
                        member.image_url = change.to;
                    }
                    if let Some(change) = e.locked_fields {
                        member.locked_fields = change.to;
                    }
                }
            }
            OrganizationEvent::MemberRemoved(MemberRemoved { user_id, .. })
            | OrganizationEvent::MemberLeft(MemberLeft { user_id, .. }) => {
                self.members.remove(&user_id);
                // Persistent maps: only the groups that change are copied.
                let holding: Vec<Uuid> = self
                    .groups
                    .iter()
                    .filter(|(_, group)| group.member_ids.contains(&user_id))
                    .map(|(id, _)| *id)
                    .collect();
                for id in holding {
                    if let Some(group) = self.groups.get_mut(&id) {
                        group.member_ids.remove(&user_id);
                    }
                }
            }
            OrganizationEvent::GroupCreated(e) => {
                self.groups.insert(
                    e.group_id,
                    Group {
                        name: e.name,
                        description: e.description,
                        member_ids: Default::default(),
                        created_at: e.created_at,
                    },
                );
            }
            OrganizationEvent::GroupUpdated(e) => {
                if let Some(group) = self.groups.get_mut(&e.group_id) {
                    if let Some(change) = e.name {
                        group.name = change.to;
                    }
                    if let Some(change) = e.description {
                        group.description = change.to;
                    }
                }
            }
            OrganizationEvent::GroupDeleted(e) => {
                self.groups.remove(&e.group_id);
                let in_group: Vec<UserId> = self
                    .members
                    .iter()
                    .filter(|(_, member)| member.group_ids.contains(&e.group_id))
                    .map(|(user_id, _)| user_id.clone())
                    .collect();
                for user_id in in_group {
                    if let Some(member) = self.members.get_mut(&user_id) {
                        member.group_ids.retain(|id| *id != e.group_id);
                    }
                }
            }
            OrganizationEvent::GroupMemberAdded(e) => {
                if let Some(group) = self.groups.get_mut(&e.group_id) {
                    group.member_ids.insert(e.user_id.clone());
                }
                if let Some(member) = self.members.get_mut(&e.user_id) {
                    if !member.group_ids.contains(&e.group_id) {
                        member.group_ids.push(e.group_id);
                    }
                }
            }
            OrganizationEvent::GroupMemberRemoved(e) => {
                if let Some(group) = self.groups.get_mut(&e.group_id) {
                    group.member_ids.remove(&e.user_id);
                }
                if let Some(member) = self.members.get_mut(&e.user_id) {
                    member.group_ids.retain(|id| *id != e.group_id);
                }
            }
            OrganizationEvent::ServiceAccountCreated(e) => {
                self.service_accounts.insert(
                    e.service_account_id,
                    ServiceAccount {
                        name: e.name,
                        description: e.description,
                        scopes: e.scopes,
                        key_prefix: e.key_prefix,
                        key_sha256: e.key_sha256,
                        created_at: e.created_at,
                        last_rotated_at: None,
                    },
                );
            }
            OrganizationEvent::ServiceAccountKeyRotated(e) => {
                if let Some(account) = self.service_accounts.get_mut(&e.service_account_id) {
                    account.key_prefix = e.key_prefix;
                    account.key_sha256 = e.key_sha256;
                    account.last_rotated_at = Some(e.rotated_at);
                }
            }
            OrganizationEvent::ServiceAccountDeleted(e) => {
                self.service_accounts.remove(&e.service_account_id);
            }
            OrganizationEvent::ClientRestrictionsChanged(e) => self.client_restrictions = e.to,
            OrganizationEvent::SmartToolRoutingChanged(e) => self.smart_tool_routing = e.enabled.to,
            OrganizationEvent::AiProviderAdded(e) => {
                self.ai_providers.insert(
                    e.provider_id,
                    AiProvider {
                        name: e.name,
                        kind: e.kind,
                        enabled: e.enabled,
                        api_key_last4: e.api_key_last4,
                    },
                );
            }
            OrganizationEvent::AiProviderUpdated(e) => {
                if let Some(provider) = self.ai_providers.get_mut(&e.provider_id) {
                    if let Some(change) = e.enabled {
                        provider.enabled = change.to;
                    }
                    if let Some(change) = e.api_key_last4 {
                        provider.api_key_last4 = change.to;
                    }
                }
            }
            OrganizationEvent::AiProviderRemoved(e) => {
                self.ai_providers.remove(&e.provider_id);
            }
            OrganizationEvent::PlanChanged(e) => {
                self.plan = Plan {
                    name: e.plan.to,
                    seats: e.seats.to,
                };
            }
            OrganizationEvent::RoleDefined(e) => {
                self.roles.insert(
                    e.key,
                    CustomRole {
                        name: e.name,
                        permissions: e.permissions,
                    },
                );
            }
            OrganizationEvent::RoleDeleted(e) => {
                self.roles.remove(&e.key);
            }
        }
    }
}

/// The result of a decision: the events to append, possibly none.
pub(crate) type Decision = Result<Vec<OrganizationEvent>, OrganizationError>;

impl Organization {
    /// Decides what a command does to this organization. Pure: same state, same command,
    /// same events.
    pub fn decide(&self, command: &Command) -> Decision {
        let (actor, at) = (&command.actor, command.at);
        self.ensure_key_still_opens(command)?;
        match &command.body {
            OrganizationCommand::CreateOrganization(c) => self.create(actor, at, c),
            OrganizationCommand::RestoreOrganization => self.restore(actor, at),
            OrganizationCommand::PurgeOrganization(c) => self.purge(actor, at, c),
            body => {
                // A stranger is refused as on a live organization, learning nothing of its
                // deletion; an invitee stands on its token, and is told.
                let invitee = matches!(body, OrganizationCommand::AcceptInvitation(_));
                if matches!(self.lifecycle, Lifecycle::Deleted { .. })
                    && !invitee
                    && !self.has_standing(actor)
                {
                    return Err(OrganizationError::PermissionDenied);
                }
                self.ensure_accepts_commands()?;
                match body {
                    OrganizationCommand::UpdateOrganization(c) => self.update(actor, c),
                    OrganizationCommand::DeleteOrganization(c) => self.delete(actor, at, c),
                    OrganizationCommand::TransferOwnership(c) => self.transfer_ownership(actor, c),
                    OrganizationCommand::SendInvitation(c) => self.send_invitation(actor, at, c),
                    OrganizationCommand::ResendInvitation(c) => {
                        self.resend_invitation(actor, at, c)
                    }
                    OrganizationCommand::RevokeInvitation(c) => {
                        self.revoke_invitation(actor, at, c)
                    }
                    OrganizationCommand::AcceptInvitation(c) => {
                        self.accept_invitation(actor, at, c)
                    }
                    OrganizationCommand::UpdateMember(c) => self.update_member(actor, c),
                    OrganizationCommand::RemoveMember(c) => self.remove_member(actor, at, c),
                    OrganizationCommand::LeaveOrganization => self.leave(actor, at),
                    OrganizationCommand::CreateOrganization(_)
                    | OrganizationCommand::RestoreOrganization
                    | OrganizationCommand::PurgeOrganization(_) => {
                        unreachable!("handled by the outer match")
                    }
                    other => self.administer(actor, at, other),
                }
            }
        }
    }

    /// Refuses `actor` a command that needs `permission` as `decide` would before reading
    /// any of the command's values: a stranger to a deleted organization, an organization that
    /// takes no commands, an actor without the permission. An edge that finds a value it
    /// cannot accept asks this first, so a caller who may not act at all is told that, and
    /// not which value was wrong.
    pub fn may_issue(
        &self,
        actor: &Actor,
        permission: Permission,
    ) -> Result<(), OrganizationError> {
        if matches!(self.lifecycle, Lifecycle::Deleted { .. }) && !self.has_standing(actor) {
            return Err(OrganizationError::PermissionDenied);
        }
        self.ensure_accepts_commands()?;
        self.authorize(actor, permission).map(|_| ())
    }

    /// Whether `actor` has standing here: `system`, a member, or one of its service
    /// accounts. Anyone else learns nothing of the organization from a refusal.
    pub fn has_standing(&self, actor: &Actor) -> bool {
        match actor {
            Actor::System => true,
            Actor::User(user_id) => self.members.contains_key(user_id),
            Actor::ServiceAccount(id) => self.service_accounts.contains_key(id),
        }
    }

    pub fn exists(&self) -> bool {
        !matches!(self.lifecycle, Lifecycle::Unborn | Lifecycle::Purged)
    }

    pub fn owner_count(&self) -> usize {
        self.members
            .values()
            .filter(|member| member.role == Role::Owner)
            .count()
    }

    /// A service account acts only with its current key: one rotated since the request was
    /// authenticated refuses the command. An account this organization does not hold (deleted
    /// meanwhile, or another's) is left to the authorization that follows, which refuses it
    /// as a stranger.
    fn ensure_key_still_opens(&self, command: &Command) -> Result<(), OrganizationError> {
        let Actor::ServiceAccount(id) = &command.actor else {
            return Ok(());
        };
        match self.service_accounts.get(id) {
            Some(account) if command.key_sha256.as_deref() != Some(&account.key_sha256) => {
                Err(OrganizationError::KeyRevoked)
            }
            _ => Ok(()),
        }
    }

    /// Refuses everything on an organization that is not live.
    fn ensure_accepts_commands(&self) -> Result<(), OrganizationError> {
        match self.lifecycle {
            Lifecycle::Active => Ok(()),
            Lifecycle::Deleted { .. } => Err(OrganizationError::OrganizationDeleted),
            Lifecycle::Unborn | Lifecycle::Purged => {
                Err(OrganizationError::NotFound("organization"))
            }
        }
    }

    /// The actor's standing here: a user's role (if a member) or a service account's
    /// scopes. `system` must name a user for any command but create and scheduled purge.
    pub(crate) fn authority<'a>(
        &'a self,
        actor: &'a Actor,
    ) -> Result<Authority<'a>, OrganizationError> {
        match actor {
            Actor::System => Err(OrganizationError::ActorRequired),
            Actor::User(user_id) => Ok(Authority {
                user: Some(user_id),
                role: self.members.get(user_id).map(|member| &member.role),
                account: None,
            }),
            Actor::ServiceAccount(id) => match self.service_accounts.get(id) {
                Some(account) => Ok(Authority {
                    user: None,
                    role: None,
                    account: Some(account),
                }),
                None => Err(OrganizationError::PermissionDenied),
            },
        }
    }

    /// What an authority holds, for [`Grant::permits`]: the one check for built-in roles,
    /// custom roles and service-account scopes.
    pub(crate) fn grant<'a>(&'a self, authority: &Authority<'a>) -> Grant<'a> {
        match (authority.account, authority.role) {
            (Some(account), _) => Grant::Scopes(&account.scopes),
            (None, Some(role)) => self.grant_of(role),
            (None, None) => Grant::Nothing,
        }
    }

    /// What a role grants here (nothing, for a custom role not defined).
    fn grant_of<'a>(&'a self, role: &'a Role) -> Grant<'a> {
        match role {
            Role::Custom(key) => self
                .roles
                .get(key)
                .map_or(Grant::Nothing, |role| Grant::Custom(&role.permissions)),
            role => Grant::BuiltIn(role),
        }
    }

    /// Whether `authority` holds every power `role` grants. Nobody gives a role that reaches
    /// further than their own, nor changes or removes a member who holds one: an owner
    /// reaches every role, an admin every role but owner, and a custom role or a service
    /// account only the roles its permissions or scopes cover. Viewing is no power here:
    /// every member has it.
    pub(crate) fn reaches(&self, authority: &Authority<'_>, role: &Role) -> bool {
        let (held, given) = (self.grant(authority), self.grant_of(role));
        Permission::ALL
            .into_iter()
            .filter(|power| *power != Permission::ViewOrganization)
            .all(|power| !given.permits(power) || held.permits(power))
    }

    /// Whether `authority` holds what each of `scopes` allows: a service account's key is
    /// handed (created or rotated) only to someone who could do all it does.
    pub(crate) fn reaches_scopes(&self, authority: &Authority<'_>, scopes: &[Scope]) -> bool {
        let held = self.grant(authority);
        scopes.iter().all(|scope| held.permits(scope.permission()))
    }

    /// The actor's authority, if it holds `permission`.
    pub(crate) fn authorize<'a>(
        &'a self,
        actor: &'a Actor,
        permission: Permission,
    ) -> Result<Authority<'a>, OrganizationError> {
        let authority = self.authority(actor)?;
        if self.grant(&authority).permits(permission) {
            Ok(authority)
        } else {
            Err(OrganizationError::PermissionDenied)
        }
    }

    /// The user behind a command that only users issue (accept, leave).
    pub(crate) fn acting_user<'a>(
        &self,
        actor: &'a Actor,
    ) -> Result<&'a UserId, OrganizationError> {
        match actor {
            Actor::User(user_id) => Ok(user_id),
            Actor::System => Err(OrganizationError::ActorRequired),
            Actor::ServiceAccount(_) => Err(OrganizationError::PermissionDenied),
        }
    }

    /// A role that can be held here: built in, or defined by this organization.
    pub(crate) fn ensure_role_exists(
        &self,
        field: &str,
        role: &Role,
    ) -> Result<(), OrganizationError> {
        match role {
            Role::Custom(key) if !self.roles.contains_key(key) => {
                Err(OrganizationError::validation(field, NO_SUCH_ROLE))
            }
            _ => Ok(()),
        }
    }

    fn create(&self, actor: &Actor, at: DateTime<Utc>, c: &CreateOrganization) -> Decision {
        if self.lifecycle != Lifecycle::Unborn {
            return Err(OrganizationError::AlreadyExists);
        }
        match actor {
            Actor::System => {}
            Actor::User(user_id) if *user_id == c.owner.user_id => {}
            Actor::User(_) => {
                return Err(OrganizationError::validation(
                    "owner.user_id",
                    "must be the acting user's own id",
                ))
            }
            Actor::ServiceAccount(_) => return Err(OrganizationError::PermissionDenied),
        }
        refuse_reordering("name", c.name.as_str())?;
        refuse_reordering("owner.user_id", c.owner.user_id.as_str())?;
        validate_profile_text("owner.first_name", c.owner.first_name.as_deref())?;
        validate_profile_text("owner.last_name", c.owner.last_name.as_deref())?;
        Ok(vec![
            OrganizationEvent::OrganizationCreated(OrganizationCreated {
                organization_id: c.organization_id,
                name: c.name.as_str().to_owned(),
                slug: c.slug.as_str().to_owned(),
                kind: c.kind,
                settings: Settings::default(),
                created_at: at,
            }),
            OrganizationEvent::MemberJoined(MemberJoined {
                user_id: c.owner.user_id.clone(),
                email: c
                    .owner
                    .email
                    .as_ref()
                    .map_or_else(String::new, |email| email.as_str().to_owned()),
                first_name: c.owner.first_name.clone(),
                last_name: c.owner.last_name.clone(),
                title: None,
                image_url: None,
                role: Role::Owner,
                locked_fields: Vec::new(),
                group_ids: Vec::new(),
                invitation_id: None,
                joined_at: at,
            }),
        ])
    }

    fn update(&self, actor: &Actor, c: &UpdateOrganization) -> Decision {
        self.authorize(actor, Permission::ManageSettings)?;
        // Only a new value is judged: one stored under older rules, sent back unchanged with
        // the rest of the settings, is no change.
        if let Some(Some(url)) = &c.logo_url {
            if self.settings.logo_url.as_ref() != Some(url) {
                crate::members::validate_url("logo_url", url)?;
            }
        }
        if let Some(timezone) = &c.timezone {
            validate_timezone_shape(timezone)?;
        }
        // Only a new name is judged: one held before, sent back unchanged, is no change.
        if let Some(name) = c.name.as_ref().filter(|name| name.as_str() != self.name) {
            refuse_reordering("name", name.as_str())?;
        }
        let settings = &self.settings;
        let update = OrganizationUpdated {
            name: c
                .name
                .as_ref()
                .and_then(|name| Change::between(self.name.clone(), name.as_str().to_owned())),
            slug: c
                .slug
                .as_ref()
                .and_then(|slug| Change::between(self.slug.clone(), slug.as_str().to_owned())),
            timezone: c
                .timezone
                .as_ref()
                .and_then(|tz| Change::between(settings.timezone.clone(), tz.clone())),
            logo_url: c
                .logo_url
                .as_ref()
                .and_then(|url| Change::between(settings.logo_url.clone(), url.clone())),
            workflow_mode: c
                .workflow_mode
                .and_then(|mode| Change::between(settings.workflow_mode, mode)),
            default_invite_expiry_days: c
                .default_invite_expiry_days
                .and_then(|days| Change::between(settings.default_invite_expiry_days, days.days())),
        };
        if update.is_empty() {
            return Ok(Vec::new());
        }
        Ok(vec![OrganizationEvent::OrganizationUpdated(update)])
    }

    fn delete(&self, actor: &Actor, at: DateTime<Utc>, c: &DeleteOrganization) -> Decision {
        self.authorize(actor, Permission::DeleteOrganization)?;
        if c.confirm_name != self.name {
            return Err(OrganizationError::ConfirmationMismatch);
        }
        Ok(vec![OrganizationEvent::OrganizationDeleted(
            OrganizationDeleted {
                deleted_at: at,
                purge_after: at + Duration::days(RESTORE_WINDOW_DAYS),
            },
        )])
    }

    fn restore(&self, actor: &Actor, at: DateTime<Utc>) -> Decision {
        let purge_after = match self.lifecycle {
            Lifecycle::Deleted { purge_after, .. } => purge_after,
            Lifecycle::Active => {
                self.authorize(actor, Permission::DeleteOrganization)?;
                return Err(OrganizationError::OrganizationNotDeleted);
            }
            Lifecycle::Unborn | Lifecycle::Purged => {
                return Err(OrganizationError::NotFound("organization"))
            }
        };
        self.authorize(actor, Permission::DeleteOrganization)?;
        if at >= purge_after {
            return Err(OrganizationError::RestoreWindowElapsed);
        }
        Ok(vec![OrganizationEvent::OrganizationRestored(
            OrganizationRestored { restored_at: at },
        )])
    }

    /// Force delete: by an owner at any time, or by `system` once the restore window of a
    /// soft-deleted organization has elapsed (the scheduled purge).
    fn purge(&self, actor: &Actor, at: DateTime<Utc>, c: &PurgeOrganization) -> Decision {
        if !self.exists() {
            return Err(OrganizationError::NotFound("organization"));
        }
        let window_elapsed =
            matches!(self.lifecycle, Lifecycle::Deleted { purge_after, .. } if at >= purge_after);
        if !(window_elapsed && *actor == Actor::System) {
            self.authorize(actor, Permission::DeleteOrganization)?;
        }
        if c.confirm_name != self.name {
            return Err(OrganizationError::ConfirmationMismatch);
        }
        Ok(vec![OrganizationEvent::OrganizationPurged(
            OrganizationPurged { purged_at: at },
        )])
    }

    fn transfer_ownership(&self, actor: &Actor, c: &TransferOwnership) -> Decision {
        let authority = self.authorize(actor, Permission::TransferOwnership)?;
        let Some(actor_id) = authority.user.filter(|_| authority.is_owner()) else {
            return Err(OrganizationError::PermissionDenied);
        };
        match self.members.get(&c.new_owner_id) {
            Some(member) if member.role == Role::Admin => {}
            _ => return Err(OrganizationError::TargetNotAdmin),
        }
        Ok(vec![OrganizationEvent::OwnershipTransferred(
            OwnershipTransferred {
                from_user_id: actor_id.clone(),
                to_user_id: c.new_owner_id.clone(),
            },
        )])
    }
}

/// An IANA zone name such as `Europe/Paris` or `UTC`. The service checks it against the
/// zone database; here only its shape is checked, to keep the domain free of that table.
fn validate_timezone_shape(timezone: &str) -> Result<(), OrganizationError> {
    let valid = (1..=64).contains(&timezone.len())
        && timezone
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '+'));
    if valid {
        Ok(())
    } else {
        Err(OrganizationError::validation(
            "timezone",
            "must be an IANA time zone name such as Europe/Paris",
        ))
    }
}
