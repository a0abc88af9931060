//! cpu-throttle: which containers are starved of CPU. From the `sched` kind's run-queue
//! waits (a runnable task waiting for a CPU), per container (or cgroup path outside
//! containers):
//!
//! - `wait_seconds`: a histogram of run-queue waits of at least `min_wait_us`;
//! - `long_waits_total{reason}`: waits of at least `throttle_ms`, by why the task was
//!   runnable ("wakeup": woken and left waiting; "preempted": taken off the CPU by
//!   another task; "throttled": its cgroup ran out of CPU quota);
//! - `throttled_seconds`: a histogram of the throttled waits: each task's throttled
//!   intervals (`_count`) and the time each spent throttled (`_sum`), summed over the
//!   container's tasks (N busy threads throttled together count N intervals).
//!
//! Config (all optional): `min_wait_us` (default 1000; shorter waits never leave the
//! kernel), `throttle_ms` (default 5), and `pids`, `cgroups`, `comms` to narrow the
//! subscription.

use wasmtap_sdk::{
    Config, CounterVec, Filter, HistogramVec, HostApi, HostInfo, Manifest, Plugin, Record as _, SchedBatch, SchedRecord, Subscription, Wit, export_plugin,
    names, sched::reason,
};

pub struct CpuThrottle<H: HostApi + Clone = Wit> {
    waits: HistogramVec<u64, H>,
    long_waits: CounterVec<(u64, u32), H>,
    throttled: HistogramVec<u64, H>,
    throttle_ns: u64,
}

fn reason_label(why: u32) -> String {
    match why {
        reason::WAKEUP => "wakeup".into(),
        reason::PREEMPTED => "preempted".into(),
        reason::THROTTLED => "throttled".into(),
        other => other.to_string(),
    }
}

/// Powers of two in nanoseconds from `2^from` to 2^33 (~8.6 s).
fn pow2_bounds_ns(from: u32) -> Vec<u64> {
    (from..=33).map(|shift| 1u64 << shift).collect()
}

impl<H: HostApi + Clone> CpuThrottle<H> {
    pub fn new(host: H, min_wait_ns: u64, throttle_ns: u64) -> Result<Self, String> {
        // Buckets start at the lowest wait the kernel sends.
        let first = min_wait_ns.max(1).ilog2().clamp(10, 30);
        Ok(Self {
            waits: HistogramVec::declare(
                host.clone(),
                "wait_seconds",
                "Run-queue waits: time runnable tasks waited for a CPU.",
                &["container"],
                pow2_bounds_ns(first),
                1e-9,
            )?,
            long_waits: CounterVec::declare(
                host.clone(),
                "long_waits",
                "Run-queue waits of at least throttle_ms, by why the task was runnable.",
                &["container", "reason"],
            )?,
            throttled: HistogramVec::declare(
                host,
                "throttled_seconds",
                "Waits of tasks throttled by their CPU quota: _count intervals, _sum time (per task).",
                &["container"],
                pow2_bounds_ns(first),
                1e-9,
            )?,
            throttle_ns,
        })
    }

    /// Aggregates one batch and flushes it to the host.
    pub fn observe(&mut self, records: &[SchedRecord]) {
        for r in records {
            let cgroup = r.header.cgroup_id;
            self.waits.observe(cgroup, r.wait_ns, |id| vec![names::container_label(*id)]);
            if r.wait_ns >= self.throttle_ns {
                self.long_waits.add((cgroup, r.reason), 1, |(id, why)| vec![names::container_label(*id), reason_label(*why)]);
            }
            if r.reason == reason::THROTTLED {
                self.throttled.observe(cgroup, r.wait_ns, |id| vec![names::container_label(*id)]);
            }
        }
        self.waits.flush();
        self.long_waits.flush();
        self.throttled.flush();
    }
}

impl Plugin for CpuThrottle {
    fn init(_host: &HostInfo, config: &Config) -> Result<(Self, Manifest), String> {
        let min_wait_ns = config.get::<u64>("min_wait_us")?.unwrap_or(1000).saturating_mul(1000);
        let throttle_ns = config.get::<u64>("throttle_ms")?.unwrap_or(5).saturating_mul(1_000_000);
        let filter = Filter {
            pids: config.list("pids")?,
            cgroups: config.list("cgroups")?,
            comms: config.list("comms")?,
            params: vec![("min_wait_ns".into(), vec![min_wait_ns.to_string()])],
        };
        let subscriptions = vec![Subscription { kind: SchedRecord::KIND.into(), filter }];
        Ok((Self::new(Wit, min_wait_ns, throttle_ns)?, Manifest { subscriptions, tick_interval_ms: 0 }))
    }

    fn on_sched(&mut self, batch: SchedBatch<'_>) {
        self.observe(batch.records());
    }
}

export_plugin!(CpuThrottle);
