//! Fan-out of batches to plugin queues. The reader never blocks here: a full queue
//! drops the batch for that plugin alone and counts it.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicU64, Ordering::Relaxed},
    mpsc::{SyncSender, TrySendError},
};

use super::{Batch, CgroupScope, CompiledFilters, EventFilter, RecordKeys};
use crate::{
    plugins::worker::Work,
    probes::Kind,
    sinks::{SelfMetrics, self_metrics::PluginCounters},
};

/// One plugin's subscription to one kind, and its bounded queue (shared by the
/// plugin's subscriptions to other kinds).
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub plugin: String,
    pub kind: Kind,
    /// A record goes to the plugin if any of these matches.
    pub filters: Vec<EventFilter>,
    /// The same, compiled for routing.
    pub compiled: CompiledFilters,
    /// A tenant's plugin only ever gets records of cgroups in its tenant's scope.
    pub scope: Option<Arc<CgroupScope>>,
    pub queue: SyncSender<Work>,
    /// Records dropped since the plugin's last batch (reported to it, then reset).
    pub pending_dropped: Arc<AtomicU64>,
    pub counters: PluginCounters,
}

impl Subscriber {
    /// `plugin`'s subscription to `kind` with `filters` (compiled here), delivering
    /// into `queue`, with no drops pending.
    pub fn new(
        plugin: &str,
        kind: Kind,
        filters: Vec<EventFilter>,
        scope: Option<Arc<CgroupScope>>,
        queue: SyncSender<Work>,
        counters: PluginCounters,
    ) -> Self {
        Self { plugin: plugin.to_owned(), kind, compiled: CompiledFilters::new(&filters), filters, scope, queue, pending_dropped: Arc::default(), counters }
    }

    fn wants_all(&self) -> bool {
        self.compiled.is_all() && self.scope.is_none()
    }

    fn select(&self, records: &[u8]) -> Vec<u8> {
        let in_scope = |r: &RecordKeys| self.scope.as_ref().is_none_or(|s| s.contains(r.cgroup_id));
        // Grown as records match: a queued batch holds no more than about twice what
        // it carries.
        let mut selected = Vec::new();
        for raw in records.chunks_exact(self.kind.record_size) {
            let keys = RecordKeys::read(self.kind, raw);
            if self.compiled.matches(&keys) && in_scope(&keys) {
                selected.extend_from_slice(raw);
            }
        }
        selected
    }

    /// The same subscription delivering into `queue`, counting its drops apart (a
    /// replace holds an old build's records there until its verdict).
    pub fn shadow(&self, queue: SyncSender<Work>) -> Self {
        Self { queue, pending_dropped: Arc::default(), counters: SelfMetrics::default().plugin(&self.plugin), ..self.clone() }
    }

    /// The same subscription (queue and drops pending included), counting its drops in
    /// `counters`.
    pub fn with_counters(&self, counters: PluginCounters) -> Self {
        Self { counters, ..self.clone() }
    }

    /// Counts what `shadow` dropped as this subscriber's own drops.
    pub fn adopt_drops(&self, shadow: &Subscriber) {
        let n = shadow.pending_dropped.load(Relaxed);
        if n > 0 {
            self.drop_records(n as usize);
        }
    }

    fn drop_records(&self, n: usize) {
        self.pending_dropped.fetch_add(n as u64, Relaxed);
        self.counters.dropped.inc_by(n as u64);
    }
}

/// A part of the host that sees every batch before the plugins do (e.g. enrichment
/// learning process lifetimes).
pub trait Observer: Send + Sync {
    fn observe(&self, batch: &Batch);
    /// Records of `kind` were lost in the kernel (its ring buffer was full).
    fn lost(&self, kind: Kind);
}

/// The current subscribers and observers; swapped whole when plugins change.
#[derive(Default)]
pub struct Router {
    routes: RwLock<Routes>,
}

#[derive(Default)]
struct Routes {
    subscribers: Vec<Arc<Subscriber>>,
    observers: Vec<Arc<dyn Observer>>,
}

impl Router {
    #[cfg(test)]
    pub fn new(subscribers: Vec<Arc<Subscriber>>, observers: Vec<Arc<dyn Observer>>) -> Self {
        Self { routes: RwLock::new(Routes { subscribers, observers }) }
    }

    #[cfg(test)]
    pub fn subscribers(&self) -> Vec<Arc<Subscriber>> {
        self.routes.read().expect("router lock").subscribers.clone()
    }

    /// Replaces the subscribers and observers. A dispatch holds the routes for its whole
    /// batch, so once this returns no batch goes to a subscriber left out: a plugin
    /// replaced between two batches gets neither fewer nor more than its share.
    pub fn set(&self, subscribers: Vec<Arc<Subscriber>>, observers: Vec<Arc<dyn Observer>>) {
        *self.routes.write().expect("router lock") = Routes { subscribers, observers };
    }

    /// Tells the observers that records of `kind` were lost in the kernel.
    pub fn lost(&self, kind: Kind) {
        self.routes.read().expect("router lock").observers.iter().for_each(|o| o.lost(kind));
    }

    /// Hands `batch` to every subscriber of its kind, filtered per subscriber.
    pub fn dispatch(&self, batch: &Batch) {
        let routes = self.routes.read().expect("router lock");
        routes.observers.iter().for_each(|o| o.observe(batch));
        for sub in routes.subscribers.iter().filter(|s| s.kind == batch.kind) {
            let mine = if sub.wants_all() {
                batch.clone()
            } else {
                let selected = sub.select(&batch.records);
                if selected.is_empty() {
                    continue;
                }
                Batch { kind: batch.kind, records: Arc::new(selected) }
            };
            let n = mine.len();
            match sub.queue.try_send(Work::Batch(mine)) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => sub.drop_records(n),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::sync_channel;

    use wasmtap_events::{Record as _, RecordHeader, SyscallRecord};

    use super::*;
    use crate::{probes::syscall::KIND, sinks::SelfMetrics};

    fn records(pids: &[u32]) -> Vec<u8> {
        pids.iter().flat_map(|&pid| SyscallRecord { header: RecordHeader { pid, ..Default::default() }, ..Default::default() }.as_bytes().to_vec()).collect()
    }

    #[test]
    fn routes_by_filter_and_drops_when_full() {
        let metrics = SelfMetrics::default();
        let (all_tx, all_rx) = sync_channel(1);
        let (one_tx, one_rx) = sync_channel(8);
        let sub = |name: &str, pids: &[u32], queue| {
            let filters = vec![EventFilter { pids: pids.iter().copied().collect(), ..Default::default() }];
            Arc::new(Subscriber::new(name, &KIND, filters, None, queue, metrics.plugin(name)))
        };
        let router = Router::new(vec![sub("all", &[], all_tx), sub("one", &[2], one_tx)], Vec::new());
        let batch = Batch { kind: &KIND, records: Arc::new(records(&[1, 2, 2, 3])) };
        router.dispatch(&batch);
        router.dispatch(&batch);
        let batch_of = |w: Work| match w {
            Work::Batch(b) => b,
            Work::Handoff(_) => panic!("a batch"),
        };
        let first = batch_of(all_rx.try_recv().unwrap());
        assert!(Arc::ptr_eq(&first.records, &batch.records), "unfiltered subscribers share the buffer");
        assert!(all_rx.try_recv().is_err());
        assert_eq!(router.subscribers()[0].pending_dropped.load(Relaxed), 4);
        assert_eq!(batch_of(one_rx.try_recv().unwrap()).len(), 2);
        assert_eq!(batch_of(one_rx.try_recv().unwrap()).records.as_slice(), records(&[2, 2]).as_slice());
    }
}
