//! The e2e harness: one real control plane per test run, a namespace per test, and clients that
//! act as any user, group or ServiceAccount token.
//!
//! Set `AGENTID_E2E_CLUSTER=DIR` to reuse a control plane started with
//! `tests/control-plane/cluster up DIR` (what `tests/run` does); otherwise the first test starts
//! one under `tests/.clusters/` that stops itself when this test process exits.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail, ensure};
use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
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
    dir: PathBuf,
    /// Users already written, with their groups: a name must keep its groups for the whole run.
    users: Mutex<HashMap<String, Vec<String>>>,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cluster_script() -> PathBuf {
    repo_root().join("tests/control-plane/cluster")
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
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
        Cluster {
            dir,
            users: Mutex::new(HashMap::new()),
        }
    })
}

impl Cluster {
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
                    run(Command::new(cluster_script())
                        .arg("user")
                        .arg(&self.dir)
                        .arg(user)
                        .args(&groups))?;
                    users.insert(user.to_string(), groups);
                }
            }
        }
        client_from_kubeconfig(&path).await
    }
}

/// A client from a kubeconfig file, as `kubectl --kubeconfig` would use it.
pub async fn client_from_kubeconfig(path: &Path) -> anyhow::Result<Client> {
    let kubeconfig =
        Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
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
            let api: Api<CustomResourceDefinition> = Api::all(client);
            let ssa = PatchParams::apply("agentid-e2e").force();
            for entry in std::fs::read_dir(repo_root().join("crds"))? {
                let path = entry?.path();
                let crd: CustomResourceDefinition =
                    serde_saphyr::from_str(&std::fs::read_to_string(&path)?)
                        .with_context(|| format!("parsing {}", path.display()))?;
                let name = crd.name_any();
                api.patch(&name, &ssa, &Patch::Apply(&crd))
                    .await
                    .with_context(|| format!("applying {name}"))?;
                let established =
                    await_condition(api.clone(), &name, conditions::is_crd_established());
                tokio::time::timeout(Duration::from_secs(30), established)
                    .await
                    .with_context(|| format!("{name} not established within 30s"))??;
            }
            anyhow::Ok(())
        })
        .await?;
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
        let name = format!(
            "e2e-{prefix}-{unique:05x}{}",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {E2E_LABEL: "true"}}
        }))?;
        Api::<Namespace>::all(admin.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(Self {
            name,
            admin: admin.clone(),
        })
    }

    /// Deletes the namespace (the controller-manager removes its content).
    pub async fn delete(self) -> anyhow::Result<()> {
        Api::<Namespace>::all(self.admin)
            .delete(&self.name, &DeleteParams::default())
            .await?;
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
