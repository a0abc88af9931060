//! The plugin log sink: plugin records (and their stdout/stderr) go to the daemon's
//! own log stream, tagged with the plugin, under the plugin's byte budget, and escaped so
//! nothing a plugin writes can pass for a line of the daemon's.
//!
//! Text output goes through `tracing` with the message and fields escaped. JSON output
//! (`--json-logs`) is written here, one line per record, so that the plugin's fields stay
//! structured (`tracing` needs field names known at compile time).

use std::{
    io::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
};

use serde_json::json;

use crate::budget::Budget;

/// Log levels a plugin can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Longest message kept from one record; the rest is cut (and says so).
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Fields kept from one record, and the longest key and value.
const MAX_FIELDS: usize = 16;
const MAX_KEY_BYTES: usize = 64;
const MAX_VALUE_BYTES: usize = 1024;

static JSON: AtomicBool = AtomicBool::new(false);

/// Makes plugin records JSON lines, like the daemon's own (`--json-logs`).
pub fn use_json(on: bool) {
    JSON.store(on, Relaxed);
}

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

/// One plugin's log output.
#[derive(Debug, Clone)]
pub struct LogSink {
    budget: Arc<Budget>,
    /// The last warning or error the plugin wrote (a panic message, say), kept even when
    /// over budget so that a fault report can show it.
    last_problem: Arc<Mutex<Option<String>>>,
}

/// Longest `last_problem` kept.
const MAX_PROBLEM_BYTES: usize = 512;

impl LogSink {
    pub fn new(budget: Arc<Budget>) -> Self {
        Self { budget, last_problem: Arc::default() }
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
    pub fn log(&self, level: Level, message: &str, fields: &[(String, String)]) -> bool {
        if level >= Level::Warn {
            *self.last_problem.lock().expect("last problem") = Some(sanitize(message, MAX_PROBLEM_BYTES));
        }
        let shown = match level {
            Level::Trace => tracing::enabled!(tracing::Level::TRACE),
            Level::Debug => tracing::enabled!(tracing::Level::DEBUG),
            Level::Info => tracing::enabled!(tracing::Level::INFO),
            Level::Warn => tracing::enabled!(tracing::Level::WARN),
            Level::Error => tracing::enabled!(tracing::Level::ERROR),
        };
        if !shown {
            return false; // filtered out: costs no budget
        }
        let max = MAX_MESSAGE_BYTES.min(self.budget.log_burst());
        let message = sanitize(message, max);
        let fields: Vec<(String, String)> = fields.iter().take(MAX_FIELDS).map(|(k, v)| (sanitize(k, MAX_KEY_BYTES), sanitize(v, MAX_VALUE_BYTES))).collect();
        let size = message.len() + fields.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if self.budget.take_log_bytes(size.max(1)).is_err() {
            return false;
        }
        let plugin = self.budget.plugin.as_str();
        if JSON.load(Relaxed) {
            let level = match level {
                Level::Trace => "TRACE",
                Level::Debug => "DEBUG",
                Level::Info => "INFO",
                Level::Warn => "WARN",
                Level::Error => "ERROR",
            };
            let attrs: serde_json::Map<String, serde_json::Value> = fields.into_iter().map(|(k, v)| (k, v.into())).collect();
            let line = json!({
                "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
                "level": level,
                "fields": { "message": message, "plugin": plugin, "attrs": attrs },
                "target": "wasmtap::plugin",
            });
            // One write per line, so lines from threads do not interleave.
            let _ = std::io::stderr().lock().write_all(format!("{line}\n").as_bytes());
            return true;
        }
        let fields = fields.iter().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join(" ");
        match level {
            Level::Trace => tracing::trace!(plugin, fields, "{message}"),
            Level::Debug => tracing::debug!(plugin, fields, "{message}"),
            Level::Info => tracing::info!(plugin, fields, "{message}"),
            Level::Warn => tracing::warn!(plugin, fields, "{message}"),
            Level::Error => tracing::error!(plugin, fields, "{message}"),
        }
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
            let sink = LogSink::new(budget.clone());
            // Below the level shown: costs nothing.
            assert!(!sink.log(Level::Trace, &"m".repeat(4000), &[]));
            let written = (0..100).filter(|_| sink.log(Level::Info, &"m".repeat(100), &[])).count();
            assert!((39..=41).contains(&written), "burst of 4 s at 1000 B/s: {written}");
            // A restarted instance gets a new sink over the same budget.
            assert!(!LogSink::new(budget).log(Level::Info, &"m".repeat(100), &[]));
        });
    }

    #[test]
    fn sanitize_keeps_one_line_and_bounds_length() {
        assert_eq!(sanitize("a\nb\u{1b}[31m", 100), "a\\nb\\u{1b}[31m");
        let long = sanitize(&"é".repeat(1000), 10);
        assert!(long.starts_with("ééééé…[") && long.len() < 40, "{long}");
    }
}
