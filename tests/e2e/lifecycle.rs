//! The grant lifecycle on a real control plane, acting as the agent with the kubeconfig that
//! agentid issued: scope, expiry, revocation, ceilings, and what the base identity may do.

use std::time::Duration;

use agentid::api::{AccessGrant, AgentIdentity, Approval, GrantPhase};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Namespace, Node, Pod, Secret, Service},
    rbac::v1::RoleBinding,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::{
    fixtures::*,
    harness::{TestNamespace, assert_forbidden, cluster, operator, poll_until, status_code},
};

struct Setup {
    admin: Client,
    agents: TestNamespace,
    target: TestNamespace,
    other: TestNamespace,
}

impl Setup {
    /// An agent namespace holding identity `name`, allowed into `target` and `other`.
    async fn new(prefix: &str, name: &str) -> anyhow::Result<Self> {
        operator().await?;
        let admin = cluster().admin().await?;
        let agents = TestNamespace::new(&admin, &format!("{prefix}-a")).await?;
        let target = TestNamespace::new(&admin, &format!("{prefix}-t")).await?;
        let other = TestNamespace::new(&admin, &format!("{prefix}-o")).await?;
        create(&admin, &agents.name, &identity(name, &[&target.name, &other.name])).await?;
        Ok(Self { admin, agents, target, other })
    }

    async fn grant(&self, g: &AccessGrant) -> anyhow::Result<AccessGrant> {
        create(&self.admin, &self.agents.name, g).await?;
        wait_phase(&self.admin, &self.agents.name, &g.name_any(), GrantPhase::Active).await
    }

    /// Issues grant `name` of `identity`, for `duration`, to get ConfigMaps in the target
    /// namespace, and returns it with the ConfigMaps API as the agent, checked to read `settings`.
    async fn reading_settings(
        &self,
        name: &str,
        identity: &str,
        duration: &str,
    ) -> anyhow::Result<(AccessGrant, Api<ConfigMap>)> {
        let t = self.target.name.as_str();
        let g = self.grant(&grant(name, identity, duration, vec![rule(t, "", &["configmaps"], &["get"], &[])])).await?;
        let config_maps: Api<ConfigMap> = Api::namespaced(agent_client(&self.admin, &g).await?, t);
        config_maps.get("settings").await?;
        Ok((g, config_maps))
    }

    async fn cleanup(self) -> anyhow::Result<()> {
        self.agents.delete().await?;
        self.target.delete().await?;
        self.other.delete().await
    }
}

fn deployment(name: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "c", "image": "nginx"}]}}
        }
    }))
    .expect("valid deployment")
}

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": "v"}})).expect("valid configmap")
}

#[tokio::test]
async fn credential_allows_exactly_its_rules() -> anyhow::Result<()> {
    let s = Setup::new("scope", "fixer").await?;
    let (t, o) = (s.target.name.as_str(), s.other.name.as_str());
    for name in ["web", "api"] {
        create(&s.admin, t, &deployment(name)).await?;
    }
    create(&s.admin, t, &config_map("settings")).await?;
    create(&s.admin, o, &config_map("settings")).await?;
    let svc: Service =
        serde_json::from_value(json!({"metadata": {"name": "db"}, "spec": {"ports": [{"port": 5432}]}}))?;
    create(&s.admin, o, &svc).await?;
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "db-password"}, "stringData": {"p": "hunter2"}}))?;
    create(&s.admin, t, &secret).await?;

    let g = s
        .grant(&grant(
            "deploy-web",
            "fixer",
            "10m",
            vec![
                rule(t, "apps", &["deployments"], &["get", "patch"], &["web"]),
                rule(t, "", &["configmaps"], &["get", "list", "watch"], &[]),
                rule(o, "", &["services"], &["get"], &["db"]),
            ],
        ))
        .await?;
    let agent = agent_client(&s.admin, &g).await?;

    // Everything granted works.
    let deployments: Api<Deployment> = Api::namespaced(agent.clone(), t);
    deployments.get("web").await?;
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"fixed-by": "agent"}}})),
        )
        .await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(agent.clone(), t);
    config_maps.get("settings").await?;
    assert_eq!(config_maps.list(&ListParams::default()).await?.items.len(), 2, "settings + kube-root-ca.crt");
    Api::<Service>::namespaced(agent.clone(), o).get("db").await?;

    // Everything else is refused.
    assert_forbidden(deployments.delete("web", &DeleteParams::default()).await, "another verb");
    assert_forbidden(deployments.get("api").await, "another name");
    assert_forbidden(deployments.list(&ListParams::default()).await, "listing when only names were granted");
    assert_forbidden(Api::<Pod>::namespaced(agent.clone(), t).list(&ListParams::default()).await, "another resource");
    assert_forbidden(Api::<ConfigMap>::namespaced(agent.clone(), o).get("settings").await, "another namespace");
    assert_forbidden(
        Api::<Deployment>::namespaced(agent.clone(), &s.agents.name).list(&ListParams::default()).await,
        "the agents namespace",
    );
    assert_forbidden(
        Api::<Namespace>::all(agent.clone()).list(&ListParams::default()).await,
        "cluster-scoped namespaces",
    );
    assert_forbidden(Api::<Node>::all(agent.clone()).list(&ListParams::default()).await, "cluster-scoped nodes");
    assert_forbidden(Api::<Secret>::namespaced(agent.clone(), t).get("db-password").await, "a Secret not granted");
    let own_secret = g.status.as_ref().and_then(|st| st.credentials_secret.clone()).unwrap_or_default();
    assert_forbidden(Api::<Secret>::namespaced(agent.clone(), &s.agents.name).get(&own_secret).await, "its own Secret");
    assert_forbidden(
        Api::<Secret>::namespaced(agent.clone(), &s.agents.name).get("agentid-fixer-credentials").await,
        "the identity's Secret",
    );
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "sneaky"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": own_secret, "namespace": s.agents.name}]
    }))?;
    assert_forbidden(
        Api::<RoleBinding>::namespaced(agent.clone(), t).create(&PostParams::default(), &binding).await,
        "creating RoleBindings",
    );
    assert_forbidden(
        Api::<AccessGrant>::namespaced(agent.clone(), &s.agents.name)
            .create(&PostParams::default(), &grant("more", "fixer", "1h", vec![rule(t, "*", &["*"], &["*"], &[])]))
            .await,
        "asking for more grants with a grant's credential",
    );

    // The identity's mounted Secret carries the same credential under the grant's name.
    let mounted = Api::<Secret>::namespaced(s.admin.clone(), &s.agents.name).get("agentid-fixer-credentials").await?;
    let via_identity = kubeconfig_client(&mounted, "deploy-web.kubeconfig").await?;
    Api::<Deployment>::namespaced(via_identity, t).get("web").await?;
    let keys = identity_secret_keys(&s.admin, &s.agents.name, "fixer").await?;
    assert_eq!(
        keys,
        ["deploy-web.ca.crt", "deploy-web.expires-at", "deploy-web.kubeconfig", "deploy-web.scope", "deploy-web.token"]
    );

    // The audit trail has the issuance — who, what, until when — and no secret material.
    let secret_name = g.status.as_ref().and_then(|st| st.credentials_secret.clone()).unwrap_or_default();
    let issued_secret = Api::<Secret>::namespaced(s.admin.clone(), &s.agents.name).get(&secret_name).await?;
    let token = String::from_utf8(issued_secret.data.unwrap_or_default()["token"].0.clone())?;
    let op = operator().await?;
    let uid = g.uid().unwrap_or_default();
    let line = op
        .wait_log_line("the audit line for the issuance", |l| {
            l.contains("\"target\":\"agentid::audit\"") && l.contains(&uid) && l.contains("\"transition\":\"issued\"")
        })
        .await?;
    assert!(!op.log().contains(&token), "the operator logged a token");
    let line: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(line["fields"]["requester"], "admin");
    assert_eq!(line["fields"]["identity"], "fixer");
    assert!(
        line["fields"]["scope"].as_str().unwrap_or_default().contains("get, patch deployments.apps web in namespace"),
        "{line}"
    );

    // Status says what was issued, and nothing secret.
    let status = g.status.clone().unwrap_or_default();
    assert_eq!(status.requires_approval, Some(false));
    assert!(status.issued_at.is_some() && status.expires_at.is_some());
    assert!(!serde_json::to_string(&status)?.contains("eyJ"), "status must not hold a token");
    s.cleanup().await
}

#[tokio::test]
async fn base_service_account_can_only_request_and_read_grants() -> anyhow::Result<()> {
    let s = Setup::new("base", "asker").await?;
    let (a, t) = (s.agents.name.as_str(), s.target.name.as_str());
    create(&s.admin, t, &config_map("settings")).await?;
    let base = base_sa_client(&s.admin, a, "asker").await?;

    let grants: Api<AccessGrant> = Api::namespaced(base.clone(), a);
    let asked = grants
        .create(
            &PostParams::default(),
            &grant("jit", "asker", "1m", vec![rule(t, "", &["configmaps"], &["get"], &["settings"])]),
        )
        .await?;
    grants.get(&asked.name_any()).await?;
    grants.list(&ListParams::default()).await?;
    grants.get_status(&asked.name_any()).await?;

    assert_forbidden(grants.delete(&asked.name_any(), &DeleteParams::default()).await, "deleting a grant");
    assert_forbidden(
        grants
            .patch(
                &asked.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
            )
            .await,
        "patching a grant",
    );
    assert_forbidden(
        grants
            .patch_status(
                &asked.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Active"}})),
            )
            .await,
        "writing a grant's status",
    );
    assert_forbidden(Api::<ConfigMap>::namespaced(base.clone(), t).get("settings").await, "the target before a grant");
    assert_forbidden(Api::<Pod>::namespaced(base.clone(), a).list(&ListParams::default()).await, "pods");
    assert_forbidden(
        Api::<Secret>::namespaced(base.clone(), a).get("agentid-asker-credentials").await,
        "its own credentials Secret",
    );
    assert_forbidden(Api::<AgentIdentity>::namespaced(base.clone(), a).get("asker").await, "its identity");
    assert_forbidden(Api::<Approval>::namespaced(base.clone(), a).list(&ListParams::default()).await, "approvals");
    assert_forbidden(
        Api::<AccessGrant>::namespaced(base.clone(), t).list(&ListParams::default()).await,
        "grants elsewhere",
    );

    // The grant it asked for is issued and works with the issued credential, not the base one.
    let g = wait_phase(&s.admin, a, &asked.name_any(), GrantPhase::Active).await?;
    let agent = agent_client(&s.admin, &g).await?;
    Api::<ConfigMap>::namespaced(agent, t).get("settings").await?;
    s.cleanup().await
}

#[tokio::test]
async fn short_grant_stops_working_on_time_and_leaves_nothing() -> anyhow::Result<()> {
    let s = Setup::new("expiry", "fixer").await?;
    let (a, t) = (s.agents.name.as_str(), s.target.name.as_str());
    create(&s.admin, t, &config_map("settings")).await?;
    let g =
        s.grant(&grant("brief", "fixer", "12s", vec![rule(t, "", &["configmaps"], &["get"], &["settings"])])).await?;
    let agent = agent_client(&s.admin, &g).await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(agent, t);
    config_maps.get("settings").await?;

    let expires_at = g.status.as_ref().and_then(|st| st.expires_at.clone()).map(|t| t.0).expect("expiresAt");
    let rejected_at =
        wait_rejected("the expired credential to be refused", Duration::from_secs(30), || config_maps.get("settings"))
            .await?;
    let lag = rejected_at.duration_since(expires_at);
    println!("revocation lag (expiresAt -> first rejected request): {} ms", lag.as_millis());
    assert!(lag.as_secs_f64() < 2.0, "credential worked {lag:?} past expiresAt");
    assert!(lag.as_secs_f64() > -0.5, "credential was refused {lag:?} before expiresAt");

    let g = wait_phase(&s.admin, a, "brief", GrantPhase::Expired).await?;
    let status = g.status.clone().unwrap_or_default();
    assert!(status.revoked_at.is_some());
    assert_eq!(ready_reason(&g).0, "Expired");
    let uid = g.uid().unwrap_or_default();
    assert_eq!(grant_objects(&s.admin, &uid, &[a, t]).await?, Vec::<String>::new());
    assert!(identity_secret_keys(&s.admin, a, "fixer").await?.is_empty());

    // The lag is exported, without any object name in the labels.
    let metrics = operator().await?.metrics()?;
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("agentid_grant_revocation_lag_seconds_count "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(count >= 1, "no revocation lag recorded:\n{metrics}");
    assert!(!metrics.contains("brief"), "metrics must not carry object names");
    // And what the allocator holds: live allocations within the pages that hold them, within
    // what is resident.
    let bytes = |name: &str| gauge(&metrics, name).unwrap_or(0.0);
    let (allocated, active, resident) = (
        bytes("agentid_heap_allocated_bytes"),
        bytes("agentid_heap_active_bytes"),
        bytes("agentid_heap_resident_bytes"),
    );
    assert!(
        0.0 < allocated && allocated <= active && active <= resident,
        "heap gauges allocated {allocated}, active {active}, resident {resident}:\n{metrics}"
    );
    // Of the live heap, the caches' share (allocated apart): something, not everything.
    let caches = bytes("agentid_heap_caches_allocated_bytes");
    assert!(0.0 < caches && caches < allocated, "caches {caches} of allocated {allocated}:\n{metrics}");
    // In pages of their own, of all the pages in use.
    let caches_active = bytes("agentid_heap_caches_active_bytes");
    assert!(caches <= caches_active && caches_active < active, "caches' pages {caches_active}:\n{metrics}");
    s.cleanup().await
}

#[tokio::test]
async fn deleting_a_grant_revokes_it_at_once() -> anyhow::Result<()> {
    let s = Setup::new("delete", "fixer").await?;
    let (a, t) = (s.agents.name.as_str(), s.target.name.as_str());
    create(&s.admin, t, &config_map("settings")).await?;
    let (g, config_maps) = s.reading_settings("soon-gone", "fixer", "30m").await?;

    let deleted_at = jiff::Timestamp::now();
    Api::<AccessGrant>::namespaced(s.admin.clone(), a).delete("soon-gone", &DeleteParams::default()).await?;
    let rejected_at = wait_rejected("the deleted grant's credential to be refused", Duration::from_secs(10), || {
        config_maps.get("settings")
    })
    .await?;
    println!("deletion -> first rejected request: {} ms", rejected_at.duration_since(deleted_at).as_millis());
    wait_grant_gone(&s.admin, a, "soon-gone").await?;
    assert_eq!(grant_objects(&s.admin, &g.uid().unwrap_or_default(), &[a, t]).await?, Vec::<String>::new());
    assert!(identity_secret_keys(&s.admin, a, "fixer").await?.is_empty());
    s.cleanup().await
}

#[tokio::test]
async fn an_active_grant_whose_service_account_is_deleted_is_revoked_and_cleaned_up() -> anyhow::Result<()> {
    let s = Setup::new("sagone", "fixer").await?;
    let (a, t) = (s.agents.name.as_str(), s.target.name.as_str());
    create(&s.admin, t, &config_map("settings")).await?;
    let (g, config_maps) = s.reading_settings("lost", "fixer", "30m").await?;

    // Someone deletes the grant's ServiceAccount by hand: the credential dies with it, and the
    // grant must not go on saying Active.
    let sa = g.status.as_ref().and_then(|st| st.service_account_name.clone()).expect("serviceAccountName");
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(s.admin.clone(), a)
        .delete(&sa, &DeleteParams::default())
        .await?;
    let revoked = wait_phase(&s.admin, a, "lost", GrantPhase::Revoked).await?;
    assert_eq!(ready_reason(&revoked).0, "CredentialGone");
    wait_rejected("the credential of the deleted ServiceAccount", Duration::from_secs(10), || {
        config_maps.get("settings")
    })
    .await?;
    // Nothing is re-made and nothing is left.
    assert_eq!(grant_objects(&s.admin, &g.uid().unwrap_or_default(), &[a, t]).await?, Vec::<String>::new());
    assert!(identity_secret_keys(&s.admin, a, "fixer").await?.is_empty());
    s.cleanup().await
}

#[tokio::test]
async fn suspending_the_identity_revokes_every_grant_and_issues_none() -> anyhow::Result<()> {
    let s = Setup::new("suspend", "fixer").await?;
    let (a, t, o) = (s.agents.name.as_str(), s.target.name.as_str(), s.other.name.as_str());
    create(&s.admin, t, &config_map("settings")).await?;
    create(&s.admin, o, &config_map("settings")).await?;
    let g1 = s.grant(&grant("one", "fixer", "30m", vec![rule(t, "", &["configmaps"], &["get"], &[])])).await?;
    let g2 = s.grant(&grant("two", "fixer", "30m", vec![rule(o, "", &["configmaps"], &["get"], &[])])).await?;
    let c1: Api<ConfigMap> = Api::namespaced(agent_client(&s.admin, &g1).await?, t);
    let c2: Api<ConfigMap> = Api::namespaced(agent_client(&s.admin, &g2).await?, o);
    c1.get("settings").await?;
    c2.get("settings").await?;

    Api::<AgentIdentity>::namespaced(s.admin.clone(), a)
        .patch("fixer", &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspended": true}})))
        .await?;
    for name in ["one", "two"] {
        let g = wait_phase(&s.admin, a, name, GrantPhase::Revoked).await?;
        assert_eq!(ready_reason(&g).0, "IdentitySuspended");
    }
    assert!(matches!(status_code(&c1.get("settings").await), Some(401 | 403)));
    assert!(matches!(status_code(&c2.get("settings").await), Some(401 | 403)));

    create(&s.admin, a, &grant("three", "fixer", "5m", vec![rule(t, "", &["configmaps"], &["get"], &[])])).await?;
    let g3 = wait_phase(&s.admin, a, "three", GrantPhase::Rejected).await?;
    assert_eq!(ready_reason(&g3).0, "IdentitySuspended");
    assert_eq!(grant_objects(&s.admin, &g3.uid().unwrap_or_default(), &[a, t]).await?, Vec::<String>::new());
    s.cleanup().await
}

#[tokio::test]
async fn deleting_the_identity_removes_everything_it_caused() -> anyhow::Result<()> {
    let s = Setup::new("idgone", "doomed").await?;
    let (a, t) = (s.agents.name.as_str(), s.target.name.as_str());
    create(&s.admin, t, &config_map("settings")).await?;
    let (_, config_maps) = s.reading_settings("held", "doomed", "30m").await?;

    Api::<AgentIdentity>::namespaced(s.admin.clone(), a).delete("doomed", &DeleteParams::default()).await?;
    let g = wait_phase(&s.admin, a, "held", GrantPhase::Revoked).await?;
    assert_eq!(ready_reason(&g).0, "IdentityDeleted");
    assert!(matches!(status_code(&config_maps.get("settings").await), Some(401 | 403)));
    assert_eq!(grant_objects(&s.admin, &g.uid().unwrap_or_default(), &[a, t]).await?, Vec::<String>::new());

    // The identity's own objects are owned by it and collected with it.
    let admin = s.admin.clone();
    let ns = a.to_string();
    poll_until(Duration::from_secs(30), "the identity's objects to be collected", || {
        let admin = admin.clone();
        let ns = ns.clone();
        async move {
            let lp = ListParams::default().labels("agentid.dev/identity=doomed");
            let left = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), &ns)
                .list_metadata(&lp)
                .await?
                .items
                .len()
                + Api::<Secret>::namespaced(admin.clone(), &ns).list_metadata(&lp).await?.items.len()
                + Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(admin.clone(), &ns)
                    .list_metadata(&lp)
                    .await?
                    .items
                    .len()
                + Api::<RoleBinding>::namespaced(admin.clone(), &ns).list_metadata(&lp).await?.items.len();
            Ok((left == 0).then_some(()))
        }
    })
    .await?;
    s.cleanup().await
}

#[tokio::test]
async fn grants_over_the_ceiling_are_rejected_with_a_condition_naming_it() -> anyhow::Result<()> {
    let s = Setup::new("ceiling", "fixer").await?;
    let (a, t) = (s.agents.name.as_str(), s.target.name.as_str());
    let cases = [
        (
            grant("too-long", "fixer", "2h", vec![rule(t, "", &["pods"], &["get"], &[])]),
            "DurationOverCeiling",
            "exceeds the identity's maxGrantDuration 1h",
        ),
        (
            grant("elsewhere", "fixer", "5m", vec![rule("kube-system", "", &["pods"], &["get"], &[])]),
            "NamespaceNotAllowed",
            "\"kube-system\" is not in the identity's allowedNamespaces",
        ),
        (
            grant("nobody", "ghost", "5m", vec![rule(t, "", &["pods"], &["get"], &[])]),
            "IdentityNotFound",
            "AgentIdentity \"ghost\" does not exist",
        ),
    ];
    for (g, reason, message) in cases {
        create(&s.admin, a, &g).await?;
        let g = wait_phase(&s.admin, a, &g.name_any(), GrantPhase::Rejected).await?;
        let (got_reason, got_message) = ready_reason(&g);
        assert_eq!(got_reason, reason);
        assert!(got_message.contains(message), "{got_message:?} should contain {message:?}");
        let stalled = g
            .status
            .as_ref()
            .and_then(|st| st.conditions.iter().find(|c| c.type_ == "Stalled"))
            .map(|c| c.status.clone());
        assert_eq!(stalled.as_deref(), Some("True"));
        assert_eq!(
            grant_objects(&s.admin, &g.uid().unwrap_or_default(), &[a, t, "kube-system"]).await?,
            Vec::<String>::new()
        );
    }
    s.cleanup().await
}

#[tokio::test]
async fn destructive_grant_waits_for_approval_with_no_credential_at_all() -> anyhow::Result<()> {
    let s = Setup::new("held", "fixer").await?;
    let (a, t) = (s.agents.name.as_str(), s.target.name.as_str());
    create(
        &s.admin,
        a,
        &grant(
            "cleanup-volume",
            "fixer",
            "15m",
            vec![rule(t, "", &["persistentvolumeclaims"], &["get", "delete"], &["db-volume"])],
        ),
    )
    .await?;
    let g = wait_phase(&s.admin, a, "cleanup-volume", GrantPhase::AwaitingApproval).await?;
    let status = g.status.clone().unwrap_or_default();
    assert_eq!(status.requires_approval, Some(true));
    assert_eq!(status.approval_reasons, vec![format!("destructive: delete persistentvolumeclaims/db-volume in {t}")]);
    assert!(
        status.expires_at.is_none() && status.credentials_secret.is_none() && status.service_account_name.is_none()
    );
    // Give the operator time to do anything it should not, then look for any trace of a credential.
    let again = wait_phase(&s.admin, a, "cleanup-volume", GrantPhase::AwaitingApproval).await?;
    assert_eq!(grant_objects(&s.admin, &again.uid().unwrap_or_default(), &[a, t]).await?, Vec::<String>::new());
    assert!(identity_secret_keys(&s.admin, a, "fixer").await?.is_empty());
    s.cleanup().await
}

#[tokio::test]
async fn identity_status_reports_its_base_objects_and_active_grants() -> anyhow::Result<()> {
    let s = Setup::new("idstatus", "fixer").await?;
    let (a, t) = (s.agents.name.as_str(), s.target.name.as_str());
    s.grant(&grant("g1", "fixer", "30m", vec![rule(t, "", &["pods"], &["get"], &[])])).await?;
    let identities: Api<AgentIdentity> = Api::namespaced(s.admin.clone(), a);
    let id = poll_until(Duration::from_secs(20), "activeGrants 1", || {
        let identities = identities.clone();
        async move {
            let id = identities.get("fixer").await?;
            Ok((id.status.as_ref().map(|st| st.active_grants) == Some(1)).then_some(id))
        }
    })
    .await?;
    let status = id.status.unwrap_or_default();
    assert_eq!(status.service_account_name.as_deref(), Some("agentid-fixer"));
    assert_eq!(status.credentials_secret.as_deref(), Some("agentid-fixer-credentials"));
    assert_eq!(status.observed_generation, id.metadata.generation);
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").expect("Ready");
    assert_eq!(ready.status, "True");
    let sa =
        Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(s.admin.clone(), a).get("agentid-fixer").await?;
    assert_eq!(sa.automount_service_account_token, Some(false));
    s.cleanup().await
}

#[tokio::test]
async fn pushing_expires_at_out_in_status_revokes_the_grant() -> anyhow::Result<()> {
    let s = Setup::new("tamper", "fixer").await?;
    let (a, t) = (s.agents.name.as_str(), s.target.name.as_str());
    create(&s.admin, t, &config_map("settings")).await?;
    let (_, config_maps) = s.reading_settings("short", "fixer", "5m").await?;
    // Someone able to write status (not the agent: it cannot) tries to make the credential last.
    let later = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(30 * 24)).to_string();
    Api::<AccessGrant>::namespaced(s.admin.clone(), a)
        .patch_status("short", &PatchParams::default(), &Patch::Merge(json!({"status": {"expiresAt": later}})))
        .await?;
    let revoked = wait_phase(&s.admin, a, "short", GrantPhase::Revoked).await?;
    assert_eq!(ready_reason(&revoked).0, "InvalidExpiry");
    assert!(matches!(status_code(&config_maps.get("settings").await), Some(401 | 403)));
    s.cleanup().await
}

#[tokio::test]
async fn wiping_status_neither_renews_nor_doubles_a_credential() -> anyhow::Result<()> {
    let s = Setup::new("wipe", "fixer").await?;
    let (a, t) = (s.agents.name.as_str(), s.target.name.as_str());
    create(&s.admin, t, &config_map("settings")).await?;
    let (g, config_maps) = s.reading_settings("wiped", "fixer", "5m").await?;
    let grants: Api<AccessGrant> = Api::namespaced(s.admin.clone(), a);
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(s.admin.clone(), a);
    let issued = |g: &AccessGrant| g.status.as_ref().and_then(|s| s.expires_at.clone()).map(|t| t.0);
    let object = g.status.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default();
    let sa_uid = sas.get(&object).await?.uid();
    // Someone able to write status (not the agent: it cannot) erases the issuance, for a fresh
    // credential with a fresh end. The grant's ServiceAccount still records the end: the same
    // issuance is resumed — the same end, the same ServiceAccount, the same token working.
    let wipe = json!({"status": {"phase": null, "expiresAt": null, "issuedAt": null, "serviceAccountName": null, "credentialsSecret": null}});
    grants.patch_status("wiped", &PatchParams::default(), &Patch::Merge(wipe.clone())).await?;
    poll_until(Duration::from_secs(30), "the wiped issuance to be resumed", || {
        let grants = grants.clone();
        async move {
            let g = grants.get("wiped").await?;
            Ok((g.status.as_ref().and_then(|s| s.phase) == Some(GrantPhase::Active)).then_some(g))
        }
    })
    .await
    .and_then(|resumed| {
        anyhow::ensure!(issued(&resumed) == issued(&g), "a new end: {:?} for {:?}", issued(&resumed), issued(&g));
        Ok(())
    })?;
    assert_eq!(sas.get(&object).await?.uid(), sa_uid, "a second ServiceAccount");
    config_maps.get("settings").await?;
    // With the ServiceAccount's record removed as well, nothing says when it ends: revoked, and
    // never issued again.
    sas.patch(
        &object,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"agentid.dev/expires-at": null}}})),
    )
    .await?;
    grants.patch_status("wiped", &PatchParams::default(), &Patch::Merge(wipe)).await?;
    let revoked = wait_phase(&s.admin, a, "wiped", GrantPhase::Revoked).await?;
    assert_eq!(ready_reason(&revoked).0, "InvalidStatus");
    assert!(matches!(status_code(&config_maps.get("settings").await), Some(401 | 403)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let uid = g.uid().unwrap_or_default();
    assert_eq!(grant_objects(&s.admin, &uid, &[a, t]).await?, Vec::<String>::new());
    assert_eq!(grants.get("wiped").await?.status.and_then(|s| s.phase), Some(GrantPhase::Revoked));

    // Status rewritten to look like an issuance under way, with an end a full duration from now:
    // revoked once its ServiceAccount is gone, never issued again on status's word (which would
    // renew the credential for another five minutes).
    let (f, forged_agent) = s.reading_settings("forged", "fixer", "5m").await?;
    let later = (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(310)).to_string();
    let forge = json!({"status": {"phase": "Pending", "expiresAt": later}});
    grants.patch_status("forged", &PatchParams::default(), &Patch::Merge(forge)).await?;
    let revoked = wait_phase(&s.admin, a, "forged", GrantPhase::Revoked).await?;
    assert!(
        ["InvalidExpiry", "InvalidStatus"].contains(&ready_reason(&revoked).0.as_str()),
        "{:?}",
        ready_reason(&revoked)
    );
    assert!(matches!(status_code(&forged_agent.get("settings").await), Some(401 | 403)));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(grant_objects(&s.admin, &f.uid().unwrap_or_default(), &[a, t]).await?, Vec::<String>::new());
    assert_eq!(grants.get("forged").await?.status.and_then(|s| s.phase), Some(GrantPhase::Revoked));
    s.cleanup().await
}

#[tokio::test]
async fn opening_a_namespace_to_agents_needs_the_right_to_delegate_there() -> anyhow::Result<()> {
    operator().await?;
    let admin = cluster().admin().await?;
    let agents = TestNamespace::new(&admin, "delegate-a").await?;
    let target = TestNamespace::new(&admin, "delegate-t").await?;
    // mallory may manage AgentIdentities in the agents namespace, nothing more.
    role_for(&admin, &agents.name, "identity-admin", json!([{"apiGroups": ["agentid.dev"], "resources": ["agentidentities"], "verbs": ["create", "update", "patch", "get"]}]), &["mallory"]).await?;
    let mallory = cluster().user("mallory", &[]).await?;
    let identities: Api<AgentIdentity> = Api::namespaced(mallory.clone(), &agents.name);

    for ns in [target.name.as_str(), "kube-system"] {
        let r = identities.create(&PostParams::default(), &identity("reach", &[ns])).await;
        match r {
            Err(kube::Error::Api(s)) => assert!(s.message.contains("admission webhook"), "{s:?}"),
            other => panic!("mallory opened {ns} to agents: {other:?}"),
        }
    }
    // Given the right to delegate into the target, she may.
    role_for(
        &admin,
        &target.name,
        "agentid-delegate",
        json!([{"apiGroups": ["agentid.dev"], "resources": ["agentidentities"], "verbs": ["delegate"]}]),
        &["mallory"],
    )
    .await?;
    identities.create(&PostParams::default(), &identity("reach", &[&target.name])).await?;
    agents.delete().await?;
    target.delete().await
}

#[tokio::test]
async fn an_existing_service_account_of_the_identitys_name_is_never_adopted() -> anyhow::Result<()> {
    operator().await?;
    let admin = cluster().admin().await?;
    let agents = TestNamespace::new(&admin, "squat-a").await?;
    // Someone made `agentid-squatter` first — and could have bound privileges to it.
    let squatter: k8s_openapi::api::core::v1::ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "agentid-squatter"}}))?;
    create(&admin, &agents.name, &squatter).await?;
    create(&admin, &agents.name, &identity("squatter", &[])).await?;
    let identities: Api<AgentIdentity> = Api::namespaced(admin.clone(), &agents.name);
    let stalled = poll_until(std::time::Duration::from_secs(20), "the identity to report NameTaken", || {
        let identities = identities.clone();
        async move {
            let id = identities.get("squatter").await?;
            let stalled = id
                .status
                .iter()
                .flat_map(|s| &s.conditions)
                .find(|c| c.type_ == "Stalled" && c.status == "True")
                .cloned();
            Ok(stalled.filter(|c| c.reason == "NameTaken"))
        }
    })
    .await?;
    assert!(stalled.message.contains("ServiceAccount agentid-squatter already exists"), "{}", stalled.message);
    let sa = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), &agents.name)
        .get("agentid-squatter")
        .await?;
    assert!(sa.metadata.owner_references.is_none(), "the squatting ServiceAccount was adopted");
    assert!(sa.labels().get("agentid.dev/identity").is_none());
    agents.delete().await
}

#[tokio::test]
async fn a_credentials_secret_made_by_someone_else_never_receives_a_token() -> anyhow::Result<()> {
    operator().await?;
    let admin = cluster().admin().await?;
    let agents = TestNamespace::new(&admin, "plant-a").await?;
    let target = TestNamespace::new(&admin, "plant-t").await?;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &agents.name);
    let name = "agentid-planted-credentials";

    // What agentid's credential writes rely on: a write naming the uid agentid checked never
    // lands in an object made since under that name.
    let first: Secret = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    let checked = create(&admin, &agents.name, &first).await?.uid().unwrap_or_default();
    secrets.delete(name, &DeleteParams::default()).await?;
    // Someone makes their own Secret under the identity's credentials name, to collect tokens.
    let planted: Secret = serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"planted": "x"}}))?;
    create(&admin, &agents.name, &planted).await?;
    // agentid writes strategic merge patches; a merge patch is held to the same.
    let patch = json!({"metadata": {"uid": checked}, "data": {"probe": "eA=="}});
    for patch in [Patch::Strategic(patch.clone()), Patch::Merge(patch)] {
        let r = secrets.patch(name, &PatchParams::default(), &patch).await;
        assert_eq!(status_code(&r), Some(422), "a patch naming a replaced object's uid must be refused: {r:?}");
    }

    // The identity refuses to adopt it, and a grant asked for is not issued into it.
    create(&admin, &agents.name, &identity("planted", &[&target.name])).await?;
    let grants: Api<AccessGrant> = Api::namespaced(admin.clone(), &agents.name);
    grants
        .create(
            &PostParams::default(),
            &grant("into-planted", "planted", "10m", vec![rule(&target.name, "", &["configmaps"], &["get"], &[])]),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let keys = identity_secret_keys(&admin, &agents.name, "planted").await?;
    assert_eq!(keys, vec!["planted".to_string()], "the planted Secret received credentials");
    let g = grants.get("into-planted").await?;
    assert_ne!(g.status.and_then(|s| s.phase), Some(GrantPhase::Active), "issued without a Secret of agentid's");
    agents.delete().await?;
    target.delete().await
}

#[tokio::test]
async fn an_ended_grant_is_settled_and_a_live_one_cannot_be_made_to_look_settled() -> anyhow::Result<()> {
    let s = Setup::new("settle", "fixer").await?;
    let (a, t) = (s.agents.name.as_str(), s.target.name.as_str());
    create(&s.admin, t, &config_map("settings")).await?;
    let live = s.grant(&grant("live", "fixer", "30m", vec![rule(t, "", &["configmaps"], &["get"], &[])])).await?;
    let grants: Api<AccessGrant> = Api::namespaced(s.admin.clone(), a);
    let mark = Patch::Merge(json!({"metadata": {"labels": {"agentid.dev/settled": "true"}}}));

    // The label takes a grant out of the operator's watch: on a live grant it would hide the
    // credential from revocation. Admission refuses it, to cluster-admin too.
    let r = grants.patch("live", &PatchParams::default(), &mark).await;
    assert!(
        matches!(&r, Err(kube::Error::Api(e)) if e.code == 400 && e.message.contains("agentid.dev/settled")),
        "{r:?}"
    );
    let r = create(&s.admin, a, &{
        let mut g = grant("born-settled", "fixer", "5m", vec![rule(t, "", &["configmaps"], &["get"], &[])]);
        g.metadata.labels = Some([("agentid.dev/settled".to_string(), "true".to_string())].into());
        g
    })
    .await;
    assert!(r.is_err(), "a grant was created already marked settled: {r:?}");

    // Ended and cleaned up, a grant is marked settled and keeps no finalizer: deleting it is
    // immediate, with nothing left for the operator to do.
    let config_maps: Api<ConfigMap> = Api::namespaced(agent_client(&s.admin, &live).await?, t);
    config_maps.get("settings").await?;
    create(&s.admin, a, &grant("too-long", "fixer", "2h", vec![rule(t, "", &["configmaps"], &["get"], &[])])).await?;
    wait_phase(&s.admin, a, "too-long", GrantPhase::Rejected).await?;
    Api::<AgentIdentity>::namespaced(s.admin.clone(), a)
        .patch("fixer", &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspended": true}})))
        .await?;
    wait_phase(&s.admin, a, "live", GrantPhase::Revoked).await?;
    assert!(matches!(status_code(&config_maps.get("settings").await), Some(401 | 403)));
    for name in ["too-long", "live"] {
        let settled = poll_until(Duration::from_secs(15), &format!("grant {name} settled"), || {
            let grants = grants.clone();
            async move {
                let g = grants.get(name).await?;
                let marked = g.labels().get("agentid.dev/settled").is_some_and(|v| v == "true");
                Ok((marked && g.finalizers().is_empty()).then_some(g))
            }
        })
        .await?;
        assert!(settled.status.as_ref().is_some_and(|st| st.phase.is_some_and(GrantPhase::is_terminal)));
        grants.delete(name, &DeleteParams::default()).await?;
        assert!(grants.get_opt(name).await?.is_none(), "deleting settled grant {name} was not immediate");
    }
    s.cleanup().await
}
