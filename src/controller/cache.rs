//! Caches of the cluster objects drift and exposure analysis read: Roles and ClusterRoles (rules),
//! RoleBindings and ClusterRoleBindings (subjects), and Secrets by metadata only — the operator
//! never caches Secret data, so a legacy token is known by its
//! `kubernetes.io/service-account.name` annotation, never by its content. Every cached object is
//! slimmed first (see [`slim`]).

use std::sync::Arc;

use futures::{FutureExt, StreamExt, TryStreamExt, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::Secret,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use kube::{
    Api, Client, Resource,
    api::PartialObjectMeta,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher::{self, watcher},
    },
};
use tracing::warn;

use super::binding_index::{BindingIndex, Indexed};
use crate::{
    api::{AccessGrant, AccessGrantStatus},
    policy::{decide, install::Installation},
};

/// Read-only views of the cached objects.
#[derive(Clone)]
pub struct ClusterView {
    /// Every Role.
    pub roles: Store<Role>,
    /// Every ClusterRole.
    pub cluster_roles: Store<ClusterRole>,
    /// Secret metadata: one store for the whole cluster, or one per namespace of a confined
    /// installation (its RBAC reaches no further).
    pub secrets: Vec<Store<PartialObjectMeta<Secret>>>,
    /// Every RoleBinding.
    pub role_bindings: Store<RoleBinding>,
    /// Every ClusterRoleBinding.
    pub cluster_role_bindings: Store<ClusterRoleBinding>,
}

/// Role, binding and Secret changes (deletions too), each yielded only once the caches hold it: a
/// reconcile a change triggers sees it. They fill those caches, so they must be polled (the
/// identity controller does).
pub struct Changes {
    /// Roles made, changed or deleted.
    pub roles: BoxStream<'static, watcher::Result<Role>>,
    /// RoleBindings made, changed or deleted.
    pub role_bindings: BoxStream<'static, watcher::Result<RoleBinding>>,
    /// ClusterRoleBindings made, changed or deleted.
    pub cluster_role_bindings: BoxStream<'static, watcher::Result<ClusterRoleBinding>>,
    /// Secrets (metadata) made, changed or deleted, one stream per store of [`ClusterView::secrets`].
    pub secrets: Vec<BoxStream<'static, watcher::Result<PartialObjectMeta<Secret>>>>,
}

/// Drops what agentid never reads and what is most of a cached object's size: managed fields and
/// `kubectl apply`'s copy of the whole object.
pub fn slim<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// [`slim`] for AccessGrants, and a settled grant (see [`decide::settled`]) keeps only what its
/// deletion and the counts by phase read: metadata without annotations, its spec (the
/// namespaces to clean up), and of its status the phase and times. Nothing reconciles such a
/// grant into a status write, so the dropped parts are never written back; at scale most grants
/// are settled, and their conditions and messages were most of the cache.
pub fn slim_grant(grant: &mut AccessGrant) {
    slim(grant);
    if !decide::settled(grant) {
        return;
    }
    grant.metadata.annotations = None;
    grant.spec.reason = String::new();
    if let Some(status) = grant.status.as_mut() {
        *status = AccessGrantStatus {
            phase: status.phase,
            requires_approval: status.requires_approval,
            issued_at: status.issued_at.take(),
            expires_at: status.expires_at.take(),
            revoked_at: status.revoked_at.take(),
            observed_generation: status.observed_generation,
            ..Default::default()
        };
    }
}

/// A watch of `api` that fills a cache (slimmed objects) and yields each touched object after
/// the cache has it.
pub fn cached<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, BoxStream<'static, watcher::Result<K>>)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    cached_observed(api, config, |_| {})
}

/// [`cached`], with `observe` called on each watch event just before the cache applies it.
fn cached_observed<K>(
    api: Api<K>,
    config: watcher::Config,
    observe: impl Fn(&watcher::Event<K>) + Send + 'static,
) -> (Store<K>, BoxStream<'static, watcher::Result<K>>)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream =
        watcher(api, config).modify(slim::<K>).default_backoff().inspect_ok(observe).reflect(writer).touched_objects();
    (store, stream.boxed())
}

impl ClusterView {
    /// Starts watching; the ClusterRole store fills in the background, the others as their
    /// changes are polled.
    pub fn start(client: &Client, installation: &Installation, index: Arc<BindingIndex>) -> (Self, Changes) {
        let (roles, role_changes) = cached(Api::<Role>::all(client.clone()), watcher::Config::default());
        let (cluster_roles, writer) = reflector::store();
        spawn("ClusterRoles", watcher(Api::<ClusterRole>::all(client.clone()), watcher::Config::default()), writer);
        let apis = match installation.namespaces() {
            None => vec![Api::<PartialObjectMeta<Secret>>::all(client.clone())],
            Some(namespaces) => namespaces.iter().map(|ns| Api::namespaced(client.clone(), ns)).collect(),
        };
        let (secrets, secret_changes) = apis.into_iter().map(|api| cached(api, watcher::Config::default())).unzip();
        let (role_bindings, role_binding_changes) = cached_observed(
            Api::<RoleBinding>::all(client.clone()),
            watcher::Config::default(),
            observer::<RoleBinding>(index.clone()),
        );
        let (cluster_role_bindings, cluster_role_binding_changes) = cached_observed(
            Api::<ClusterRoleBinding>::all(client.clone()),
            watcher::Config::default(),
            observer::<ClusterRoleBinding>(index),
        );
        let view = Self { roles, cluster_roles, secrets, role_bindings, cluster_role_bindings };
        let changes = Changes {
            roles: role_changes,
            role_bindings: role_binding_changes,
            cluster_role_bindings: cluster_role_binding_changes,
            secrets: secret_changes,
        };
        (view, changes)
    }

    /// Whether the binding stores have their first full list.
    pub fn bindings_ready(&self) -> bool {
        ready(&self.role_bindings) && ready(&self.cluster_role_bindings)
    }

    /// Whether every store has its first full list.
    pub fn ready(&self) -> bool {
        ready(&self.roles) && ready(&self.cluster_roles) && self.secrets.iter().all(ready) && self.bindings_ready()
    }
}

/// Whether a store has its first full list.
pub fn ready<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> bool {
    store.wait_until_ready().now_or_never().is_some()
}

/// Feeds a binding watch's events to `index`.
fn observer<K: Indexed>(index: Arc<BindingIndex>) -> impl Fn(&watcher::Event<K>) + Send + 'static {
    move |event| index.observe(event)
}

fn spawn<K>(
    what: &'static str,
    stream: impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    writer: reflector::store::Writer<K>,
) where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let stream = stream.modify(slim::<K>).default_backoff().reflect(writer);
    tokio::spawn(stream.for_each(move |event| {
        if let Err(e) = event {
            warn!(watch = what, error = %e, "watch failed; retrying with backoff");
        }
        futures::future::ready(())
    }));
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    use super::*;
    use crate::{
        api::GrantPhase,
        policy::testing::{grant, rule},
    };

    fn with(phase: GrantPhase, revoked: bool) -> AccessGrant {
        let mut g = grant("read", "fixer", "15m", vec![rule("staging", "", "pods", "get")]);
        g.metadata.annotations = Some([("agentid.dev/requested-by".to_string(), "bob".to_string())].into());
        let t = Time(jiff::Timestamp::now());
        g.status = Some(AccessGrantStatus {
            phase: Some(phase),
            requested_by: Some("bob".into()),
            expires_at: Some(t.clone()),
            revoked_at: revoked.then(|| t.clone()),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "Expired".into(),
                message: "credential revoked: the grant ran its course".into(),
                last_transition_time: t,
                observed_generation: Some(1),
            }],
            ..Default::default()
        });
        g
    }

    #[test]
    fn a_settled_grant_keeps_only_what_its_deletion_and_counts_read() {
        let mut g = with(GrantPhase::Expired, true);
        slim_grant(&mut g);
        let status = g.status.as_ref().expect("status kept");
        assert_eq!(status.phase, Some(GrantPhase::Expired));
        assert!(status.expires_at.is_some() && status.revoked_at.is_some());
        assert!(status.conditions.is_empty() && status.requested_by.is_none());
        assert!(g.metadata.annotations.is_none() && g.spec.reason.is_empty());
        assert_eq!(g.spec.identity, "fixer");
        assert_eq!(
            crate::policy::desired::GrantObjects::target_namespaces(&g.spec.kubernetes.as_ref().expect("rules").rules),
            ["staging"]
        );
        assert!(decide::settled(&g), "still settled once slimmed");
    }

    #[test]
    fn a_grant_that_may_still_change_is_kept_whole() {
        // Active, and an Expired grant whose revocation was interrupted (no revokedAt).
        for phase in [GrantPhase::Active, GrantPhase::Expired, GrantPhase::Pending] {
            let whole = with(phase, false);
            let mut g = whole.clone();
            slim_grant(&mut g);
            assert_eq!(g, whole, "{phase:?}");
        }
    }
}
