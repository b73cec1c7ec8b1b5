//! The operator: one reconciler per kind. Each observes, asks `policy` what to do, applies it
//! with server-side apply under one field manager, and writes status conditions.

mod backlog;
pub mod binding_index;
pub mod cache;
mod grant;
mod grant_index;
mod identity;
mod startup;
pub mod store;
mod triggers;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use k8s_openapi::api::{
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRoleBinding, RoleBinding},
};
use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as K8sEvent},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{PartialObjectMeta, Patch, PatchParams, PostParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::EventType,
        finalizer::{Event as FinalizerEvent, finalizer},
        reflector::{self, ObjectRef, Store},
        watcher::{self, watcher},
    },
};
use serde::Serialize;
use serde_json::json;
use tracing::{info, warn};

use crate::{
    admission::server::WebhookSettings,
    api::{AccessGrant, AgentIdentity, Approval, GrantPhase, ProtectedResource},
    credentials::{self, kubernetes::KubernetesIssuer},
    metrics::{HttpState, Metrics},
    policy::{
        desired::{self, ClusterAccess},
        drift::Shape,
        exposure::HasRules as _,
        install::Installation,
        names,
    },
};

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Issuing or revoking a credential failed.
    #[error(transparent)]
    Credentials(#[from] credentials::Error),
    /// Reading or writing an agentid object failed.
    #[error("{action}: {source}")]
    Kube {
        /// What agentid was doing.
        action: String,
        /// The apiserver's answer.
        #[source]
        source: kube::Error,
    },
    /// Adding or removing a finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The RoleBinding and ClusterRoleBinding caches never had a first list (or there are no
    /// caches): standing privilege and exposure cannot be analysed.
    #[error(
        "the RoleBinding and ClusterRoleBinding caches have not been filled after {0} s, so standing privilege and exposure cannot be analysed: see this log's \"watch failed\" lines (agentid needs list and watch on both, cluster-wide)"
    )]
    BindingsNotCached(u64),
}

impl Error {
    /// A bounded label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Credentials(e) => e.category(),
            Self::Kube { .. } => "kube",
            Self::BindingsNotCached(_) => "caches",
            Self::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => {
                    e.category()
                }
                _ => "finalizer",
            },
        }
    }

    /// Errors that retrying will not fix until a human changes something (RBAC, input).
    pub fn is_permanent(&self) -> bool {
        matches!(self.category(), "forbidden" | "invalid")
    }
}

pub(crate) fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// Settings of `agentid run`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    /// How issued kubeconfigs reach the apiserver.
    pub access: ClusterAccess,
    /// Resources that always need approval, whatever the identity says.
    pub protected: Vec<ProtectedResource>,
    /// The namespaces this installation serves (its RBAC reaches no further).
    pub installation: Installation,
    /// The admission webhook.
    pub webhook: WebhookSettings,
    /// Leader election (namespace and this replica's identity); None: this process always leads.
    pub leader_election: Option<LeaderElection>,
    /// The most grants one identity may hold at once (its credentials Secret holds them all).
    pub max_active_grants: usize,
    /// How many grants are reconciled at once.
    pub grant_workers: u16,
}

/// Caches of the objects agentid makes for each identity (labelled `component=base`) that the
/// cluster view does not hold already (its credentials Secret is in [`cache::ClusterView::secrets`]).
#[derive(Clone)]
pub struct OwnedCaches {
    /// The base ServiceAccounts: whether each exists, its owner, and whether it mounts its token.
    pub service_accounts: store::Cache<store::BaseServiceAccount>,
}

/// How long an identity's base objects, once applied (or first found made by this process), are
/// trusted from the caches before they are applied again. The caches show on every reconcile
/// what safety rests on — each object there and the identity's, the ServiceAccount not mounting
/// its token, the Role's rules and the binding's subjects as made — and any change to those wakes
/// the identity; applying again restores the rest (labels). At once a minute, 10,000
/// identities each looked at every five minutes cost the apiserver 200 requests a second, and a
/// restarted operator applied every identity's objects again before anything else.
const BASE_REAPPLY: Duration = Duration::from_secs(30 * 60);

/// A share of `period` picked by `uid`: the same for an identity each time, spread evenly over
/// identities.
pub(crate) fn spread(uid: &str, period: Duration) -> Duration {
    use std::hash::{BuildHasher, BuildHasherDefault};
    let hash = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(uid);
    period.mul_f64((hash % 10_000) as f64 / 10_000.0)
}

/// How many identities are reconciled at once (grants: `Settings::grant_workers`). Unbounded, a
/// flood of thousands of new grants opened a connection to the apiserver per request in flight
/// (7,765 at once in the benchmark) and starved the admission webhook past the apiserver's 10 s
/// timeout.
const IDENTITY_WORKERS: u16 = 16;

/// Where the leader Lease lives and who this replica is.
#[derive(Debug, Clone)]
pub struct LeaderElection {
    /// The Lease's namespace (agentid's own).
    pub namespace: String,
    /// This replica's identity (the pod name).
    pub identity: String,
}

/// The leader Lease's name.
pub const LEASE_NAME: &str = "agentid-leader";

/// Resolves on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Shared by every reconcile.
pub struct Context {
    pub(crate) client: Client,
    pub(crate) issuer: KubernetesIssuer,
    pub(crate) metrics: Arc<Metrics>,
    /// Resources the cluster-wide policy marks protected.
    pub(crate) protected: Vec<ProtectedResource>,
    /// The namespaces this installation serves.
    pub(crate) installation: Installation,
    /// Whether agentid's admission webhook is registered: only then are the requester and
    /// approver records on grants and Approvals trustworthy, so only then do Approvals count.
    pub(crate) admission_registered: bool,
    /// Roles, ClusterRoles, bindings and Secret metadata, for drift and exposure analysis. An
    /// identity is analysed only from these caches: without them (None) its reconciles fail.
    pub(crate) view: Option<cache::ClusterView>,
    /// Every AccessGrant, as the grant controller sees them (None: read from the apiserver).
    pub(crate) grants: Option<Store<AccessGrant>>,
    /// Every Approval, as watched (None: read from the apiserver). Only a grant that needs no
    /// approval is decided from it, and for such a grant only a Deny counts.
    pub(crate) approvals: Option<Store<Approval>>,
    /// The binding caches' bindings by the ServiceAccounts they reach (filled only when `view`
    /// is set).
    binding_index: Arc<binding_index::BindingIndex>,
    /// The grant cache's names per identity (filled only when `grants` is set).
    grant_index: Arc<grant_index::GrantIndex>,
    /// Grant status writes of this process, whose watch events need no reconcile.
    own_writes: triggers::OwnWrites,
    /// The most grants one identity may hold at once.
    pub(crate) max_active_grants: usize,
    /// Per identity (`namespace/name`), grants this process has begun issuing that the grant
    /// cache does not show issued yet.
    issuing: Mutex<HashMap<String, std::collections::BTreeSet<String>>>,
    /// Grants (by uid) whose credential this process began ending: never issued afresh, whatever
    /// status says later. Kept until the grant goes away or settles.
    ended: Mutex<std::collections::HashSet<String>>,
    /// The identities' own ServiceAccounts and credentials Secrets (metadata), as watched.
    pub(crate) owned: Option<OwnedCaches>,
    /// Per identity (`namespace/name`): the uid and generation whose base objects were last
    /// applied, and when.
    base_applied: Mutex<HashMap<String, (String, i64, std::time::Instant)>>,
    /// Consecutive failures per object, for per-object exponential backoff. An object that
    /// leaves the watch is forgotten (one that failed and then went, its retry dropped, stayed).
    failures: Arc<Mutex<HashMap<String, u32>>>,
}

impl Context {
    /// A context acting through `client`.
    pub fn new(
        client: Client,
        access: ClusterAccess,
        protected: Vec<ProtectedResource>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            issuer: KubernetesIssuer::new(client.clone(), access),
            client,
            metrics,
            protected,
            installation: Installation::default(),
            admission_registered: true,
            view: None,
            grants: None,
            approvals: None,
            grant_index: Arc::default(),
            binding_index: Arc::default(),
            own_writes: Default::default(),
            max_active_grants: crate::policy::capacity::DEFAULT_MAX_ACTIVE_GRANTS,
            issuing: Mutex::default(),
            ended: Mutex::default(),
            owned: None,
            base_applied: Mutex::default(),
            failures: Arc::default(),
        }
    }

    /// Publishes an Event about `obj`. Events are best effort: a failure is logged, not fatal.
    pub(crate) async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = k8s_event(obj.object_ref(&()), type_, reason, note, Timestamp::now());
        let ns = event.metadata.namespace.clone().unwrap_or_default();
        if let Err(e) =
            Api::<K8sEvent>::namespaced(self.client.clone(), &ns).create(&PostParams::default(), &event).await
        {
            warn!(error = %e, reason, "could not publish event");
        }
    }

    /// Writes a grant's status and remembers the version written (its watch event then
    /// triggers no second reconcile). Not for a grant being deleted: its finalizer still has to
    /// be run by a reconcile, and a write made outside the controller (the start-up sweep) has
    /// scheduled none — skipping its event left such a grant undeleted.
    pub(crate) async fn write_grant_status(
        &self,
        grant: &AccessGrant,
        status: &crate::api::AccessGrantStatus,
    ) -> Result<(), Error> {
        let written = apply_status(&self.client, grant, status).await?;
        if let (Some(rv), Some(uid), None) = (written, grant.uid(), grant.metadata.deletion_timestamp.as_ref()) {
            self.own_writes.record(uid, rv);
        }
        Ok(())
    }

    /// Drops what this process remembers of a grant that is going away.
    pub(crate) fn forget_grant(&self, grant: &AccessGrant) {
        if let Some(uid) = grant.uid() {
            self.own_writes.forget(&uid);
            self.ended.lock().unwrap_or_else(|e| e.into_inner()).remove(&uid);
        }
    }

    /// Records that this process begins ending `grant`'s credential.
    pub(crate) fn ending(&self, grant: &AccessGrant) {
        if let Some(uid) = grant.uid() {
            self.ended.lock().unwrap_or_else(|e| e.into_inner()).insert(uid);
        }
    }

    /// Whether this process began ending `grant`'s credential.
    pub(crate) fn ended(&self, grant: &AccessGrant) -> bool {
        grant.uid().is_some_and(|uid| self.ended.lock().unwrap_or_else(|e| e.into_inner()).contains(&uid))
    }

    /// The grants of identity `identity` in `ns`, read from the apiserver.
    pub(crate) async fn list_grants_of(&self, ns: &str, identity: &str) -> Result<Vec<AccessGrant>, Error> {
        let grants = Api::<AccessGrant>::namespaced(self.client.clone(), ns)
            .list(&kube::api::ListParams::default())
            .await
            .map_err(kube_err("listing AccessGrants"))?;
        Ok(grants.items.into_iter().filter(|g| g.spec.identity == identity).collect())
    }

    /// The grants of identity `identity` in `ns`: from the grant cache (which holds every grant
    /// change before a controller hears of it), or read while the cache is still filling.
    pub(crate) async fn grants_of(&self, ns: &str, identity: &str) -> Result<Vec<Arc<AccessGrant>>, Error> {
        if let Some(store) = self.grants.as_ref().filter(|s| cache::ready(s)) {
            return Ok(self.grant_index.grants_of(store, ns, identity));
        }
        Ok(self.list_grants_of(ns, identity).await?.into_iter().map(Arc::new).collect())
    }

    /// Counts `grant` against its identity's cap before it is issued (see `policy::capacity`);
    /// Err: the identity holds `limit` already.
    pub(crate) async fn reserve_slot(&self, grant: &AccessGrant) -> Result<Result<(), usize>, Error> {
        let ns = grant.namespace().unwrap_or_default();
        let identity = &grant.spec.identity;
        let grants = self.grants_of(&ns, identity).await?;
        let mut seen = crate::policy::capacity::Holdings::default();
        for g in grants {
            let status = g.status.as_ref();
            if status.and_then(|s| s.phase).is_some_and(GrantPhase::is_terminal)
                || g.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            let uid = g.uid().unwrap_or_default();
            // Holding: Active. An end in status alone (written by anyone able to write status)
            // holds nothing and takes no room.
            match status.and_then(|s| s.phase) {
                Some(GrantPhase::Active) => seen.holding.insert(uid),
                _ => seen.waiting.insert(uid),
            };
        }
        let key = identity_key(&ns, identity);
        let mut issuing = self.issuing.lock().unwrap_or_else(|e| e.into_inner());
        let reserved = issuing.entry(key.clone()).or_default();
        let uid = grant.uid().unwrap_or_default();
        let outcome = crate::policy::capacity::reserve(&uid, &seen, reserved, self.max_active_grants);
        if reserved.is_empty() {
            issuing.remove(&key);
        }
        Ok(outcome)
    }

    /// Whether the caches show the identity's base objects (ServiceAccount, credentials Secret,
    /// requester Role and RoleBinding) as made (owned by the identity; the ServiceAccount not
    /// mounting its token; the Role's rules and the binding's subjects unchanged), and they were
    /// applied for this generation less than [`BASE_REAPPLY`] ago: then a reconcile (most come
    /// from its grants changing) need not apply them again. One deleted, replaced or edited is made again at once: its change wakes the
    /// identity, and this says no. Found made by a process that has not applied them yet (it
    /// started since), they count as applied at a time spread over the last [`BASE_REAPPLY`] by
    /// the identity's uid, so that a restart does not apply every identity's objects again at
    /// once, nor all of them again at the same moment later.
    pub(crate) fn base_objects_current(&self, identity: &AgentIdentity) -> bool {
        let (Some(owned), Some(view)) = (&self.owned, &self.view) else { return false };
        let ns = identity.namespace().unwrap_or_default();
        let name = identity.name_any();
        let sa = ObjectRef::new(&names::identity_service_account(&name)).within(&ns);
        let secret = ObjectRef::new(&names::identity_credentials_secret(&name)).within(&ns);
        // The requester Role and its RoleBinding share a name.
        let requester = names::identity_requester_role(&name);
        owned
            .service_accounts
            .get(&sa)
            .is_some_and(|m| m.meta().owned_by_identity(&name) && m.automount_token() == desired::BASE_AUTOMOUNT_TOKEN)
            && view.secrets.iter().any(|s| s.get(&secret).is_some_and(|m| m.owned_by_identity(&name)))
            && view
                .roles
                .get(&ObjectRef::new(&requester).within(&ns))
                .is_some_and(|r| r.meta().owned_by_identity(&name) && desired::requester_rules_current(r.rules()))
            && view
                .role_bindings
                .get(&ObjectRef::new(&requester).within(&ns))
                .is_some_and(|b| desired::requester_binding_current(identity, &b))
            && (self.base_applied_recently(identity) || self.base_found_made(identity))
    }

    /// The uid of identity `identity`'s credentials Secret in `ns` where the cache shows it as
    /// agentid's, made for that identity.
    pub(crate) fn identity_secret_uid(&self, ns: &str, identity: &str) -> Option<String> {
        let secret = ObjectRef::new(&names::identity_credentials_secret(identity)).within(ns);
        let cached = self.view.as_ref()?.secrets.iter().find_map(|s| s.get(&secret))?;
        cached.owned_by_identity(identity).then(|| cached.uid().map(String::from)).flatten()
    }

    /// Whether this process applied the identity's base objects for its uid and generation (or
    /// found them made, see [`Self::base_objects_current`]) less than [`BASE_REAPPLY`] ago.
    pub(crate) fn base_applied_recently(&self, identity: &AgentIdentity) -> bool {
        let key = identity_key(&identity.namespace().unwrap_or_default(), &identity.name_any());
        self.base_applied.lock().unwrap_or_else(|e| e.into_inner()).get(&key).is_some_and(|(uid, generation, at)| {
            Some(uid) == identity.metadata.uid.as_ref()
                && Some(*generation) == identity.metadata.generation
                && at.elapsed() < BASE_REAPPLY
        })
    }

    /// Records, if nothing is recorded for the identity yet, that its base objects were applied
    /// at a time spread over the last [`BASE_REAPPLY`]; true if so.
    fn base_found_made(&self, identity: &AgentIdentity) -> bool {
        self.record_base_applied(identity, true, |uid| {
            let now = std::time::Instant::now();
            now.checked_sub(spread(uid, BASE_REAPPLY)).unwrap_or(now)
        })
    }

    /// Records that the identity's base objects were applied now.
    pub(crate) fn base_objects_applied(&self, identity: &AgentIdentity) {
        self.record_base_applied(identity, false, |_| std::time::Instant::now());
    }

    /// Records the identity's base objects as applied at `at` (given its uid) — with `first`,
    /// only if nothing is recorded for it yet; true if recorded.
    fn record_base_applied(
        &self,
        identity: &AgentIdentity,
        first: bool,
        at: impl FnOnce(&str) -> std::time::Instant,
    ) -> bool {
        let (Some(uid), Some(generation)) = (identity.metadata.uid.as_ref(), identity.metadata.generation) else {
            return false;
        };
        // Kept for the identity's life, like the caches.
        crate::alloc::long_lived(|| {
            let key = identity_key(&identity.namespace().unwrap_or_default(), &identity.name_any());
            let mut applied = self.base_applied.lock().unwrap_or_else(|e| e.into_inner());
            if first && applied.contains_key(&key) {
                return false;
            }
            applied.insert(key, (uid.clone(), generation, at(uid)));
            true
        })
    }

    /// Forgets a deleted identity.
    pub(crate) fn forget_identity(&self, identity: &AgentIdentity) {
        let key = identity_key(&identity.namespace().unwrap_or_default(), &identity.name_any());
        self.base_applied.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    }

    fn backoff_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
        format!("{}/{}/{}", K::kind(&()), obj.namespace().unwrap_or_default(), obj.name_any())
    }

    pub(crate) fn succeeded<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        forget_failures(&self.failures, obj);
    }

    /// The delay before retrying `obj` after its `n`th consecutive failure: 1 s doubling to 5 min.
    fn next_retry<K: Resource<DynamicType = ()>>(&self, obj: &K, permanent: bool) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(Self::backoff_key(obj)).or_insert(0);
        *n = n.saturating_add(1);
        if permanent {
            return Duration::from_secs(300);
        }
        Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300))
    }
}

/// Forgets `obj`'s consecutive failures.
fn forget_failures<K: Resource<DynamicType = ()>>(failures: &Mutex<HashMap<String, u32>>, obj: &K) {
    failures.lock().unwrap_or_else(|e| e.into_inner()).remove(&Context::backoff_key(obj));
}

/// The key of per-identity records: `namespace/name`.
fn identity_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// Runs `apply` or, for an object being deleted, `cleanup` under finalizer `finalizer_name`, and
/// resets the object's backoff on success.
pub(crate) async fn reconcile_with_finalizer<K>(
    obj: Arc<K>,
    ctx: &Context,
    finalizer_name: &str,
    apply: impl AsyncFn(&K, &Context) -> Result<Action, Error>,
    cleanup: impl AsyncFn(&K, &Context) -> Result<Action, Error>,
) -> Result<Action, Error>
where
    K: crate::credentials::Object,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let result = finalizer(&api, finalizer_name, obj.clone(), |event| async {
        match event {
            FinalizerEvent::Apply(o) => apply(&o, ctx).await,
            FinalizerEvent::Cleanup(o) => cleanup(&o, ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if result.is_ok() {
        ctx.succeeded(obj.as_ref());
    }
    result
}

/// The action that looks at an object again at `at` (just after it, so `now >= at` holds then).
pub(crate) fn requeue_at(at: Option<Timestamp>, now: Timestamp) -> Action {
    match at {
        Some(at) => {
            let wait = at.duration_since(now).as_millis().max(0) as u64 + 1;
            Action::requeue(Duration::from_millis(wait))
        }
        None => Action::await_change(),
    }
}

/// The Event agentid reports about `regarding`. Each transition is reported once, so there is
/// no series to keep: kube's `Recorder` kept every Event it sent for six minutes to count
/// repeats, which under a flood of grants was tens of MiB holding nothing useful.
fn k8s_event(regarding: ObjectReference, type_: EventType, reason: &str, note: String, now: Timestamp) -> K8sEvent {
    let controller = "agentid".to_string();
    let instance = std::env::var("POD_NAME").unwrap_or_else(|_| controller.clone());
    K8sEvent {
        metadata: ObjectMeta {
            name: Some(event_name(regarding.name.as_deref().unwrap_or("agentid"), now)),
            namespace: Some(regarding.namespace.clone().unwrap_or_else(|| "default".into())),
            ..Default::default()
        },
        action: Some(reason.into()),
        reason: Some(reason.into()),
        note: Some(note),
        type_: Some(match type_ {
            EventType::Normal => "Normal".into(),
            EventType::Warning => "Warning".into(),
        }),
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding),
        reporting_controller: Some(controller),
        reporting_instance: Some(instance),
        ..Default::default()
    }
}

/// `<object>.<nanoseconds in hex>`, the object's name cut so that the whole stays a valid name
/// (at most 253 characters).
fn event_name(object: &str, now: Timestamp) -> String {
    let suffix = format!(".{:x}", now.as_nanosecond());
    let keep = object.char_indices().nth(253 - suffix.len()).map_or(object.len(), |(i, _)| i);
    format!("{}{suffix}", object[..keep].trim_end_matches(['.', '-']))
}

/// Writes `status` to `obj`'s status subresource by server-side apply; returns the
/// resourceVersion written.
pub(crate) async fn apply_status<K>(client: &Client, obj: &K, status: &impl Serialize) -> Result<Option<String>, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let name = obj.name_any();
    let patch = json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status});
    let written = api
        .patch_status(&name, &PatchParams::apply(names::FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(kube_err(format!("writing status of {} {name}", K::kind(&()))))?;
    Ok(written.meta().resource_version.clone())
}

fn error_policy<K: Resource<DynamicType = ()>>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let kind = if K::kind(&()) == "AccessGrant" { "AccessGrant" } else { "AgentIdentity" };
    ctx.metrics.reconcile_failed(kind, error.category());
    let delay = ctx.next_retry(obj.as_ref(), error.is_permanent());
    warn!(kind, namespace = obj.namespace().unwrap_or_default(), name = obj.name_any(), category = error.category(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Deletions of grants' ServiceAccounts (metadata only).
fn grant_service_account_deletions(
    client: &Client,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<ServiceAccount>, watcher::Error>> + Send + 'static {
    let config = watcher::Config::default().labels(&names::all_grants_selector());
    watcher(Api::<PartialObjectMeta<ServiceAccount>>::all(client.clone()), config).default_backoff().try_filter_map(
        |event| {
            futures::future::ready(Ok(match event {
                watcher::Event::Delete(sa) => Some(sa),
                _ => None,
            }))
        },
    )
}

/// One Api per namespace of `namespaces`, or one for the whole cluster when it is empty: a
/// confined installation may read Secrets only in its own namespaces.
pub(crate) fn secret_apis<K>(client: &Client, namespaces: &[String]) -> Vec<Api<K>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    if namespaces.is_empty() {
        return vec![Api::all(client.clone())];
    }
    namespaces.iter().map(|ns| Api::namespaced(client.clone(), ns)).collect()
}

/// Runs the operator until SIGTERM/ctrl-c.
pub async fn run(client: Client, settings: Settings) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let mut context = Context::new(client.clone(), settings.access, settings.protected, metrics.clone());
    context.admission_registered = settings.webhook.endpoint.is_some();
    let (view, view_changes) =
        cache::ClusterView::start(&client, &settings.installation, context.binding_index.clone());
    context.view = Some(view);
    context.installation = settings.installation.clone();
    context.max_active_grants = settings.max_active_grants;

    // The identities' base ServiceAccounts: of each, its owner and whether it mounts its token.
    // Their credentials Secrets are in the cluster view's Secret cache (metadata only: the
    // operator never caches Secret data), which every installation's reaches their namespaces.
    let base_selector = format!("{}={},{}=base", names::MANAGED_BY_LABEL, names::MANAGED_BY, names::COMPONENT_LABEL);
    let (service_accounts, sa_changes) = cache::cached(
        Api::<ServiceAccount>::all(client.clone()),
        watcher::Config::default().labels(&base_selector),
        |sa| cache::trim(sa, cache::Keep::OWNED),
    );
    context.owned = Some(OwnedCaches { service_accounts });

    // One watch of AccessGrants, shared: the grant controller reconciles from it; the identity
    // controller is triggered by it and counts active grants in its cache, which holds each
    // change before any controller hears of it.
    let (grant_store, grant_writer) = reflector::store::<AccessGrant>();
    let (mut fan_out, mut consumers) = cache::FanOut::new(grant_store.clone(), 2, 1024);
    let (grant_changes, grant_events) = (consumers.pop().context("consumer")?, consumers.pop().context("consumer")?);
    // Settled grants are left out (labelled so by `grant::settle`), so that memory and the
    // start-up listing follow the grants that can still change, not every grant ever made. Only
    // with admission, which is what keeps that label off a live grant: without it every grant is
    // watched, and a label set by anyone else hides nothing.
    let grant_watch_config = match context.admission_registered {
        true => watcher::Config::default().labels(&names::unsettled_grants_selector()),
        false => watcher::Config::default(),
    };
    let grant_stream = watcher(Api::<AccessGrant>::all(client.clone()), grant_watch_config)
        .modify(cache::slim_grant)
        .default_backoff()
        .inspect_ok({
            let index = context.grant_index.clone();
            move |event| index.observe(event)
        })
        .inspect_ok({
            let mut store = cache::FloodStore::new(grant_writer, triggers::holds_credential);
            move |event| store.apply(event)
        });
    let failures = context.failures.clone();
    let handed = backlog::Handed::new(2 * usize::from(settings.grant_workers));
    let (deleted, relisted) = (handed.clone(), grant_store.clone());
    let grant_watch = async move {
        let mut grant_stream = std::pin::pin!(grant_stream);
        while let Some(event) = grant_stream.next().await {
            match event {
                // Deleted, or settled out of the watch: no retry of it will run.
                Ok(watcher::Event::Delete(grant)) => {
                    forget_failures(&failures, &grant);
                    deleted.done(&grant);
                }
                // Grants gone in between show no deletion: the places of those handed on free.
                Ok(watcher::Event::InitDone) => {
                    deleted.keep_cached(&relisted);
                    fan_out.send(&watcher::Event::InitDone).await;
                }
                Ok(event) => fan_out.send(&event).await,
                Err(e) => warn!(watch = "AccessGrants", error = %e, "watch failed; retrying with backoff"),
            }
        }
    };
    context.grants = Some(grant_store.clone());
    // Approvals, cached before they trigger their grant's reconcile (a deleted one too: a
    // withdrawn approval revokes what it released).
    let (approval_store, approval_writer) = reflector::store();
    let approval_changes = watcher(Api::<Approval>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(approval_writer)
        .touched_objects();
    context.approvals = Some(approval_store);
    let ctx = Arc::new(context);
    let ready = Arc::new(AtomicBool::new(false));

    let identities: Api<AgentIdentity> = Api::all(client.clone());
    let own = ctx.clone();
    let grant_events = grant_events.filter(move |g| futures::future::ready(!own.own_writes.is_own(g)));
    // The backlog of a flood waits in a queue of ours that is dropped when it empties, not in
    // the controller's scheduler, which keeps the size it grew to: the controller gets as many
    // grants as its workers can start soon.
    let grant_events = backlog::Backlog::new(
        grant_events.boxed(),
        grant_store.clone(),
        handed.clone(),
        metrics.grants_waiting.clone(),
    );
    let grant_controller = Controller::for_shared_stream(grant_events, grant_store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(settings.grant_workers));

    // Admission first: without it no grant records its requester and no Approval is checked.
    crate::admission::server::start(client.clone(), settings.webhook.clone()).await?;

    tokio::spawn(crate::metrics::serve(
        settings.metrics_addr,
        HttpState { metrics: metrics.clone(), grants: grant_store.clone(), ready: ready.clone() },
    ));

    // With leader election every replica serves the webhook (so it is ready now); only the
    // Lease's holder goes on to reconcile.
    let elector = settings
        .leader_election
        .as_ref()
        .map(|le| Arc::new(crate::leader::Elector::new(client.clone(), &le.namespace, LEASE_NAME, &le.identity)));
    if let Some(elector) = &elector {
        ready.store(true, Ordering::Release);
        tokio::select! {
            _ = elector.acquire() => {}
            _ = shutdown_signal() => {
                info!("stopped before becoming the leader");
                return Ok(());
            }
        }
    }
    metrics.leader.set(1);
    // From here on the Lease is renewed in the background; if that fails for the renew deadline,
    // another replica may lead: stop writing at once (the restart starts over as a candidate).
    let holder = elector.clone().map(|elector| {
        tokio::spawn(async move {
            elector.hold().await;
            tracing::error!("lost the leader Lease; exiting so that only the leader writes");
            std::process::exit(1);
        })
    });

    // Overdue revocations and orphans first: nothing is issued before they are done. The sweep,
    // and then both controllers, read the grant cache, so it is filled first (without that, each
    // identity reconciled at start-up listed every grant of its namespace).
    //
    // Only the leader watches: the cache feeds the controllers' queues, and on a replica whose
    // controllers do not run those queues would fill and stop the watch, leaving a stale cache
    // for the sweep to trust once it leads.
    let grant_watch = tokio::spawn(grant_watch);
    let filling = std::time::Instant::now();
    tokio::select! {
        filled = grant_store.wait_until_ready() => filled.context("filling the AccessGrant cache")?,
        _ = shutdown_signal() => {
            info!("stopped before the AccessGrant cache was filled");
            return Ok(());
        }
    }
    info!(seconds = filling.elapsed().as_secs_f64(), grants = grant_store.state().len(), "AccessGrant cache filled");
    startup::sweep(&ctx).await?;

    let (mapper_store, mapper_index) = (grant_store.clone(), ctx.grant_index.clone());
    let identity_changes = {
        let mut changes = triggers::IdentityChanges::default();
        watcher(identities.clone(), watcher::Config::default())
            .default_backoff()
            .try_filter_map(move |event| futures::future::ready(Ok(changes.pass(event))))
    };
    let grant_run = grant_controller
        .watches_stream(identity_changes, move |identity: AgentIdentity| {
            let (ns, name) = (identity.namespace().unwrap_or_default(), identity.name_any());
            let grants = mapper_index.grants_of(&mapper_store, &ns, &name);
            grants.into_iter().map(|g| ObjectRef::from_obj(g.as_ref())).collect::<Vec<_>>()
        })
        // A grant's ServiceAccount deleted by anyone but a revocation: the grant is looked at
        // again at once (an Active grant without it is revoked, CredentialGone).
        .watches_stream(grant_service_account_deletions(&client), |sa: PartialObjectMeta<ServiceAccount>| {
            let labels = sa.labels();
            let grant = labels.get(names::GRANT_LABEL)?;
            Some(ObjectRef::new(grant).within(labels.get(names::GRANT_NAMESPACE_LABEL)?))
        })
        .watches_stream(approval_changes, |approval: Approval| {
            Some(ObjectRef::new(&approval.spec.grant).within(&approval.namespace().unwrap_or_default()))
        })
        .shutdown_on_signal()
        .run(
            move |grant, ctx| {
                handed.done(&grant);
                grant::reconcile(grant, ctx)
            },
            error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));

    let (identity_store, mut identity_writer) = reflector::store();
    let identity_stream = watcher(identities, watcher::Config::default())
        .modify(cache::slim_identity)
        .default_backoff()
        // What `reflect` does, with the store's copy made in the caches' arena (identities are
        // kept for the operator's life; grants, which come and go in floods, are not).
        .inspect_ok(move |event| crate::alloc::long_lived(|| identity_writer.apply_watcher_event(event)))
        .applied_objects();
    let identity_controller = Controller::for_stream(identity_stream, identity_store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(IDENTITY_WORKERS));
    // A binding made or changed anywhere may give an identity standing privilege: look again at
    // every identity its subjects reach.
    let owner_grants = grant_store.clone();
    let reached = move |meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
                        subjects: Option<Vec<k8s_openapi::api::rbac::v1::Subject>>,
                        shape: Option<Shape>| {
        // Of agentid's shape (an identity's requester binding, or a grant's; known by what it
        // binds, never by labels anyone may set): only the identity it belongs to can be
        // concerned. Without this, each grant's RoleBinding woke every identity of its namespace.
        let binding_ns = meta.namespace.unwrap_or_default();
        match shape {
            Some(Shape::Requester { identity }) => return vec![ObjectRef::new(&identity).within(&binding_ns)],
            Some(Shape::Grant) => {
                // The grant whose ServiceAccount it binds (`agentid-grant-NAME-UID8`), if it is
                // still there; otherwise every identity it may reach, as for any binding.
                let owner = subjects.iter().flatten().find_map(|s| {
                    let (ns, sa) = (s.namespace.as_deref()?, s.name.as_str());
                    let (name, _) = sa.strip_prefix(names::GRANT_OBJECT_PREFIX)?.rsplit_once('-')?;
                    let grant = owner_grants.get(&ObjectRef::new(name).within(ns))?;
                    (names::grant_object_name(name, &grant.uid()?) == sa)
                        .then(|| ObjectRef::new(&grant.spec.identity).within(ns))
                });
                if let Some(owner) = owner {
                    return vec![owner];
                }
            }
            None => {}
        }
        let subjects = subjects.unwrap_or_default();
        identity_store
            .state()
            .into_iter()
            .filter(|id| {
                let (ns, name) = (id.namespace().unwrap_or_default(), id.name_any());
                subjects.iter().any(|s| crate::policy::drift::reaches(s, &ns, &name))
            })
            .map(|id| ObjectRef::from_obj(id.as_ref()))
            .collect::<Vec<_>>()
    };
    let reached_too = reached.clone();
    // An identity counts and analyses its grants that hold a credential: it is woken when one
    // starts or stops holding, not by every status write.
    let holding = triggers::Holding::default();
    let holding_changes = grant_changes.filter(move |g| futures::future::ready(holding.changed(g)));
    // Owned objects wake their identity: its base ServiceAccount, and of every Role and Secret
    // change the ones an identity owns (its requester Role, its credentials Secret); the rest only
    // fill the caches.
    let mut identity_controller = identity_controller.owns_stream(sa_changes).owns_stream(view_changes.roles);
    for changes in view_changes.secrets {
        identity_controller = identity_controller.owns_stream(changes);
    }
    let identity_run = identity_controller
        .watches_shared_stream(holding_changes, |grant: Arc<AccessGrant>| {
            Some(ObjectRef::new(&grant.spec.identity).within(&grant.namespace().unwrap_or_default()))
        })
        .watches_stream(view_changes.role_bindings, move |b: RoleBinding| {
            let shape = crate::policy::drift::own_shape(&b);
            reached(b.metadata, b.subjects, shape)
        })
        .watches_stream(view_changes.cluster_role_bindings, move |b: ClusterRoleBinding| {
            reached_too(b.metadata, b.subjects, None)
        })
        .shutdown_on_signal()
        .run(identity::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));

    // Orphans can appear while running too (a grant's finalizer removed by hand): look every
    // five minutes.
    let sweeper = ctx.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(300)).await;
            match startup::sweep_orphans(&sweeper).await {
                Ok(0) => {}
                Ok(n) => info!(orphans = n, "deleted objects of grants that no longer exist"),
                Err(e) => warn!(error = %e, "orphan sweep failed; will retry"),
            }
        }
    });

    ready.store(true, Ordering::Release);
    info!("agentid is running");
    tokio::select! {
        _ = futures::future::join(grant_run, identity_run) => {}
        // Never ends by itself: it feeds both controllers until they stop.
        _ = grant_watch => {}
    }
    if let (Some(holder), Some(elector)) = (holder, &elector) {
        // Stop renewing first, or the renewal could take the released Lease back.
        holder.abort();
        let _ = holder.await;
        elector.release().await;
    }
    info!("agentid stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_names_its_object_reason_and_reporter_and_lives_beside_it() {
        let grant = crate::policy::testing::grant("read", "fixer", "15m", vec![]);
        let now: Timestamp = "2026-11-26T12:00:00Z".parse().expect("valid timestamp");
        let event = k8s_event(grant.object_ref(&()), EventType::Warning, "Rejected", "rejected: x".into(), now);
        assert_eq!(event.metadata.namespace.as_deref(), Some("agents"));
        let name = event.metadata.name.expect("named");
        assert!(name.starts_with("read."), "{name}");
        assert_eq!(event.regarding.as_ref().and_then(|r| r.kind.as_deref()), Some("AccessGrant"));
        assert_eq!((event.type_.as_deref(), event.reason.as_deref()), (Some("Warning"), Some("Rejected")));
        assert_eq!(event.reporting_controller.as_deref(), Some("agentid"));
        assert_eq!(event.event_time, Some(MicroTime(now)));
        assert!(event.series.is_none());
        // Another moment, another Event: no two transitions overwrite each other.
        let later = now.checked_add(jiff::SignedDuration::from_millis(1)).expect("in range");
        let other = k8s_event(grant.object_ref(&()), EventType::Normal, "Issued", String::new(), later);
        assert_ne!(other.metadata.name.as_deref(), Some(name.as_str()));
        // A grant name of the longest kind still gives a valid Event name.
        let long = event_name(&"g".repeat(253), now);
        assert_eq!(long.len(), 253, "{long}");
        assert!(long.ends_with(&format!(".{:x}", now.as_nanosecond())));
    }

    /// A context with the caches the identity controller reads, filled with `identity`'s base
    /// objects as agentid makes them; no apiserver behind its client.
    /// `edit` changes the ServiceAccount, the Secret's metadata and the Role before they are cached.
    fn context_with_base_objects(
        identity: &AgentIdentity,
        edit: impl FnOnce(&mut ServiceAccount, &mut ObjectMeta, &mut k8s_openapi::api::rbac::v1::Role),
    ) -> Context {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("a URL"));
        let client = Client::try_from(config).expect("a client");
        let access = desired::ClusterAccess { server: String::new(), ca_pem: String::new() };
        let mut ctx = Context::new(client, access, vec![], Arc::default());
        let meta = |obj: ObjectMeta| -> serde_json::Value { json!({"metadata": obj}) };
        let (service_accounts, mut sa_filler) = store::cache();
        let mut sa = desired::identity_service_account(identity);
        sa.metadata.uid = Some("sa-uid".into());
        let mut secret = desired::identity_credentials_secret(identity).metadata;
        secret.uid = Some("secret-uid".into());
        let mut role = desired::identity_requester_role(identity);
        edit(&mut sa, &mut secret, &mut role);
        sa_filler.apply(&watcher::Event::Apply(sa));
        let (secrets, mut secret_filler) = store::cache();
        secret_filler.apply(&watcher::Event::Apply(serde_json::from_value(meta(secret)).expect("metadata")));
        let (roles, mut role_filler) = store::cache();
        role_filler.apply(&watcher::Event::Apply(role));
        let (role_bindings, mut binding_filler) = store::cache();
        binding_filler.apply(&watcher::Event::Apply(desired::identity_requester_binding(identity)));
        ctx.owned = Some(OwnedCaches { service_accounts });
        ctx.view = Some(cache::ClusterView {
            roles,
            cluster_roles: store::cache().0,
            secrets: vec![secrets],
            role_bindings,
            cluster_role_bindings: store::cache().0,
            waiting_since: Arc::default(),
        });
        ctx
    }

    #[tokio::test]
    async fn base_objects_found_made_are_trusted_until_their_spread_reapply_time() {
        let mut identity = crate::policy::testing::identity("fixer", &["staging"]);
        identity.metadata.generation = Some(1);
        let ctx = context_with_base_objects(&identity, |_, _, _| {});
        assert_eq!(ctx.identity_secret_uid("agents", "fixer").as_deref(), Some("secret-uid"));
        assert_eq!(ctx.identity_secret_uid("agents", "other"), None, "no Secret of its own cached");

        // A process that has applied nothing yet trusts what the caches show, recorded as applied
        // at a time spread by uid: not every identity's objects applied again after a restart.
        assert!(ctx.base_objects_current(&identity));
        let key = identity_key("agents", "fixer");
        let at = |ctx: &Context| ctx.base_applied.lock().expect("lock").get(&key).map(|(_, _, at)| *at);
        let recorded = at(&ctx).expect("recorded");
        assert!(recorded.elapsed() < BASE_REAPPLY);
        assert!(ctx.base_objects_current(&identity), "still trusted");
        assert_eq!(at(&ctx), Some(recorded), "recorded once, not moved on each look");

        // Due again once that time is BASE_REAPPLY ago.
        let long_ago = std::time::Instant::now().checked_sub(BASE_REAPPLY + Duration::from_secs(1));
        if let Some(long_ago) = long_ago {
            ctx.base_applied.lock().expect("lock").insert(key.clone(), ("uid-fixer".into(), 1, long_ago));
            assert!(!ctx.base_objects_current(&identity), "applied again");
        }
        ctx.base_objects_applied(&identity);
        assert!(ctx.base_objects_current(&identity));

        // A new generation, or the identity made again under its name, applies them again.
        let mut changed = identity.clone();
        changed.metadata.generation = Some(2);
        assert!(!ctx.base_objects_current(&changed));
        let mut remade = identity.clone();
        remade.metadata.uid = Some("uid-fixer-2".into());
        assert!(!ctx.base_objects_current(&remade));

        // What the caches show decides first: an object missing or not the identity's is made
        // again at once, whatever is recorded.
        let other = crate::policy::testing::identity("other", &["staging"]);
        assert!(!ctx.base_objects_current(&other), "no objects of its own cached");
        assert!(ctx.base_applied.lock().expect("lock").get(&identity_key("agents", "other")).is_none());

        // Its ServiceAccount edited to mount its token (or to stop saying it does not): made
        // again at once, however recently applied.
        for automount in [Some(true), None] {
            let ctx = context_with_base_objects(&identity, |sa, _, _| sa.automount_service_account_token = automount);
            ctx.base_objects_applied(&identity);
            assert!(!ctx.base_objects_current(&identity), "automount {automount:?}");
        }

        // One not the identity's (an owner of another identity, or none): made again, and a
        // credentials Secret not made for it is never written into from the cache's word.
        let other = crate::policy::testing::identity("other", &[]);
        let other_owner = || other.controller_owner_ref(&()).map(|o| vec![o]);
        let ctx = context_with_base_objects(&identity, |_, secret, _| secret.owner_references = other_owner());
        ctx.base_objects_applied(&identity);
        assert!(!ctx.base_objects_current(&identity));
        assert_eq!(ctx.identity_secret_uid("agents", "fixer"), None, "read live instead");
        let ctx = context_with_base_objects(&identity, |_, secret, _| secret.owner_references = None);
        assert_eq!(ctx.identity_secret_uid("agents", "fixer"), None);
        let ctx = context_with_base_objects(&identity, |_, _, role| role.metadata.owner_references = other_owner());
        ctx.base_objects_applied(&identity);
        assert!(!ctx.base_objects_current(&identity));
        let ctx = context_with_base_objects(&identity, |sa, _, _| sa.metadata.owner_references = None);
        ctx.base_objects_applied(&identity);
        assert!(!ctx.base_objects_current(&identity));
    }

    #[test]
    fn reapply_times_spread_over_the_period_and_stay_put() {
        let period = Duration::from_secs(1800);
        let spreads: Vec<Duration> = (0..1000).map(|i| spread(&format!("uid-{i}"), period)).collect();
        assert!(spreads.iter().all(|s| *s < period));
        assert_eq!(spread("uid-7", period), spreads[7], "the same for an identity each time");
        let early = spreads.iter().filter(|s| **s < period / 2).count();
        assert!((400..600).contains(&early), "about half in the first half: {early}");
    }
}
