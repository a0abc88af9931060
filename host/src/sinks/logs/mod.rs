//! The plugin log sink: plugin records (and their stdout/stderr), under the plugin's
//! byte budget, become structured [`LogRecord`]s (the plugin's fields kept as fields; the
//! host adds plugin, tenant, node and time) and go to the configured outputs (see
//! [`outputs`]): JSON lines, syslog, Loki, OTLP. With none configured they go to the
//! daemon's own log stream, escaped so nothing a plugin writes can pass for a line of
//! the daemon's.

mod buffer;
mod http;
mod json_lines;
mod loki;
mod otlp;
pub mod outputs;
mod syslog;

use std::{
    sync::{Arc, Mutex},
    time::SystemTime,
};

pub use outputs::{LogOutputs, check_output_parts, use_json};
use serde::Deserialize;

use crate::budget::Budget;

/// Log levels a plugin can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// One plugin log record, as every output sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    pub time: SystemTime,
    pub level: Level,
    pub plugin: Arc<str>,
    pub tenant: Option<Arc<str>>,
    pub message: String,
    /// The plugin's fields, in its order (keys may repeat).
    pub fields: Vec<(String, String)>,
}

impl LogRecord {
    /// Bytes the record holds (what buffers count).
    pub fn size(&self) -> usize {
        size_of::<Self>() + self.message.len() + self.fields.iter().map(|(k, v)| 48 + k.len() + v.len()).sum::<usize>()
    }

    /// Nanoseconds since the Unix epoch.
    pub fn unix_nanos(&self) -> u64 {
        self.time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    }
}

/// Longest message kept from one record; the rest is cut (and says so).
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// What a record costs of the plugin's log budget besides its text.
const RECORD_OVERHEAD_BYTES: usize = 64;
/// Fields kept from one record, and the longest key and value.
const MAX_FIELDS: usize = 16;
const MAX_KEY_BYTES: usize = 64;
const MAX_VALUE_BYTES: usize = 1024;

/// `text` cut to at most about `max` bytes, with control characters escaped (`\n`,
/// `\u{1b}`), so it stays one line whatever it holds.
pub fn sanitize(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max) + 16);
    for (i, c) in text.char_indices() {
        if out.len() >= max {
            out.push_str(&format!("…[{} more bytes]", text.len() - i));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// [`sanitize`], without a copy when `text` is already clean.
pub fn sanitized(text: String, max: usize) -> String {
    if text.len() <= max && !text.chars().any(char::is_control) { text } else { sanitize(&text, max) }
}

/// One plugin's log output.
#[derive(Clone)]
pub struct LogSink {
    budget: Arc<Budget>,
    outputs: Arc<LogOutputs>,
    /// Shared by every record (not a copy each).
    plugin: Arc<str>,
    tenant: Option<Arc<str>>,
    /// The last warning or error the plugin wrote (a panic message, say), kept even when
    /// over budget so that a fault report can show it.
    last_problem: Arc<Mutex<Option<String>>>,
}

/// Longest `last_problem` kept.
const MAX_PROBLEM_BYTES: usize = 512;

impl LogSink {
    pub fn new(budget: Arc<Budget>, outputs: Arc<LogOutputs>) -> Self {
        let (plugin, tenant) = (budget.plugin.as_str().into(), budget.tenant.as_ref().map(|t| t.name.as_str().into()));
        Self { budget, outputs, plugin, tenant, last_problem: Arc::default() }
    }

    pub fn clear_last_problem(&self) {
        *self.last_problem.lock().expect("last problem") = None;
    }

    /// The last warning or error the plugin wrote, if any.
    pub fn last_problem(&self) -> Option<String> {
        self.last_problem.lock().expect("last problem").clone()
    }

    /// Writes one record unless the plugin is over its byte budget (then the refusal
    /// is counted, and said once); returns whether it was written.
    pub fn log(&self, level: Level, message: String, mut fields: Vec<(String, String)>) -> bool {
        if level >= Level::Warn {
            *self.last_problem.lock().expect("last problem") = Some(sanitize(&message, MAX_PROBLEM_BYTES));
        }
        if !self.outputs.wants(level) {
            return false; // filtered out: costs no budget
        }
        let max = MAX_MESSAGE_BYTES.min(self.budget.log_burst());
        let message = sanitized(message, max);
        fields.truncate(MAX_FIELDS);
        let fields: Vec<(String, String)> = fields.into_iter().map(|(k, v)| (sanitized(k, MAX_KEY_BYTES), sanitized(v, MAX_VALUE_BYTES))).collect();
        // Each record is charged its overhead too: a flood of empty records costs the
        // host (and crowds the outputs' buffers) like one of text.
        let size = RECORD_OVERHEAD_BYTES + message.len() + fields.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if self.budget.take_log_bytes(size).is_err() {
            return false;
        }
        let (plugin, tenant) = (self.plugin.clone(), self.tenant.clone());
        self.outputs.submit(LogRecord { time: SystemTime::now(), level, plugin, tenant, message, fields });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PluginLimits;

    #[test]
    fn byte_budget_limits_bursts_and_is_not_refilled_by_a_new_sink() {
        let subscriber = tracing_subscriber::fmt().with_test_writer().finish();
        tracing::subscriber::with_default(subscriber, || {
            let budget = Arc::new(Budget::unmetered("p", PluginLimits { log_bytes_per_second: 1000, ..Default::default() }));
            let sink = LogSink::new(budget.clone(), LogOutputs::daemon_log());
            // Below the level shown: costs nothing.
            assert!(!sink.log(Level::Trace, "m".repeat(4000), Vec::new()));
            let written = (0..100).filter(|_| sink.log(Level::Info, "m".repeat(100), Vec::new())).count();
            assert!((23..=25).contains(&written), "burst of 4 s at 1000 B/s, 164 B a record: {written}");
            // A restarted instance gets a new sink over the same budget.
            assert!(!LogSink::new(budget, LogOutputs::daemon_log()).log(Level::Info, "m".repeat(100), Vec::new()));
        });
    }

    #[test]
    fn sanitize_keeps_one_line_and_bounds_length() {
        assert_eq!(sanitize("a\nb\u{1b}[31m", 100), "a\\nb\\u{1b}[31m");
        let long = sanitize(&"é".repeat(1000), 10);
        assert!(long.starts_with("ééééé…[") && long.len() < 40, "{long}");
    }
}
