//! The chaos program (DESIGN.md I3, I4, I6 under faults): churn grants through every path —
//! issue, use, expire, delete, approve, deny, suspend, reject — while the operator is SIGKILLed at
//! random intervals and the apiserver is restarted once; then audit.
//!
//! Outside the quick suite (`#[ignore]`); `tests/run` runs a short version, `tests/chaos` a long
//! one. Knobs: `AGENTID_CHAOS_GRANTS` (default 24), `AGENTID_CHAOS_CONCURRENCY` (4),
//! `AGENTID_CHAOS_SEED` (random; printed). Writes `target/chaos-report.json`.
//!
//! The audit fails the test on: a grant in a terminal phase whose credential still
//! authenticates; a ServiceAccount, Role, RoleBinding or Secret of a grant left behind; a grant
//! issued twice. It reports the largest revocation lag seen (expiresAt or deletion → first
//! rejected request).

use std::{
    collections::HashMap,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use agentid::api::{AccessGrant, AgentIdentity, Approval, Decision, GrantPhase};
use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, ServiceAccount};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::Kubeconfig,
};
use serde_json::json;

use crate::{
    fixtures::*,
    harness::{Operator, PrivateCluster, client_from, poll_until, repo_root},
};

const NS: &str = "agents";
const TARGET: &str = "staging";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Rng(Mutex<u64>);

impl Rng {
    fn next(&self, below: u64) -> u64 {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s % below.max(1)
    }
}

#[derive(Default)]
struct Findings {
    /// Revocation lags (seconds) measured from expiresAt or deletion to the first rejection.
    lags: Vec<f64>,
    /// Paths completed, by name.
    paths: HashMap<&'static str, u32>,
    /// Credentials captured while Active, checked again at the end.
    credentials: Vec<(String, Kubeconfig)>,
}

struct Chaos {
    admin: Client,
    findings: Mutex<Findings>,
}

/// Retries `f` until it succeeds (the webhook fails closed while the operator is down; the
/// apiserver is away while it restarts).
async fn retry<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kube::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(kube::Error::Api(s)) if s.code == 409 => anyhow::bail!("{what}: already exists"),
            Err(e) if Instant::now() > deadline => return Err(e).context(what.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

async fn wait_for_phase(admin: &Client, name: &str, phases: &[GrantPhase]) -> anyhow::Result<AccessGrant> {
    let api: Api<AccessGrant> = Api::namespaced(admin.clone(), NS);
    poll_until(Duration::from_secs(150), &format!("grant {name} to reach {phases:?}"), || {
        let api = api.clone();
        async move {
            let g = api.get(name).await?;
            let phase = g.status.as_ref().and_then(|s| s.phase);
            Ok(phase.filter(|p| phases.contains(p)).map(|_| g))
        }
    })
    .await
}

/// Whether this credential no longer authenticates (401). A 403 is not enough: a valid
/// credential gets 403 for what its grant does not allow.
async fn rejected(kubeconfig: &Kubeconfig) -> bool {
    let Ok(client) = client_from(kubeconfig.clone()).await else { return false };
    match Api::<ConfigMap>::namespaced(client, TARGET).list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => s.code == 401,
        // Answered (allowed or forbidden: authenticated), or the apiserver is away.
        _ => false,
    }
}

impl Chaos {
    async fn create_grant(&self, grant: &AccessGrant) -> anyhow::Result<()> {
        let api: Api<AccessGrant> = Api::namespaced(self.admin.clone(), NS);
        let pp = PostParams::default();
        match retry("creating a grant", || api.create(&pp, grant)).await {
            Ok(_) => Ok(()),
            // A create that timed out may still have landed.
            Err(e) if e.to_string().contains("already exists") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads the credential of an Active grant and checks it works.
    async fn capture(&self, g: &AccessGrant) -> anyhow::Result<Kubeconfig> {
        let secret_name = g.status.as_ref().and_then(|s| s.credentials_secret.clone()).context("credentialsSecret")?;
        let secrets: Api<Secret> = Api::namespaced(self.admin.clone(), NS);
        let secret = retry("reading the grant Secret", || secrets.get(&secret_name)).await?;
        let data = secret.data.and_then(|d| d.get("kubeconfig").cloned()).context("kubeconfig")?;
        let kubeconfig = Kubeconfig::from_yaml(std::str::from_utf8(&data.0)?)?;
        self.findings.lock().unwrap_or_else(|e| e.into_inner()).credentials.push((g.name_any(), kubeconfig.clone()));
        Ok(kubeconfig)
    }

    /// Polls until the credential is refused; returns the seconds since `since`.
    async fn lag_until_rejected(&self, kubeconfig: &Kubeconfig, since: jiff::Timestamp) -> anyhow::Result<f64> {
        poll_until(Duration::from_secs(150), "the credential to be refused", || async {
            Ok(rejected(kubeconfig).await.then_some(()))
        })
        .await?;
        let lag = (jiff::Timestamp::now() - since).get_milliseconds() as f64 / 1000.0;
        self.findings.lock().unwrap_or_else(|e| e.into_inner()).lags.push(lag.max(0.0));
        Ok(lag)
    }

    fn done(&self, path: &'static str) {
        *self.findings.lock().unwrap_or_else(|e| e.into_inner()).paths.entry(path).or_default() += 1;
    }

    fn read_grant(name: &str, duration: &str) -> AccessGrant {
        grant(name, "churn", duration, vec![rule(TARGET, "", &["configmaps"], &["get", "list"], &[])])
    }

    fn delete_grant(name: &str) -> AccessGrant {
        grant(name, "churn", "20s", vec![rule(TARGET, "", &["persistentvolumeclaims"], &["get", "delete"], &["vol"])])
    }

    async fn decide(&self, alice: &Client, g: &AccessGrant, decision: Decision) -> anyhow::Result<()> {
        let api: Api<Approval> = Api::namespaced(alice.clone(), NS);
        let name = format!("{}-{}", g.name_any(), if decision == Decision::Approve { "ok" } else { "no" });
        let record = approval(&name, g, "alice", decision, "chaos");
        let pp = PostParams::default();
        match retry("deciding", || api.create(&pp, &record)).await {
            Err(e) if !e.to_string().contains("already exists") => Err(e),
            _ => Ok(()),
        }
    }

    async fn path(&self, i: u64, kind: u64, alice: &Client) -> anyhow::Result<()> {
        let name = format!("g{i}");
        match kind {
            // Issue, use, expire.
            0 => {
                self.create_grant(&Self::read_grant(&name, "15s")).await?;
                let g = wait_for_phase(&self.admin, &name, &[GrantPhase::Active]).await?;
                let cred = self.capture(&g).await?;
                // The agent uses it: exactly what was granted works.
                let agent = client_from(cred.clone()).await?;
                let configmaps: Api<ConfigMap> = Api::namespaced(agent, TARGET);
                let lp = ListParams::default();
                retry("using the credential", || configmaps.list(&lp)).await?;
                let end = g.status.and_then(|s| s.expires_at).context("expiresAt")?.0;
                self.lag_until_rejected(&cred, end).await?;
                wait_for_phase(&self.admin, &name, &[GrantPhase::Expired]).await?;
                self.done("issue-use-expire");
            }
            // Issue, then delete early.
            1 => {
                self.create_grant(&Self::read_grant(&name, "10m")).await?;
                let g = wait_for_phase(&self.admin, &name, &[GrantPhase::Active]).await?;
                let cred = self.capture(&g).await?;
                let api: Api<AccessGrant> = Api::namespaced(self.admin.clone(), NS);
                let deleted_at = jiff::Timestamp::now();
                let dp = DeleteParams::default();
                retry("deleting a grant", || api.delete(&name, &dp)).await?;
                self.lag_until_rejected(&cred, deleted_at).await?;
                poll_until(Duration::from_secs(150), "the deleted grant to be gone", || {
                    let api = api.clone();
                    let name = name.clone();
                    async move { Ok(api.get_opt(&name).await?.is_none().then_some(())) }
                })
                .await?;
                self.done("delete");
            }
            // Destructive: held, approved by alice, issued, expires.
            2 => {
                self.create_grant(&Self::delete_grant(&name)).await?;
                let held = wait_for_phase(&self.admin, &name, &[GrantPhase::AwaitingApproval]).await?;
                self.decide(alice, &held, Decision::Approve).await?;
                let g = wait_for_phase(&self.admin, &name, &[GrantPhase::Active]).await?;
                let cred = self.capture(&g).await?;
                let end = g.status.and_then(|s| s.expires_at).context("expiresAt")?.0;
                self.lag_until_rejected(&cred, end).await?;
                self.done("approve");
            }
            // Destructive, denied: never any credential.
            3 => {
                self.create_grant(&Self::delete_grant(&name)).await?;
                let held = wait_for_phase(&self.admin, &name, &[GrantPhase::AwaitingApproval]).await?;
                self.decide(alice, &held, Decision::Deny).await?;
                let g = wait_for_phase(&self.admin, &name, &[GrantPhase::Denied]).await?;
                anyhow::ensure!(g.status.and_then(|s| s.issued_at).is_none(), "denied grant {name} was issued");
                self.done("deny");
            }
            // An identity of its own, suspended while its grant is active.
            4 => {
                let id_name = format!("susp-{i}");
                let ids: Api<AgentIdentity> = Api::namespaced(self.admin.clone(), NS);
                let id = identity(&id_name, &[TARGET]);
                let pp = PostParams::default();
                if let Err(e) = retry("creating an identity", || ids.create(&pp, &id)).await
                    && !e.to_string().contains("already exists")
                {
                    return Err(e);
                }
                let mut g = Self::read_grant(&name, "10m");
                g.spec.identity = id_name.clone();
                self.create_grant(&g).await?;
                let g = wait_for_phase(&self.admin, &name, &[GrantPhase::Active]).await?;
                let cred = self.capture(&g).await?;
                let suspended_at = jiff::Timestamp::now();
                let patch = Patch::Merge(json!({"spec": {"suspended": true}}));
                let params = PatchParams::default();
                retry("suspending", || ids.patch(&id_name, &params, &patch)).await?;
                self.lag_until_rejected(&cred, suspended_at).await?;
                wait_for_phase(&self.admin, &name, &[GrantPhase::Revoked]).await?;
                self.done("suspend");
            }
            // Over the ceiling: rejected, never issued.
            _ => {
                self.create_grant(&Self::read_grant(&name, "2h")).await?;
                let g = wait_for_phase(&self.admin, &name, &[GrantPhase::Rejected]).await?;
                anyhow::ensure!(g.status.and_then(|s| s.issued_at).is_none(), "rejected grant {name} was issued");
                self.done("reject");
            }
        }
        Ok(())
    }
}

async fn grant_objects(admin: &Client) -> anyhow::Result<Vec<String>> {
    let lp = ListParams::default().labels("app.kubernetes.io/managed-by=agentid,agentid.dev/component=grant");
    let mut out = Vec::new();
    for ns in [NS, TARGET] {
        out.extend(
            Api::<ServiceAccount>::namespaced(admin.clone(), ns)
                .list_metadata(&lp)
                .await?
                .items
                .iter()
                .map(|o| format!("ServiceAccount {ns}/{}", o.name_any())),
        );
        out.extend(
            Api::<Secret>::namespaced(admin.clone(), ns)
                .list_metadata(&lp)
                .await?
                .items
                .iter()
                .map(|o| format!("Secret {ns}/{}", o.name_any())),
        );
        out.extend(
            Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(admin.clone(), ns)
                .list_metadata(&lp)
                .await?
                .items
                .iter()
                .map(|o| format!("Role {ns}/{}", o.name_any())),
        );
        out.extend(
            Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), ns)
                .list_metadata(&lp)
                .await?
                .items
                .iter()
                .map(|o| format!("RoleBinding {ns}/{}", o.name_any())),
        );
    }
    Ok(out)
}

fn issued_twice(log: &str) -> Vec<String> {
    let mut counts: HashMap<String, u32> = HashMap::new();
    for line in log.lines().filter(|l| l.contains("\"transition\":\"issued\"")) {
        if let Some(uid) = line.split("\"grant_uid\":\"").nth(1).and_then(|r| r.split('"').next()) {
            *counts.entry(uid.to_string()).or_default() += 1;
        }
    }
    counts.into_iter().filter(|(_, n)| *n > 1).map(|(uid, n)| format!("{uid} ×{n}")).collect()
}

#[tokio::test]
#[ignore = "the chaos program: run by tests/run (short) and tests/chaos (long)"]
async fn chaos_churn_with_operator_kills_and_an_apiserver_restart() -> anyhow::Result<()> {
    let grants = env_or("AGENTID_CHAOS_GRANTS", 24);
    let concurrency = env_or("AGENTID_CHAOS_CONCURRENCY", 4) as usize;
    let seed = env_or("AGENTID_CHAOS_SEED", (u64::from(std::process::id()) * 2_654_435_761) | 1);
    println!("chaos: {grants} grants, concurrency {concurrency}, seed {seed}");
    let rng = Arc::new(Rng(Mutex::new(seed)));

    let pc = PrivateCluster::start("chaos").await?;
    let admin = pc.admin().await?;
    create_namespaces(&admin, &[NS, TARGET]).await?;
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "vol"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    }))?;
    create(&admin, TARGET, &pvc).await?;
    let op = Operator::start_as(&pc.dir, pc.dir.join("admin.kubeconfig"), &[], &[])?;
    op.wait_ready().await.with_context(|| op.log())?;
    let mut churn = identity("churn", &[TARGET]);
    churn.spec.approval.approvers.users = vec!["alice".into()];
    create(&admin, NS, &churn).await?;
    wait_identity_ready(&admin, NS, "churn").await?;
    // alice may approve (RBAC) in this cluster.
    install_approver_role(&admin).await?;
    bind(&admin, NS, "approvers", "agentid-approver", &["alice"], &[]).await?;
    let alice = {
        let out = Command::new(repo_root().join("tests/control-plane/cluster"))
            .args(["user"])
            .arg(&pc.dir)
            .arg("alice")
            .output()?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        crate::harness::client_from_kubeconfig(&pc.dir.join("alice.kubeconfig")).await?
    };

    // The chaos: SIGKILL the operator every 2–8 s and start it again 0.2–2 s later; restart the
    // apiserver once, a third of the way in.
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU32::new(0));
    let op = Arc::new(op);
    let chaos = {
        let (stop, kills, op, rng, dir) = (stop.clone(), kills.clone(), op.clone(), rng.clone(), pc.dir.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut apiserver_restarted = None;
            while !stop.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(2000 + rng.next(6000))).await;
                if stop.load(Ordering::Acquire) {
                    break;
                }
                op.kill();
                kills.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200 + rng.next(1800))).await;
                if apiserver_restarted.is_none() && started.elapsed() > Duration::from_secs(30) {
                    let dir = dir.clone();
                    let t = Instant::now();
                    let out = tokio::task::spawn_blocking(move || {
                        Command::new(repo_root().join("tests/control-plane/cluster"))
                            .arg("restart-apiserver")
                            .arg(&dir)
                            .output()
                    })
                    .await;
                    let ok = matches!(out, Ok(Ok(ref o)) if o.status.success());
                    apiserver_restarted = Some((ok, t.elapsed()));
                }
                let _ = op.restart(&[]);
            }
            apiserver_restarted
        })
    };

    let state = Arc::new(Chaos { admin: admin.clone(), findings: Mutex::new(Findings::default()) });
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..grants)
        .map(|i| {
            let (state, alice, rng) = (state.clone(), alice.clone(), rng.clone());
            async move {
                // Every path in turn; the chaos is in the timing.
                tokio::time::sleep(Duration::from_millis(rng.next(500))).await;
                state.path(i, i % 6, &alice).await.with_context(|| format!("path of g{i}"))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    stop.store(true, Ordering::Release);
    let apiserver = chaos.await?;
    let churn_time = started.elapsed();
    // The operator runs at the end, so that what is due is done.
    if op.wait_ready().await.is_err() {
        op.restart(&[])?;
        op.wait_ready().await?;
    }
    let failures: Vec<String> = results.iter().filter_map(|r| r.as_ref().err()).map(|e| format!("{e:#}")).collect();

    // Audit. Every captured credential of a grant that is no longer Active must be refused.
    let grants_api: Api<AccessGrant> = Api::namespaced(admin.clone(), NS);
    let credentials = std::mem::take(&mut state.findings.lock().unwrap_or_else(|e| e.into_inner()).credentials);
    let mut live_after_end = Vec::new();
    for (name, cred) in &credentials {
        let phase = grants_api.get_opt(name).await?.and_then(|g| g.status).and_then(|s| s.phase);
        if phase == Some(GrantPhase::Active) {
            continue;
        }
        if !rejected(cred).await {
            live_after_end.push(format!("{name} ({phase:?})"));
        }
    }
    // Nothing a grant caused outlives it (give revocations due now a moment).
    let leaked = poll_until(Duration::from_secs(60), "no grant objects left", || {
        let admin = admin.clone();
        async move {
            let active = Api::<AccessGrant>::namespaced(admin.clone(), NS)
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .filter(|g| g.status.as_ref().and_then(|s| s.phase) == Some(GrantPhase::Active))
                .count();
            let objects = grant_objects(&admin).await?;
            Ok((active == 0 && objects.is_empty()).then_some(objects))
        }
    })
    .await;
    let leaked = match leaked {
        Ok(none) => none,
        Err(_) => grant_objects(&admin).await?,
    };
    let twice = issued_twice(&op.log());

    let findings = state.findings.lock().unwrap_or_else(|e| e.into_inner());
    let mut lags = findings.lags.clone();
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| lags.get(((lags.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
    let report = json!({
        "seed": seed,
        "grants": grants,
        "concurrency": concurrency,
        "churnSeconds": churn_time.as_secs_f64(),
        "operatorKills": kills.load(Ordering::Relaxed),
        "apiserverRestart": apiserver.map(|(ok, t)| json!({"ok": ok, "seconds": t.as_secs_f64()})),
        "paths": findings.paths,
        "pathFailures": failures,
        "credentialsChecked": credentials.len(),
        "terminalButStillAuthenticating": live_after_end,
        "leakedObjects": leaked,
        "issuedTwice": twice,
        "revocationLagSeconds": {"count": lags.len(), "p50": pct(0.5), "p99": pct(0.99), "max": lags.last().copied().unwrap_or(0.0)},
    });
    let path = repo_root().join("target/chaos-report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("{}", serde_json::to_string_pretty(&report)?);

    assert!(
        report["terminalButStillAuthenticating"].as_array().is_some_and(Vec::is_empty),
        "credentials outlived their grants"
    );
    assert!(report["leakedObjects"].as_array().is_some_and(Vec::is_empty), "objects outlived their grants");
    assert!(report["issuedTwice"].as_array().is_some_and(Vec::is_empty), "grants issued twice");
    assert!(
        failures.is_empty(),
        "paths failed: {failures:#?}\n{}",
        op.log().lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
    assert!(kills.load(Ordering::Relaxed) > 0, "the operator was never killed: not a chaos run");
    Ok(())
}
