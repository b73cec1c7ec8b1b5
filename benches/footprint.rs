//! What each object the operator caches costs in memory: a benchmark program (no control plane),
//! run with `cargo bench --bench footprint`. Not a timed test: it asserts only that every copy
//! was cached.
//!
//! For each kind of object agentid caches per identity and per active grant, it takes the object
//! as the apiserver sent it (`benches/footprint/*.json`, recorded from `hack/demo`: managed fields
//! and all, never Secret data), makes 10,000 copies with distinct names and uids, passes each
//! through what the operator does to it on the way into its cache (`controller::cache`: trimmed
//! or slimmed the same way) and into the same kind of cache (kube's reflector store for grants and
//! identities, `controller::store` for the cluster-wide caches), and counts the bytes the
//! allocator holds after (its size classes included, through jemalloc's usable size). Also the
//! binding index's entry for each of agentid's bindings. It prints bytes per object, as cached and
//! as received (whole, in a reflector store), and what that comes to per identity, per active
//! grant and at docs/benchmarks.md's full size.

use std::{
    alloc::{GlobalAlloc, Layout},
    sync::atomic::{AtomicIsize, Ordering},
};

use agentid::{
    api::{AccessGrant, AgentIdentity},
    controller::{
        binding_index::BindingIndex,
        cache::{self, Keep},
        store,
    },
};
use k8s_openapi::api::{
    core::v1::{Secret, ServiceAccount},
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Resource,
    api::PartialObjectMeta,
    runtime::{reflector, watcher::Event},
};
use serde::de::DeserializeOwned;

/// jemalloc (as the operator uses), counting the bytes it holds for live allocations.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

fn held(ptr: *mut u8) -> isize {
    // SAFETY: `ptr` is a live allocation made by jemalloc.
    unsafe { tikv_jemallocator::usable_size(ptr) as isize }
}

// SAFETY: every call is passed to jemalloc unchanged; only the counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { tikv_jemallocator::Jemalloc.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(held(ptr), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { tikv_jemallocator::Jemalloc.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(held(ptr), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(held(ptr), Ordering::Relaxed);
        unsafe { tikv_jemallocator::Jemalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let before = held(ptr);
        let moved = unsafe { tikv_jemallocator::Jemalloc.realloc(ptr, layout, new_size) };
        if !moved.is_null() {
            LIVE.fetch_add(held(moved) - before, Ordering::Relaxed);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Copies of each object: 10,000 under `cargo bench`; under `cargo test --all-targets` (which
/// runs this program without `--bench`) a quick check that every fixture still goes through.
fn copies() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| if std::env::args().any(|a| a == "--bench") { 10_000 } else { 100 })
}

/// Where an object is cached: kube's reflector store (grants and identities, which feed the
/// controllers), or agentid's lean cache (`controller::store`: the cluster-wide caches).
#[derive(Clone, Copy, PartialEq)]
enum In {
    Reflector,
    Lean,
}

/// The fixture `file` (an object as the apiserver sent it), [`copies`] times with distinct names and
/// uids, each given to `prepare` and then to a cache: the bytes held per object.
fn per_object<K, S>(file: &str, prepare: impl Fn(&mut K), held_in: In) -> f64
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Send + Sync + 'static,
    S: store::Stored<Object = K>,
{
    let path = format!("{}/benches/footprint/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let template: serde_json::Value = serde_json::from_str(&text).expect("a JSON object");
    let name = template["metadata"]["name"].as_str().expect("a name").to_string();
    let uid = template["metadata"]["uid"].as_str().expect("a uid").to_string();
    // Each copy is deserialized from its own text, as a watch event is.
    let n = copies();
    let texts: Vec<String> = (0..n)
        .map(|i| {
            let mut obj = template.clone();
            obj["metadata"]["name"] = format!("{name}-{i:05}").into();
            obj["metadata"]["uid"] = format!("{}{i:05}", &uid[..uid.len() - 5]).into();
            serde_json::to_string(&obj).expect("serializes")
        })
        .collect();
    let (store, mut writer) = reflector::store::<K>();
    let (cache, mut filler) = store::cache::<S>();
    let before = LIVE.load(Ordering::Relaxed);
    for text in &texts {
        let mut obj: K = serde_json::from_str(text).unwrap_or_else(|e| panic!("{file}: {e}"));
        prepare(&mut obj);
        match held_in {
            In::Reflector => writer.apply_watcher_event(&Event::Apply(obj)),
            In::Lean => filler.apply(&Event::Apply(obj)),
        }
    }
    let after = LIVE.load(Ordering::Relaxed);
    assert_eq!(store.state().len() + cache.state().len(), n, "{file}: every copy cached");
    drop((store, writer, cache, filler));
    (after - before) as f64 / n as f64
}

/// The bytes the binding index holds per binding of `file` (its entries only; the bindings are
/// in their cache).
fn index_entry(file: &str) -> f64 {
    let path = format!("{}/benches/footprint/{file}", env!("CARGO_MANIFEST_DIR"));
    let template: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the fixture")).expect("JSON");
    let (name, sa) = (
        template["metadata"]["name"].as_str().expect("a name"),
        template["subjects"][0]["name"].as_str().expect("a subject"),
    );
    let n = copies();
    let bindings: Vec<RoleBinding> = (0..n)
        .map(|i| {
            // Each of agentid's shape: named for its ServiceAccount (a grant's) or its identity.
            let mut b = template.clone();
            b["metadata"]["name"] = name.replace(sa, &format!("{sa}{i:05}")).into();
            b["roleRef"]["name"] = b["metadata"]["name"].clone();
            b["subjects"][0]["name"] = format!("{sa}{i:05}").into();
            let mut b: RoleBinding = serde_json::from_value(b).expect("a RoleBinding");
            cache::trim(&mut b, Keep::BINDINGS);
            b
        })
        .collect();
    let (cache, _) = store::cache::<RoleBinding>();
    let index = BindingIndex::default();
    let events: Vec<Event<RoleBinding>> = bindings.into_iter().map(Event::Apply).collect();
    let before = LIVE.load(Ordering::Relaxed);
    for event in &events {
        index.observe(event, &cache);
    }
    let after = LIVE.load(Ordering::Relaxed);
    drop(index);
    (after - before) as f64 / n as f64
}

struct Row {
    what: &'static str,
    per: &'static str,
    /// Bytes per object as the operator caches it.
    cached: f64,
    /// Bytes per object as received, in kube's reflector store (what caching it whole would cost).
    received: f64,
}

/// A row for objects of kind `K`, cached as `S` (in the lean store: `held_in` is `Lean`).
fn row<K, S>(what: &'static str, per: &'static str, file: &str, prepare: impl Fn(&mut K), held_in: In) -> Row
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Send + Sync + 'static,
    S: store::Stored<Object = K>,
{
    let cached = per_object::<K, S>(file, prepare, held_in);
    Row { what, per, cached, received: per_object::<K, K>(file, |_| {}, In::Reflector) }
}

fn main() {
    type SecretMeta = PartialObjectMeta<Secret>;
    let index = |what, per, file| Row { what, per, cached: index_entry(file), received: 0.0 };
    let rows = vec![
        row::<AgentIdentity, AgentIdentity>(
            "AgentIdentity (with status)",
            "identity",
            "identity.json",
            cache::slim_identity,
            In::Reflector,
        ),
        row::<ServiceAccount, store::BaseServiceAccount>(
            "base ServiceAccount",
            "identity",
            "identity-serviceaccount.json",
            |o| cache::trim(o, Keep::OWNED),
            In::Lean,
        ),
        row::<SecretMeta, store::Meta<Secret>>(
            "credentials Secret (metadata)",
            "identity",
            "identity-secret.json",
            |o| cache::trim_meta(o, Keep::SECRETS),
            In::Lean,
        ),
        row::<Role, store::CachedRole>(
            "requester Role",
            "identity",
            "requester-role.json",
            |o| cache::trim(o, Keep::ROLES),
            In::Lean,
        ),
        row::<RoleBinding, RoleBinding>(
            "requester RoleBinding",
            "identity",
            "requester-binding.json",
            |o| cache::trim(o, Keep::BINDINGS),
            In::Lean,
        ),
        index("requester RoleBinding: its binding index entry", "identity", "requester-binding.json"),
        row::<AccessGrant, AccessGrant>(
            "AccessGrant (Active)",
            "active grant",
            "grant-active.json",
            cache::slim_grant,
            In::Reflector,
        ),
        row::<Role, store::CachedRole>(
            "grant Role",
            "active grant",
            "grant-role.json",
            |o| cache::trim(o, Keep::ROLES),
            In::Lean,
        ),
        row::<RoleBinding, RoleBinding>(
            "grant RoleBinding",
            "active grant",
            "grant-binding.json",
            |o| cache::trim(o, Keep::BINDINGS),
            In::Lean,
        ),
        row::<SecretMeta, store::Meta<Secret>>(
            "grant Secret (metadata)",
            "active grant",
            "grant-secret.json",
            |o| cache::trim_meta(o, Keep::SECRETS),
            In::Lean,
        ),
        index("grant RoleBinding: its binding index entry", "active grant", "grant-binding.json"),
    ];
    println!("bytes held per cached object ({} copies each, jemalloc size classes):\n", copies());
    println!("| object | per | as cached | as received |");
    println!("| --- | --- | ---: | ---: |");
    for r in &rows {
        println!("| {} | {} | {:.0} | {:.0} |", r.what, r.per, r.cached, r.received);
    }
    let sum = |per: &str| -> (f64, f64) {
        rows.iter().filter(|r| r.per == per).fold((0.0, 0.0), |(c, r), row| (c + row.cached, r + row.received))
    };
    let (identity, identity_received) = sum("identity");
    let (grant, grant_received) = sum("active grant");
    println!("\nper identity: {identity:.0} bytes cached ({identity_received:.0} as received)");
    println!("per active grant: {grant:.0} bytes cached ({grant_received:.0} as received)");
    let (identities, grants) = (10_100.0, 9_000.0);
    let mib = |b: f64| b / (1024.0 * 1024.0);
    println!(
        "at full size ({identities} identities, {grants} active grants): {:.1} MiB cached ({:.1} MiB as received)",
        mib(identity * identities + grant * grants),
        mib(identity_received * identities + grant_received * grants)
    );
}
