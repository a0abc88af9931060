//! The plugin log sink: plugin records go to the daemon's own structured log stream
//! (tracing), tagged with the plugin instance, with a per-plugin rate limit so a chatty
//! plugin cannot flood the node's logs.

use std::time::{Duration, Instant};

/// Log levels a plugin can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Token bucket per plugin: `burst` records at once, refilled at `per_second`.
#[derive(Debug)]
pub struct LogSink {
    plugin: String,
    tokens: f64,
    burst: f64,
    per_second: f64,
    last: Instant,
    suppressed: u64,
}

impl LogSink {
    pub fn new(plugin: &str) -> Self {
        Self { plugin: plugin.to_owned(), tokens: 100.0, burst: 100.0, per_second: 50.0, last: Instant::now(), suppressed: 0 }
    }

    /// Writes one record unless the plugin is over its rate; returns whether it was written.
    pub fn log(&mut self, level: Level, message: &str, fields: &[(String, String)]) -> bool {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.last).min(Duration::from_secs(60));
        self.last = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_second).min(self.burst);
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return false;
        }
        self.tokens -= 1.0;
        let plugin = self.plugin.as_str();
        let suppressed = std::mem::take(&mut self.suppressed);
        let fields = format_fields(fields);
        match level {
            Level::Trace => tracing::trace!(plugin, suppressed, fields, "{message}"),
            Level::Debug => tracing::debug!(plugin, suppressed, fields, "{message}"),
            Level::Info => tracing::info!(plugin, suppressed, fields, "{message}"),
            Level::Warn => tracing::warn!(plugin, suppressed, fields, "{message}"),
            Level::Error => tracing::error!(plugin, suppressed, fields, "{message}"),
        }
        true
    }
}

fn format_fields(fields: &[(String, String)]) -> String {
    fields.iter().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_bursts() {
        let mut sink = LogSink::new("p");
        let written = (0..1000).filter(|_| sink.log(Level::Info, "m", &[])).count();
        assert!((100..110).contains(&written), "{written}");
        assert!(sink.suppressed > 0);
    }
}
