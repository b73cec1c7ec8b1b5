//! A flood of grants larger than the controller's room: the operator hands its controller only
//! as many grants as its workers can start soon (twice `--grant-workers`), the rest wait in its
//! own backlog (`agentid_grants_waiting`). Every grant must still be issued — none lost while it
//! waited — and the backlog must drain to nothing. Runs its own control plane and operator (the
//! worker count is a flag of the operator).

use std::time::{Duration, Instant};

use agentid::api::{AccessGrant, GrantPhase};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, ResourceExt};

use crate::fixtures::*;

#[tokio::test]
async fn a_flood_past_the_workers_room_is_issued_whole_and_the_backlog_drains() -> anyhow::Result<()> {
    const GRANTS: usize = 60;
    // One worker: room for two grants handed on and not started.
    let own = OwnOperator::start("backlog", &[("AGENTID_GRANT_WORKERS", "1")], "flood").await?;
    let (admin, operator) = (own.admin.clone(), &own.operator);
    let (a, t) = (own.agents.name.as_str(), own.target.name.as_str());
    assert_eq!(gauge(&operator.metrics()?, "agentid_grants_waiting"), Some(0.0), "nothing waits before");

    let reader = || vec![rule(t, "", &["configmaps"], &["get"], &["settings"])];
    let flood = futures::stream::iter(0..GRANTS)
        .map(|i| {
            let admin = admin.clone();
            let g = grant(&format!("g{i}"), "busy", "30m", reader());
            async move { create(&admin, a, &g).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>();
    let api: Api<AccessGrant> = Api::namespaced(admin.clone(), a);
    // While the flood arrives and is worked off: the most that waited, until every grant is Active.
    let watch = async {
        let (mut most, started) = (0.0f64, Instant::now());
        loop {
            most = most.max(gauge(&operator.metrics()?, "agentid_grants_waiting").unwrap_or(0.0));
            let list = api.list(&Default::default()).await?.items;
            let active =
                list.iter().filter(|g| g.status.as_ref().and_then(|s| s.phase) == Some(GrantPhase::Active)).count();
            if active == GRANTS {
                return anyhow::Ok((most, list));
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(180), "{active} of {GRANTS} grants active");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (created, watched) = futures::future::join(flood, watch).await;
    created?;
    let (most, grants) = watched?;
    assert!(most > 0.0, "a flood of {GRANTS} for one worker waited in the backlog");
    // Drained: nothing waits once all are issued.
    let waiting = crate::harness::poll_until(Duration::from_secs(10), "the backlog to drain", || async {
        Ok((gauge(&operator.metrics()?, "agentid_grants_waiting") == Some(0.0)).then_some(()))
    })
    .await;
    assert!(waiting.is_ok(), "{}", operator.metrics()?);
    // Every grant's entries in the identity's Secret, and the credentials act as the agent: the
    // first and the last created.
    let keys = identity_secret_keys(&admin, a, "busy").await?;
    assert_eq!(keys.len(), GRANTS * 5, "each grant's entries in the identity's Secret");
    for name in ["g0", &format!("g{}", GRANTS - 1)] {
        let g = grants.iter().find(|g| g.name_any() == name).expect("listed");
        Api::<ConfigMap>::namespaced(agent_client(&admin, g).await?, t).get("settings").await?;
    }
    Ok(())
}
