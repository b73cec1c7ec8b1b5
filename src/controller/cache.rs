//! Caches of the cluster objects drift and exposure analysis read: Roles and ClusterRoles (rules),
//! RoleBindings and ClusterRoleBindings (subjects), and Secrets by metadata only — the operator
//! never caches Secret data, so a legacy token is known by its
//! `kubernetes.io/service-account.name` annotation, never by its content. Every cached object's
//! metadata is trimmed to what is read first (see [`Keep`]); grants and identities are slimmed
//! (see [`slim`]).

use std::{collections::BTreeMap, sync::Arc};

use futures::{FutureExt, StreamExt, TryStreamExt, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::Secret,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Client, Resource,
    api::PartialObjectMeta,
    runtime::{
        WatchStreamExt,
        reflector::{Store, store::Writer},
        watcher::{self, watcher},
    },
};
use tracing::warn;

use super::{
    binding_index::{BindingIndex, Indexed},
    store::{self, Cache, Filler},
};
use crate::{
    api::{AccessGrant, AccessGrantStatus, AgentIdentity},
    policy::{approval, decide, drift, exposure, install::Installation, names},
};

/// Read-only views of the cached objects.
#[derive(Clone)]
pub struct ClusterView {
    /// Every Role.
    pub roles: Cache<store::CachedRole>,
    /// Every ClusterRole.
    pub cluster_roles: Cache<ClusterRole>,
    /// Secret metadata: one cache for the whole cluster, or one per namespace of a confined
    /// installation (its RBAC reaches no further).
    pub secrets: Vec<Cache<store::Meta<Secret>>>,
    /// Every RoleBinding.
    pub role_bindings: Cache<RoleBinding>,
    /// Every ClusterRoleBinding.
    pub cluster_role_bindings: Cache<ClusterRoleBinding>,
    /// When a reconcile first found the binding caches not filled: they fill only once the
    /// identity controller runs, which with leader election may be long after they were made.
    pub waiting_since: Arc<std::sync::OnceLock<std::time::Instant>>,
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
    /// Secrets (metadata) made, changed or deleted, one stream per cache of [`ClusterView::secrets`].
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

/// [`slim`] for AgentIdentities, and no labels or annotations: none is read (GitOps tools add
/// several, each map some 600 bytes before its entries).
pub fn slim_identity(identity: &mut AgentIdentity) {
    slim(identity);
    identity.metadata.labels = None;
    identity.metadata.annotations = None;
}

/// What a cache keeps of an object's metadata besides its name, namespace and deletion time:
/// the cluster-wide caches hold every Role, binding and Secret of the cluster, and at scale most
/// of each cached object was metadata nothing reads (a map of labels alone is half a kilobyte).
#[derive(Clone, Copy)]
pub struct Keep {
    /// The labels read (by these keys).
    pub labels: &'static [&'static str],
    /// The annotations read (by these keys).
    pub annotations: &'static [&'static str],
    /// The uid of an object an identity owns (its credentials Secret: credentials are written
    /// only into the one checked).
    pub uid: bool,
    /// Owner references to an AgentIdentity (an identity's object wakes it; ownership is checked
    /// before writing); no other owner is read.
    pub owners: bool,
}

impl Keep {
    /// Roles and ClusterRoles: rules, and owners (an identity's requester Role wakes it).
    pub const ROLES: Keep = Keep { labels: &[], annotations: &[], uid: false, owners: true };
    /// Bindings: the label that marks a cluster default (agentid's own are known by their shape,
    /// never by labels).
    pub const BINDINGS: Keep =
        Keep { labels: &[drift::BOOTSTRAPPING_LABEL], annotations: &[], uid: false, owners: false };
    /// Secrets (metadata only): what exposure tells apart (a legacy token; agentid's are known
    /// by name), and the uid and owners of an identity's credentials Secret.
    pub const SECRETS: Keep =
        Keep { labels: &[], annotations: &[exposure::LEGACY_TOKEN_ANNOTATION], uid: true, owners: true };
    /// Identities' base ServiceAccounts (watched whole, for their automount setting): whether
    /// each exists, and its owner to wake.
    pub const OWNED: Keep = Keep { labels: &[], annotations: &[], uid: false, owners: true };
}

/// Trims `obj`'s metadata to what `keep` says.
pub fn trim<K: Resource>(obj: &mut K, keep: Keep) {
    let meta = obj.meta_mut();
    let only = |map: Option<BTreeMap<String, String>>, keys: &[&str]| {
        map.map(|mut m| {
            m.retain(|k, _| keys.contains(&k.as_str()));
            m
        })
        .filter(|m| !m.is_empty())
    };
    // A map costs its first node (some 600 bytes) however few entries it has, an owner reference
    // a few hundred: most cached objects keep neither.
    let owners = meta.owner_references.take().filter(|_| keep.owners).map(|mut owners| {
        owners.retain(names::is_identity_owner);
        owners
    });
    let owners = owners.filter(|o| !o.is_empty());
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        uid: meta.uid.take().filter(|_| keep.uid && owners.is_some()),
        owner_references: owners,
        labels: only(meta.labels.take(), keep.labels),
        annotations: only(meta.annotations.take(), keep.annotations),
        ..ObjectMeta::default()
    };
}

/// [`slim`] for AccessGrants, and a settled grant (see [`decide::settled`]) keeps only what its
/// deletion and the counts by phase read: metadata without annotations, its spec (the
/// namespaces to clean up), and of its status the phase and times. Nothing reconciles such a
/// grant into a status write, so the dropped parts are never written back; at scale most grants
/// are settled, and their conditions and messages were most of the cache.
pub fn slim_grant(grant: &mut AccessGrant) {
    slim(grant);
    if !decide::settled(grant) {
        // Of its annotations only who asked is read. Its labels stay: settling patches them.
        if let Some(annotations) = grant.metadata.annotations.as_mut() {
            annotations.retain(|k, _| k == approval::REQUESTED_BY);
        }
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

/// [`trim`] for a metadata-only object, which also drops its type (two strings: the store knows
/// the kind).
pub fn trim_meta<K: Resource<DynamicType = ()>>(obj: &mut PartialObjectMeta<K>, keep: Keep) {
    obj.types = None;
    trim(obj, keep);
}

/// A watch of `api` that fills a cache (each object first passed to `prepare`, which trims it;
/// the cache keeps its [`store::Stored`] form `S`) and yields each touched object after the
/// cache has it.
pub fn cached<K, S>(
    api: Api<K>,
    config: watcher::Config,
    prepare: impl FnMut(&mut K) + Send + 'static,
) -> (Cache<S>, BoxStream<'static, watcher::Result<K>>)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    S: store::Stored<Object = K>,
{
    cached_observed(api, config, prepare, |_, _, _| {})
}

/// [`cached`], with `observe` given each watch event and the cache twice: just before the
/// cache applies it (`true`), and just after (`false`).
fn cached_observed<K, S>(
    api: Api<K>,
    config: watcher::Config,
    prepare: impl FnMut(&mut K) + Send + 'static,
    observe: impl Fn(&watcher::Event<K>, &Cache<S>, bool) + Send + 'static,
) -> (Cache<S>, BoxStream<'static, watcher::Result<K>>)
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    S: store::Stored<Object = K>,
{
    let (cache, mut filler) = store::cache();
    let seen = cache.clone();
    let stream = watcher(api, config)
        .modify(prepare)
        .default_backoff()
        // The controller polling these streams drops their errors: say them here (a watch that
        // can never list leaves its cache unfilled, and what waits on it waits).
        .inspect_err(|e| warn!(watch = K::kind(&()).as_ref(), error = %e, "watch failed; retrying with backoff"))
        // The cache's copy, and what the index files, are kept: made in the caches' arena.
        .map_ok(move |event| {
            crate::alloc::long_lived(|| {
                observe(&event, &seen, true);
                filler.apply(&event);
                observe(&event, &seen, false);
            });
            event
        })
        .touched_objects();
    (cache, stream.boxed())
}

/// kube's store writer, for a watch whose objects come in floods (grants). kube's store is a
/// hash map, which keeps the size of its largest flood once the flood has drained: at full size
/// the table left by 50,000 grants made at once holds the 9,000 that stayed, with the flood's
/// objects' pages around theirs. So once the store holds a quarter of its peak or less (a peak of
/// [`FLOOD`] objects or more), it is rebuilt from itself as a re-listing would be — a table sized
/// to what it holds, swapped in whole when complete (readers never see it half-filled), the
/// objects that last (grants holding a credential) copied into the caches' arena — without asking the apiserver and without telling any
/// controller (nothing changed).
pub struct FloodStore<K: Resource<DynamicType = ()> + Clone + 'static> {
    writer: Writer<K>,
    store: Store<K>,
    /// The most objects held since the last rebuild.
    peak: usize,
    /// How many times the store was rebuilt.
    rebuilds: usize,
    /// Which objects a rebuild copies into the caches' arena: those kept long (the rest of a
    /// flood, still draining, would leave that arena's pages partly used when it goes).
    lasting: fn(&K) -> bool,
    /// How many objects the last rebuild copied into the caches' arena.
    lasting_copied: usize,
}

/// The smallest peak after which a drained store is rebuilt.
pub const FLOOD: usize = 4096;

/// Whether a store holding `len` objects after a peak of `peak` is worth rebuilding. Each
/// rebuild copies at most a third as many objects as were deleted since the last. Not at half:
/// that rebuilt mid-flood at full size (44,000 → 22,000 → 11,000), which copied the flood's
/// grants into the caches' arena with the rest, and the process held 17 MiB more after.
fn drained(len: usize, peak: usize) -> bool {
    peak >= FLOOD && len <= peak / 4
}

impl<K> FloodStore<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    /// Applies events to `writer`'s store; a rebuild copies the objects `lasting` picks into the
    /// caches' arena, and the others where any allocation goes.
    pub fn new(writer: Writer<K>, lasting: fn(&K) -> bool) -> Self {
        Self { store: writer.as_reader(), writer, peak: 0, rebuilds: 0, lasting, lasting_copied: 0 }
    }

    /// Applies one watch event, as kube's `reflect` does; then rebuilds the store if a flood
    /// has drained out of it (only after a deletion: never inside a listing).
    pub fn apply(&mut self, event: &watcher::Event<K>) {
        self.writer.apply_watcher_event(event);
        let len = self.store.len();
        // A (re-)listing made a table of its own, sized to what it holds.
        self.peak = match event {
            watcher::Event::InitDone => len,
            _ => self.peak.max(len),
        };
        if matches!(event, watcher::Event::Delete(_)) && drained(len, self.peak) {
            // Each object is copied twice (the event's, freed at once, and the store's), on the
            // watch's task: a short pause of the grant watch once after a flood.
            self.writer.apply_watcher_event(&watcher::Event::Init);
            self.lasting_copied = 0;
            for obj in self.store.state() {
                let listed = watcher::Event::InitApply(K::clone(&obj));
                if (self.lasting)(&obj) {
                    crate::alloc::long_lived(|| self.writer.apply_watcher_event(&listed));
                    self.lasting_copied += 1;
                } else {
                    self.writer.apply_watcher_event(&listed);
                }
            }
            self.writer.apply_watcher_event(&watcher::Event::InitDone);
            tracing::info!(
                kind = K::kind(&()).as_ref(),
                held = len,
                lasting = self.lasting_copied,
                peak = self.peak,
                "cache rebuilt after a flood drained"
            );
            // The rebuilt table holds what the old one held.
            self.peak = len;
            self.rebuilds += 1;
        }
    }
}

/// One watch's objects handed to several consumers (each controller's trigger stream), each
/// after the cache holds it — what kube's shared reflector (`reflect_shared`) does, without its
/// stall: its subscriber looks each announced object up in the cache, and one deleted in between
/// (a grant whose finalizer came off; one settled, which leaves the watch) made it return
/// `Pending` with nothing left to wake it, so that controller heard of no grant again (the
/// e2e suite saw new grants never issued). Here each consumer gets the object itself.
pub struct FanOut<K: Resource<DynamicType = ()> + 'static> {
    store: Store<K>,
    consumers: Vec<futures::channel::mpsc::Sender<Arc<K>>>,
}

impl<K> FanOut<K>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    /// A fan-out of the watch that fills `store`, and `consumers` streams that each get every
    /// applied object, waiting (so holding up the watch) while any has `buffer` unread.
    pub fn new(store: Store<K>, consumers: usize, buffer: usize) -> (Self, Vec<BoxStream<'static, Arc<K>>>) {
        let (senders, streams) = (0..consumers)
            .map(|_| {
                let (tx, rx) = futures::channel::mpsc::channel(buffer);
                (tx, rx.boxed())
            })
            .unzip();
        (Self { store, consumers: senders }, streams)
    }

    /// Hands on what `event` (already applied to the cache) changed: an applied object, or after
    /// a (re-)listing every object the cache holds. Deletions are not handed on (a grant's
    /// finalizer is what its deletion is reconciled by). A consumer that has gone is skipped.
    pub async fn send(&mut self, event: &watcher::Event<K>) {
        let objects: Vec<Arc<K>> = match event {
            watcher::Event::Apply(obj) => vec![Arc::new(obj.clone())],
            watcher::Event::InitDone => self.store.state(),
            _ => return,
        };
        for obj in objects {
            for consumer in &mut self.consumers {
                let _ = futures::SinkExt::send(consumer, obj.clone()).await;
            }
        }
    }
}

impl ClusterView {
    /// Starts watching; the ClusterRole store fills in the background, the others as their
    /// changes are polled.
    pub(crate) fn start(client: &Client, installation: &Installation, index: Arc<BindingIndex>) -> (Self, Changes) {
        let (roles, role_changes) =
            cached(Api::<Role>::all(client.clone()), watcher::Config::default(), |r| trim(r, Keep::ROLES));
        let (cluster_roles, filler) = store::cache();
        spawn(
            "ClusterRoles",
            watcher(Api::<ClusterRole>::all(client.clone()), watcher::Config::default()),
            filler,
            Keep::ROLES,
        );
        let apis = match installation.namespaces() {
            None => vec![Api::<PartialObjectMeta<Secret>>::all(client.clone())],
            Some(namespaces) => namespaces.iter().map(|ns| Api::namespaced(client.clone(), ns)).collect(),
        };
        let (secrets, secret_changes) = apis
            .into_iter()
            .map(|api| cached(api, watcher::Config::default(), |s| trim_meta(s, Keep::SECRETS)))
            .unzip();
        let (role_bindings, role_binding_changes) = cached_observed(
            Api::<RoleBinding>::all(client.clone()),
            watcher::Config::default(),
            |b| trim(b, Keep::BINDINGS),
            observer::<RoleBinding>(index.clone()),
        );
        let (cluster_role_bindings, cluster_role_binding_changes) = cached_observed(
            Api::<ClusterRoleBinding>::all(client.clone()),
            watcher::Config::default(),
            |b| trim(b, Keep::BINDINGS),
            observer::<ClusterRoleBinding>(index),
        );
        let view =
            Self { roles, cluster_roles, secrets, role_bindings, cluster_role_bindings, waiting_since: Arc::default() };
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
        self.role_bindings.is_ready() && self.cluster_role_bindings.is_ready()
    }

    /// Whether every store has its first full list.
    pub fn ready(&self) -> bool {
        self.roles.is_ready()
            && self.cluster_roles.is_ready()
            && self.secrets.iter().all(Cache::is_ready)
            && self.bindings_ready()
    }
}

/// Whether a store has its first full list.
pub fn ready<K: Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> bool {
    store.wait_until_ready().now_or_never().is_some()
}

/// Feeds a binding watch's events to `index`.
fn observer<K: Indexed>(index: Arc<BindingIndex>) -> impl Fn(&watcher::Event<K>, &Cache<K>, bool) + Send + 'static {
    move |event, cache, before| match (event, before) {
        (_, true) => index.observe(event, cache),
        (watcher::Event::InitDone, false) => index.relisted(cache),
        _ => {}
    }
}

fn spawn<K>(
    what: &'static str,
    stream: impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    mut filler: Filler<K>,
    keep: Keep,
) where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let stream = stream.modify(move |obj| trim(obj, keep)).default_backoff().map_ok(move |event| {
        crate::alloc::long_lived(|| filler.apply(&event));
        event
    });
    tokio::spawn(stream.for_each(move |event| {
        if let Err(e) = event {
            warn!(watch = what, error = %e, "watch failed; retrying with backoff");
        }
        futures::future::ready(())
    }));
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};

    use kube::ResourceExt;

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

    #[tokio::test]
    async fn a_fan_out_hands_on_an_object_deleted_before_it_was_read() {
        let (store, mut writer) = kube::runtime::reflector::store::<AccessGrant>();
        let (mut fan, mut streams) = FanOut::new(store, 2, 8);
        let (a, b) = (with(GrantPhase::Active, false), {
            let mut b = with(GrantPhase::Active, false);
            b.metadata.name = Some("other".into());
            b
        });
        // Applied and at once deleted (a finalizer removed), then another: kube's shared
        // reflector lost its consumer at the first (looked up, gone, Pending for ever).
        for event in
            [watcher::Event::Apply(a.clone()), watcher::Event::Delete(a.clone()), watcher::Event::Apply(b.clone())]
        {
            writer.apply_watcher_event(&event);
            fan.send(&event).await;
        }
        for stream in &mut streams {
            let got: Vec<String> =
                vec![stream.next().await.expect("a").name_any(), stream.next().await.expect("b").name_any()];
            assert_eq!(got, [a.name_any(), b.name_any()]);
        }
        // After a listing, everything the cache holds.
        for event in [watcher::Event::Init, watcher::Event::InitApply(b.clone()), watcher::Event::InitDone] {
            writer.apply_watcher_event(&event);
            fan.send(&event).await;
        }
        assert_eq!(streams[0].next().await.expect("listed").name_any(), b.name_any());
    }

    #[test]
    fn a_drained_flood_store_is_rebuilt_with_what_it_holds() {
        let (base, active) = (with(GrantPhase::Rejected, false), with(GrantPhase::Active, false));
        let grant = |i: usize| {
            let mut g = if i.is_multiple_of(10) { active.clone() } else { base.clone() };
            g.metadata.name = Some(format!("g{i}"));
            g.metadata.namespace = Some(format!("ns{}", i % 3));
            g
        };
        let (store, writer) = kube::runtime::reflector::store::<AccessGrant>();
        // Of the grants, every tenth holds a credential (and lasts).
        let mut flood = FloodStore::new(writer, crate::controller::triggers::holds_credential);
        flood.apply(&watcher::Event::Init);
        flood.apply(&watcher::Event::InitDone);
        for i in 0..FLOOD {
            flood.apply(&watcher::Event::Apply(grant(i)));
        }
        // Drained to just over a quarter: not yet.
        for i in 0..FLOOD * 3 / 4 - 1 {
            flood.apply(&watcher::Event::Delete(grant(i)));
        }
        assert_eq!(flood.rebuilds, 0);
        assert_eq!(store.len(), FLOOD / 4 + 1);
        let at = |i: usize| kube::runtime::reflector::ObjectRef::new(&format!("g{i}")).within(&format!("ns{}", i % 3));
        let kept = store.get(&at(FLOOD - 1)).expect("held");
        flood.apply(&watcher::Event::Delete(grant(FLOOD * 3 / 4 - 1)));
        assert_eq!(flood.rebuilds, 1, "rebuilt at a quarter");
        let lasting = (FLOOD * 3 / 4..FLOOD).filter(|i| i.is_multiple_of(10)).count();
        assert_eq!(flood.lasting_copied, lasting, "only the lasting grants into the caches' arena");
        assert_eq!(store.len(), FLOOD / 4, "holding what it held");
        for i in 0..FLOOD {
            let found = store.get(&at(i));
            assert_eq!(found.is_some(), i >= FLOOD * 3 / 4, "g{i}");
            if let Some(g) = found {
                assert_eq!(*g, grant(i), "the same object");
            }
        }
        let copied = store.get(&at(FLOOD - 1)).expect("held");
        assert!(!Arc::ptr_eq(&kept, &copied), "a copy in a new table, not the old one moved");
        // Its new peak is what it holds: small churn after it rebuilds nothing.
        for i in 0..100 {
            flood.apply(&watcher::Event::Apply(grant(FLOOD + i)));
            flood.apply(&watcher::Event::Delete(grant(FLOOD + i)));
        }
        assert_eq!(flood.rebuilds, 1);
        // Nor does a small store however much it drains.
        let (_, writer) = kube::runtime::reflector::store::<AccessGrant>();
        let mut small = FloodStore::new(writer, |_| true);
        for i in 0..FLOOD - 1 {
            small.apply(&watcher::Event::Apply(grant(i)));
        }
        for i in 0..FLOOD - 1 {
            small.apply(&watcher::Event::Delete(grant(i)));
        }
        assert_eq!(small.rebuilds, 0);
        // A re-listing makes a fresh table: what it drops needs no rebuild after.
        let (relisted, writer) = kube::runtime::reflector::store::<AccessGrant>();
        let mut big = FloodStore::new(writer, |_| true);
        for i in 0..FLOOD {
            big.apply(&watcher::Event::Apply(grant(i)));
        }
        big.apply(&watcher::Event::Init);
        for i in 0..10 {
            big.apply(&watcher::Event::InitApply(grant(i)));
        }
        big.apply(&watcher::Event::InitDone);
        big.apply(&watcher::Event::Delete(grant(0)));
        assert_eq!((big.rebuilds, relisted.len()), (0, 9));
    }

    #[test]
    fn trimmed_metadata_keeps_what_is_read_and_nothing_else() {
        let mut secret: PartialObjectMeta<Secret> = serde_json::from_value(serde_json::json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {
                "name": "agentid-fixer-credentials", "namespace": "agents", "uid": "u1",
                "resourceVersion": "42", "generation": 3, "creationTimestamp": "2026-11-26T00:00:00Z",
                "labels": {"app.kubernetes.io/managed-by": "agentid", "agentid.dev/identity": "fixer", "team": "a"},
                "annotations": {"kubernetes.io/service-account.name": "db", "note": "x"},
                "ownerReferences": [{"apiVersion": "agentid.dev/v1alpha1", "kind": "AgentIdentity", "name": "fixer", "uid": "u0"}],
                "finalizers": ["f"]
            }
        }))
        .expect("metadata");
        let mut binding = secret.clone();
        trim(&mut secret, Keep::SECRETS);
        let m = &secret.metadata;
        assert_eq!(
            (m.name.as_deref(), m.namespace.as_deref(), m.uid.as_deref()),
            (Some("agentid-fixer-credentials"), Some("agents"), Some("u1"))
        );
        assert!(m.labels.is_none(), "Secrets are told apart by name, not by labels");
        assert_eq!(
            m.annotations.as_ref().map(|a| a.keys().collect::<Vec<_>>()),
            Some(vec![&"kubernetes.io/service-account.name".to_string()])
        );
        assert!(names::owned_by(m, "AgentIdentity", "fixer"));
        assert!(
            m.resource_version.is_none()
                && m.generation.is_none()
                && m.creation_timestamp.is_none()
                && m.finalizers.is_none()
        );
        let mut default = binding.clone();
        trim(&mut binding, Keep::BINDINGS);
        let m = &binding.metadata;
        assert!(m.uid.is_none() && m.owner_references.is_none() && m.annotations.is_none());
        assert!(m.labels.is_none(), "agentid's bindings are known by shape, not by labels");
        default.metadata.labels = Some([(drift::BOOTSTRAPPING_LABEL.to_string(), "rbac-defaults".to_string())].into());
        trim(&mut default, Keep::BINDINGS);
        assert_eq!(default.metadata.labels.map(|l| l.len()), Some(1), "the cluster-default label is read");

        // A grant's Secret is owned by its AccessGrant: neither owner nor uid is read.
        let mut grant_secret = secret.clone();
        grant_secret.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "agentid.dev/v1alpha1".into(),
            kind: "AccessGrant".into(),
            name: "g".into(),
            uid: "u2".into(),
            ..Default::default()
        }]);
        grant_secret.metadata.uid = Some("u3".into());
        trim(&mut grant_secret, Keep::SECRETS);
        assert!(grant_secret.metadata.owner_references.is_none() && grant_secret.metadata.uid.is_none());
        // Nor an owner of that kind from another API group.
        let mut foreign = secret.clone();
        foreign.metadata.owner_references.iter_mut().flatten().for_each(|o| o.api_version = "example.com/v1".into());
        foreign.metadata.uid = Some("u4".into());
        trim(&mut foreign, Keep::SECRETS);
        assert!(foreign.metadata.owner_references.is_none() && foreign.metadata.uid.is_none());
    }

    #[test]
    fn identities_and_live_grants_keep_only_the_metadata_read() {
        let mut identity = crate::policy::testing::identity("fixer", &["staging"]);
        let tracking = || Some([("argocd.argoproj.io/tracking-id".to_string(), "x".to_string())].into());
        (identity.metadata.labels, identity.metadata.annotations) = (tracking(), tracking());
        identity.metadata.finalizers = Some(vec!["agentid.dev/revoke-grants".into()]);
        slim_identity(&mut identity);
        assert!(identity.metadata.labels.is_none() && identity.metadata.annotations.is_none());
        assert_eq!(identity.metadata.finalizers.map(|f| f.len()), Some(1), "finalizers are read");

        let mut g = with(GrantPhase::Active, false);
        g.metadata.annotations.get_or_insert_default().extend(tracking().unwrap_or_default());
        g.metadata.labels = tracking();
        slim_grant(&mut g);
        let annotations = g.metadata.annotations.unwrap_or_default();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), [approval::REQUESTED_BY], "who asked is read");
        assert_eq!(g.metadata.labels, tracking(), "labels stay: the settle patch adds to them");
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
