//! Pure rendering for `kubectl agentid`: what a grant allows in words, and tables.

use jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

pub use crate::policy::desired::rule_in_words;
use crate::{
    api::{AccessGrant, AgentIdentity},
    policy::{approval, decide},
};

/// One line of `kubectl agentid pending`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingRow {
    /// The grant's namespace.
    pub namespace: String,
    /// The grant's name.
    pub name: String,
    /// Its identity.
    pub identity: String,
    /// Who asked (recorded by admission).
    pub requested_by: String,
    /// Counted approvals.
    pub approvals: usize,
    /// Approvals needed.
    pub required: i32,
    /// Requested duration.
    pub duration: String,
    /// Seconds since creation.
    pub age_seconds: i64,
    /// Why it needs approval.
    pub reasons: Vec<String>,
}

/// Rows for grants waiting for approval, oldest first. `identities` supplies requiredApprovals.
pub fn pending_rows(grants: &[AccessGrant], identities: &[AgentIdentity], now: Timestamp) -> Vec<PendingRow> {
    let mut rows: Vec<PendingRow> = grants
        .iter()
        .filter(|g| g.status.as_ref().and_then(|s| s.phase) == Some(crate::api::GrantPhase::AwaitingApproval))
        .map(|g| {
            let status = g.status.clone().unwrap_or_default();
            let required = identities
                .iter()
                .find(|i| i.namespace() == g.namespace() && i.name_any() == g.spec.identity)
                .map(|i| i.spec.approval.required_approvals)
                .unwrap_or(1);
            PendingRow {
                namespace: g.namespace().unwrap_or_default(),
                name: g.name_any(),
                identity: g.spec.identity.clone(),
                requested_by: approval::requested_by(g).unwrap_or("<unknown>").to_string(),
                approvals: status.approvals.len(),
                required,
                duration: g.spec.duration.clone(),
                age_seconds: g
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| now.duration_since(t.0).as_secs())
                    .unwrap_or(0),
                reasons: status.approval_reasons,
            }
        })
        .collect();
    rows.sort_by_key(|r| -r.age_seconds);
    rows
}

/// `90s` → `1m`, `7200s` → `2h`: kubectl's coarse age.
pub fn age(seconds: i64) -> String {
    match seconds {
        s if s < 120 => format!("{}s", s.max(0)),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Left-aligned columns separated by three spaces, like kubectl.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            if i == last {
                out.push_str(&cell);
            } else {
                out.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

/// The pending table.
pub fn pending_table(rows: &[PendingRow], all_namespaces: bool) -> String {
    if rows.is_empty() {
        return "No AccessGrants are waiting for approval.\n".into();
    }
    let mut header = vec!["NAME", "IDENTITY", "REQUESTED-BY", "APPROVALS", "DURATION", "AGE", "WHY"];
    if all_namespaces {
        header.insert(0, "NAMESPACE");
    }
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut cells = vec![
                r.name.clone(),
                r.identity.clone(),
                r.requested_by.clone(),
                format!("{}/{}", r.approvals, r.required),
                r.duration.clone(),
                age(r.age_seconds),
                r.reasons.join("; "),
            ];
            if all_namespaces {
                cells.insert(0, r.namespace.clone());
            }
            cells
        })
        .collect();
    table(&header, &body)
}

/// What `kubectl agentid explain` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// `namespace/name`.
    pub grant: String,
    /// The identity.
    pub identity: String,
    /// Its phase.
    pub phase: String,
    /// Who asked.
    pub requested_by: String,
    /// The stated reason.
    pub reason: String,
    /// Requested duration.
    pub duration: String,
    /// What the credential allows, one sentence per rule; nothing else is allowed.
    pub allows: Vec<String>,
    /// Why it needs approval (empty: issued without one).
    pub needs_approval_because: Vec<String>,
    /// Who approved so far.
    pub approved_by: Vec<String>,
    /// Approvals needed.
    pub required_approvals: i32,
    /// When the credential stops working, once issued.
    pub expires_at: Option<String>,
}

/// Explains a grant. With its identity at hand, the reasons are recomputed as agentid would.
pub fn explain(grant: &AccessGrant, identity: Option<&AgentIdentity>) -> Explanation {
    let status = grant.status.clone().unwrap_or_default();
    let rules = grant.spec.kubernetes.as_ref().map(|k| k.rules.clone()).unwrap_or_default();
    let reasons = match identity {
        Some(id) => decide::approval_reasons(grant, id, &[]),
        None => status.approval_reasons.clone(),
    };
    Explanation {
        grant: format!("{}/{}", grant.namespace().unwrap_or_default(), grant.name_any()),
        identity: grant.spec.identity.clone(),
        phase: status.phase.map(|p| format!("{p:?}")).unwrap_or_else(|| "Pending".into()),
        requested_by: approval::requested_by(grant).unwrap_or("<unknown>").to_string(),
        reason: grant.spec.reason.clone(),
        duration: grant.spec.duration.clone(),
        allows: rules.iter().map(rule_in_words).collect(),
        needs_approval_because: reasons,
        approved_by: status.approvals.iter().map(|a| a.approver.clone()).collect(),
        required_approvals: identity.map(|i| i.spec.approval.required_approvals).unwrap_or(1),
        expires_at: status.expires_at.map(|t| t.0.to_string()),
    }
}

/// The explanation as text for humans.
pub fn explanation_text(e: &Explanation) -> String {
    let mut out = format!(
        "AccessGrant {} for AgentIdentity {} — {}\nRequested by {} for {}: {:?}\n\nThe credential would allow, and nothing else:\n",
        e.grant, e.identity, e.phase, e.requested_by, e.duration, e.reason
    );
    for line in &e.allows {
        out.push_str(&format!("  - {line}\n"));
    }
    if e.needs_approval_because.is_empty() {
        out.push_str("\nIt needs no approval: routine access within the identity's ceiling.\n");
    } else {
        out.push_str(&format!(
            "\nIt needs {} approval(s) from the identity's approvers because:\n",
            e.required_approvals
        ));
        for reason in &e.needs_approval_because {
            out.push_str(&format!("  - {reason}\n"));
        }
        if e.approved_by.is_empty() {
            out.push_str("Approved by: nobody yet\n");
        } else {
            out.push_str(&format!("Approved by: {}\n", e.approved_by.join(", ")));
        }
    }
    if let Some(at) = &e.expires_at {
        out.push_str(&format!("Expires at: {at}\n"));
    }
    out
}

/// A valid Approval name for `grant` decided by `user`: `<grant>-<user>-<suffix>`.
pub fn approval_name(grant: &str, user: &str, suffix: &str) -> String {
    let user: String =
        user.to_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
    let user = user.trim_matches('-');
    let mut name = format!("{grant}-{user}");
    name.truncate(240);
    format!("{}-{suffix}", name.trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{AccessGrantStatus, GrantPhase},
        policy::testing::{grant, identity, rule},
    };

    #[test]
    fn rules_read_as_sentences() {
        let mut r = rule("staging", "", "persistentvolumeclaims", "get");
        r.verbs.push("delete".into());
        r.resource_names = vec!["db-volume".into()];
        assert_eq!(rule_in_words(&r), "get, delete persistentvolumeclaims db-volume in namespace staging");
        let r = rule("prod", "apps", "deployments", "list");
        assert_eq!(rule_in_words(&r), "list every deployments.apps object in namespace prod");
    }

    #[test]
    fn explain_says_what_and_why() {
        let mut g = grant("rm", "fixer", "15m", vec![rule("staging", "", "persistentvolumeclaims", "delete")]);
        g.metadata.annotations = Some([(approval::REQUESTED_BY.to_string(), "bob".to_string())].into());
        g.status = Some(AccessGrantStatus { phase: Some(GrantPhase::AwaitingApproval), ..Default::default() });
        let id = identity("fixer", &["staging"]);
        let e = explain(&g, Some(&id));
        assert_eq!(e.needs_approval_because, vec!["destructive: delete persistentvolumeclaims in staging"]);
        let text = explanation_text(&e);
        assert!(text.contains("Requested by bob for 15m"), "{text}");
        assert!(text.contains("  - delete every persistentvolumeclaims object in namespace staging"), "{text}");
        assert!(text.contains("Approved by: nobody yet"), "{text}");
    }

    #[test]
    fn pending_lists_only_waiting_grants_with_counts() {
        let mut waiting = grant("rm", "fixer", "15m", vec![rule("staging", "", "secrets", "get")]);
        waiting.status = Some(AccessGrantStatus {
            phase: Some(GrantPhase::AwaitingApproval),
            approval_reasons: vec!["sensitive: get secrets in staging".into()],
            ..Default::default()
        });
        let mut active = grant("read", "fixer", "15m", vec![rule("staging", "", "pods", "get")]);
        active.status = Some(AccessGrantStatus { phase: Some(GrantPhase::Active), ..Default::default() });
        let mut id = identity("fixer", &["staging"]);
        id.spec.approval.required_approvals = 2;
        let rows = pending_rows(&[waiting, active], &[id], Timestamp::UNIX_EPOCH);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].approvals, rows[0].required), (0, 2));
        let text = pending_table(&rows, false);
        assert!(text.starts_with("NAME   IDENTITY   REQUESTED-BY   APPROVALS"), "{text}");
        assert!(text.contains("0/2"), "{text}");
        assert_eq!(pending_table(&[], false), "No AccessGrants are waiting for approval.\n");
    }

    #[test]
    fn approval_names_are_valid_object_names() {
        assert_eq!(approval_name("rm", "alice", "x1"), "rm-alice-x1");
        assert_eq!(approval_name("rm", "Alice@Example.com", "x1"), "rm-alice-example-com-x1");
        assert_eq!(approval_name("rm", "system:admin", "x1"), "rm-system-admin-x1");
        assert!(approval_name(&"g".repeat(63), &"u".repeat(300), "abcde").len() <= 253);
    }

    #[test]
    fn ages_are_coarse() {
        assert_eq!(age(5), "5s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(7200), "2h");
        assert_eq!(age(3 * 86400), "3d");
    }
}
