//! What each object the operator caches costs in memory: a benchmark program (no control plane),
//! run with `cargo bench --bench footprint`. Not a timed test; it asserts nothing.
//!
//! For each kind of object agentid caches per identity and per active grant, it takes the object
//! as the apiserver sent it (`benches/footprint/*.json`, recorded from `hack/demo`: managed fields
//! and all, never Secret data), makes `N` copies with distinct names and uids, passes each through
//! what the operator does to it on the way into its cache (`controller::cache`: trimmed or slimmed
//! the same way) and into a kube reflector store, and counts the bytes the allocator holds after
//! (its size classes included, through jemalloc's usable size). It prints bytes per object, as
//! cached and as received, and what that comes to per identity, per active grant and at
//! docs/benchmarks.md's full size.

use std::{
    alloc::{GlobalAlloc, Layout},
    sync::atomic::{AtomicIsize, Ordering},
};

use agentid::{
    api::{AccessGrant, AgentIdentity},
    controller::cache::{self, Keep},
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

const N: usize = 10_000;

/// The fixture `file` (an object as the apiserver sent it), `N` times with distinct names and
/// uids, each given to `prepare` and then to a reflector store: the bytes held per object.
fn per_object<K>(file: &str, prepare: impl Fn(&mut K)) -> f64
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + 'static,
{
    let path = format!("{}/benches/footprint/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let template: serde_json::Value = serde_json::from_str(&text).expect("a JSON object");
    let name = template["metadata"]["name"].as_str().expect("a name").to_string();
    let uid = template["metadata"]["uid"].as_str().expect("a uid").to_string();
    // Each copy is deserialized from its own text, as a watch event is.
    let texts: Vec<String> = (0..N)
        .map(|i| {
            let mut obj = template.clone();
            obj["metadata"]["name"] = format!("{name}-{i:05}").into();
            obj["metadata"]["uid"] = format!("{}{i:05}", &uid[..uid.len() - 5]).into();
            serde_json::to_string(&obj).expect("serializes")
        })
        .collect();
    let (store, mut writer) = reflector::store::<K>();
    let before = LIVE.load(Ordering::Relaxed);
    for text in &texts {
        let mut obj: K = serde_json::from_str(text).unwrap_or_else(|e| panic!("{file}: {e}"));
        prepare(&mut obj);
        writer.apply_watcher_event(&Event::Apply(obj));
    }
    let after = LIVE.load(Ordering::Relaxed);
    assert_eq!(store.state().len(), N);
    drop((store, writer));
    (after - before) as f64 / N as f64
}

fn main() {
    struct Row {
        what: &'static str,
        per: &'static str,
        cached: f64,
        received: f64,
    }
    let rows = vec![
        Row {
            what: "AgentIdentity (with status)",
            per: "identity",
            cached: per_object::<AgentIdentity>("identity.json", cache::slim_identity),
            received: per_object::<AgentIdentity>("identity.json", |_| {}),
        },
        Row {
            what: "base ServiceAccount (metadata)",
            per: "identity",
            cached: per_object::<PartialObjectMeta<ServiceAccount>>("identity-serviceaccount.json", |o| {
                cache::trim_meta(o, Keep::OWNED)
            }),
            received: per_object::<PartialObjectMeta<ServiceAccount>>("identity-serviceaccount.json", |_| {}),
        },
        Row {
            what: "credentials Secret (metadata)",
            per: "identity",
            cached: per_object::<PartialObjectMeta<Secret>>("identity-secret.json", |o| {
                cache::trim_meta(o, Keep::SECRETS)
            }),
            received: per_object::<PartialObjectMeta<Secret>>("identity-secret.json", |_| {}),
        },
        Row {
            what: "requester Role",
            per: "identity",
            cached: per_object::<Role>("requester-role.json", |o| cache::trim(o, Keep::ROLES)),
            received: per_object::<Role>("requester-role.json", |_| {}),
        },
        Row {
            what: "requester RoleBinding",
            per: "identity",
            cached: per_object::<RoleBinding>("requester-binding.json", |o| cache::trim(o, Keep::BINDINGS)),
            received: per_object::<RoleBinding>("requester-binding.json", |_| {}),
        },
        Row {
            what: "AccessGrant (Active)",
            per: "active grant",
            cached: per_object::<AccessGrant>("grant-active.json", cache::slim_grant),
            received: per_object::<AccessGrant>("grant-active.json", |_| {}),
        },
        Row {
            what: "grant Role",
            per: "active grant",
            cached: per_object::<Role>("grant-role.json", |o| cache::trim(o, Keep::ROLES)),
            received: per_object::<Role>("grant-role.json", |_| {}),
        },
        Row {
            what: "grant RoleBinding",
            per: "active grant",
            cached: per_object::<RoleBinding>("grant-binding.json", |o| cache::trim(o, Keep::BINDINGS)),
            received: per_object::<RoleBinding>("grant-binding.json", |_| {}),
        },
        Row {
            what: "grant Secret (metadata)",
            per: "active grant",
            cached: per_object::<PartialObjectMeta<Secret>>("grant-secret.json", |o| {
                cache::trim_meta(o, Keep::SECRETS)
            }),
            received: per_object::<PartialObjectMeta<Secret>>("grant-secret.json", |_| {}),
        },
    ];
    println!("bytes held per cached object ({N} copies each, in a reflector store, jemalloc size classes):\n");
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
