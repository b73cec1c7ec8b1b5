//! Property tests with a fixed-seed generator (so a failure reproduces): random AdmissionReviews
//! into every admission check, and random AgentIdentity/AccessGrant specs into the policy. No
//! input panics, and every refusal, rejection and revocation carries a message.

use serde_json::{Value, json};

/// A small deterministic generator.
pub struct Gen {
    state: u64,
    /// Whether to produce wrong types and missing fields too (for admission), or only odd values
    /// of the right types (what passes the CRD schema's types, for the policy).
    malformed: bool,
}

impl Gen {
    /// A generator from `seed` producing malformed objects too.
    pub fn new(seed: u64) -> Self {
        Self { state: seed | 1, malformed: true }
    }

    /// A generator from `seed` producing well-typed objects with odd values.
    pub fn typed(seed: u64) -> Self {
        Self { state: seed | 1, malformed: false }
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    fn broken(&mut self, one_in: u64) -> bool {
        self.malformed && self.one_in(one_in)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// One of `items`.
    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }

    /// True one time in `n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// A string (labels, annotations and names are always strings on the wire).
    fn word(&mut self) -> Value {
        match self.text() {
            Value::String(s) => Value::String(s),
            _ => json!("fixer"),
        }
    }

    fn text(&mut self) -> Value {
        const WORDS: &[&str] = &[
            "",
            " ",
            "a",
            "staging",
            "agents",
            "production",
            "kube-system",
            "*",
            "system:serviceaccount:agents:x",
            "system:masters",
            "alice",
            "bob",
            "ü",
            "../..",
            "agentid-grant-x-1234abcd",
            "secrets",
            "pods/exec",
            "persistentvolumeclaims",
            "15m",
            "0s",
            "-5m",
            "forever",
            "25h",
            "1h30m",
            "10s",
            "9s",
            "24h",
            "1h",
        ];
        match self.below(12) {
            0 if self.malformed => json!(self.below(1000)),
            1 => json!("x".repeat(300)),
            2 if self.malformed => Value::Null,
            _ => json!(self.pick(WORDS)),
        }
    }

    fn list(&mut self) -> Value {
        const ITEMS: &[&str] = &[
            "",
            "*",
            "get",
            "list",
            "delete",
            "create",
            "patch",
            "escalate",
            "bind",
            "impersonate",
            "use",
            "approve",
            "pods",
            "pods/exec",
            "secrets",
            "roles",
            "clusterrolebindings",
            "deployments",
            "apps",
            "rbac.authorization.k8s.io",
            "staging",
            "agents",
            "kube-system",
        ];
        if self.broken(15) {
            return self.text();
        }
        let n = self.below(4);
        Value::Array((0..n).map(|_| json!(self.pick(ITEMS))).collect())
    }

    fn rule(&mut self) -> Value {
        let mut r = json!({
            "namespace": self.text(), "apiGroups": self.list(), "resources": self.list(), "verbs": self.list(),
        });
        if self.one_in(3) {
            r["resourceNames"] = self.list();
        }
        if self.broken(10) {
            r.as_object_mut().map(|o| o.remove("verbs"));
        }
        r
    }

    /// A random AccessGrant as JSON (often malformed).
    pub fn grant(&mut self) -> Value {
        let rules: Vec<Value> = (0..self.below(4)).map(|_| self.rule()).collect();
        let mut g = json!({
            "apiVersion": "agentid.dev/v1alpha1", "kind": "AccessGrant",
            "metadata": {"name": "g", "namespace": "agents", "uid": "uid-g"},
            "spec": {"identity": self.text(), "duration": self.text(), "reason": self.text(),
                     "kubernetes": {"rules": rules}}
        });
        if self.one_in(4) {
            g["metadata"]["annotations"] = json!({"agentid.dev/requested-by": self.word()});
        }
        if self.broken(8) {
            g["spec"] = self.text();
        }
        g
    }

    /// A random AgentIdentity as JSON (often malformed).
    pub fn identity(&mut self) -> Value {
        json!({
            "apiVersion": "agentid.dev/v1alpha1", "kind": "AgentIdentity",
            "metadata": {"name": self.pick(&["fixer", "", "grant-x", "x-y"]), "namespace": "agents"},
            "spec": {"owner": self.text(), "purpose": self.text(), "maxGrantDuration": self.text(),
                     "allowedNamespaces": self.list(), "suspended": self.one_in(4), "enforce": self.one_in(4),
                     "approval": {"approvers": {"users": self.list(), "groups": self.list()},
                                  "requiredApprovals": self.below(7), "pendingTimeout": self.text(),
                                  "protectedResources": [{"apiGroup": self.text(), "resource": self.text()}]}}
        })
    }

    /// A random Approval as JSON (often malformed).
    pub fn approval(&mut self) -> Value {
        json!({
            "apiVersion": "agentid.dev/v1alpha1", "kind": "Approval",
            "metadata": {"name": "a", "namespace": "agents",
                         "annotations": {"agentid.dev/approver-groups": self.pick(&["[\"sre-leads\"]", "[]", "x", ""])}},
            "spec": {"grant": self.text(), "grantUID": self.pick(&["uid-g", "other", ""]),
                     "decision": self.pick(&["Approve", "Deny", "Maybe", ""]), "reason": self.text(),
                     "approver": self.text()}
        })
    }

    /// A random Pod or Deployment as JSON (often malformed).
    pub fn workload(&mut self) -> (String, Value) {
        let labels = if self.one_in(2) { json!({"agentid.dev/identity": self.word()}) } else { json!({}) };
        let pod_spec = json!({
            "serviceAccountName": self.text(),
            "automountServiceAccountToken": self.one_in(2),
            "containers": [{"name": "c", "image": "i", "volumeMounts": [{"name": self.text(), "mountPath": "/x"}]}],
            "volumes": [{"name": self.text(), "secret": {"secretName": self.text()}},
                        {"name": "p", "projected": {"sources": [{"serviceAccountToken": {"path": "t"}}]}}]
        });
        if self.one_in(2) {
            (
                "Pod".into(),
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "agents", "labels": labels}, "spec": pod_spec}),
            )
        } else {
            (
                "Deployment".into(),
                json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "d", "namespace": "agents"},
                "spec": {"selector": {}, "template": {"metadata": {"labels": labels}, "spec": pod_spec}}}),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use jiff::Timestamp;

    use super::*;
    use crate::{
        api::{AccessGrant, AgentIdentity, ApprovalRecord, GrantPhase, ProtectedResource},
        policy::{
            approval::Verdict,
            ceiling, classify,
            decide::{Facts, Step, decide},
            install::Installation,
        },
    };

    const ROUNDS: u64 = 3000;

    #[test]
    fn random_specs_never_panic_the_policy_and_every_rejection_says_why() {
        let mut g = Gen::typed(0x5eed_0001);
        let now: Timestamp = "2026-11-25T12:00:00Z".parse().expect("time");
        let install = Installation { agent_namespaces: vec![], target_namespaces: vec!["staging".into()] };
        let (mut parsed, mut rejected) = (0, 0);
        for round in 0..ROUNDS {
            // What the apiserver's schema would refuse never reaches the policy: skip what does
            // not deserialize.
            let Ok(mut grant) = serde_json::from_value::<AccessGrant>(g.grant()) else { continue };
            let Ok(mut identity) = serde_json::from_value::<AgentIdentity>(g.identity()) else { continue };
            identity.metadata.namespace = Some("agents".into());
            parsed += 1;
            let rules = grant.spec.kubernetes.clone().map(|k| k.rules).unwrap_or_default();
            let protected: Vec<ProtectedResource> = identity.spec.approval.protected_resources.clone();
            for reason in classify::classify(&rules, &protected, "agents") {
                assert!(!reason.to_string().trim().is_empty(), "round {round}: empty approval reason");
            }
            if let Err(v) = ceiling::check(&identity, &grant.spec, &install, now) {
                assert!(!v.to_string().trim().is_empty() && !v.reason().is_empty(), "round {round}: {v:?}");
            }
            if g.one_in(3) {
                let phase =
                    [GrantPhase::Active, GrantPhase::AwaitingApproval, GrantPhase::Pending][g.below(3) as usize];
                grant.status = Some(crate::api::AccessGrantStatus {
                    phase: Some(phase),
                    expires_at: g.one_in(2).then(|| {
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                            now.checked_add(jiff::SignedDuration::from_secs(g.below(100_000) as i64 - 50_000))
                                .expect("in range"),
                        )
                    }),
                    ..Default::default()
                });
            }
            let verdict = match g.below(3) {
                0 => Verdict::Waiting { counted: vec![], ignored: vec![] },
                1 => {
                    Verdict::Approved(vec![ApprovalRecord { approver: "alice".into(), approval: "a".into(), at: None }])
                }
                _ => Verdict::Denied { by: "alice".into(), reason: "no".into() },
            };
            let facts = Facts {
                identity: g.one_in(5).then_some(()).map_or(Some(&identity), |_| None),
                verdict: &verdict,
                protected: &protected,
                installation: &install,
                service_account_created: g.one_in(4).then_some(now),
                recorded_expiry: g.one_in(4).then(|| {
                    now.checked_add(jiff::SignedDuration::from_secs(g.below(100_000) as i64 - 50_000))
                        .expect("in range")
                }),
                now,
            };
            match decide(&grant, facts) {
                Step::Reject(v) => {
                    rejected += 1;
                    assert!(!v.to_string().trim().is_empty(), "round {round}: empty rejection");
                }
                Step::Revoke { reason, message, .. } => {
                    assert!(!reason.is_empty() && !message.trim().is_empty(), "round {round}: empty revocation")
                }
                Step::AwaitApproval { reasons, .. } => assert!(reasons.iter().all(|r| !r.trim().is_empty())),
                Step::Issue { expires_at } => {
                    assert!(expires_at > now, "round {round}: issued already expired");
                    // Never past the grant's duration from its ServiceAccount's making (or from
                    // now, before there is one), whatever status or that ServiceAccount records.
                    let longest = crate::api::duration::parse(&grant.spec.duration).expect("issued: a valid duration");
                    let since = facts.service_account_created.unwrap_or(now);
                    let limit = since
                        + jiff::SignedDuration::try_from(longest).expect("in range")
                        + jiff::SignedDuration::from_secs(2);
                    assert!(expires_at <= limit, "round {round}: issued until {expires_at}, past {limit}");
                }
                Step::Wait { .. } => {}
            }
        }
        // The generator must reach the policy, and its refusals, often enough to mean something.
        assert!(parsed > ROUNDS / 4, "only {parsed} of {ROUNDS} specs parsed");
        assert!(rejected > 10, "only {rejected} rejections");
    }
}
