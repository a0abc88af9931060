//! The reader: owns the ring buffers, drains them on the latency-budget timer (or when
//! the kernel forces a wakeup past the fill threshold), and dispatches batches.

use std::{sync::Arc, thread, time::Duration};

use anyhow::Context as _;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use wasmtap_events::{SyscallRecord, counter};

use super::{Batch, EventKind, Router, ring::RingReader};
use crate::{probes::SyscallStream, sinks::self_metrics::ProbeCounters};

/// Records per batch at most (256 KiB of syscall records).
const MAX_BATCH_RECORDS: usize = 4096;

pub struct Reader {
    pub stream: SyscallStream,
    pub router: Arc<Router>,
    pub counters: ProbeCounters,
    pub interval: Duration,
}

impl Reader {
    /// Runs on its own thread until `stop`, then drains once more and returns.
    pub fn spawn(self, stop: CancellationToken) -> anyhow::Result<thread::JoinHandle<()>> {
        thread::Builder::new()
            .name("wasmtap-reader".into())
            .spawn(move || {
                if let Err(e) = self.run(stop) {
                    tracing::error!("reader stopped: {e:#}");
                }
            })
            .context("spawning the reader thread")
    }

    fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let Self { stream, router, counters, interval } = self;
        let SyscallStream { ring, drops } = stream;
        runtime.block_on(async move {
            // SAFETY: the RingReader owns its map fd and keeps it open, unchanged, until
            // it is dropped, which only happens when this AsyncFd drops it.
            let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
                .context("polling the ring buffer")?;
            let mut drain = Drain { router, counters, drops, kernel_drops: 0 };
            let mut timer = tokio::time::interval(interval);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    _ = timer.tick() => {}
                    ready = ring.readable_mut() => {
                        if let Ok(mut guard) = ready {
                            guard.clear_ready();
                        }
                    }
                }
                drain.ring(ring.get_mut());
            }
            drain.ring(ring.get_mut());
            Ok(())
        })
    }
}

struct Drain {
    router: Arc<Router>,
    counters: ProbeCounters,
    drops: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
    kernel_drops: u64,
}

impl Drain {
    fn ring(&mut self, ring: &mut RingReader) {
        loop {
            // Allocated on the first record only: most drains of a quiet system find
            // nothing, and a batch-sized buffer is big enough to cost an mmap each time.
            let mut records = Vec::new();
            let read = ring.read(MAX_BATCH_RECORDS, |record| {
                // The kernel only writes whole records; anything else would be a layout bug.
                if record.len() == SyscallRecord::SIZE {
                    if records.capacity() == 0 {
                        records.reserve_exact(MAX_BATCH_RECORDS * SyscallRecord::SIZE);
                    }
                    records.extend_from_slice(record);
                }
            });
            self.dispatch(records);
            if read < MAX_BATCH_RECORDS {
                break;
            }
        }
        // One map lookup per drain (not per record); cheap at the drain rate.
        self.kernel_drops();
    }

    fn dispatch(&self, records: Vec<u8>) {
        if records.is_empty() {
            return;
        }
        let batch = Batch { kind: EventKind::Syscall, records: Arc::new(records) };
        self.counters.records.inc_by(batch.len() as u64);
        self.router.dispatch(&batch);
    }

    fn kernel_drops(&mut self) {
        if let Ok(per_cpu) = self.drops.get(&counter::RINGBUF_FULL, 0) {
            let total: u64 = per_cpu.iter().sum();
            if total > self.kernel_drops {
                self.counters.kernel_drops.inc_by(total - self.kernel_drops);
                self.kernel_drops = total;
            }
        }
    }
}
