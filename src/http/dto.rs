//! The wire shapes of the contract. They are separate from commands and stored events and
//! converted at the edge, so the HTTP shape and the event history evolve independently.

use chrono::{DateTime, Utc};
use orgledger_domain::{
    Actor, Email, ExpiryDays, FieldError, Invitation, Lifecycle, LockedField, MaxUses, Member,
    Organization, OrganizationKind, OrganizationName, Role, Slug, UserId, WorkflowMode,
};
use orgledger_projections::audit::AuditEntryView;
use orgledger_projections::invitations::InvitationView;
use orgledger_projections::members::{MemberView, UserOrganizationView};
use orgledger_projections::organizations::OrganizationView;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

/// Tells an absent field (`None`) from an explicit `null` (`Some(None)`).
pub(crate) fn double_option<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// A field that may be left out but cannot be cleared: an explicit `null` is refused (`422`
/// naming it) rather than read as absent, which would answer a client meaning "clear it"
/// with a success that changed nothing.
pub(crate) fn not_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    match Option::<T>::deserialize(deserializer)? {
        Some(value) => Ok(Some(value)),
        None => Err(serde::de::Error::custom(
            "may be left out, but not null: it cannot be cleared",
        )),
    }
}

/// Collects every field error of a request instead of stopping at the first.
#[derive(Default)]
pub struct Problems(pub Vec<FieldError>);

impl Problems {
    pub fn check<T>(&mut self, result: Result<T, FieldError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.0.push(error);
                None
            }
        }
    }

    pub fn push(&mut self, field: &str, message: &str) {
        self.0.push(FieldError::new(field, message));
    }

    pub fn finish(self) -> Result<(), Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

pub fn parse_role(field: &str, raw: &str) -> Result<Role, FieldError> {
    Role::parse(raw).ok_or_else(|| {
        FieldError::new(
            field,
            "must be a built-in role (owner, admin, member, viewer) or a custom role's key",
        )
    })
}

/// An optional name or title: trimmed; empty means absent.
pub(super) fn optional_text(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// A profile edit's name or title: trimmed as [`optional_text`] trims, but a blank one is
/// kept for the domain to refuse, since `null` is how a profile field is cleared.
fn trimmed(value: Option<Option<String>>) -> Option<Option<String>> {
    value.map(|text| {
        text.map(|text| match text.trim() {
            "" => text,
            kept => kept.to_owned(),
        })
    })
}

// ---------------------------------------------------------------- responses

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SettingsDto {
    pub timezone: String,
    pub logo_url: Option<String>,
    /// `founder` or `organization`.
    pub workflow_mode: String,
    pub default_invite_expiry_days: i64,
    pub client_restrictions: ClientRestrictionsDto,
    pub smart_tool_routing: bool,
    // No plan or seats: billing is an owner's (`GET .../plan`), and every member reads this.
}

/// `allow` or `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AccessDto {
    Allow,
    Block,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientRestrictionsDto {
    pub default: AccessDto,
    /// Per-client overrides, by client name (e.g. `cursor`).
    #[serde(default)]
    pub clients: std::collections::BTreeMap<String, AccessDto>,
}

impl From<&orgledger_domain::ClientAccess> for ClientRestrictionsDto {
    fn from(access: &orgledger_domain::ClientAccess) -> Self {
        let dto = |access: &orgledger_domain::Access| match access {
            orgledger_domain::Access::Allow => AccessDto::Allow,
            orgledger_domain::Access::Block => AccessDto::Block,
        };
        Self {
            default: dto(&access.default),
            clients: access
                .clients
                .iter()
                .map(|(name, access)| (name.clone(), dto(access)))
                .collect(),
        }
    }
}

impl From<ClientRestrictionsDto> for orgledger_domain::ClientAccess {
    fn from(dto: ClientRestrictionsDto) -> Self {
        let access = |access: AccessDto| match access {
            AccessDto::Allow => orgledger_domain::Access::Allow,
            AccessDto::Block => orgledger_domain::Access::Block,
        };
        Self {
            default: access(dto.default),
            clients: dto
                .clients
                .into_iter()
                .map(|(name, a)| (name, access(a)))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrganizationDto {
    pub id: String,
    pub name: String,
    pub slug: String,
    /// `team` or `personal`.
    pub kind: String,
    /// `active` or `deleted`.
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub purge_after: Option<DateTime<Utc>>,
    pub member_count: i64,
    /// The last event's sequence; also the `ETag`.
    pub version: i64,
    pub settings: SettingsDto,
}

fn enum_name<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

impl OrganizationDto {
    pub fn from_state(state: &Organization, version: usize) -> Self {
        let (status, deleted_at, purge_after) = match &state.lifecycle {
            Lifecycle::Deleted {
                deleted_at,
                purge_after,
            } => ("deleted", Some(*deleted_at), Some(*purge_after)),
            Lifecycle::Purged => ("purged", None, None),
            _ => ("active", None, None),
        };
        Self {
            id: state.id.map(|id| id.to_string()).unwrap_or_default(),
            name: state.name.clone(),
            slug: state.slug.clone(),
            kind: enum_name(&state.kind),
            status: status.to_owned(),
            created_at: state.created_at.unwrap_or_default(),
            deleted_at,
            purge_after,
            member_count: state.members.len() as i64,
            version: version as i64,
            settings: SettingsDto {
                timezone: state.settings.timezone.clone(),
                logo_url: state.settings.logo_url.clone(),
                workflow_mode: enum_name(&state.settings.workflow_mode),
                default_invite_expiry_days: i64::from(state.settings.default_invite_expiry_days),
                client_restrictions: (&state.client_restrictions).into(),
                smart_tool_routing: state.smart_tool_routing,
            },
        }
    }
}

impl From<OrganizationView> for OrganizationDto {
    fn from(view: OrganizationView) -> Self {
        Self {
            id: view.id,
            name: view.name,
            slug: view.slug,
            kind: view.kind,
            status: view.status,
            created_at: view.created_at,
            deleted_at: view.deleted_at,
            purge_after: view.purge_after,
            member_count: view.member_count,
            version: view.version,
            settings: SettingsDto {
                timezone: view.settings.timezone,
                logo_url: view.settings.logo_url,
                workflow_mode: view.settings.workflow_mode,
                default_invite_expiry_days: view.settings.default_invite_expiry_days,
                client_restrictions: serde_json::from_value(view.settings.client_restrictions)
                    .unwrap_or(ClientRestrictionsDto {
                        default: AccessDto::Allow,
                        clients: Default::default(),
                    }),
                smart_tool_routing: view.settings.smart_tool_routing,
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MemberDto {
    pub user_id: String,
    /// `null` when the member's email is not known: a user who created the organization
    /// without giving one.
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub title: Option<String>,
    pub image_url: Option<String>,
    pub role: String,
    pub joined_at: DateTime<Utc>,
    /// Ids of the member's groups.
    pub groups: Vec<String>,
    /// Fields the member cannot edit themselves: `first_name`, `last_name`, `title`.
    pub locked_fields: Vec<String>,
}

/// A member's email as stored, where the empty text stands for "not given".
fn known(email: &str) -> Option<String> {
    (!email.is_empty()).then(|| email.to_owned())
}

impl MemberDto {
    pub fn from_state(user_id: &UserId, member: &Member) -> Self {
        Self {
            user_id: user_id.to_string(),
            email: known(&member.email),
            first_name: member.first_name.clone(),
            last_name: member.last_name.clone(),
            title: member.title.clone(),
            image_url: member.image_url.clone(),
            role: member.role.as_str().to_owned(),
            joined_at: member.joined_at,
            // Sorted, as the members read model lists them; the state keeps joining order.
            groups: {
                let mut groups: Vec<String> =
                    member.group_ids.iter().map(Uuid::to_string).collect();
                groups.sort_unstable();
                groups
            },
            locked_fields: member
                .locked_fields
                .iter()
                .map(|f| f.as_str().to_owned())
                .collect(),
        }
    }
}

impl From<MemberView> for MemberDto {
    fn from(view: MemberView) -> Self {
        Self {
            user_id: view.user_id,
            email: view.email,
            first_name: view.first_name,
            last_name: view.last_name,
            title: view.title,
            image_url: view.image_url,
            role: view.role,
            joined_at: view.joined_at,
            groups: view.groups,
            locked_fields: view.locked_fields,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ActorDto {
    /// `user`, `service_account` or `system`.
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
}

impl From<&Actor> for ActorDto {
    fn from(actor: &Actor) -> Self {
        Self {
            kind: actor.kind().to_owned(),
            id: actor.id(),
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InvitationDto {
    pub id: String,
    /// `null` for a shareable link invitation.
    pub email: Option<String>,
    pub role: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub title: Option<String>,
    pub group_id: Option<String>,
    /// `pending`, `accepted`, `revoked` or `expired`.
    pub status: String,
    pub invited_by: ActorDto,
    pub sent_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub max_uses: i64,
    pub uses: i64,
}

impl InvitationDto {
    pub fn from_state(id: Uuid, invitation: &Invitation, now: DateTime<Utc>) -> Self {
        Self {
            id: id.to_string(),
            email: invitation.email.clone(),
            role: invitation.role.as_str().to_owned(),
            first_name: invitation.first_name.clone(),
            last_name: invitation.last_name.clone(),
            title: invitation.title.clone(),
            group_id: invitation.group_id.map(|g| g.to_string()),
            status: if invitation.is_expired(now) {
                "expired"
            } else {
                "pending"
            }
            .to_owned(),
            invited_by: (&invitation.invited_by).into(),
            sent_at: invitation.sent_at,
            expires_at: invitation.expires_at,
            max_uses: i64::from(invitation.max_uses),
            uses: i64::from(invitation.uses),
        }
    }
}

impl From<InvitationView> for InvitationDto {
    fn from(view: InvitationView) -> Self {
        Self {
            id: view.id,
            email: view.email,
            role: view.role,
            first_name: view.first_name,
            last_name: view.last_name,
            title: view.title,
            group_id: view.group_id,
            status: view.status,
            invited_by: ActorDto {
                kind: view.invited_by.kind,
                id: view.invited_by.id,
            },
            sent_at: view.sent_at,
            expires_at: view.expires_at,
            max_uses: view.max_uses,
            uses: view.uses,
        }
    }
}

/// An invitation with its token: shown in this response only.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct IssuedInvitationDto {
    pub invitation: InvitationDto,
    #[schema(value_type = String)]
    pub token: orgledger_domain::Secret,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AcceptedInvitationDto {
    pub organization_id: String,
    pub member: MemberDto,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrganizationSummaryDto {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub kind: String,
    /// `active`, or `deleted` while an owner may still restore it.
    pub status: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UserOrganizationDto {
    pub organization: OrganizationSummaryDto,
    pub role: String,
    pub joined_at: DateTime<Utc>,
}

impl From<UserOrganizationView> for UserOrganizationDto {
    fn from(view: UserOrganizationView) -> Self {
        Self {
            organization: OrganizationSummaryDto {
                id: view.organization.id,
                name: view.organization.name,
                slug: view.organization.slug,
                kind: view.organization.kind,
                status: view.organization.status,
            },
            role: view.role,
            joined_at: view.joined_at,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResourceDto {
    /// `organization`, `member`, `invitation`, `group`, `service_account` or `settings`.
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditEntryDto {
    pub id: String,
    pub sequence: i64,
    pub occurred_at: DateTime<Utc>,
    pub actor: ActorDto,
    /// Dotted lower-case, e.g. `member.role_changed`.
    pub action: String,
    pub resource: ResourceDto,
    #[schema(value_type = Object)]
    pub details: Value,
    pub request_id: Option<String>,
}

impl From<AuditEntryView> for AuditEntryDto {
    fn from(view: AuditEntryView) -> Self {
        Self {
            id: view.id,
            sequence: view.sequence,
            occurred_at: view.occurred_at,
            actor: ActorDto {
                kind: view.actor.kind,
                id: view.actor.id,
            },
            action: view.action,
            resource: ResourceDto {
                kind: view.resource.kind,
                id: view.resource.id,
            },
            details: view.details,
            request_id: view.request_id,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RawEventDto {
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    #[schema(value_type = Object)]
    pub payload: Value,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
}

/// The organization as it stood at a past moment.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PastStateDto {
    pub organization: OrganizationDto,
    pub members: Vec<MemberDto>,
    /// Invitations pending at that moment.
    pub invitations: Vec<InvitationDto>,
    #[schema(value_type = Vec<Object>)]
    pub groups: Vec<Value>,
    pub as_of_sequence: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PurgedDto {
    pub id: String,
    /// Always `purged`.
    pub status: String,
    pub version: i64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthDto {
    pub status: String,
}

/// A `{items, next_cursor}` list type, for every list of the API.
macro_rules! page_type {
    ($name:ident, $item:ty) => {
        /// A page of a list; pass `next_cursor` as `cursor` for the next one.
        #[derive(Debug, Clone, Serialize, ToSchema)]
        pub struct $name {
            pub items: Vec<$item>,
            pub next_cursor: Option<String>,
        }
    };
}
page_type!(OrganizationPage, OrganizationDto);
page_type!(MemberPage, MemberDto);
page_type!(InvitationPage, InvitationDto);
page_type!(UserOrganizationPage, UserOrganizationDto);
page_type!(AuditEntryPage, AuditEntryDto);
page_type!(RawEventPage, RawEventDto);
pub(crate) use page_type;

// ---------------------------------------------------------------- requests

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KindDto {
    Team,
    Personal,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowModeDto {
    Founder,
    Organization,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LockedFieldDto {
    FirstName,
    LastName,
    Title,
}

impl From<LockedFieldDto> for LockedField {
    fn from(field: LockedFieldDto) -> Self {
        match field {
            LockedFieldDto::FirstName => Self::FirstName,
            LockedFieldDto::LastName => Self::LastName,
            LockedFieldDto::Title => Self::Title,
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OwnerRequest {
    pub user_id: String,
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrganizationRequest {
    pub name: String,
    /// Derived from the name when absent.
    pub slug: Option<String>,
    pub kind: Option<KindDto>,
    /// The first owner's profile; required when the caller acts as `system`.
    pub owner: Option<OwnerRequest>,
}

/// A validated create request.
pub struct NewOrganization {
    pub name: OrganizationName,
    pub slug: Option<Slug>,
    pub kind: OrganizationKind,
    pub owner: Option<(UserId, Email, Option<String>, Option<String>)>,
}

impl TryFrom<CreateOrganizationRequest> for NewOrganization {
    type Error = Vec<FieldError>;

    fn try_from(request: CreateOrganizationRequest) -> Result<Self, Self::Error> {
        let mut problems = Problems::default();
        let name = problems.check(OrganizationName::parse("name", &request.name));
        let slug = match &request.slug {
            Some(slug) => problems.check(Slug::parse("slug", slug)).map(Some),
            None => Some(None),
        };
        let owner = match request.owner {
            Some(owner) => {
                let user_id =
                    problems.check(UserId::parse_for_actor("owner.user_id", &owner.user_id));
                let email = problems.check(Email::parse("owner.email", &owner.email));
                user_id.zip(email).map(|(user_id, email)| {
                    Some((
                        user_id,
                        email,
                        optional_text(owner.first_name),
                        optional_text(owner.last_name),
                    ))
                })
            }
            None => Some(None),
        };
        problems.finish()?;
        Ok(Self {
            name: name.expect("checked"),
            slug: slug.expect("checked"),
            kind: match request.kind {
                Some(KindDto::Personal) => OrganizationKind::Personal,
                _ => OrganizationKind::Team,
            },
            owner: owner.expect("checked"),
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateOrganizationRequest {
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = String)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = String)]
    pub slug: Option<String>,
    /// An IANA time zone, e.g. `Europe/Paris`.
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = String)]
    pub timezone: Option<String>,
    /// An absolute http(s) URL; `null` removes the logo.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub logo_url: Option<Option<String>>,
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = WorkflowModeDto)]
    pub workflow_mode: Option<WorkflowModeDto>,
    /// 1 to 90.
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = i64)]
    pub default_invite_expiry_days: Option<i64>,
}

impl TryFrom<UpdateOrganizationRequest> for orgledger_domain::UpdateOrganization {
    type Error = Vec<FieldError>;

    fn try_from(request: UpdateOrganizationRequest) -> Result<Self, Self::Error> {
        let mut problems = Problems::default();
        let name = request
            .name
            .as_deref()
            .and_then(|name| problems.check(OrganizationName::parse("name", name)));
        let slug = request
            .slug
            .as_deref()
            .and_then(|slug| problems.check(Slug::parse("slug", slug)));
        if let Some(timezone) = &request.timezone {
            if timezone.parse::<chrono_tz::Tz>().is_err() {
                problems.push(
                    "timezone",
                    "must be an IANA time zone name such as Europe/Paris",
                );
            }
        }
        let days = request
            .default_invite_expiry_days
            .and_then(|days| problems.check(ExpiryDays::new("default_invite_expiry_days", days)));
        problems.finish()?;
        Ok(Self {
            name,
            slug,
            timezone: request.timezone,
            logo_url: request.logo_url,
            workflow_mode: request.workflow_mode.map(|mode| match mode {
                WorkflowModeDto::Founder => WorkflowMode::Founder,
                WorkflowModeDto::Organization => WorkflowMode::Organization,
            }),
            default_invite_expiry_days: days,
        })
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfirmNameRequest {
    /// Must equal the organization's current name.
    pub confirm_name: String,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferOwnershipRequest {
    pub new_owner_id: String,
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMemberRequest {
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = String)]
    pub role: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub first_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub last_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub title: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub image_url: Option<Option<String>>,
    #[serde(default, deserialize_with = "not_null")]
    #[schema(value_type = Vec<LockedFieldDto>)]
    pub locked_fields: Option<Vec<LockedFieldDto>>,
}

impl UpdateMemberRequest {
    pub fn into_command(
        self,
        user_id: UserId,
    ) -> Result<orgledger_domain::UpdateMember, Vec<FieldError>> {
        let mut problems = Problems::default();
        let role = self
            .role
            .as_deref()
            .and_then(|role| problems.check(parse_role("role", role)));
        problems.finish()?;
        Ok(orgledger_domain::UpdateMember {
            user_id,
            role,
            first_name: trimmed(self.first_name),
            last_name: trimmed(self.last_name),
            title: trimmed(self.title),
            image_url: self.image_url,
            locked_fields: self
                .locked_fields
                .map(|fields| fields.into_iter().map(Into::into).collect()),
        })
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendInvitationRequest {
    /// Leave out for a shareable link that anyone holding its token may accept.
    pub email: Option<String>,
    pub role: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub title: Option<String>,
    pub group_id: Option<Uuid>,
    /// 1 to 90; defaults to the organization's `default_invite_expiry_days`.
    pub expires_in_days: Option<i64>,
    /// For link invitations: 1 to 1000, default 1.
    pub max_uses: Option<i64>,
}

impl SendInvitationRequest {
    pub fn into_command(
        self,
        invitation_id: Uuid,
        token_sha256: String,
    ) -> Result<orgledger_domain::SendInvitation, Vec<FieldError>> {
        let mut problems = Problems::default();
        let email = self
            .email
            .as_deref()
            .and_then(|email| problems.check(Email::parse("email", email)));
        let role = problems.check(parse_role("role", &self.role));
        let expires_in_days = self
            .expires_in_days
            .and_then(|days| problems.check(ExpiryDays::new("expires_in_days", days)));
        let max_uses = match self.max_uses {
            Some(uses) => problems.check(MaxUses::new("max_uses", uses)),
            None => Some(MaxUses::ONE),
        };
        problems.finish()?;
        Ok(orgledger_domain::SendInvitation {
            invitation_id,
            email,
            role: role.expect("checked"),
            first_name: optional_text(self.first_name),
            last_name: optional_text(self.last_name),
            title: optional_text(self.title),
            group_id: self.group_id,
            expires_in_days,
            max_uses: max_uses.expect("checked"),
            token_sha256,
        })
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptInvitationRequest {
    #[schema(value_type = String)]
    pub token: orgledger_domain::Secret,
    pub user_id: String,
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}
