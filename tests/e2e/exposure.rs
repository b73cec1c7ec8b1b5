//! Exposure: an identity whose grant can read Secrets in a namespace that holds a long-lived
//! ServiceAccount token is told so — in its status, a Warning condition, `kubectl agentid
//! exposure` and the inventory — and the finding is real: the grant's credential reads the token.

use std::time::Duration;

use agentid::api::{AgentIdentity, Decision, ExposureSummary, GrantPhase};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use serde_json::json;

use crate::{
    fixtures::*,
    harness::{TestNamespace, cluster, operator, poll_until},
};

async fn summary(admin: &kube::Client, ns: &str, name: &str) -> anyhow::Result<Option<(ExposureSummary, String)>> {
    let id = Api::<AgentIdentity>::namespaced(admin.clone(), ns).get(name).await?;
    let status = id.status.unwrap_or_default();
    let condition = status.conditions.iter().find(|c| c.type_ == "CredentialExposureDetected");
    Ok(status.exposure.zip(condition.map(|c| format!("{}: {}", c.status, c.message))))
}

/// Replaces what changes from run to run (namespace names, timestamps) with placeholders.
fn normalize(text: &str, namespaces: &[(&str, &str)]) -> String {
    let mut out = text.to_string();
    for (name, placeholder) in namespaces {
        out = out.replace(name, placeholder);
    }
    let mut words: Vec<String> = Vec::new();
    for line in out.split_inclusive('\n') {
        let mut cooked = String::new();
        for (i, part) in line.split(' ').enumerate() {
            if i > 0 {
                cooked.push(' ');
            }
            let bare = part.trim_end_matches(['\n', '"', ',']);
            if bare.trim_start_matches('"').parse::<jiff::Timestamp>().is_ok() {
                let quoted = bare.starts_with('"');
                let rest = &part[bare.len()..];
                cooked.push_str(if quoted { "\"<time>" } else { "<time>" });
                cooked.push_str(rest);
            } else {
                cooked.push_str(part);
            }
        }
        words.push(cooked);
    }
    words.concat()
}

/// A table's cells, `|`-separated: column widths follow the namespace names of the run.
fn cells(table: &str) -> String {
    table
        .lines()
        .map(|l| l.split("   ").map(str::trim).filter(|c| !c.is_empty()).collect::<Vec<_>>().join(" | ") + "\n")
        .collect()
}

#[tokio::test]
async fn a_grant_that_reads_secrets_is_reported_as_reaching_a_legacy_token() -> anyhow::Result<()> {
    operator().await?;
    let admin = cluster().admin().await?;
    let agents = TestNamespace::new(&admin, "expo-a").await?;
    let prod = TestNamespace::new(&admin, "expo-p").await?;
    let (a, p) = (agents.name.clone(), prod.name.clone());

    // A namespace with a never-expiring token of a powerful ServiceAccount, and one more Secret.
    create(&admin, &p, &ServiceAccount { metadata: meta("db-admin"), ..Default::default() }).await?;
    let legacy: Secret = serde_json::from_value(json!({
        "metadata": {"name": "db-admin-token", "annotations": {"kubernetes.io/service-account.name": "db-admin"}},
        "type": "kubernetes.io/service-account-token"
    }))?;
    create(&admin, &p, &legacy).await?;
    let config: Secret = serde_json::from_value(json!({"metadata": {"name": "app-config"}, "stringData": {"k": "v"}}))?;
    create(&admin, &p, &config).await?;

    let mut reader = identity("reader", &[&p]);
    reader.spec.approval.approvers.users = vec!["alice".into()];
    create(&admin, &a, &reader).await?;
    install_approver_role(&admin).await?;
    bind(&admin, &a, "approvers", "agentid-approver", &["alice"], &[]).await?;
    wait_identity_ready(&admin, &a, "reader").await?;

    // Before any grant: nothing is reachable.
    let (before, condition) = poll_until(Duration::from_secs(30), "exposure analysed", || {
        let (admin, a) = (admin.clone(), a.clone());
        async move { summary(&admin, &a, "reader").await }
    })
    .await?;
    assert_eq!(before, ExposureSummary::default());
    assert!(condition.starts_with("False"), "{condition}");

    // A grant to read Secrets in prod (sensitive: it waits for alice).
    let asked = create(
        &admin,
        &a,
        &grant("read-secrets", "reader", "15m", vec![rule(&p, "", &["secrets"], &["get", "list"], &[])]),
    )
    .await?;
    wait_phase(&admin, &a, "read-secrets", GrantPhase::AwaitingApproval).await?;
    let alice = cluster().user("alice", &["sre-leads"]).await?;
    Api::<agentid::api::Approval>::namespaced(alice, &a)
        .create(&PostParams::default(), &approval("alice-ok", &asked, "alice", Decision::Approve, "audit"))
        .await?;
    let active = wait_phase(&admin, &a, "read-secrets", GrantPhase::Active).await?;

    // Status counts and a Warning condition that names the token.
    let (after, condition) = poll_until(Duration::from_secs(30), "exposure counts the legacy token", || {
        let (admin, a) = (admin.clone(), a.clone());
        async move { Ok(summary(&admin, &a, "reader").await?.filter(|(s, _)| s.legacy_tokens == 1)) }
    })
    .await?;
    assert_eq!(after, ExposureSummary { legacy_tokens: 1, secrets: 2, ..Default::default() });
    assert!(condition.starts_with("True"), "{condition}");
    assert!(
        condition.contains(&format!("long-lived token of ServiceAccount {p}/db-admin (grant read-secrets)")),
        "{condition}"
    );

    // The finding is real: the grant's own credential reads the never-expiring token.
    let agent = agent_client(&admin, &active).await?;
    let stolen = Api::<Secret>::namespaced(agent, &p).get("db-admin-token").await?;
    assert!(stolen.data.is_some_and(|d| d.contains_key("token")), "the token controller filled the token");

    // The details, from the plugin.
    let (ok, json, err) = plugin("admin", &a, &["exposure", "reader", "-o", "json"])?;
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(
        report["findings"],
        json!([
            {"kind": "LegacyToken", "namespace": p, "target": "db-admin-token", "via": "grant read-secrets",
             "detail": format!("long-lived token of ServiceAccount {p}/db-admin")},
            {"kind": "Secret", "namespace": p, "target": "app-config", "via": "grant read-secrets",
             "detail": "readable Secret"}
        ])
    );
    let (ok, table, err) = plugin("admin", &a, &["exposure", "reader"])?;
    assert!(ok, "{err}");
    assert_eq!(
        cells(&normalize(&table, &[(&p, "<prod>")])),
        "\
KIND | VIA | NAMESPACE | TARGET | DETAIL
LegacyToken | grant read-secrets | <prod> | db-admin-token | long-lived token of ServiceAccount <prod>/db-admin
Secret | grant read-secrets | <prod> | app-config | readable Secret
"
    );

    // The inventory on this fixed scenario, in table and JSON.
    let (ok, table, err) = plugin("admin", &a, &["inventory"])?;
    assert!(ok, "{err}");
    assert_eq!(
        cells(&normalize(&table, &[(&a, "<agents>"), (&p, "<prod>")])),
        "\
NAMESPACE | IDENTITY | OWNER | SUSPENDED | RETIRE-AT | ACTIVE | LAST-ISSUED | STANDING-PRIVILEGE | EXPOSURE
<agents> | reader | platform-team | false | - | 1 | <time> | none | 2

<agents>/reader — e2e
grant read-secrets until <time> (approved by alice): get, list every secrets object in namespace <prod>
exposure: 2 readable Secret(s) (1 legacy token(s)), 0 way(s) to mint tokens, 0 namespace(s) to run pods as others, 0 impersonation right(s); see kubectl agentid exposure reader
"
    );
    let (ok, json, err) = plugin("admin", &a, &["inventory", "-o", "json"])?;
    assert!(ok, "{err}");
    let expected = "\
[
  {
    \"namespace\": \"<agents>\",
    \"name\": \"reader\",
    \"owner\": \"platform-team\",
    \"purpose\": \"e2e\",
    \"retireAt\": null,
    \"suspended\": false,
    \"activeGrants\": [
      {
        \"name\": \"read-secrets\",
        \"scope\": \"get, list every secrets object in namespace <prod>\",
        \"expiresAt\": \"<time>\",
        \"approvedBy\": [
          \"alice\"
        ]
      }
    ],
    \"lastIssuedAt\": \"<time>\",
    \"standingPrivilege\": null,
    \"exposure\": {
      \"legacyTokens\": 1,
      \"secrets\": 2,
      \"tokenMinting\": 0,
      \"pods\": 0,
      \"impersonation\": 0
    }
  }
]
";
    assert_eq!(normalize(&json, &[(&a, "<agents>"), (&p, "<prod>")]), expected);

    // Once the grant is gone, so is the exposure.
    Api::<agentid::api::AccessGrant>::namespaced(admin.clone(), &a)
        .delete("read-secrets", &DeleteParams::default())
        .await?;
    wait_grant_gone(&admin, &a, "read-secrets").await?;
    let (gone, condition) = poll_until(Duration::from_secs(30), "exposure cleared", || {
        let (admin, a) = (admin.clone(), a.clone());
        async move { Ok(summary(&admin, &a, "reader").await?.filter(|(s, _)| s.secrets == 0)) }
    })
    .await?;
    assert_eq!(gone, ExposureSummary::default());
    assert!(condition.starts_with("False"), "{condition}");
    agents.delete().await?;
    prod.delete().await
}

fn meta(name: &str) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta { name: Some(name.into()), ..Default::default() }
}
