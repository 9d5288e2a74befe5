//! Groups, service accounts, client restrictions, smart tool routing, AI providers, plan and
//! seats, custom roles.

use chrono::{DateTime, Utc};

use crate::access::{is_role_key, Actor, Permission, Role};
use crate::commands::*;
use crate::error::OrganizationError;
use crate::events::*;
use crate::organization::{Decision, Organization};

/// A short display text: 1 to `max` characters, no control or text-direction characters.
fn check_text(field: &str, value: &str, max: usize) -> Result<(), OrganizationError> {
    let length = value.trim().chars().count();
    if length == 0 || length > max || value.chars().any(crate::values::is_hidden_control) {
        return Err(OrganizationError::validation(
            field,
            &format!("must be 1 to {max} characters with no control or text-direction characters"),
        ));
    }
    Ok(())
}

fn check_optional_text(
    field: &str,
    value: Option<&str>,
    max: usize,
) -> Result<(), OrganizationError> {
    value.map_or(Ok(()), |value| check_text(field, value, max))
}

impl Organization {
    pub(crate) fn administer(
        &self,
        actor: &Actor,
        at: DateTime<Utc>,
        command: &OrganizationCommand,
    ) -> Decision {
        match command {
            OrganizationCommand::CreateGroup(c) => self.create_group(actor, at, c),
            OrganizationCommand::UpdateGroup(c) => self.update_group(actor, c),
            OrganizationCommand::DeleteGroup(c) => {
                self.authorize(actor, Permission::ManageGroups)?;
                self.group(c.group_id)?;
                Ok(vec![OrganizationEvent::GroupDeleted(GroupDeleted {
                    group_id: c.group_id,
                })])
            }
            OrganizationCommand::AddGroupMember(c) => self.add_group_member(actor, c),
            OrganizationCommand::RemoveGroupMember(c) => self.remove_group_member(actor, c),
            OrganizationCommand::CreateServiceAccount(c) => {
                self.create_service_account(actor, at, c)
            }
            OrganizationCommand::RotateServiceAccountKey(c) => {
                let authority = self.authorize(actor, Permission::ManageServiceAccounts)?;
                let account = self.service_account(c.service_account_id)?;
                if !self.reaches_scopes(&authority, &account.scopes) {
                    return Err(OrganizationError::PermissionDenied);
                }
                Ok(vec![OrganizationEvent::ServiceAccountKeyRotated(
                    ServiceAccountKeyRotated {
                        service_account_id: c.service_account_id,
                        key_prefix: c.key_prefix.clone(),
                        key_sha256: c.key_sha256.clone(),
                        rotated_at: at,
                    },
                )])
            }
            OrganizationCommand::DeleteServiceAccount(c) => {
                self.authorize(actor, Permission::ManageServiceAccounts)?;
                self.service_account(c.service_account_id)?;
                Ok(vec![OrganizationEvent::ServiceAccountDeleted(
                    ServiceAccountDeleted {
                        service_account_id: c.service_account_id,
                    },
                )])
            }
            OrganizationCommand::SetClientRestrictions(access) => {
                self.authorize(actor, Permission::ManageSettings)?;
                for client in access.clients.keys() {
                    check_text("clients", client, 100)?;
                }
                if access.clients.len() > 500 {
                    return Err(OrganizationError::validation(
                        "clients",
                        "at most 500 clients",
                    ));
                }
                if *access == self.client_restrictions {
                    return Ok(Vec::new());
                }
                Ok(vec![OrganizationEvent::ClientRestrictionsChanged(
                    ClientRestrictionsChanged {
                        from: self.client_restrictions.clone(),
                        to: access.clone(),
                    },
                )])
            }
            OrganizationCommand::SetSmartToolRouting(enabled) => {
                self.authorize(actor, Permission::ManageSettings)?;
                Ok(Change::between(self.smart_tool_routing, *enabled)
                    .map(|enabled| {
                        OrganizationEvent::SmartToolRoutingChanged(SmartToolRoutingChanged {
                            enabled,
                        })
                    })
                    .into_iter()
                    .collect())
            }
            OrganizationCommand::AddAiProvider(c) => self.add_ai_provider(actor, c),
            OrganizationCommand::UpdateAiProvider(c) => self.update_ai_provider(actor, c),
            OrganizationCommand::RemoveAiProvider(c) => {
                self.authorize(actor, Permission::ManageSettings)?;
                if !self.ai_providers.contains_key(&c.provider_id) {
                    return Err(OrganizationError::NotFound("ai provider"));
                }
                Ok(vec![OrganizationEvent::AiProviderRemoved(
                    AiProviderRemoved {
                        provider_id: c.provider_id,
                    },
                )])
            }
            OrganizationCommand::ChangePlan(c) => self.change_plan(actor, at, c),
            OrganizationCommand::DefineRole(c) => self.define_role(actor, c),
            OrganizationCommand::DeleteRole(c) => self.delete_role(actor, c),
            _ => unreachable!("handled by Organization::decide"),
        }
    }

    fn group(
        &self,
        group_id: uuid::Uuid,
    ) -> Result<&crate::organization::Group, OrganizationError> {
        self.groups
            .get(&group_id)
            .ok_or(OrganizationError::NotFound("group"))
    }

    fn service_account(
        &self,
        id: uuid::Uuid,
    ) -> Result<&crate::organization::ServiceAccount, OrganizationError> {
        self.service_accounts
            .get(&id)
            .ok_or(OrganizationError::NotFound("service account"))
    }

    fn create_group(&self, actor: &Actor, at: DateTime<Utc>, c: &CreateGroup) -> Decision {
        self.authorize(actor, Permission::ManageGroups)?;
        check_text("name", &c.name, 100)?;
        check_optional_text("description", c.description.as_deref(), 500)?;
        let name = c.name.trim();
        if self
            .groups
            .values()
            .any(|group| group.name.eq_ignore_ascii_case(name))
        {
            return Err(OrganizationError::GroupExists);
        }
        Ok(vec![OrganizationEvent::GroupCreated(GroupCreated {
            group_id: c.group_id,
            name: name.to_owned(),
            description: c.description.clone(),
            created_at: at,
        })])
    }

    fn update_group(&self, actor: &Actor, c: &UpdateGroup) -> Decision {
        self.authorize(actor, Permission::ManageGroups)?;
        let group = self.group(c.group_id)?;
        // Only new values are judged: one held before, sent back unchanged, is no change.
        if let Some(name) = c.name.as_ref().filter(|name| name.trim() != group.name) {
            check_text("name", name, 100)?;
            let taken = self.groups.iter().any(|(id, other)| {
                *id != c.group_id && other.name.eq_ignore_ascii_case(name.trim())
            });
            if taken {
                return Err(OrganizationError::GroupExists);
            }
        }
        if let Some(Some(description)) = &c.description {
            if group.description.as_ref() != Some(description) {
                check_text("description", description, 500)?;
            }
        }
        let name = c
            .name
            .as_ref()
            .and_then(|name| Change::between(group.name.clone(), name.trim().to_owned()));
        let description = c.description.as_ref().and_then(|description| {
            Change::between(group.description.clone(), description.clone())
        });
        if name.is_none() && description.is_none() {
            return Ok(Vec::new());
        }
        Ok(vec![OrganizationEvent::GroupUpdated(GroupUpdated {
            group_id: c.group_id,
            name,
            description,
        })])
    }

    fn add_group_member(&self, actor: &Actor, c: &GroupMembership) -> Decision {
        self.authorize(actor, Permission::ManageGroups)?;
        let group = self.group(c.group_id)?;
        if !self.members.contains_key(&c.user_id) {
            return Err(OrganizationError::NotFound("member"));
        }
        if group.member_ids.contains(&c.user_id) {
            return Ok(Vec::new());
        }
        Ok(vec![OrganizationEvent::GroupMemberAdded(
            GroupMemberAdded {
                group_id: c.group_id,
                user_id: c.user_id.clone(),
            },
        )])
    }

    fn remove_group_member(&self, actor: &Actor, c: &GroupMembership) -> Decision {
        self.authorize(actor, Permission::ManageGroups)?;
        let group = self.group(c.group_id)?;
        if !group.member_ids.contains(&c.user_id) {
            return Err(OrganizationError::NotFound("group member"));
        }
        Ok(vec![OrganizationEvent::GroupMemberRemoved(
            GroupMemberRemoved {
                group_id: c.group_id,
                user_id: c.user_id.clone(),
            },
        )])
    }

    fn create_service_account(
        &self,
        actor: &Actor,
        at: DateTime<Utc>,
        c: &CreateServiceAccount,
    ) -> Decision {
        let authority = self.authorize(actor, Permission::ManageServiceAccounts)?;
        if !self.reaches_scopes(&authority, &c.scopes) {
            return Err(OrganizationError::PermissionDenied);
        }
        check_text("name", &c.name, 100)?;
        check_optional_text("description", c.description.as_deref(), 500)?;
        if c.scopes.is_empty() {
            return Err(OrganizationError::validation(
                "scopes",
                "must name at least one scope",
            ));
        }
        let mut scopes = c.scopes.clone();
        scopes.sort();
        scopes.dedup();
        Ok(vec![OrganizationEvent::ServiceAccountCreated(
            ServiceAccountCreated {
                service_account_id: c.service_account_id,
                name: c.name.trim().to_owned(),
                description: c.description.clone(),
                scopes,
                key_prefix: c.key_prefix.clone(),
                key_sha256: c.key_sha256.clone(),
                created_at: at,
            },
        )])
    }

    fn add_ai_provider(&self, actor: &Actor, c: &AddAiProvider) -> Decision {
        self.authorize(actor, Permission::ManageSettings)?;
        check_text("name", &c.name, 100)?;
        check_text("kind", &c.kind, 50)?;
        check_api_key(c.api_key.expose())?;
        Ok(vec![OrganizationEvent::AiProviderAdded(AiProviderAdded {
            provider_id: c.provider_id,
            name: c.name.trim().to_owned(),
            kind: c.kind.trim().to_owned(),
            enabled: c.enabled,
            api_key: c.api_key.clone(),
            api_key_last4: last4(c.api_key.expose()),
        })])
    }

    fn update_ai_provider(&self, actor: &Actor, c: &UpdateAiProvider) -> Decision {
        self.authorize(actor, Permission::ManageSettings)?;
        let provider = self
            .ai_providers
            .get(&c.provider_id)
            .ok_or(OrganizationError::NotFound("ai provider"))?;
        if let Some(key) = &c.api_key {
            check_api_key(key.expose())?;
        }
        let enabled = c
            .enabled
            .and_then(|enabled| Change::between(provider.enabled, enabled));
        if enabled.is_none() && c.api_key.is_none() {
            return Ok(Vec::new());
        }
        Ok(vec![OrganizationEvent::AiProviderUpdated(
            AiProviderUpdated {
                provider_id: c.provider_id,
                enabled,
                api_key: c.api_key.clone(),
                api_key_last4: c.api_key.as_ref().map(|key| Change {
                    from: provider.api_key_last4.clone(),
                    to: last4(key.expose()),
                }),
            },
        )])
    }

    fn change_plan(&self, actor: &Actor, at: DateTime<Utc>, c: &ChangePlan) -> Decision {
        self.authorize(actor, Permission::ManageBilling)?;
        check_text("plan", &c.plan, 50)?;
        if let Some(seats) = c.seats {
            if seats == 0 || seats > 1_000_000 {
                return Err(OrganizationError::validation(
                    "seats",
                    "must be between 1 and 1000000",
                ));
            }
            if self.seats_in_use(at) > seats {
                return Err(OrganizationError::SeatLimitReached);
            }
        }
        let plan = Change {
            from: self.plan.name.clone(),
            to: Some(c.plan.trim().to_owned()),
        };
        let seats = Change {
            from: self.plan.seats,
            to: c.seats,
        };
        if plan.from == plan.to && seats.from == seats.to {
            return Ok(Vec::new());
        }
        Ok(vec![OrganizationEvent::PlanChanged(PlanChanged {
            plan,
            seats,
        })])
    }

    fn define_role(&self, actor: &Actor, c: &DefineRole) -> Decision {
        self.authorize(actor, Permission::ManageRoles)?;
        if !is_role_key(&c.key) {
            return Err(OrganizationError::validation(
                "key",
                "must match ^[a-z][a-z0-9_]{1,31}$",
            ));
        }
        if Role::BUILT_IN.iter().any(|role| role.as_str() == c.key) {
            return Err(OrganizationError::validation(
                "key",
                "may not shadow a built-in role",
            ));
        }
        check_text("name", &c.name, 100)?;
        if c.permissions.iter().any(|p| p.grantable_name().is_none()) {
            return Err(OrganizationError::validation(
                "permissions",
                "owner-only powers cannot be granted",
            ));
        }
        // A request of the wrong shape is told so whatever the state: it would fail anyway.
        if self.roles.contains_key(&c.key) {
            return Err(OrganizationError::RoleExists);
        }
        let mut permissions = c.permissions.clone();
        permissions.sort();
        permissions.dedup();
        Ok(vec![OrganizationEvent::RoleDefined(RoleDefined {
            key: c.key.clone(),
            name: c.name.trim().to_owned(),
            permissions,
        })])
    }

    fn delete_role(&self, actor: &Actor, c: &RoleRef) -> Decision {
        self.authorize(actor, Permission::ManageRoles)?;
        // Listed beside the custom ones, so named for what it is rather than "not found".
        if Role::BUILT_IN.iter().any(|role| role.as_str() == c.key) {
            return Err(OrganizationError::validation(
                "key",
                "is a built-in role, which cannot be deleted",
            ));
        }
        if !self.roles.contains_key(&c.key) {
            return Err(OrganizationError::NotFound("role"));
        }
        let role = Role::Custom(c.key.clone());
        let held = self.members.values().any(|member| member.role == role)
            || self
                .invitations
                .values()
                .any(|invitation| invitation.role == role);
        if held {
            return Err(OrganizationError::RoleInUse);
        }
        Ok(vec![OrganizationEvent::RoleDeleted(RoleDeleted {
            key: c.key.clone(),
        })])
    }
}

fn check_api_key(key: &str) -> Result<(), OrganizationError> {
    if !(16..=512).contains(&key.chars().count())
        || key.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(OrganizationError::validation(
            "api_key",
            "must be 16 to 512 characters with no spaces",
        ));
    }
    Ok(())
}

fn last4(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    chars[chars.len().saturating_sub(4)..].iter().collect()
}
