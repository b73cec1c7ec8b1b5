//! Pure rendering for `kubectl agentid`: what a grant allows in words, and tables.

use jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

pub use crate::policy::desired::rule_in_words;
use crate::{
    api::{AccessGrant, AgentIdentity, ExposureSummary},
    policy::{approval, decide, exposure::Exposed},
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
    // What the operator recorded includes the cluster-wide protected resources (its flags), which
    // the plugin cannot know; before that, the identity's own policy is what can be computed.
    let reasons = match identity {
        Some(id) if status.approval_reasons.is_empty() => decide::approval_reasons(grant, id, &[]),
        _ => status.approval_reasons.clone(),
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

/// One active grant in the inventory.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryGrant {
    /// The grant's name.
    pub name: String,
    /// What it allows, in words.
    pub scope: String,
    /// When it stops working.
    pub expires_at: String,
    /// Who approved it (empty: routine).
    pub approved_by: Vec<String>,
}

/// One identity in `kubectl agentid inventory`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryEntry {
    /// Namespace.
    pub namespace: String,
    /// The identity.
    pub name: String,
    /// Accountable human or team.
    pub owner: String,
    /// What it is for.
    pub purpose: String,
    /// When it retires, if set.
    pub retire_at: Option<String>,
    /// Kill switch.
    pub suspended: bool,
    /// Grants holding a credential now.
    pub active_grants: Vec<InventoryGrant>,
    /// When its most recent grant was issued.
    pub last_issued_at: Option<String>,
    /// Standing privilege found outside agentid (the condition's message), if any.
    pub standing_privilege: Option<String>,
    /// What it can reach that yields credentials (None: not analysed yet).
    pub exposure: Option<ExposureSummary>,
}

fn exposure_total(e: &ExposureSummary) -> i32 {
    e.secrets + e.token_minting + e.pods + e.impersonation
}

/// The inventory: every identity with what it holds now, sorted by namespace and name.
pub fn inventory(identities: &[AgentIdentity], grants: &[AccessGrant]) -> Vec<InventoryEntry> {
    let mut entries: Vec<InventoryEntry> = identities
        .iter()
        .map(|id| {
            let (ns, name) = (id.namespace().unwrap_or_default(), id.name_any());
            let mine: Vec<&AccessGrant> = grants
                .iter()
                .filter(|g| g.namespace().as_deref() == Some(ns.as_str()) && g.spec.identity == name)
                .collect();
            let mut active_grants: Vec<InventoryGrant> = mine
                .iter()
                .filter(|g| g.status.as_ref().and_then(|s| s.phase) == Some(crate::api::GrantPhase::Active))
                .map(|g| {
                    let status = g.status.clone().unwrap_or_default();
                    InventoryGrant {
                        name: g.name_any(),
                        scope: crate::policy::desired::scope_in_words(g),
                        expires_at: status.expires_at.map(|t| t.0.to_string()).unwrap_or_default(),
                        approved_by: status.approvals.into_iter().map(|a| a.approver).collect(),
                    }
                })
                .collect();
            active_grants.sort_by(|a, b| a.name.cmp(&b.name));
            let last_issued_at = mine
                .iter()
                .filter_map(|g| g.status.as_ref().and_then(|s| s.issued_at.as_ref()).map(|t| t.0))
                .max()
                .map(|t| t.to_string());
            let standing_privilege = id
                .status
                .iter()
                .flat_map(|s| &s.conditions)
                .find(|c| c.type_ == "StandingPrivilegeDetected" && c.status == "True")
                .map(|c| c.message.clone());
            InventoryEntry {
                namespace: ns,
                name,
                owner: id.spec.owner.clone(),
                purpose: id.spec.purpose.clone(),
                retire_at: id.spec.retire_at.as_ref().map(|t| t.0.to_string()),
                suspended: id.spec.suspended,
                active_grants,
                last_issued_at,
                standing_privilege,
                exposure: id.status.as_ref().and_then(|s| s.exposure.clone()),
            }
        })
        .collect();
    entries.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    entries
}

/// The inventory as a table: one line per identity, then one indented line per active grant.
pub fn inventory_table(entries: &[InventoryEntry]) -> String {
    if entries.is_empty() {
        return "No AgentIdentities.\n".into();
    }
    let header = [
        "NAMESPACE",
        "IDENTITY",
        "OWNER",
        "SUSPENDED",
        "RETIRE-AT",
        "ACTIVE",
        "LAST-ISSUED",
        "STANDING-PRIVILEGE",
        "EXPOSURE",
    ];
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.namespace.clone(),
                e.name.clone(),
                e.owner.clone(),
                e.suspended.to_string(),
                e.retire_at.clone().unwrap_or_else(|| "-".into()),
                e.active_grants.len().to_string(),
                e.last_issued_at.clone().unwrap_or_else(|| "-".into()),
                if e.standing_privilege.is_some() { "DETECTED".into() } else { "none".into() },
                e.exposure.as_ref().map_or_else(|| "-".into(), |x| exposure_total(x).to_string()),
            ]
        })
        .collect();
    let mut out = table(&header, &rows);
    let exposed = |e: &InventoryEntry| e.exposure.as_ref().is_some_and(|x| exposure_total(x) > 0);
    for e in entries.iter().filter(|e| !e.active_grants.is_empty() || e.standing_privilege.is_some() || exposed(e)) {
        out.push_str(&format!("\n{}/{} — {}\n", e.namespace, e.name, e.purpose));
        for g in &e.active_grants {
            let approved = if g.approved_by.is_empty() {
                "routine".into()
            } else {
                format!("approved by {}", g.approved_by.join(", "))
            };
            out.push_str(&format!("  grant {} until {} ({approved}): {}\n", g.name, g.expires_at, g.scope));
        }
        if let Some(drift) = &e.standing_privilege {
            out.push_str(&format!("  standing privilege: {drift}\n"));
        }
        if let Some(x) = e.exposure.as_ref().filter(|x| exposure_total(x) > 0) {
            out.push_str(&format!(
                "  exposure: {} readable Secret(s) ({} legacy token(s)), {} way(s) to mint tokens, {} namespace(s) to run pods as others, {} impersonation right(s); see kubectl agentid exposure {}\n",
                x.secrets, x.legacy_tokens, x.token_minting, x.pods, x.impersonation, e.name
            ));
        }
    }
    out
}

/// `kubectl agentid exposure NAME -o json|yaml`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExposureReport {
    /// The identity's namespace.
    pub namespace: String,
    /// The identity.
    pub identity: String,
    /// Every way it can obtain a credential it was not granted.
    pub findings: Vec<Exposed>,
}

/// The exposure report as text: one line per finding.
pub fn exposure_table(report: &ExposureReport) -> String {
    if report.findings.is_empty() {
        return format!(
            "{}/{}: its ServiceAccounts can reach no Secret, token or more powerful ServiceAccount.\n",
            report.namespace, report.identity
        );
    }
    let rows: Vec<Vec<String>> = report
        .findings
        .iter()
        .map(|f| vec![format!("{:?}", f.kind), f.via.clone(), f.namespace.clone(), f.target.clone(), f.detail.clone()])
        .collect();
    table(&["KIND", "VIA", "NAMESPACE", "TARGET", "DETAIL"], &rows)
}

#[cfg(test)]
mod inventory_tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::{
        api::{AccessGrantStatus, AgentIdentityStatus, ApprovalRecord, GrantPhase},
        policy::testing::{grant, identity, rule},
    };

    fn at(s: &str) -> Time {
        Time(s.parse().expect("time"))
    }

    fn scenario() -> (Vec<AgentIdentity>, Vec<AccessGrant>) {
        let mut fixer = identity("fixer", &["staging"]);
        fixer.status = Some(AgentIdentityStatus {
            exposure: Some(ExposureSummary { legacy_tokens: 1, secrets: 2, ..Default::default() }),
            ..Default::default()
        });
        let mut idle = identity("idle", &["staging"]);
        idle.spec.suspended = true;
        let mut read = grant("read", "fixer", "15m", vec![rule("staging", "", "pods", "get")]);
        read.status = Some(AccessGrantStatus {
            phase: Some(GrantPhase::Active),
            issued_at: Some(at("2026-11-25T12:00:00Z")),
            expires_at: Some(at("2026-11-25T12:15:00Z")),
            ..Default::default()
        });
        let mut rm = grant("rm", "fixer", "15m", vec![rule("staging", "", "persistentvolumeclaims", "delete")]);
        rm.status = Some(AccessGrantStatus {
            phase: Some(GrantPhase::Active),
            issued_at: Some(at("2026-11-25T12:05:00Z")),
            expires_at: Some(at("2026-11-25T12:20:00Z")),
            approvals: vec![ApprovalRecord { approver: "alice".into(), approval: "a".into(), at: None }],
            ..Default::default()
        });
        let mut old = grant("old", "fixer", "15m", vec![rule("staging", "", "pods", "list")]);
        old.status = Some(AccessGrantStatus {
            phase: Some(GrantPhase::Expired),
            issued_at: Some(at("2026-11-25T11:00:00Z")),
            ..Default::default()
        });
        (vec![idle, fixer], vec![read, rm, old])
    }

    #[test]
    fn inventory_table_golden() {
        let (identities, grants) = scenario();
        let text = inventory_table(&inventory(&identities, &grants));
        let expected = "\
NAMESPACE   IDENTITY   OWNER           SUSPENDED   RETIRE-AT   ACTIVE   LAST-ISSUED            STANDING-PRIVILEGE   EXPOSURE
agents      fixer      platform-team   false       -           2        2026-11-25T12:05:00Z   none                 2
agents      idle       platform-team   true        -           0        -                      none                 -

agents/fixer — tests
  grant read until 2026-11-25T12:15:00Z (routine): get every pods object in namespace staging
  grant rm until 2026-11-25T12:20:00Z (approved by alice): delete every persistentvolumeclaims object in namespace staging
  exposure: 2 readable Secret(s) (1 legacy token(s)), 0 way(s) to mint tokens, 0 namespace(s) to run pods as others, 0 impersonation right(s); see kubectl agentid exposure fixer
";
        assert_eq!(text, expected);
    }

    #[test]
    fn inventory_json_golden() {
        let (identities, grants) = scenario();
        let json = serde_json::to_value(inventory(&identities, &grants)).expect("json");
        assert_eq!(
            json[0],
            serde_json::json!({
                "namespace": "agents", "name": "fixer", "owner": "platform-team", "purpose": "tests",
                "retireAt": null, "suspended": false, "lastIssuedAt": "2026-11-25T12:05:00Z", "standingPrivilege": null,
                "exposure": {"legacyTokens": 1, "secrets": 2, "tokenMinting": 0, "pods": 0, "impersonation": 0},
                "activeGrants": [
                    {"name": "read", "scope": "get every pods object in namespace staging", "expiresAt": "2026-11-25T12:15:00Z", "approvedBy": []},
                    {"name": "rm", "scope": "delete every persistentvolumeclaims object in namespace staging", "expiresAt": "2026-11-25T12:20:00Z", "approvedBy": ["alice"]}
                ]
            })
        );
        assert_eq!(json[1]["name"], "idle");
        assert_eq!(json[1]["suspended"], true);
        assert_eq!(json[1]["exposure"], serde_json::Value::Null);
    }
}
