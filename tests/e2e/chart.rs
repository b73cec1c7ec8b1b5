//! The Helm chart and the install manifest: they lint, render, apply and uninstall cleanly on a
//! real control plane, and the operator — run as the chart's ServiceAccount, with the chart's
//! RBAC and nothing else — works inside its namespaces and cannot write RBAC outside them.
//!
//! helm is built from Go modules like the control plane (`tests/control-plane/cluster helm`).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use agentid::api::GrantPhase;
use anyhow::Context as _;
use k8s_openapi::api::{
    admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration},
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{ConfigMap, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
};
use serde_json::json;

use crate::{
    fixtures::*,
    harness::{Operator, PrivateCluster, client_from_kubeconfig, poll_until, repo_root, run, status_code},
};

/// The helm binary: `AGENTID_HELM`, or built and cached by the control-plane script.
pub fn helm_bin() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("AGENTID_HELM") {
        return Ok(path.into());
    }
    let out = Command::new(repo_root().join("tests/control-plane/cluster")).arg("helm").output()?;
    anyhow::ensure!(out.status.success(), "building helm failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout)?;
    Ok(stdout.lines().last().context("cluster helm printed nothing")?.trim().into())
}

/// Runs helm with `args` in the repository root; returns (success, stdout, stderr).
fn helm(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = Command::new(helm_bin()?).current_dir(repo_root()).args(args).output()?;
    Ok((out.status.success(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

fn helm_ok(args: &[&str]) -> anyhow::Result<String> {
    let (ok, out, err) = helm(args)?;
    anyhow::ensure!(ok, "helm {args:?} failed:\n{out}\n{err}");
    Ok(out)
}

/// A kubeconfig that authenticates with a fresh token of ServiceAccount `ns/name`.
async fn service_account_kubeconfig(admin: &Client, dir: &Path, ns: &str, name: &str) -> anyhow::Result<PathBuf> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec { expiration_seconds: Some(7200), ..Default::default() }),
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create_token_request(name, &PostParams::default(), &request)
        .await?
        .status
        .context("no token")?
        .token
        .context("no token")?;
    let admin_config = std::fs::read_to_string(dir.join("admin.kubeconfig"))?;
    let field = |key: &str| {
        admin_config
            .lines()
            .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_string()))
            .with_context(|| format!("{key} in admin.kubeconfig"))
    };
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: {name}\ncurrent-context: c\n",
        field("server:")?,
        field("certificate-authority-data:")?
    );
    let path = dir.join(format!("sa-{ns}-{name}.kubeconfig"));
    std::fs::write(&path, config)?;
    Ok(path)
}

/// `helm install agentid` into `agentid-system` of the cluster in `dir`, with `sets`.
fn install(dir: &Path, sets: &[&str]) -> anyhow::Result<String> {
    let kubeconfig = dir.join("admin.kubeconfig");
    let mut args = vec![
        "install",
        "agentid",
        "charts/agentid",
        "--namespace",
        "agentid-system",
        "--create-namespace",
        "--kubeconfig",
        kubeconfig.to_str().context("path")?,
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    helm_ok(&args)
}

/// The operator of the shared cluster, acting as the chart's ServiceAccount with the chart's
/// cluster-wide RBAC (`rbac.clusterWide=true`, `rbac.driftEnforcement=true`): what the second
/// pass of `tests/run` uses for the lifecycle and approval tests.
pub async fn operator_with_chart_rbac(dir: &Path) -> anyhow::Result<Operator> {
    let admin = client_from_kubeconfig(&dir.join("admin.kubeconfig")).await?;
    let (installed, _, _) =
        helm(&["status", "agentid", "-n", "agentid-system", "--kubeconfig", &kubeconfig_arg(dir)?])?;
    if !installed {
        // The first pass's operator registered the webhook configurations itself; the chart must
        // own them now.
        let _ = Api::<ValidatingWebhookConfiguration>::all(admin.clone()).delete("agentid", &Default::default()).await;
        let _ = Api::<MutatingWebhookConfiguration>::all(admin.clone()).delete("agentid", &Default::default()).await;
        // The suite installs the approver ClusterRole itself (deploy/approver-clusterrole.yaml).
        install(dir, &["rbac.clusterWide=true", "rbac.driftEnforcement=true", "rbac.createApproverRole=false"])?;
    }
    let kubeconfig = service_account_kubeconfig(&admin, dir, "agentid-system", "agentid").await?;
    Operator::start_as(
        dir,
        kubeconfig,
        &[("POD_NAMESPACE", "agentid-system")],
        &["--webhook-cert-secret", "agentid-system/agentid-webhook-cert", "--leader-election"],
    )
}

fn kubeconfig_arg(dir: &Path) -> anyhow::Result<String> {
    Ok(dir.join("admin.kubeconfig").to_str().context("path")?.to_string())
}

#[tokio::test]
async fn the_chart_lints_and_renders_and_the_install_manifest_is_current() -> anyhow::Result<()> {
    for values in [
        "charts/agentid/ci/confined-values.yaml",
        "charts/agentid/ci/cluster-wide-values.yaml",
        "charts/agentid/ci/cert-manager-values.yaml",
    ] {
        let out = helm_ok(&["lint", "--strict", "charts/agentid", "-f", values])?;
        assert!(out.contains("0 chart(s) failed"), "{out}");
        let rendered = helm_ok(&["template", "agentid", "charts/agentid", "-n", "agentid-system", "-f", values])?;
        // Every object renders with the hardened pod and no cluster-wide write to RBAC unless asked.
        assert!(rendered.contains("readOnlyRootFilesystem: true") && rendered.contains("type: RuntimeDefault"));
    }
    let confined = helm_ok(&[
        "template",
        "agentid",
        "charts/agentid",
        "-n",
        "agentid-system",
        "-f",
        "charts/agentid/ci/confined-values.yaml",
    ])?;
    // Confined: escalate/bind appear only in the per-target-namespace Roles.
    for doc in confined.split("\n---\n") {
        if doc.contains("verbs: [escalate, bind]") {
            assert!(
                doc.contains("kind: Role\n") && doc.contains("name: agentid-targets"),
                "escalate outside a target Role:\n{doc}"
            );
        }
    }
    assert!(confined.contains("--target-namespaces=staging,ci") && confined.contains("--agent-namespaces=agents"));

    // Without namespaces (and without cluster-wide RBAC asked for) the chart refuses, saying why.
    let (ok, _, err) = helm(&["template", "agentid", "charts/agentid"])?;
    assert!(!ok && err.contains("set namespaces.agents and namespaces.targets"), "{err}");
    // The schema refuses what is not a value of the chart.
    let (ok, _, err) =
        helm(&["template", "agentid", "charts/agentid", "--set", "rbac.clusterWide=true", "--set", "replicaCount=0"])?;
    assert!(!ok && err.contains("replicaCount"), "{err}");
    let (ok, _, err) = helm(&[
        "template",
        "agentid",
        "charts/agentid",
        "--set",
        "rbac.clusterWide=true",
        "--set",
        "namespaces.targets={Bad_NS}",
    ])?;
    assert!(!ok && err.contains("namespaces"), "{err}");

    // deploy/install.yaml is what hack/render-install makes from the chart today.
    let out = Command::new(repo_root().join("hack/render-install"))
        .arg("--stdout")
        .env("AGENTID_HELM", helm_bin()?)
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let on_disk = std::fs::read_to_string(repo_root().join("deploy/install.yaml"))?;
    assert!(
        on_disk == String::from_utf8(out.stdout)?,
        "deploy/install.yaml is out of date: run hack/render-install and commit the result"
    );
    Ok(())
}

/// Every cluster-scoped object the chart makes, by kind/name, that exists now.
async fn cluster_scoped_leftovers(admin: &Client) -> anyhow::Result<Vec<String>> {
    let lp = ListParams::default().labels("app.kubernetes.io/part-of=agentid");
    let mut found = Vec::new();
    found.extend(
        Api::<ClusterRole>::all(admin.clone()).list(&lp).await?.iter().map(|o| format!("ClusterRole/{}", o.name_any())),
    );
    found.extend(
        Api::<ClusterRoleBinding>::all(admin.clone())
            .list(&lp)
            .await?
            .iter()
            .map(|o| format!("ClusterRoleBinding/{}", o.name_any())),
    );
    for name in ["agentid"] {
        if Api::<ValidatingWebhookConfiguration>::all(admin.clone()).get_opt(name).await?.is_some() {
            found.push(format!("ValidatingWebhookConfiguration/{name}"));
        }
        if Api::<MutatingWebhookConfiguration>::all(admin.clone()).get_opt(name).await?.is_some() {
            found.push(format!("MutatingWebhookConfiguration/{name}"));
        }
    }
    found.sort();
    Ok(found)
}

/// Identity `reader` in `agents`, allowed into `staging`, and its grant `read` (get configmaps
/// there), waited until Active; the operator's log is attached to any failure.
async fn issue_reader_grant(admin: &Client, op: &Operator) -> anyhow::Result<agentid::api::AccessGrant> {
    create(admin, "agents", &identity("reader", &["staging"])).await?;
    wait_identity_ready(admin, "agents", "reader").await.with_context(|| op.log())?;
    let read = grant("read", "reader", "10m", vec![rule("staging", "", &["configmaps"], &["get"], &[])]);
    create(admin, "agents", &read).await?;
    wait_phase(admin, "agents", "read", GrantPhase::Active).await.with_context(|| op.log())
}

/// The apiserver's message for a refused request.
fn refusal<T: std::fmt::Debug>(result: kube::Result<T>) -> String {
    match result {
        Err(kube::Error::Api(s)) => s.message,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn installed_by_helm_the_operator_is_confined_to_its_namespaces() -> anyhow::Result<()> {
    let pc = PrivateCluster::start("chart").await?;
    let admin = pc.admin().await?;
    create_namespaces(&admin, &["agents", "staging", "other", "agentid-system"]).await?;
    let kubectl = |args: &[&str]| -> anyhow::Result<()> {
        let bin = String::from_utf8(
            Command::new(repo_root().join("tests/control-plane/cluster")).arg("bin").output()?.stdout,
        )?;
        let bin = bin.lines().last().context("bin dir")?.trim().to_string();
        run(Command::new(format!("{bin}/kubectl")).arg("--kubeconfig").arg(pc.dir.join("admin.kubeconfig")).args(args))
    };
    // The kubectl-apply manifest passes a server-side dry run on the real apiserver.
    let manifest = repo_root().join("deploy/install.yaml");
    kubectl(&["apply", "--server-side", "--dry-run=server", "-f", &manifest.to_string_lossy()])?;

    // helm install: identities in `agents`, grants confined to `staging`.
    install(&pc.dir, &["namespaces.agents={agents}", "namespaces.targets={staging}"])?;
    let kubeconfig = service_account_kubeconfig(&admin, &pc.dir, "agentid-system", "agentid").await?;
    let as_operator = client_from_kubeconfig(&kubeconfig).await?;

    // I7: the operator's own credential cannot write a Role outside its target namespaces …
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "widen"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    }))?;
    let outside = Api::<Role>::namespaced(as_operator.clone(), "other").create(&PostParams::default(), &role).await;
    assert_eq!(status_code(&outside), Some(403), "{outside:?}");
    // … nor give itself cluster-wide rights, nor read Secrets where it has no business.
    let crb: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "widen"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "agentid", "namespace": "agentid-system"}]
    }))?;
    let widened = Api::<ClusterRoleBinding>::all(as_operator.clone()).create(&PostParams::default(), &crb).await;
    assert_eq!(status_code(&widened), Some(403), "{widened:?}");
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(as_operator.clone(), "other")
        .list(&ListParams::default())
        .await;
    assert_eq!(status_code(&secrets), Some(403), "{secrets:?}");
    // … while inside them it can (the test can fail).
    Api::<Role>::namespaced(as_operator.clone(), "staging").create(&PostParams::default(), &role).await?;

    // The operator, run as that ServiceAccount, works inside its namespaces.
    let op = Operator::start_as(
        &pc.dir,
        kubeconfig,
        &[("POD_NAMESPACE", "agentid-system")],
        &[
            "--agent-namespaces",
            "agents",
            "--target-namespaces",
            "staging",
            "--webhook-cert-secret",
            "agentid-system/agentid-webhook-cert",
            "--leader-election",
        ],
    )?;
    op.wait_ready().await.with_context(|| op.log())?;
    let config: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "settings"}, "data": {"k": "v"}}))?;
    create(&admin, "staging", &config).await?;
    let active = issue_reader_grant(&admin, &op).await?;
    let agent = agent_client(&admin, &active).await?;
    Api::<ConfigMap>::namespaced(agent, "staging").get("settings").await?;

    // Identities outside the installation are refused at admission, with the reason.
    let refused = Api::<agentid::api::AgentIdentity>::namespaced(admin.clone(), "agents")
        .create(&PostParams::default(), &identity("wide", &["staging", "other"]))
        .await;
    assert!(refusal(refused).contains("[\"other\"] are outside this installation's target namespaces"));
    let refused = Api::<agentid::api::AgentIdentity>::namespaced(admin.clone(), "other")
        .create(&PostParams::default(), &identity("elsewhere", &["staging"]))
        .await;
    assert!(refusal(refused).contains("serves AgentIdentities in namespaces [\"agents\"] only"));

    // Upgrade: one more target namespace gets its Role; the first one keeps working.
    let kubeconfig = kubeconfig_arg(&pc.dir)?;
    helm_ok(&[
        "upgrade",
        "agentid",
        "charts/agentid",
        "-n",
        "agentid-system",
        "--kubeconfig",
        &kubeconfig,
        "--set",
        "namespaces.agents={agents}",
        "--set",
        "namespaces.targets={staging,other}",
    ])?;
    poll_until(Duration::from_secs(10), "the new target namespace's Role", || {
        let admin = admin.clone();
        async move { Ok(Api::<Role>::namespaced(admin, "other").get_opt("agentid-targets").await?.map(|_| ())) }
    })
    .await?;

    // Uninstall, after the identities (their grants are revoked): nothing cluster-scoped is left
    // but the CRDs.
    Api::<agentid::api::AgentIdentity>::namespaced(admin.clone(), "agents")
        .delete("reader", &Default::default())
        .await?;
    poll_until(Duration::from_secs(30), "the identity is gone", || {
        let admin = admin.clone();
        async move {
            let left = Api::<agentid::api::AgentIdentity>::namespaced(admin, "agents").get_opt("reader").await?;
            Ok(left.is_none().then_some(()))
        }
    })
    .await
    .with_context(|| op.log())?;
    drop(op);
    let before = cluster_scoped_leftovers(&admin).await?;
    assert!(before.contains(&"ClusterRole/agentid".to_string()), "{before:?}");
    helm_ok(&["uninstall", "agentid", "-n", "agentid-system", "--kubeconfig", &kubeconfig, "--wait"])?;
    assert_eq!(cluster_scoped_leftovers(&admin).await?, Vec::<String>::new());
    let crds =
        Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(
            admin.clone(),
        )
        .list(&ListParams::default())
        .await?;
    assert_eq!(crds.items.iter().filter(|c| c.name_any().ends_with(".agentid.dev")).count(), 3, "the CRDs stay");
    Ok(())
}

#[tokio::test]
async fn with_cert_manager_the_operator_serves_the_issued_certificate_and_keeps_the_injected_ca() -> anyhow::Result<()>
{
    let pc = PrivateCluster::start("certmanager").await?;
    let admin = pc.admin().await?;
    create_namespaces(&admin, &["agentid-system", "agents", "staging"]).await?;
    // What cert-manager would write: a CA-signed serving certificate in a kubernetes.io/tls Secret.
    let issued = agentid::admission::certs::generate(&["127.0.0.1".to_string()], jiff::Timestamp::now())?;
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "agentid-webhook-cert"},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": issued.cert_pem, "tls.key": issued.key_pem, "ca.crt": issued.ca_pem}
    }))?;
    create(&admin, "agentid-system", &secret).await?;
    let args = ["--webhook-cert-secret", "agentid-system/agentid-webhook-cert", "--webhook-cert-external"];
    let op =
        Operator::start_as(&pc.dir, pc.dir.join("admin.kubeconfig"), &[("POD_NAMESPACE", "agentid-system")], &args)?;
    op.wait_ready().await.with_context(|| op.log())?;

    // agentid registered its webhooks without a caBundle: that is the injector's job.
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(admin.clone());
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let hooks = validating.get("agentid").await?.webhooks.unwrap_or_default();
    assert!(!hooks.is_empty() && hooks.iter().all(|h| h.client_config.ca_bundle.is_none()), "{hooks:?}");
    // Until then the webhook cannot be reached, and agentid's resources cannot be created (fail closed).
    let early = Api::<agentid::api::AgentIdentity>::namespaced(admin.clone(), "agents")
        .create(&PostParams::default(), &identity("early", &["staging"]))
        .await;
    assert!(early.is_err(), "created without a trusted webhook: {early:?}");

    // What cainjector does: copy ca.crt into every webhook.
    let ca = k8s_openapi::ByteString(issued.ca_pem.clone().into_bytes());
    let mut v = validating.get("agentid").await?;
    v.webhooks.iter_mut().flatten().for_each(|h| h.client_config.ca_bundle = Some(ca.clone()));
    validating.replace("agentid", &PostParams::default(), &v).await?;
    let mut m = mutating.get("agentid").await?;
    m.webhooks.iter_mut().flatten().for_each(|h| h.client_config.ca_bundle = Some(ca.clone()));
    mutating.replace("agentid", &PostParams::default(), &m).await?;

    // A restart re-registers the webhooks and leaves the injected CA alone.
    op.restart(&[("POD_NAMESPACE", "agentid-system")])?;
    op.wait_ready().await.with_context(|| op.log())?;
    let hooks = validating.get("agentid").await?.webhooks.unwrap_or_default();
    assert!(hooks.iter().all(|h| h.client_config.ca_bundle.as_ref() == Some(&ca)), "the injected CA was lost");

    // The apiserver now reaches the webhook over TLS with the issued certificate: grants flow.
    let active = issue_reader_grant(&admin, &op).await?;
    assert_eq!(active.status.and_then(|s| s.requested_by).as_deref(), Some("admin"), "the mutating webhook ran");
    Ok(())
}
