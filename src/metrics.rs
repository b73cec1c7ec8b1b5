//! Prometheus metrics and the operator's HTTP endpoints (`/metrics`, `/healthz`, `/readyz`).
//! Labels come from bounded sets only (kind, phase, error category): never object names.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use kube::runtime::reflector::Store;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::api::{AccessGrant, GrantPhase};

/// Labels for per-kind metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// AccessGrant or AgentIdentity.
    pub kind: &'static str,
}

/// Labels for reconcile errors.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// AccessGrant or AgentIdentity.
    pub kind: &'static str,
    /// The error's category (a bounded set).
    pub category: &'static str,
}

/// Labels for grants by phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// The grant phase, or `Unknown` before the first status.
    pub phase: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_buckets() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Every metric agentid exports.
pub struct Metrics {
    registry: Registry,
    reconcile_duration: HistogramFamily<KindLabels>,
    reconcile_errors: Family<ErrorLabels, Counter>,
    /// AccessGrant created → credential issued, in seconds.
    pub issuance_latency: Histogram,
    /// A grant's expiresAt → its ServiceAccount deleted, in seconds.
    pub revocation_lag: Histogram,
    grants_by_phase: Family<PhaseLabels, Gauge>,
    /// Bindings found giving an identity standing privilege (each time one is first seen).
    pub standing_privilege_detections: Counter,
    /// 1 while this replica holds the leader Lease (or runs without leader election), else 0.
    pub leader: Gauge,
    /// Grants changed and waiting for a reconcile worker (not yet handed to the controller).
    pub grants_waiting: Gauge,
    heap_allocated: Gauge,
    heap_active: Gauge,
    heap_resident: Gauge,
    heap_caches: Gauge,
    heap_caches_active: Gauge,
}

/// What the allocator holds, in bytes: `allocated` is what the program uses, `active` the pages
/// that hold it (with the free parts of partly used pages: fragmentation), `resident` all of the
/// allocator's pages in memory (with its bookkeeping and freed pages not yet returned).
#[derive(Clone, Copy, Debug)]
pub struct HeapStats {
    /// Bytes in live allocations.
    pub allocated: u64,
    /// Bytes of pages in use by allocations.
    pub active: u64,
    /// Bytes of the allocator's pages resident in memory.
    pub resident: u64,
    /// Of `allocated`, the bytes of the caches' arena (see [`crate::alloc`]).
    pub caches: u64,
    /// Of `active`, the caches' arena's pages.
    pub caches_active: u64,
}

static HEAP_STATS: OnceLock<fn() -> Option<HeapStats>> = OnceLock::new();

/// Sets where the heap gauges are read from (the `agentid` binary: its allocator). Without it
/// they are not exported. The first call wins.
pub fn read_heap_with(read: fn() -> Option<HeapStats>) {
    let _ = HEAP_STATS.set(read);
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agentid");
        let reconcile_duration: HistogramFamily<KindLabels> = Family::new_with_constructor(duration_buckets);
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let issuance_latency = duration_buckets();
        let revocation_lag = duration_buckets();
        let grants_by_phase = Family::<PhaseLabels, Gauge>::default();
        registry.register("reconcile_duration_seconds", "Time spent in one reconcile", reconcile_duration.clone());
        registry.register("reconcile_errors", "Failed reconciles by kind and error category", reconcile_errors.clone());
        registry.register(
            "grant_issuance_latency_seconds",
            "From AccessGrant creation to its credential being issued",
            issuance_latency.clone(),
        );
        registry.register(
            "grant_revocation_lag_seconds",
            "From a grant's expiresAt to its ServiceAccount being deleted",
            revocation_lag.clone(),
        );
        registry.register("grants", "AccessGrants by phase", grants_by_phase.clone());
        let standing_privilege_detections = Counter::default();
        registry.register(
            "standing_privilege_detections",
            "Bindings not made by agentid found giving an identity standing privilege",
            standing_privilege_detections.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica leads (reconciles and writes), else 0", leader.clone());
        let grants_waiting = Gauge::default();
        registry.register(
            "grants_waiting",
            "AccessGrants changed and waiting for a reconcile worker",
            grants_waiting.clone(),
        );
        let (heap_allocated, heap_active, heap_resident, heap_caches, heap_caches_active) =
            (Gauge::default(), Gauge::default(), Gauge::default(), Gauge::default(), Gauge::default());
        if HEAP_STATS.get().is_some() {
            registry.register(
                "heap_allocated_bytes",
                "Bytes in the operator's live allocations",
                heap_allocated.clone(),
            );
            registry.register(
                "heap_active_bytes",
                "Bytes of the allocator's pages in use by live allocations (with their free parts)",
                heap_active.clone(),
            );
            registry.register(
                "heap_resident_bytes",
                "Bytes of the operator's allocator pages resident in memory (allocated, plus freed but not yet returned, and fragmentation)",
                heap_resident.clone(),
            );
            registry.register(
                "heap_caches_allocated_bytes",
                "Of the live allocations, the bytes the watch caches keep (their objects and indexes, allocated apart)",
                heap_caches.clone(),
            );
            registry.register(
                "heap_caches_active_bytes",
                "Of the allocator's pages in use, those of the watch caches' arena",
                heap_caches_active.clone(),
            );
        }
        Self {
            heap_allocated,
            heap_active,
            heap_resident,
            heap_caches,
            heap_caches_active,
            registry,
            leader,
            grants_waiting,
            reconcile_duration,
            reconcile_errors,
            issuance_latency,
            revocation_lag,
            grants_by_phase,
            standing_privilege_detections,
        }
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed().as_secs_f64();
        self.metrics.reconcile_duration.get_or_create(&KindLabels { kind: self.kind }).observe(elapsed);
    }
}

impl Metrics {
    /// Starts timing one reconcile of `kind`.
    pub fn reconcile_timer(&self, kind: &'static str) -> ReconcileTimer<'_> {
        ReconcileTimer { metrics: self, kind, start: Instant::now() }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, kind: &'static str, category: &'static str) {
        self.reconcile_errors.get_or_create(&ErrorLabels { kind, category }).inc();
    }

    fn count_grants(&self, grants: &Store<AccessGrant>) {
        let phases = GrantPhase::ALL;
        let mut counts = [0i64; 8];
        for grant in grants.state() {
            let phase = grant.status.as_ref().and_then(|s| s.phase);
            let index = phase.and_then(|p| phases.iter().position(|q| *q == p)).unwrap_or(7);
            counts[index] += 1;
        }
        for (index, count) in counts.iter().enumerate() {
            let phase = phases.get(index).map(phase_name).unwrap_or("Unknown");
            self.grants_by_phase.get_or_create(&PhaseLabels { phase }).set(*count);
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self, grants: &Store<AccessGrant>) -> String {
        self.count_grants(grants);
        if let Some(heap) = HEAP_STATS.get().and_then(|read| read()) {
            self.heap_allocated.set(i64::try_from(heap.allocated).unwrap_or(i64::MAX));
            self.heap_active.set(i64::try_from(heap.active).unwrap_or(i64::MAX));
            self.heap_resident.set(i64::try_from(heap.resident).unwrap_or(i64::MAX));
            self.heap_caches.set(i64::try_from(heap.caches).unwrap_or(i64::MAX));
            self.heap_caches_active.set(i64::try_from(heap.caches_active).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn phase_name(phase: &GrantPhase) -> &'static str {
    match phase {
        GrantPhase::Pending => "Pending",
        GrantPhase::AwaitingApproval => "AwaitingApproval",
        GrantPhase::Active => "Active",
        GrantPhase::Expired => "Expired",
        GrantPhase::Revoked => "Revoked",
        GrantPhase::Denied => "Denied",
        GrantPhase::Rejected => "Rejected",
    }
}

/// What the HTTP endpoints read.
#[derive(Clone)]
pub struct HttpState {
    /// The metrics to export.
    pub metrics: Arc<Metrics>,
    /// Grants, for the by-phase gauge.
    pub grants: Store<AccessGrant>,
    /// True once start-up revocations ran and the controllers are running.
    pub ready: Arc<AtomicBool>,
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.encode(&state.grants),
    )
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting: finishing overdue revocations")
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, state: HttpState) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_named_metrics_without_object_names() {
        let metrics = Metrics::default();
        metrics.reconcile_failed("AccessGrant", "forbidden");
        metrics.revocation_lag.observe(0.2);
        drop(metrics.reconcile_timer("AccessGrant"));
        let (reader, _writer) = kube::runtime::reflector::store::<AccessGrant>();
        let text = metrics.encode(&reader);
        assert!(
            text.contains("agentid_reconcile_errors_total{kind=\"AccessGrant\",category=\"forbidden\"} 1"),
            "{text}"
        );
        assert!(text.contains("agentid_grant_revocation_lag_seconds_count 1"), "{text}");
        assert!(text.contains("agentid_grants{phase=\"Active\"} 0"), "{text}");
    }
}
