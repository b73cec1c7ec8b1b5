//! Which bindings an identity's drift and exposure analysis must look at, kept beside the binding
//! caches so that each identity reconcile reads those instead of every binding in the cluster
//! (at 10,000 identities, each reconcile scanned some 20,000 bindings and hashed every Role).
//!
//! Most bindings at scale are agentid's own — a grant's RoleBinding names the grant's
//! ServiceAccount, an identity's requester RoleBinding its base ServiceAccount — and reach only
//! the ServiceAccounts they name: they are indexed by those. Every other binding (not shaped as
//! agentid makes them, whatever its labels, or naming a user or group) is in the `scan` set,
//! which every analysis reads whole.
//! So the candidates for a set of ServiceAccounts are `scan` plus the bindings indexed under
//! them: a superset of the bindings that reach them, which the analysis then checks as before.
//!
//! The index holds references only; objects are read from the caches. It is fed each watch event
//! just before the cache applies it, so it never lacks a binding the cache holds; where a binding
//! was filed is not kept, since the cache still holds the version that was (about 300 bytes a
//! binding at scale). A listing's bindings are filed as they come, before the cache shows them;
//! when the listing is in, that kind is filed afresh from the cache, which also takes out what
//! a listing broken off midway left. Until then it may hold references the cache no longer
//! holds, skipped on lookup, or extra candidates, which the analysis checks like any other.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, RwLock},
};

use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, Subject};
use kube::{
    Resource, ResourceExt,
    runtime::{reflector::ObjectRef, watcher},
};

use super::store::Cache;
use crate::policy::{drift, exposure::named_service_account};

/// A binding: a RoleBinding (namespace, name) or a ClusterRoleBinding (None, name).
type Binding = (Option<String>, String);

/// A ServiceAccount (namespace, name).
type ServiceAccount = (String, String);

#[derive(Default, Clone)]
struct Entries {
    /// Bindings every analysis reads.
    scan: BTreeSet<Binding>,
    /// agentid's bindings naming only ServiceAccounts, by each ServiceAccount named.
    /// (A Vec, not a set: nearly always one binding each, and an empty set's first node is
    /// ten times the size of one entry.)
    /// Where a binding is filed is not kept: when it changes or goes, its previous version is
    /// still in the cache (the index is told of each event first) and says where.
    by_service_account: HashMap<ServiceAccount, Vec<Binding>>,
}

/// The ServiceAccounts a binding of agentid's shape is filed under (None: it is scanned).
fn accounts(b: &impl Indexed) -> Option<Vec<(&str, &str)>> {
    let ns = b.meta().namespace.as_deref();
    b.subjects().iter().map(|s| named_service_account(s, ns)).collect::<Option<Vec<_>>>().filter(|_| b.agentids_own())
}

impl Entries {
    fn insert(&mut self, b: &impl Indexed) {
        let binding = binding_of(b);
        match accounts(b) {
            Some(accounts) => {
                for (ns, name) in accounts {
                    let filed = self.by_service_account.entry((ns.to_string(), name.to_string())).or_default();
                    if !filed.contains(&binding) {
                        filed.push(binding.clone());
                    }
                }
            }
            None => {
                self.scan.insert(binding);
            }
        }
    }

    /// Takes out `b` as it was filed (by that version's subjects).
    fn remove(&mut self, b: &impl Indexed) {
        let binding = binding_of(b);
        if !self.scan.remove(&binding) {
            for (ns, name) in accounts(b).unwrap_or_default() {
                let account = (ns.to_string(), name.to_string());
                if let Some(filed) = self.by_service_account.get_mut(&account) {
                    filed.retain(|f| *f != binding);
                    if filed.is_empty() {
                        self.by_service_account.remove(&account);
                    }
                }
            }
        }
    }
}

/// The bindings by the ServiceAccounts they reach (see the module documentation).
#[derive(Default)]
pub struct BindingIndex {
    inner: RwLock<Entries>,
}

/// The candidates for an analysis, read from the caches.
#[derive(Default)]
pub(crate) struct Candidates {
    pub role_bindings: Vec<Arc<RoleBinding>>,
    pub cluster_role_bindings: Vec<Arc<ClusterRoleBinding>>,
}

/// What the index needs of a binding kind.
pub trait Indexed: Resource<DynamicType = ()> + Clone + Send + Sync + 'static {
    /// 0 for RoleBindings, 1 for ClusterRoleBindings.
    const SLOT: usize;
    fn subjects(&self) -> &[Subject];
    /// Whether agentid made it (by its shape: [`drift::agentids_own`]; labels prove nothing).
    fn agentids_own(&self) -> bool;
}

impl Indexed for RoleBinding {
    const SLOT: usize = 0;
    fn subjects(&self) -> &[Subject] {
        self.subjects.as_deref().unwrap_or_default()
    }
    fn agentids_own(&self) -> bool {
        drift::agentids_own(self)
    }
}

impl Indexed for ClusterRoleBinding {
    const SLOT: usize = 1;
    fn subjects(&self) -> &[Subject] {
        self.subjects.as_deref().unwrap_or_default()
    }
    fn agentids_own(&self) -> bool {
        false
    }
}

fn binding_of<K: Indexed>(b: &K) -> Binding {
    (b.namespace(), b.name_any())
}

impl BindingIndex {
    /// Records one watch event of either binding kind. Call it before `cache` (the cache of that
    /// kind) applies the event: what the cache holds then is how each binding was filed.
    pub fn observe<K: Indexed>(&self, event: &watcher::Event<K>, cache: &Cache<K>) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let cached = |b: &K| {
            let at = ObjectRef::<K>::new(&b.name_any());
            cache.get(&match b.namespace() {
                Some(ns) => at.within(&ns),
                None => at,
            })
        };
        match event {
            // A listing files what it lists as it comes (the cache shows it only once complete);
            // when the cache has it all, [`Self::relisted`] files that kind afresh.
            watcher::Event::Apply(b) | watcher::Event::InitApply(b) => {
                if let Some(before) = cached(b) {
                    inner.remove(before.as_ref());
                }
                inner.insert(b);
            }
            watcher::Event::Delete(b) => {
                if let Some(before) = cached(b) {
                    inner.remove(before.as_ref());
                }
                inner.remove(b);
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }

    /// Files `cache`'s kind afresh from what it holds: call it once the cache has applied a
    /// listing's end. Until then the index holds every listed binding and perhaps some no longer
    /// there (extra candidates, which the analysis checks anyway); this takes those out, and what
    /// an interrupted listing left behind too.
    pub fn relisted<K: Indexed>(&self, cache: &Cache<K>) {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let of_kind = |b: &Binding| b.0.is_some() == (K::SLOT == 0);
        inner.scan.retain(|b| !of_kind(b));
        inner.by_service_account.retain(|_, filed| {
            filed.retain(|b| !of_kind(b));
            !filed.is_empty()
        });
        for b in cache.state() {
            inner.insert(b.as_ref());
        }
    }

    /// The bindings that may reach any of `accounts` (ServiceAccounts as namespace, name): every
    /// binding of the scan set, and agentid's naming one of them.
    pub(crate) fn candidates(
        &self,
        role_bindings: &Cache<RoleBinding>,
        cluster_role_bindings: &Cache<ClusterRoleBinding>,
        accounts: &[(&str, &str)],
    ) -> Candidates {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let mut wanted: BTreeSet<&Binding> = inner.scan.iter().collect();
        for (ns, name) in accounts {
            let key = (ns.to_string(), name.to_string());
            wanted.extend(inner.by_service_account.get(&key).into_iter().flatten());
        }
        let mut out = Candidates::default();
        for (ns, name) in wanted {
            match ns {
                Some(ns) => out.role_bindings.extend(role_bindings.get(&ObjectRef::new(name).within(ns))),
                None => out.cluster_role_bindings.extend(cluster_role_bindings.get(&ObjectRef::new(name))),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::watcher::Event;
    use serde_json::json;

    use super::*;
    use crate::policy::{drift, exposure, fuzz::Gen, names};

    fn subject(g: &mut Gen, namespaces: &[&str]) -> serde_json::Value {
        let ns = g.pick(namespaces);
        let sa = g.pick(&["agentid-fixer", "agentid-grant-a-1", "agentid-grant-b-2", "agentid-other", "default"]);
        match g.below(6) {
            0 => json!({"kind": "ServiceAccount", "name": sa, "namespace": ns}),
            1 => json!({"kind": "ServiceAccount", "name": sa}),
            2 => json!({"kind": "User", "name": format!("system:serviceaccount:{ns}:{sa}")}),
            3 => json!({"kind": "User", "name": g.pick(&["alice", "system:anonymous"])}),
            _ => json!({"kind": "Group", "name": g.pick(&[
                "system:serviceaccounts", "system:authenticated", "system:serviceaccounts:agents",
                "system:serviceaccounts:other", "sre-leads"])}),
        }
    }

    fn labels(g: &mut Gen) -> serde_json::Value {
        match g.below(3) {
            0 => json!({names::MANAGED_BY_LABEL: names::MANAGED_BY}),
            1 => json!({"kubernetes.io/bootstrapping": "rbac-defaults"}),
            _ => json!({}),
        }
    }

    fn role_binding(g: &mut Gen, i: usize) -> RoleBinding {
        let ns = g.pick(&["agents", "other", "target"]);
        let subjects: Vec<_> = (0..1 + g.below(3)).map(|_| subject(g, &["agents", "other", "target"])).collect();
        // A third shaped as agentid makes them (name and Role alike), whose subjects may or may
        // not be the one agentid would bind.
        let (name, kind, role) = match g.below(3) {
            0 => {
                let name = g.pick(&["agentid-fixer-requester", "agentid-grant-a-1", "agentid-grant-b-2"]);
                (name.to_string(), "Role", name)
            }
            _ => (format!("rb{}", i % 40), g.pick(&["Role", "ClusterRole"]), g.pick(&["reader", "secrets", "pods"])),
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels(g)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
            "subjects": subjects
        }))
        .expect("RoleBinding")
    }

    fn cluster_role_binding(g: &mut Gen, i: usize) -> ClusterRoleBinding {
        let subjects: Vec<_> = (0..1 + g.below(3)).map(|_| subject(g, &["agents", "other"])).collect();
        serde_json::from_value(json!({
            "metadata": {"name": format!("crb{}", i % 15), "labels": labels(g)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": g.pick(&["reader", "secrets", "pods"])},
            "subjects": subjects
        }))
        .expect("ClusterRoleBinding")
    }

    fn roles() -> (Vec<Arc<k8s_openapi::api::rbac::v1::Role>>, Vec<Arc<k8s_openapi::api::rbac::v1::ClusterRole>>) {
        let rules = |name: &str| match name {
            "reader" => json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]),
            "secrets" => json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]),
            _ => json!([{"apiGroups": [""], "resources": ["pods", "serviceaccounts/token"], "verbs": ["create"]}]),
        };
        let mut roles = Vec::new();
        let mut cluster_roles = Vec::new();
        for name in ["reader", "secrets", "pods"] {
            for ns in ["agents", "other", "target"] {
                roles.push(Arc::new(
                    serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}, "rules": rules(name)}))
                        .expect("Role"),
                ));
            }
            cluster_roles.push(Arc::new(
                serde_json::from_value(json!({"metadata": {"name": name}, "rules": rules(name)})).expect("ClusterRole"),
            ));
        }
        (roles, cluster_roles)
    }

    fn sorted<K: Resource<DynamicType = ()>>(mut v: Vec<Arc<K>>) -> Vec<String> {
        let mut names: Vec<String> = v.drain(..).map(|b| format!("{:?}/{}", b.namespace(), b.name_any())).collect();
        names.sort();
        names
    }

    #[test]
    fn drift_and_exposure_from_the_candidates_equal_those_from_every_binding() {
        let (roles, cluster_roles) = roles();
        let secret: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta =
            serde_json::from_value(json!({"name": "db", "namespace": "agents"})).expect("meta");
        let (mut candidates, mut bindings) = (0, 0);
        for seed in 1..=300u64 {
            let mut g = Gen::typed(seed);
            let index = BindingIndex::default();
            let (rb_store, mut rb_writer) = crate::controller::store::cache::<RoleBinding>();
            let (crb_store, mut crb_writer) = crate::controller::store::cache::<ClusterRoleBinding>();
            let mut feed_rb = |e: Event<RoleBinding>| {
                index.observe(&e, &rb_store);
                rb_writer.apply(&e);
                if matches!(e, Event::InitDone) {
                    index.relisted(&rb_store);
                }
            };
            feed_rb(Event::Init);
            for i in 0..g.below(30) as usize {
                feed_rb(Event::InitApply(role_binding(&mut g, i)));
            }
            feed_rb(Event::InitDone);
            // Changes after the listing: new subjects, deletions, and now and then a re-list
            // that no longer shows some of them.
            for i in 0..g.below(20) as usize {
                let b = role_binding(&mut g, i);
                feed_rb(if g.one_in(4) { Event::Delete(b) } else { Event::Apply(b) });
                if g.one_in(15) {
                    let kept: Vec<RoleBinding> =
                        rb_store.state().iter().filter(|_| g.one_in(2)).map(|b| (**b).clone()).collect();
                    feed_rb(Event::Init);
                    for b in kept {
                        feed_rb(Event::InitApply(b));
                    }
                    feed_rb(Event::InitDone);
                }
            }
            let mut feed_crb = |e: Event<ClusterRoleBinding>| {
                index.observe(&e, &crb_store);
                crb_writer.apply(&e);
                if matches!(e, Event::InitDone) {
                    index.relisted(&crb_store);
                }
            };
            feed_crb(Event::Init);
            for i in 0..g.below(8) as usize {
                feed_crb(Event::InitApply(cluster_role_binding(&mut g, i)));
            }
            feed_crb(Event::InitDone);
            for i in 0..g.below(6) as usize {
                let b = cluster_role_binding(&mut g, i);
                feed_crb(if g.one_in(4) { Event::Delete(b) } else { Event::Apply(b) });
            }
            let (all_rb, all_crb) = (rb_store.state(), crb_store.state());
            for identity in ["fixer", "other"] {
                let principals = vec![
                    exposure::Principal {
                        namespace: "agents".into(),
                        name: names::identity_service_account(identity),
                        via: "base".into(),
                    },
                    exposure::Principal {
                        namespace: "agents".into(),
                        name: "agentid-grant-a-1".into(),
                        via: "grant a".into(),
                    },
                ];
                let accounts: Vec<(&str, &str)> =
                    principals.iter().map(|p| (p.namespace.as_str(), p.name.as_str())).collect();
                let c = index.candidates(&rb_store, &crb_store, &accounts);
                candidates += c.role_bindings.len() + c.cluster_role_bindings.len();
                bindings += all_rb.len() + all_crb.len();
                let grants = [drift::ActiveGrant {
                    service_account: "agentid-grant-a-1".into(),
                    targets: vec!["target".into()],
                }];
                assert_eq!(
                    drift::standing_privileges("agents", identity, &grants, &all_rb, &all_crb),
                    drift::standing_privileges("agents", identity, &grants, &c.role_bindings, &c.cluster_role_bindings),
                    "drift, seed {seed}"
                );
                let whole = exposure::Rbac {
                    roles: &roles,
                    cluster_roles: &cluster_roles,
                    role_bindings: &all_rb,
                    cluster_role_bindings: &all_crb,
                };
                let narrowed = exposure::Rbac {
                    roles: &roles,
                    cluster_roles: &cluster_roles,
                    role_bindings: &c.role_bindings,
                    cluster_role_bindings: &c.cluster_role_bindings,
                };
                assert_eq!(
                    exposure::exposure("agents", identity, &principals, &whole, &[&secret][..]),
                    exposure::exposure("agents", identity, &principals, &narrowed, &[&secret][..]),
                    "exposure, seed {seed}"
                );
            }
        }
        assert!(candidates < bindings, "the index narrows nothing: {candidates} of {bindings}");
    }

    #[test]
    fn agentid_bindings_are_filed_by_account_and_refiled_when_they_change() {
        let index = BindingIndex::default();
        let ours = |subject: serde_json::Value| -> RoleBinding {
            serde_json::from_value(json!({
                "metadata": {"name": "agentid-grant-g", "namespace": "agents"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "agentid-grant-g"},
                "subjects": [subject]
            }))
            .expect("RoleBinding")
        };
        let (store, mut writer) = crate::controller::store::cache::<RoleBinding>();
        let (crbs, _) = crate::controller::store::cache::<ClusterRoleBinding>();
        let mut feed = |e: Event<RoleBinding>| {
            index.observe(&e, &store);
            writer.apply(&e);
        };
        feed(Event::Apply(ours(json!({"kind": "ServiceAccount", "name": "agentid-grant-g"}))));
        let found = |accounts: &[(&str, &str)]| sorted(index.candidates(&store, &crbs, accounts).role_bindings);
        assert_eq!(found(&[("agents", "agentid-grant-g")]).len(), 1);
        assert!(found(&[("agents", "agentid-fixer")]).is_empty(), "not scanned: it names another account");
        // Labelled as agentid's, naming an account, but not shaped as agentid makes them: scanned.
        let mut labelled = ours(json!({"kind": "ServiceAccount", "name": "agentid-grant-g"}));
        labelled.metadata.name = Some("g".into());
        labelled.metadata.labels = Some([(names::MANAGED_BY_LABEL.to_string(), names::MANAGED_BY.to_string())].into());
        feed(Event::Apply(labelled.clone()));
        assert_eq!(found(&[("agents", "agentid-fixer")]).len(), 1);
        feed(Event::Delete(labelled));
        // Changed to name a group: now every analysis reads it.
        feed(Event::Apply(ours(json!({"kind": "Group", "name": "system:serviceaccounts"}))));
        assert_eq!(found(&[("agents", "agentid-fixer")]).len(), 1);
        assert!(index.inner.read().unwrap().by_service_account.is_empty(), "refiled, not kept twice");
        feed(Event::Delete(ours(json!({"kind": "Group", "name": "system:serviceaccounts"}))));
        let inner = index.inner.read().unwrap();
        assert!(inner.scan.is_empty() && inner.by_service_account.is_empty(), "nothing kept once deleted");
    }

    /// The index as sets, to compare two built differently.
    fn snapshot(index: &BindingIndex) -> (BTreeSet<Binding>, BTreeSet<(ServiceAccount, Binding)>) {
        let entries = index.inner.read().unwrap();
        let filed = entries.by_service_account.iter().flat_map(|(sa, bs)| bs.iter().map(|b| (sa.clone(), b.clone())));
        (entries.scan.clone(), filed.collect())
    }

    #[test]
    fn an_interrupted_relisting_leaves_nothing_behind() {
        let ours = |name: &str, sa: &str| -> RoleBinding {
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "agents"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": "agents"}]
            }))
            .expect("RoleBinding")
        };
        let index = BindingIndex::default();
        let (store, mut writer) = crate::controller::store::cache::<RoleBinding>();
        let mut feed = |e: Event<RoleBinding>| {
            index.observe(&e, &store);
            writer.apply(&e);
            if matches!(e, Event::InitDone) {
                index.relisted(&store);
            }
        };
        feed(Event::Init);
        feed(Event::InitApply(ours("agentid-grant-a-1", "agentid-grant-a-1")));
        feed(Event::InitDone);
        // A listing broken off after two objects (a page failed), then listed again: `a` now
        // names another account (still of its shape, then not), `b` is gone before the second.
        feed(Event::Init);
        feed(Event::InitApply(ours("agentid-grant-a-1", "agentid-grant-x-1")));
        feed(Event::InitApply(ours("agentid-grant-b-2", "agentid-grant-b-2")));
        feed(Event::Init);
        feed(Event::InitApply(ours("agentid-grant-a-1", "default")));
        feed(Event::InitDone);
        // As if built from the cache alone.
        let fresh = BindingIndex::default();
        fresh.relisted(&store);
        assert_eq!(store.state().len(), 1);
        assert_eq!(snapshot(&index), snapshot(&fresh), "no entry of the broken-off listing is left");
        assert!(snapshot(&index).1.is_empty(), "`a` no longer has agentid's shape: scanned");
    }
}
