//! Inviting people: send, resend, revoke, accept.

use std::collections::HashSet;

use chrono::{DateTime, Duration, Utc};

use crate::access::{Actor, Permission};
use crate::commands::{AcceptInvitation, ResendInvitation, RevokeInvitation, SendInvitation};
use crate::error::OrganizationError;
use crate::events::*;
use crate::organization::{Decision, Organization, OrganizationKind};
use crate::values::LockedField;
use uuid::Uuid;

impl Organization {
    pub(crate) fn send_invitation(
        &self,
        actor: &Actor,
        at: DateTime<Utc>,
        c: &SendInvitation,
    ) -> Decision {
        let authority = self.authorize(actor, Permission::InviteMembers)?;
        if self.kind == OrganizationKind::Personal {
            return Err(OrganizationError::PersonalOrganization);
        }
        // Only an owner invites an owner; nobody invites past their own role.
        if !self.reaches(&authority, &c.role) {
            return Err(OrganizationError::PermissionDenied);
        }
        self.ensure_role_exists("role", &c.role)?;
        if let Some(group_id) = c.group_id {
            if !self.groups.contains_key(&group_id) {
                return Err(OrganizationError::validation(
                    "group_id",
                    "is not a group of this organization",
                ));
            }
        }
        self.ensure_seats_for(c.max_uses.get(), at)?;
        if c.email.is_some() && c.max_uses.get() > 1 {
            return Err(OrganizationError::validation(
                "max_uses",
                "only a shareable link invitation (no email) can be used more than once",
            ));
        }
        validate_profile_text("first_name", c.first_name.as_deref())?;
        validate_profile_text("last_name", c.last_name.as_deref())?;
        validate_profile_text("title", c.title.as_deref())?;
        if let Some(email) = &c.email {
            self.ensure_not_a_member(email.as_str())?;
            self.ensure_no_pending_invitation(email.as_str(), at, None)?;
        }
        let days = c
            .expires_in_days
            .map_or(self.settings.default_invite_expiry_days, |days| days.days());
        Ok(vec![OrganizationEvent::InvitationSent(InvitationSent {
            invitation_id: c.invitation_id,
            email: c.email.as_ref().map(|email| email.as_str().to_owned()),
            role: c.role.clone(),
            first_name: c.first_name.clone(),
            last_name: c.last_name.clone(),
            title: c.title.clone(),
            group_id: c.group_id,
            max_uses: c.max_uses.get(),
            token_sha256: c.token_sha256.clone(),
            invited_by: actor.clone(),
            sent_at: at,
            expires_at: at + Duration::days(i64::from(days)),
        })])
    }

    /// A new token and a restarted expiry of the same length; the old token is dead.
    pub(crate) fn resend_invitation(
        &self,
        actor: &Actor,
        at: DateTime<Utc>,
        c: &ResendInvitation,
    ) -> Decision {
        let authority = self.authorize(actor, Permission::InviteMembers)?;
        let invitation = self
            .invitations
            .get(&c.invitation_id)
            .ok_or(OrganizationError::NotFound("invitation"))?;
        if !self.reaches(&authority, &invitation.role) {
            return Err(OrganizationError::PermissionDenied);
        }
        if let Some(email) = invitation.email.as_deref() {
            self.ensure_not_a_member(email)?;
        }
        // An expired invitation held no seat and stood in no one's way: resent, it is sent
        // anew, under the rules of a new one.
        if invitation.is_expired(at) {
            self.ensure_seats_for(invitation.max_uses.saturating_sub(invitation.uses), at)?;
            if let Some(email) = invitation.email.as_deref() {
                self.ensure_no_pending_invitation(email, at, Some(c.invitation_id))?;
            }
        }
        let lifetime = invitation.expires_at - invitation.sent_at;
        Ok(vec![OrganizationEvent::InvitationResent(
            InvitationResent {
                invitation_id: c.invitation_id,
                token_sha256: c.token_sha256.clone(),
                sent_at: at,
                expires_at: at + lifetime,
            },
        )])
    }

    pub(crate) fn revoke_invitation(
        &self,
        actor: &Actor,
        at: DateTime<Utc>,
        c: &RevokeInvitation,
    ) -> Decision {
        self.authorize(actor, Permission::InviteMembers)?;
        if !self.invitations.contains_key(&c.invitation_id) {
            return Err(OrganizationError::NotFound("invitation"));
        }
        Ok(vec![OrganizationEvent::InvitationRevoked(
            InvitationRevoked {
                invitation_id: c.invitation_id,
                revoked_at: at,
            },
        )])
    }

    /// The token proves the invitation; the actor must be the user who joins.
    pub(crate) fn accept_invitation(
        &self,
        actor: &Actor,
        at: DateTime<Utc>,
        c: &AcceptInvitation,
    ) -> Decision {
        if self.acting_user(actor)? != &c.user_id {
            return Err(OrganizationError::PermissionDenied);
        }
        let (invitation_id, invitation) = self
            .invitations
            .iter()
            .find(|(_, invitation)| invitation.token_sha256 == c.token_sha256)
            .ok_or(OrganizationError::InvalidInvitation)?;
        if invitation.is_expired(at) {
            return Err(OrganizationError::InvitationExpired);
        }
        let email = c.email.as_str();
        if invitation
            .email
            .as_deref()
            .is_some_and(|invited| invited != email)
        {
            return Err(OrganizationError::EmailMismatch);
        }
        let email_taken = self.members.values().any(|member| member.email == email);
        if self.members.contains_key(&c.user_id) || email_taken {
            return Err(OrganizationError::AlreadyMember);
        }
        // Joined through a link, an invitation addressed to the same email would stay
        // pending with no one left who could accept it.
        if invitation.email.is_none() {
            self.ensure_no_pending_invitation(email, at, Some(*invitation_id))
                .map_err(|_| OrganizationError::OwnInvitationPending)?;
        }
        crate::values::refuse_reordering("user_id", c.user_id.as_str())?;
        validate_profile_text("first_name", c.first_name.as_deref())?;
        validate_profile_text("last_name", c.last_name.as_deref())?;
        // Names and title given on the invitation become managed, locked values.
        let locked_fields = [
            (LockedField::FirstName, invitation.first_name.is_some()),
            (LockedField::LastName, invitation.last_name.is_some()),
            (LockedField::Title, invitation.title.is_some()),
        ]
        .into_iter()
        .filter_map(|(field, given)| given.then_some(field))
        .collect();
        Ok(vec![
            OrganizationEvent::InvitationAccepted(InvitationAccepted {
                invitation_id: *invitation_id,
                user_id: c.user_id.clone(),
                email: email.to_owned(),
                accepted_at: at,
            }),
            OrganizationEvent::MemberJoined(MemberJoined {
                user_id: c.user_id.clone(),
                email: email.to_owned(),
                first_name: invitation
                    .first_name
                    .clone()
                    .or_else(|| c.first_name.clone()),
                last_name: invitation.last_name.clone().or_else(|| c.last_name.clone()),
                title: invitation.title.clone(),
                image_url: None,
                role: invitation.role.clone(),
                locked_fields,
                // A group deleted since the invitation was sent is skipped.
                group_ids: invitation
                    .group_id
                    .filter(|group| self.groups.contains_key(group))
                    .into_iter()
                    .collect(),
                invitation_id: Some(*invitation_id),
                joined_at: at,
            }),
        ])
    }
}

impl Organization {
    /// Refused when `seats` more would take members plus pending invitations past the plan.
    fn ensure_seats_for(&self, seats: u32, at: DateTime<Utc>) -> Result<(), OrganizationError> {
        match self.plan.seats {
            Some(limit) if self.seats_in_use(at) + seats > limit => {
                Err(OrganizationError::SeatLimitReached)
            }
            _ => Ok(()),
        }
    }

    fn ensure_not_a_member(&self, email: &str) -> Result<(), OrganizationError> {
        if self.members.values().any(|member| member.email == email) {
            return Err(OrganizationError::AlreadyMember);
        }
        Ok(())
    }

    /// Refused when an invitation to `email` other than `except` is pending at `at`.
    fn ensure_no_pending_invitation(
        &self,
        email: &str,
        at: DateTime<Utc>,
        except: Option<Uuid>,
    ) -> Result<(), OrganizationError> {
        let pending = self.invitations.iter().any(|(id, invitation)| {
            Some(*id) != except
                && invitation.email.as_deref() == Some(email)
                && !invitation.is_expired(at)
        });
        if pending {
            return Err(OrganizationError::InvitationPending);
        }
        Ok(())
    }

    /// Members plus the seats pending invitations hold (a link holds its remaining uses).
    /// An invitation to an address that has joined since holds none: it can be neither
    /// accepted nor resent, so that person would take two seats. (A link is no longer
    /// accepted by such an address, but histories from before 2026-12-07 hold such joins.)
    pub fn seats_in_use(&self, now: DateTime<Utc>) -> u32 {
        let live = || {
            self.invitations
                .values()
                .filter(|invitation| !invitation.is_expired(now))
        };
        let invited: HashSet<&str> = live()
            .filter_map(|invitation| invitation.email.as_deref())
            .collect();
        // One pass over the members, and only when some pending invitation names an address.
        let joined: HashSet<&str> = if invited.is_empty() {
            HashSet::new()
        } else {
            self.members
                .values()
                .map(|member| member.email.as_str())
                .filter(|email| invited.contains(email))
                .collect()
        };
        let pending: u32 = live()
            .filter(|invitation| {
                invitation
                    .email
                    .as_deref()
                    .is_none_or(|email| !joined.contains(email))
            })
            .map(|invitation| invitation.max_uses.saturating_sub(invitation.uses))
            .sum();
        self.members.len() as u32 + pending
    }
}

/// Names and titles: at most 200 characters, no control or text-direction characters, not
/// blank.
pub(crate) fn validate_profile_text(
    field: &str,
    value: Option<&str>,
) -> Result<(), OrganizationError> {
    match value {
        Some(text)
            if text.trim().is_empty()
                || text.chars().count() > 200
                || text.chars().any(crate::values::is_hidden_control) =>
        {
            Err(OrganizationError::validation(
                field,
                "must be 1 to 200 characters with no control or text-direction characters \
                 (null clears it)",
            ))
        }
        _ => Ok(()),
    }
}
