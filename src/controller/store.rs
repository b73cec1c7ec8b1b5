//! A lean cache of watched objects, for the cluster-wide caches (Roles, bindings, Secret and
//! ServiceAccount metadata) that hold every object of their kind at scale.
//!
//! kube's reflector store keys each object by an `ObjectRef`: some 100 bytes in its table plus
//! copies of the name, namespace, uid and resourceVersion — about 280 bytes an object, as much as
//! a trimmed binding's own metadata. Here an object is found by a hash of its namespace and name
//! read from the object itself: its table holds one pointer an object. It applies watch events
//! as kube's does (a re-listing is gathered aside and replaces the contents when it is complete,
//! so readers never see a half-listed cache) and tells when its first listing is in.
//!
//! What it keeps of each object is its [`Stored`] form: the object itself; for Secrets, known by
//! metadata only, a [`Meta`] — the few fields read, without the `ObjectMeta` around them (some
//! 400 bytes of empty fields an object); for identities' base ServiceAccounts a
//! [`BaseServiceAccount`], a `Meta` and the automount setting; for Roles a [`CachedRole`], a
//! `Meta` and the rules.

use std::{
    hash::BuildHasher,
    marker::PhantomData,
    sync::{
        Arc, LazyLock, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use hashbrown::HashTable;
use k8s_openapi::{
    api::{
        core::v1::ServiceAccount,
        rbac::v1::{PolicyRule, Role},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Resource,
    api::PartialObjectMeta,
    runtime::{reflector::ObjectRef, watcher},
};

use crate::policy::{desired, exposure, names};

/// What a cache keeps of each object of a kind, and how it is found.
pub trait Stored: Sized + Send + Sync + 'static {
    /// The kind watched.
    type Object: Resource<DynamicType = ()>;
    /// The copy kept of `obj` (already trimmed to what is read).
    fn stored(obj: &Self::Object) -> Self;
    /// Its namespace and name.
    fn key(&self) -> (Option<&str>, &str);
}

impl<K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static> Stored for K {
    type Object = K;

    fn stored(obj: &K) -> K {
        obj.clone()
    }

    fn key(&self) -> (Option<&str>, &str) {
        key_of(self.meta())
    }
}

fn key_of(meta: &ObjectMeta) -> (Option<&str>, &str) {
    (meta.namespace.as_deref(), meta.name.as_deref().unwrap_or_default())
}

/// The metadata the caches keep of an object of kind `K` — of a Secret (watched by metadata
/// only: the operator never holds Secret data), and inside [`BaseServiceAccount`] and
/// [`CachedRole`]: its name and namespace; the AgentIdentities
/// among its owners (an identity's object wakes it, and is written only when it is the
/// identity's); the uid, where the watch's trimming kept it; and the ServiceAccount a legacy
/// token Secret names. Each is a boxed string: about a quarter of the `ObjectMeta` it comes from.
pub struct Meta<K> {
    namespace: Option<Box<str>>,
    name: Box<str>,
    /// The names of the AgentIdentities (of agentid's API group) it is owned by.
    owners: Box<[Box<str>]>,
    uid: Option<Box<str>>,
    legacy_token_of: Option<Box<str>>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Meta<K> {
    /// Its namespace.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or_default()
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the AgentIdentity `identity` (of its namespace) owns it ([`names::owned_by`]).
    pub fn owned_by_identity(&self, identity: &str) -> bool {
        self.owners.iter().any(|o| **o == *identity)
    }

    /// Its uid, where kept.
    pub fn uid(&self) -> Option<&str> {
        self.uid.as_deref()
    }

    /// The name exposure analysis reads it by.
    pub fn as_secret(&self) -> exposure::SecretRef<'_> {
        exposure::SecretRef {
            namespace: self.namespace(),
            name: self.name(),
            legacy_token_of: self.legacy_token_of.as_deref(),
        }
    }
}

impl<K> Stored for Meta<K>
where
    K: Resource<DynamicType = ()> + Send + Sync + 'static,
{
    type Object = PartialObjectMeta<K>;

    fn stored(obj: &PartialObjectMeta<K>) -> Self {
        Meta::of(&obj.metadata)
    }

    fn key(&self) -> (Option<&str>, &str) {
        (self.namespace.as_deref(), &self.name)
    }
}

impl<K> Meta<K> {
    /// What is kept of `meta`.
    fn of(meta: &ObjectMeta) -> Self {
        let boxed = |s: &str| Box::<str>::from(s);
        let owners = meta
            .owner_references
            .iter()
            .flatten()
            .filter(|o| names::is_identity_owner(o))
            .map(|o| boxed(&o.name))
            .collect();
        Meta {
            namespace: meta.namespace.as_deref().map(boxed),
            name: boxed(meta.name.as_deref().unwrap_or_default()),
            owners,
            uid: meta.uid.as_deref().map(boxed),
            legacy_token_of: exposure::SecretRef::of(meta).legacy_token_of.map(boxed),
            kind: PhantomData,
        }
    }
}

/// What the cache of identities' base ServiceAccounts keeps of one: its metadata as a [`Meta`]
/// (the identity owning it), and whether it lets pods mount its token — a ServiceAccount edited to
/// mount it is made again at once, as one deleted is.
pub struct BaseServiceAccount {
    meta: Meta<ServiceAccount>,
    automount_token: Option<bool>,
}

impl BaseServiceAccount {
    /// Its metadata.
    pub fn meta(&self) -> &Meta<ServiceAccount> {
        &self.meta
    }

    /// Its `automountServiceAccountToken`.
    pub fn automount_token(&self) -> Option<bool> {
        self.automount_token
    }
}

impl Stored for BaseServiceAccount {
    type Object = ServiceAccount;

    fn stored(sa: &ServiceAccount) -> Self {
        BaseServiceAccount { meta: Meta::of(&sa.metadata), automount_token: sa.automount_service_account_token }
    }

    fn key(&self) -> (Option<&str>, &str) {
        self.meta.key()
    }
}

/// What the Role cache keeps of a Role: its metadata as a [`Meta`] (the identities owning it),
/// and its rules — for every identity's requester Role one copy shared by all
/// ([`desired::requester_rules`]; some 600 bytes each otherwise).
pub struct CachedRole {
    meta: Meta<Role>,
    rules: Arc<[PolicyRule]>,
}

/// The requester Roles' rules, shared.
static REQUESTER_RULES: LazyLock<Arc<[PolicyRule]>> = LazyLock::new(|| desired::requester_rules().into());

impl CachedRole {
    /// Its metadata.
    pub fn meta(&self) -> &Meta<Role> {
        &self.meta
    }

    /// Whether its rules are the copy shared by requester Roles.
    pub fn shares_requester_rules(&self) -> bool {
        Arc::ptr_eq(&self.rules, &REQUESTER_RULES)
    }
}

impl Stored for CachedRole {
    type Object = Role;

    fn stored(role: &Role) -> Self {
        let rules = role.rules.as_deref().unwrap_or_default();
        // Exactly equal (a list left out and an empty one are told apart): what is read is what
        // the apiserver holds.
        let rules = match role.rules.is_some() && rules == &REQUESTER_RULES[..] {
            true => REQUESTER_RULES.clone(),
            false => rules.into(),
        };
        CachedRole { meta: Meta::of(&role.metadata), rules }
    }

    fn key(&self) -> (Option<&str>, &str) {
        self.meta.key()
    }
}

impl exposure::HasRules for CachedRole {
    fn key(&self) -> (&str, &str) {
        (self.meta.namespace(), self.meta.name())
    }

    fn rules(&self) -> &[PolicyRule] {
        &self.rules
    }
}

/// Objects by namespace and name.
struct Table<S> {
    objects: HashTable<Arc<S>>,
}

impl<S: Stored> Table<S> {
    fn new() -> Self {
        Self { objects: HashTable::new() }
    }

    fn hash(state: &std::hash::RandomState, (namespace, name): (Option<&str>, &str)) -> u64 {
        state.hash_one((namespace, name))
    }

    fn find(&self, state: &std::hash::RandomState, key: (Option<&str>, &str)) -> Option<&Arc<S>> {
        self.objects.find(Self::hash(state, key), |o| o.key() == key)
    }

    fn insert(&mut self, state: &std::hash::RandomState, obj: &S::Object) {
        let stored = S::stored(obj);
        let key = stored.key();
        let entry = self.objects.entry(Self::hash(state, key), |o| o.key() == key, |o| Self::hash(state, o.key()));
        match entry {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = Arc::new(stored),
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(Arc::new(stored));
            }
        }
    }

    fn remove(&mut self, state: &std::hash::RandomState, obj: &S::Object) {
        let key = key_of(obj.meta());
        if let Ok(e) = self.objects.find_entry(Self::hash(state, key), |o| o.key() == key) {
            e.remove();
        }
    }
}

struct Shared<S> {
    table: RwLock<Table<S>>,
    /// One hasher for every table of this cache (a re-listing's too).
    state: std::hash::RandomState,
    ready: AtomicBool,
}

/// The read side of a cache: cheap to clone, shared with its [`Filler`].
pub struct Cache<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Cache<S> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

/// The write side of a cache: applies watch events.
pub struct Filler<S> {
    shared: Arc<Shared<S>>,
    /// A re-listing being gathered.
    listing: Option<Table<S>>,
}

/// An empty cache and what fills it.
pub fn cache<S: Stored>() -> (Cache<S>, Filler<S>) {
    let shared =
        Arc::new(Shared { table: RwLock::new(Table::new()), state: Default::default(), ready: AtomicBool::new(false) });
    (Cache { shared: shared.clone() }, Filler { shared, listing: None })
}

impl<S: Stored> Cache<S> {
    /// The object `at` refers to (by namespace and name), if cached.
    pub fn get(&self, at: &ObjectRef<S::Object>) -> Option<Arc<S>> {
        self.read().find(&self.shared.state, (at.namespace.as_deref(), &at.name)).cloned()
    }

    /// Every cached object.
    pub fn state(&self) -> Vec<Arc<S>> {
        self.read().objects.iter().cloned().collect()
    }

    /// Whether the first listing is in.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table<S>> {
        self.shared.table.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S: Stored> Filler<S> {
    /// Applies one watch event.
    pub fn apply(&mut self, event: &watcher::Event<S::Object>) {
        let state = &self.shared.state;
        match event {
            watcher::Event::Init => self.listing = Some(Table::new()),
            // (A listing's objects without its start, never seen: gathered all the same.)
            watcher::Event::InitApply(obj) => self.listing.get_or_insert_with(Table::new).insert(state, obj),
            watcher::Event::InitDone => {
                if let Some(listing) = self.listing.take() {
                    *self.write() = listing;
                }
                self.shared.ready.store(true, Ordering::Release);
            }
            watcher::Event::Apply(obj) => self.write().insert(state, obj),
            watcher::Event::Delete(obj) => self.write().remove(state, obj),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table<S>> {
        self.shared.table.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
    use kube::ResourceExt;
    use watcher::Event;

    use super::*;

    fn role(ns: &str, name: &str, verb: &str) -> Role {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": [verb]}]
        }))
        .expect("a Role")
    }

    fn verb(r: &Role) -> String {
        r.rules.as_ref().and_then(|rules| rules[0].verbs.first().cloned()).unwrap_or_default()
    }

    #[test]
    fn objects_are_found_by_namespace_and_name_replaced_and_removed() {
        let (cache, mut filler) = cache::<Role>();
        assert!(!cache.is_ready());
        filler.apply(&Event::Apply(role("a", "r", "get")));
        filler.apply(&Event::Apply(role("b", "r", "list")));
        filler.apply(&Event::Apply(role("a", "r", "watch")));
        assert_eq!(cache.state().len(), 2, "replaced, not added");
        assert_eq!(cache.get(&ObjectRef::new("r").within("a")).as_deref().map(verb).as_deref(), Some("watch"));
        assert_eq!(cache.get(&ObjectRef::new("r").within("b")).as_deref().map(verb).as_deref(), Some("list"));
        assert!(cache.get(&ObjectRef::new("r")).is_none(), "no namespace is not any namespace");
        filler.apply(&Event::Delete(role("a", "r", "get")));
        assert!(cache.get(&ObjectRef::new("r").within("a")).is_none());
        assert_eq!(cache.state().len(), 1);

        let (cluster, mut filler) = super::cache::<ClusterRole>();
        let cr: ClusterRole =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "c"}})).expect("a ClusterRole");
        filler.apply(&Event::Apply(cr));
        assert_eq!(cluster.get(&ObjectRef::new("c")).map(|c| c.name_any()).as_deref(), Some("c"));
    }

    #[test]
    fn a_listing_replaces_the_contents_only_when_complete() {
        let (cache, mut filler) = cache::<Role>();
        filler.apply(&Event::Init);
        filler.apply(&Event::InitApply(role("a", "r1", "get")));
        assert!(cache.state().is_empty() && !cache.is_ready(), "nothing shown before the listing is in");
        filler.apply(&Event::InitDone);
        assert!(cache.is_ready());
        assert_eq!(cache.state().len(), 1);
        // A re-listing (the watch fell behind): r1 is gone meanwhile, r2 is new.
        filler.apply(&Event::Init);
        filler.apply(&Event::InitApply(role("a", "r2", "get")));
        assert!(cache.get(&ObjectRef::new("r1").within("a")).is_some(), "the old contents serve until it is done");
        filler.apply(&Event::InitDone);
        assert!(cache.get(&ObjectRef::new("r1").within("a")).is_none(), "gone from the listing: gone");
        assert!(cache.get(&ObjectRef::new("r2").within("a")).is_some());
        assert!(cache.is_ready());
    }

    #[test]
    fn many_objects_stay_findable() {
        let (cache, mut filler) = cache::<Role>();
        for i in 0..5_000 {
            filler.apply(&Event::Apply(role(&format!("ns{}", i % 7), &format!("r{i}"), "get")));
        }
        for i in (0..5_000).step_by(2) {
            filler.apply(&Event::Delete(role(&format!("ns{}", i % 7), &format!("r{i}"), "get")));
        }
        assert_eq!(cache.state().len(), 2_500);
        for i in 0..5_000 {
            let found = cache.get(&ObjectRef::new(&format!("r{i}")).within(&format!("ns{}", i % 7))).is_some();
            assert_eq!(found, i % 2 == 1, "r{i}");
        }
    }

    #[test]
    fn metadata_is_kept_compact_with_what_is_read() {
        use k8s_openapi::api::core::v1::Secret;
        let secret = |name: &str, owners: serde_json::Value, annotations: serde_json::Value| {
            serde_json::from_value::<PartialObjectMeta<Secret>>(serde_json::json!({
                "metadata": {"name": name, "namespace": "agents", "uid": format!("uid-{name}"),
                    "ownerReferences": owners, "annotations": annotations}
            }))
            .expect("metadata")
        };
        let identity = |api_version: &str, name: &str| serde_json::json!({"apiVersion": api_version, "kind": "AgentIdentity", "name": name, "uid": "u0"});
        let (cache, mut filler) = cache::<Meta<Secret>>();
        filler.apply(&Event::Apply(secret(
            "agentid-fixer-credentials",
            serde_json::json!([identity("agentid.dev/v1alpha1", "fixer"), identity("example.com/v1", "other")]),
            serde_json::json!({}),
        )));
        filler.apply(&Event::Apply(secret(
            "db-token",
            serde_json::json!([]),
            serde_json::json!({exposure::LEGACY_TOKEN_ANNOTATION: "db", "note": "x"}),
        )));
        let at = |name: &str| cache.get(&ObjectRef::new(name).within("agents"));
        let credentials = at("agentid-fixer-credentials").expect("cached");
        assert_eq!((credentials.namespace(), credentials.name()), ("agents", "agentid-fixer-credentials"));
        assert_eq!(credentials.uid(), Some("uid-agentid-fixer-credentials"));
        assert!(credentials.owned_by_identity("fixer"));
        assert!(!credentials.owned_by_identity("other"), "an owner of that kind from another API group is not one");
        assert!(!credentials.owned_by_identity("fix"), "by whole name");
        assert_eq!(credentials.as_secret().legacy_token_of, None);
        let token = at("db-token").expect("cached");
        assert_eq!(
            token.as_secret(),
            exposure::SecretRef { namespace: "agents", name: "db-token", legacy_token_of: Some("db") }
        );
        assert!(!token.owned_by_identity("fixer"));
        let mut walked: Vec<String> = cache.state().iter().map(|m| m.name().to_string()).collect();
        walked.sort();
        assert_eq!(walked, ["agentid-fixer-credentials", "db-token"]);
        filler.apply(&Event::Delete(secret("db-token", serde_json::json!([]), serde_json::json!({}))));
        assert!(at("db-token").is_none() && at("agentid-fixer-credentials").is_some());
    }

    #[test]
    fn requester_roles_share_one_copy_of_their_rules() {
        use crate::policy::exposure::HasRules;
        let identity = crate::policy::testing::identity("fixer", &["staging"]);
        let (cache, mut filler) = cache::<CachedRole>();
        filler.apply(&Event::Apply(desired::identity_requester_role(&identity)));
        let mut widened = desired::identity_requester_role(&crate::policy::testing::identity("other", &[]));
        widened.rules.iter_mut().flatten().for_each(|r| r.verbs.push("delete".into()));
        filler.apply(&Event::Apply(widened.clone()));
        filler.apply(&Event::Apply(role("agents", "plain", "get")));
        let at = |name: &str| cache.get(&ObjectRef::new(name).within("agents")).expect("cached");

        let requester = at("agentid-fixer-requester");
        assert!(requester.shares_requester_rules());
        assert!(requester.meta().owned_by_identity("fixer") && !requester.meta().owned_by_identity("other"));
        assert_eq!(requester.rules(), desired::requester_rules().as_slice());
        assert_eq!(HasRules::key(requester.as_ref()), ("agents", "agentid-fixer-requester"));
        let widened_cached = at("agentid-other-requester");
        assert!(!widened_cached.shares_requester_rules(), "rules that differ are kept as they are");
        assert_eq!(widened_cached.rules(), widened.rules.as_deref().expect("rules"));
        let plain = at("plain");
        assert_eq!((plain.rules().len(), plain.rules()[0].verbs.as_slice()), (1, ["get".to_string()].as_slice()));
        assert!(!plain.meta().owned_by_identity("fixer"));
    }
}
