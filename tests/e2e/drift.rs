//! Standing privilege: a binding made by hand that gives an identity something is reported within
//! seconds, and with `spec.enforce` the identity's subject is taken out of it. And an identity's
//! own objects deleted by hand are made again at once.

use std::time::Duration;

use agentid::api::{AgentIdentity, GrantPhase};
use k8s_openapi::api::{
    core::v1::{ConfigMap, Secret, ServiceAccount},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, PartialObjectMeta, Patch, PatchParams},
};
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

#[tokio::test]
async fn bindings_disguised_as_agentids_own_or_as_cluster_defaults_are_still_standing_privilege() -> anyhow::Result<()>
{
    operator().await?;
    let admin = cluster().admin().await?;
    let agents = TestNamespace::new(&admin, "disguise-a").await?;
    let target = TestNamespace::new(&admin, "disguise-t").await?;
    let elsewhere = TestNamespace::new(&admin, "disguise-u").await?;
    let (a, t, u) = (agents.name.clone(), target.name.clone(), elsewhere.name.clone());
    let mut strict = identity("strict", &[&t]);
    strict.spec.enforce = true;
    create(&admin, &a, &strict).await?;
    create(&admin, &a, &identity("other", &[&t])).await?;
    wait_identity_ready(&admin, &a, "strict").await?;
    create(&admin, &t, &serde_json::from_value::<ConfigMap>(json!({"metadata": {"name": "settings"}}))?).await?;
    create(&admin, &a, &grant("g", "strict", "10m", vec![rule(&t, "", &["configmaps"], &["get"], &["settings"])]))
        .await?;
    let g = wait_phase(&admin, &a, "g", GrantPhase::Active).await?;
    let grant_sa = g.status.and_then(|s| s.service_account_name).expect("serviceAccountName");

    // Each binding below names a Role of its own name, holding `get secrets`.
    let role_named = |name: &str| -> anyhow::Result<Role> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
        }))?)
    };
    let bound = |name: &str, sa: &str, labels: serde_json::Value| -> anyhow::Result<RoleBinding> {
        Ok(serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": a}]
        }))?)
    };
    let ours = json!({
        "app.kubernetes.io/managed-by": "agentid", "agentid.dev/component": "base", "agentid.dev/identity": "other"
    });
    let disguises = [
        // The requester binding's name and agentid's labels (naming another identity), in
        // another namespace than the ServiceAccount's.
        (t.clone(), bound("agentid-strict-requester", "agentid-strict", ours)?),
        // A cluster default's label, on a `system:` Role and binding.
        (
            t.clone(),
            bound("system:secret-reader", "agentid-strict", json!({"kubernetes.io/bootstrapping": "rbac-defaults"}))?,
        ),
        // The exact shape of the grant's own binding, where the grant has no Role.
        (u.clone(), bound(&grant_sa, &grant_sa, json!({}))?),
    ];
    // Enforced: the subject is taken out of each within seconds: one at a time, as each must
    // wake the identity it concerns by itself (the identity's own look comes every few minutes).
    for (ns, b) in disguises {
        let name = b.name_any();
        create(&admin, &ns, &role_named(&name)?).await?;
        create(&admin, &ns, &b).await?;
        let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), &ns);
        poll_until(Duration::from_secs(10), &format!("the subject to be removed from {ns}/{name}"), || {
            let (bindings, name) = (bindings.clone(), name.clone());
            async move { Ok(bindings.get(&name).await?.subjects.unwrap_or_default().is_empty().then_some(())) }
        })
        .await?;
    }
    // agentid's own bindings are untouched: the requester binding the first imitated, and the
    // grant's in its target namespace (its credential still works).
    let own = Api::<RoleBinding>::namespaced(admin.clone(), &a).get("agentid-strict-requester").await?;
    assert_eq!(own.subjects.unwrap_or_default().len(), 1);
    let grants_own = Api::<RoleBinding>::namespaced(admin.clone(), &t).get(&grant_sa).await?;
    assert_eq!(grants_own.subjects.unwrap_or_default().len(), 1);
    let g = wait_phase(&admin, &a, "g", GrantPhase::Active).await?;
    Api::<ConfigMap>::namespaced(agent_client(&admin, &g).await?, &t).get("settings").await?;
    agents.delete().await?;
    target.delete().await?;
    elsewhere.delete().await
}

/// Deletes `name` and waits until it is back with a new uid; returns how long that took.
async fn deleted_and_made_again<K>(api: Api<K>, name: &str) -> anyhow::Result<Duration>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let what = format!("{} {name} to be made again", K::kind(&()));
    let before = api.get_metadata(name).await?.uid();
    let deleted = std::time::Instant::now();
    api.delete(name, &DeleteParams::foreground()).await?;
    poll_until(Duration::from_secs(20), &what, || {
        let (api, before) = (api.clone(), before.clone());
        async move {
            let now: Option<PartialObjectMeta<K>> = api.get_metadata_opt(name).await?;
            Ok(now.filter(|m| m.uid() != before && m.metadata.deletion_timestamp.is_none()).map(|_| ()))
        }
    })
    .await?;
    Ok(deleted.elapsed())
}

#[tokio::test]
async fn an_identitys_objects_deleted_by_hand_are_made_again_at_once() -> anyhow::Result<()> {
    operator().await?;
    let admin = cluster().admin().await?;
    let agents = TestNamespace::new(&admin, "remade-a").await?;
    let target = TestNamespace::new(&admin, "remade-t").await?;
    let (a, t) = (agents.name.clone(), target.name.clone());
    create(&admin, &a, &identity("fixer", &[&t])).await?;
    wait_identity_ready(&admin, &a, "fixer").await?;

    // Each is a watched object that wakes its identity: well within the 20 s allowed, where the
    // identity's own periodic look (at least every five minutes) would be too late.
    let took = [
        deleted_and_made_again(Api::<ServiceAccount>::namespaced(admin.clone(), &a), "agentid-fixer").await?,
        deleted_and_made_again(Api::<Secret>::namespaced(admin.clone(), &a), "agentid-fixer-credentials").await?,
        deleted_and_made_again(Api::<Role>::namespaced(admin.clone(), &a), "agentid-fixer-requester").await?,
        deleted_and_made_again(Api::<RoleBinding>::namespaced(admin.clone(), &a), "agentid-fixer-requester").await?,
    ];
    println!("made again after {took:?}");
    wait_identity_ready(&admin, &a, "fixer").await?;

    // Edited by hand, alone: the base ServiceAccount made to mount its token into pods. Put back
    // at once (not at the next periodic apply, half an hour away).
    let service_accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), &a);
    service_accounts
        .patch("agentid-fixer", &PatchParams::default(), &Patch::Merge(json!({"automountServiceAccountToken": true})))
        .await?;
    poll_until(Duration::from_secs(10), "the base ServiceAccount not to mount its token again", || {
        let service_accounts = service_accounts.clone();
        async move {
            let sa = service_accounts.get("agentid-fixer").await?;
            Ok((sa.automount_service_account_token == Some(false)).then_some(()))
        }
    })
    .await?;

    // Edited by hand: the requester Role made to allow deleting grants too, and the binding
    // given to every ServiceAccount of the namespace. Both are put back.
    let roles: Api<Role> = Api::namespaced(admin.clone(), &a);
    let rules = roles.get("agentid-fixer-requester").await?.rules;
    let mut wider = rules.clone().unwrap_or_default();
    wider[0].verbs.push("delete".into());
    roles.patch("agentid-fixer-requester", &PatchParams::default(), &Patch::Merge(json!({"rules": wider}))).await?;
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), &a);
    let mut subjects = bindings.get("agentid-fixer-requester").await?.subjects.unwrap_or_default();
    let one = subjects.clone();
    subjects.push(serde_json::from_value(json!({"kind": "Group", "name": format!("system:serviceaccounts:{a}")}))?);
    bindings
        .patch("agentid-fixer-requester", &PatchParams::default(), &Patch::Merge(json!({"subjects": subjects})))
        .await?;
    poll_until(Duration::from_secs(10), "the requester Role and RoleBinding to be put back", || {
        let (roles, bindings, rules, one) = (roles.clone(), bindings.clone(), rules.clone(), one.clone());
        async move {
            let role = roles.get("agentid-fixer-requester").await?;
            let binding = bindings.get("agentid-fixer-requester").await?;
            Ok((role.rules == rules && binding.subjects.unwrap_or_default() == one).then_some(()))
        }
    })
    .await?;

    // A grant issued now writes its credentials into the new Secret.
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "settings"}, "data": {"k": "v"}}))?;
    create(&admin, &t, &cm).await?;
    create(&admin, &a, &grant("after", "fixer", "10m", vec![rule(&t, "", &["configmaps"], &["get"], &["settings"])]))
        .await?;
    wait_phase(&admin, &a, "after", GrantPhase::Active).await?;
    let mounted = Api::<Secret>::namespaced(admin.clone(), &a).get("agentid-fixer-credentials").await?;
    let agent = kubeconfig_client(&mounted, "after.kubeconfig").await?;
    Api::<ConfigMap>::namespaced(agent, &t).get("settings").await?;
    agents.delete().await?;
    target.delete().await
}
