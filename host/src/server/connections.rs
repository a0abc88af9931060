//! The public server's connections: a bounded table, so that no number of idle or
//! half-sent connections can keep a scrape out, and accept errors that back off.
//!
//! When the table is full, a new connection takes the place of an idle one (connected,
//! but not in a request): one that never finished a request first (a half-sent or
//! silent connection, not a scraper's), the longest idle among them; only when every one
//! is in a request is the new one closed. Either is counted in
//! `wasmtap_http_refused_total{reason}`.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use prometheus_client::metrics::{counter::Counter, family::Family};
use tokio_util::sync::CancellationToken;

/// Why the server turned something away (the `reason` label).
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
}

pub type Refused = Family<RefusedLabels, Counter>;

#[derive(Debug)]
pub struct Connections {
    max: usize,
    table: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
    refused: Refused,
    /// Whether a full table was said in the log.
    said_full: AtomicBool,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    /// It has finished a request.
    served: bool,
    since: Instant,
    in_request: Arc<AtomicBool>,
    close: CancellationToken,
}

/// One connection's place in the table; leaving it (drop) frees the place.
pub struct Connection {
    connections: Arc<Connections>,
    id: u64,
    /// Set while a request is being answered (it is not evicted then).
    pub in_request: Arc<AtomicBool>,
    /// Cancelled when the connection is evicted (or the server stops).
    pub close: CancellationToken,
}

impl Connections {
    pub fn new(max: usize, refused: Refused) -> Arc<Self> {
        Arc::new(Self { max, table: Mutex::default(), next_id: AtomicU64::new(0), refused, said_full: AtomicBool::new(false) })
    }

    /// A place for a new connection: a free one, or the longest-idle connection's
    /// (which is told to close); `None` when every connection is in a request.
    pub fn admit(self: &Arc<Self>) -> Option<Connection> {
        let mut table = self.table.lock().expect("connections");
        if table.len() >= self.max {
            let idle = table.iter().enumerate().filter(|(_, e)| !e.in_request.load(Relaxed)).min_by_key(|(_, e)| (e.served, e.since)).map(|(i, _)| i);
            let reason = match idle {
                Some(i) => {
                    table.swap_remove(i).close.cancel();
                    "connection_evicted"
                }
                None => "connection_refused",
            };
            self.refused.get_or_create(&RefusedLabels { reason }).inc();
            if !self.said_full.swap(true, Relaxed) {
                tracing::warn!(
                    max = self.max,
                    "the HTTP server has as many connections as it takes: the longest idle is closed for a new one (said once; wasmtap_http_refused_total counts each)"
                );
            }
            idle?;
        }
        let id = self.next_id.fetch_add(1, Relaxed);
        let (in_request, close) = (Arc::new(AtomicBool::new(false)), CancellationToken::new());
        table.push(Entry { id, served: false, since: Instant::now(), in_request: in_request.clone(), close: close.clone() });
        Some(Connection { connections: self.clone(), id, in_request, close })
    }

    /// Tells every connection to close (shutdown).
    pub fn close_all(&self) {
        self.table.lock().expect("connections").iter().for_each(|e| e.close.cancel());
    }
}

impl Connection {
    /// A request ended: the connection is idle from now on.
    pub fn idle(&self) {
        self.in_request.store(false, Relaxed);
        if let Some(entry) = self.connections.table.lock().expect("connections").iter_mut().find(|e| e.id == self.id) {
            entry.since = Instant::now();
            entry.served = true;
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.connections.table.lock().expect("connections").retain(|e| e.id != self.id);
    }
}

/// Backs off after accept errors (as Go's net/http: 5 ms doubling to 1 s) and says
/// them at most once per `LOG_INTERVAL`, with how many were not said.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    delay: Option<Duration>,
    last_said: Option<Instant>,
    unsaid: u64,
}

const LOG_INTERVAL: Duration = Duration::from_secs(10);

impl AcceptBackoff {
    /// The wait after this error.
    pub fn failed(&mut self, error: &std::io::Error, refused: &Refused) -> Duration {
        refused.get_or_create(&RefusedLabels { reason: "accept_error" }).inc();
        let delay = self.delay.map_or(Duration::from_millis(5), |d| (d * 2).min(Duration::from_secs(1)));
        self.delay = Some(delay);
        if self.last_said.is_none_or(|at| at.elapsed() >= LOG_INTERVAL) {
            tracing::warn!(unsaid = self.unsaid, "accept failed: {error}; retrying in {delay:?} (said at most every 10 s)");
            self.last_said = Some(Instant::now());
            self.unsaid = 0;
        } else {
            self.unsaid += 1;
        }
        delay
    }

    pub fn succeeded(&mut self) {
        self.delay = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_table_evicts_an_idle_connection_never_one_in_a_request() {
        let refused = Refused::default();
        let connections = Connections::new(2, refused.clone());
        let (a, b) = (connections.admit().unwrap(), connections.admit().unwrap());
        a.in_request.store(true, Relaxed);
        let c = connections.admit().expect("b is idle");
        assert!(b.close.is_cancelled() && !a.close.is_cancelled());
        // A scraper's connection (it finished a request) goes after any that never did,
        // even one idle for less time.
        a.idle();
        let d = connections.admit().expect("c is idle");
        assert!(c.close.is_cancelled() && !a.close.is_cancelled());
        a.in_request.store(true, Relaxed);
        d.in_request.store(true, Relaxed);
        assert!(connections.admit().is_none(), "all in a request");
        assert_eq!(refused.get_or_create(&RefusedLabels { reason: "connection_evicted" }).get(), 2);
        assert_eq!(refused.get_or_create(&RefusedLabels { reason: "connection_refused" }).get(), 1);
        drop(a);
        assert!(connections.admit().is_some(), "a's place is free");
    }

    #[test]
    fn accept_errors_back_off_from_5ms_to_1s() {
        let (mut backoff, refused) = (AcceptBackoff::default(), Refused::default());
        let e = std::io::Error::other("EMFILE");
        let delays: Vec<_> = (0..10).map(|_| backoff.failed(&e, &refused).as_millis()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failed(&e, &refused).as_millis(), 5);
    }
}
