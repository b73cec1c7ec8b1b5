//! Leader election: two replicas, one leader. Killing the leader hands over within the Lease's
//! duration; a graceful stop hands over at once; no grant is issued twice. Prints the measured
//! handover times (run with --nocapture to see them; docs/reliability.md records them).

use std::time::{Duration, Instant};

use agentid::api::GrantPhase;
use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, api::ListParams};

use crate::{
    fixtures::*,
    harness::{Operator, PrivateCluster, poll_until},
};

fn replica(pc: &PrivateCluster, name: &str) -> anyhow::Result<Operator> {
    Operator::start_as(
        &pc.dir,
        pc.dir.join("admin.kubeconfig"),
        &[("POD_NAMESPACE", "agentid-system"), ("POD_NAME", name)],
        &["--leader-election"],
    )
}

async fn holder(admin: &Client) -> anyhow::Result<Option<String>> {
    let lease = Api::<Lease>::namespaced(admin.clone(), "agentid-system").get_opt("agentid-leader").await?;
    Ok(lease.and_then(|l| l.spec).and_then(|s| s.holder_identity).filter(|h| !h.is_empty()))
}

/// Waits until `op` reports `agentid_leader` as `value`. A scrape can fail on a loaded machine
/// (the harness reads with a 5 s timeout): one failed scrape is not a wrong value.
async fn wait_leader_metric(op: &Operator, value: u8) -> anyhow::Result<()> {
    let want = format!("agentid_leader {value}");
    poll_until(Duration::from_secs(20), &format!("the metric {want}"), || {
        let seen =
            op.metrics().ok().and_then(|m| m.lines().find(|l| l.starts_with("agentid_leader ")).map(str::to_string));
        let want = want.clone();
        async move { Ok((seen.as_deref() == Some(want.as_str())).then_some(())) }
    })
    .await
}

fn issued_lines(logs: &[String], grant: &str) -> usize {
    let needle = format!("\"grant\":\"{grant}\"");
    logs.iter()
        .flat_map(|l| l.lines())
        .filter(|l| l.contains("\"transition\":\"issued\"") && l.contains(&needle))
        .count()
}

/// Creates a routine grant and returns how long it took to become Active.
async fn issue(admin: &Client, name: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    create(admin, "agents", &grant(name, "worker", "10m", vec![rule("staging", "", &["configmaps"], &["get"], &[])]))
        .await?;
    wait_phase(admin, "agents", name, GrantPhase::Active).await?;
    Ok(started.elapsed())
}

#[tokio::test]
async fn the_leader_hands_over_on_kill_and_on_shutdown_and_nothing_is_issued_twice() -> anyhow::Result<()> {
    let pc = PrivateCluster::start("failover").await?;
    let admin = pc.admin().await?;
    create_namespaces(&admin, &["agentid-system", "agents", "staging"]).await?;
    let a = replica(&pc, "replica-a")?;
    poll_until(Duration::from_secs(30), "replica-a leads", || {
        let admin = admin.clone();
        async move { Ok(holder(&admin).await?.filter(|h| h == "replica-a")) }
    })
    .await
    .with_context(|| a.log())?;
    let b = replica(&pc, "replica-b")?;
    b.wait_ready().await.with_context(|| b.log())?;
    // Both serve; one leads.
    create(&admin, "agents", &identity("worker", &["staging"])).await?;
    wait_identity_ready(&admin, "agents", "worker").await?;
    issue(&admin, "before").await?;
    wait_leader_metric(&a, 1).await?;
    wait_leader_metric(&b, 0).await?;
    assert_eq!(holder(&admin).await?.as_deref(), Some("replica-a"));
    assert!(!b.log().contains("\"transition\":\"issued\""), "the follower wrote:\n{}", b.log());

    // SIGKILL the leader: the follower takes over when the Lease runs out.
    a.kill();
    let killed = Instant::now();
    let after_kill = issue(&admin, "after-kill").await.with_context(|| b.log())?;
    let kill_handover = killed.elapsed();
    assert_eq!(holder(&admin).await?.as_deref(), Some("replica-b"));
    assert!(kill_handover < Duration::from_secs(30), "handover after SIGKILL took {kill_handover:?}");

    // Restart the old leader as a follower, then stop the leader gracefully: it releases the Lease.
    a.restart(&[("POD_NAMESPACE", "agentid-system"), ("POD_NAME", "replica-a")])?;
    a.wait_ready().await?;
    b.terminate();
    let stopped = Instant::now();
    let after_stop = issue(&admin, "after-stop").await.with_context(|| a.log())?;
    let graceful_handover = stopped.elapsed();
    assert_eq!(holder(&admin).await?.as_deref(), Some("replica-a"));
    assert!(b.log().contains("released the leader Lease"), "{}", b.log());

    // Every grant was issued exactly once, by one replica, with one ServiceAccount. The audit line
    // follows the status write that made the grant Active, so wait for the leader to print it.
    a.wait_log_line("the leader's audit line for after-stop", |l| issued_lines(&[l.to_string()], "after-stop") > 0)
        .await?;
    let logs = [a.log(), b.log()];
    for g in ["before", "after-kill", "after-stop"] {
        assert_eq!(issued_lines(&logs, g), 1, "{g} issued {} times", issued_lines(&logs, g));
    }
    let accounts = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), "agents")
        .list(&ListParams::default().labels("agentid.dev/component=grant"))
        .await?;
    assert_eq!(accounts.items.len(), 3);
    println!(
        "failover: SIGKILL → new leader's first issuance {:.1}s (grant created right after the kill: {:.1}s); graceful stop → {:.1}s (grant {:.1}s)",
        kill_handover.as_secs_f64(),
        after_kill.as_secs_f64(),
        graceful_handover.as_secs_f64(),
        after_stop.as_secs_f64()
    );
    a.kill();
    Ok(())
}
