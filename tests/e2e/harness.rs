//! The e2e harness: one real control plane per test run, a namespace per test, and clients that
//! act as any user, group or ServiceAccount token.
//!
//! Set `AGENTID_E2E_CLUSTER=DIR` to reuse a control plane started with
//! `tests/control-plane/cluster up DIR` (what `tests/run` does); otherwise the first test starts
//! one under `tests/.clusters/` that stops itself when this test process exits.

use std::{
    collections::HashMap,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail, ensure};
use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::ApiResource,
    runtime::wait::{await_condition, conditions},
};
use serde::de::DeserializeOwned;

/// Label on every namespace the suite creates, so leftovers can be found and removed.
pub const E2E_LABEL: &str = "agentid.dev/e2e";

/// A running control plane the suite may use.
pub struct Cluster {
    /// The cluster's directory (admin.kubeconfig, logs).
    pub dir: PathBuf,
    /// Users already written, with their groups: a name must keep its groups for the whole run.
    users: Mutex<HashMap<String, Vec<String>>>,
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cluster_script() -> PathBuf {
    repo_root().join("tests/control-plane/cluster")
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The control plane of this test run, started on first use.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let dir = match std::env::var_os("AGENTID_E2E_CLUSTER") {
            Some(dir) => PathBuf::from(dir),
            None => {
                // Earlier runs' directories (their clusters stopped with their test process).
                for entry in std::fs::read_dir(repo_root().join("tests/.clusters")).into_iter().flatten().flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let owner = name.rsplit('-').next().unwrap_or_default();
                    if !Path::new(&format!("/proc/{owner}")).exists() {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
                let dir = repo_root().join(format!("tests/.clusters/run-{}", std::process::id()));
                // The script stops this control plane once the owner process (us) has exited.
                run(Command::new(cluster_script())
                    .arg("up")
                    .arg(&dir)
                    .env("AGENTID_CP_OWNER_PID", std::process::id().to_string()))
                .expect("starting the test control plane");
                dir
            }
        };
        assert!(
            dir.join("admin.kubeconfig").exists(),
            "{} has no admin.kubeconfig: is the control plane up?",
            dir.display()
        );
        Cluster { dir, users: Mutex::new(HashMap::new()) }
    })
}

impl Cluster {
    /// The kubeconfig file of a user made by [`Cluster::user`] (or `admin`).
    pub fn kubeconfig(&self, user: &str) -> PathBuf {
        self.dir.join(format!("{user}.kubeconfig"))
    }

    /// A client with cluster-admin rights (system:masters).
    pub async fn admin(&self) -> anyhow::Result<Client> {
        client_from_kubeconfig(&self.dir.join("admin.kubeconfig")).await
    }

    /// A client authenticating as `user` in `groups` by client certificate.
    pub async fn user(&self, user: &str, groups: &[&str]) -> anyhow::Result<Client> {
        let path = self.dir.join(format!("{user}.kubeconfig"));
        {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            match users.get(user) {
                Some(known) if *known == groups => {}
                Some(known) => {
                    bail!("user {user} was already made with groups {known:?}, not {groups:?}")
                }
                None => {
                    run(Command::new(cluster_script()).arg("user").arg(&self.dir).arg(user).args(&groups))?;
                    users.insert(user.to_string(), groups);
                }
            }
        }
        client_from_kubeconfig(&path).await
    }
}

/// A client authenticating with a bearer token against the test cluster.
pub async fn client_with_token(token: &str) -> anyhow::Result<Client> {
    let mut kubeconfig = Kubeconfig::read_from(cluster().dir.join("admin.kubeconfig"))?;
    let auth: kube::config::AuthInfo = serde_json::from_value(serde_json::json!({"token": token}))?;
    for named in &mut kubeconfig.auth_infos {
        named.auth_info = Some(auth.clone());
    }
    client_from(kubeconfig).await
}

/// A client from a kubeconfig file, as `kubectl --kubeconfig` would use it.
pub async fn client_from_kubeconfig(path: &Path) -> anyhow::Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    client_from(kubeconfig).await
}

/// A client from an in-memory kubeconfig (e.g. the one agentid writes into a grant's Secret).
pub async fn client_from(kubeconfig: Kubeconfig) -> anyhow::Result<Client> {
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// The CRDs from `crds/`, applied once per run exactly as a user would apply them.
pub async fn install_crds() -> anyhow::Result<()> {
    static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    INSTALLED
        .get_or_try_init(|| async {
            let client = cluster().admin().await?;
            apply_crds(&client).await
        })
        .await?;
    Ok(())
}

/// Applies every CRD in `crds/` and waits until each is established.
async fn apply_crds(client: &Client) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let ssa = PatchParams::apply("agentid-e2e").force();
    for entry in std::fs::read_dir(repo_root().join("crds"))? {
        let path = entry?.path();
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("parsing {}", path.display()))?;
        let name = crd.name_any();
        api.patch(&name, &ssa, &Patch::Apply(&crd)).await.with_context(|| format!("applying {name}"))?;
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .with_context(|| format!("{name} not established within 30s"))??;
    }
    Ok(())
}

/// A namespace of its own for one test, labelled for the suite.
pub struct TestNamespace {
    /// The namespace's name.
    pub name: String,
    admin: Client,
}

impl TestNamespace {
    /// Creates `e2e-<prefix>-<unique>`.
    pub async fn new(admin: &Client, prefix: &str) -> anyhow::Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos();
        let unique = (nanos ^ (std::process::id() << 12)) & 0xfffff;
        let name = format!("e2e-{prefix}-{unique:05x}{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {E2E_LABEL: "true"}}
        }))?;
        Api::<Namespace>::all(admin.clone()).create(&PostParams::default(), &ns).await?;
        Ok(Self { name, admin: admin.clone() })
    }

    /// Deletes the namespace (the controller-manager removes its content).
    pub async fn delete(self) -> anyhow::Result<()> {
        Api::<Namespace>::all(self.admin).delete(&self.name, &DeleteParams::default()).await?;
        Ok(())
    }
}

/// An untyped API for kind `K`, to send objects the typed structs could not even express.
pub fn dynamic_api<K: Resource<DynamicType = ()>>(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<K>(&()))
}

/// Parses a JSON value into an object of kind `K`, filling apiVersion and kind.
pub fn object<K: Resource<DynamicType = ()> + DeserializeOwned>(mut value: serde_json::Value) -> K {
    value["apiVersion"] = K::api_version(&()).into();
    value["kind"] = K::kind(&()).into();
    serde_json::from_value(value).expect("test object must parse")
}

/// Asserts that the apiserver refused a request as invalid (422) with a message holding every
/// fragment, and returns that message.
#[track_caller]
pub fn assert_invalid<T: std::fmt::Debug>(result: kube::Result<T>, fragments: &[&str]) -> String {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            for fragment in fragments {
                assert!(
                    status.message.contains(fragment),
                    "message {:?} does not mention {fragment:?}",
                    status.message
                );
            }
            status.message
        }
        other => panic!("expected a 422 naming {fragments:?}, got {other:?}"),
    }
}

/// A free TCP port on loopback (bound, then released for the caller).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// An `agentid run` process. It exits when this test process exits (its stdin closes).
pub struct Operator {
    child: Mutex<Option<(Child, ChildStdin)>>,
    kubeconfig: PathBuf,
    metrics_port: u16,
    webhook_port: u16,
    log: PathBuf,
    args: Vec<String>,
}

impl Operator {
    /// Starts the operator against the cluster in `dir` as cluster admin, with extra environment
    /// variables.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_as(dir, dir.join("admin.kubeconfig"), env, &[])
    }

    /// Starts the operator against the cluster in `dir` with the identity in `kubeconfig` and
    /// extra arguments to `agentid run`.
    pub fn start_as(dir: &Path, kubeconfig: PathBuf, env: &[(&str, &str)], args: &[&str]) -> anyhow::Result<Self> {
        let op = Self {
            child: Mutex::new(None),
            kubeconfig,
            metrics_port: free_port(),
            webhook_port: free_port(),
            log: dir.join(format!("operator-{}-{}.log", std::process::id(), free_port())),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        op.spawn(env)?;
        Ok(op)
    }

    fn spawn(&self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_agentid"))
            .args(["run", "--exit-on-stdin-eof", "--metrics-addr", &format!("127.0.0.1:{}", self.metrics_port)])
            .args(["--webhook-addr", &format!("127.0.0.1:{}", self.webhook_port)])
            .args(["--webhook-url", &format!("https://127.0.0.1:{}", self.webhook_port)])
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", std::env::var("AGENTID_E2E_LOG").unwrap_or_else(|_| "info,kube=warn".into()))
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting agentid run")?;
        let stdin = child.stdin.take().context("operator stdin")?;
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some((child, stdin));
        Ok(())
    }

    /// SIGKILLs the operator and waits until it is gone.
    pub fn kill(&self) {
        if let Some((mut child, _stdin)) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM (graceful shutdown) and waits until the operator is gone.
    pub fn terminate(&self) {
        if let Some((mut child, _stdin)) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }

    /// Waits for the operator to exit on its own (e.g. at a failpoint); returns whether it did.
    pub async fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            {
                let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
                match guard.as_mut().map(|(c, _)| c.try_wait()) {
                    Some(Ok(Some(_))) | None => {
                        guard.take();
                        return true;
                    }
                    _ => {}
                }
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
        }
    }

    /// Kills the operator if it runs, then starts it again with `env`.
    pub fn restart(&self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.kill();
        self.spawn(env)
    }

    /// Waits until `/readyz` answers 200 (start-up sweep done, controllers running).
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let port = self.metrics_port;
        poll_until(Duration::from_secs(30), "operator /readyz", || async move {
            Ok(http_get(port, "/readyz")
                .ok()
                .filter(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
                .map(|_| ()))
        })
        .await
    }

    /// The operator's `/metrics` text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        http_get(self.metrics_port, "/metrics")
    }

    /// The operator's log so far (for assertions and failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log has a line `matches` accepts and returns it: an audit line follows the
    /// status write a test waits for, so it may land a moment after the test sees the phase.
    pub async fn wait_log_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        poll_until(Duration::from_secs(10), what, || {
            let line = self.log().lines().find(|l| matches(l)).map(str::to_string);
            async move { Ok(line) }
        })
        .await
        .with_context(|| self.log())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// The operator shared by the tests of this run, started on first use.
pub async fn operator() -> anyhow::Result<&'static Operator> {
    static OPERATOR: tokio::sync::OnceCell<Operator> = tokio::sync::OnceCell::const_new();
    install_crds().await?;
    let op = OPERATOR
        .get_or_try_init(|| async {
            match std::env::var("AGENTID_E2E_OPERATOR_RBAC").as_deref() {
                // The second pass of tests/run: the operator acts as the chart's ServiceAccount,
                // proving the chart's RBAC suffices.
                Ok("chart") => crate::chart::operator_with_chart_rbac(&cluster().dir).await,
                _ => Operator::start(&cluster().dir, &[]),
            }
        })
        .await?;
    op.wait_ready().await?;
    Ok(op)
}

/// A control plane of one test's own (for tests that kill the operator), stopped on drop.
pub struct PrivateCluster {
    /// The cluster's directory (admin.kubeconfig and logs).
    pub dir: PathBuf,
}

impl PrivateCluster {
    /// Starts a fresh control plane with the CRDs installed.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let dir = repo_root().join(format!("tests/.clusters/{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        run(Command::new(cluster_script())
            .arg("up")
            .arg(&dir)
            .env("AGENTID_CP_OWNER_PID", std::process::id().to_string()))?;
        let this = Self { dir };
        let client = this.admin().await?;
        apply_crds(&client).await?;
        Ok(this)
    }

    /// A cluster-admin client.
    pub async fn admin(&self) -> anyhow::Result<Client> {
        client_from_kubeconfig(&self.dir.join("admin.kubeconfig")).await
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = Command::new(cluster_script()).arg("down").arg(&self.dir).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `check` every 50 ms until it yields a value, for at most `timeout`.
pub async fn poll_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_error:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
}

/// The HTTP status of a failed request, or None for success or a non-API error.
pub fn status_code<T>(result: &kube::Result<T>) -> Option<u16> {
    match result {
        Err(kube::Error::Api(s)) => Some(s.code),
        _ => None,
    }
}

/// Asserts a request was refused by RBAC (403).
#[track_caller]
pub fn assert_forbidden<T: std::fmt::Debug>(result: kube::Result<T>, what: &str) {
    assert_eq!(status_code(&result), Some(403), "{what}: expected 403 Forbidden, got {result:?}");
}
