//! pg-query-latency: PostgreSQL query latency without touching the database, from the
//! USDT probes of a server built with `--enable-dtrace` (Debian's and most
//! distributions' are): `query__start` (with the query text) and `query__done` of the
//! same backend make one query.
//!
//! - `query_seconds{fingerprint}`: a histogram of query latencies, by the query's
//!   fingerprint: its text with literals (numbers, quoted strings) replaced by `?`,
//!   white space collapsed, cut to `max_fingerprint_len` characters. Past
//!   `max_fingerprints` distinct fingerprints, queries count under `fingerprint="other"`.
//! - `unfinished_total`: queries whose start was seen but not their end: a query that
//!   failed (PostgreSQL fires no `query__done` then), a backend that ended mid-query, or
//!   one not tracked because `16384` backends had a query in flight. A start waits an
//!   hour for its end.
//!
//! The probes fire in the simple query protocol (`psql`, `pgbench`'s default, many
//! poolers); queries a driver sends through the extended protocol (prepared
//! statements) fire none, and a string of several statements is one query.
//!
//! Config (all optional): `binary` (the server binary, default
//! `/usr/lib/postgresql/15/bin/postgres`), `pids` (servers, by postmaster pid: a pid
//! matches the process and its backends), `cgroups`, `max_fingerprints` (default 100),
//! `max_fingerprint_len` (default 120).

use std::collections::HashMap;

use wasmtap_sdk::{
    Config, CounterVec, Filter, HistogramVec, HostApi, HostInfo, Manifest, Plugin, Record as _, Subscription, UprobeBatch, UprobeRecord, Wit, export_plugin,
    uprobe::probe_id,
};

/// Fingerprint index of queries past `max_fingerprints`.
const OTHER: u32 = 0;
/// Backends with a query in flight that are tracked at once.
const MAX_IN_FLIGHT: usize = 16384;
/// How long a start waits for its end before it counts as unfinished.
const MAX_QUERY_NS: u64 = 3600 * 1_000_000_000;

pub struct PgQueryLatency<H: HostApi + Clone = Wit> {
    latency: HistogramVec<u32, H>,
    unfinished: CounterVec<(), H>,
    start: u32,
    done: u32,
    /// Fingerprint → index (1-based; `OTHER` is 0), and back.
    fingerprints: HashMap<String, u32>,
    labels: Vec<String>,
    max_fingerprints: usize,
    max_len: usize,
    /// Thread id → (start time, fingerprint index) of the query it runs.
    in_flight: HashMap<u32, (u64, u32)>,
}

/// The probe points of `binary`: (query start with its text, query done).
pub fn points(binary: &str) -> (String, String) {
    (format!("usdt:{binary}:postgresql:query__start:str=0"), format!("usdt:{binary}:postgresql:query__done"))
}

/// `query` with literals replaced by `?` and white space collapsed, at most `max_len`
/// characters (a cut one ends in "...").
pub fn fingerprint(query: &str, max_len: usize) -> String {
    let mut out = String::with_capacity(query.len().min(max_len + 3));
    let mut chars = query.trim().trim_end_matches(';').trim_end().chars().peekable();
    // Whether the previous character continues an identifier (so a digit is part of it).
    let mut in_word = false;
    let mut len = 0;
    while let Some(c) = chars.next() {
        if len >= max_len {
            out.push_str("...");
            return out;
        }
        len += 1;
        match c {
            '\'' => {
                // A string literal; '' inside is a quote.
                while let Some(c) = chars.next() {
                    if c == '\'' {
                        if chars.peek() == Some(&'\'') {
                            chars.next();
                        } else {
                            break;
                        }
                    }
                }
                out.push('?');
                in_word = false;
            }
            c if c.is_ascii_digit() && !in_word => {
                while chars.peek().is_some_and(|c| c.is_ascii_alphanumeric() || *c == '.') {
                    chars.next();
                }
                // "-5" is a literal too, unless the minus follows an operand.
                if out.ends_with('-') && !out[..out.len() - 1].trim_end().ends_with(|c: char| c.is_alphanumeric() || c == ')' || c == '?') {
                    out.pop();
                }
                out.push('?');
                in_word = false;
            }
            c if c.is_whitespace() => {
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                out.push(' ');
                in_word = false;
            }
            c => {
                out.push(c);
                in_word = c.is_alphanumeric() || c == '_' || c == '$';
            }
        }
    }
    out
}

impl<H: HostApi + Clone> PgQueryLatency<H> {
    pub fn new(host: H, binary: &str, max_fingerprints: usize, max_len: usize) -> Result<Self, String> {
        let (start, done) = points(binary);
        // 1 µs to ~34 s, in powers of two.
        let bounds = (10..=35).map(|shift| 1u64 << shift).collect();
        Ok(Self {
            latency: HistogramVec::declare(host.clone(), "query_seconds", "Query latency, by normalised query text.", &["fingerprint"], bounds, 1e-9)?,
            unfinished: CounterVec::declare(host, "unfinished", "Queries started whose end was not seen (failed, or not tracked).", &[])?,
            start: probe_id(&start),
            done: probe_id(&done),
            fingerprints: HashMap::new(),
            labels: vec!["other".into()],
            max_fingerprints,
            max_len,
            in_flight: HashMap::new(),
        })
    }

    fn index(&mut self, text: &[u8]) -> u32 {
        let print = fingerprint(&String::from_utf8_lossy(text), self.max_len);
        if let Some(&i) = self.fingerprints.get(&print) {
            return i;
        }
        if self.fingerprints.len() >= self.max_fingerprints {
            return OTHER;
        }
        let i = self.labels.len() as u32;
        self.labels.push(print.clone());
        self.fingerprints.insert(print, i);
        i
    }

    /// Pairs one batch's starts and dones and flushes the latencies to the host.
    pub fn observe(&mut self, records: &[UprobeRecord]) {
        for r in records {
            let tid = r.header.tid;
            if r.probe == self.start {
                let index = self.index(r.text().unwrap_or_default());
                let tracked = self.in_flight.len() < MAX_IN_FLIGHT || self.in_flight.contains_key(&tid);
                // A start replacing one of the same backend: that query failed.
                if !tracked || self.in_flight.insert(tid, (r.header.ts_ns, index)).is_some() {
                    self.unfinished.add((), 1, |_| Vec::new());
                }
            } else if r.probe == self.done
                && let Some((started, index)) = self.in_flight.remove(&tid)
            {
                let labels = &self.labels;
                self.latency.observe(index, r.header.ts_ns.saturating_sub(started), |i| vec![labels[*i as usize].clone()]);
            }
        }
        self.latency.flush();
        self.unfinished.flush();
    }

    /// Counts and forgets the starts older than `MAX_QUERY_NS` at `now_ns`.
    pub fn expire(&mut self, now_ns: u64) {
        let before = self.in_flight.len();
        self.in_flight.retain(|_, (started, _)| now_ns.saturating_sub(*started) < MAX_QUERY_NS);
        let expired = before - self.in_flight.len();
        if expired > 0 {
            self.unfinished.add((), expired as u64, |_| Vec::new());
            self.unfinished.flush();
        }
    }
}

impl Plugin for PgQueryLatency {
    fn init(_host: &HostInfo, config: &Config) -> Result<(Self, Manifest), String> {
        let binary = config.get::<String>("binary")?.unwrap_or_else(|| "/usr/lib/postgresql/15/bin/postgres".into());
        let max_fingerprints = config.get::<u64>("max_fingerprints")?.unwrap_or(100) as usize;
        let max_len = config.get::<u64>("max_fingerprint_len")?.unwrap_or(120) as usize;
        let (start, done) = points(&binary);
        let filter =
            Filter { pids: config.list("pids")?, cgroups: config.list("cgroups")?, comms: Vec::new(), params: vec![("probes".into(), vec![start, done])] };
        let subscriptions = vec![Subscription { kind: UprobeRecord::KIND.into(), filter }];
        Ok((Self::new(Wit, &binary, max_fingerprints, max_len)?, Manifest { subscriptions, tick_interval_ms: 60_000 }))
    }

    fn on_uprobe(&mut self, batch: UprobeBatch<'_>) {
        self.observe(batch.records());
    }

    fn tick(&mut self, now_ns: u64) {
        self.expire(now_ns);
    }
}

export_plugin!(PgQueryLatency);

#[cfg(test)]
mod tests {
    use super::fingerprint;

    #[test]
    fn literals_are_stripped_and_space_collapsed() {
        assert_eq!(fingerprint("SELECT abalance FROM pgbench_accounts WHERE aid = 48213;", 120), "SELECT abalance FROM pgbench_accounts WHERE aid = ?");
        assert_eq!(fingerprint("select * from t1  where\n name = 'O''Brien' and x > -3.5e2", 120), "select * from t1 where name = ? and x > ?");
        assert_eq!(fingerprint("SELECT a-1, f(2), $1 FROM t", 120), "SELECT a-?, f(?), $1 FROM t");
        assert_eq!(fingerprint("SELECT 1", 3), "SEL...");
    }
}
