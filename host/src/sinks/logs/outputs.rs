//! Where plugin log records go: the `[[logs.output]]`s of the config, each with its
//! own bounded buffer and shipping task (see [`super::buffer`]), or, with none
//! configured, the daemon's own log stream.

use std::{
    io::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{
    Level, LogRecord,
    buffer::{Buffer, Timing, ship},
    json_lines::JsonLines,
    loki::Loki,
    otlp::Otlp,
    syslog::Syslog,
};
use crate::{
    config::{LogOutputConfig, LogOutputKind, LogSettings},
    sinks::SelfMetrics,
};

/// How long a stopping daemon keeps trying to deliver buffered records.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);

/// The configured outputs.
pub struct LogOutputs {
    buffers: Vec<Arc<Buffer>>,
    /// The lowest level any output takes (`None`: no outputs, written directly).
    min_level: Option<Level>,
    /// Where records go without outputs.
    direct: Direct,
    stop: CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

enum Direct {
    /// The daemon's own log stream.
    DaemonLog,
    /// JSON lines on stderr, at once (`wasmtap replay`).
    StderrJson { node: String },
}

static JSON: AtomicBool = AtomicBool::new(false);

/// Makes plugin records in the daemon's log JSON lines, like the daemon's own
/// (`--json-logs`).
pub fn use_json(on: bool) {
    JSON.store(on, Relaxed);
}

impl LogOutputs {
    /// No outputs: records go to the daemon's log.
    pub fn daemon_log() -> Arc<Self> {
        Self::direct(Direct::DaemonLog)
    }

    /// No outputs: records are written to stderr as JSON lines as they come.
    pub fn stderr_json(node: &str) -> Arc<Self> {
        Self::direct(Direct::StderrJson { node: node.to_owned() })
    }

    fn direct(direct: Direct) -> Arc<Self> {
        Arc::new(Self { buffers: Vec::new(), min_level: None, direct, stop: CancellationToken::new(), tasks: Mutex::default() })
    }

    /// Starts each configured output's shipping task on the current runtime.
    pub fn start(settings: &LogSettings, metrics: &SelfMetrics) -> anyhow::Result<Arc<Self>> {
        if settings.outputs.is_empty() {
            return Ok(Self::daemon_log());
        }
        let node = settings.node();
        let stop = CancellationToken::new();
        let (mut buffers, mut tasks) = (Vec::new(), Vec::new());
        for config in &settings.outputs {
            let buffer = Arc::new(Buffer::new(config, metrics.log_output(&config.name())));
            let timing = Timing {
                batch_wait: Duration::from_millis(config.batch_wait_ms),
                min_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_millis(config.max_backoff_ms),
                send_timeout: Duration::from_millis(config.timeout_ms),
                drain: SHUTDOWN_DRAIN,
            };
            let (b, s) = (buffer.clone(), stop.clone());
            let task = match config.kind {
                LogOutputKind::JsonLines => tokio::spawn(ship(b, JsonLines::new(config, &node)?, timing, s)),
                LogOutputKind::Syslog => tokio::spawn(ship(b, Syslog::new(config, &node)?, timing, s)),
                LogOutputKind::Loki => tokio::spawn(ship(b, Loki::new(config, &node)?, timing, s)),
                LogOutputKind::Otlp => tokio::spawn(ship(b, Otlp::new(config, &node)?, timing, s)),
            };
            tracing::info!(output = config.name(), kind = config.kind.name(), "plugin logs go to {}", config.destination());
            buffers.push(buffer);
            tasks.push(task);
        }
        let min_level = settings.outputs.iter().map(|o| o.min_level).min();
        Ok(Arc::new(Self { buffers, min_level, direct: Direct::DaemonLog, stop, tasks: Mutex::new(tasks) }))
    }

    /// Whether any output takes records of `level`.
    pub fn wants(&self, level: Level) -> bool {
        match (self.min_level, &self.direct) {
            (Some(min), _) => level >= min,
            (None, Direct::DaemonLog) => daemon_log_shows(level),
            (None, Direct::StderrJson { .. }) => true,
        }
    }

    /// Hands `record` to every output that takes its level. Never blocks on an output.
    pub fn submit(&self, record: LogRecord) {
        if self.buffers.is_empty() {
            return match &self.direct {
                Direct::DaemonLog => to_daemon_log(&record),
                Direct::StderrJson { node } => {
                    let _ = std::io::stderr().lock().write_all(super::json_lines::line(&record, node).as_bytes());
                }
            };
        }
        let record = Arc::new(record);
        self.buffers.iter().for_each(|b| b.submit(&record));
    }

    /// Stops the outputs, each delivering what it holds within a few seconds.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("log tasks"));
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// What the config check can tell of an output without reaching it: its URL and
/// headers, its syslog facility and SD-ID.
pub fn check_output_parts(config: &LogOutputConfig) -> anyhow::Result<()> {
    match config.kind {
        LogOutputKind::JsonLines => {}
        LogOutputKind::Syslog => {
            super::syslog::facility(&config.facility)?;
            super::syslog::check_sd_id(&config.sd_id)?;
        }
        LogOutputKind::Loki | LogOutputKind::Otlp => {
            super::http::HttpPost::new(config.url.as_deref().unwrap_or_default(), &config.headers, Duration::from_millis(config.timeout_ms))?;
        }
    }
    Ok(())
}

fn daemon_log_shows(level: Level) -> bool {
    match level {
        Level::Trace => tracing::enabled!(tracing::Level::TRACE),
        Level::Debug => tracing::enabled!(tracing::Level::DEBUG),
        Level::Info => tracing::enabled!(tracing::Level::INFO),
        Level::Warn => tracing::enabled!(tracing::Level::WARN),
        Level::Error => tracing::enabled!(tracing::Level::ERROR),
    }
}

/// Text output goes through `tracing` with the fields as one escaped string. JSON
/// output (`--json-logs`) is written here, one line per record, so that the plugin's
/// fields stay structured (`tracing` needs field names known at compile time).
fn to_daemon_log(record: &LogRecord) {
    let LogRecord { level, plugin, message, fields, .. } = record;
    let plugin = &**plugin;
    if JSON.load(Relaxed) {
        let attrs: serde_json::Map<String, serde_json::Value> = fields.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
        let line = json!({
            "timestamp": humantime::format_rfc3339_micros(record.time).to_string(),
            "level": level.name().to_uppercase(),
            "fields": { "message": message, "plugin": plugin, "tenant": record.tenant.as_deref(), "attrs": attrs },
            "target": "wasmtap::plugin",
        });
        // One write per line, so lines from threads do not interleave.
        let _ = std::io::stderr().lock().write_all(format!("{line}\n").as_bytes());
        return;
    }
    let fields = fields.iter().map(|(k, v)| format!("{k}={v:?}")).collect::<Vec<_>>().join(" ");
    match level {
        Level::Trace => tracing::trace!(plugin, fields, "{message}"),
        Level::Debug => tracing::debug!(plugin, fields, "{message}"),
        Level::Info => tracing::info!(plugin, fields, "{message}"),
        Level::Warn => tracing::warn!(plugin, fields, "{message}"),
        Level::Error => tracing::error!(plugin, fields, "{message}"),
    }
}
