//! The folders under `examples/`, applied as they are on disk and checked against what their
//! README.md says. Only the namespaces change: each example's namespaces (`agents`, `staging`,
//! …, listed in its `00-namespaces.yaml`) become namespaces of this test's own, in
//! `metadata.namespace`, `spec.allowedNamespaces`, `spec.approval.protectedResources[].namespaces`
//! and `spec.kubernetes.rules[].namespace`; every other field is the file's.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Mutex,
};

use agentid::api::{AccessGrant, GrantPhase, KubernetesRule};
use anyhow::{Context as _, ensure};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Event, PersistentVolumeClaim, Pod, Secret, Service},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams, WatchParams},
    discovery,
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::{
    fixtures::*,
    harness::{TestNamespace, assert_forbidden, cluster, operator, repo_root},
};

/// One folder of `examples/`, with a namespace of this test's own for each of its namespaces.
struct Example {
    dir: PathBuf,
    admin: Client,
    /// The example's namespace name → this test's namespace.
    namespaces: BTreeMap<String, TestNamespace>,
    /// The folder's files the test has read, to check none is left untested.
    used: Mutex<BTreeSet<String>>,
}

/// Every `.yaml` file under `dir`, relative to it.
fn yaml_files(dir: &Path, under: &str, found: &mut BTreeSet<String>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir.join(under))? {
        let entry = entry?;
        let name = format!("{under}{}", entry.file_name().to_string_lossy());
        if entry.file_type()?.is_dir() {
            yaml_files(dir, &format!("{name}/"), found)?;
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            found.insert(name);
        }
    }
    Ok(())
}

/// Every YAML document of a file, as JSON values.
fn read_docs(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Replaces the example's namespace names in `doc` by the test's, and nothing else.
fn localize(doc: &mut Value, map: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let swap = |v: &mut Value| -> anyhow::Result<()> {
        let from = v.as_str().context("a namespace must be a string")?;
        let to =
            map.get(from).with_context(|| format!("namespace {from:?} is not in the example's 00-namespaces.yaml"))?;
        *v = Value::String(to.clone());
        Ok(())
    };
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    ensure!(kind != "Namespace", "namespaces come from 00-namespaces.yaml only");
    let ns = doc.pointer_mut("/metadata/namespace").with_context(|| format!("{kind} without metadata.namespace"))?;
    swap(ns)?;
    let lists: &[&str] = match kind.as_str() {
        "AgentIdentity" => &["/spec/allowedNamespaces"],
        _ => &[],
    };
    for pointer in lists {
        for v in doc.pointer_mut(pointer).and_then(Value::as_array_mut).into_iter().flatten() {
            swap(v)?;
        }
    }
    if kind == "AgentIdentity" {
        let protected = doc.pointer_mut("/spec/approval/protectedResources").and_then(Value::as_array_mut);
        for p in protected.into_iter().flatten() {
            for v in p.get_mut("namespaces").and_then(Value::as_array_mut).into_iter().flatten() {
                swap(v)?;
            }
        }
    }
    if kind == "AccessGrant" {
        let rules = doc.pointer_mut("/spec/kubernetes/rules").and_then(Value::as_array_mut);
        for rule in rules.into_iter().flatten() {
            swap(rule.get_mut("namespace").context("a rule without namespace")?)?;
        }
    }
    Ok(())
}

/// Creates `doc` as `client`, like `kubectl create -f` (its kind looked up by discovery).
async fn create_object(client: &Client, doc: Value) -> anyhow::Result<DynamicObject> {
    let obj: DynamicObject = serde_json::from_value(doc)?;
    let types = obj.types.clone().context("apiVersion and kind")?;
    let (resource, _) = discovery::pinned_kind(client, &GroupVersionKind::try_from(&types)?).await?;
    let ns = obj.namespace().context("namespace")?;
    let what = format!("{} {ns}/{}", types.kind, obj.metadata.name.clone().unwrap_or_default());
    Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &resource)
        .create(&PostParams::default(), &obj)
        .await
        .with_context(|| format!("creating {what}"))
}

impl Example {
    /// Creates a namespace of this test's own for each namespace in the folder's
    /// `00-namespaces.yaml` (what `kubectl apply -f 00-namespaces.yaml` would create).
    async fn new(folder: &str, tag: &str) -> anyhow::Result<Self> {
        operator().await?;
        let admin = cluster().admin().await?;
        let dir = repo_root().join("examples").join(folder);
        ensure!(dir.join("README.md").exists(), "{} has no README.md", dir.display());
        let mut namespaces = BTreeMap::new();
        for doc in read_docs(&dir.join("00-namespaces.yaml"))? {
            ensure!(doc["kind"] == "Namespace", "00-namespaces.yaml holds only Namespaces: {doc}");
            let name = doc["metadata"]["name"].as_str().context("a Namespace without a name")?.to_string();
            let ns = TestNamespace::new(&admin, &format!("{tag}-{name}")).await?;
            namespaces.insert(name, ns);
        }
        let used = Mutex::new(BTreeSet::from(["00-namespaces.yaml".to_string()]));
        Ok(Self { dir, admin, namespaces, used })
    }

    /// This test's namespace for the example's namespace `name`.
    fn ns(&self, name: &str) -> &str {
        &self.namespaces.get(name).unwrap_or_else(|| panic!("the example has no namespace {name}")).name
    }

    /// The text of `file` (relative to the folder) as it is on disk.
    fn text(&self, file: &str) -> anyhow::Result<String> {
        self.used.lock().unwrap_or_else(|e| e.into_inner()).insert(file.to_string());
        std::fs::read_to_string(self.dir.join(file)).with_context(|| format!("reading {file}"))
    }

    /// Every object of `file` (relative to the folder), its namespaces replaced by the test's.
    fn docs(&self, file: &str) -> anyhow::Result<Vec<Value>> {
        self.used.lock().unwrap_or_else(|e| e.into_inner()).insert(file.to_string());
        let map: BTreeMap<String, String> = self.namespaces.iter().map(|(k, v)| (k.clone(), v.name.clone())).collect();
        let mut docs = read_docs(&self.dir.join(file))?;
        for doc in &mut docs {
            localize(doc, &map).with_context(|| format!("{file}: {doc}"))?;
        }
        Ok(docs)
    }

    /// The single object of `file`, typed.
    fn one<K: DeserializeOwned>(&self, file: &str) -> anyhow::Result<K> {
        let mut docs = self.docs(file)?;
        ensure!(docs.len() == 1, "{file} should hold one object, it holds {}", docs.len());
        Ok(serde_json::from_value(docs.remove(0))?)
    }

    /// Creates every object of `file` as `client`, in file order, as `kubectl apply -f FILE`
    /// would on a fresh cluster.
    async fn apply(&self, client: &Client, file: &str) -> anyhow::Result<Vec<DynamicObject>> {
        let mut created = Vec::new();
        for doc in self.docs(file)? {
            created.push(create_object(client, doc).await.with_context(|| file.to_string())?);
        }
        Ok(created)
    }

    /// Checks the test used every YAML file of the folder, then deletes its namespaces.
    async fn cleanup(self) -> anyhow::Result<()> {
        let mut files = BTreeSet::new();
        yaml_files(&self.dir, "", &mut files)?;
        let used = self.used.into_inner().unwrap_or_else(|e| e.into_inner());
        ensure!(
            files == used,
            "{}: the test should use every file: on disk {files:?}, used {used:?}",
            self.dir.display()
        );
        for (_, ns) in self.namespaces {
            ns.delete().await?;
        }
        Ok(())
    }
}

/// The five files `/var/run/agentid` holds for `grant`, sorted.
fn grant_files(grant: &str) -> Vec<String> {
    ["ca.crt", "expires-at", "kubeconfig", "scope", "token"].iter().map(|k| format!("{grant}.{k}")).collect()
}

/// A client from `/var/run/agentid/<grant>.kubeconfig` as the agent's pod sees it: the entry of
/// the identity's credentials Secret.
async fn credential(admin: &Client, agents: &str, identity: &str, grant: &str) -> anyhow::Result<Client> {
    let secret =
        Api::<Secret>::namespaced(admin.clone(), agents).get(&format!("agentid-{identity}-credentials")).await?;
    kubeconfig_client(&secret, &format!("{grant}.kubeconfig")).await
}

fn phase(grant: &AccessGrant) -> Option<GrantPhase> {
    grant.status.as_ref().and_then(|s| s.phase)
}

fn reasons(grant: &AccessGrant) -> Vec<String> {
    grant.status.clone().unwrap_or_default().approval_reasons
}

/// Runs `kubectl agentid ARGS` as `user` and returns its stdout, failing on an error.
fn plugin_ok(user: &str, ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let (ok, out, err) = plugin(user, ns, args)?;
    ensure!(ok, "kubectl agentid {args:?} as {user} failed: {err}");
    Ok(out)
}

#[tokio::test]
async fn incident_example_waits_for_another_human_then_deletes_exactly_one_volume() -> anyhow::Result<()> {
    let ex = Example::new("incident", "ex-incident").await?;
    let admin = ex.admin.clone();
    let (agents, staging, production) = (ex.ns("agents"), ex.ns("staging"), ex.ns("production"));

    // README step 1: the stage, the identity, and who may approve.
    ex.apply(&admin, "10-volumes.yaml").await?;
    ex.apply(&admin, "20-identity.yaml").await?;
    install_approver_role(&admin).await?; // the chart's ClusterRole, as the RoleBinding expects
    ex.apply(&admin, "30-approvers.yaml").await?;

    // Step 2: the agent asks to delete the volume, with its base identity
    // (kubectl create --as system:serviceaccount:agents:agentid-staging-fixer -f 40-cleanup-volume.yaml).
    let agent = base_sa_client(&admin, agents, "staging-fixer").await?;
    ex.apply(&agent, "40-cleanup-volume.yaml").await?;
    let held = wait_phase(&admin, agents, "cleanup-volume", GrantPhase::AwaitingApproval).await?;
    let status = held.status.clone().unwrap_or_default();
    assert_eq!(status.requires_approval, Some(true));
    assert_eq!(
        status.requested_by.as_deref(),
        Some(format!("system:serviceaccount:{agents}:agentid-staging-fixer").as_str())
    );
    assert_eq!(
        status.approval_reasons,
        vec![format!("destructive: delete persistentvolumeclaims/db-volume in {staging}")]
    );
    let uid = held.uid().unwrap_or_default();
    assert_eq!(grant_objects(&admin, &uid, &[agents, staging]).await?, Vec::<String>::new(), "no credential yet");
    assert!(identity_secret_keys(&admin, agents, "staging-fixer").await?.is_empty(), "nothing in /var/run/agentid");

    // Step 3: alice (sre-leads) reviews.
    cluster().user("alice", &["sre-leads"]).await?;
    let pending = plugin_ok("alice", agents, &["pending"])?;
    assert!(pending.contains("cleanup-volume") && pending.contains("0/1"), "{pending}");
    assert!(pending.contains("destructive: delete persistentvolumeclaims/db-volume"), "{pending}");
    let explained = plugin_ok("alice", agents, &["explain", "cleanup-volume"])?;
    assert!(
        explained.contains(&format!("get, delete persistentvolumeclaims db-volume in namespace {staging}")),
        "{explained}"
    );
    assert!(explained.contains("Approved by: nobody yet"), "{explained}");

    // Someone outside sre-leads (and without the approver role) cannot release it.
    cluster().user("oscar", &[]).await?;
    let (ok, _, err) = plugin("oscar", agents, &["approve", "cleanup-volume", "--reason", "looks fine"])?;
    assert!(!ok && err.contains("forbidden"), "oscar approved: {err}");
    // Neither can a cluster admin the identity does not list.
    let (ok, _, err) = plugin("admin", agents, &["approve", "cleanup-volume", "--reason", "I am admin"])?;
    assert!(!ok && err.contains("admin is not an approver of AgentIdentity \"staging-fixer\""), "{err}");
    let still = wait_phase(&admin, agents, "cleanup-volume", GrantPhase::AwaitingApproval).await?;
    assert!(still.status.unwrap_or_default().approvals.is_empty());
    assert_eq!(grant_objects(&admin, &uid, &[agents, staging]).await?, Vec::<String>::new());

    // alice approves: the grant becomes Active and its files appear.
    let out =
        plugin_ok("alice", agents, &["approve", "cleanup-volume", "--reason", "staging only, checked it is orphaned"])?;
    assert!(out.contains("accessgrant/cleanup-volume approved by alice"), "{out}");
    let issued = wait_phase(&admin, agents, "cleanup-volume", GrantPhase::Active).await?;
    let approvers: Vec<String> =
        issued.status.clone().unwrap_or_default().approvals.into_iter().map(|a| a.approver).collect();
    assert_eq!(approvers, vec!["alice"]);
    assert_eq!(identity_secret_keys(&admin, agents, "staging-fixer").await?, grant_files("cleanup-volume"));

    // Step 4: the agent uses /var/run/agentid/cleanup-volume.kubeconfig.
    let cred = credential(&admin, agents, "staging-fixer", "cleanup-volume").await?;
    let prod_pvcs: Api<PersistentVolumeClaim> = Api::namespaced(cred.clone(), production);
    let staging_pvcs: Api<PersistentVolumeClaim> = Api::namespaced(cred.clone(), staging);
    assert_forbidden(prod_pvcs.delete("db-volume", &DeleteParams::default()).await, "deleting production's db-volume");
    assert_forbidden(prod_pvcs.get("db-volume").await, "reading production");
    assert_forbidden(staging_pvcs.delete("uploads", &DeleteParams::default()).await, "deleting another staging volume");
    assert_forbidden(staging_pvcs.list(&ListParams::default()).await, "listing staging's volumes");
    assert_forbidden(
        Api::<ConfigMap>::namespaced(cred.clone(), staging).list(&ListParams::default()).await,
        "anything but volumes",
    );
    staging_pvcs.get("db-volume").await?;
    staging_pvcs.delete("db-volume", &DeleteParams::default()).await?;

    let admin_pvcs = |ns: &str| Api::<PersistentVolumeClaim>::namespaced(admin.clone(), ns);
    let gone = admin_pvcs(staging).get_opt("db-volume").await?;
    assert!(gone.is_none_or(|p| p.metadata.deletion_timestamp.is_some()), "staging's db-volume is being deleted");
    for (ns, name) in [(production, "db-volume"), (staging, "uploads")] {
        let pvc = admin_pvcs(ns).get(name).await?;
        assert!(pvc.metadata.deletion_timestamp.is_none(), "{ns}/{name} must survive");
    }
    ex.cleanup().await
}

#[tokio::test]
async fn read_only_observability_example_is_issued_at_once_and_only_reads() -> anyhow::Result<()> {
    let ex = Example::new("read-only-observability", "ex-observe").await?;
    let admin = ex.admin.clone();
    let (agents, staging) = (ex.ns("agents"), ex.ns("staging"));
    // Something to observe, and a Secret it must not read.
    create(
        &admin,
        staging,
        &serde_json::from_value::<ConfigMap>(json!({"metadata": {"name": "app-settings"}, "data": {"mode": "live"}}))?,
    )
    .await?;
    create(
        &admin,
        staging,
        &serde_json::from_value::<Secret>(
            json!({"metadata": {"name": "db-password"}, "stringData": {"password": "s3cret"}}),
        )?,
    )
    .await?;

    // kubectl apply -f examples/read-only-observability/ — one file after the other, no waiting.
    ex.apply(&admin, "10-identity.yaml").await?;
    ex.apply(&admin, "20-observe-staging.yaml").await?;
    let active = wait_phase(&admin, agents, "observe-staging", GrantPhase::Active).await?;
    assert_eq!(reasons(&active), Vec::<String>::new(), "routine: no approval");
    assert_ne!(active.status.clone().unwrap_or_default().requires_approval, Some(true));
    let explained = plugin_ok("admin", agents, &["explain", "observe-staging"])?;
    assert!(explained.contains("It needs no approval"), "{explained}");
    assert!(explained.contains("get, list, watch every pods object"), "{explained}");
    assert_eq!(identity_secret_keys(&admin, agents, "staging-observer").await?, grant_files("observe-staging"));

    let cred = credential(&admin, agents, "staging-observer", "observe-staging").await?;
    let lp = ListParams::default();
    Api::<Pod>::namespaced(cred.clone(), staging).list(&lp).await?;
    Api::<Event>::namespaced(cred.clone(), staging).list(&lp).await?;
    Api::<Service>::namespaced(cred.clone(), staging).list(&lp).await?;
    Api::<Deployment>::namespaced(cred.clone(), staging).list(&lp).await?;
    let configmaps: Api<ConfigMap> = Api::namespaced(cred.clone(), staging);
    assert_eq!(
        configmaps.get("app-settings").await?.data.unwrap_or_default().get("mode").map(String::as_str),
        Some("live")
    );
    configmaps.list(&lp).await?;
    drop(Api::<Pod>::namespaced(cred.clone(), staging).watch(&WatchParams::default().timeout(1), "0").await?);

    // It reads, and nothing more.
    let secrets: Api<Secret> = Api::namespaced(cred.clone(), staging);
    assert_forbidden(secrets.get("db-password").await, "reading a Secret");
    assert_forbidden(secrets.list(&lp).await, "listing Secrets");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "new"}, "data": {"a": "b"}}))?;
    assert_forbidden(configmaps.create(&PostParams::default(), &cm).await, "creating a ConfigMap");
    let patch = Patch::Merge(json!({"data": {"mode": "changed"}}));
    assert_forbidden(configmaps.patch("app-settings", &PatchParams::default(), &patch).await, "patching a ConfigMap");
    assert_forbidden(configmaps.delete("app-settings", &DeleteParams::default()).await, "deleting a ConfigMap");
    assert_forbidden(
        Api::<Deployment>::namespaced(cred.clone(), staging)
            .patch("anything", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 0}})))
            .await,
        "scaling a Deployment down",
    );
    assert_forbidden(Api::<Pod>::namespaced(cred.clone(), agents).list(&lp).await, "another namespace");

    // Reading Secrets is another grant, and that one waits for a human.
    let mut secret_grant: AccessGrant = ex.one("20-observe-staging.yaml")?;
    secret_grant.metadata.name = Some("read-db-password".into());
    secret_grant.spec.kubernetes.as_mut().context("kubernetes")?.rules = vec![KubernetesRule {
        namespace: staging.into(),
        api_groups: vec!["".into()],
        resources: vec!["secrets".into()],
        verbs: vec!["get".into()],
        resource_names: vec!["db-password".into()],
    }];
    create(&admin, agents, &secret_grant).await?;
    let held = wait_phase(&admin, agents, "read-db-password", GrantPhase::AwaitingApproval).await?;
    assert_eq!(reasons(&held), vec![format!("sensitive: get secrets/db-password in {staging}")]);
    ex.cleanup().await
}

#[tokio::test]
async fn ci_deploy_example_patches_web_and_no_other_deployment() -> anyhow::Result<()> {
    let ex = Example::new("ci-deploy-agent", "ex-ci").await?;
    let admin = ex.admin.clone();
    let (agents, staging) = (ex.ns("agents"), ex.ns("staging"));

    // kubectl apply -f examples/ci-deploy-agent/
    ex.apply(&admin, "10-deployments.yaml").await?;
    ex.apply(&admin, "20-identity.yaml").await?;
    ex.apply(&admin, "30-deploy-web.yaml").await?;
    let active = wait_phase(&admin, agents, "deploy-web", GrantPhase::Active).await?;
    assert_eq!(reasons(&active), Vec::<String>::new(), "patching a Deployment in staging is routine");
    let explained = plugin_ok("admin", agents, &["explain", "deploy-web"])?;
    assert!(explained.contains("It needs no approval"), "{explained}");
    assert!(explained.contains(&format!("get, patch deployments.apps web in namespace {staging}")), "{explained}");

    // The pipeline rolls out a new image with /var/run/agentid/deploy-web.kubeconfig.
    let cred = credential(&admin, agents, "ci-deployer", "deploy-web").await?;
    let deployments: Api<Deployment> = Api::namespaced(cred.clone(), staging);
    deployments.get("web").await?;
    let new_image = Patch::Strategic(
        json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "image": "nginx:1.28"}]}}}}),
    );
    deployments.patch("web", &PatchParams::default(), &new_image).await?;
    let image = |d: Deployment| {
        d.spec.and_then(|s| s.template.spec).and_then(|s| s.containers.first().and_then(|c| c.image.clone()))
    };
    let admin_deployments: Api<Deployment> = Api::namespaced(admin.clone(), staging);
    assert_eq!(image(admin_deployments.get("web").await?).as_deref(), Some("nginx:1.28"));

    // Nothing but web, nothing but get and patch.
    let to_payments = Patch::Strategic(
        json!({"spec": {"template": {"spec": {"containers": [{"name": "payments", "image": "evil:1"}]}}}}),
    );
    assert_forbidden(deployments.patch("payments", &PatchParams::default(), &to_payments).await, "patching payments");
    assert_forbidden(deployments.get("payments").await, "reading payments");
    assert_forbidden(deployments.list(&ListParams::default()).await, "listing Deployments");
    assert_forbidden(deployments.delete("web", &DeleteParams::default()).await, "deleting web");
    assert_forbidden(
        deployments.patch_scale("web", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 5}}))).await,
        "scaling web (deployments/scale)",
    );
    let copy: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web-copy"},
        "spec": {"selector": {"matchLabels": {"app": "x"}}, "template": {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "nginx:1.28"}]}}}
    }))?;
    assert_forbidden(deployments.create(&PostParams::default(), &copy).await, "creating a Deployment");
    assert_forbidden(
        Api::<Deployment>::namespaced(cred.clone(), agents).patch("web", &PatchParams::default(), &new_image).await,
        "a Deployment in another namespace",
    );
    assert_eq!(image(admin_deployments.get("payments").await?).as_deref(), Some("nginx:1.27"));

    // The same request for payments, which the identity protects, waits for sre-leads.
    let mut payments: AccessGrant = ex.one("30-deploy-web.yaml")?;
    payments.metadata.name = Some("deploy-payments".into());
    payments.spec.kubernetes.as_mut().context("kubernetes")?.rules[0].resource_names = vec!["payments".into()];
    create(&admin, agents, &payments).await?;
    let held = wait_phase(&admin, agents, "deploy-payments", GrantPhase::AwaitingApproval).await?;
    assert_eq!(
        reasons(&held),
        vec![
            format!("protected: get deployments.apps/payments in {staging}"),
            format!("protected: patch deployments.apps/payments in {staging}"),
        ]
    );
    ex.cleanup().await
}

#[tokio::test]
async fn jit_agent_example_runs_as_its_identity_and_asks_for_its_own_grant() -> anyhow::Result<()> {
    let ex = Example::new("jit-agent", "ex-jit").await?;
    let admin = ex.admin.clone();
    let (agents, staging) = (ex.ns("agents"), ex.ns("staging"));

    // kubectl create configmap config-fixer-requests -n agents --from-file=agent/fix-settings.yaml
    let request_text = ex.text("agent/fix-settings.yaml")?;
    let requests: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "config-fixer-requests"}, "data": {"fix-settings.yaml": request_text}}),
    )?;
    create(&admin, agents, &requests).await?;
    // kubectl apply -f examples/jit-agent/
    ex.apply(&admin, "10-app-settings.yaml").await?;
    ex.apply(&admin, "20-identity.yaml").await?;
    // kubectl wait -n agents --for condition=Ready aid/config-fixer: the pod runs as the
    // identity's ServiceAccount, which agentid makes first.
    wait_identity_ready(&admin, agents, "config-fixer").await?;
    // kubectl apply -f 30-agent.yaml
    // The pod as the apiserver stored it: agentid's webhook gave it the identity. (No kubelet
    // runs it here.)
    let created = ex.apply(&admin, "30-agent.yaml").await?;
    let pod: Pod = serde_json::from_value(serde_json::to_value(&created[0])?)?;
    let spec = pod.spec.clone().context("spec")?;
    assert_eq!(spec.service_account_name.as_deref(), Some("agentid-config-fixer"));
    assert_eq!(spec.automount_service_account_token, Some(false));
    let volumes = spec.volumes.clone().unwrap_or_default();
    let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["request-token", "requests", "agentid-credentials"], "no automounted token volume");
    let credentials = volumes[2].secret.clone().context("agentid-credentials is a Secret volume")?;
    assert_eq!(credentials.secret_name.as_deref(), Some("agentid-config-fixer-credentials"));
    let projected = volumes[0].projected.clone().and_then(|p| p.sources).unwrap_or_default();
    assert!(projected.iter().any(|s| s.service_account_token.is_some()), "the request token stays");
    let container = &spec.containers[0];
    let mounts: Vec<(String, String, Option<bool>)> =
        container.volume_mounts.iter().flatten().map(|m| (m.name.clone(), m.mount_path.clone(), m.read_only)).collect();
    assert!(mounts.contains(&("agentid-credentials".into(), "/var/run/agentid".into(), Some(true))), "{mounts:?}");
    assert!(
        mounts.contains(&("request-token".into(), "/var/run/secrets/kubernetes.io/serviceaccount".into(), Some(true))),
        "{mounts:?}"
    );
    assert!(
        container
            .env
            .iter()
            .flatten()
            .any(|e| e.name == "AGENTID_CREDENTIALS_DIR" && e.value.as_deref() == Some("/var/run/agentid"))
    );
    assert!(identity_secret_keys(&admin, agents, "config-fixer").await?.is_empty(), "no grant yet");

    // Inside the pod: the base identity (the projected token) can do nothing by itself…
    let agent = base_sa_client(&admin, agents, "config-fixer").await?;
    assert_forbidden(
        Api::<ConfigMap>::namespaced(agent.clone(), staging).get("app-settings").await,
        "the base identity reading staging",
    );
    // …but ask: kubectl create -f /etc/config-fixer/fix-settings.yaml
    let created = ex.apply(&agent, "agent/fix-settings.yaml").await?;
    let name = created[0].name_any();
    assert!(name.starts_with("fix-settings-"), "{name}");
    let active = wait_phase(&admin, agents, &name, GrantPhase::Active).await?;
    let status = active.status.clone().unwrap_or_default();
    assert_eq!(status.requested_by, Some(format!("system:serviceaccount:{agents}:agentid-config-fixer")));
    assert!(status.approval_reasons.is_empty(), "routine: {:?}", status.approval_reasons);
    // The agent can follow its own request.
    let own: Api<AccessGrant> = Api::namespaced(agent.clone(), agents);
    assert_eq!(phase(&own.get(&name).await?), Some(GrantPhase::Active));

    // The identity's Secret — /var/run/agentid in the pod — gains the grant's five files.
    assert_eq!(identity_secret_keys(&admin, agents, "config-fixer").await?, grant_files(&name));
    let secret = Api::<Secret>::namespaced(admin.clone(), agents).get("agentid-config-fixer-credentials").await?;
    let expires_at = secret.data.as_ref().and_then(|d| d.get(&format!("{name}.expires-at"))).context("expires-at")?;
    let expires_at: jiff::Timestamp = std::str::from_utf8(&expires_at.0)?.trim().parse()?;
    let now = jiff::Timestamp::now();
    assert!(expires_at > now && expires_at <= now + jiff::SignedDuration::from_mins(10), "{expires_at}");

    // kubectl --kubeconfig $AGENTID_CREDENTIALS_DIR/<grant>.kubeconfig -n staging patch configmap app-settings …
    let cred = kubeconfig_client(&secret, &format!("{name}.kubeconfig")).await?;
    let configmaps: Api<ConfigMap> = Api::namespaced(cred.clone(), staging);
    let fix = Patch::Merge(json!({"data": {"mode": "fixed"}}));
    configmaps.patch("app-settings", &PatchParams::default(), &fix).await?;
    let fixed = Api::<ConfigMap>::namespaced(admin.clone(), staging).get("app-settings").await?;
    assert_eq!(fixed.data.unwrap_or_default().get("mode").map(String::as_str), Some("fixed"));
    assert_forbidden(configmaps.get("kube-root-ca.crt").await, "another ConfigMap");
    assert_forbidden(configmaps.list(&ListParams::default()).await, "listing ConfigMaps");
    assert_forbidden(configmaps.delete("app-settings", &DeleteParams::default()).await, "deleting app-settings");
    assert_forbidden(
        Api::<ConfigMap>::namespaced(cred.clone(), agents).patch("app-settings", &PatchParams::default(), &fix).await,
        "another namespace",
    );
    ex.cleanup().await
}
