//! Standing privilege: a binding made by hand that gives an identity something is reported within
//! seconds, and with `spec.enforce` the identity's subject is taken out of it.

use std::time::Duration;

use agentid::api::AgentIdentity;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::Api;
use serde_json::json;

use crate::{
    fixtures::*,
    harness::{TestNamespace, cluster, operator, poll_until},
};

async fn condition(admin: &kube::Client, ns: &str, name: &str) -> anyhow::Result<Option<(String, String)>> {
    let id = Api::<AgentIdentity>::namespaced(admin.clone(), ns).get(name).await?;
    Ok(id
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == "StandingPrivilegeDetected")
        .map(|c| (c.status.clone(), c.message.clone())))
}

fn binding(name: &str, subjects: serde_json::Value) -> anyhow::Result<RoleBinding> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "secret-reader"},
        "subjects": subjects
    }))?)
}

#[tokio::test]
async fn a_hand_made_binding_is_reported_and_with_enforce_removed() -> anyhow::Result<()> {
    operator().await?;
    let admin = cluster().admin().await?;
    let agents = TestNamespace::new(&admin, "drift-a").await?;
    let target = TestNamespace::new(&admin, "drift-t").await?;
    let (a, t) = (agents.name.clone(), target.name.clone());
    create(&admin, &a, &identity("watched", &[&t])).await?;
    let mut strict = identity("strict", &[&t]);
    strict.spec.enforce = true;
    create(&admin, &a, &strict).await?;
    for name in ["watched", "strict"] {
        wait_identity_ready(&admin, &a, name).await?;
        // Nothing to report before anyone made a binding.
        poll_until(Duration::from_secs(10), "StandingPrivilegeDetected=False", || {
            let (admin, a) = (admin.clone(), a.clone());
            async move { Ok(condition(&admin, &a, name).await?.filter(|c| c.0 == "False").map(|_| ())) }
        })
        .await?;
    }
    let reader: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(json!({
        "metadata": {"name": "secret-reader"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    }))?;
    create(&admin, &t, &reader).await?;

    // Someone gives the watched identity's base ServiceAccount `get secrets`, outside agentid.
    let made = jiff::Timestamp::now();
    create(
        &admin,
        &t,
        &binding("shortcut", json!([{"kind": "ServiceAccount", "name": "agentid-watched", "namespace": a}]))?,
    )
    .await?;
    let message = poll_until(Duration::from_secs(10), "StandingPrivilegeDetected on watched", || {
        let (admin, a) = (admin.clone(), a.clone());
        async move { Ok(condition(&admin, &a, "watched").await?.filter(|c| c.0 == "True").map(|c| c.1)) }
    })
    .await?;
    println!(
        "standing privilege reported {} ms after the binding was made",
        jiff::Timestamp::now().duration_since(made).as_millis()
    );
    assert!(
        message.contains(&format!(
            "RoleBinding {t}/shortcut grants Role/secret-reader to ServiceAccount {a}/agentid-watched"
        )),
        "{message}"
    );
    // Without enforce, the binding stays as it is.
    let kept = Api::<RoleBinding>::namespaced(admin.clone(), &t).get("shortcut").await?;
    assert_eq!(kept.subjects.unwrap_or_default().len(), 1);

    // With enforce, the identity's subject is removed and other subjects stay.
    let both = json!([
        {"kind": "ServiceAccount", "name": "agentid-strict", "namespace": a},
        {"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "auditor"}
    ]);
    create(&admin, &t, &binding("shortcut-2", both)?).await?;
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), &t);
    let left = poll_until(Duration::from_secs(10), "the strict identity's subject to be removed", || {
        let bindings = bindings.clone();
        async move {
            let b = bindings.get("shortcut-2").await?;
            let subjects = b.subjects.unwrap_or_default();
            Ok((subjects.len() == 1).then_some(subjects))
        }
    })
    .await?;
    assert_eq!(left[0].name, "auditor");
    let (status, _) = condition(&admin, &a, "strict").await?.expect("condition");
    assert_eq!(status, "False");
    // The cluster's own default bindings (which reach every ServiceAccount) are left alone.
    let defaults = Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(admin.clone())
        .get("system:service-account-issuer-discovery")
        .await?;
    assert!(defaults.subjects.unwrap_or_default().iter().any(|s| s.name == "system:serviceaccounts"));
    agents.delete().await?;
    target.delete().await
}
