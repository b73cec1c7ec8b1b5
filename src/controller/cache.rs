//! Caches of the cluster objects drift and exposure analysis read: Roles and ClusterRoles (rules),
//! RoleBindings and ClusterRoleBindings (subjects), and Secrets by metadata only — the operator
//! never caches Secret data, so a legacy token is known by its
//! `kubernetes.io/service-account.name` annotation, never by its content. Every cached object is
//! slimmed first (see [`slim`]).

use futures::{FutureExt, StreamExt, stream::BoxStream};
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

use crate::policy::install::Installation;

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

/// Binding changes (deletions too), each yielded only once the caches hold it: a reconcile a
/// binding triggers sees that binding. They fill the binding caches, so they must be polled (the
/// identity controller does).
pub struct BindingChanges {
    /// RoleBindings made, changed or deleted.
    pub role_bindings: BoxStream<'static, watcher::Result<RoleBinding>>,
    /// ClusterRoleBindings made, changed or deleted.
    pub cluster_role_bindings: BoxStream<'static, watcher::Result<ClusterRoleBinding>>,
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

/// A watch of `api` that fills a cache (slimmed objects) and yields each touched object after
/// the cache has it.
pub fn cached<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, BoxStream<'static, watcher::Result<K>>)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config).modify(slim::<K>).default_backoff().reflect(writer).touched_objects();
    (store, stream.boxed())
}

impl ClusterView {
    /// Starts watching; the Role, ClusterRole and Secret stores fill in the background, the
    /// binding stores as their changes are polled.
    pub fn start(client: &Client, installation: &Installation) -> (Self, BindingChanges) {
        let (roles, writer) = reflector::store();
        spawn("Roles", watcher(Api::<Role>::all(client.clone()), watcher::Config::default()), writer);
        let (cluster_roles, writer) = reflector::store();
        spawn("ClusterRoles", watcher(Api::<ClusterRole>::all(client.clone()), watcher::Config::default()), writer);
        let apis = match installation.namespaces() {
            None => vec![Api::<PartialObjectMeta<Secret>>::all(client.clone())],
            Some(namespaces) => namespaces.iter().map(|ns| Api::namespaced(client.clone(), ns)).collect(),
        };
        let secrets = apis
            .into_iter()
            .map(|api| {
                let (store, writer) = reflector::store();
                spawn("Secrets", watcher(api, watcher::Config::default()), writer);
                store
            })
            .collect();
        let (role_bindings, role_binding_changes) =
            cached(Api::<RoleBinding>::all(client.clone()), watcher::Config::default());
        let (cluster_role_bindings, cluster_role_binding_changes) =
            cached(Api::<ClusterRoleBinding>::all(client.clone()), watcher::Config::default());
        let view = Self { roles, cluster_roles, secrets, role_bindings, cluster_role_bindings };
        let changes =
            BindingChanges { role_bindings: role_binding_changes, cluster_role_bindings: cluster_role_binding_changes };
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
