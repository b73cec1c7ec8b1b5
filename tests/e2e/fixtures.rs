//! Builders and waits shared by the operator tests.

use std::time::Duration;

use agentid::api::{
    AccessGrant, AccessGrantSpec, AgentIdentity, AgentIdentitySpec, ApprovalPolicy, GrantPhase, KubernetesAccess,
    KubernetesRule,
};
use anyhow::Context as _;
use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
    config::Kubeconfig,
};

use crate::harness::{client_from, client_with_token, poll_until};

/// An identity allowing grants into `allowed`.
pub fn identity(name: &str, allowed: &[&str]) -> AgentIdentity {
    AgentIdentity::new(
        name,
        AgentIdentitySpec {
            owner: "platform-team".into(),
            purpose: "e2e".into(),
            max_grant_duration: "1h".into(),
            allowed_namespaces: allowed.iter().map(|s| s.to_string()).collect(),
            approval: ApprovalPolicy::default(),
            suspended: false,
            enforce: false,
            retire_at: None,
        },
    )
}

/// One rule.
pub fn rule(namespace: &str, group: &str, resources: &[&str], verbs: &[&str], names: &[&str]) -> KubernetesRule {
    let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect();
    KubernetesRule {
        namespace: namespace.into(),
        api_groups: vec![group.into()],
        resources: v(resources),
        verbs: v(verbs),
        resource_names: v(names),
    }
}

/// A grant for `identity`.
pub fn grant(name: &str, identity: &str, duration: &str, rules: Vec<KubernetesRule>) -> AccessGrant {
    AccessGrant::new(
        name,
        AccessGrantSpec {
            identity: identity.into(),
            duration: duration.into(),
            reason: "e2e".into(),
            kubernetes: Some(KubernetesAccess { rules }),
        },
    )
}

/// Creates `obj` in `ns` as `client`.
pub async fn create<K>(client: &Client, ns: &str, obj: &K) -> anyhow::Result<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Ok(Api::<K>::namespaced(client.clone(), ns).create(&PostParams::default(), obj).await?)
}

/// Waits until the grant reaches `phase` and returns it.
pub async fn wait_phase(client: &Client, ns: &str, name: &str, phase: GrantPhase) -> anyhow::Result<AccessGrant> {
    let api: Api<AccessGrant> = Api::namespaced(client.clone(), ns);
    poll_until(Duration::from_secs(30), &format!("grant {ns}/{name} to be {phase:?}"), || {
        let api = api.clone();
        async move {
            let g = api.get(name).await?;
            Ok((g.status.as_ref().and_then(|s| s.phase) == Some(phase)).then_some(g))
        }
    })
    .await
}

/// Waits until the grant is gone (its finalizer ran).
pub async fn wait_grant_gone(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let api: Api<AccessGrant> = Api::namespaced(client.clone(), ns);
    poll_until(Duration::from_secs(30), &format!("grant {ns}/{name} to be gone"), || {
        let api = api.clone();
        async move { Ok(api.get_opt(name).await?.is_none().then_some(())) }
    })
    .await
}

/// The reason of a grant's Ready condition.
pub fn ready_reason(grant: &AccessGrant) -> (String, String) {
    grant
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// A client acting as the agent, with the kubeconfig agentid wrote into the grant's Secret.
pub async fn agent_client(admin: &Client, grant: &AccessGrant) -> anyhow::Result<Client> {
    let ns = grant.namespace().context("namespace")?;
    let secret_name = grant.status.as_ref().and_then(|s| s.credentials_secret.clone()).context("credentialsSecret")?;
    let secret = Api::<Secret>::namespaced(admin.clone(), &ns).get(&secret_name).await?;
    kubeconfig_client(&secret, "kubeconfig").await
}

/// A client built from the kubeconfig under `key` of `secret`.
pub async fn kubeconfig_client(secret: &Secret, key: &str) -> anyhow::Result<Client> {
    let data =
        secret.data.as_ref().and_then(|d| d.get(key)).with_context(|| format!("{key} in {}", secret.name_any()))?;
    let kubeconfig = Kubeconfig::from_yaml(std::str::from_utf8(&data.0)?)?;
    client_from(kubeconfig).await
}

/// Waits until the identity is Ready: its base ServiceAccount, Secret and one standing right exist.
pub async fn wait_identity_ready(admin: &Client, ns: &str, identity: &str) -> anyhow::Result<()> {
    let identities: Api<AgentIdentity> = Api::namespaced(admin.clone(), ns);
    poll_until(Duration::from_secs(30), &format!("AgentIdentity {ns}/{identity} to be Ready"), || {
        let identities = identities.clone();
        async move {
            let id = identities.get(identity).await?;
            let ready = id.status.iter().flat_map(|s| &s.conditions).any(|c| c.type_ == "Ready" && c.status == "True");
            Ok(ready.then_some(()))
        }
    })
    .await
}

/// A client acting as an identity's base ServiceAccount (a token made by the admin).
pub async fn base_sa_client(admin: &Client, ns: &str, identity: &str) -> anyhow::Result<Client> {
    wait_identity_ready(admin, ns, identity).await?;
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let name = format!("agentid-{identity}");
    let request: TokenRequest = serde_json::from_value(serde_json::json!({"spec": {"expirationSeconds": 600}}))?;
    let response: TokenRequest = sas.create_subresource("token", &name, &PostParams::default(), &request).await?;
    let token = response.status.and_then(|s| s.token).context("token")?;
    client_with_token(&token).await
}

/// Names of every object labelled for grant `uid` in `namespaces`: "Kind/namespace/name".
pub async fn grant_objects(admin: &Client, uid: &str, namespaces: &[&str]) -> anyhow::Result<Vec<String>> {
    let selector = format!("agentid.dev/grant-uid={uid}");
    let lp = ListParams::default().labels(&selector);
    let mut found = Vec::new();
    for ns in namespaces {
        for o in Api::<ServiceAccount>::namespaced(admin.clone(), ns).list_metadata(&lp).await? {
            found.push(format!("ServiceAccount/{ns}/{}", o.name_any()));
        }
        for o in Api::<Secret>::namespaced(admin.clone(), ns).list_metadata(&lp).await? {
            found.push(format!("Secret/{ns}/{}", o.name_any()));
        }
        for o in Api::<Role>::namespaced(admin.clone(), ns).list_metadata(&lp).await? {
            found.push(format!("Role/{ns}/{}", o.name_any()));
        }
        for o in Api::<RoleBinding>::namespaced(admin.clone(), ns).list_metadata(&lp).await? {
            found.push(format!("RoleBinding/{ns}/{}", o.name_any()));
        }
    }
    found.sort();
    Ok(found)
}

/// Keys of the identity's credentials Secret.
pub async fn identity_secret_keys(admin: &Client, ns: &str, identity: &str) -> anyhow::Result<Vec<String>> {
    let secret = Api::<Secret>::namespaced(admin.clone(), ns).get(&format!("agentid-{identity}-credentials")).await?;
    Ok(secret.data.unwrap_or_default().into_keys().collect())
}

/// Polls a request with the agent's client until the apiserver refuses it (401 or 403);
/// returns when that happened.
pub async fn wait_rejected<F, Fut, T>(what: &str, timeout: Duration, mut request: F) -> anyhow::Result<jiff::Timestamp>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kube::Result<T>>,
{
    poll_until(timeout, what, || {
        let fut = request();
        async move {
            match fut.await {
                Err(kube::Error::Api(s)) if s.code == 401 || s.code == 403 => Ok(Some(jiff::Timestamp::now())),
                _ => Ok(None),
            }
        }
    })
    .await
}

/// Installs the approver ClusterRole shipped in `deploy/` (as a user would apply it).
pub async fn install_approver_role(admin: &Client) -> anyhow::Result<()> {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/approver-clusterrole.yaml"))?;
    let role: ClusterRole = serde_saphyr::from_str(&text)?;
    Api::<ClusterRole>::all(admin.clone())
        .patch(
            "agentid-approver",
            &kube::api::PatchParams::apply("agentid-e2e").force(),
            &kube::api::Patch::Apply(&role),
        )
        .await?;
    Ok(())
}

/// Creates Role `name` with `rules` in `ns` and binds it (RoleBinding `name`) to `users`
/// (`system:serviceaccount:NS:NAME` for ServiceAccounts).
pub async fn role_for(
    admin: &Client,
    ns: &str,
    name: &str,
    rules: serde_json::Value,
    users: &[&str],
) -> anyhow::Result<()> {
    let role: k8s_openapi::api::rbac::v1::Role =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "rules": rules}))?;
    Api::<Role>::namespaced(admin.clone(), ns).create(&PostParams::default(), &role).await?;
    bind_role(admin, ns, name, "Role", name, users, &[]).await?;
    // The apiserver's authorizer learns of a binding from its own watch, a moment after the
    // create returns: wait until it answers yes for the first rule, so that what the test does
    // next (often through a webhook that asks the authorizer) is not refused by that lag.
    let first = |key: &str| rules[0][key][0].as_str().unwrap_or_default().to_string();
    let (group, resource, verb) = (first("apiGroups"), first("resources"), first("verbs"));
    let name = rules[0]["resourceNames"][0].as_str().map(str::to_string);
    for user in users {
        poll_until(Duration::from_secs(15), &format!("the authorizer lets {user} {verb} {resource}"), || {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user.to_string()),
                    resource_attributes: Some(ResourceAttributes {
                        namespace: Some(ns.into()),
                        group: Some(group.clone()),
                        resource: Some(resource.clone()),
                        verb: Some(verb.clone()),
                        name: name.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let api = Api::<SubjectAccessReview>::all(admin.clone());
            async move {
                let answer = api.create(&PostParams::default(), &review).await?;
                Ok(answer.status.is_some_and(|s| s.allowed).then_some(()))
            }
        })
        .await?;
    }
    Ok(())
}

/// Binds an existing Role in `ns` to one more user.
pub async fn bind_role_to(admin: &Client, ns: &str, name: &str, role: &str, user: &str) -> anyhow::Result<()> {
    bind_role(admin, ns, name, "Role", role, &[user], &[]).await
}

/// Binds a ClusterRole in `ns` to users and groups.
pub async fn bind(
    admin: &Client,
    ns: &str,
    name: &str,
    cluster_role: &str,
    users: &[&str],
    groups: &[&str],
) -> anyhow::Result<()> {
    bind_role(admin, ns, name, "ClusterRole", cluster_role, users, groups).await
}

async fn bind_role(
    admin: &Client,
    ns: &str,
    name: &str,
    kind: &str,
    role: &str,
    users: &[&str],
    groups: &[&str],
) -> anyhow::Result<()> {
    let mut subjects: Vec<serde_json::Value> = users
        .iter()
        .map(|u| {
            if let Some(rest) = u.strip_prefix("system:serviceaccount:") {
                let (sa_ns, sa) = rest.split_once(':').unwrap_or((ns, rest));
                serde_json::json!({"kind": "ServiceAccount", "name": sa, "namespace": sa_ns})
            } else {
                serde_json::json!({"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": u})
            }
        })
        .collect();
    subjects.extend(
        groups.iter().map(|g| serde_json::json!({"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": g})),
    );
    let binding: RoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
        "subjects": subjects
    }))?;
    Api::<RoleBinding>::namespaced(admin.clone(), ns).create(&PostParams::default(), &binding).await?;
    Ok(())
}

/// An Approval of `grant` by `approver`.
pub fn approval(
    name: &str,
    grant: &AccessGrant,
    approver: &str,
    decision: agentid::api::Decision,
    reason: &str,
) -> agentid::api::Approval {
    agentid::api::Approval::new(
        name,
        agentid::api::ApprovalSpec {
            grant: grant.name_any(),
            grant_uid: grant.uid().unwrap_or_default(),
            decision,
            reason: reason.into(),
            approver: approver.into(),
        },
    )
}

/// Runs `kubectl agentid` as `user`; returns (success, stdout, stderr).
pub fn plugin(user: &str, ns: &str, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-agentid"))
        .arg("--kubeconfig")
        .arg(crate::harness::cluster().kubeconfig(user))
        .args(["-n", ns])
        .args(args)
        .output()?;
    Ok((out.status.success(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

/// Creates the namespaces `names` (on a private control plane, where names need not be unique).
pub async fn create_namespaces(admin: &Client, names: &[&str]) -> anyhow::Result<()> {
    for name in names {
        let ns: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone()).create(&PostParams::default(), &ns).await?;
    }
    Ok(())
}

/// The value of gauge `name` in the metrics text `metrics`.
pub fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A control plane and operator of a test's own (for a flag of the operator), with an agents
/// and a target namespace, a `settings` ConfigMap in the target, and identity `busy` ready.
/// Fields drop in order: the namespaces while their cluster still runs.
pub struct OwnOperator {
    pub target: crate::harness::TestNamespace,
    pub agents: crate::harness::TestNamespace,
    pub operator: crate::harness::Operator,
    pub admin: Client,
    /// Held for its life: stopped when dropped.
    _cluster: crate::harness::PrivateCluster,
}

impl OwnOperator {
    /// Starts it all, the operator with extra environment variables `env`, namespaces
    /// `{prefix}-a` and `{prefix}-t`.
    pub async fn start(name: &str, env: &[(&str, &str)], prefix: &str) -> anyhow::Result<Self> {
        let cluster = crate::harness::PrivateCluster::start(name).await?;
        let admin = cluster.admin().await?;
        let operator = crate::harness::Operator::start(&cluster.dir, env)?;
        operator.wait_ready().await?;
        let agents = crate::harness::TestNamespace::new(&admin, &format!("{prefix}-a")).await?;
        let target = crate::harness::TestNamespace::new(&admin, &format!("{prefix}-t")).await?;
        let cm: k8s_openapi::api::core::v1::ConfigMap =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "settings"}, "data": {"k": "v"}}))?;
        Api::namespaced(admin.clone(), &target.name).create(&PostParams::default(), &cm).await?;
        create(&admin, &agents.name, &identity("busy", &[&target.name])).await?;
        wait_identity_ready(&admin, &agents.name, "busy").await?;
        Ok(Self { target, agents, operator, admin, _cluster: cluster })
    }
}
