//! Members: role changes, profile edits and locks, removal, leaving, ownership rules.

use chrono::{DateTime, Utc};

use crate::access::{Actor, Permission, Role};
use crate::commands::{RemoveMember, UpdateMember};
use crate::error::OrganizationError;
use crate::events::*;
use crate::invitations::validate_profile_text;
use crate::organization::{Decision, Organization};
use crate::values::LockedField;

impl Organization {
    /// Role, profile and locks in one atomic patch.
    pub(crate) fn update_member(&self, actor: &Actor, c: &UpdateMember) -> Decision {
        let authority = self.authority(actor)?;
        let manages = self.grant(&authority).permits(Permission::ManageMembers);
        // Who may edit no one but themselves, and a stranger, learn nothing of who else is a
        // member: refused before the member is looked up.
        if !manages && (authority.role.is_none() || authority.user != Some(&c.user_id)) {
            return Err(OrganizationError::PermissionDenied);
        }
        let target = self
            .members
            .get(&c.user_id)
            .ok_or(OrganizationError::NotFound("member"))?;

        let role = c
            .role
            .clone()
            .and_then(|role| Change::between(target.role.clone(), role));
        let mut locked_fields = c.locked_fields.clone().map(|mut fields| {
            fields.sort();
            fields.dedup();
            fields
        });
        let locked_change = locked_fields
            .take()
            .and_then(|fields| Change::between(target.locked_fields.clone(), fields));
        let profile = MemberProfileUpdated {
            user_id: c.user_id.clone(),
            first_name: patch(&target.first_name, &c.first_name),
            last_name: patch(&target.last_name, &c.last_name),
            title: patch(&target.title, &c.title),
            image_url: patch(&target.image_url, &c.image_url),
            locked_fields: locked_change,
        };

        if manages {
            // Only an owner may touch an owner or make one; nobody reaches past their own role.
            let beyond = |role: &Role| !self.reaches(&authority, role);
            if beyond(&target.role) || c.role.as_ref().is_some_and(beyond) {
                return Err(OrganizationError::PermissionDenied);
            }
            if let Some(change) = &role {
                self.ensure_role_exists("role", &change.to)?;
            }
        } else {
            // Self-service: one's own profile, minus locked fields.
            let is_self = authority.user == Some(&c.user_id);
            if !is_self || role.is_some() || profile.locked_fields.is_some() {
                return Err(OrganizationError::PermissionDenied);
            }
            for (field, change) in [
                (LockedField::FirstName, &profile.first_name),
                (LockedField::LastName, &profile.last_name),
                (LockedField::Title, &profile.title),
            ] {
                if change.is_some() && target.locked_fields.contains(&field) {
                    return Err(OrganizationError::FieldLocked(field.as_str()));
                }
            }
        }
        if let Some(change) = &role {
            if change.from == Role::Owner && self.owner_count() == 1 {
                return Err(OrganizationError::LastOwner);
            }
        }
        // Only a new value is judged: one stored under older rules, sent back unchanged with
        // the rest of a profile, is no change.
        for (field, value, held) in [
            ("first_name", &c.first_name, &target.first_name),
            ("last_name", &c.last_name, &target.last_name),
            ("title", &c.title, &target.title),
        ] {
            if let Some(value) = value.as_ref().filter(|value| *value != held) {
                validate_profile_text(field, value.as_deref())?;
            }
        }
        if let Some(Some(url)) = &c.image_url {
            if target.image_url.as_ref() != Some(url) {
                validate_url("image_url", url)?;
            }
        }

        let mut events = Vec::new();
        if let Some(change) = role {
            events.push(OrganizationEvent::MemberRoleChanged(MemberRoleChanged {
                user_id: c.user_id.clone(),
                from: change.from,
                to: change.to,
            }));
        }
        let profile_changed = profile.first_name.is_some()
            || profile.last_name.is_some()
            || profile.title.is_some()
            || profile.image_url.is_some()
            || profile.locked_fields.is_some();
        if profile_changed {
            events.push(OrganizationEvent::MemberProfileUpdated(profile));
        }
        Ok(events)
    }

    pub(crate) fn remove_member(
        &self,
        actor: &Actor,
        at: DateTime<Utc>,
        c: &RemoveMember,
    ) -> Decision {
        let authority = self.authority(actor)?;
        if authority.user == Some(&c.user_id) && authority.role.is_some() {
            return Err(OrganizationError::CannotRemoveSelf);
        }
        let authority = self.authorize(actor, Permission::ManageMembers)?;
        let target = self
            .members
            .get(&c.user_id)
            .ok_or(OrganizationError::NotFound("member"))?;
        if !self.reaches(&authority, &target.role) {
            return Err(OrganizationError::PermissionDenied);
        }
        if target.role == Role::Owner && self.owner_count() == 1 {
            return Err(OrganizationError::LastOwner);
        }
        Ok(vec![OrganizationEvent::MemberRemoved(MemberRemoved {
            user_id: c.user_id.clone(),
            removed_at: at,
        })])
    }

    pub(crate) fn leave(&self, actor: &Actor, at: DateTime<Utc>) -> Decision {
        let actor_id = self.acting_user(actor)?;
        let member = self
            .members
            .get(actor_id)
            .ok_or(OrganizationError::PermissionDenied)?;
        if member.role == Role::Owner && self.owner_count() == 1 {
            return Err(OrganizationError::LastOwner);
        }
        Ok(vec![OrganizationEvent::MemberLeft(MemberLeft {
            user_id: actor_id.clone(),
            left_at: at,
        })])
    }
}

/// The change a patch field makes, if any: `None` leaves the value, `Some(v)` sets it.
fn patch(
    current: &Option<String>,
    requested: &Option<Option<String>>,
) -> Option<Change<Option<String>>> {
    requested
        .as_ref()
        .and_then(|value| Change::between(current.clone(), value.clone()))
}

/// An absolute http(s) URL with a host and no user name or password, of at most 2048
/// characters.
pub(crate) fn validate_url(field: &str, url: &str) -> Result<(), OrganizationError> {
    const SHAPE: &str = "must be an absolute http(s) URL with a host, of at most 2048 characters";
    let invalid = |message: &str| Err(OrganizationError::validation(field, message));
    if url.len() > 2048
        || url
            .chars()
            .any(|c| c.is_whitespace() || crate::values::is_hidden_control(c))
    {
        return invalid(SHAPE);
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return invalid(SHAPE);
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return invalid(SHAPE);
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // A user name or password would be stored in the log for good and shown to everyone
    // who can read the organization.
    if authority.contains('@') {
        return invalid("must not carry a user name or password");
    }
    if !is_host_and_port(authority) {
        return invalid(SHAPE);
    }
    Ok(())
}

/// `host` or `host:port`, the host a name (letters, digits, `-`, `.`, `_`), or an IPv6
/// literal in brackets; the port may be empty.
fn is_host_and_port(authority: &str) -> bool {
    let (host, port) = match authority.strip_prefix('[') {
        Some(literal) => match literal.split_once(']') {
            Some((address, after)) => {
                if address.is_empty()
                    || !address
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
                {
                    return false;
                }
                match after {
                    "" => return true,
                    _ => match after.strip_prefix(':') {
                        Some(port) => (None, Some(port)),
                        None => return false,
                    },
                }
            }
            None => return false,
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(authority), None),
        },
    };
    let host_ok = host.is_none_or(|host| {
        !host.is_empty()
            && host.chars().any(char::is_alphanumeric)
            && host
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '-' | '.' | '_'))
    });
    // An empty port (`https://example.com:/logo.png`) is the scheme's default.
    let port_ok = port.is_none_or(|port| {
        port.is_empty()
            || (port.len() <= 5
                && port.chars().all(|c| c.is_ascii_digit())
                && port.parse::<u32>().is_ok_and(|n| n <= 65_535))
    });
    host_ok && port_ok
}
