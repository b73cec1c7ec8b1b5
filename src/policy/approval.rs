//! Who may approve, and what a set of Approvals adds up to (DESIGN.md step 4). Admission and the
//! operator use the same checks: admission refuses a bad Approval with a message, the operator
//! counts only Approvals that still pass (with a fresh RBAC check).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::api::{AccessGrant, AgentIdentity, Approval, ApprovalRecord, Decision};

/// Annotation where admission records the user who created an AccessGrant.
pub const REQUESTED_BY: &str = "agentid.dev/requested-by";
/// Annotation where admission records the groups of the user who created an Approval.
pub const APPROVER_GROUPS: &str = "agentid.dev/approver-groups";

const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// Why an Approval does not count (and is refused at admission).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// spec.approver names someone other than the creating user.
    #[error("spec.approver is {claimed:?} but you are {actual:?}: an Approval must name the user who creates it")]
    NotTheCreator {
        /// What the Approval says.
        claimed: String,
        /// Who created it.
        actual: String,
    },
    /// ServiceAccounts (agents among them) never approve.
    #[error("{0} is a ServiceAccount: only humans can approve")]
    ServiceAccount(String),
    /// The grant is not there.
    #[error("AccessGrant {0:?} does not exist in this namespace")]
    GrantNotFound(String),
    /// The Approval names another object than the grant that now has this name.
    #[error(
        "grantUID {given:?} does not match AccessGrant {grant:?} (uid {actual:?}): it was deleted and recreated; review and approve the new one"
    )]
    UidMismatch {
        /// The grant's name.
        grant: String,
        /// The Approval's grantUID.
        given: String,
        /// The grant's actual uid.
        actual: String,
    },
    /// The grant does not wait for a decision any more.
    #[error("AccessGrant {grant:?} is {phase}: there is nothing to decide")]
    NotWaiting {
        /// The grant's name.
        grant: String,
        /// Its phase.
        phase: String,
    },
    /// Nobody recorded who asked, so self-approval cannot be ruled out.
    #[error(
        "AccessGrant {0:?} has no recorded requester (was it created while agentid's admission webhook was down?); it cannot be approved: create it again"
    )]
    RequesterUnknown(String),
    /// The approver asked for the grant.
    #[error("{0} requested this grant and cannot approve it: approval must come from someone else")]
    SelfApproval(String),
    /// The grant's identity is gone.
    #[error("AgentIdentity {0:?} does not exist")]
    IdentityNotFound(String),
    /// The approver is not among the identity's approvers.
    #[error("{user} is not an approver of AgentIdentity {identity:?} (it lists users {users:?} and groups {groups:?})")]
    NotListed {
        /// The approver.
        user: String,
        /// The identity.
        identity: String,
        /// Its listed users.
        users: Vec<String>,
        /// Its listed groups.
        groups: Vec<String>,
    },
    /// RBAC does not give the approver verb `approve` on accessgrants here.
    #[error(
        "{0} may not approve AccessGrants in this namespace: it needs RBAC verb approve on accessgrants.agentid.dev (the agentid-approver ClusterRole)"
    )]
    NoApproveVerb(String),
}

/// Who is deciding: as authenticated by the apiserver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver<'a> {
    /// The user name.
    pub username: &'a str,
    /// The user's groups.
    pub groups: &'a [String],
}

/// The recorded requester of a grant.
pub fn requested_by(grant: &AccessGrant) -> Option<&str> {
    grant.annotations().get(REQUESTED_BY).map(String::as_str).filter(|s| !s.is_empty())
}

/// Checks that `approver` may decide `approval` on `grant` of `identity`. `may_approve` is the
/// authorizer's answer for verb `approve` on the grant.
pub fn check(
    approver: &Approver<'_>,
    approval: &crate::api::ApprovalSpec,
    grant: Option<&AccessGrant>,
    identity: Option<&AgentIdentity>,
    may_approve: bool,
) -> Result<(), Refusal> {
    let user = approver.username;
    if approval.approver != user {
        return Err(Refusal::NotTheCreator { claimed: approval.approver.clone(), actual: user.into() });
    }
    if user.starts_with(SERVICE_ACCOUNT_PREFIX) {
        return Err(Refusal::ServiceAccount(user.into()));
    }
    let grant = grant.ok_or_else(|| Refusal::GrantNotFound(approval.grant.clone()))?;
    let uid = grant.uid().unwrap_or_default();
    if approval.grant_uid != uid {
        return Err(Refusal::UidMismatch { grant: grant.name_any(), given: approval.grant_uid.clone(), actual: uid });
    }
    if let Some(phase) = grant.status.as_ref().and_then(|s| s.phase)
        && phase.is_terminal()
    {
        return Err(Refusal::NotWaiting { grant: grant.name_any(), phase: format!("{phase:?}") });
    }
    let requester = requested_by(grant).ok_or_else(|| Refusal::RequesterUnknown(grant.name_any()))?;
    if requester == user {
        return Err(Refusal::SelfApproval(user.into()));
    }
    let identity = identity.ok_or_else(|| Refusal::IdentityNotFound(grant.spec.identity.clone()))?;
    let listed = &identity.spec.approval.approvers;
    let in_list = listed.users.iter().any(|u| u == user) || listed.groups.iter().any(|g| approver.groups.contains(g));
    if !in_list {
        return Err(Refusal::NotListed {
            user: user.into(),
            identity: identity.name_any(),
            users: listed.users.clone(),
            groups: listed.groups.clone(),
        });
    }
    if !may_approve {
        return Err(Refusal::NoApproveVerb(user.into()));
    }
    Ok(())
}

/// An Approval the operator looked at, with the facts admission recorded and a fresh RBAC answer.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    /// The Approval.
    pub approval: &'a Approval,
    /// The approver's groups, as recorded at admission.
    pub groups: Vec<String>,
    /// A fresh SubjectAccessReview answer for verb `approve` on the grant.
    pub may_approve: bool,
}

impl Candidate<'_> {
    /// The groups recorded on an Approval by admission (empty if none).
    pub fn recorded_groups(approval: &Approval) -> Vec<String> {
        approval.annotations().get(APPROVER_GROUPS).and_then(|g| serde_json::from_str(g).ok()).unwrap_or_default()
    }
}

/// What the Approvals of a grant add up to.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not (yet) enough distinct approvers; `counted` so far, `ignored` with why.
    Waiting {
        /// Approvals that count.
        counted: Vec<ApprovalRecord>,
        /// Approvals that do not count, with the reason.
        ignored: Vec<(String, String)>,
    },
    /// Enough distinct approvers.
    Approved(Vec<ApprovalRecord>),
    /// A valid Deny: final.
    Denied {
        /// Who denied.
        by: String,
        /// Their reason.
        reason: String,
    },
}

/// Tallies `candidates` for `grant` of `identity`: any valid Deny ends it; otherwise
/// `requiredApprovals` distinct valid approvers approve it.
pub fn tally(
    grant: &AccessGrant,
    identity: Option<&AgentIdentity>,
    candidates: &[Candidate<'_>],
    now: jiff::Timestamp,
) -> Verdict {
    let required = identity.map(|i| i.spec.approval.required_approvals).unwrap_or(1).max(1) as usize;
    let mut counted: Vec<ApprovalRecord> = Vec::new();
    let mut ignored = Vec::new();
    let mut sorted: Vec<&Candidate<'_>> = candidates.iter().collect();
    sorted.sort_by_key(|c| (c.approval.creation_timestamp(), c.approval.name_any()));
    for c in sorted {
        let spec = &c.approval.spec;
        let approver = Approver { username: &spec.approver, groups: &c.groups };
        if let Err(refusal) = check(&approver, spec, Some(grant), identity, c.may_approve) {
            ignored.push((c.approval.name_any(), refusal.to_string()));
            continue;
        }
        match spec.decision {
            Decision::Deny => return Verdict::Denied { by: spec.approver.clone(), reason: spec.reason.clone() },
            Decision::Approve if counted.iter().any(|r| r.approver == spec.approver) => {}
            Decision::Approve => counted.push(ApprovalRecord {
                approver: spec.approver.clone(),
                approval: c.approval.name_any(),
                at: Some(Time(now)),
            }),
        }
    }
    if counted.len() >= required { Verdict::Approved(counted) } else { Verdict::Waiting { counted, ignored } }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{ApprovalSpec, GrantPhase},
        policy::testing::{grant, identity, rule},
    };

    fn held_grant(requester: Option<&str>) -> AccessGrant {
        let mut g = grant("rm", "fixer", "15m", vec![rule("staging", "", "persistentvolumeclaims", "delete")]);
        if let Some(r) = requester {
            g.metadata.annotations = Some([(REQUESTED_BY.to_string(), r.to_string())].into());
        }
        g
    }

    fn fixer() -> AgentIdentity {
        let mut id = identity("fixer", &["staging"]);
        id.spec.approval.approvers.groups = vec!["sre-leads".into()];
        id.spec.approval.approvers.users = vec!["erin".into()];
        id
    }

    fn spec(approver: &str, decision: Decision) -> ApprovalSpec {
        ApprovalSpec {
            grant: "rm".into(),
            grant_uid: "uid-rm".into(),
            decision,
            reason: "ok".into(),
            approver: approver.into(),
        }
    }

    fn approval(name: &str, approver: &str, decision: Decision) -> Approval {
        let mut a = Approval::new(name, spec(approver, decision));
        a.metadata.namespace = Some("agents".into());
        a
    }

    const LEADS: &[&str] = &["sre-leads"];

    fn groups(gs: &[&str]) -> Vec<String> {
        gs.iter().map(|s| s.to_string()).collect()
    }

    fn check_as(
        user: &str,
        user_groups: &[&str],
        s: &ApprovalSpec,
        g: Option<&AccessGrant>,
        may: bool,
    ) -> Result<(), Refusal> {
        let gs = groups(user_groups);
        check(&Approver { username: user, groups: &gs }, s, g, Some(&fixer()), may)
    }

    #[test]
    fn the_cast_of_the_incident() {
        let g = held_grant(Some("bob"));
        // alice: in sre-leads, holds approve.
        assert_eq!(check_as("alice", LEADS, &spec("alice", Decision::Approve), Some(&g), true), Ok(()));
        // erin: listed by name.
        assert_eq!(check_as("erin", &[], &spec("erin", Decision::Approve), Some(&g), true), Ok(()));
        // bob: the requester.
        assert_eq!(
            check_as("bob", LEADS, &spec("bob", Decision::Approve), Some(&g), true),
            Err(Refusal::SelfApproval("bob".into()))
        );
        // carol: listed but without the RBAC verb.
        assert_eq!(
            check_as("carol", LEADS, &spec("carol", Decision::Approve), Some(&g), false),
            Err(Refusal::NoApproveVerb("carol".into()))
        );
        // dave: holds approve but is not listed.
        assert!(matches!(
            check_as("dave", &["ops"], &spec("dave", Decision::Approve), Some(&g), true),
            Err(Refusal::NotListed { .. })
        ));
        // the agent's ServiceAccount approving itself.
        let sa = "system:serviceaccount:agents:agentid-fixer";
        assert_eq!(
            check_as(sa, LEADS, &spec(sa, Decision::Approve), Some(&g), true),
            Err(Refusal::ServiceAccount(sa.into()))
        );
        // bob creating an Approval that names alice.
        assert!(matches!(
            check_as("bob", &[], &spec("alice", Decision::Approve), Some(&g), true),
            Err(Refusal::NotTheCreator { .. })
        ));
    }

    #[test]
    fn the_grant_must_be_the_same_object_waiting_with_a_known_requester() {
        let g = held_grant(Some("bob"));
        assert!(matches!(
            check_as("alice", LEADS, &spec("alice", Decision::Approve), None, true),
            Err(Refusal::GrantNotFound(_))
        ));
        let mut other_uid = spec("alice", Decision::Approve);
        other_uid.grant_uid = "uid-old".into();
        assert!(matches!(check_as("alice", LEADS, &other_uid, Some(&g), true), Err(Refusal::UidMismatch { .. })));
        let unknown = held_grant(None);
        assert!(matches!(
            check_as("alice", LEADS, &spec("alice", Decision::Approve), Some(&unknown), true),
            Err(Refusal::RequesterUnknown(_))
        ));
        let mut done = held_grant(Some("bob"));
        done.status = Some(crate::api::AccessGrantStatus { phase: Some(GrantPhase::Denied), ..Default::default() });
        assert!(matches!(
            check_as("alice", LEADS, &spec("alice", Decision::Approve), Some(&done), true),
            Err(Refusal::NotWaiting { .. })
        ));
    }

    #[test]
    fn messages_name_the_problem() {
        let g = held_grant(Some("bob"));
        let msg = check_as("dave", &[], &spec("dave", Decision::Approve), Some(&g), true).unwrap_err().to_string();
        assert!(msg.contains("dave is not an approver of AgentIdentity \"fixer\""), "{msg}");
        let msg = check_as("carol", LEADS, &spec("carol", Decision::Approve), Some(&g), false).unwrap_err().to_string();
        assert!(msg.contains("agentid-approver ClusterRole"), "{msg}");
    }

    fn candidate<'a>(a: &'a Approval, gs: &[&str], may: bool) -> Candidate<'a> {
        Candidate { approval: a, groups: groups(gs), may_approve: may }
    }

    #[test]
    fn tally_needs_distinct_valid_approvers() {
        let g = held_grant(Some("bob"));
        let mut id = fixer();
        id.spec.approval.required_approvals = 2;
        let now = jiff::Timestamp::UNIX_EPOCH;
        let a1 = approval("a1", "alice", Decision::Approve);
        let a2 = approval("a2", "alice", Decision::Approve);
        let e1 = approval("e1", "erin", Decision::Approve);
        let b1 = approval("b1", "bob", Decision::Approve);
        // alice twice is one approver.
        let v = tally(&g, Some(&id), &[candidate(&a1, LEADS, true), candidate(&a2, LEADS, true)], now);
        assert!(matches!(v, Verdict::Waiting { ref counted, .. } if counted.len() == 1));
        // bob's (self-approval) does not count, and says why.
        let v = tally(&g, Some(&id), &[candidate(&a1, LEADS, true), candidate(&b1, LEADS, true)], now);
        match v {
            Verdict::Waiting { counted, ignored } => {
                assert_eq!(counted.len(), 1);
                assert_eq!(ignored[0].0, "b1");
                assert!(ignored[0].1.contains("cannot approve"));
            }
            other => panic!("{other:?}"),
        }
        // alice and erin: approved.
        let v = tally(&g, Some(&id), &[candidate(&a1, LEADS, true), candidate(&e1, &[], true)], now);
        assert!(matches!(v, Verdict::Approved(ref r) if r.len() == 2));
        // RBAC revoked since admission: alice no longer counts.
        let v = tally(&g, Some(&id), &[candidate(&a1, LEADS, false), candidate(&e1, &[], true)], now);
        assert!(matches!(v, Verdict::Waiting { .. }));
    }

    #[test]
    fn one_valid_deny_is_final_even_after_approvals() {
        let g = held_grant(Some("bob"));
        let id = fixer();
        let now = jiff::Timestamp::UNIX_EPOCH;
        let a1 = approval("a1", "alice", Decision::Approve);
        let mut d1 = approval("d1", "erin", Decision::Deny);
        d1.spec.reason = "not today".into();
        let v = tally(&g, Some(&id), &[candidate(&a1, LEADS, true), candidate(&d1, &[], true)], now);
        // requiredApprovals 1 is met by alice, but erin's Deny is final.
        assert_eq!(v, Verdict::Denied { by: "erin".into(), reason: "not today".into() });
        // A Deny by someone who may not decide does not count.
        let mut d2 = approval("d2", "dave", Decision::Deny);
        d2.spec.reason = "sabotage".into();
        let v = tally(&g, Some(&id), &[candidate(&a1, LEADS, true), candidate(&d2, &["ops"], true)], now);
        assert!(matches!(v, Verdict::Approved(_)));
    }
}
