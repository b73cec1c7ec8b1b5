//! A lean cache of watched objects, for the cluster-wide caches (Roles, bindings, Secret and
//! ServiceAccount metadata) that hold every object of their kind at scale.
//!
//! kube's reflector store keys each object by an `ObjectRef`: some 100 bytes in its table plus
//! copies of the name, namespace, uid and resourceVersion — about 280 bytes an object, as much as
//! a trimmed binding's own metadata. Here an object is found by a hash of its namespace and name
//! read from the object itself: its table holds one pointer an object. It applies watch events
//! as kube's does (a re-listing is gathered aside and replaces the contents when it is complete,
//! so readers never see a half-listed cache) and tells when its first listing is in.

use std::{
    hash::BuildHasher,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use hashbrown::HashTable;
use kube::{
    Resource,
    runtime::{reflector::ObjectRef, watcher},
};

/// Objects by namespace and name.
struct Table<K> {
    objects: HashTable<Arc<K>>,
}

impl<K: Resource> Table<K> {
    fn new() -> Self {
        Self { objects: HashTable::new() }
    }

    fn hash(state: &std::hash::RandomState, namespace: Option<&str>, name: &str) -> u64 {
        state.hash_one((namespace, name))
    }

    fn key(obj: &K) -> (Option<&str>, &str) {
        let meta = obj.meta();
        (meta.namespace.as_deref(), meta.name.as_deref().unwrap_or_default())
    }

    fn find(&self, state: &std::hash::RandomState, namespace: Option<&str>, name: &str) -> Option<&Arc<K>> {
        self.objects.find(Self::hash(state, namespace, name), |o| Self::key(o) == (namespace, name))
    }

    fn insert(&mut self, state: &std::hash::RandomState, obj: K) {
        let (namespace, name) = Self::key(&obj);
        let hash = Self::hash(state, namespace, name);
        let entry = self.objects.entry(
            hash,
            |o| Self::key(o) == (namespace, name),
            |o| {
                let (ns, n) = Self::key(o);
                Self::hash(state, ns, n)
            },
        );
        match entry {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = Arc::new(obj),
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(Arc::new(obj));
            }
        }
    }

    fn remove(&mut self, state: &std::hash::RandomState, obj: &K) {
        let (namespace, name) = Self::key(obj);
        if let Ok(e) =
            self.objects.find_entry(Self::hash(state, namespace, name), |o| Self::key(o) == (namespace, name))
        {
            e.remove();
        }
    }
}

struct Shared<K> {
    table: RwLock<Table<K>>,
    /// One hasher for every table of this cache (a re-listing's too).
    state: std::hash::RandomState,
    ready: AtomicBool,
}

/// The read side of a cache: cheap to clone, shared with its [`Filler`].
pub struct Cache<K> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

/// The write side of a cache: applies watch events.
pub struct Filler<K> {
    shared: Arc<Shared<K>>,
    /// A re-listing being gathered.
    listing: Option<Table<K>>,
}

/// An empty cache and what fills it.
pub fn cache<K: Resource>() -> (Cache<K>, Filler<K>) {
    let shared =
        Arc::new(Shared { table: RwLock::new(Table::new()), state: Default::default(), ready: AtomicBool::new(false) });
    (Cache { shared: shared.clone() }, Filler { shared, listing: None })
}

impl<K: Resource> Cache<K> {
    /// The object `at` refers to (by namespace and name), if cached.
    pub fn get(&self, at: &ObjectRef<K>) -> Option<Arc<K>> {
        let table = self.shared.table.read().unwrap_or_else(|e| e.into_inner());
        table.find(&self.shared.state, at.namespace.as_deref(), &at.name).cloned()
    }

    /// Every cached object.
    pub fn state(&self) -> Vec<Arc<K>> {
        let table = self.shared.table.read().unwrap_or_else(|e| e.into_inner());
        table.objects.iter().cloned().collect()
    }

    /// Whether the first listing is in.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }
}

impl<K: Resource> Filler<K> {
    /// Applies one watch event.
    pub fn apply(&mut self, event: &watcher::Event<K>)
    where
        K: Clone,
    {
        let state = &self.shared.state;
        match event {
            watcher::Event::Init => self.listing = Some(Table::new()),
            // (A listing's objects without its start, never seen: gathered all the same.)
            watcher::Event::InitApply(obj) => self.listing.get_or_insert_with(Table::new).insert(state, obj.clone()),
            watcher::Event::InitDone => {
                if let Some(listing) = self.listing.take() {
                    *self.write() = listing;
                }
                self.shared.ready.store(true, Ordering::Release);
            }
            watcher::Event::Apply(obj) => self.write().insert(state, obj.clone()),
            watcher::Event::Delete(obj) => self.write().remove(state, obj),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table<K>> {
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
}
