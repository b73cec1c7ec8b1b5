//! The approval gate (DESIGN.md step 4, invariant I1), with distinct users by client certificate.
//!
//! Cast: the agent (its identity's base ServiceAccount); bob, who requests; alice in group
//! sre-leads (listed, holds `approve`); erin, also in sre-leads; carol (listed by name, no
//! `approve`); dave (holds `approve`, not listed).

use std::time::Duration;

use agentid::api::{AccessGrant, Approval, Decision, GrantPhase};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use crate::{
    fixtures::*,
    harness::{TestNamespace, assert_forbidden, cluster, operator, poll_until},
};

struct Stage {
    admin: Client,
    agents: TestNamespace,
    staging: TestNamespace,
    production: TestNamespace,
    agent: Client,
}

/// The incident's stage: identity staging-fixer in `agents`, allowed into staging only.
async fn stage(prefix: &str, required: i32) -> anyhow::Result<Stage> {
    operator().await?;
    let admin = cluster().admin().await?;
    let agents = TestNamespace::new(&admin, &format!("{prefix}-a")).await?;
    let staging = TestNamespace::new(&admin, &format!("{prefix}-s")).await?;
    let production = TestNamespace::new(&admin, &format!("{prefix}-p")).await?;
    let a = agents.name.as_str();
    let mut id = identity("staging-fixer", &[&staging.name]);
    id.spec.approval.approvers.groups = vec!["sre-leads".into()];
    id.spec.approval.approvers.users = vec!["carol".into()];
    id.spec.approval.required_approvals = required;
    create(&admin, a, &id).await?;

    install_approver_role(&admin).await?;
    // alice and erin through their group, dave by name: RBAC says they may approve at all.
    bind(&admin, a, "approvers", "agentid-approver", &["dave"], &["sre-leads"]).await?;
    // bob, carol and (a misconfiguration on purpose) the agent may create grants and Approvals:
    // what stops them must be admission, not a missing RBAC rule.
    let sa = format!("system:serviceaccount:{a}:agentid-staging-fixer");
    role_for(
        &admin,
        a,
        "requester",
        json!([
            {"apiGroups": ["agentid.dev"], "resources": ["accessgrants"], "verbs": ["create", "get", "list"]},
            {"apiGroups": ["agentid.dev"], "resources": ["approvals"], "verbs": ["create", "get"]}
        ]),
        &["bob", "carol", &sa],
    )
    .await?;

    for ns in [&staging.name, &production.name] {
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": "db-volume"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
        }))?;
        create(&admin, ns, &pvc).await?;
    }
    let agent = base_sa_client(&admin, a, "staging-fixer").await?;
    Ok(Stage { admin, agents, staging, production, agent })
}

impl Stage {
    async fn cleanup(self) -> anyhow::Result<()> {
        self.agents.delete().await?;
        self.staging.delete().await?;
        self.production.delete().await
    }

    fn delete_volume(&self, name: &str) -> AccessGrant {
        grant(
            name,
            "staging-fixer",
            "15m",
            vec![rule(&self.staging.name, "", &["persistentvolumeclaims"], &["get", "delete"], &["db-volume"])],
        )
    }

    async fn decide(
        &self,
        who: &Client,
        name: &str,
        grant: &AccessGrant,
        approver: &str,
        decision: Decision,
    ) -> kube::Result<Approval> {
        Api::<Approval>::namespaced(who.clone(), &self.agents.name)
            .create(&PostParams::default(), &approval(name, grant, approver, decision, "reviewed"))
            .await
    }

    async fn objects(&self, grant: &AccessGrant) -> anyhow::Result<Vec<String>> {
        grant_objects(&self.admin, &grant.uid().unwrap_or_default(), &[&self.agents.name, &self.staging.name]).await
    }
}

/// Asserts admission refused the request with a message holding `fragment`.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(result: kube::Result<T>, fragment: &str) {
    match result {
        Err(kube::Error::Api(s)) => {
            assert!(s.message.contains("admission webhook"), "expected an admission refusal, got {s:?}");
            assert!(s.message.contains(fragment), "{:?} should mention {fragment:?}", s.message);
        }
        other => panic!("expected a refusal mentioning {fragment:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn the_incident_waits_for_a_human_and_only_an_authorized_other_human_releases_it() -> anyhow::Result<()> {
    let st = stage("incident", 1).await?;
    let a = st.agents.name.clone();
    let (bob, alice) = (cluster().user("bob", &[]).await?, cluster().user("alice", &["sre-leads"]).await?);
    let (carol, dave) = (cluster().user("carol", &[]).await?, cluster().user("dave", &["ops"]).await?);

    // The agent asks, just in time, to delete the volume.
    let asked = Api::<AccessGrant>::namespaced(st.agent.clone(), &a)
        .create(&PostParams::default(), &st.delete_volume("cleanup-volume"))
        .await?;
    let held = wait_phase(&st.admin, &a, "cleanup-volume", GrantPhase::AwaitingApproval).await?;
    let status = held.status.clone().unwrap_or_default();
    assert_eq!(
        status.requested_by.as_deref(),
        Some(format!("system:serviceaccount:{a}:agentid-staging-fixer").as_str())
    );
    assert_eq!(
        status.approval_reasons,
        vec![format!("destructive: delete persistentvolumeclaims/db-volume in {}", st.staging.name)]
    );
    assert_eq!(st.objects(&held).await?, Vec::<String>::new(), "no SA, Secret or Role before approval");
    assert!(identity_secret_keys(&st.admin, &a, "staging-fixer").await?.is_empty(), "no token before approval");

    // Refused at admission, each with a message that says why.
    let sa = format!("system:serviceaccount:{a}:agentid-staging-fixer");
    assert_refused(st.decide(&bob, "by-bob", &asked, "bob", Decision::Approve).await, "bob is not an approver");
    assert_refused(
        st.decide(&carol, "by-carol", &asked, "carol", Decision::Approve).await,
        "may not approve AccessGrants",
    );
    assert_refused(st.decide(&dave, "by-dave", &asked, "dave", Decision::Approve).await, "dave is not an approver");
    assert_refused(st.decide(&st.agent, "by-agent", &asked, &sa, Decision::Approve).await, "only humans can approve");
    assert_refused(
        st.decide(&bob, "bob-as-alice", &asked, "alice", Decision::Approve).await,
        "must name the user who creates it",
    );
    let mut stale = asked.clone();
    stale.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
    assert_refused(st.decide(&alice, "stale", &stale, "alice", Decision::Approve).await, "does not match");
    // bob may ask for grants himself; his request records him, not the agent.
    Api::<AccessGrant>::namespaced(bob.clone(), &a)
        .create(&PostParams::default(), &st.delete_volume("bobs-request"))
        .await?;
    let bobs = wait_phase(&st.admin, &a, "bobs-request", GrantPhase::AwaitingApproval).await?;
    assert_eq!(bobs.status.and_then(|s| s.requested_by).as_deref(), Some("bob"));
    // Nothing was issued by any of that.
    let still = wait_phase(&st.admin, &a, "cleanup-volume", GrantPhase::AwaitingApproval).await?;
    assert_eq!(st.objects(&still).await?, Vec::<String>::new());

    // alice approves: the credential is issued.
    st.decide(&alice, "by-alice", &asked, "alice", Decision::Approve).await?;
    let issued = wait_phase(&st.admin, &a, "cleanup-volume", GrantPhase::Active).await?;
    let approvals = issued.status.clone().unwrap_or_default().approvals;
    assert_eq!(approvals.iter().map(|r| r.approver.as_str()).collect::<Vec<_>>(), vec!["alice"]);

    // The agent, with the issued credential, deletes db-volume in staging — and nothing else.
    let credential = agent_client(&st.admin, &issued).await?;
    assert_forbidden(
        Api::<PersistentVolumeClaim>::namespaced(credential.clone(), &st.production.name)
            .delete("db-volume", &DeleteParams::default())
            .await,
        "db-volume in production",
    );
    assert_forbidden(
        Api::<PersistentVolumeClaim>::namespaced(credential.clone(), &st.production.name).get("db-volume").await,
        "reading production",
    );
    Api::<PersistentVolumeClaim>::namespaced(credential.clone(), &st.staging.name)
        .delete("db-volume", &DeleteParams::default())
        .await?;
    st.cleanup().await
}

#[tokio::test]
async fn the_requester_cannot_approve_their_own_request() -> anyhow::Result<()> {
    let st = stage("selfapprove", 1).await?;
    let a = st.agents.name.clone();
    // erin is an approver who also asks for a grant; her own approval is refused.
    let erin = cluster().user("erin", &["sre-leads"]).await?;
    bind_role_to(&st.admin, &a, "erin-requester", "requester", "erin").await?;
    // The RoleBinding just made reaches the authorizer's cache a moment later.
    let own = crate::harness::poll_until(Duration::from_secs(10), "erin's binding to take effect", || {
        let api = Api::<AccessGrant>::namespaced(erin.clone(), &a);
        let g = st.delete_volume("erins");
        async move {
            match api.create(&PostParams::default(), &g).await {
                Ok(g) => Ok(Some(g)),
                Err(kube::Error::Api(e)) if e.code == 403 => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await?;
    wait_phase(&st.admin, &a, "erins", GrantPhase::AwaitingApproval).await?;
    assert_refused(
        st.decide(&erin, "erin-self", &own, "erin", Decision::Approve).await,
        "requested this grant and cannot approve it",
    );

    // The record of who asked cannot be rewritten, not even by an admin.
    let r = Api::<AccessGrant>::namespaced(st.admin.clone(), &a)
        .patch(
            "erins",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"agentid.dev/requested-by": "someone-else"}}})),
        )
        .await;
    assert_refused(r, "cannot change");
    st.cleanup().await
}

#[tokio::test]
async fn two_required_approvals_need_two_distinct_approvers() -> anyhow::Result<()> {
    let st = stage("twoapprovals", 2).await?;
    let a = st.agents.name.clone();
    let (alice, erin) = (cluster().user("alice", &["sre-leads"]).await?, cluster().user("erin", &["sre-leads"]).await?);
    let asked = Api::<AccessGrant>::namespaced(st.agent.clone(), &a)
        .create(&PostParams::default(), &st.delete_volume("two"))
        .await?;
    wait_phase(&st.admin, &a, "two", GrantPhase::AwaitingApproval).await?;

    st.decide(&alice, "alice-1", &asked, "alice", Decision::Approve).await?;
    st.decide(&alice, "alice-2", &asked, "alice", Decision::Approve).await?;
    let grants: Api<AccessGrant> = Api::namespaced(st.admin.clone(), &a);
    let one = poll_until(Duration::from_secs(20), "alice's approval to be counted", || {
        let grants = grants.clone();
        async move {
            let g = grants.get("two").await?;
            Ok((g.status.as_ref().map(|s| s.approvals.len()) == Some(1)).then_some(g))
        }
    })
    .await?;
    assert_eq!(
        one.status.as_ref().and_then(|s| s.phase),
        Some(GrantPhase::AwaitingApproval),
        "one approver is not two"
    );
    assert_eq!(st.objects(&one).await?, Vec::<String>::new());

    st.decide(&erin, "erin-1", &asked, "erin", Decision::Approve).await?;
    let issued = wait_phase(&st.admin, &a, "two", GrantPhase::Active).await?;
    let mut approvers: Vec<String> =
        issued.status.unwrap_or_default().approvals.into_iter().map(|r| r.approver).collect();
    approvers.sort();
    assert_eq!(approvers, vec!["alice", "erin"]);
    st.cleanup().await
}

#[tokio::test]
async fn one_deny_is_final() -> anyhow::Result<()> {
    let st = stage("deny", 2).await?;
    let a = st.agents.name.clone();
    let (alice, erin) = (cluster().user("alice", &["sre-leads"]).await?, cluster().user("erin", &["sre-leads"]).await?);
    let asked = Api::<AccessGrant>::namespaced(st.agent.clone(), &a)
        .create(&PostParams::default(), &st.delete_volume("nope"))
        .await?;
    wait_phase(&st.admin, &a, "nope", GrantPhase::AwaitingApproval).await?;
    st.decide(&alice, "alice-yes", &asked, "alice", Decision::Approve).await?;
    st.decide(&erin, "erin-no", &asked, "erin", Decision::Deny).await?;
    let denied = wait_phase(&st.admin, &a, "nope", GrantPhase::Denied).await?;
    assert!(ready_reason(&denied).1.contains("denied by erin"), "{:?}", ready_reason(&denied));

    // Later approvals change nothing: admission refuses them, and the grant stays Denied.
    let frank = cluster().user("frank", &["sre-leads"]).await?;
    assert_refused(st.decide(&frank, "late", &asked, "frank", Decision::Approve).await, "is Denied");
    let still = wait_phase(&st.admin, &a, "nope", GrantPhase::Denied).await?;
    assert_eq!(st.objects(&still).await?, Vec::<String>::new());
    st.cleanup().await
}

#[tokio::test]
async fn a_deny_ends_an_active_grant_that_needed_no_approval() -> anyhow::Result<()> {
    let st = stage("deny-active", 1).await?;
    let a = st.agents.name.clone();
    let alice = cluster().user("alice", &["sre-leads"]).await?;
    let read = grant(
        "peek",
        "staging-fixer",
        "15m",
        vec![rule(&st.staging.name, "", &["persistentvolumeclaims"], &["get"], &["db-volume"])],
    );
    let asked = Api::<AccessGrant>::namespaced(st.agent.clone(), &a).create(&PostParams::default(), &read).await?;
    let active = wait_phase(&st.admin, &a, "peek", GrantPhase::Active).await?;
    assert!(!st.objects(&active).await?.is_empty());
    // A listed approver stops it: one Deny ends any grant, not only one that waits.
    st.decide(&alice, "alice-stop", &asked, "alice", Decision::Deny).await?;
    let denied = wait_phase(&st.admin, &a, "peek", GrantPhase::Denied).await?;
    assert!(ready_reason(&denied).1.contains("denied by alice"), "{:?}", ready_reason(&denied));
    assert_eq!(st.objects(&denied).await?, Vec::<String>::new(), "nothing of the credential is left");
    st.cleanup().await
}

#[tokio::test]
async fn a_recreated_grant_starts_from_zero() -> anyhow::Result<()> {
    let st = stage("recreate", 1).await?;
    let a = st.agents.name.clone();
    let alice = cluster().user("alice", &["sre-leads"]).await?;
    let grants: Api<AccessGrant> = Api::namespaced(st.agent.clone(), &a);
    let first = grants.create(&PostParams::default(), &st.delete_volume("again")).await?;
    wait_phase(&st.admin, &a, "again", GrantPhase::AwaitingApproval).await?;
    st.decide(&alice, "alice-first", &first, "alice", Decision::Approve).await?;
    wait_phase(&st.admin, &a, "again", GrantPhase::Active).await?;

    Api::<AccessGrant>::namespaced(st.admin.clone(), &a).delete("again", &DeleteParams::default()).await?;
    wait_grant_gone(&st.admin, &a, "again").await?;
    let second = grants.create(&PostParams::default(), &st.delete_volume("again")).await?;
    assert_ne!(second.uid(), first.uid());
    let held = wait_phase(&st.admin, &a, "again", GrantPhase::AwaitingApproval).await?;
    // alice's Approval of the first object is still there, and does not count.
    assert!(Api::<Approval>::namespaced(st.admin.clone(), &a).get_opt("alice-first").await?.is_some());
    assert!(held.status.clone().unwrap_or_default().approvals.is_empty());
    let (_, message) = ready_reason(&held);
    assert!(message.contains("alice-first does not count"), "{message}");
    assert_eq!(st.objects(&held).await?, Vec::<String>::new());
    st.cleanup().await
}

#[tokio::test]
async fn an_unapproved_grant_expires_after_pending_timeout_without_ever_being_issued() -> anyhow::Result<()> {
    operator().await?;
    let admin = cluster().admin().await?;
    let agents = TestNamespace::new(&admin, "pending-a").await?;
    let staging = TestNamespace::new(&admin, "pending-s").await?;
    let mut id = identity("impatient", &[&staging.name]);
    id.spec.approval.pending_timeout = "10s".into();
    create(&admin, &agents.name, &id).await?;
    create(
        &admin,
        &agents.name,
        &grant("wait", "impatient", "5m", vec![rule(&staging.name, "", &["secrets"], &["get"], &[])]),
    )
    .await?;
    wait_phase(&admin, &agents.name, "wait", GrantPhase::AwaitingApproval).await?;
    let expired = wait_phase(&admin, &agents.name, "wait", GrantPhase::Expired).await?;
    assert_eq!(ready_reason(&expired).0, "PendingTimeout");
    let status = expired.status.unwrap_or_default();
    assert!(status.issued_at.is_none() && status.credentials_secret.is_none());
    agents.delete().await?;
    staging.delete().await
}

#[tokio::test]
async fn an_agent_asking_for_exec_or_secrets_waits_too_and_only_for_itself() -> anyhow::Result<()> {
    let st = stage("agentasks", 1).await?;
    let (a, s) = (st.agents.name.clone(), st.staging.name.clone());
    let grants: Api<AccessGrant> = Api::namespaced(st.agent.clone(), &a);
    grants
        .create(
            &PostParams::default(),
            &grant("shell", "staging-fixer", "5m", vec![rule(&s, "", &["pods/exec"], &["create"], &[])]),
        )
        .await?;
    grants
        .create(
            &PostParams::default(),
            &grant("peek", "staging-fixer", "5m", vec![rule(&s, "", &["secrets"], &["get"], &["db-password"])]),
        )
        .await?;
    let shell = wait_phase(&st.admin, &a, "shell", GrantPhase::AwaitingApproval).await?;
    assert_eq!(shell.status.unwrap_or_default().approval_reasons, vec![format!("escalation: create pods/exec in {s}")]);
    let peek = wait_phase(&st.admin, &a, "peek", GrantPhase::AwaitingApproval).await?;
    assert_eq!(
        peek.status.unwrap_or_default().approval_reasons,
        vec![format!("sensitive: get secrets/db-password in {s}")]
    );

    // Asking in the name of another identity is refused at admission.
    let mut other = identity("db-admin", &[&s]);
    other.spec.approval.approvers.groups = vec!["sre-leads".into()];
    create(&st.admin, &a, &other).await?;
    let r = grants
        .create(
            &PostParams::default(),
            &grant("borrowed", "db-admin", "5m", vec![rule(&s, "", &["configmaps"], &["get"], &[])]),
        )
        .await;
    assert_refused(r, "only for that identity");
    // Nothing was issued meanwhile: the agent still reads no Secret.
    assert_forbidden(
        Api::<Secret>::namespaced(st.agent.clone(), &s).get("db-password").await,
        "a Secret before approval",
    );
    st.cleanup().await
}

#[tokio::test]
async fn kubectl_agentid_lists_explains_approves_and_denies() -> anyhow::Result<()> {
    let st = stage("plugin", 1).await?;
    let a = st.agents.name.clone();
    cluster().user("alice", &["sre-leads"]).await?;
    cluster().user("erin", &["sre-leads"]).await?;
    cluster().user("dave", &["ops"]).await?;
    let grants: Api<AccessGrant> = Api::namespaced(st.agent.clone(), &a);
    grants.create(&PostParams::default(), &st.delete_volume("via-plugin")).await?;
    grants.create(&PostParams::default(), &st.delete_volume("to-deny")).await?;
    wait_phase(&st.admin, &a, "via-plugin", GrantPhase::AwaitingApproval).await?;
    wait_phase(&st.admin, &a, "to-deny", GrantPhase::AwaitingApproval).await?;

    let (ok, table, err) = plugin("alice", &a, &["pending"])?;
    assert!(ok, "{err}");
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("via-plugin") && table.contains("0/1") && table.contains("agentid-staging-fixer"),
        "{table}"
    );
    let (ok, json, err) = plugin("alice", &a, &["pending", "-o", "json"])?;
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json)?;
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["requestedBy"] == format!("system:serviceaccount:{a}:agentid-staging-fixer")));

    let (ok, text, err) = plugin("alice", &a, &["explain", "via-plugin"])?;
    assert!(ok, "{err}");
    assert!(
        text.contains(&format!("get, delete persistentvolumeclaims db-volume in namespace {}", st.staging.name)),
        "{text}"
    );
    assert!(text.contains("destructive: delete persistentvolumeclaims/db-volume"), "{text}");
    let (ok, yaml, err) = plugin("alice", &a, &["explain", "via-plugin", "-o", "yaml"])?;
    assert!(ok && yaml.contains("needsApprovalBecause:"), "{yaml}{err}");

    // dave may approve in RBAC terms but is not listed: the plugin shows admission's reason.
    let (ok, _, err) = plugin("dave", &a, &["approve", "via-plugin"])?;
    assert!(!ok && err.contains("dave is not an approver"), "{err}");
    let (ok, out, err) = plugin("alice", &a, &["approve", "via-plugin", "--reason", "staging only"])?;
    assert!(ok, "{err}");
    assert!(out.contains("accessgrant/via-plugin approved by alice"), "{out}");
    wait_phase(&st.admin, &a, "via-plugin", GrantPhase::Active).await?;

    // The inventory shows the identity and what it holds now, with who approved it.
    let (ok, json, err) = plugin("admin", &a, &["inventory", "-o", "json"])?;
    assert!(ok, "{err}");
    let entries: Vec<serde_json::Value> = serde_json::from_str(&json)?;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["name"], "staging-fixer");
    assert_eq!(entries[0]["activeGrants"][0]["name"], "via-plugin");
    assert_eq!(entries[0]["activeGrants"][0]["approvedBy"], serde_json::json!(["alice"]));
    let (ok, table, err) = plugin("admin", &a, &["inventory"])?;
    assert!(ok && table.starts_with("NAMESPACE") && table.contains("grant via-plugin until"), "{table}{err}");

    let (ok, _, err) = plugin("erin", &a, &["deny", "to-deny", "--reason", " "])?;
    assert!(!ok && err.contains("needs --reason"), "{err}");
    let (ok, _, err) = plugin("erin", &a, &["deny", "to-deny", "--reason", "use a snapshot instead"])?;
    assert!(ok, "{err}");
    let denied = wait_phase(&st.admin, &a, "to-deny", GrantPhase::Denied).await?;
    assert!(ready_reason(&denied).1.contains("use a snapshot instead"));
    let (ok, table, _) = plugin("alice", &a, &["pending"])?;
    assert!(ok && table.contains("No AccessGrants are waiting"), "{table}");
    st.cleanup().await
}
