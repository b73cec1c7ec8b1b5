//! The CRDs as the apiserver enforces them: what it accepts and what it refuses, with messages.

use agentid::api::{AccessGrant, AgentIdentity, Approval, GrantPhase};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, Patch, PatchParams, PostParams},
    core::Resource,
};
use serde_json::{Value, json};

use crate::{
    fixtures::{bind, install_approver_role, wait_phase},
    harness::{TestNamespace, assert_invalid, cluster, dynamic_api, install_crds, object, operator},
};

async fn setup(prefix: &str) -> anyhow::Result<(Client, TestNamespace)> {
    // With agentid's admission webhook in place, as on a real install.
    operator().await?;
    let admin = cluster().admin().await?;
    let ns = TestNamespace::new(&admin, prefix).await?;
    Ok((admin, ns))
}

fn identity(name: &str, spec: Value) -> Value {
    json!({"metadata": {"name": name}, "spec": spec})
}

fn valid_identity_spec() -> Value {
    json!({"owner": "platform-team", "purpose": "tests", "allowedNamespaces": ["staging"]})
}

fn valid_grant_spec() -> Value {
    json!({
        "identity": "staging-fixer",
        "duration": "15m",
        "reason": "read the deployment",
        "kubernetes": {"rules": [{
            "namespace": "staging", "apiGroups": ["apps"], "resources": ["deployments"],
            "verbs": ["get"], "resourceNames": ["web"]
        }]}
    })
}

async fn create<K: Resource<DynamicType = ()>>(client: &Client, ns: &str, value: Value) -> kube::Result<DynamicObject> {
    let mut value = value;
    value["apiVersion"] = K::api_version(&()).into();
    value["kind"] = K::kind(&()).into();
    let obj: DynamicObject = serde_json::from_value(value).expect("test object must parse");
    dynamic_api::<K>(client, ns).create(&PostParams::default(), &obj).await
}

#[tokio::test]
async fn generated_crds_are_established_with_names_and_columns() -> anyhow::Result<()> {
    install_crds().await?;
    let api: Api<CustomResourceDefinition> = Api::all(cluster().admin().await?);
    for generated in agentid::api::crds() {
        let served = api.get(&generated.name_any()).await?;
        let status = served.status.unwrap_or_default();
        let accepted =
            status.conditions.unwrap_or_default().iter().any(|c| c.type_ == "NamesAccepted" && c.status == "True");
        assert!(accepted, "{} names not accepted", generated.name_any());
        assert_eq!(served.spec.names.categories, Some(vec!["agentid".to_string()]));
        let columns = served.spec.versions[0].additional_printer_columns.clone().unwrap_or_default();
        assert!(columns.iter().any(|c| c.name == "Age"), "{} lacks printer columns", generated.name_any());
    }
    Ok(())
}

#[tokio::test]
async fn design_examples_are_accepted_and_defaults_applied() -> anyhow::Result<()> {
    let (admin, ns) = setup("design").await?;
    let staging = TestNamespace::new(&admin, "design-staging").await?;
    install_approver_role(&admin).await?;
    bind(&admin, &ns.name, "approvers", "agentid-approver", &[], &["sre-leads"]).await?;
    let alice = cluster().user("alice", &["sre-leads"]).await?;

    // DESIGN.md's objects, with the test's namespaces for "agents" and "staging".
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/design-example.yaml"))?
        .replace("[staging]", &format!("[{}]", staging.name))
        .replace("namespace: staging", &format!("namespace: {}", staging.name));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)?;
    assert_eq!(docs.len(), 3);
    let mut grant_uid = String::new();
    for mut doc in docs {
        doc["metadata"]["namespace"] = ns.name.clone().into();
        let api = match doc["kind"].as_str() {
            Some("AgentIdentity") => dynamic_api::<AgentIdentity>(&admin, &ns.name),
            Some("AccessGrant") => dynamic_api::<AccessGrant>(&admin, &ns.name),
            Some("Approval") => {
                // The one field that cannot be written in advance: the grant's UID.
                doc["spec"]["grantUID"] = grant_uid.clone().into();
                dynamic_api::<Approval>(&alice, &ns.name)
            }
            other => anyhow::bail!("unexpected kind {other:?}"),
        };
        let created = api.create(&PostParams::default(), &serde_json::from_value(doc.clone())?).await?;
        if doc["kind"] == "AccessGrant" {
            grant_uid = created.uid().unwrap_or_default();
        }
    }

    // The typed structs read back what the apiserver stored.
    let id = Api::<AgentIdentity>::namespaced(admin.clone(), &ns.name).get("staging-fixer").await?;
    assert_eq!(id.spec.approval.approvers.groups, vec!["sre-leads"]);
    let grant = Api::<AccessGrant>::namespaced(admin.clone(), &ns.name).get("cleanup-volume").await?;
    assert_eq!(
        grant.spec.kubernetes.as_ref().map(|k| k.rules[0].verbs.clone()),
        Some(vec!["get".into(), "delete".into()])
    );
    let approval = Api::<Approval>::namespaced(admin.clone(), &ns.name).get("cleanup-volume-by-alice").await?;
    assert_eq!(approval.spec.approver, "alice");
    // ...and the flow of DESIGN.md runs: alice's approval releases the grant.
    let grant = wait_phase(&admin, &ns.name, "cleanup-volume", GrantPhase::Active).await?;
    assert_eq!(grant.status.as_ref().map(|s| s.approvals[0].approver.clone()).as_deref(), Some("alice"));
    staging.delete().await?;

    // Defaults fill what a minimal identity leaves out.
    let minimal: AgentIdentity = object(identity("minimal", json!({"owner": "me", "purpose": "p"})));
    let minimal =
        Api::<AgentIdentity>::namespaced(admin.clone(), &ns.name).create(&PostParams::default(), &minimal).await?;
    assert_eq!(minimal.spec.max_grant_duration, "1h");
    assert_eq!(minimal.spec.approval.required_approvals, 1);
    assert_eq!(minimal.spec.approval.pending_timeout, "24h");
    assert!(!minimal.spec.suspended);
    ns.delete().await
}

#[tokio::test]
async fn identity_needs_owner_and_purpose_and_sane_ceilings() -> anyhow::Result<()> {
    let (admin, ns) = setup("identity").await?;
    let n = &ns.name;

    let r = create::<AgentIdentity>(&admin, n, identity("no-owner", json!({"purpose": "p"}))).await;
    assert_invalid(r, &["spec.owner", "Required value"]);
    let r = create::<AgentIdentity>(&admin, n, identity("blank-owner", json!({"owner": " ", "purpose": "p"}))).await;
    assert_invalid(r, &["owner must name the accountable human or team"]);
    let r = create::<AgentIdentity>(&admin, n, identity("no-purpose", json!({"owner": "o"}))).await;
    assert_invalid(r, &["spec.purpose", "Required value"]);

    for (value, message) in [
        ("forever", "must be a duration such as"),
        ("0s", "must be between 10s and 24h"),
        ("-5m", "must be a duration such as"),
        ("25h", "must be between 10s and 24h"),
    ] {
        let mut spec = valid_identity_spec();
        spec["maxGrantDuration"] = value.into();
        let r = create::<AgentIdentity>(&admin, n, identity("bad-max", spec)).await;
        assert_invalid(r, &["spec.maxGrantDuration", message]);
    }

    let r = create::<AgentIdentity>(&admin, n, identity("grant-lookalike", valid_identity_spec())).await;
    assert_invalid(r, &["may not start with 'grant-'"]);
    let r = create::<AgentIdentity>(&admin, n, identity(&"a".repeat(64), valid_identity_spec())).await;
    assert_invalid(r, &["at most 63 characters"]);

    let mut spec = valid_identity_spec();
    spec["allowedNamespaces"] = json!(["Staging_1"]);
    let r = create::<AgentIdentity>(&admin, n, identity("bad-ns", spec)).await;
    assert_invalid(r, &["allowedNamespaces must hold namespace names"]);

    let mut spec = valid_identity_spec();
    spec["approval"] = json!({"approvers": {"users": ["system:serviceaccount:agents:helper"]}});
    let r = create::<AgentIdentity>(&admin, n, identity("sa-approver", spec)).await;
    assert_invalid(r, &["ServiceAccounts cannot approve"]);

    let mut spec = valid_identity_spec();
    spec["approval"] = json!({"approvers": {"groups": ["system:serviceaccounts:agents"]}});
    let r = create::<AgentIdentity>(&admin, n, identity("sa-group-approver", spec)).await;
    assert_invalid(r, &["not of ServiceAccounts"]);

    let mut spec = valid_identity_spec();
    spec["approval"] = json!({"requiredApprovals": 0});
    let r = create::<AgentIdentity>(&admin, n, identity("zero-approvals", spec)).await;
    assert_invalid(r, &["spec.approval.requiredApprovals"]);

    let mut spec = valid_identity_spec();
    spec["approval"] = json!({"pendingTimeout": "5s"});
    let r = create::<AgentIdentity>(&admin, n, identity("short-pending", spec)).await;
    assert_invalid(r, &["spec.approval.pendingTimeout", "must be between 10s and 168h"]);
    ns.delete().await
}

#[tokio::test]
async fn grant_rejects_bad_durations_missing_reason_and_malformed_rules() -> anyhow::Result<()> {
    let (admin, ns) = setup("grant").await?;
    let n = &ns.name;
    let grant = |spec: Value| json!({"metadata": {"generateName": "g-"}, "spec": spec});

    for (value, message) in [
        ("forever", "must be a duration such as"),
        ("0s", "must be between 10s and 24h"),
        ("-5m", "must be a duration such as"),
        ("25h", "must be between 10s and 24h"),
        ("9s", "must be between 10s and 24h"),
    ] {
        let mut spec = valid_grant_spec();
        spec["duration"] = value.into();
        let r = create::<AccessGrant>(&admin, n, grant(spec)).await;
        assert_invalid(r, &["spec.duration", message]);
    }
    for ok in ["10s", "24h", "1h30m"] {
        let mut spec = valid_grant_spec();
        spec["duration"] = ok.into();
        create::<AccessGrant>(&admin, n, grant(spec)).await?;
    }

    let long_name = json!({"metadata": {"name": "g".repeat(64)}, "spec": valid_grant_spec()});
    assert_invalid(create::<AccessGrant>(&admin, n, long_name).await, &["at most 63 characters"]);

    let mut spec = valid_grant_spec();
    spec.as_object_mut().map(|s| s.remove("reason"));
    assert_invalid(create::<AccessGrant>(&admin, n, grant(spec)).await, &["spec.reason", "Required value"]);

    let mut spec = valid_grant_spec();
    spec["reason"] = "".into();
    assert_invalid(create::<AccessGrant>(&admin, n, grant(spec)).await, &["reason must say why"]);

    let mut spec = valid_grant_spec();
    spec.as_object_mut().map(|s| s.remove("identity"));
    assert_invalid(create::<AccessGrant>(&admin, n, grant(spec)).await, &["spec.identity", "Required value"]);

    let mut spec = valid_grant_spec();
    spec.as_object_mut().map(|s| s.remove("kubernetes"));
    assert_invalid(create::<AccessGrant>(&admin, n, grant(spec)).await, &["spec.kubernetes is required"]);

    let mut spec = valid_grant_spec();
    spec["kubernetes"]["rules"] = json!([]);
    assert_invalid(
        create::<AccessGrant>(&admin, n, grant(spec)).await,
        &["spec.kubernetes.rules", "at least one rule"],
    );

    let mut spec = valid_grant_spec();
    spec["kubernetes"]["rules"][0].as_object_mut().map(|r| r.remove("namespace"));
    assert_invalid(
        create::<AccessGrant>(&admin, n, grant(spec)).await,
        &["spec.kubernetes.rules[0].namespace", "Required value"],
    );

    let mut spec = valid_grant_spec();
    spec["kubernetes"]["rules"][0]["verbs"] = json!([]);
    assert_invalid(
        create::<AccessGrant>(&admin, n, grant(spec)).await,
        &["spec.kubernetes.rules[0].verbs", "at least one verb"],
    );

    let mut spec = valid_grant_spec();
    spec["kubernetes"]["rules"][0]["apiGroups"] = json!([]);
    assert_invalid(create::<AccessGrant>(&admin, n, grant(spec)).await, &["apiGroups must hold at least one entry"]);

    let mut spec = valid_grant_spec();
    spec["kubernetes"]["rules"][0]["resources"] = json!([]);
    assert_invalid(create::<AccessGrant>(&admin, n, grant(spec)).await, &["resources must name at least one resource"]);

    // A requester cannot pre-fill the status: the status subresource ignores it on create.
    let mut with_status = grant(valid_grant_spec());
    with_status["status"] = json!({"phase": "Active", "requiresApproval": false, "requestedBy": "alice"});
    let created = create::<AccessGrant>(&admin, n, with_status).await?;
    let typed = Api::<AccessGrant>::namespaced(admin.clone(), n).get(&created.name_any()).await?;
    assert_eq!(typed.status.as_ref().and_then(|s| s.phase), None::<GrantPhase>);
    ns.delete().await
}

#[tokio::test]
async fn grant_spec_cannot_be_widened_after_creation() -> anyhow::Result<()> {
    let (admin, ns) = setup("immutable-grant").await?;
    let created =
        create::<AccessGrant>(&admin, &ns.name, json!({"metadata": {"name": "narrow"}, "spec": valid_grant_spec()}))
            .await?;
    assert_eq!(created.name_any(), "narrow");
    let api = dynamic_api::<AccessGrant>(&admin, &ns.name);

    let widen = json!({"spec": {"kubernetes": {"rules": [{
        "namespace": "staging", "apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]
    }]}}});
    let r = api.patch("narrow", &PatchParams::default(), &Patch::Merge(&widen)).await;
    assert_invalid(r, &["AccessGrant spec is immutable"]);
    let r = api.patch("narrow", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"duration": "24h"}}))).await;
    assert_invalid(r, &["AccessGrant spec is immutable"]);

    // Labels and annotations may still change: only the spec is frozen.
    api.patch("narrow", &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"labels": {"team": "x"}}})))
        .await?;
    ns.delete().await
}

#[tokio::test]
async fn approval_accepts_only_approve_or_deny_and_is_immutable() -> anyhow::Result<()> {
    let (admin, ns) = setup("approval").await?;
    let n = &ns.name;
    let approval = |name: &str, decision: &str, reason: &str| {
        json!({"metadata": {"name": name}, "spec": {
            "grant": "cleanup-volume", "grantUID": "uid-1", "decision": decision,
            "reason": reason, "approver": "alice"
        }})
    };

    let r = create::<Approval>(&admin, n, approval("maybe", "Maybe", "")).await;
    assert_invalid(r, &["spec.decision", "Unsupported value: \"Maybe\"", "\"Approve\"", "\"Deny\""]);
    let r = create::<Approval>(&admin, n, approval("silent-deny", "Deny", "")).await;
    assert_invalid(r, &["a Deny must give a reason"]);
    let r = create::<Approval>(
        &admin,
        n,
        json!({"metadata": {"name": "no-uid"}, "spec": {
            "grant": "g", "decision": "Approve", "approver": "alice"
        }}),
    )
    .await;
    assert_invalid(r, &["spec.grantUID", "Required value"]);

    // A valid Approval needs a real grant and an authorized approver (admission checks both).
    install_approver_role(&admin).await?;
    bind(&admin, n, "approvers", "agentid-approver", &[], &["sre-leads"]).await?;
    let alice = cluster().user("alice", &["sre-leads"]).await?;
    let target = TestNamespace::new(&admin, "approval-t").await?;
    let mut id = identity("staging-fixer", valid_identity_spec());
    id["spec"]["allowedNamespaces"] = json!([target.name]);
    id["spec"]["approval"] = json!({"approvers": {"groups": ["sre-leads"]}});
    create::<AgentIdentity>(&admin, n, id).await?;
    let mut spec = valid_grant_spec();
    spec["kubernetes"]["rules"][0] = json!({"namespace": target.name, "apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["delete"]});
    let grant = create::<AccessGrant>(&admin, n, json!({"metadata": {"name": "cleanup-volume"}, "spec": spec})).await?;
    let mut yes = approval("yes", "Approve", "checked");
    yes["spec"]["grantUID"] = grant.uid().unwrap_or_default().into();
    create::<Approval>(&alice, n, yes).await?;
    let api = dynamic_api::<Approval>(&admin, n);
    for change in [
        json!({"spec": {"decision": "Deny"}}),
        json!({"spec": {"grantUID": "uid-2"}}),
        json!({"spec": {"approver": "mallory"}}),
        json!({"spec": {"grant": "other"}}),
    ] {
        let r = api.patch("yes", &PatchParams::default(), &Patch::Merge(&change)).await;
        assert_invalid(r, &["Approval spec is immutable"]);
    }
    target.delete().await?;
    ns.delete().await
}

#[tokio::test]
async fn users_authenticate_by_certificate_and_hold_no_rights_on_agentid_kinds() -> anyhow::Result<()> {
    use k8s_openapi::api::authentication::v1::SelfSubjectReview;
    install_crds().await?;
    let carol = cluster().user("carol-nobody", &["interns"]).await?;
    let review = Api::<SelfSubjectReview>::all(carol.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    let user = review.status.and_then(|s| s.user_info).unwrap_or_default();
    assert_eq!(user.username.as_deref(), Some("carol-nobody"));
    assert!(user.groups.unwrap_or_default().contains(&"interns".to_string()));

    // Installing the CRDs grants nobody anything: RBAC refuses an unbound user.
    let r = Api::<AgentIdentity>::namespaced(carol, "default").list(&Default::default()).await;
    match r {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403, got {other:?}"),
    }
    Ok(())
}
