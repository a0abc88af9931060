//! One log output's bounded buffer and the task that ships it: records wait here
//! (at most `buffer_records` and `buffer_bytes`, the batch being sent included) and
//! leave in batches of `batch_records`, at least every `batch_wait_ms`. A failed send is
//! retried with exponential backoff while new records queue behind it; past the bound
//! they are refused and counted, so a receiver that is down costs bounded memory and
//! never blocks a plugin.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Level, LogRecord};
use crate::{config::LogOutputConfig, sinks::self_metrics::OutputCounters};

/// Why a batch was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Worth trying again (connection refused or lost, a 5xx or 429, a timeout).
    #[error("{0}")]
    Retry(String),
    /// The receiver refused the records themselves (a 4xx): sending again would not help.
    #[error("{0}")]
    Rejected(String),
}

/// A log output's way of delivering one batch: how many of its records the receiver
/// refused when it took the rest (OTLP's partial success).
pub trait Ship: Send + 'static {
    fn send(&mut self, batch: &[Arc<LogRecord>]) -> impl Future<Output = Result<usize, SendError>> + Send;
}

/// The buffer one output's records wait in. Submitting never blocks on the output.
pub struct Buffer {
    name: String,
    min_level: Level,
    max_records: usize,
    max_bytes: usize,
    batch_records: usize,
    state: Mutex<Pending>,
    wake: Notify,
    counters: OutputCounters,
}

#[derive(Default)]
struct Pending {
    records: VecDeque<Arc<LogRecord>>,
    /// Bytes of `records` and of the batch being sent.
    bytes: usize,
    /// Records of the batch being sent.
    sending: usize,
    /// Whether refusals have started since the last delivery (said once per episode).
    refusing: bool,
}

impl Buffer {
    pub fn new(config: &LogOutputConfig, counters: OutputCounters) -> Self {
        Self {
            name: config.name(),
            min_level: config.min_level,
            max_records: config.buffer_records,
            max_bytes: config.buffer_bytes,
            batch_records: config.batch_records,
            state: Mutex::default(),
            wake: Notify::new(),
            counters,
        }
    }

    pub fn wants(&self, level: Level) -> bool {
        level >= self.min_level
    }

    /// Queues `record` unless the buffer is full (then it is counted, and the first
    /// refusal of an episode is said in the log).
    pub fn submit(&self, record: &Arc<LogRecord>) {
        if !self.wants(record.level) {
            return;
        }
        let size = record.size();
        let mut state = self.state.lock().expect("log buffer");
        if state.records.len() + state.sending >= self.max_records || state.bytes + size > self.max_bytes {
            self.counters.buffer_full.inc();
            let first = !std::mem::replace(&mut state.refusing, true);
            drop(state);
            if first {
                tracing::warn!(
                    output = self.name,
                    "log output buffer full ({} records, {} bytes at most): plugin log records are dropped and counted in \
                     wasmtap_log_dropped_records_total{{reason=\"buffer_full\"}} until it drains",
                    self.max_records,
                    self.max_bytes
                );
            }
            return;
        }
        state.records.push_back(record.clone());
        state.bytes += size;
        self.counters.buffered.set((state.records.len() + state.sending) as i64);
        // The shipper waits for a first record, then for a full batch.
        let wake = state.records.len() == 1 || state.records.len() == self.batch_records;
        drop(state);
        if wake {
            self.wake.notify_one();
        }
    }

    /// The next batch (moved to "sending"; still counted against the bound).
    fn take_batch(&self) -> Vec<Arc<LogRecord>> {
        let mut state = self.state.lock().expect("log buffer");
        let n = state.records.len().min(self.batch_records);
        state.sending = n;
        state.records.drain(..n).collect()
    }

    /// The batch being sent is done with (delivered or given up).
    fn finish_batch(&self, batch: &[Arc<LogRecord>], delivered: bool) {
        let mut state = self.state.lock().expect("log buffer");
        state.sending = 0;
        state.bytes -= batch.iter().map(|r| r.size()).sum::<usize>();
        self.counters.buffered.set(state.records.len() as i64);
        if delivered && std::mem::replace(&mut state.refusing, false) {
            tracing::info!(output = self.name, "log output delivering again");
        }
    }

    fn is_empty(&self) -> bool {
        self.state.lock().expect("log buffer").records.is_empty()
    }

    fn full_batch_waiting(&self) -> bool {
        self.state.lock().expect("log buffer").records.len() >= self.batch_records
    }

    /// What is left when the output stops (the batch being sent included): counted
    /// as lost to the shutdown, and said.
    fn abandon(&self) {
        let mut state = self.state.lock().expect("log buffer");
        let n = state.records.len() + state.sending;
        state.records.clear();
        (state.bytes, state.sending) = (0, 0);
        self.counters.shutdown.inc_by(n as u64);
        self.counters.buffered.set(0);
        if n > 0 {
            tracing::warn!(
                output = self.name,
                "stopping with {n} plugin log records not delivered (counted in wasmtap_log_dropped_records_total{{reason=\"shutdown\"}})"
            );
        }
    }
}

/// Timing of the shipping loop.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub batch_wait: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long one send may take.
    pub send_timeout: Duration,
    /// How long a stopping output keeps trying to deliver what it holds.
    pub drain: Duration,
}

/// Sends one batch within `timeout` and counts the outcome; a retryable failure is
/// returned (the batch stays "sending").
async fn deliver(buffer: &Buffer, output: &mut impl Ship, batch: &[Arc<LogRecord>], timeout: Duration) -> Result<(), String> {
    let sent = tokio::time::timeout(timeout, output.send(batch)).await.unwrap_or_else(|_| Err(SendError::Retry(format!("no answer within {timeout:?}"))));
    match sent {
        Ok(refused) => {
            buffer.counters.delivered.inc_by((batch.len() - refused) as u64);
            buffer.counters.rejected.inc_by(refused as u64);
            buffer.finish_batch(batch, true);
            Ok(())
        }
        Err(SendError::Rejected(why)) => {
            buffer.counters.rejected.inc_by(batch.len() as u64);
            buffer.finish_batch(batch, false);
            tracing::warn!(output = buffer.name, "the log receiver rejected {} records (dropped, counted): {why}", batch.len());
            Ok(())
        }
        Err(SendError::Retry(why)) => {
            buffer.counters.send_errors.inc();
            Err(why)
        }
    }
}

/// Ships `buffer` through `output` until `stop`, then delivers what is left within
/// `timing.drain` (the rest is counted as lost to the shutdown, and said).
pub async fn ship(buffer: Arc<Buffer>, mut output: impl Ship, timing: Timing, stop: CancellationToken) {
    let mut backoff = timing.min_backoff;
    let mut said_failing = false;
    // A batch still to deliver when the stop came.
    let mut unsent = None;
    while !stop.is_cancelled() {
        // Wait for records, then let a batch fill for up to `batch_wait`.
        if buffer.is_empty() {
            tokio::select! {
                () = stop.cancelled() => break,
                () = buffer.wake.notified() => continue,
            }
        }
        if !buffer.full_batch_waiting() {
            tokio::select! {
                () = stop.cancelled() => {}
                () = buffer.wake.notified() => {}
                () = tokio::time::sleep(timing.batch_wait) => {}
            }
        }
        let batch = buffer.take_batch();
        // Sent until delivered or rejected; records behind it wait (or are refused
        // once the buffer is full).
        loop {
            match deliver(&buffer, &mut output, &batch, timing.send_timeout).await {
                Ok(()) => {
                    backoff = timing.min_backoff;
                    if std::mem::replace(&mut said_failing, false) {
                        tracing::info!(output = buffer.name, "log output reachable again");
                    }
                    break;
                }
                Err(why) => {
                    if !std::mem::replace(&mut said_failing, true) {
                        tracing::warn!(output = buffer.name, "cannot deliver plugin logs, retrying with backoff (records wait in the buffer): {why}");
                    }
                    tokio::select! {
                        () = stop.cancelled() => {
                            unsent = Some(batch);
                            break;
                        }
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(timing.max_backoff);
                }
            }
        }
    }
    // Stopping: deliver what is left, within the drain time; one failure ends it.
    let drain = async {
        if let Some(batch) = unsent
            && deliver(&buffer, &mut output, &batch, timing.send_timeout).await.is_err()
        {
            return;
        }
        while !buffer.is_empty() {
            let batch = buffer.take_batch();
            if deliver(&buffer, &mut output, &batch, timing.send_timeout).await.is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(timing.drain, drain).await;
    buffer.abandon();
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::AtomicBool, time::SystemTime};

    use super::*;
    use crate::sinks::SelfMetrics;

    fn record(message: &str) -> Arc<LogRecord> {
        Arc::new(LogRecord { time: SystemTime::UNIX_EPOCH, level: Level::Info, plugin: "p".into(), tenant: None, message: message.into(), fields: Vec::new() })
    }

    /// Delivers into a shared list while `up`.
    #[derive(Clone, Default)]
    struct Receiver {
        up: Arc<AtomicBool>,
        got: Arc<Mutex<Vec<String>>>,
    }

    impl Ship for Receiver {
        async fn send(&mut self, batch: &[Arc<LogRecord>]) -> Result<usize, SendError> {
            if !self.up.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(SendError::Retry("down".into()));
            }
            self.got.lock().unwrap().extend(batch.iter().map(|r| r.message.clone()));
            Ok(0)
        }
    }

    fn config(buffer_records: usize) -> LogOutputConfig {
        let mut c: LogOutputConfig = toml::from_str("kind = \"json-lines\"\npath = \"-\"").unwrap();
        c.buffer_records = buffer_records;
        c.batch_records = 4;
        c
    }

    #[tokio::test(start_paused = true)]
    async fn a_receiver_down_gets_what_the_buffer_held_and_the_excess_is_counted() {
        let metrics = SelfMetrics::default();
        let counters = metrics.log_output("test");
        let buffer = Arc::new(Buffer::new(&config(10), counters.clone()));
        let receiver = Receiver::default();
        let stop = CancellationToken::new();
        let timing = Timing {
            batch_wait: Duration::from_millis(50),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            send_timeout: Duration::from_secs(1),
            drain: Duration::from_secs(1),
        };
        let task = tokio::spawn(ship(buffer.clone(), receiver.clone(), timing, stop.clone()));
        for i in 0..25 {
            buffer.submit(&record(&i.to_string()));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(counters.buffer_full.get(), 15, "25 submitted, 10 held");
        assert!(receiver.got.lock().unwrap().is_empty());
        receiver.up.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(*receiver.got.lock().unwrap(), (0..10).map(|i| i.to_string()).collect::<Vec<_>>(), "in order, none lost");
        assert_eq!(counters.delivered.get(), 10);
        assert!(counters.send_errors.get() > 0);
        assert_eq!(counters.buffered.get(), 0);
        // Room again.
        buffer.submit(&record("late"));
        stop.cancel();
        task.await.unwrap();
        assert_eq!(receiver.got.lock().unwrap().last().unwrap(), "late", "delivered on the way out");
        assert_eq!(counters.shutdown.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_with_the_receiver_down_counts_every_record_left_the_batch_in_flight_included() {
        let metrics = SelfMetrics::default();
        let counters = metrics.log_output("test");
        let buffer = Arc::new(Buffer::new(&config(100), counters.clone()));
        let stop = CancellationToken::new();
        let timing = Timing {
            batch_wait: Duration::from_millis(10),
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            send_timeout: Duration::from_secs(1),
            drain: Duration::from_secs(1),
        };
        let task = tokio::spawn(ship(buffer.clone(), Receiver::default(), timing, stop.clone()));
        (0..7).for_each(|i| buffer.submit(&record(&i.to_string())));
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        task.await.unwrap();
        assert_eq!((counters.shutdown.get(), counters.delivered.get(), counters.buffered.get()), (7, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn records_below_the_level_are_not_queued() {
        let metrics = SelfMetrics::default();
        let mut c = config(10);
        c.min_level = Level::Warn;
        let buffer = Buffer::new(&c, metrics.log_output("test"));
        buffer.submit(&record("info"));
        assert!(buffer.is_empty());
    }
}
