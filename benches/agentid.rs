//! The benchmark program: starts a local control plane and the operator (release build), measures
//! and prints a table; writes `target/bench-report.json`. Not a timed test: it asserts nothing
//! about speed; docs/benchmarks.md records the figures and the method.
//!
//!   cargo bench --bench agentid                      # default sizes
//!   AGENTID_BENCH_SIZES=1,100 AGENTID_BENCH_ACTIVE=1000 AGENTID_BENCH_BURST=200 \
//!   AGENTID_BENCH_IDENTITIES=500 AGENTID_BENCH_SCALE_GRANTS=2000 cargo bench --bench agentid
//!
//! What it measures (docs/benchmarks.md says why each is measured this way):
//! - issuance latency: AccessGrant created → its token first authenticates and is authorized
//!   (a `get` of a ConfigMap it may read returns 200), at each concurrency in SIZES;
//! - the floor: the same calls made by a bare client (ServiceAccount, Role, RoleBinding, Secret,
//!   TokenRequest bound to the Secret, one more write for status) → the token's first 200;
//! - throughput: grants issued per second over the largest size, against the floor's;
//! - revocation lag: with ACTIVE grants active, BURST of them made to expire in the same second;
//!   per grant, expiresAt → its ServiceAccount's deletion seen by a watch, and for a sample,
//!   expiresAt → the first 401 with its token;
//! - memory and start-up: operator RSS idle and with IDENTITIES identities and SCALE_GRANTS
//!   grants; time from start to /readyz and to the first reconcile at that size.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agentid::api::{
    AccessGrant, AccessGrantSpec, AgentIdentity, AgentIdentitySpec, ApprovalPolicy, GrantPhase, KubernetesAccess,
    KubernetesRule,
};
use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::{
        authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
        core::v1::{ConfigMap, Namespace, Secret, ServiceAccount},
        rbac::v1::{Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    config::{AuthInfo, KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cluster(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(repo().join("tests/control-plane/cluster")).args(args).stderr(Stdio::inherit()).output()?;
    anyhow::ensure!(out.status.success(), "cluster {args:?} failed");
    Ok(String::from_utf8(out.stdout)?)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

struct Operator {
    child: Child,
    metrics: u16,
}

impl Operator {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let (metrics, webhook) = (free_port(), free_port());
        // AGENTID_BENCH_WRAP runs the operator under a profiler, e.g. "heaptrack -o
        // target/heap/op.{start}": `{start}` becomes 1 for the first start, 2 for the restart.
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let start = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        // One log per start (operator.1.log, and operator.2.log for the restart).
        let log = std::fs::File::create(dir.join(format!("operator.{start}.log")))?;
        let wrap = std::env::var("AGENTID_BENCH_WRAP").unwrap_or_default().replace("{start}", &start.to_string());
        let mut wrap = wrap.split_whitespace();
        let mut command = match wrap.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(wrap).arg(env!("CARGO_BIN_EXE_agentid"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_agentid")),
        };
        let child = command
            .args(["run", "--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .args(["--webhook-addr", &format!("127.0.0.1:{webhook}")])
            .args(["--webhook-url", &format!("https://127.0.0.1:{webhook}")])
            .env("KUBECONFIG", dir.join("admin.kubeconfig"))
            .env("RUST_LOG", std::env::var("AGENTID_BENCH_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Self { child, metrics })
    }

    fn get(&self, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    async fn wait_ready(&self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(600) {
            if self.get("/readyz").is_some_and(|r| r.contains(" 200 ")) {
                return Ok(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("operator not ready")
    }

    fn reconciles(&self) -> f64 {
        self.get("/metrics")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("agentid_reconcile_duration_seconds_count"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn rss_mib(&self) -> f64 {
        self.status_mib("VmRSS:")
    }

    /// Grants in the operator's cache that hold no credential (by its `agentid_grants` gauge:
    /// every phase but Active). Ended grants leave the cache once settled.
    fn cached_unheld_grants(&self) -> f64 {
        self.get("/metrics")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("agentid_grants{") && !l.contains("phase=\"Active\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The operator's live heap (its allocator's count; `agentid_heap_allocated_bytes`), in MiB;
    /// NaN (null in the report) when it could not be read.
    fn heap_mib(&self) -> f64 {
        self.bytes_gauge_mib("agentid_heap_allocated_bytes")
    }

    /// What the allocator holds: live heap, of it the caches' (their own arena), and the pages
    /// holding the live heap, in MiB (NaN: not read).
    fn heap(&self) -> serde_json::Value {
        json!({
            "allocatedMiB": self.heap_mib(),
            "cachesMiB": self.bytes_gauge_mib("agentid_heap_caches_allocated_bytes"),
            "activeMiB": self.bytes_gauge_mib("agentid_heap_active_bytes"),
            "cachesActiveMiB": self.bytes_gauge_mib("agentid_heap_caches_active_bytes"),
        })
    }

    fn bytes_gauge_mib(&self, name: &str) -> f64 {
        self.get("/metrics")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .map(|b| b / (1024.0 * 1024.0))
            .unwrap_or(f64::NAN)
    }

    /// The most the process has held resident since it started.
    fn peak_rss_mib(&self) -> f64 {
        self.status_mib("VmHWM:")
    }

    fn status_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    }

    fn stop(&mut self) {
        // Under AGENTID_BENCH_WRAP the operator is the wrapper's child.
        let _ = Command::new("pkill").args(["-TERM", "-P", &self.child.id().to_string()]).status();
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

/// A run that fails part-way must not leave the operator running (it would load the next run).
impl Drop for Operator {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Default, Clone, serde::Serialize)]
struct Stats {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
    Stats { n: v.len(), p50_ms: at(0.5), p99_ms: at(0.99), max_ms: v.last().copied().unwrap_or(0.0) }
}

async fn namespace(admin: &Client, name: &str) -> anyhow::Result<()> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(admin.clone()).create(&PostParams::default(), &ns).await?;
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "probe"}, "data": {"k": "v"}}))?;
    Api::<ConfigMap>::namespaced(admin.clone(), name).create(&PostParams::default(), &cm).await?;
    Ok(())
}

fn identity(name: &str, allowed: &str, suspended: bool) -> AgentIdentity {
    AgentIdentity::new(
        name,
        AgentIdentitySpec {
            owner: "bench".into(),
            purpose: "benchmark".into(),
            max_grant_duration: "1h".into(),
            allowed_namespaces: vec![allowed.into()],
            approval: ApprovalPolicy::default(),
            suspended,
            enforce: false,
            retire_at: None,
        },
    )
}

fn grant(name: &str, identity: &str, target: &str, duration: &str) -> AccessGrant {
    AccessGrant::new(
        name,
        AccessGrantSpec {
            identity: identity.into(),
            duration: duration.into(),
            reason: "benchmark".into(),
            kubernetes: Some(KubernetesAccess {
                rules: vec![KubernetesRule {
                    namespace: target.into(),
                    api_groups: vec!["".into()],
                    resources: vec!["configmaps".into()],
                    verbs: vec!["get".into()],
                    resource_names: vec!["probe".into()],
                }],
            }),
        },
    )
}

async fn token_client(base: &Config, token: &str) -> anyhow::Result<Client> {
    let mut config = base.clone();
    config.auth_info = AuthInfo { token: Some(token.to_string().into()), ..Default::default() };
    Ok(Client::try_from(config)?)
}

/// Polls with `token` until `get configmaps/probe` in `ns` answers 200.
async fn first_ok(base: &Config, token: &str, ns: &str) -> anyhow::Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(token_client(base, token).await?, ns);
    for _ in 0..3000 {
        if api.get("probe").await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("token never worked")
}

/// Watches AccessGrants in `ns` and records when each is first seen Active.
fn watch_active(admin: &Client, ns: &str) -> Arc<Mutex<HashMap<String, Instant>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let api: Api<AccessGrant> = Api::namespaced(admin.clone(), ns);
    let map = seen.clone();
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default()).applied_objects().boxed();
        while let Ok(Some(g)) = stream.try_next().await {
            if g.status.as_ref().and_then(|s| s.phase) == Some(GrantPhase::Active) {
                map.lock().expect("lock").entry(g.name_any()).or_insert_with(Instant::now);
            }
        }
    });
    seen
}

async fn wait_seen(seen: &Arc<Mutex<HashMap<String, Instant>>>, name: &str) -> anyhow::Result<Instant> {
    for _ in 0..60_000 {
        if let Some(t) = seen.lock().expect("lock").get(name) {
            return Ok(*t);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("{name} never became Active")
}

/// Grants per identity (`AGENTID_BENCH_PER_IDENTITY`, default 100): every active grant's
/// kubeconfig lives in its identity's one Secret, rewritten whole on each change, and a Secret
/// holds at most 1 MiB (about 250 grants' worth); the default keeps well below that.
fn grants_per_identity() -> usize {
    env_num("AGENTID_BENCH_PER_IDENTITY", 100).max(1)
}

/// The identity grant `i` belongs to.
fn agent_of(i: usize) -> String {
    format!("agent{}", i / grants_per_identity())
}

/// Namespaces `ns` (identities `agent0`… for `grants` grants) and `target`, and a watch recording
/// when grants in `ns` become Active.
async fn stage(
    admin: &Client,
    ns: &str,
    target: &str,
    grants: usize,
) -> anyhow::Result<Arc<Mutex<HashMap<String, Instant>>>> {
    namespace(admin, ns).await?;
    namespace(admin, target).await?;
    for i in (0..grants.max(1)).step_by(grants_per_identity()) {
        Api::<AgentIdentity>::namespaced(admin.clone(), ns)
            .create(&PostParams::default(), &identity(&agent_of(i), target, false))
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(watch_active(admin, ns))
}

/// Runs `task(0..n)` all at once; returns each one's result (ms) and the seconds until the last.
async fn all_at_once<F, Fut>(n: usize, task: F) -> anyhow::Result<(Vec<f64>, f64)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<f64>>,
{
    let start = Instant::now();
    let results: Vec<anyhow::Result<f64>> =
        futures::stream::iter(0..n).map(task).buffer_unordered(n.max(1)).collect().await;
    let total = start.elapsed().as_secs_f64();
    Ok((results.into_iter().collect::<anyhow::Result<Vec<_>>>()?, total))
}

/// The apiserver's own request counters, by "VERB resource[/subresource]": (requests, seconds
/// spent answering them, bytes answered). Watches are left out (their time is their lifetime).
async fn apiserver_requests(admin: &Client) -> anyhow::Result<HashMap<String, [f64; 3]>> {
    let text = admin.request_text(http::Request::get("/metrics").body(Vec::new())?).await?;
    let label = |labels: &str, key: &str| {
        labels
            .split(',')
            .find_map(|kv| kv.strip_prefix(&format!("{key}=\"")))
            .map(|v| v.trim_end_matches('"').to_string())
    };
    let mut calls: HashMap<String, [f64; 3]> = HashMap::new();
    for line in text.lines() {
        let slot = [
            ("apiserver_request_total{", 0),
            ("apiserver_request_duration_seconds_sum{", 1),
            ("apiserver_response_sizes_sum{", 2),
        ]
        .into_iter()
        .find(|(prefix, _)| line.starts_with(prefix));
        // The apiserver's wait for each admission webhook, as "WEBHOOK type name".
        let webhook = [
            ("apiserver_admission_webhook_admission_duration_seconds_count{", 0),
            ("apiserver_admission_webhook_admission_duration_seconds_sum{", 1),
        ]
        .into_iter()
        .find(|(prefix, _)| line.starts_with(prefix));
        if let (Some((prefix, slot)), Some((labels, value))) = (webhook, line.rsplit_once("} ")) {
            let labels = &labels[prefix.len()..];
            if let (Some(kind), Some(name)) = (label(labels, "type"), label(labels, "name")) {
                calls.entry(format!("WEBHOOK {kind} {name}")).or_default()[slot] +=
                    value.trim().parse::<f64>().unwrap_or(0.0);
            }
            continue;
        }
        let (Some((prefix, slot)), Some((labels, value))) = (slot, line.rsplit_once("} ")) else { continue };
        let labels = &labels[prefix.len()..];
        let (Some(verb), Some(resource)) = (label(labels, "verb"), label(labels, "resource")) else { continue };
        if verb == "WATCH" || verb == "CONNECT" {
            continue;
        }
        let sub = label(labels, "subresource").filter(|s| !s.is_empty()).map(|s| format!("/{s}")).unwrap_or_default();
        calls.entry(format!("{verb} {resource}{sub}")).or_default()[slot] += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    Ok(calls)
}

/// The processes whose CPU time is counted per grant (name, pid): the operator, kube-apiserver
/// and etcd (set once all run).
static PROCESSES: std::sync::Mutex<Vec<(String, u32)>> = std::sync::Mutex::new(Vec::new());

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces): state is the 3rd, utime the 14th.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds so far of each of [`PROCESSES`], as rows keyed "CPU name" (slot 1, in seconds).
fn cpu_rows() -> HashMap<String, [f64; 3]> {
    PROCESSES
        .lock()
        .expect("lock")
        .iter()
        .map(|(name, pid)| (format!("CPU {name}"), [0.0, cpu_seconds(*pid), 0.0]))
        .collect()
}

/// Runs `work`, and returns its result with the apiserver requests made meanwhile, per grant
/// (`n`), busiest first: [{"call", "perGrant", "msPerGrant", "kbPerGrant"}]; rows "CPU name" give
/// the CPU milliseconds per grant of the operator, kube-apiserver and etcd.
async fn counting_calls<T>(
    admin: &Client,
    n: usize,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Vec<serde_json::Value>)> {
    let mut before = apiserver_requests(admin).await?;
    before.extend(cpu_rows());
    let out = work.await?;
    // What the work set going (the operator's Events, say) ends soon after it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut after = apiserver_requests(admin).await?;
    after.extend(cpu_rows());
    let per = n.max(1) as f64;
    let mut rows: Vec<(String, [f64; 3])> = after
        .into_iter()
        .map(|(k, a)| {
            let b = before.get(&k).copied().unwrap_or_default();
            (k, [(a[0] - b[0]) / per, (a[1] - b[1]) * 1000.0 / per, (a[2] - b[2]) / 1024.0 / per])
        })
        .filter(|(k, d)| d[0] > 0.0 || k.starts_with("CPU "))
        .collect();
    rows.sort_by(|a, b| b.1[1].total_cmp(&a.1[1]));
    let rows = rows
        .into_iter()
        .map(|(call, d)| json!({"call": call, "perGrant": d[0], "msPerGrant": d[1], "kbPerGrant": d[2]}))
        .collect();
    Ok((out, rows))
}

/// Prints the apiserver requests per grant (`calls` from `counting_calls`), the busiest first.
fn print_calls(who: &str, calls: &[serde_json::Value]) {
    // Webhook rows are time within the requests they admit, CPU rows not requests: not added.
    let call = |c: &serde_json::Value| c["call"].as_str().unwrap_or_default().to_string();
    let requests = || calls.iter().filter(|c| !call(c).starts_with("WEBHOOK") && !call(c).starts_with("CPU "));
    let total = |k: &str| requests().filter_map(|c| c[k].as_f64()).sum::<f64>();
    let cpu: Vec<String> = calls
        .iter()
        .filter(|c| call(c).starts_with("CPU "))
        .map(|c| format!("{} {:.1} ms", &call(c)[4..], c["msPerGrant"].as_f64().unwrap_or_default()))
        .collect();
    eprintln!("  {who}: CPU per grant: {}", cpu.join(", "));
    eprintln!(
        "  {who}: {:.1} requests, {:.1} ms of apiserver time, {:.0} KiB answered per grant",
        total("perGrant"),
        total("msPerGrant"),
        total("kbPerGrant")
    );
    for c in requests().take(14) {
        eprintln!(
            "    {:<40} {:>6.2}/grant {:>8.2} ms {:>8.1} KiB",
            c["call"].as_str().unwrap_or_default(),
            c["perGrant"].as_f64().unwrap_or_default(),
            c["msPerGrant"].as_f64().unwrap_or_default(),
            c["kbPerGrant"].as_f64().unwrap_or_default()
        );
    }
}

/// Per grant, ms from creation to the token's first 200; seconds until the last; the apiserver
/// requests made meanwhile (see `counting_calls`).
type Issued = ((Vec<f64>, f64), Vec<serde_json::Value>);

/// Creates `n` grants at once; per grant, creation → token's first 200. Returns (latencies,
/// seconds from the first creation to the last 200).
async fn operator_issuance(admin: &Client, base: &Config, n: usize, run: &str) -> anyhow::Result<Issued> {
    let (ns, target) = (format!("op-{run}"), format!("op-{run}-t"));
    let seen = stage(admin, &ns, &target, n).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let issue = all_at_once(n, |i| {
        let (admin, base, ns, target, seen) = (admin.clone(), base.clone(), ns.clone(), target.clone(), seen.clone());
        async move {
            let name = format!("g{i}");
            let t0 = Instant::now();
            Api::<AccessGrant>::namespaced(admin.clone(), &ns)
                .create(&PostParams::default(), &grant(&name, &agent_of(i), &target, "30m"))
                .await?;
            wait_seen(&seen, &name).await?;
            let g = Api::<AccessGrant>::namespaced(admin.clone(), &ns).get(&name).await?;
            let secret_name = g.status.and_then(|s| s.credentials_secret).context("secret")?;
            let secret = Api::<Secret>::namespaced(admin.clone(), &ns).get(&secret_name).await?;
            let token = secret.data.and_then(|d| d.get("token").cloned()).context("token")?;
            first_ok(&base, std::str::from_utf8(&token.0)?, &target).await?;
            Ok(t0.elapsed().as_secs_f64() * 1000.0)
        }
    });
    counting_calls(admin, n, issue).await
}

/// The floor: the same objects made by a bare client, then the token's first 200.
async fn floor_issuance(admin: &Client, base: &Config, n: usize, run: &str) -> anyhow::Result<Issued> {
    let ns = format!("floor-{run}");
    namespace(admin, &ns).await?;
    let issue = all_at_once(n, |i| {
        let (admin, base, ns) = (admin.clone(), base.clone(), ns.clone());
        async move {
            let name = format!("floor-{i}");
            let t0 = Instant::now();
            let pp = PostParams::default();
            let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}}))?;
            Api::<ServiceAccount>::namespaced(admin.clone(), &ns).create(&pp, &sa).await?;
            let role: Role = serde_json::from_value(json!({"metadata": {"name": name},
                    "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["probe"]}]}))?;
            Api::<Role>::namespaced(admin.clone(), &ns).create(&pp, &role).await?;
            let rb: RoleBinding = serde_json::from_value(json!({"metadata": {"name": name},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                    "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}]}))?;
            Api::<RoleBinding>::namespaced(admin.clone(), &ns).create(&pp, &rb).await?;
            let secret: Secret = serde_json::from_value(json!({"metadata": {"name": name}}))?;
            let secret = Api::<Secret>::namespaced(admin.clone(), &ns).create(&pp, &secret).await?;
            let request = TokenRequest {
                spec: Some(TokenRequestSpec {
                    audiences: None,
                    expiration_seconds: Some(1800),
                    bound_object_ref: Some(BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Secret".into()),
                        name: Some(name.clone()),
                        uid: secret.uid(),
                    }),
                }),
                ..Default::default()
            };
            let token = Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
                .create_token_request(&name, &pp, &request)
                .await?
                .status
                .context("token")?
                .token
                .context("token")?;
            // The status write: one more patch, as the operator's status update.
            Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {"issued": "yes"}}})),
                )
                .await?;
            first_ok(&base, &token, &ns).await?;
            Ok(t0.elapsed().as_secs_f64() * 1000.0)
        }
    });
    counting_calls(admin, n, issue).await
}

/// `active` grants active; `burst` of them made to expire in the same second (their
/// status.expiresAt moved earlier — agentid honours an earlier expiry). Returns (lag by
/// ServiceAccount deletion, lag by first 401 for a sample).
async fn revocation(
    admin: &Client,
    base: &Config,
    active: usize,
    burst: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (ns, target) = ("rev".to_string(), "rev-t".to_string());
    let seen = stage(admin, &ns, &target, active).await?;
    let t = Instant::now();
    futures::stream::iter(0..active)
        .map(|i| {
            let (admin, ns, target) = (admin.clone(), ns.clone(), target.clone());
            async move {
                Api::<AccessGrant>::namespaced(admin, &ns)
                    .create(&PostParams::default(), &grant(&format!("r{i}"), &agent_of(i), &target, "1h"))
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await?;
    while seen.lock().expect("lock").len() < active {
        if t.elapsed() > Duration::from_secs(3600) {
            bail!("only {} of {active} grants became Active", seen.lock().expect("lock").len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("  {active} grants active after {:.0}s", t.elapsed().as_secs_f64());

    // Tokens of a sample, to poll for their first 401.
    let grants: Api<AccessGrant> = Api::namespaced(admin.clone(), &ns);
    let sample = burst.min(50);
    let mut tokens = Vec::new();
    for i in 0..sample {
        let g = grants.get(&format!("r{i}")).await?;
        let secret = Api::<Secret>::namespaced(admin.clone(), &ns)
            .get(&g.status.and_then(|s| s.credentials_secret).context("secret")?)
            .await?;
        tokens.push(String::from_utf8(secret.data.and_then(|d| d.get("token").cloned()).context("token")?.0)?);
    }
    // SA deletions, seen by a watch.
    let deleted = Arc::new(Mutex::new(HashMap::<String, jiff::Timestamp>::new()));
    {
        let deleted = deleted.clone();
        let api: Api<ServiceAccount> = Api::namespaced(admin.clone(), &ns);
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default().labels("agentid.dev/component=grant")).boxed();
            while let Ok(Some(event)) = stream.try_next().await {
                if let watcher::Event::Delete(sa) = event {
                    let grant = sa.labels().get("agentid.dev/grant").cloned().unwrap_or_default();
                    deleted.lock().expect("lock").insert(grant, jiff::Timestamp::now());
                }
            }
        });
    }
    // All `burst` expire at the same second T, far enough ahead to patch them all first.
    let lead = 20.max(burst as i64 / 20);
    let at = jiff::Timestamp::now().checked_add(jiff::SignedDuration::from_secs(lead))?;
    let at = jiff::Timestamp::from_second(at.as_second())?;
    let pp = PatchParams::default();
    futures::stream::iter(0..burst)
        .map(|i| {
            let (grants, pp) = (grants.clone(), pp.clone());
            async move {
                grants
                    .patch_status(
                        &format!("r{i}"),
                        &pp,
                        &Patch::Merge(json!({"status": {"expiresAt": at.to_string()}})),
                    )
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let now = jiff::Timestamp::now();
    anyhow::ensure!(now < at, "patching the burst took past T; lower AGENTID_BENCH_BURST");
    // Poll the sample's tokens for their first 401.
    let rejections: Vec<f64> = futures::stream::iter(tokens)
        .map(|token| {
            let (base, target) = (base.clone(), target.clone());
            async move {
                let api: Api<ConfigMap> = Api::namespaced(token_client(&base, &token).await.ok()?, &target);
                loop {
                    match api.get("probe").await {
                        Err(kube::Error::Api(s)) if s.code == 401 => {
                            return Some((jiff::Timestamp::now() - at).get_milliseconds() as f64);
                        }
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                    if (jiff::Timestamp::now() - at).get_seconds() > 300 {
                        return None;
                    }
                }
            }
        })
        .buffer_unordered(sample.max(1))
        .filter_map(|x| async move { x })
        .collect()
        .await;
    // Wait for every deletion.
    let deadline = Instant::now() + Duration::from_secs(300);
    while deleted.lock().expect("lock").len() < burst && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lags: Vec<f64> = deleted
        .lock()
        .expect("lock")
        .iter()
        .filter(|(g, _)| g.strip_prefix('r').and_then(|n| n.parse::<usize>().ok()).is_some_and(|n| n < burst))
        .map(|(_, t)| (*t - at).get_milliseconds() as f64)
        .collect();
    Ok((lags, rejections))
}

/// How many grants in `api` have a phase, read in pages.
async fn count_phased(api: &Api<AccessGrant>) -> anyhow::Result<usize> {
    let (mut n, mut page) = (0, ListParams::default().limit(2000));
    loop {
        let list = api.list(&page).await?;
        n += list.items.iter().filter(|g| g.status.as_ref().and_then(|s| s.phase).is_some()).count();
        match list.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => page = page.continue_token(&token),
            None => return Ok(n),
        }
    }
}

/// `identities` identities and `grants` grants spread over them (grants of suspended identities:
/// rejected, so the cluster holds objects, not credentials). Returns when all are settled.
async fn populate(admin: &Client, identities: usize, grants: usize) -> anyhow::Result<f64> {
    let ns = "scale";
    namespace(admin, ns).await?;
    namespace(admin, "scale-t").await?;
    let t = Instant::now();
    futures::stream::iter(0..identities)
        .map(|i| {
            let admin = admin.clone();
            async move {
                Api::<AgentIdentity>::namespaced(admin, ns)
                    .create(&PostParams::default(), &identity(&format!("id{i}"), "scale-t", true))
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    futures::stream::iter(0..grants)
        .map(|i| {
            let admin = admin.clone();
            async move {
                Api::<AccessGrant>::namespaced(admin, ns)
                    .create(
                        &PostParams::default(),
                        &grant(&format!("s{i}"), &format!("id{}", i % identities.max(1)), "scale-t", "10m"),
                    )
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    // Settled: every grant has a phase.
    let api: Api<AccessGrant> = Api::namespaced(admin.clone(), ns);
    loop {
        // In pages: one list of 50,000 grants was cut off mid-answer on a busy machine. A failed
        // count is tried again.
        let settled = match count_phased(&api).await {
            Ok(n) => n,
            Err(e) => {
                eprintln!("counting settled grants failed ({e}); retrying");
                0
            }
        };
        if settled >= grants {
            break;
        }
        if t.elapsed() > Duration::from_secs(3600) {
            bail!("only {settled} of {grants} grants settled");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(t.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it, and
    // a benchmark is not a test: say so and stop.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benches/agentid.rs is a benchmark program: run it with `cargo bench --bench agentid`");
        return Ok(());
    }
    let sizes = env_list("AGENTID_BENCH_SIZES", &[1, 100, 1000]);
    let active = env_num("AGENTID_BENCH_ACTIVE", 2000);
    let burst = env_num("AGENTID_BENCH_BURST", 500);
    let identities = env_num("AGENTID_BENCH_IDENTITIES", 1000);
    let scale_grants = env_num("AGENTID_BENCH_SCALE_GRANTS", 5000);

    cluster(&["build"])?;
    let dir = repo().join(format!("target/bench-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    cluster(&["up", dir.to_str().context("path")?])?;
    struct Down(PathBuf);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = cluster(&["down", self.0.to_str().unwrap_or_default()]);
        }
    }
    let _down = Down(dir.clone());
    let kubeconfig = Kubeconfig::read_from(dir.join("admin.kubeconfig"))?;
    let base = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let admin = Client::try_from(base.clone())?;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for entry in std::fs::read_dir(repo().join("crds"))? {
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&std::fs::read_to_string(entry?.path())?)?;
        crds.patch(&crd.name_any(), &PatchParams::apply("bench").force(), &Patch::Apply(&crd)).await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut op = Operator::start(&dir)?;
    let ready = op.wait_ready().await?;
    {
        let pid_of = |name: &str| std::fs::read_to_string(dir.join(format!("{name}.pid"))).ok()?.trim().parse().ok();
        let mut processes = PROCESSES.lock().expect("lock");
        processes.push(("operator".into(), op.child.id()));
        processes.extend(["kube-apiserver", "etcd"].into_iter().filter_map(|n| Some((n.to_string(), pid_of(n)?))));
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss_idle = op.rss_mib();
    eprintln!("operator ready in {:.2}s; RSS idle {rss_idle:.1} MiB", ready.as_secs_f64());
    let mut report = json!({"machine": machine(), "operatorReadySeconds": ready.as_secs_f64(), "rssIdleMiB": rss_idle, "heapIdleMiB": op.heap_mib()});

    let mut rows = Vec::new();
    for &n in &sizes {
        let run = format!("n{n}");
        let ((op_lat, op_total), op_calls) = operator_issuance(&admin, &base, n, &run).await?;
        let ((floor_lat, floor_total), floor_calls) = floor_issuance(&admin, &base, n, &run).await?;
        let (o, f) = (stats(op_lat), stats(floor_lat));
        eprintln!(
            "issuance n={n}: operator p50 {:.0} p99 {:.0} max {:.0} ms ({:.1}/s); floor p50 {:.0} p99 {:.0} max {:.0} ms ({:.1}/s)",
            o.p50_ms,
            o.p99_ms,
            o.max_ms,
            n as f64 / op_total,
            f.p50_ms,
            f.p99_ms,
            f.max_ms,
            n as f64 / floor_total
        );
        print_calls("operator", &op_calls);
        print_calls("floor", &floor_calls);
        rows.push(json!({
            "concurrency": n, "operator": o, "floor": f,
            "ratioP50": o.p50_ms / f.p50_ms.max(0.001), "ratioP99": o.p99_ms / f.p99_ms.max(0.001),
            "operatorPerSecond": n as f64 / op_total, "floorPerSecond": n as f64 / floor_total,
            "apiserverCalls": {"operator": op_calls, "floor": floor_calls},
        }));
    }
    report["issuance"] = json!(rows);
    save(&report)?;

    if active > 0 && burst > 0 {
        let (by_delete, by_401) = revocation(&admin, &base, active, burst).await?;
        let (d, r) = (stats(by_delete), stats(by_401));
        eprintln!(
            "revocation burst {burst} of {active}: SA deleted p50 {:.0} p99 {:.0} max {:.0} ms; first 401 (sample {}) p50 {:.0} p99 {:.0} max {:.0} ms",
            d.p50_ms, d.p99_ms, d.max_ms, r.n, r.p50_ms, r.p99_ms, r.max_ms
        );
        report["revocation"] = json!({"active": active, "burst": burst, "serviceAccountDeleted": d, "first401": r});
        report["rssAfterRevocationMiB"] = json!(op.rss_mib());
        report["heapAfterRevocationMiB"] = json!(op.heap_mib());
        report["heapAfterRevocation"] = op.heap();
        save(&report)?;
    }

    if identities > 0 {
        let settle = populate(&admin, identities, scale_grants).await?;
        tokio::time::sleep(Duration::from_secs(10)).await;
        // While the flood is worked off: every grant has its phase, but many are still waiting
        // to be settled out of the cache.
        let (rss_scale, peak_scale, heap_scale) = (op.rss_mib(), op.peak_rss_mib(), op.heap_mib());
        let heap_scale_parts = op.heap();
        // Steady: the ended grants settled out of the cache, and 30 s for the allocator to give
        // back what the flood used (as after the restart below).
        let t = Instant::now();
        while op.cached_unheld_grants() > 0.0 && t.elapsed() < Duration::from_secs(1800) {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let out_of_cache = t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(30)).await;
        let (rss_steady, heap_steady) = (op.rss_mib(), op.heap_mib());
        let heap_steady_parts = op.heap();
        // And once every identity has been looked at again (each is every five to six minutes):
        // what the flood left in the allocator's pages that is replaced in that time.
        tokio::time::sleep(Duration::from_secs(390)).await;
        let (rss_rechecked, heap_rechecked) = (op.rss_mib(), op.heap());
        op.stop();
        let mut op2 = Operator::start(&dir)?;
        let t = Instant::now();
        let ready = op2.wait_ready().await?;
        // Any reconcile: a grant's, or an identity's — including one that only finds the binding
        // caches not filled yet and looks again a second later.
        while op2.reconciles() < 1.0 && t.elapsed() < Duration::from_secs(600) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first_reconcile = t.elapsed();
        tokio::time::sleep(Duration::from_secs(30)).await;
        let (rss_restart, peak_restart, heap_restart) = (op2.rss_mib(), op2.peak_rss_mib(), op2.heap_mib());
        let heap_restart_parts = op2.heap();
        eprintln!(
            "scale {identities} identities / {scale_grants} grants: settled in {settle:.0}s; RSS {rss_scale:.1} MiB (heap {heap_scale:.1}), peak {peak_scale:.1}; out of the cache {out_of_cache:.0}s later: RSS {rss_steady:.1} MiB (heap {heap_steady:.1}), 6.5 min later {rss_rechecked:.1}; after restart {rss_restart:.1} (heap {heap_restart:.1}), peak {peak_restart:.1}; restart → ready {:.2}s, first reconcile {:.2}s",
            ready.as_secs_f64(),
            first_reconcile.as_secs_f64()
        );
        report["scale"] = json!({
            "identities": identities, "grants": scale_grants, "settleSeconds": settle, "rssMiB": rss_scale,
            "outOfCacheSeconds": out_of_cache, "rssSteadyMiB": rss_steady,
            "heapMiB": heap_scale, "heapSteadyMiB": heap_steady, "heapAfterRestartMiB": heap_restart,
            "rssAfterRestartMiB": rss_restart, "peakRssMiB": peak_scale, "peakRssAfterRestartMiB": peak_restart, "restartReadySeconds": ready.as_secs_f64(),
            "restartFirstReconcileSeconds": first_reconcile.as_secs_f64(),
            "rssRecheckedMiB": rss_rechecked, "heapRechecked": heap_rechecked,
            "heap": heap_scale_parts, "heapSteady": heap_steady_parts, "heapAfterRestart": heap_restart_parts,
        });
        op2.stop();
    } else {
        op.stop();
    }
    save(&report)?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    eprintln!("wrote {}", report_path().display());
    Ok(())
}

fn report_path() -> PathBuf {
    repo().join("target/bench-report.json")
}

/// Writes the report so far (a long run that fails late keeps what it measured).
fn save(report: &serde_json::Value) -> anyhow::Result<()> {
    Ok(std::fs::write(report_path(), serde_json::to_string_pretty(report)?)?)
}

fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem =
        std::fs::read_to_string("/proc/meminfo").unwrap_or_default().lines().next().unwrap_or_default().to_string();
    json!({"cpus": cpus, "memory": mem})
}
