//! The grant controller's backlog: grants changed and waiting for a worker, kept here rather than
//! in kube's scheduler.
//!
//! kube's controller takes in every trigger at once and keeps each in its scheduler until a
//! worker is free: under a flood of 50,000 new grants, tens of thousands at a time. The
//! scheduler's tables keep the size they grew to for the life of the process (several MiB after
//! the flood was worked off, docs/benchmarks.md). Here the controller is handed only as many
//! grants as it can start soon; the rest wait in a queue of names that is dropped when it
//! empties. The watch is never held up: what arrives is always taken in.
//!
//! A grant waiting here is looked up in the cache when it is handed on, so it is reconciled as
//! the cache then shows it; a change to a grant already handed on and not yet started needs
//! nothing more (its reconcile reads the cache when it starts).
//!
//! Revocations do not wait behind a flood: a grant being deleted, or one that holds a credential
//! (whose change may end it), goes ahead of the grants still to be decided.

use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::{Stream, StreamExt, stream::BoxStream, task::AtomicWaker};
use kube::{
    ResourceExt,
    runtime::reflector::{ObjectRef, Store},
};
use prometheus_client::metrics::gauge::Gauge;

use super::triggers::holds_credential;
use crate::api::AccessGrant;

/// A queue that has held more than this many grants is dropped when it empties, not kept.
const KEPT_CAPACITY: usize = 1024;

fn key(grant: &AccessGrant) -> ObjectRef<AccessGrant> {
    // Without the resource version and uid that `from_obj` adds: names are what is compared.
    ObjectRef::new(&grant.name_any()).within(&grant.namespace().unwrap_or_default())
}

/// The grants handed on to the controller whose reconcile has not started yet (by name, with
/// the uid handed on), and at most how many there may be. Shared by the backlog, the reconciler
/// (which says when one starts) and the watch, which says when one is deleted or left the cache
/// at a re-listing: the controller does not start a reconcile for a grant no longer in the cache.
pub(crate) struct Handed {
    grants: Mutex<HashMap<ObjectRef<AccessGrant>, Option<String>>>,
    room: AtomicWaker,
    limit: usize,
}

impl Handed {
    /// At most `limit` (at least 1) grants handed on and not started.
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { grants: Mutex::default(), room: AtomicWaker::new(), limit: limit.max(1) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<AccessGrant>, Option<String>>> {
        self.grants.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `grant`'s reconcile has started (the controller reconciles by name: whichever object of
    /// that name the cache holds), or it is gone: its place is free.
    pub(crate) fn done(&self, grant: &AccessGrant) {
        if self.lock().remove(&key(grant)).is_some() {
            self.room.wake();
        }
    }

    /// Frees the places of grants `cache` no longer holds as they were handed on: after a
    /// re-listing, which shows no deletion of what went in between.
    pub(crate) fn keep_cached(&self, cache: &Store<AccessGrant>) {
        let mut handed = self.lock();
        let before = handed.len();
        handed.retain(|g, uid| still_cached(cache, g, uid));
        if handed.len() < before {
            self.room.wake();
        }
    }

    /// Whether a reconcile of `grant` (as cached now) is already due and not started.
    fn awaits(&self, grant: &AccessGrant) -> bool {
        self.lock().get(&key(grant)).is_some_and(|uid| *uid == grant.metadata.uid)
    }
}

fn still_cached(cache: &Store<AccessGrant>, grant: &ObjectRef<AccessGrant>, uid: &Option<String>) -> bool {
    cache.get(grant).is_some_and(|g| g.metadata.uid == *uid)
}

/// The grants of `changes`, handed on as the controller has room (see [`Handed`]), each as the
/// cache holds it then.
pub(crate) struct Backlog {
    changes: BoxStream<'static, Arc<AccessGrant>>,
    ended: bool,
    cache: Store<AccessGrant>,
    handed: Arc<Handed>,
    /// Grants being deleted or holding a credential, handed on first.
    urgent: VecDeque<ObjectRef<AccessGrant>>,
    queue: VecDeque<ObjectRef<AccessGrant>>,
    /// What waits, and whether in the urgent lane. A grant moved there also stays in the other
    /// lane, where it is skipped (no longer here when reached).
    queued: HashMap<ObjectRef<AccessGrant>, bool>,
    waiting: Gauge,
}

impl Backlog {
    /// `waiting` is set to how many grants wait here.
    pub(crate) fn new(
        changes: BoxStream<'static, Arc<AccessGrant>>,
        cache: Store<AccessGrant>,
        handed: Arc<Handed>,
        waiting: Gauge,
    ) -> Self {
        Self {
            changes,
            ended: false,
            cache,
            handed,
            urgent: VecDeque::new(),
            queue: VecDeque::new(),
            queued: HashMap::new(),
            waiting,
        }
    }

    /// Queues a change of `grant`, unless a reconcile of it is due and not started: that one
    /// will see it (the cache holds a change before it is announced). A grant being deleted or
    /// holding a credential goes to the urgent lane, also when it already waits in the other.
    fn take_in(&mut self, grant: &AccessGrant) {
        if self.handed.awaits(grant) {
            return;
        }
        let urgent = grant.metadata.deletion_timestamp.is_some() || holds_credential(grant);
        let key = key(grant);
        match self.queued.get(&key) {
            Some(true) => {}
            Some(false) if !urgent => {}
            _ => {
                self.queued.insert(key.clone(), urgent);
                match urgent {
                    true => self.urgent.push_back(key),
                    false => self.queue.push_back(key),
                }
            }
        }
    }

    /// The next grant to hand on, if the controller has room; registers for a wake-up if not.
    fn hand_on(&mut self, cx: &mut Context<'_>) -> Option<Arc<AccessGrant>> {
        // Before looking: a place freed after the look wakes this task.
        self.handed.room.register(cx.waker());
        loop {
            let lane = match self.urgent.is_empty() {
                true => &mut self.queue,
                false => &mut self.urgent,
            };
            if lane.is_empty() {
                break;
            }
            let mut handed = self.handed.lock();
            if handed.len() >= self.handed.limit {
                // Full. A safety net (a re-listing frees these places at once): of grants no
                // longer in the cache as handed on, no reconcile will start.
                handed.retain(|g, uid| still_cached(&self.cache, g, uid));
                if handed.len() >= self.handed.limit {
                    return None;
                }
            }
            let next = lane.pop_front()?;
            // Moved to the urgent lane and handed on from there already.
            if self.queued.remove(&next).is_none() {
                continue;
            }
            // Handed on with the uid cached now (a grant deleted and made again under its name is
            // another), then looked up again: a deletion in between, whose `done` may have come
            // before the entry, must not leave its place taken.
            let Some(grant) = self.cache.get(&next) else { continue };
            handed.insert(next.clone(), grant.metadata.uid.clone());
            drop(handed);
            match self.cache.get(&next) {
                Some(grant) => return Some(grant),
                None => {
                    self.handed.lock().remove(&next);
                }
            }
        }
        if self.queue.capacity() > KEPT_CAPACITY || self.urgent.capacity() > KEPT_CAPACITY {
            self.urgent = VecDeque::new();
            self.queue = VecDeque::new();
            self.queued = HashMap::new();
        }
        None
    }
}

impl Stream for Backlog {
    type Item = Arc<AccessGrant>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Everything that arrived, so that the watch feeding it is not held up.
        while !this.ended {
            match this.changes.poll_next_unpin(cx) {
                Poll::Ready(Some(grant)) => this.take_in(&grant),
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => break,
            }
        }
        let next = this.hand_on(cx);
        this.waiting.set(i64::try_from(this.queued.len()).unwrap_or(i64::MAX));
        match next {
            Some(grant) => Poll::Ready(Some(grant)),
            None if this.ended && this.queued.is_empty() => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{FutureExt, SinkExt, channel::mpsc, task::ArcWake};
    use kube::runtime::{reflector::store::Writer, watcher::Event};
    use std::sync::atomic::{AtomicBool, Ordering};

    fn grant(i: usize) -> AccessGrant {
        let mut g = crate::policy::testing::grant("read", "fixer", "15m", vec![]);
        g.metadata.name = Some(format!("g{i}"));
        g.metadata.uid = Some(format!("u{i}"));
        g
    }

    struct Fixture {
        writer: Writer<AccessGrant>,
        tx: mpsc::Sender<Arc<AccessGrant>>,
        handed: Arc<Handed>,
        backlog: Backlog,
        waiting: Gauge,
    }

    fn fixture(limit: usize) -> Fixture {
        let (cache, writer) = kube::runtime::reflector::store();
        let (tx, rx) = mpsc::channel(100_000);
        let (handed, waiting) = (Handed::new(limit), Gauge::default());
        let backlog = Backlog::new(rx.boxed(), cache, handed.clone(), waiting.clone());
        Fixture { writer, tx, handed, backlog, waiting }
    }

    impl Fixture {
        async fn change(&mut self, g: AccessGrant) {
            self.writer.apply_watcher_event(&Event::Apply(g.clone()));
            self.tx.send(Arc::new(g)).await.expect("open");
        }

        /// What the backlog hands on now, without waiting.
        fn ready(&mut self) -> Vec<String> {
            std::iter::from_fn(|| self.backlog.next().now_or_never().flatten()).map(|g| g.name_any()).collect()
        }

        /// The reconcile of the grant named `name` (`g<i>`) starts.
        fn started(&self, name: &str) {
            self.handed.done(&grant(name[1..].parse().expect("g<number>")));
        }
    }

    /// Room for one, 100 grants changed, and the first handed on.
    async fn flood_of_100() -> Fixture {
        let mut f = fixture(1);
        for i in 0..100 {
            f.change(grant(i)).await;
        }
        assert_eq!(f.ready(), ["g0"]);
        f
    }

    fn being_deleted(i: usize) -> AccessGrant {
        let mut g = grant(i);
        g.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
        g
    }

    #[derive(Default)]
    struct Woken(AtomicBool);

    impl ArcWake for Woken {
        fn wake_by_ref(woken: &Arc<Self>) {
            woken.0.store(true, Ordering::SeqCst);
        }
    }

    fn names(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("g{i}")).collect()
    }

    #[tokio::test]
    async fn a_flood_waits_here_and_the_controller_gets_what_it_can_start() {
        let mut f = fixture(4);
        for i in 0..2000 {
            f.change(grant(i)).await;
        }
        // Changed again while waiting: still once.
        f.change(grant(1)).await;
        assert_eq!(f.ready(), names(0..4), "no more than the limit handed on");
        assert_eq!(f.waiting.get(), 1996);
        // A change to a grant handed on and not started: its reconcile will see it.
        f.change(grant(2)).await;
        assert_eq!(f.ready(), Vec::<String>::new());
        f.handed.done(&grant(0));
        f.handed.done(&grant(2));
        assert_eq!(f.ready(), names(4..6), "a place per start");
        // The rest, as the controller starts each.
        let mut got = names(0..6);
        for i in [1, 3, 4, 5] {
            f.handed.done(&grant(i));
        }
        while got.len() < 2000 {
            let ready = f.ready();
            assert!(!ready.is_empty(), "a place freed hands one on");
            for g in ready {
                f.started(&g);
                got.push(g);
            }
        }
        let mut expected = names(0..2000);
        assert_eq!((got.len(), f.waiting.get()), (2000, 0));
        got.sort();
        expected.sort();
        assert_eq!(got, expected, "each once");
        // The queue that held the flood is not kept.
        assert!(f.backlog.queue.capacity() <= KEPT_CAPACITY, "{}", f.backlog.queue.capacity());
        assert!(f.backlog.queued.capacity() <= KEPT_CAPACITY, "{}", f.backlog.queued.capacity());
    }

    #[tokio::test]
    async fn a_revocation_goes_ahead_of_a_flood() {
        let mut f = flood_of_100().await;
        let mut active = grant(100);
        active.status.get_or_insert_default().phase = Some(crate::api::GrantPhase::Active);
        f.change(active).await;
        f.change(being_deleted(101)).await;
        let mut order = Vec::new();
        for i in [0, 100, 101] {
            f.handed.done(&grant(i));
            order.extend(f.ready());
        }
        assert_eq!(order, ["g100", "g101", "g1"], "ahead of the flood, after the one already handed on");
    }

    #[tokio::test]
    async fn a_grant_deleted_while_it_waits_goes_ahead_too() {
        let mut f = flood_of_100().await;
        f.change(being_deleted(50)).await;
        f.started("g0");
        let mut order = Vec::new();
        while order.len() < 99 {
            let next = f.ready();
            f.started(&next[0]);
            order.extend(next);
        }
        assert_eq!(order[..2], ["g50", "g1"], "ahead of the flood");
        assert_eq!(order.iter().filter(|g| *g == "g50").count(), 1, "and not again from its old place");
        assert_eq!((f.ready(), f.waiting.get()), (vec![], 0));
    }

    #[tokio::test]
    async fn a_grant_gone_from_the_cache_holds_no_place() {
        let mut f = fixture(2);
        for i in 0..4 {
            f.change(grant(i)).await;
        }
        // Deleted while waiting: skipped.
        f.writer.apply_watcher_event(&Event::Delete(grant(0)));
        assert_eq!(f.ready(), names(1..3));
        // Deleted after it was handed on: the controller starts no reconcile for it; the
        // deletion frees its place, and wakes the backlog.
        let woken = Arc::new(Woken::default());
        let waker = futures::task::waker(woken.clone());
        assert!(f.backlog.poll_next_unpin(&mut Context::from_waker(&waker)).is_pending());
        f.writer.apply_watcher_event(&Event::Delete(grant(1)));
        f.handed.done(&grant(1));
        assert!(woken.0.load(Ordering::SeqCst), "woken");
        assert_eq!(f.ready(), names(3..4));
        // Gone by a re-listing (no deletion seen): its place is freed when one is needed.
        f.change(grant(4)).await;
        assert_eq!(f.ready(), Vec::<String>::new(), "full: g2 and g3 handed on");
        f.writer.apply_watcher_event(&Event::Init);
        for g in [grant(3), grant(4)] {
            f.writer.apply_watcher_event(&Event::InitApply(g));
        }
        f.writer.apply_watcher_event(&Event::InitDone);
        assert_eq!(f.ready(), names(4..5));
        // Deleted and made again under its name during a re-listing: the new one is not taken
        // for the one handed on (whose reconcile found nothing), and the re-listing frees the
        // old one's place.
        f.handed.done(&grant(3));
        assert!(f.handed.lock().contains_key(&key(&grant(4))), "g4 handed on");
        let mut again = grant(4);
        again.metadata.uid = Some("u4-again".into());
        f.writer.apply_watcher_event(&Event::Init);
        f.writer.apply_watcher_event(&Event::InitApply(again.clone()));
        f.writer.apply_watcher_event(&Event::InitDone);
        f.handed.keep_cached(&f.backlog.cache);
        assert!(f.handed.lock().is_empty(), "the old g4's place freed");
        f.tx.send(Arc::new(again.clone())).await.expect("open");
        assert_eq!(f.ready(), names(4..5), "the new g4 handed on");
        // The end of the changes ends the backlog once it is empty.
        drop(f.tx);
        f.handed.done(&again);
        assert_eq!(f.backlog.next().await.map(|g| g.name_any()), None);
    }
}
