//! Pods and identities: labelled pods get their identity's ServiceAccount and credentials; no
//! pod borrows an identity's or a grant's ServiceAccount or Secret. (No kubelet runs here: these
//! tests verify the pod specs the apiserver stores.)

use agentid::api::GrantPhase;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt, api::PostParams};
use serde_json::{Value, json};

use crate::{
    fixtures::*,
    harness::{TestNamespace, cluster, operator},
};

async fn setup(prefix: &str) -> anyhow::Result<(Client, TestNamespace, TestNamespace)> {
    operator().await?;
    let admin = cluster().admin().await?;
    let agents = TestNamespace::new(&admin, &format!("{prefix}-a")).await?;
    let target = TestNamespace::new(&admin, &format!("{prefix}-t")).await?;
    create(&admin, &agents.name, &identity("fixer", &[&target.name])).await?;
    create(&admin, &agents.name, &identity("other", &[&target.name])).await?;
    for name in ["fixer", "other"] {
        wait_identity_ready(&admin, &agents.name, name).await?;
    }
    Ok((admin, agents, target))
}

fn pod(name: &str, labels: Value, spec: Value) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "spec": spec})).expect("pod")
}

fn containers() -> Value {
    json!([{"name": "agent", "image": "agent:1"}, {"name": "sidecar", "image": "proxy:1"}])
}

async fn create_pod(client: &Client, ns: &str, p: &Pod) -> kube::Result<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns).create(&PostParams::default(), p).await
}

#[tokio::test]
async fn a_labelled_pod_gets_its_identity_and_an_unlabelled_pod_is_untouched() -> anyhow::Result<()> {
    let (admin, agents, target) = setup("inject").await?;
    let a = agents.name.as_str();
    let labelled = create_pod(
        &admin,
        a,
        &pod("agent", json!({"agentid.dev/identity": "fixer"}), json!({"containers": containers()})),
    )
    .await?;
    let spec = labelled.spec.clone().expect("spec");
    assert_eq!(spec.service_account_name.as_deref(), Some("agentid-fixer"));
    assert_eq!(spec.automount_service_account_token, Some(false));
    let volumes = spec.volumes.clone().unwrap_or_default();
    assert_eq!(volumes.len(), 1, "only agentid's volume, no default token: {volumes:?}");
    let secret = volumes[0].secret.clone().expect("secret volume");
    assert_eq!(secret.secret_name.as_deref(), Some("agentid-fixer-credentials"));
    assert_eq!(secret.optional, Some(true));
    for c in &spec.containers {
        let mounts = c.volume_mounts.clone().unwrap_or_default();
        assert!(
            mounts.iter().any(|m| m.mount_path == "/var/run/agentid" && m.read_only == Some(true)),
            "{}: {mounts:?}",
            c.name
        );
        assert!(
            c.env
                .iter()
                .flatten()
                .any(|e| e.name == "AGENTID_CREDENTIALS_DIR" && e.value.as_deref() == Some("/var/run/agentid"))
        );
    }

    let plain =
        create_pod(&admin, a, &pod("plain", json!({"app": "web"}), json!({"containers": containers()}))).await?;
    let spec = plain.spec.expect("spec");
    assert_ne!(spec.service_account_name.as_deref(), Some("agentid-fixer"));
    assert!(!spec.volumes.unwrap_or_default().iter().any(|v| v.name == "agentid-credentials"));
    assert!(spec.containers.iter().all(|c| c.env.iter().flatten().all(|e| e.name != "AGENTID_CREDENTIALS_DIR")));
    agents.delete().await?;
    target.delete().await
}

/// Asserts the pod was refused by agentid's admission with a message holding `fragment`.
#[track_caller]
fn assert_refused(result: kube::Result<Pod>, fragment: &str) {
    match result {
        Err(kube::Error::Api(s)) => {
            assert!(
                s.message.contains("admission webhook") && s.message.contains(fragment),
                "{:?} should mention {fragment:?}",
                s.message
            )
        }
        other => panic!("expected a refusal mentioning {fragment:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn no_pod_borrows_an_identity_or_a_grant() -> anyhow::Result<()> {
    let (admin, agents, target) = setup("borrow").await?;
    let (a, t) = (agents.name.as_str(), target.name.as_str());
    let g =
        create(&admin, a, &grant("read", "fixer", "10m", vec![rule(t, "", &["configmaps"], &["get"], &[])])).await?;
    let g = wait_phase(&admin, a, &g.name_any(), GrantPhase::Active).await?;
    let grant_object = g.status.and_then(|s| s.service_account_name).expect("grant SA");
    let c = containers();
    let cases = [
        (
            "unlabelled-as-identity",
            json!({}),
            json!({"serviceAccountName": "agentid-fixer", "containers": c}),
            "only pods labelled agentid.dev/identity: fixer",
        ),
        (
            "other-as-identity",
            json!({"agentid.dev/identity": "other"}),
            json!({"serviceAccountName": "agentid-fixer", "containers": c}),
            "remove serviceAccountName \"agentid-fixer\"",
        ),
        (
            "as-grant",
            json!({}),
            json!({"serviceAccountName": grant_object, "containers": c}),
            "belongs to an AccessGrant",
        ),
        (
            "labelled-as-grant",
            json!({"agentid.dev/identity": "fixer"}),
            json!({"serviceAccountName": grant_object, "containers": c}),
            "remove serviceAccountName",
        ),
        (
            "mounts-identity-secret",
            json!({}),
            json!({"containers": c, "volumes": [{"name": "v", "secret": {"secretName": "agentid-fixer-credentials"}}]}),
            "belongs to AgentIdentity \"fixer\"",
        ),
        (
            "other-mounts-identity-secret",
            json!({"agentid.dev/identity": "other"}),
            json!({"containers": c, "volumes": [{"name": "v", "secret": {"secretName": "agentid-fixer-credentials"}}]}),
            "labelled for \"other\"",
        ),
        (
            "mounts-grant-secret",
            json!({}),
            json!({"containers": c, "volumes": [{"name": "v", "secret": {"secretName": grant_object}}]}),
            "belongs to an AccessGrant",
        ),
        (
            "env-from-grant-secret",
            json!({}),
            json!({"containers": [{"name": "c", "image": "i", "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": grant_object, "key": "token"}}}]}]}),
            "belongs to an AccessGrant",
        ),
        (
            "unknown-identity",
            json!({"agentid.dev/identity": "ghost"}),
            json!({"containers": c}),
            "there is no AgentIdentity \"ghost\"",
        ),
    ];
    for (name, labels, spec, fragment) in cases {
        let r = create_pod(&admin, a, &pod(name, labels, spec)).await;
        assert_refused(r, fragment);
    }
    agents.delete().await?;
    target.delete().await
}

#[tokio::test]
async fn the_mounted_secret_gains_and_loses_a_grants_entries() -> anyhow::Result<()> {
    let (admin, agents, target) = setup("entries").await?;
    let (a, t) = (agents.name.as_str(), target.name.as_str());
    create_pod(&admin, a, &pod("agent", json!({"agentid.dev/identity": "fixer"}), json!({"containers": containers()})))
        .await?;
    assert!(identity_secret_keys(&admin, a, "fixer").await?.is_empty());
    create(&admin, a, &grant("jit", "fixer", "10m", vec![rule(t, "", &["configmaps"], &["get"], &[])])).await?;
    wait_phase(&admin, a, "jit", GrantPhase::Active).await?;
    assert_eq!(
        identity_secret_keys(&admin, a, "fixer").await?,
        ["jit.ca.crt", "jit.expires-at", "jit.kubeconfig", "jit.scope", "jit.token"]
    );
    kube::Api::<agentid::api::AccessGrant>::namespaced(admin.clone(), a).delete("jit", &Default::default()).await?;
    wait_grant_gone(&admin, a, "jit").await?;
    assert!(identity_secret_keys(&admin, a, "fixer").await?.is_empty());
    agents.delete().await?;
    target.delete().await
}

#[tokio::test]
async fn running_pods_as_an_identity_needs_the_right_to_use_it() -> anyhow::Result<()> {
    let (admin, agents, target) = setup("use").await?;
    let a = agents.name.as_str();
    // eve may create pods and Deployments here — which alone would let her run as any identity.
    role_for(
        &admin,
        a,
        "deployer",
        json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]},
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["create"]}
        ]),
        &["eve"],
    )
    .await?;
    let eve = cluster().user("eve", &[]).await?;

    let labelled = pod("eves-agent", json!({"agentid.dev/identity": "fixer"}), json!({"containers": containers()}));
    assert_refused(create_pod(&eve, a, &labelled).await, "eve may not run pods as AgentIdentity \"fixer\"");
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": {"name": "eves-agent"},
        "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {"metadata": {"labels": {"app": "x", "agentid.dev/identity": "fixer"}}, "spec": {"containers": containers()}}
        }
    }))?;
    let r = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(eve.clone(), a)
        .create(&PostParams::default(), &deployment)
        .await;
    match r {
        Err(kube::Error::Api(s)) => assert!(s.message.contains("may not run pods as AgentIdentity"), "{s:?}"),
        other => panic!("a Deployment borrowed an identity: {other:?}"),
    }

    // Given `use` on that one identity, she may.
    role_for(&admin, a, "use-fixer", json!([{"apiGroups": ["agentid.dev"], "resources": ["agentidentities"], "resourceNames": ["fixer"], "verbs": ["use"]}]), &["eve"]).await?;
    create_pod(&eve, a, &labelled).await?;
    let other = pod("eves-other", json!({"agentid.dev/identity": "other"}), json!({"containers": containers()}));
    assert_refused(create_pod(&eve, a, &other).await, "may not run pods as AgentIdentity \"other\"");
    agents.delete().await?;
    target.delete().await
}

#[tokio::test]
async fn a_labelled_deployment_gets_pods_that_run_as_its_identity() -> anyhow::Result<()> {
    let (admin, agents, target) = setup("deploy").await?;
    let a = agents.name.clone();
    // The admin may `use` the identity; the Deployment is checked when written, and the
    // ReplicaSet and pods the controllers make from it are admitted and injected.
    let deployment: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(json!({
        "metadata": {"name": "agent"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "agent"}},
                 "template": {"metadata": {"labels": {"app": "agent", "agentid.dev/identity": "fixer"}},
                              "spec": {"containers": containers()}}}
    }))?;
    create(&admin, &a, &deployment).await?;
    let pod = crate::harness::poll_until(std::time::Duration::from_secs(30), "a pod of the Deployment", || {
        let (admin, a) = (admin.clone(), a.clone());
        async move {
            let pods =
                Api::<Pod>::namespaced(admin, &a).list(&kube::api::ListParams::default().labels("app=agent")).await?;
            Ok(pods.items.into_iter().next())
        }
    })
    .await?;
    let spec = pod.spec.clone().unwrap_or_default();
    assert_eq!(spec.service_account_name.as_deref(), Some("agentid-fixer"));
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert!(spec.volumes.iter().flatten().any(|v| v.name == "agentid-credentials"), "{:?}", pod.name_any());
    agents.delete().await?;
    target.delete().await
}
