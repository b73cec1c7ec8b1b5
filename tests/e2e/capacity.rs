//! The cap on grants one identity holds at once (`--max-active-grants-per-identity`): all of an
//! identity's credentials share its one Secret, which the apiserver caps at 1 MiB. Grants past the
//! cap are Rejected with their own reason — also when they all arrive at once, before any is
//! issued — and a slot opens again when a grant ends. Runs its own control plane and operator
//! (the cap is a flag of the operator).

use agentid::api::{AccessGrant, GrantPhase};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, ResourceExt, api::DeleteParams};

use crate::fixtures::*;

#[tokio::test]
async fn grants_past_the_cap_are_rejected_even_when_they_arrive_together() -> anyhow::Result<()> {
    let own = OwnOperator::start("capacity", &[("AGENTID_MAX_ACTIVE_GRANTS_PER_IDENTITY", "3")], "cap").await?;
    let admin = own.admin.clone();
    let (a, t) = (own.agents.name.as_str(), own.target.name.as_str());

    // Six at once: the operator reconciles them concurrently, and none is issued in any cache
    // when the others are decided.
    let reader = || vec![rule(t, "", &["configmaps"], &["get"], &["settings"])];
    let grants: Vec<AccessGrant> = (0..6).map(|i| grant(&format!("g{i}"), "busy", "30m", reader())).collect();
    futures::future::try_join_all(grants.iter().map(|g| create(&admin, a, g))).await?;
    let api: Api<AccessGrant> = Api::namespaced(admin.clone(), a);
    let settled = crate::harness::poll_until(std::time::Duration::from_secs(60), "all six grants to settle", || {
        let api = api.clone();
        async move {
            let list = api.list(&Default::default()).await?.items;
            let done = list.iter().all(|g| {
                matches!(g.status.as_ref().and_then(|s| s.phase), Some(GrantPhase::Active | GrantPhase::Rejected))
            });
            Ok((done && list.len() == 6).then_some(list))
        }
    })
    .await?;
    let phase = |p| settled.iter().filter(|g| g.status.as_ref().and_then(|s| s.phase) == Some(p)).count();
    assert_eq!((phase(GrantPhase::Active), phase(GrantPhase::Rejected)), (3, 3), "{settled:#?}");
    for g in settled.iter().filter(|g| g.status.as_ref().and_then(|s| s.phase) == Some(GrantPhase::Rejected)) {
        let (reason, message) = ready_reason(g);
        assert_eq!(reason, "TooManyActiveGrants");
        assert!(message.contains("--max-active-grants-per-identity=3"), "{message}");
        // Rejected grants hold nothing: no ServiceAccount, no Secret, no entries.
        assert!(grant_objects(&admin, &g.uid().unwrap_or_default(), &[a, t]).await?.is_empty());
    }
    let keys = identity_secret_keys(&admin, a, "busy").await?;
    assert_eq!(keys.len(), 3 * 5, "three grants' entries in the identity's Secret: {keys:?}");

    // Each active grant's credential works; when one ends, there is room for one more.
    let active: Vec<&AccessGrant> =
        settled.iter().filter(|g| g.status.as_ref().and_then(|s| s.phase) == Some(GrantPhase::Active)).collect();
    for g in &active {
        Api::<ConfigMap>::namespaced(agent_client(&admin, g).await?, t).get("settings").await?;
    }
    api.delete(&active[0].name_any(), &DeleteParams::default()).await?;
    wait_grant_gone(&admin, a, &active[0].name_any()).await?;
    create(&admin, a, &grant("later", "busy", "30m", reader())).await?;
    wait_phase(&admin, a, "later", GrantPhase::Active).await?;
    create(&admin, a, &grant("one-too-many", "busy", "30m", reader())).await?;
    let refused = wait_phase(&admin, a, "one-too-many", GrantPhase::Rejected).await?;
    assert_eq!(ready_reason(&refused).0, "TooManyActiveGrants");
    Ok(())
}
