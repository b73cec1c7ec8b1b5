//! Crash safety: the operator dies between any two issuance steps, or while revoking, or stays
//! down past a grant's end — and after a restart there is exactly one set of objects, nothing
//! orphaned, and nothing outlives its grant. Each test runs its own control plane and operator.

use std::time::Duration;

use anyhow::Context as _;

use agentid::api::{AccessGrant, GrantPhase};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, PostParams},
};
use serde_json::json;

use crate::{
    fixtures::*,
    harness::{Operator, PrivateCluster, TestNamespace, poll_until},
};

/// Every crash point on the way to an issued credential, in order.
const ISSUE_STEPS: &[&str] = &[
    "issue:after-service-account",
    "issue:after-roles",
    "issue:after-role-bindings",
    "issue:after-secret",
    "issue:after-token",
    "issue:after-grant-secret",
];

async fn namespaces(admin: &Client, prefix: &str) -> anyhow::Result<(TestNamespace, TestNamespace)> {
    let agents = TestNamespace::new(admin, &format!("{prefix}-a")).await?;
    let target = TestNamespace::new(admin, &format!("{prefix}-t")).await?;
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "settings"}, "data": {"k": "v"}}))?;
    Api::<ConfigMap>::namespaced(admin.clone(), &target.name).create(&PostParams::default(), &cm).await?;
    create(admin, &agents.name, &identity("fixer", &[&target.name])).await?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), &agents.name);
    poll_until(Duration::from_secs(30), "the identity's credentials Secret", || {
        let secrets = secrets.clone();
        async move { Ok(secrets.get_metadata_opt("agentid-fixer-credentials").await?) }
    })
    .await?;
    Ok((agents, target))
}

#[tokio::test]
async fn a_crash_between_any_two_issuance_steps_leaves_exactly_one_working_set() -> anyhow::Result<()> {
    let cluster = PrivateCluster::start("crash-issue").await?;
    let admin = cluster.admin().await?;
    let operator = Operator::start(&cluster.dir, &[])?;
    operator.wait_ready().await?;
    let (agents, target) = namespaces(&admin, "crash").await?;
    let (a, t) = (agents.name.as_str(), target.name.as_str());

    for (i, step) in ISSUE_STEPS.iter().enumerate() {
        operator.restart(&[("AGENTID_FAILPOINT", step)])?;
        operator.wait_ready().await?;
        let name = format!("g{i}");
        create(&admin, a, &grant(&name, "fixer", "30m", vec![rule(t, "", &["configmaps"], &["get"], &["settings"])]))
            .await?;
        assert!(
            operator.wait_exit(Duration::from_secs(30)).await,
            "the operator did not reach {step}:\n{}",
            operator.log()
        );

        operator.restart(&[])?;
        operator.wait_ready().await?;
        let g = wait_phase(&admin, a, &name, GrantPhase::Active).await?;
        let object = g.status.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_default();
        assert_eq!(
            grant_objects(&admin, &g.uid().unwrap_or_default(), &[a, t]).await?,
            vec![
                format!("Role/{t}/{object}"),
                format!("RoleBinding/{t}/{object}"),
                format!("Secret/{a}/{object}"),
                format!("ServiceAccount/{a}/{object}"),
            ],
            "after a crash at {step}"
        );
        let agent = agent_client(&admin, &g).await?;
        Api::<ConfigMap>::namespaced(agent, t).get("settings").await?;
        let keys = identity_secret_keys(&admin, a, "fixer").await?;
        assert_eq!(
            keys.iter().filter(|k| k.starts_with(&format!("{name}."))).count(),
            5,
            "after a crash at {step}: {keys:?}"
        );
    }

    // Until its status write, an issuance is recorded on its ServiceAccount alone. Whoever can
    // edit that ServiceAccount while the operator is down cannot push the end out: the record
    // counts only up to the ServiceAccount's making plus the grant's duration. Pushed by a few
    // seconds only, and the operator down longer than that: once the ServiceAccount is deleted,
    // the pushed end would fit the grant's duration from then, so the revocation must not leave
    // the grant looking like an issuance to resume.
    operator.restart(&[("AGENTID_FAILPOINT", "issue:after-grant-secret")])?;
    operator.wait_ready().await?;
    let pushed = create(
        &admin,
        a,
        &grant("pushed", "fixer", "30m", vec![rule(t, "", &["configmaps"], &["get"], &["settings"])]),
    )
    .await?;
    assert!(
        operator.wait_exit(Duration::from_secs(30)).await,
        "no crash after the grant's Secret:\n{}",
        operator.log()
    );
    let live = Api::<AccessGrant>::namespaced(admin.clone(), a).get("pushed").await?;
    assert!(
        live.status.as_ref().and_then(|s| s.expires_at.as_ref()).is_none(),
        "status records the issuance before it is done: {:?}",
        live.status
    );
    let object = agentid::policy::names::grant_object_name("pushed", &pushed.uid().unwrap_or_default());
    let sas = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), a);
    let recorded = sas.get(&object).await?.annotations().get("agentid.dev/expires-at").cloned().unwrap_or_default();
    let recorded: jiff::Timestamp = recorded.parse()?;
    let later = (recorded + jiff::SignedDuration::from_secs(5)).to_string();
    sas.patch(
        &object,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"metadata": {"annotations": {"agentid.dev/expires-at": later}}})),
    )
    .await?;
    let as_agent: Api<ConfigMap> = {
        let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), a).get(&object).await?;
        Api::namespaced(kubeconfig_client(&secret, "kubeconfig").await?, t)
    };
    as_agent.get("settings").await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    operator.restart(&[])?;
    operator.wait_ready().await?;
    let revoked = wait_phase(&admin, a, "pushed", GrantPhase::Revoked).await?;
    assert_eq!(ready_reason(&revoked).0, "InvalidExpiry");
    assert_eq!(grant_objects(&admin, &pushed.uid().unwrap_or_default(), &[a, t]).await?, Vec::<String>::new());
    wait_rejected("the pushed-out credential to be refused", Duration::from_secs(10), || as_agent.get("settings"))
        .await?;
    assert!(!identity_secret_keys(&admin, a, "fixer").await?.iter().any(|k| k.starts_with("pushed.")));
    // And it stays over: nothing is issued again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(grant_objects(&admin, &pushed.uid().unwrap_or_default(), &[a, t]).await?, Vec::<String>::new());
    let after = Api::<AccessGrant>::namespaced(admin.clone(), a).get("pushed").await?;
    assert_eq!(after.status.as_ref().and_then(|s| s.phase), Some(GrantPhase::Revoked));

    // A crash in the middle of revoking: the restarted operator finishes the job.
    operator.restart(&[("AGENTID_FAILPOINT", "revoke:after-service-account")])?;
    operator.wait_ready().await?;
    let g0 = Api::<AccessGrant>::namespaced(admin.clone(), a).get("g0").await?;
    Api::<AccessGrant>::namespaced(admin.clone(), a).delete("g0", &DeleteParams::default()).await?;
    assert!(
        operator.wait_exit(Duration::from_secs(30)).await,
        "the operator did not reach revoke:after-service-account"
    );
    operator.restart(&[])?;
    operator.wait_ready().await?;
    wait_grant_gone(&admin, a, "g0").await?;
    assert_eq!(grant_objects(&admin, &g0.uid().unwrap_or_default(), &[a, t]).await?, Vec::<String>::new());
    assert!(!identity_secret_keys(&admin, a, "fixer").await?.iter().any(|k| k.starts_with("g0.")));
    Ok(())
}

#[tokio::test]
async fn a_grant_that_ends_while_the_operator_is_down_is_revoked_right_after_restart() -> anyhow::Result<()> {
    let cluster = PrivateCluster::start("crash-overdue").await?;
    let admin = cluster.admin().await?;
    let operator = Operator::start(&cluster.dir, &[])?;
    operator.wait_ready().await?;
    let (agents, target) = namespaces(&admin, "overdue").await?;
    let (a, t) = (agents.name.as_str(), target.name.as_str());

    create(&admin, a, &grant("brief", "fixer", "10s", vec![rule(t, "", &["configmaps"], &["get"], &["settings"])]))
        .await?;
    let g = wait_phase(&admin, a, "brief", GrantPhase::Active).await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(agent_client(&admin, &g).await?, t);
    config_maps.get("settings").await?;
    let expires_at = g.status.as_ref().and_then(|s| s.expires_at.clone()).map(|t| t.0).expect("expiresAt");

    operator.kill();
    poll_until(Duration::from_secs(30), "the grant's end to pass", || async move {
        Ok((jiff::Timestamp::now() > expires_at + jiff::SignedDuration::from_secs(2)).then_some(()))
    })
    .await?;
    // With the operator down, only the token's own expiry (600 s minimum) would end it: this is
    // the window DESIGN.md accepts, and why the restart must revoke before anything else.
    config_maps.get("settings").await?;

    let restarted = jiff::Timestamp::now();
    operator.restart(&[])?;
    let rejected =
        wait_rejected("the overdue credential to be refused", Duration::from_secs(30), || config_maps.get("settings"))
            .await?;
    let after_restart = rejected.duration_since(restarted);
    println!("overdue grant refused {} ms after the operator restarted", after_restart.as_millis());
    assert!(after_restart.as_secs_f64() < 10.0, "took {after_restart:?}");
    let g = wait_phase(&admin, a, "brief", GrantPhase::Expired).await?;
    assert_eq!(grant_objects(&admin, &g.uid().unwrap_or_default(), &[a, t]).await?, Vec::<String>::new());
    Ok(())
}

#[tokio::test]
async fn an_interrupted_issuance_past_its_end_is_revoked_before_the_restarted_operator_is_ready() -> anyhow::Result<()>
{
    let cluster = PrivateCluster::start("crash-interrupted").await?;
    let admin = cluster.admin().await?;
    let operator = Operator::start(&cluster.dir, &[("AGENTID_FAILPOINT", "issue:after-grant-secret")])?;
    operator.wait_ready().await?;
    let (agents, target) = namespaces(&admin, "interrupted").await?;
    let (a, t) = (agents.name.as_str(), target.name.as_str());

    // The token is minted and in the grant's Secret, but status never said so: the operator died.
    let g =
        create(&admin, a, &grant("brief", "fixer", "10s", vec![rule(t, "", &["configmaps"], &["get"], &["settings"])]))
            .await?;
    assert!(
        operator.wait_exit(Duration::from_secs(30)).await,
        "no crash after the grant's Secret:\n{}",
        operator.log()
    );
    let object = agentid::policy::names::grant_object_name("brief", &g.uid().unwrap_or_default());
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), a).get(&object).await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(kubeconfig_client(&secret, "kubeconfig").await?, t);
    config_maps.get("settings").await?;
    let recorded: jiff::Timestamp = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), a)
        .get(&object)
        .await?
        .annotations()
        .get("agentid.dev/expires-at")
        .context("the ServiceAccount records the end")?
        .parse()?;
    poll_until(Duration::from_secs(30), "the recorded end to pass", || async move {
        Ok((jiff::Timestamp::now() > recorded + jiff::SignedDuration::from_secs(2)).then_some(()))
    })
    .await?;

    operator.restart(&[])?;
    operator.wait_ready().await?;
    // Ready means the start-up sweep is done: the credential is dead by then.
    let refused = config_maps.get("settings").await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 401),
        "the overdue credential still works once the operator is ready: {refused:?}"
    );
    let g = wait_phase(&admin, a, "brief", GrantPhase::Expired).await?;
    assert_eq!(g.status.as_ref().and_then(|s| s.expires_at.as_ref()).map(|t| t.0), Some(recorded));
    assert_eq!(grant_objects(&admin, &g.uid().unwrap_or_default(), &[a, t]).await?, Vec::<String>::new());
    Ok(())
}

#[tokio::test]
async fn with_the_webhook_down_no_grant_approval_or_agent_pod_can_be_created() -> anyhow::Result<()> {
    let cluster = PrivateCluster::start("webhook-down").await?;
    let admin = cluster.admin().await?;
    let system = TestNamespace::new(&admin, "agentid-system").await?;
    let cert_secret = format!("{}/agentid-webhook-cert", system.name);
    let env = [("AGENTID_WEBHOOK_CERT_SECRET", cert_secret.as_str())];
    let operator = Operator::start(&cluster.dir, &env)?;
    operator.wait_ready().await?;
    // The certificate is kept in the named Secret, and its CA is what the apiserver trusts.
    let stored = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), &system.name)
        .get("agentid-webhook-cert")
        .await?;
    let stored_ca = stored.data.as_ref().and_then(|d| d.get("ca.crt")).map(|b| b.0.clone()).expect("ca.crt");
    assert!(stored.data.as_ref().is_some_and(|d| d.contains_key("tls.key") && d.contains_key("tls.crt")));
    let ca_bundle = || async {
        let config =
            Api::<k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration>::all(admin.clone())
                .get("agentid")
                .await?;
        anyhow::Ok(
            config.webhooks.unwrap_or_default()[0].client_config.ca_bundle.clone().map(|b| b.0).unwrap_or_default(),
        )
    };
    assert_eq!(ca_bundle().await?, stored_ca);
    let (agents, target) = namespaces(&admin, "down").await?;
    let (a, t) = (agents.name.as_str(), target.name.as_str());
    let held =
        create(&admin, a, &grant("held", "fixer", "5m", vec![rule(t, "", &["configmaps"], &["delete"], &[])])).await?;

    operator.kill();
    let g = Api::<AccessGrant>::namespaced(admin.clone(), a)
        .create(
            &PostParams::default(),
            &grant("while-down", "fixer", "5m", vec![rule(t, "", &["configmaps"], &["get"], &[])]),
        )
        .await;
    assert!(refused_by_dead_webhook(&g), "a grant was admitted without agentid's admission: {g:?}");
    let r = Api::<agentid::api::Approval>::namespaced(admin.clone(), a)
        .create(&PostParams::default(), &approval("while-down", &held, "admin", agentid::api::Decision::Approve, "x"))
        .await;
    assert!(refused_by_dead_webhook(&r), "an Approval was admitted without agentid's admission: {r:?}");
    let labelled: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "agent", "labels": {"agentid.dev/identity": "fixer"}},
        "spec": {"containers": [{"name": "c", "image": "agent:1"}]}
    }))?;
    let p = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(admin.clone(), a)
        .create(&PostParams::default(), &labelled)
        .await;
    assert!(refused_by_dead_webhook(&p), "a labelled pod was admitted without agentid's admission: {p:?}");

    operator.restart(&env)?;
    operator.wait_ready().await?;
    // A restart reuses the stored certificate: the apiserver's trust does not change.
    assert_eq!(ca_bundle().await?, stored_ca);
    poll_until(Duration::from_secs(30), "grants to be admitted again", || {
        let api = Api::<AccessGrant>::namespaced(admin.clone(), a);
        let g = grant("after", "fixer", "5m", vec![rule(t, "", &["configmaps"], &["get"], &[])]);
        async move { Ok(api.create(&PostParams::default(), &g).await.ok().map(|_| ())) }
    })
    .await
}

fn refused_by_dead_webhook<T>(result: &kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(s)) if s.message.contains("failed calling webhook"))
}
