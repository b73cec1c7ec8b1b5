//! The grant state machine: given what is observed, what agentid does next. Pure.

use jiff::{SignedDuration, Timestamp};

use super::{
    approval::Verdict,
    ceiling::{self, Violation},
    classify,
    install::Installation,
};
use crate::api::{AccessGrant, AgentIdentity, GrantPhase, ProtectedResource, duration};

/// What the decision depends on besides the grant itself.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The grant's identity (same namespace), if it exists and is not being deleted.
    pub identity: Option<&'a AgentIdentity>,
    /// What the grant's Approvals add up to.
    pub verdict: &'a Verdict,
    /// What the cluster-wide policy marks protected.
    pub protected: &'a [ProtectedResource],
    /// The namespaces this installation serves.
    pub installation: &'a Installation,
    /// When the grant's ServiceAccount was created, if it exists: the operator's own record that
    /// a credential was issued, which (unlike status) no requester can write.
    pub service_account_created: Option<Timestamp>,
    /// The end recorded on the grant's ServiceAccount when it was made
    /// ([`crate::policy::names::EXPIRES_AT_ANNOTATION`]), if it exists and records one: the record
    /// of an issuance that status does not show yet (its one status write comes at the end).
    pub recorded_expiry: Option<Timestamp>,
    /// The current time.
    pub now: Timestamp,
}

/// The next step for one grant.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing to do now; look again at `recheck_at` (expiry, retirement) if set.
    Wait {
        /// When the grant must be looked at again even if nothing changes.
        recheck_at: Option<Timestamp>,
    },
    /// Outside the identity's ceiling: never issued.
    Reject(Violation),
    /// Needs a human: hold without any credential.
    AwaitApproval {
        /// Why, in words.
        reasons: Vec<String>,
        /// When to look again (e.g. retirement) if set.
        recheck_at: Option<Timestamp>,
    },
    /// Issue (or finish issuing) a credential that dies at `expires_at`.
    Issue {
        /// When the credential stops working; reused when resuming an interrupted issuance.
        expires_at: Timestamp,
    },
    /// Take the credential away and end the grant in `phase`.
    Revoke {
        /// Expired, Revoked or Denied.
        phase: GrantPhase,
        /// CamelCase reason for the condition and the Event.
        reason: &'static str,
        /// A sentence for humans.
        message: String,
    },
}

fn expires_at_of(grant: &AccessGrant) -> Option<Timestamp> {
    grant.status.as_ref().and_then(|s| s.expires_at.as_ref()).map(|t| t.0)
}

fn phase_of(grant: &AccessGrant) -> Option<GrantPhase> {
    grant.status.as_ref().and_then(|s| s.phase)
}

fn retire_at(identity: Option<&AgentIdentity>) -> Option<Timestamp> {
    identity.and_then(|i| i.spec.retire_at.as_ref()).map(|t| t.0)
}

fn earliest(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The reasons a grant needs approval (identity's and cluster's protected resources included).
pub fn approval_reasons(grant: &AccessGrant, identity: &AgentIdentity, protected: &[ProtectedResource]) -> Vec<String> {
    let mut all = identity.spec.approval.protected_resources.clone();
    all.extend_from_slice(protected);
    reasons(grant, &all)
}

/// Whether the grant needs approval whatever its identity says (by its own rules and the
/// cluster's protected resources): true means [`approval_reasons`] is not empty for any identity.
pub fn needs_approval_by_itself(grant: &AccessGrant, protected: &[ProtectedResource]) -> bool {
    !reasons(grant, protected).is_empty()
}

fn reasons(grant: &AccessGrant, protected: &[ProtectedResource]) -> Vec<String> {
    let rules = grant.spec.kubernetes.as_ref().map(|k| k.rules.as_slice()).unwrap_or_default();
    let home = grant.metadata.namespace.as_deref().unwrap_or_default();
    classify::classify(rules, protected, home).iter().map(ToString::to_string).collect()
}

fn denied(by: &str, reason: &str) -> Step {
    Step::Revoke { phase: GrantPhase::Denied, reason: "Denied", message: format!("denied by {by}: {reason}") }
}

/// Whether the grant is done for good: it ended, and if it ever held a credential its revocation
/// finished (revokedAt is set). Nothing but its deletion can happen to it any more, and
/// [`decide`] answers [`Step::Wait`] for it whatever the facts, so a reconcile of it needs to
/// read nothing.
pub fn settled(grant: &AccessGrant) -> bool {
    let Some(phase) = phase_of(grant).filter(|p| p.is_terminal()) else { return false };
    // An interrupted revocation (no revokedAt yet) is not settled: it is finished first.
    let revoked = grant.status.as_ref().is_some_and(|s| s.revoked_at.is_some());
    let interrupted = matches!(phase, GrantPhase::Expired | GrantPhase::Revoked | GrantPhase::Denied)
        && !revoked
        && expires_at_of(grant).is_some();
    !interrupted
}

/// Decides the next step for `grant`.
pub fn decide(grant: &AccessGrant, facts: Facts<'_>) -> Step {
    let Facts { identity, verdict, now, .. } = facts;
    let phase = phase_of(grant);
    // Issued (or being issued) until: status's record, or when status does not show the issuance
    // yet (a crash came before its status write) the end its ServiceAccount was made with. Both
    // are bounded below, alike. A recorded end does not bring back a grant that ended.
    let recorded = facts.recorded_expiry.filter(|_| facts.service_account_created.is_some());
    let issued_until = expires_at_of(grant).or(recorded);

    if let Some(phase) = phase
        && phase.is_terminal()
    {
        if settled(grant) {
            return Step::Wait { recheck_at: None };
        }
        return Step::Revoke {
            phase,
            reason: "RevocationResumed",
            message: "finishing an interrupted revocation".into(),
        };
    }

    let identity_name = &grant.spec.identity;

    // Issued (or being issued): the credential exists or may exist. Keep it only while every
    // condition for holding it still holds.
    if let Some(expires_at) = issued_until {
        if now >= expires_at {
            return Step::Revoke {
                phase: GrantPhase::Expired,
                reason: "Expired",
                message: format!("the grant ran its course at {expires_at}"),
            };
        }
        if let Verdict::Denied { by, reason } = verdict {
            return denied(by, reason);
        }
        // status.expiresAt is what the operator schedules revocation by; anyone able to write
        // status could push it out. It can never lie further ahead than the grant's duration from
        // the moment its ServiceAccount was made (or from now, before that).
        let longest = duration::parse(&grant.spec.duration).ok().and_then(|d| SignedDuration::try_from(d).ok());
        let since = facts.service_account_created.unwrap_or(now);
        let slack = SignedDuration::from_secs(2);
        if longest.is_none_or(|d| since.checked_add(d + slack).is_ok_and(|limit| expires_at > limit)) {
            return Step::Revoke {
                phase: GrantPhase::Revoked,
                reason: "InvalidExpiry",
                message: format!(
                    "status.expiresAt {expires_at} lies beyond the grant's duration {}",
                    grant.spec.duration
                ),
            };
        }
        let Some(identity) = identity else {
            return Step::Revoke {
                phase: GrantPhase::Revoked,
                reason: "IdentityDeleted",
                message: format!("AgentIdentity {identity_name:?} was deleted"),
            };
        };
        // A credential that needed approval exists only while that approval stands — also when
        // status was written to look issued without one.
        if !approval_reasons(grant, identity, facts.protected).is_empty() && !matches!(verdict, Verdict::Approved(_)) {
            return Step::Revoke {
                phase: GrantPhase::Revoked,
                reason: "NotApproved",
                message: "the grant needs approval and its approvals do not (or no longer) add up".into(),
            };
        }
        if let Err(violation) = ceiling::check(identity, &grant.spec, facts.installation, now) {
            let reason = match violation {
                Violation::IdentitySuspended(_) | Violation::IdentityRetired(..) => violation.reason(),
                _ => "CeilingLowered",
            };
            return Step::Revoke { phase: GrantPhase::Revoked, reason, message: violation.to_string() };
        }
        return match phase {
            // Its ServiceAccount is gone (deleted by hand, or the first step of a revocation
            // whose cause has since passed): the credential no longer works, and status must not
            // say it does.
            Some(GrantPhase::Active) if facts.service_account_created.is_none() => Step::Revoke {
                phase: GrantPhase::Revoked,
                reason: "CredentialGone",
                message: "the grant's ServiceAccount no longer exists, so its credential no longer works".into(),
            },
            Some(GrantPhase::Active) => {
                Step::Wait { recheck_at: earliest(Some(expires_at), retire_at(Some(identity))) }
            }
            // An end in status, not Active, and no ServiceAccount: status alone claims an issuance.
            // Every issuance makes its ServiceAccount first, and status records the end only
            // once the credential is there (or as a revocation begins): this is status written
            // by someone else, or a revocation under way. Never issue on status's word: a new
            // credential with an end measured from now would renew the grant.
            _ if facts.service_account_created.is_none() => Step::Revoke {
                phase: GrantPhase::Revoked,
                reason: "InvalidStatus",
                message: "status records an issuance whose ServiceAccount does not exist".into(),
            },
            // An issuance interrupted (its ServiceAccount made, status not yet Active): finish it
            // with the same end.
            _ => Step::Issue { expires_at },
        };
    }

    // No issuance recorded, yet its ServiceAccount exists: status was rewritten, or the
    // ServiceAccount's record removed (it is made with one). Never issue afresh on top of it.
    if facts.service_account_created.is_some() {
        return Step::Revoke {
            phase: GrantPhase::Revoked,
            reason: "InvalidStatus",
            message: "the grant's ServiceAccount exists but status records no issuance".into(),
        };
    }
    let Some(identity) = identity else {
        return Step::Reject(Violation::IdentityNotFound(identity_name.clone()));
    };
    let duration = match ceiling::check(identity, &grant.spec, facts.installation, now) {
        Ok(d) => d,
        Err(violation) => return Step::Reject(violation),
    };
    let reasons = approval_reasons(grant, identity, facts.protected);
    if !reasons.is_empty() {
        match verdict {
            Verdict::Denied { by, reason } => return denied(by, reason),
            Verdict::Approved(_) => {}
            Verdict::Waiting { .. } => {
                let timeout = duration::parse(&identity.spec.approval.pending_timeout)
                    .ok()
                    .and_then(|d| SignedDuration::try_from(d).ok())
                    .unwrap_or(SignedDuration::from_hours(24));
                let deadline = grant.metadata.creation_timestamp.as_ref().and_then(|c| c.0.checked_add(timeout).ok());
                if let Some(deadline) = deadline
                    && now >= deadline
                {
                    return Step::Revoke {
                        phase: GrantPhase::Expired,
                        reason: "PendingTimeout",
                        message: format!(
                            "not approved within pendingTimeout {}",
                            identity.spec.approval.pending_timeout
                        ),
                    };
                }
                return Step::AwaitApproval { reasons, recheck_at: earliest(deadline, retire_at(Some(identity))) };
            }
        }
    }
    let duration = SignedDuration::try_from(duration).unwrap_or(SignedDuration::ZERO);
    // Whole seconds: status timestamps carry no fraction, and the instant agentid revokes at must
    // be the one users read in status.expiresAt.
    match now.checked_add(duration).and_then(|t| Timestamp::from_second(t.as_second())) {
        Ok(expires_at) => Step::Issue { expires_at },
        Err(_) => Step::Reject(Violation::DurationOverCeiling {
            requested: grant.spec.duration.clone(),
            max: identity.spec.max_grant_duration.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    static ANYWHERE: Installation = Installation::ANYWHERE;
    use crate::{
        api::{AccessGrantStatus, ApprovalRecord},
        policy::testing::{grant, identity, rule},
    };

    static WAITING: Verdict = Verdict::Waiting { counted: Vec::new(), ignored: Vec::new() };

    /// A 15m grant to read pods in staging, in `phase`, ending `secs` from now.
    fn read_grant(phase: GrantPhase, secs: i64) -> AccessGrant {
        with_status(grant("read", "fixer", "15m", vec![rule("staging", "", "pods", "get")]), phase, Some(plus(secs)))
    }

    fn decide_at(g: &AccessGrant, identity: Option<&AgentIdentity>, now: Timestamp) -> Step {
        decide(
            g,
            Facts {
                identity,
                verdict: &WAITING,
                protected: &[],
                installation: &ANYWHERE,
                service_account_created: issued_sa(g, now),
                recorded_expiry: None,
                now,
            },
        )
    }

    /// An issued grant's ServiceAccount, made `now` (a grant with no issuance has none).
    fn issued_sa(g: &AccessGrant, now: Timestamp) -> Option<Timestamp> {
        g.status.as_ref().and_then(|s| s.expires_at.as_ref()).map(|_| now)
    }

    fn now() -> Timestamp {
        "2026-11-25T12:00:00Z".parse().expect("valid timestamp")
    }

    fn plus(secs: i64) -> Timestamp {
        now().checked_add(SignedDuration::from_secs(secs)).expect("in range")
    }

    fn with_status(mut g: AccessGrant, phase: GrantPhase, expires_at: Option<Timestamp>) -> AccessGrant {
        g.status =
            Some(AccessGrantStatus { phase: Some(phase), expires_at: expires_at.map(Time), ..Default::default() });
        g
    }

    #[test]
    fn a_read_grant_within_the_ceiling_is_issued_for_its_duration() {
        let id = identity("fixer", &["staging"]);
        let g = grant("read", "fixer", "15m", vec![rule("staging", "apps", "deployments", "get")]);
        assert_eq!(decide_at(&g, Some(&id), now()), Step::Issue { expires_at: plus(900) });
    }

    #[test]
    fn missing_identity_rejects_a_new_grant() {
        let g = grant("read", "ghost", "15m", vec![rule("staging", "", "pods", "get")]);
        match decide_at(&g, None, now()) {
            Step::Reject(v) => assert_eq!(v.reason(), "IdentityNotFound"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn over_ceiling_is_rejected() {
        let id = identity("fixer", &["staging"]);
        let g = grant("read", "fixer", "15m", vec![rule("production", "", "pods", "get")]);
        assert!(matches!(decide_at(&g, Some(&id), now()), Step::Reject(Violation::NamespaceNotAllowed { .. })));
    }

    #[test]
    fn destructive_grant_waits_for_approval_and_is_never_issued_here() {
        let id = identity("fixer", &["staging"]);
        let g = grant("rm", "fixer", "15m", vec![rule("staging", "", "persistentvolumeclaims", "delete")]);
        match decide_at(&g, Some(&id), now()) {
            Step::AwaitApproval { reasons, .. } => {
                assert_eq!(reasons, vec!["destructive: delete persistentvolumeclaims in staging"])
            }
            other => panic!("{other:?}"),
        }
        // Still waiting when already marked AwaitingApproval.
        let g = with_status(g, GrantPhase::AwaitingApproval, None);
        assert!(matches!(decide_at(&g, Some(&id), now()), Step::AwaitApproval { .. }));
    }

    #[test]
    fn active_grant_waits_until_expiry_then_expires() {
        let id = identity("fixer", &["staging"]);
        let g = read_grant(GrantPhase::Active, 10);
        assert_eq!(decide_at(&g, Some(&id), now()), Step::Wait { recheck_at: Some(plus(10)) });
        match decide_at(&g, Some(&id), plus(10)) {
            Step::Revoke { phase, reason, .. } => {
                assert_eq!(phase, GrantPhase::Expired);
                assert_eq!(reason, "Expired");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn active_grant_is_revoked_when_identity_is_suspended_retired_deleted_or_narrowed() {
        let g = read_grant(GrantPhase::Active, 600);
        let mut suspended = identity("fixer", &["staging"]);
        suspended.spec.suspended = true;
        let mut retired = identity("fixer", &["staging"]);
        retired.spec.retire_at = Some(Time(now()));
        let narrowed = identity("fixer", &["other"]);
        for (id, expected) in [
            (Some(&suspended), "IdentitySuspended"),
            (Some(&retired), "IdentityRetired"),
            (None, "IdentityDeleted"),
            (Some(&narrowed), "CeilingLowered"),
        ] {
            match decide_at(&g, id, now()) {
                Step::Revoke { phase, reason, .. } => {
                    assert_eq!(phase, GrantPhase::Revoked);
                    assert_eq!(reason, expected);
                }
                other => panic!("{expected}: {other:?}"),
            }
        }
    }

    #[test]
    fn interrupted_issuance_resumes_with_the_same_expiry() {
        let id = identity("fixer", &["staging"]);
        let g = read_grant(GrantPhase::Pending, 300);
        assert_eq!(decide_at(&g, Some(&id), now()), Step::Issue { expires_at: plus(300) });
        // ...unless it expired meanwhile (operator down): revoke, never issue.
        assert!(matches!(decide_at(&g, Some(&id), plus(300)), Step::Revoke { phase: GrantPhase::Expired, .. }));
    }

    #[test]
    fn terminal_grants_stay_terminal_but_finish_an_interrupted_revocation() {
        let id = identity("fixer", &["staging"]);
        let base = grant("read", "fixer", "15m", vec![rule("staging", "", "pods", "get")]);
        let g = with_status(base.clone(), GrantPhase::Expired, Some(plus(-5)));
        assert!(matches!(decide_at(&g, Some(&id), now()), Step::Revoke { phase: GrantPhase::Expired, .. }));
        let mut done = g.clone();
        if let Some(s) = done.status.as_mut() {
            s.revoked_at = Some(Time(now()));
        }
        assert_eq!(decide_at(&done, Some(&id), now()), Step::Wait { recheck_at: None });
        let rejected = with_status(base, GrantPhase::Rejected, None);
        assert_eq!(decide_at(&rejected, Some(&id), now()), Step::Wait { recheck_at: None });
    }

    #[test]
    fn settled_is_exactly_where_decide_waits_whatever_the_facts() {
        let id = identity("fixer", &["staging"]);
        let base = grant("read", "fixer", "15m", vec![rule("staging", "", "pods", "get")]);
        for phase in GrantPhase::ALL {
            for expires_at in [None, Some(plus(-5)), Some(plus(600))] {
                for revoked_at in [None, Some(Time(now()))] {
                    let mut g = with_status(base.clone(), phase, expires_at);
                    if let Some(s) = g.status.as_mut() {
                        s.revoked_at = revoked_at.clone();
                    }
                    if !settled(&g) {
                        continue;
                    }
                    assert!(phase.is_terminal(), "{phase:?} is never settled");
                    // Whatever the look-ups would have said: no identity, a denial, no ServiceAccount.
                    for identity in [Some(&id), None] {
                        assert_eq!(decide_at(&g, identity, now()), Step::Wait { recheck_at: None }, "{phase:?}");
                    }
                    let deny = Verdict::Denied { by: "alice".into(), reason: "no".into() };
                    let facts = Facts {
                        identity: None,
                        verdict: &deny,
                        protected: &[],
                        installation: &ANYWHERE,
                        service_account_created: Some(now()),
                        recorded_expiry: None,
                        now: plus(10_000),
                    };
                    assert_eq!(decide(&g, facts), Step::Wait { recheck_at: None }, "{phase:?}");
                }
            }
        }
        let interrupted = with_status(base.clone(), GrantPhase::Revoked, Some(plus(-5)));
        assert!(!settled(&interrupted), "a revocation without revokedAt is still to be finished");
        assert!(settled(&with_status(base.clone(), GrantPhase::Rejected, None)));
        assert!(settled(&with_status(base, GrantPhase::Expired, None)), "timed out waiting: never issued");
    }

    #[test]
    fn active_grant_rechecks_at_retirement_if_sooner() {
        let mut id = identity("fixer", &["staging"]);
        id.spec.retire_at = Some(Time(plus(60)));
        let g = read_grant(GrantPhase::Active, 600);
        assert_eq!(decide_at(&g, Some(&id), now()), Step::Wait { recheck_at: Some(plus(60)) });
    }

    fn with_verdict(g: &AccessGrant, id: &AgentIdentity, verdict: &Verdict, now: Timestamp) -> Step {
        decide(
            g,
            Facts {
                identity: Some(id),
                verdict,
                protected: &[],
                installation: &ANYWHERE,
                service_account_created: issued_sa(g, now),
                recorded_expiry: None,
                now,
            },
        )
    }

    #[test]
    fn an_active_grant_whose_service_account_is_gone_is_revoked_not_left_active() {
        let id = identity("fixer", &["staging"]);
        let g = read_grant(GrantPhase::Active, 600);
        let gone = Facts {
            identity: Some(&id),
            verdict: &WAITING,
            protected: &[],
            installation: &ANYWHERE,
            service_account_created: None,
            recorded_expiry: None,
            now: now(),
        };
        assert!(matches!(decide(&g, gone), Step::Revoke { phase: GrantPhase::Revoked, reason: "CredentialGone", .. }));
        // With it there, the grant simply waits for its end.
        assert!(matches!(decide_at(&g, Some(&id), now()), Step::Wait { .. }));
        // Status claiming an issuance under way (Pending with an end) without its ServiceAccount,
        // which every issuance makes first: status written by someone else, never issued on —
        // an end inside the grant's duration from now would otherwise renew the credential.
        let pending = read_grant(GrantPhase::Pending, 600);
        let gone = Facts { service_account_created: None, ..gone };
        assert!(matches!(decide(&pending, gone), Step::Revoke { reason: "InvalidStatus", .. }));
        // With it there, the interrupted issuance is finished with its end.
        assert_eq!(decide_at(&pending, Some(&id), now()), Step::Issue { expires_at: plus(600) });
    }

    fn approved() -> Verdict {
        Verdict::Approved(vec![ApprovalRecord { approver: "alice".into(), approval: "a".into(), at: None }])
    }

    #[test]
    fn approval_issues_a_held_grant_and_deny_ends_it() {
        let id = identity("fixer", &["staging"]);
        let g = grant("rm", "fixer", "15m", vec![rule("staging", "", "persistentvolumeclaims", "delete")]);
        assert_eq!(with_verdict(&g, &id, &approved(), now()), Step::Issue { expires_at: plus(900) });
        let deny = Verdict::Denied { by: "erin".into(), reason: "no".into() };
        match with_verdict(&g, &id, &deny, now()) {
            Step::Revoke { phase, reason, message } => {
                assert_eq!((phase, reason), (GrantPhase::Denied, "Denied"));
                assert_eq!(message, "denied by erin: no");
            }
            other => panic!("{other:?}"),
        }
        // A Deny also ends a grant that was already issued.
        let active = with_status(g, GrantPhase::Active, Some(plus(600)));
        assert!(matches!(with_verdict(&active, &id, &deny, now()), Step::Revoke { phase: GrantPhase::Denied, .. }));
        // ...but approvals never revive a terminal one.
        let mut done = with_status(active, GrantPhase::Denied, Some(plus(600)));
        if let Some(s) = done.status.as_mut() {
            s.revoked_at = Some(Time(now()));
        }
        assert_eq!(with_verdict(&done, &id, &approved(), now()), Step::Wait { recheck_at: None });
    }

    #[test]
    fn unapproved_grant_expires_after_pending_timeout() {
        let mut id = identity("fixer", &["staging"]);
        id.spec.approval.pending_timeout = "10m".into();
        let mut g = grant("rm", "fixer", "15m", vec![rule("staging", "", "persistentvolumeclaims", "delete")]);
        g.metadata.creation_timestamp = Some(Time(now()));
        assert!(
            matches!(decide_at(&g, Some(&id), plus(599)), Step::AwaitApproval { recheck_at: Some(t), .. } if t == plus(600))
        );
        match decide_at(&g, Some(&id), plus(600)) {
            Step::Revoke { phase, reason, .. } => assert_eq!((phase, reason), (GrantPhase::Expired, "PendingTimeout")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn protected_resources_hold_even_reads() {
        let mut id = identity("fixer", &["staging"]);
        id.spec.approval.protected_resources = vec![ProtectedResource {
            api_group: "".into(),
            resource: "configmaps".into(),
            resource_names: vec!["flags".into()],
            namespaces: vec![],
        }];
        let g = grant("read", "fixer", "15m", vec![rule("staging", "", "configmaps", "get")]);
        assert!(matches!(decide_at(&g, Some(&id), now()), Step::AwaitApproval { .. }));
        // The same via the cluster-wide policy.
        let plain = identity("fixer", &["staging"]);
        let cluster = [ProtectedResource {
            api_group: "".into(),
            resource: "configmaps".into(),
            resource_names: vec![],
            namespaces: vec![],
        }];
        let step = decide(
            &g,
            Facts {
                identity: Some(&plain),
                verdict: &WAITING,
                protected: &cluster,
                installation: &ANYWHERE,
                service_account_created: None,
                recorded_expiry: None,
                now: now(),
            },
        );
        assert!(matches!(step, Step::AwaitApproval { .. }));
        // Known before the identity is read only where the grant or the cluster says so.
        assert!(!needs_approval_by_itself(&g, &[]), "only the identity protects these");
        assert!(needs_approval_by_itself(&g, &cluster));
        let rm = grant("rm", "fixer", "15m", vec![rule("staging", "", "persistentvolumeclaims", "delete")]);
        assert!(needs_approval_by_itself(&rm, &[]));
    }

    #[test]
    fn a_pushed_out_expiry_in_status_revokes_instead_of_extending() {
        let id = identity("fixer", &["staging"]);
        let rules = vec![rule("staging", "", "pods", "get")];
        // 15m grant whose status claims it lasts another 16 minutes: tampered.
        let g = with_status(grant("read", "fixer", "15m", rules.clone()), GrantPhase::Active, Some(plus(960)));
        match decide_at(&g, Some(&id), now()) {
            Step::Revoke { phase, reason, .. } => assert_eq!((phase, reason), (GrantPhase::Revoked, "InvalidExpiry")),
            other => panic!("{other:?}"),
        }
        // The same for an issuance being resumed.
        let g = with_status(grant("read", "fixer", "15m", rules.clone()), GrantPhase::Pending, Some(plus(3600)));
        assert!(matches!(decide_at(&g, Some(&id), now()), Step::Revoke { reason: "InvalidExpiry", .. }));
        // Exactly the duration left is fine.
        let g = with_status(grant("read", "fixer", "15m", rules), GrantPhase::Active, Some(plus(900)));
        assert_eq!(decide_at(&g, Some(&id), now()), Step::Wait { recheck_at: Some(plus(900)) });
    }

    #[test]
    fn status_written_to_look_issued_never_skips_approval() {
        let id = identity("fixer", &["staging"]);
        let rules = vec![rule("staging", "", "persistentvolumeclaims", "delete")];
        // An AwaitingApproval grant whose status was given an expiresAt: revoke, never issue.
        let forged = with_status(grant("rm", "fixer", "15m", rules.clone()), GrantPhase::Pending, Some(plus(600)));
        assert!(matches!(decide_at(&forged, Some(&id), now()), Step::Revoke { reason: "NotApproved", .. }));
        let forged = with_status(grant("rm", "fixer", "15m", rules.clone()), GrantPhase::Active, Some(plus(600)));
        assert!(matches!(decide_at(&forged, Some(&id), now()), Step::Revoke { reason: "NotApproved", .. }));
        // With the approval standing, the issued grant is kept.
        let approved = with_status(grant("rm", "fixer", "15m", rules), GrantPhase::Active, Some(plus(600)));
        assert_eq!(
            with_verdict(&approved, &id, &super::tests::approved(), now()),
            Step::Wait { recheck_at: Some(plus(600)) }
        );
    }

    /// Facts for a grant whose ServiceAccount was made at `created`.
    fn made_at(id: &AgentIdentity, created: Timestamp) -> Facts<'_> {
        Facts {
            identity: Some(id),
            verdict: &WAITING,
            protected: &[],
            installation: &ANYWHERE,
            service_account_created: Some(created),
            recorded_expiry: None,
            now: now(),
        }
    }

    #[test]
    fn wiped_status_with_a_live_service_account_revokes_instead_of_reissuing() {
        let id = identity("fixer", &["staging"]);
        let g = grant("read", "fixer", "15m", vec![rule("staging", "", "pods", "get")]);
        let facts = made_at(&id, plus(-60));
        assert!(matches!(decide(&g, facts), Step::Revoke { reason: "InvalidStatus", .. }));
    }

    /// Facts for a grant whose ServiceAccount was made at `created` recording the end `recorded`.
    fn recorded(id: Option<&AgentIdentity>, created: Timestamp, recorded: Timestamp) -> Facts<'_> {
        Facts {
            identity: id,
            verdict: &WAITING,
            protected: &[],
            installation: &ANYWHERE,
            service_account_created: Some(created),
            recorded_expiry: Some(recorded),
            now: now(),
        }
    }

    #[test]
    fn an_issuance_only_its_service_account_records_resumes_with_that_end() {
        let id = identity("fixer", &["staging"]);
        let g = grant("read", "fixer", "15m", vec![rule("staging", "", "pods", "get")]);
        // Made 5 s ago for 15m: resumed with the recorded end, not a fresh one from now.
        assert_eq!(decide(&g, recorded(Some(&id), plus(-5), plus(895))), Step::Issue { expires_at: plus(895) });
        // A record with no ServiceAccount behind it is no record: a fresh issuance from now.
        let gone = Facts { service_account_created: None, ..recorded(Some(&id), plus(-5), plus(100)) };
        assert_eq!(decide(&g, gone), Step::Issue { expires_at: plus(900) });
        // Past its recorded end: expired, never issued afresh.
        assert!(matches!(
            decide(&g, recorded(Some(&id), plus(-1000), plus(-100))),
            Step::Revoke { phase: GrantPhase::Expired, .. }
        ));
        // Once resumed, everything that ends an issued grant ends this one: it is revoked, not
        // rejected (something may already hold its token).
        assert!(matches!(
            decide(&g, recorded(None, plus(-5), plus(895))),
            Step::Revoke { reason: "IdentityDeleted", .. }
        ));
        let mut suspended = id.clone();
        suspended.spec.suspended = true;
        assert!(matches!(decide(&g, recorded(Some(&suspended), plus(-5), plus(895))), Step::Revoke { .. }));
    }

    #[test]
    fn a_recorded_end_is_bounded_like_status_and_gives_way_to_status() {
        let id = identity("fixer", &["staging"]);
        let g = grant("read", "fixer", "15m", vec![rule("staging", "", "pods", "get")]);
        // Whoever can edit the ServiceAccount cannot push its end past its making plus 15m.
        assert!(matches!(
            decide(&g, recorded(Some(&id), plus(-5), plus(3600))),
            Step::Revoke { reason: "InvalidExpiry", .. }
        ));
        // Once status records the end, status counts, bounded as before: a record on the
        // ServiceAccount neither extends it nor hides status pushed out (revoked, not ignored).
        let active = read_grant(GrantPhase::Active, 600);
        assert_eq!(
            decide(&active, recorded(Some(&id), plus(-5), plus(800))),
            Step::Wait { recheck_at: Some(plus(600)) }
        );
        assert_eq!(
            decide(&active, recorded(Some(&id), plus(-5), plus(300))),
            Step::Wait { recheck_at: Some(plus(600)) }
        );
        let pushed = read_grant(GrantPhase::Active, 3600);
        assert!(matches!(
            decide(&pushed, recorded(Some(&id), plus(-5), plus(895))),
            Step::Revoke { reason: "InvalidExpiry", .. }
        ));
        // A grant that needs approval and has none is revoked, whatever the record says.
        let rm = grant("rm", "fixer", "15m", vec![rule("staging", "", "persistentvolumeclaims", "delete")]);
        assert!(matches!(
            decide(&rm, recorded(Some(&id), plus(-5), plus(895))),
            Step::Revoke { reason: "NotApproved", .. }
        ));
        // An ended grant stays ended: a record does not resume it.
        let ended = with_status(g.clone(), GrantPhase::Rejected, None);
        assert_eq!(decide(&ended, recorded(Some(&id), plus(-5), plus(895))), Step::Wait { recheck_at: None });
    }

    #[test]
    fn expiry_is_bounded_by_when_the_service_account_was_made() {
        let id = identity("fixer", &["staging"]);
        // Issued 10 minutes ago for 15m: the end can be at most 5 minutes away.
        let g = read_grant(GrantPhase::Active, 600);
        let facts = made_at(&id, plus(-600));
        assert!(matches!(decide(&g, facts), Step::Revoke { reason: "InvalidExpiry", .. }));
        let g = read_grant(GrantPhase::Active, 300);
        let facts = made_at(&id, plus(-600));
        assert_eq!(decide(&g, facts), Step::Wait { recheck_at: Some(plus(300)) });
    }
}
