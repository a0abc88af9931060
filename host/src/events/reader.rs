//! The reader: owns the ring buffers, drains them on the latency-budget timer (or when
//! the kernel forces a wakeup past the fill threshold), and dispatches batches. One
//! thread serves every kind, and the kinds' timers are aligned to one schedule so they
//! expire together: a drain interval costs one wakeup however many kinds are loaded (on
//! a VM, a wakeup costs tens of µs; unaligned timers doubled the reader's CPU per event
//! with two kinds loaded).

use std::{sync::Arc, thread, time::Duration};

use anyhow::Context as _;
use tokio::{io::unix::AsyncFd, sync::Notify};
use tokio_util::sync::CancellationToken;
use wasmtap_events::counter;

use super::{Batch, Router, ring::RingReader};
use crate::{
    probes::{Kind, ProbeStream},
    sinks::self_metrics::ProbeCounters,
};

/// Records per batch at most (256 KiB of syscall records).
const MAX_BATCH_RECORDS: usize = 4096;

pub struct Reader {
    pub stream: ProbeStream,
    pub router: Arc<Router>,
    pub counters: ProbeCounters,
    pub interval: Duration,
}

/// The thread all kinds' readers run on: kinds are attached and detached while it runs.
pub struct ReaderThread {
    runtime: tokio::runtime::Handle,
    /// Every reader's ticks fall on multiples of its interval from here.
    origin: tokio::time::Instant,
    stop: CancellationToken,
    thread: thread::JoinHandle<()>,
}

/// One kind's reader, running on the [`ReaderThread`].
pub struct RunningReader {
    stop: CancellationToken,
    wake: Arc<Notify>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningReader {
    /// Drains now rather than at the next tick (a replaced plugin's first batch).
    pub fn drain_now(&self) {
        self.wake.notify_one();
    }
}

impl ReaderThread {
    pub fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let origin = tokio::time::Instant::now();
        let stop = CancellationToken::new();
        let until = stop.clone();
        let thread =
            thread::Builder::new().name("wasmtap-reader".into()).spawn(move || runtime.block_on(until.cancelled())).context("spawning the reader thread")?;
        Ok(Self { runtime: handle, origin, stop, thread })
    }

    pub fn spawn(&self, reader: Reader) -> RunningReader {
        let (stop, wake) = (CancellationToken::new(), Arc::new(Notify::new()));
        let first = next_multiple(self.origin, tokio::time::Instant::now(), reader.interval);
        RunningReader { task: self.runtime.spawn(reader.run(first, stop.clone(), wake.clone())), stop, wake }
    }

    /// Stops the reader: `reader` drains its ring once more and is done. Blocking.
    pub fn finish(&self, reader: RunningReader) {
        reader.stop.cancel();
        match self.runtime.block_on(reader.task) {
            Ok(Err(e)) => tracing::error!("reader stopped: {e:#}"),
            Err(e) => tracing::error!("reader stopped: {e}"),
            Ok(Ok(())) => {}
        }
    }

    /// Ends the thread (finish every reader first).
    pub fn join(self) {
        self.stop.cancel();
        let _ = self.thread.join();
    }
}

impl Reader {
    async fn run(self, first: tokio::time::Instant, stop: CancellationToken, wake: Arc<Notify>) -> anyhow::Result<()> {
        let Self { stream, router, counters, interval } = self;
        let ProbeStream { kind, ring, drops } = stream;
        {
            // SAFETY: the RingReader owns its map fd and keeps it open, unchanged, until
            // it is dropped, which only happens when this AsyncFd drops it.
            let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
                .context("polling the ring buffer")?;
            let mut drain = Drain { batcher: Batcher::new(kind), router, counters, drops, kernel_drops: 0 };
            let mut timer = tokio::time::interval_at(first, interval);
            // Skip (not Delay) keeps the ticks on the shared schedule after a late one.
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    _ = timer.tick() => {}
                    () = wake.notified() => {}
                    ready = ring.readable_mut() => {
                        if let Ok(mut guard) = ready {
                            guard.clear_ready();
                        }
                    }
                }
                // A full ring is drained a slice at a time, letting the other kinds'
                // readers on this thread take turns.
                while drain.ring(ring.get_mut()) {
                    tokio::task::yield_now().await;
                }
            }
            while drain.ring(ring.get_mut()) {}
            Ok(())
        }
    }
}

/// The first instant after `now` that is `origin` plus a multiple of `every`.
fn next_multiple(origin: tokio::time::Instant, now: tokio::time::Instant, every: Duration) -> tokio::time::Instant {
    let every_ns = every.as_nanos().max(1);
    let periods = now.saturating_duration_since(origin).as_nanos() / every_ns + 1;
    origin + Duration::from_nanos((periods * every_ns) as u64)
}

struct Drain {
    batcher: Batcher,
    router: Arc<Router>,
    counters: ProbeCounters,
    drops: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    kernel_drops: u64,
}

/// Batches one drain hands on before it lets the thread's other readers run.
const BATCHES_PER_TURN: usize = 8;

impl Drain {
    /// Reads up to `BATCHES_PER_TURN` batches; whether records were left.
    fn ring(&mut self, ring: &mut RingReader) -> bool {
        let mut more = false;
        for _ in 0..BATCHES_PER_TURN {
            let (read, batch, malformed) = self.batcher.read(ring);
            if malformed > 0 {
                self.counters.malformed.inc_by(malformed);
            }
            if let Some(batch) = batch {
                self.counters.records.inc_by(batch.len() as u64);
                self.router.dispatch(&batch);
            }
            more = read == MAX_BATCH_RECORDS;
            if !more {
                break;
            }
        }
        // One map lookup per drain (not per record); cheap at the drain rate.
        self.kernel_drops();
        more
    }

    fn kernel_drops(&mut self) {
        if let Ok(per_cpu) = self.drops.get(&counter::RINGBUF_FULL, 0) {
            let total: u64 = per_cpu.iter().sum();
            if total > self.kernel_drops {
                self.counters.kernel_drops.inc_by(total - self.kernel_drops);
                self.kernel_drops = total;
                self.router.lost(self.batcher.kind);
            }
        }
    }
}

/// Collects one read's records of a kind into a batch. The kernel only writes whole
/// records of its kind's size; anything else is a layout bug, and is counted (and said
/// once in the log), never passed on or lost silently.
struct Batcher {
    kind: Kind,
    reported: bool,
}

impl Batcher {
    fn new(kind: Kind) -> Self {
        Self { kind, reported: false }
    }

    /// Reads up to `MAX_BATCH_RECORDS` records from `ring`: how many, the batch of the
    /// well-formed ones (if any), and how many were malformed.
    fn read(&mut self, ring: &mut RingReader) -> (usize, Option<Batch>, u64) {
        // Locals, not struct fields, in the per-record loop, so they stay in registers
        // (with fields, the reader took ~15 % more CPU per record).
        let (size, mut records, mut malformed, mut bad_len) = (self.kind.record_size, Vec::new(), 0, 0);
        let read = ring.read(MAX_BATCH_RECORDS, |record| {
            if !collect(&mut records, size, record) {
                malformed += 1;
                bad_len = record.len();
            }
        });
        if malformed > 0 && !std::mem::replace(&mut self.reported, true) {
            tracing::error!(
                kind = self.kind.name,
                "the kernel wrote a record of {bad_len} bytes where the layout has {size}; such records are counted in \
                     wasmtap_probe_malformed_records_total and not delivered (a build mismatch between kernel object and host)",
            );
        }
        (read, (!records.is_empty()).then(|| Batch { kind: self.kind, records: Arc::new(records) }), malformed)
    }
}

/// Appends `record` to `records` if it is `size` bytes long; whether it was.
#[inline(always)]
fn collect(records: &mut Vec<u8>, size: usize, record: &[u8]) -> bool {
    if record.len() != size {
        return false;
    }
    // Allocated on the first record only: most drains of a quiet system find nothing,
    // and a batch-sized buffer is big enough to cost an mmap each time.
    if records.capacity() == 0 {
        records.reserve_exact(MAX_BATCH_RECORDS * size);
    }
    // A constant-size copy for the common sizes: inlined, not a `memmove` call per
    // record (which cost ~20 % of the reader's time on 64-byte records).
    match record.len() {
        64 => records.extend_from_slice(<&[u8; 64]>::try_from(record).expect("64 bytes")),
        _ => records.extend_from_slice(record),
    }
    true
}

#[cfg(test)]
mod tests {
    use wasmtap_events::{Record as _, SyscallRecord};

    use super::*;
    use crate::probes::syscall::KIND;

    #[test]
    fn readers_tick_on_one_schedule() {
        let origin = tokio::time::Instant::now();
        let every = Duration::from_millis(10);
        assert_eq!(next_multiple(origin, origin, every), origin + every);
        assert_eq!(next_multiple(origin, origin + Duration::from_millis(13), every), origin + Duration::from_millis(20));
        assert_eq!(next_multiple(origin, origin + Duration::from_millis(20), every), origin + Duration::from_millis(30));
    }

    #[test]
    fn records_of_an_unexpected_size_are_not_collected() {
        let record = SyscallRecord { latency_ns: 5, ..Default::default() };
        let mut records = Vec::new();
        let collected: Vec<bool> =
            [record.as_bytes(), &record.as_bytes()[..40], &[0; 72], record.as_bytes()].iter().map(|r| collect(&mut records, KIND.record_size, r)).collect();
        assert_eq!(collected, [true, false, false, true]);
        assert_eq!(records, [record.as_bytes(), record.as_bytes()].concat());
    }
}
