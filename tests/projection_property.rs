//! Property: whatever the workload, read models built incrementally (in batches of any
//! size, at any moment) equal a full rebuild, and agree with the aggregate.

mod support;

use orgledger::ledger::{Ledger, RequestContext};
use orgledger_domain::*;
use orgledger_projections::members::{self, MemberFilter};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::collections::HashMap;
use support::*;
use uuid::Uuid;

#[derive(Debug, Clone)]
enum Op {
    Invite { who: u8, role: u8 },
    Accept { who: u8 },
    Revoke { who: u8 },
    Resend { who: u8 },
    ChangeRole { who: u8, role: u8 },
    Retitle { who: u8, lock: bool },
    Remove { who: u8 },
    Leave { who: u8 },
    Rename { n: u8 },
    Settings { days: u8 },
    DeleteAndMaybeRestore { restore: bool },
    Transfer { who: u8 },
    CreateGroup { n: u8 },
    JoinGroup { n: u8, who: u8 },
    LeaveGroup { n: u8, who: u8 },
    DeleteGroup { n: u8 },
    CatchUp,
}

fn op() -> impl Strategy<Value = Op> {
    let who = 0u8..6;
    prop_oneof![
        4 => (who.clone(), 0u8..4).prop_map(|(who, role)| Op::Invite { who, role }),
        4 => who.clone().prop_map(|who| Op::Accept { who }),
        1 => who.clone().prop_map(|who| Op::Revoke { who }),
        1 => who.clone().prop_map(|who| Op::Resend { who }),
        3 => (who.clone(), 0u8..4).prop_map(|(who, role)| Op::ChangeRole { who, role }),
        2 => (who.clone(), any::<bool>()).prop_map(|(who, lock)| Op::Retitle { who, lock }),
        1 => who.clone().prop_map(|who| Op::Remove { who }),
        1 => who.clone().prop_map(|who| Op::Leave { who }),
        1 => (0u8..3).prop_map(|n| Op::Rename { n }),
        1 => (1u8..90).prop_map(|days| Op::Settings { days }),
        1 => any::<bool>().prop_map(|restore| Op::DeleteAndMaybeRestore { restore }),
        1 => who.clone().prop_map(|who| Op::Transfer { who }),
        1 => (0u8..3).prop_map(|n| Op::CreateGroup { n }),
        2 => (0u8..3, who.clone()).prop_map(|(n, who)| Op::JoinGroup { n, who }),
        1 => (0u8..3, who).prop_map(|(n, who)| Op::LeaveGroup { n, who }),
        1 => (0u8..3).prop_map(|n| Op::DeleteGroup { n }),
        2 => Just(Op::CatchUp),
    ]
}

/// Group `n` of an organization: stable, so ops can refer to it before and after deletion.
fn group_id(org: Uuid, n: u8) -> Uuid {
    Uuid::from_u128(org.as_u128() ^ (u128::from(n) + 1))
}

fn name(who: u8) -> String {
    format!("user{who}")
}

/// Runs one op; rule rejections are part of the workload and ignored.
async fn apply(ledger: &Ledger, org: Uuid, tokens: &mut HashMap<u8, (Uuid, String)>, op: &Op) {
    let context = RequestContext::default();
    let as_user =
        |actor: String, body| Command::new(Actor::User(uid(&actor)), chrono::Utc::now(), body);
    let command = match op {
        Op::Invite { who, role } => {
            let token = orgledger::tokens::issue("inv");
            let invitation_id = Uuid::now_v7();
            tokens.insert(*who, (invitation_id, token.sha256.clone()));
            as_user(
                "olivia".into(),
                OrganizationCommand::SendInvitation(SendInvitation {
                    invitation_id,
                    email: Some(
                        Email::parse("email", &format!("{}@example.com", name(*who))).unwrap(),
                    ),
                    role: Role::BUILT_IN[*role as usize].clone(),
                    first_name: (*who % 2 == 0).then(|| format!("First{who}")),
                    last_name: None,
                    title: None,
                    group_id: None,
                    expires_in_days: None,
                    max_uses: MaxUses::ONE,
                    token_sha256: token.sha256,
                }),
            )
        }
        Op::Accept { who } => {
            let Some((_, hash)) = tokens.get(who) else {
                return;
            };
            as_user(
                name(*who),
                OrganizationCommand::AcceptInvitation(AcceptInvitation {
                    token_sha256: hash.clone(),
                    user_id: uid(&name(*who)),
                    email: Email::parse("email", &format!("{}@example.com", name(*who))).unwrap(),
                    first_name: Some("Given".into()),
                    last_name: Some("Family".into()),
                }),
            )
        }
        Op::Revoke { who } => {
            let Some((id, _)) = tokens.get(who) else {
                return;
            };
            as_user(
                "olivia".into(),
                OrganizationCommand::RevokeInvitation(RevokeInvitation { invitation_id: *id }),
            )
        }
        Op::Resend { who } => {
            let Some((id, _)) = tokens.get(who).cloned() else {
                return;
            };
            let token = orgledger::tokens::issue("inv");
            tokens.insert(*who, (id, token.sha256.clone()));
            as_user(
                "olivia".into(),
                OrganizationCommand::ResendInvitation(ResendInvitation {
                    invitation_id: id,
                    token_sha256: token.sha256,
                }),
            )
        }
        Op::ChangeRole { who, role } => as_user(
            "olivia".into(),
            set_role(&name(*who), Role::BUILT_IN[*role as usize].clone()),
        ),
        Op::Retitle { who, lock } => as_user(
            "olivia".into(),
            OrganizationCommand::UpdateMember(UpdateMember {
                title: Some(Some(format!("Title {who}"))),
                locked_fields: lock.then(|| vec![LockedField::Title]),
                ..UpdateMember::of(uid(&name(*who)))
            }),
        ),
        Op::Remove { who } => as_user(
            "olivia".into(),
            OrganizationCommand::RemoveMember(RemoveMember {
                user_id: uid(&name(*who)),
            }),
        ),
        Op::Leave { who } => as_user(name(*who), OrganizationCommand::LeaveOrganization),
        Op::Rename { n } => as_user(
            "olivia".into(),
            OrganizationCommand::UpdateOrganization(UpdateOrganization {
                name: Some(OrganizationName::parse("name", &format!("Acme {n}")).unwrap()),
                ..Default::default()
            }),
        ),
        Op::Settings { days } => as_user(
            "olivia".into(),
            OrganizationCommand::UpdateOrganization(UpdateOrganization {
                default_invite_expiry_days: Some(ExpiryDays::new("d", i64::from(*days)).unwrap()),
                workflow_mode: Some(if days % 2 == 0 {
                    WorkflowMode::Founder
                } else {
                    WorkflowMode::Organization
                }),
                ..Default::default()
            }),
        ),
        Op::DeleteAndMaybeRestore { restore } => {
            let (state, _) = ledger.load(org).await.unwrap();
            let delete = as_user(
                "olivia".into(),
                OrganizationCommand::DeleteOrganization(DeleteOrganization {
                    confirm_name: state.name.clone(),
                }),
            );
            let _ = ledger.run(org, delete, &context, None).await;
            if !restore {
                return;
            }
            as_user("olivia".into(), OrganizationCommand::RestoreOrganization)
        }
        Op::Transfer { who } => as_user(
            "olivia".into(),
            OrganizationCommand::TransferOwnership(TransferOwnership {
                new_owner_id: uid(&name(*who)),
            }),
        ),
        Op::CreateGroup { n } => as_user(
            "olivia".into(),
            OrganizationCommand::CreateGroup(CreateGroup {
                group_id: group_id(org, *n),
                name: format!("Group {n}"),
                description: None,
            }),
        ),
        Op::JoinGroup { n, who } => as_user(
            "olivia".into(),
            OrganizationCommand::AddGroupMember(GroupMembership {
                group_id: group_id(org, *n),
                user_id: uid(&name(*who)),
            }),
        ),
        Op::LeaveGroup { n, who } => as_user(
            "olivia".into(),
            OrganizationCommand::RemoveGroupMember(GroupMembership {
                group_id: group_id(org, *n),
                user_id: uid(&name(*who)),
            }),
        ),
        Op::DeleteGroup { n } => as_user(
            "olivia".into(),
            OrganizationCommand::DeleteGroup(GroupRef {
                group_id: group_id(org, *n),
            }),
        ),
        Op::CatchUp => return,
    };
    let _ = ledger.run(org, command, &context, None).await;
}

fn incremental_read_models_equal_a_full_rebuild(backend: Backend) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 6,
        max_shrink_iters: 16,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(op(), 10..40), |ops| {
            runtime.block_on(async {
                let service = spawn_service(backend).await;
                let org = create_org(&service.ledger, "Acme", "acme", "olivia")
                    .await
                    .organization_id;
                // A second organization interleaves its events with the first's.
                let other = create_org(&service.ledger, "Other", "other", "otto")
                    .await
                    .organization_id;
                let mut tokens = HashMap::new();
                let mut other_tokens = HashMap::new();
                for op in &ops {
                    if matches!(op, Op::CatchUp) {
                        service.catch_up().await;
                    }
                    apply(&service.ledger, org, &mut tokens, op).await;
                    apply(&service.ledger, other, &mut other_tokens, op).await;
                }
                service.catch_up().await;
                let incremental = dump_read_models(service.db()).await;

                // The members read model agrees with the aggregate.
                for organization in [org, other] {
                    let (state, _) = service.ledger.load(organization).await.unwrap();
                    let page = members::list(
                        service.db(),
                        &organization.to_string(),
                        &MemberFilter {
                            limit: 500,
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap()
                    .unwrap();
                    let projected: HashMap<String, (String, String)> = page
                        .items
                        .into_iter()
                        .map(|m| (m.user_id, (m.role, m.email.unwrap_or_default())))
                        .collect();
                    let expected: HashMap<String, (String, String)> = state
                        .members
                        .iter()
                        .map(|(id, m)| {
                            (
                                id.to_string(),
                                (m.role.as_str().to_owned(), m.email.clone()),
                            )
                        })
                        .collect();
                    assert_eq!(projected, expected, "after {ops:?}");
                }

                for name in orgledger_projections::PROJECTION_NAMES {
                    service.projector.rebuild(name, false).await.unwrap();
                }
                let rebuilt = dump_read_models(service.db()).await;
                assert_eq!(incremental, rebuilt, "after {ops:?}");
            });
            Ok(())
        })
        .unwrap();
}

#[test]
fn incremental_read_models_equal_a_full_rebuild_on_postgres() {
    incremental_read_models_equal_a_full_rebuild(Backend::Postgres);
}

#[test]
fn incremental_read_models_equal_a_full_rebuild_on_sqlite() {
    incremental_read_models_equal_a_full_rebuild(Backend::Sqlite);
}
