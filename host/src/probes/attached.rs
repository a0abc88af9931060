//! The kinds loaded now, kept to what the running plugins subscribe to: a kind gets its
//! probe and reader when its first subscriber comes, its kernel filters follow the
//! subscribers' union, and its programs are detached when its last subscriber leaves.

use std::{sync::Arc, time::Duration};

use super::{KINDS, Kind, Probe, process};
use crate::{
    config::ProbeSettings,
    enrich::Enricher,
    events::{
        EventFilter, Reader, Router, Subscriber,
        reader::{ReaderThread, RunningReader},
    },
    server::status::ProbeStatus,
    sinks::SelfMetrics,
};

pub struct Attached {
    settings: ProbeSettings,
    router: Arc<Router>,
    metrics: SelfMetrics,
    enricher: Arc<Enricher>,
    thread: ReaderThread,
    kinds: Vec<(Probe, RunningReader)>,
    /// Kinds that could not be attached the last time, and why.
    errors: Vec<(&'static str, String)>,
}

/// What the kernel must record for one subscriber's filter: a tenant's plugin records
/// its tenant's scope (the kernel matches a cgroup and every cgroup below it), whatever
/// cgroups it names; the host narrows to those. (Checking each named id against the
/// scope here could wait for a subtree walk per unknown id.)
fn kernel_filters(sub: &Subscriber) -> impl Iterator<Item = EventFilter> + '_ {
    sub.filters.iter().map(|f| match &sub.scope {
        Some(scope) => EventFilter { cgroups: [scope.root_id()].into(), ..f.clone() },
        None => f.clone(),
    })
}

impl Attached {
    pub fn new(settings: ProbeSettings, router: Arc<Router>, metrics: SelfMetrics, enricher: Arc<Enricher>) -> anyhow::Result<Self> {
        Ok(Self { settings, router, metrics, enricher, thread: ReaderThread::start()?, kinds: Vec::new(), errors: Vec::new() })
    }

    /// Brings every kind in line with `subscribers`: attaches kinds newly subscribed to,
    /// reprograms the kernel filters of the others, detaches kinds nobody wants.
    /// Enrichment, when used, observes every process event.
    pub fn sync(&mut self, subscribers: &[Arc<Subscriber>], enrichment: bool) {
        self.errors.clear();
        for &kind in KINDS {
            let mut filters: Vec<EventFilter> = subscribers.iter().filter(|s| s.kind == kind).flat_map(|s| kernel_filters(s)).collect();
            if enrichment && kind == &process::KIND {
                filters.push(EventFilter::default());
            }
            let loaded = self.kinds.iter().position(|(p, _)| p.kind == kind);
            match (EventFilter::union(&filters), loaded) {
                (Some(filter), Some(i)) => {
                    if let Err(e) = self.kinds[i].0.set_filter(&filter) {
                        tracing::error!(kind = kind.name, "kernel filter not updated: {e:#}");
                        self.errors.push((kind.name, format!("{e:#}")));
                    }
                }
                (Some(filter), None) => self.attach(kind, &filter),
                (None, Some(i)) => {
                    let (probe, reader) = self.kinds.remove(i);
                    drop(probe); // detach first: the reader's last drain then gets everything
                    self.thread.finish(reader);
                    tracing::info!(kind = kind.name, "nobody subscribes any more: the kind's programs are detached");
                }
                (None, None) => {}
            }
        }
        for (probe, _) in &self.kinds {
            if let Some(e) = probe.point_errors() {
                tracing::error!(kind = probe.kind.name, "probe points not attached: {e}");
                self.errors.push((probe.kind.name, e.to_owned()));
            }
        }
        let tracked = enrichment && self.kinds.iter().any(|(p, _)| p.kind == &process::KIND);
        self.enricher.set_tracking(tracked);
    }

    fn attach(&mut self, kind: Kind, filter: &EventFilter) {
        match Probe::start(kind, &self.settings, filter) {
            Ok((probe, stream)) => {
                tracing::info!(kind = kind.name, attach = probe.attach_kind(), widened = ?probe.widened(), "probe attached");
                let reader = Reader {
                    stream,
                    router: self.router.clone(),
                    counters: self.metrics.probe(kind.name),
                    interval: Duration::from_millis(self.settings.drain_interval_ms),
                };
                self.kinds.push((probe, self.thread.spawn(reader)));
            }
            Err(e) => {
                tracing::error!(kind = kind.name, "probe not attached: {e:#}");
                self.errors.push((kind.name, format!("{e:#}")));
            }
        }
    }

    /// Has `kind`'s reader drain at once.
    pub fn drain_now(&self, kind: Kind) {
        self.kinds.iter().filter(|(p, _)| p.kind == kind).for_each(|(_, r)| r.drain_now());
    }

    /// What `/status` shows of the probes.
    pub fn status(&self) -> (Vec<ProbeStatus>, Vec<(&'static str, String)>) {
        let probes = self
            .kinds
            .iter()
            .map(|(p, _)| ProbeStatus { name: p.kind.name, attach: p.attach_kind(), program_ids: p.program_ids(), widened: p.widened() })
            .collect();
        (probes, self.errors.clone())
    }

    /// Detaches every kind, drains what the kernel wrote, and ends the reader thread.
    pub fn shutdown(mut self) {
        let kinds = std::mem::take(&mut self.kinds);
        let (probes, readers): (Vec<_>, Vec<_>) = kinds.into_iter().unzip();
        drop(probes);
        readers.into_iter().for_each(|r| self.thread.finish(r));
        self.thread.join();
    }
}
