use serde_json::{Value, json};

use super::*;
use crate::{api::AccessGrantStatus, policy::testing};

fn request(
    kind: &str,
    operation: &str,
    user: &str,
    groups: &[&str],
    object: Value,
    old: Option<Value>,
) -> AdmissionRequest<DynamicObject> {
    let review: kube::core::admission::AdmissionReview<DynamicObject> = serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "req-1",
            "kind": {"group": "agentid.dev", "version": "v1alpha1", "kind": kind},
            "resource": {"group": "agentid.dev", "version": "v1alpha1", "resource": format!("{}s", kind.to_lowercase())},
            "name": object["metadata"]["name"],
            "namespace": "agents",
            "operation": operation,
            "userInfo": {"username": user, "groups": groups},
            "object": object,
            "oldObject": old,
            "dryRun": false
        }
    }))
    .expect("review parses");
    review.try_into().expect("review has a request")
}

fn grant_json(identity: &str, requested_by: Option<&str>) -> Value {
    let mut g = json!({
        "apiVersion": "agentid.dev/v1alpha1", "kind": "AccessGrant",
        "metadata": {"name": "rm", "namespace": "agents", "uid": "uid-rm"},
        "spec": {"identity": identity, "duration": "15m", "reason": "r", "kubernetes": {"rules": [
            {"namespace": "staging", "apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["delete"]}
        ]}}
    });
    if let Some(r) = requested_by {
        g["metadata"]["annotations"] = json!({REQUESTED_BY: r});
    }
    g
}

fn approval_json(approver: &str, uid: &str, groups: Option<&[&str]>) -> Value {
    let mut a = json!({
        "apiVersion": "agentid.dev/v1alpha1", "kind": "Approval",
        "metadata": {"name": "ok", "namespace": "agents"},
        "spec": {"grant": "rm", "grantUID": uid, "decision": "Approve", "reason": "checked", "approver": approver}
    });
    if let Some(g) = groups {
        a["metadata"]["annotations"] = json!({APPROVER_GROUPS: serde_json::to_string(g).expect("json")});
    }
    a
}

fn patched(response: &AdmissionResponse, original: Value) -> Value {
    let patch: json_patch::Patch =
        serde_json::from_slice(response.patch.as_deref().expect("a patch")).expect("patch parses");
    let mut doc = original;
    json_patch::patch(&mut doc, &patch).expect("patch applies");
    doc
}

fn message(response: &AdmissionResponse) -> String {
    response.result.message.clone()
}

#[test]
fn mutation_records_the_requester_whatever_the_request_says() {
    for claimed in [None, Some("alice")] {
        let obj = grant_json("fixer", claimed);
        let req = request("AccessGrant", "CREATE", "bob", &["devs"], obj.clone(), None);
        let response = mutate(&req);
        assert!(response.allowed);
        assert_eq!(patched(&response, obj)["metadata"]["annotations"][REQUESTED_BY], "bob");
    }
}

#[test]
fn mutation_adds_the_revocation_finalizer_once_and_keeps_others() {
    let finalizer = crate::policy::names::GRANT_FINALIZER;
    let bare = grant_json("fixer", None);
    let doc = patched(&mutate(&request("AccessGrant", "CREATE", "bob", &[], bare.clone(), None)), bare);
    assert_eq!(doc["metadata"]["finalizers"], serde_json::json!([finalizer]));

    let mut theirs = grant_json("fixer", None);
    theirs["metadata"]["finalizers"] = serde_json::json!(["example.com/keep"]);
    let doc = patched(&mutate(&request("AccessGrant", "CREATE", "bob", &[], theirs.clone(), None)), theirs);
    assert_eq!(doc["metadata"]["finalizers"], serde_json::json!(["example.com/keep", finalizer]));

    let mut already = grant_json("fixer", None);
    already["metadata"]["finalizers"] = serde_json::json!([finalizer]);
    let doc = patched(&mutate(&request("AccessGrant", "CREATE", "bob", &[], already.clone(), None)), already);
    assert_eq!(doc["metadata"]["finalizers"], serde_json::json!([finalizer]));
}

#[test]
fn mutation_records_approver_groups() {
    let obj = approval_json("alice", "uid-rm", Some(&["forged"]));
    let req = request("Approval", "CREATE", "alice", &["sre-leads", "system:authenticated"], obj.clone(), None);
    let doc = patched(&mutate(&req), obj);
    assert_eq!(doc["metadata"]["annotations"][APPROVER_GROUPS], "[\"sre-leads\",\"system:authenticated\"]");
}

#[test]
fn grant_create_needs_the_recorded_requester_and_base_sa_is_confined() {
    let ok = request("AccessGrant", "CREATE", "bob", &[], grant_json("fixer", Some("bob")), None);
    assert!(validate_grant(&ok).allowed);
    let forged = request("AccessGrant", "CREATE", "bob", &[], grant_json("fixer", Some("alice")), None);
    assert!(!validate_grant(&forged).allowed);
    let missing = request("AccessGrant", "CREATE", "bob", &[], grant_json("fixer", None), None);
    assert!(!validate_grant(&missing).allowed, "fail closed when mutation did not run");

    let sa = "system:serviceaccount:agents:agentid-fixer";
    let own = request("AccessGrant", "CREATE", sa, &[], grant_json("fixer", Some(sa)), None);
    assert!(validate_grant(&own).allowed);
    let other = request("AccessGrant", "CREATE", sa, &[], grant_json("db-admin", Some(sa)), None);
    let response = validate_grant(&other);
    assert!(!response.allowed);
    assert!(message(&response).contains("only for that identity"), "{}", message(&response));
    // Another namespace's base SA may not request here even for an identity of the same name.
    let foreign = "system:serviceaccount:elsewhere:agentid-fixer";
    assert!(
        !validate_grant(&request("AccessGrant", "CREATE", foreign, &[], grant_json("fixer", Some(foreign)), None))
            .allowed
    );
}

#[test]
fn requester_record_cannot_change() {
    let old = grant_json("fixer", Some("bob"));
    let new = grant_json("fixer", Some("alice"));
    let req = request("AccessGrant", "UPDATE", "bob", &[], new, Some(old.clone()));
    assert!(!validate_grant(&req).allowed);
    let mut stripped = old.clone();
    stripped["metadata"]["annotations"] = json!({});
    assert!(!validate_grant(&request("AccessGrant", "UPDATE", "bob", &[], stripped, Some(old.clone()))).allowed);
    let mut finalizer = old.clone();
    finalizer["metadata"]["finalizers"] = json!(["agentid.dev/revoke"]);
    assert!(validate_grant(&request("AccessGrant", "UPDATE", "agentid", &[], finalizer, Some(old))).allowed);
}

#[test]
fn only_a_settled_grant_may_carry_the_settled_label() {
    use crate::policy::names::SETTLED_LABEL;
    let with_status = |status: Value| {
        let mut g = grant_json("fixer", Some("bob"));
        g["status"] = status;
        g
    };
    let labelled = |mut g: Value| {
        g["metadata"]["labels"] = json!({SETTLED_LABEL: "true"});
        g
    };
    let update = |old: Value, new: Value| validate_grant(&request("AccessGrant", "UPDATE", "eve", &[], new, Some(old)));
    let active = with_status(json!({"phase": "Active", "expiresAt": "2030-01-01T00:00:00Z"}));
    let pending = with_status(json!({"phase": "Pending"}));
    // Expired, but its revocation not finished (no revokedAt): not settled yet.
    let interrupted = with_status(json!({"phase": "Expired", "expiresAt": "2020-01-01T00:00:00Z"}));
    for live in [active, pending, interrupted, grant_json("fixer", Some("bob"))] {
        let refused = update(live.clone(), labelled(live.clone()));
        assert!(!refused.allowed, "{live}");
        assert!(message(&refused).contains(SETTLED_LABEL), "{}", message(&refused));
    }
    // At creation there is no status yet: never settled.
    let create = request("AccessGrant", "CREATE", "bob", &[], labelled(grant_json("fixer", Some("bob"))), None);
    assert!(!validate_grant(&create).allowed);
    let settled = [
        with_status(json!({"phase": "Rejected"})),
        with_status(
            json!({"phase": "Expired", "expiresAt": "2020-01-01T00:00:00Z", "revokedAt": "2020-01-01T00:00:01Z"}),
        ),
    ];
    for done in settled {
        assert!(update(done.clone(), labelled(done.clone())).allowed, "{done}");
        // Taking it off again only brings the grant back into view.
        assert!(update(labelled(done.clone()), done.clone()).allowed, "{done}");
    }
}

fn facts(requester: &str) -> ApprovalFacts {
    let mut grant: AccessGrant = serde_json::from_value(grant_json("fixer", Some(requester))).expect("grant");
    grant.status = Some(AccessGrantStatus::default());
    let mut identity = testing::identity("fixer", &["staging"]);
    identity.spec.approval.approvers.groups = vec!["sre-leads".into()];
    ApprovalFacts { grant: Some(grant), identity: Some(identity), may_approve: true }
}

#[test]
fn approval_create_checks_the_approver() {
    let leads: &[&str] = &["sre-leads"];
    let ok = request("Approval", "CREATE", "alice", leads, approval_json("alice", "uid-rm", Some(leads)), None);
    assert!(validate_approval(&ok, &facts("bob")).allowed, "{}", message(&validate_approval(&ok, &facts("bob"))));

    let cases: Vec<(&str, &[&str], Value, ApprovalFacts, &str)> = vec![
        ("bob", leads, approval_json("bob", "uid-rm", Some(leads)), facts("bob"), "cannot approve"),
        (
            "bob",
            leads,
            approval_json("alice", "uid-rm", Some(leads)),
            facts("bob"),
            "must name the user who creates it",
        ),
        ("alice", leads, approval_json("alice", "uid-old", Some(leads)), facts("bob"), "does not match"),
        ("dave", &["ops"], approval_json("dave", "uid-rm", Some(&["ops"])), facts("bob"), "is not an approver"),
        (
            "alice",
            leads,
            approval_json("alice", "uid-rm", Some(&["sre-leads", "extra"])),
            facts("bob"),
            "must hold the creating user's groups",
        ),
        (
            "alice",
            leads,
            approval_json("alice", "uid-rm", Some(leads)),
            ApprovalFacts { may_approve: false, ..facts("bob") },
            "needs RBAC verb approve",
        ),
        (
            "alice",
            leads,
            approval_json("alice", "uid-rm", Some(leads)),
            ApprovalFacts { grant: None, ..facts("bob") },
            "does not exist",
        ),
    ];
    for (user, groups, obj, f, expected) in cases {
        let response = validate_approval(&request("Approval", "CREATE", user, groups, obj, None), &f);
        assert!(!response.allowed, "{user}: expected a refusal mentioning {expected:?}");
        assert!(message(&response).contains(expected), "{user}: {:?} lacks {expected:?}", message(&response));
    }
    let sa = "system:serviceaccount:agents:agentid-fixer";
    let response = validate_approval(
        &request("Approval", "CREATE", sa, leads, approval_json(sa, "uid-rm", Some(leads)), None),
        &facts("bob"),
    );
    assert!(!response.allowed && message(&response).contains("only humans can approve"));
}

#[test]
fn approver_groups_record_cannot_change() {
    let old = approval_json("alice", "uid-rm", Some(&["sre-leads"]));
    let new = approval_json("alice", "uid-rm", Some(&["sre-leads", "admins"]));
    assert!(
        !validate_approval(&request("Approval", "UPDATE", "alice", &[], new, Some(old)), &ApprovalFacts::default())
            .allowed
    );
}

fn identity_json(allowed: &[&str]) -> Value {
    json!({
        "apiVersion": "agentid.dev/v1alpha1", "kind": "AgentIdentity",
        "metadata": {"name": "fixer", "namespace": "agents"},
        "spec": {"owner": "o", "purpose": "p", "allowedNamespaces": allowed}
    })
}

#[test]
fn identity_changes_check_only_newly_opened_namespaces() {
    let create = request("AgentIdentity", "CREATE", "mallory", &[], identity_json(&["staging", "prod"]), None);
    assert_eq!(newly_allowed(&create), Ok(vec!["prod".to_string(), "staging".to_string()]));
    let update = request(
        "AgentIdentity",
        "UPDATE",
        "mallory",
        &[],
        identity_json(&["staging", "prod"]),
        Some(identity_json(&["staging"])),
    );
    assert_eq!(newly_allowed(&update), Ok(vec!["prod".to_string()]));
    assert!(validate_identity(&update, None, &Installation::ANYWHERE, &[]).allowed);
    let refused = validate_identity(&update, None, &Installation::ANYWHERE, &["prod".to_string()]);
    assert!(!refused.allowed);
    assert!(message(&refused).contains("mallory may not open namespace(s) [\"prod\"]"), "{}", message(&refused));
}

#[test]
fn kube_system_and_agentids_own_namespace_are_never_opened() {
    let req = request("AgentIdentity", "CREATE", "admin", &["system:masters"], identity_json(&["kube-system"]), None);
    assert!(!validate_identity(&req, None, &Installation::ANYWHERE, &[]).allowed);
    let req =
        request("AgentIdentity", "CREATE", "admin", &["system:masters"], identity_json(&["agentid-system"]), None);
    assert!(!validate_identity(&req, Some("agentid-system"), &Installation::ANYWHERE, &[]).allowed);
    assert!(validate_identity(&req, None, &Installation::ANYWHERE, &[]).allowed);
}

#[test]
fn identities_outside_the_installation_are_refused_but_can_still_be_narrowed() {
    let install = Installation { agent_namespaces: vec!["agents".into()], target_namespaces: vec!["staging".into()] };
    let ok = request("AgentIdentity", "CREATE", "admin", &[], identity_json(&["staging"]), None);
    assert!(validate_identity(&ok, None, &install, &[]).allowed);
    let wide = request("AgentIdentity", "CREATE", "admin", &[], identity_json(&["staging", "prod"]), None);
    let refused = validate_identity(&wide, None, &install, &[]);
    assert!(message(&refused).contains("[\"prod\"] are outside this installation's target namespaces"));
    let elsewhere = Installation { agent_namespaces: vec!["other".into()], ..install.clone() };
    let refused = validate_identity(&ok, None, &elsewhere, &[]);
    assert!(message(&refused).contains("not in \"agents\""), "{}", message(&refused));
    // Already outside (a narrower installation), narrowed by an update: allowed.
    let narrowed = request(
        "AgentIdentity",
        "UPDATE",
        "admin",
        &[],
        identity_json(&["staging"]),
        Some(identity_json(&["staging", "prod"])),
    );
    assert!(validate_identity(&narrowed, None, &elsewhere, &[]).allowed);
}

fn deployment_json(labels: Value, pod_spec: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "agents"},
        "spec": {"selector": {}, "template": {"metadata": {"labels": labels}, "spec": pod_spec}}
    })
}

fn workload_request(kind: &str, user: &str, object: Value) -> AdmissionRequest<DynamicObject> {
    let mut req = request(kind, "CREATE", user, &[], object, None);
    req.kind.group = if kind == "Pod" { String::new() } else { "apps".into() };
    req
}

#[test]
fn running_as_an_identity_needs_the_right_to_use_it() {
    let c = json!({"containers": [{"name": "c", "image": "i"}]});
    let d =
        workload_request("Deployment", "eve", deployment_json(json!({"agentid.dev/identity": "db-admin"}), c.clone()));
    let pod = pods::pod_of(&d).expect("a workload").expect("a template");
    assert_eq!(pods::identity_to_authorize(&d, &pod).as_deref(), Some("db-admin"));
    let refused = pods::validate(&d, false);
    assert!(!refused.allowed);
    assert!(message(&refused).contains("eve may not run pods as AgentIdentity \"db-admin\""), "{}", message(&refused));
    assert!(pods::validate(&d, true).allowed);

    // Pods made by the workload controllers were checked at their workload.
    let p = json!({"metadata": {"name": "p", "labels": {"agentid.dev/identity": "db-admin"}}, "spec": c});
    let by_controller = workload_request("Pod", "system:serviceaccount:kube-system:replicaset-controller", p.clone());
    let pod = pods::pod_of(&by_controller).expect("a pod").expect("parses");
    assert_eq!(pods::identity_to_authorize(&by_controller, &pod), None);
    let by_eve = workload_request("Pod", "eve", p);
    let pod = pods::pod_of(&by_eve).expect("a pod").expect("parses");
    assert_eq!(pods::identity_to_authorize(&by_eve, &pod).as_deref(), Some("db-admin"));
    // So were ReplicaSets made from Deployments (and Jobs from CronJobs) by their controllers;
    // the same ReplicaSet written by a user is checked.
    let rs = deployment_json(json!({"agentid.dev/identity": "db-admin"}), c);
    let by_deployments =
        workload_request("ReplicaSet", "system:serviceaccount:kube-system:deployment-controller", rs.clone());
    let pod = pods::pod_of(&by_deployments).expect("a workload").expect("a template");
    assert_eq!(pods::identity_to_authorize(&by_deployments, &pod), None);
    assert!(pods::validate(&by_deployments, false).allowed);
    let by_eve = workload_request("ReplicaSet", "eve", rs);
    assert!(!pods::validate(&by_eve, false).allowed);
    // Other kube-system accounts, a controller making another kind, and updates are checked.
    let rs = deployment_json(
        json!({"agentid.dev/identity": "db-admin"}),
        json!({"containers": [{"name": "c", "image": "i"}]}),
    );
    let by_addon = workload_request("Deployment", "system:serviceaccount:kube-system:some-addon", rs.clone());
    assert!(!pods::validate(&by_addon, false).allowed);
    let wrong_kind =
        workload_request("Deployment", "system:serviceaccount:kube-system:deployment-controller", rs.clone());
    assert!(!pods::validate(&wrong_kind, false).allowed);
    let mut update = workload_request("ReplicaSet", "system:serviceaccount:kube-system:deployment-controller", rs);
    update.operation = kube::core::admission::Operation::Update;
    assert!(!pods::validate(&update, false).allowed);
    // A ServiceAccount elsewhere named like a controller is not one.
    let impostor = workload_request(
        "Pod",
        "system:serviceaccount:agents:deployment-controller",
        json!({"metadata": {"name": "p", "labels": {"agentid.dev/identity": "db-admin"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
    );
    assert!(!pods::validate(&impostor, false).allowed);
}

#[test]
fn workload_templates_cannot_borrow_either() {
    let d = workload_request(
        "Deployment",
        "eve",
        deployment_json(
            json!({}),
            json!({"serviceAccountName": "agentid-grant-rm-1", "containers": [{"name": "c", "image": "i"}]}),
        ),
    );
    let refused = pods::validate(&d, true);
    assert!(!refused.allowed && message(&refused).contains("belongs to an AccessGrant"), "{}", message(&refused));
    let other = request("ConfigMap", "CREATE", "eve", &[], json!({"metadata": {"name": "x"}}), None);
    assert!(pods::pod_of(&other).is_none());
}

#[test]
fn random_reviews_never_panic_and_every_refusal_says_why() {
    use crate::policy::fuzz::Gen;
    let mut g = Gen::new(0x5eed_0002);
    let install = Installation { agent_namespaces: vec!["agents".into()], target_namespaces: vec!["staging".into()] };
    let (mut refused, mut allowed) = (0, 0);
    let mut check = |response: AdmissionResponse, what: &str| {
        if response.allowed {
            allowed += 1;
        } else {
            refused += 1;
            assert!(!message(&response).trim().is_empty(), "{what}: refused without a message");
        }
    };
    for round in 0..2000 {
        let user = g.pick(&["alice", "bob", "system:serviceaccount:agents:agentid-x", ""]);
        let op = g.pick(&["CREATE", "UPDATE", "DELETE"]);
        let old = |g: &mut Gen, v: Value| if op == "UPDATE" && !g.one_in(5) { Some(v) } else { None };
        let grant = g.grant();
        let old_grant = g.grant();
        let req = request("AccessGrant", op, user, &[], grant, old(&mut g, old_grant));
        check(validate_grant(&req), &format!("round {round}: grant"));
        check(mutate(&req), &format!("round {round}: grant mutation"));

        let identity = g.identity();
        let old_identity = g.identity();
        let req = request("AgentIdentity", op, user, &[], identity, old(&mut g, old_identity));
        let refused_ns = if g.one_in(3) { vec!["staging".to_string()] } else { vec![] };
        check(
            validate_identity(&req, Some("agentid-system"), &install, &refused_ns),
            &format!("round {round}: identity"),
        );

        let approval = g.approval();
        let req = request("Approval", "CREATE", user, &["sre-leads"], approval, None);
        let facts = ApprovalFacts {
            grant: serde_json::from_value(g.grant()).ok(),
            identity: serde_json::from_value(g.identity()).ok(),
            may_approve: g.one_in(2),
        };
        check(validate_approval(&req, &facts), &format!("round {round}: approval"));
        check(mutate(&req), &format!("round {round}: approval mutation"));

        let (kind, workload) = g.workload();
        let req = request(&kind, op, user, &[], workload, None);
        check(pods::mutate(&req, g.one_in(2)), &format!("round {round}: {kind} mutation"));
        check(pods::validate(&req, g.one_in(2)), &format!("round {round}: {kind} validation"));
    }
    // Both answers occur often: the generator reaches the checks' decisions, not only parse errors.
    assert!(refused > 1000 && allowed > 1000, "refused {refused}, allowed {allowed}");
}
