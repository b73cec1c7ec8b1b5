//! Which grants belong to which identity, kept beside the shared AccessGrant cache so that the
//! per-issuance cap check and the identity's active-grant count read one identity's grants
//! instead of scanning every grant in the cluster.
//!
//! The index holds names only; objects are read from the cache. It is fed each watch event just
//! before the cache applies it, so it never lacks a grant the cache holds (a name it holds that
//! the cache does not is skipped on lookup). An AccessGrant's spec is immutable, so its identity
//! never changes while it exists.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, RwLock},
};

use kube::{
    ResourceExt,
    runtime::{
        reflector::{ObjectRef, Store},
        watcher,
    },
};

use crate::api::AccessGrant;

type Names = HashMap<String, BTreeSet<String>>;

/// Grant names per identity (`namespace/identity`).
#[derive(Default)]
pub(crate) struct GrantIndex {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    current: Names,
    /// While the watch re-lists: the names listed so far, which replace `current` when the list
    /// is complete (names listed are added to `current` too, so lookups never miss them).
    relisting: Option<Names>,
}

fn key(ns: &str, identity: &str) -> String {
    format!("{ns}/{identity}")
}

fn insert(names: &mut Names, grant: &AccessGrant) {
    let ns = grant.namespace().unwrap_or_default();
    names.entry(key(&ns, &grant.spec.identity)).or_default().insert(grant.name_any());
}

impl GrantIndex {
    /// Records one watch event (call before the cache applies it).
    pub(crate) fn observe(&self, event: &watcher::Event<AccessGrant>) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        match event {
            watcher::Event::Apply(grant) => insert(&mut inner.current, grant),
            watcher::Event::Delete(grant) => {
                let ns = grant.namespace().unwrap_or_default();
                let k = key(&ns, &grant.spec.identity);
                if let Some(names) = inner.current.get_mut(&k) {
                    names.remove(&grant.name_any());
                    if names.is_empty() {
                        inner.current.remove(&k);
                    }
                }
            }
            watcher::Event::Init => inner.relisting = Some(Names::new()),
            watcher::Event::InitApply(grant) => {
                insert(&mut inner.current, grant);
                if let Some(fresh) = inner.relisting.as_mut() {
                    insert(fresh, grant);
                }
            }
            watcher::Event::InitDone => {
                if let Some(fresh) = inner.relisting.take() {
                    inner.current = fresh;
                }
            }
        }
    }

    /// The grants of `identity` in `ns` that `store` holds.
    pub(crate) fn grants_of(&self, store: &Store<AccessGrant>, ns: &str, identity: &str) -> Vec<Arc<AccessGrant>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let Some(names) = inner.current.get(&key(ns, identity)) else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|name| store.get(&ObjectRef::new(name).within(ns)))
            .filter(|g| g.spec.identity == identity)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher::Event};

    fn grant(ns: &str, name: &str, identity: &str) -> AccessGrant {
        let mut g = crate::policy::testing::grant(name, identity, "1h", vec![]);
        g.metadata.namespace = Some(ns.into());
        g
    }

    /// Feeds `events` to the index and to a cache, as the controller does.
    fn feed(events: Vec<Event<AccessGrant>>) -> (GrantIndex, Store<AccessGrant>) {
        let index = GrantIndex::default();
        let (store, mut writer) = reflector::store();
        for event in events {
            index.observe(&event);
            writer.apply_watcher_event(&event);
        }
        (index, store)
    }

    fn names(grants: Vec<Arc<AccessGrant>>) -> Vec<String> {
        let mut names: Vec<_> = grants.iter().map(|g| g.name_any()).collect();
        names.sort();
        names
    }

    #[test]
    fn finds_only_the_identitys_grants_in_its_namespace() {
        let (index, store) = feed(vec![
            Event::Init,
            Event::InitApply(grant("a", "g1", "bot")),
            Event::InitApply(grant("a", "g2", "other")),
            Event::InitApply(grant("b", "g3", "bot")),
            Event::InitDone,
            Event::Apply(grant("a", "g4", "bot")),
        ]);
        assert_eq!(names(index.grants_of(&store, "a", "bot")), ["g1", "g4"]);
        assert_eq!(names(index.grants_of(&store, "b", "bot")), ["g3"]);
        assert!(index.grants_of(&store, "c", "bot").is_empty());
    }

    #[test]
    fn forgets_deleted_grants_and_those_a_relist_no_longer_shows() {
        let (index, store) = feed(vec![
            Event::Init,
            Event::InitApply(grant("a", "g1", "bot")),
            Event::InitApply(grant("a", "g2", "bot")),
            Event::InitApply(grant("a", "g3", "bot")),
            Event::InitDone,
            Event::Delete(grant("a", "g1", "bot")),
            // The watch restarts; g2 was deleted meanwhile, g5 made.
            Event::Init,
            Event::InitApply(grant("a", "g3", "bot")),
            Event::InitApply(grant("a", "g5", "bot")),
        ]);
        // Mid re-list the cache still shows its old state (g2, not yet g5), and so do lookups.
        assert_eq!(names(index.grants_of(&store, "a", "bot")), ["g2", "g3"]);
        index.observe(&Event::InitDone);
        let listed: Vec<_> = index.inner.read().unwrap().current["a/bot"].iter().cloned().collect();
        assert_eq!(listed, ["g3", "g5"]);
        let (index, store) = feed(vec![Event::Apply(grant("a", "g1", "bot")), Event::Delete(grant("a", "g1", "bot"))]);
        assert!(index.grants_of(&store, "a", "bot").is_empty());
        assert!(index.inner.read().unwrap().current.is_empty());
    }
}
