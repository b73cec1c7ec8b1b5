//! Caches of the cluster objects exposure analysis reads: Roles and ClusterRoles (rules), and
//! Secrets by metadata only — the operator never caches Secret data, so a legacy token is known by
//! its `kubernetes.io/service-account.name` annotation, never by its content.

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::{
    core::v1::Secret,
    rbac::v1::{ClusterRole, Role},
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
}

impl ClusterView {
    /// Starts watching; the stores fill in the background.
    pub fn start(client: &Client, installation: &Installation) -> Self {
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
        Self { roles, cluster_roles, secrets }
    }

    /// Whether every store has its first full list.
    pub fn ready(&self) -> bool {
        self.roles.wait_until_ready().now_or_never().is_some()
            && self.cluster_roles.wait_until_ready().now_or_never().is_some()
            && self.secrets.iter().all(|s| s.wait_until_ready().now_or_never().is_some())
    }
}

fn spawn<K>(
    what: &'static str,
    stream: impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    writer: reflector::store::Writer<K>,
) where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    // Managed fields are most of an object's size and never read here.
    let stream = stream.modify(|o: &mut K| o.meta_mut().managed_fields = None).default_backoff().reflect(writer);
    tokio::spawn(stream.for_each(move |event| {
        if let Err(e) = event {
            warn!(watch = what, error = %e, "watch failed; retrying with backoff");
        }
        futures::future::ready(())
    }));
}
