//! JSON lines, to stdout (`path = "-"`) or appended to a file: one object per record,
//! `{"time", "level", "node", "plugin", "tenant", "message", "fields": {…}}`. A file that
//! was moved away (logrotate) is reopened at its path before the next batch.

use std::{os::unix::fs::MetadataExt as _, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use serde_json::json;
use tokio::io::AsyncWriteExt as _;

use super::{
    LogRecord,
    buffer::{SendError, Ship},
};
use crate::config::LogOutputConfig;

pub struct JsonLines {
    node: String,
    target: Target,
}

enum Target {
    Stdout(tokio::io::Stdout),
    File { path: PathBuf, file: Option<(tokio::fs::File, u64)> },
}

impl JsonLines {
    pub fn new(config: &LogOutputConfig, node: &str) -> anyhow::Result<Self> {
        let path = config.path.clone().context("a json-lines output needs `path` (a file, or \"-\" for stdout)")?;
        let target = if path.as_os_str() == "-" { Target::Stdout(tokio::io::stdout()) } else { Target::File { path, file: None } };
        Ok(Self { node: node.to_owned(), target })
    }
}

/// One record as a JSON line.
pub fn line(record: &LogRecord, node: &str) -> String {
    let fields: serde_json::Map<String, serde_json::Value> = record.fields.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
    let value = json!({
        "time": humantime::format_rfc3339_nanos(record.time).to_string(),
        "level": record.level.name(),
        "node": node,
        "plugin": &*record.plugin,
        "tenant": record.tenant.as_deref(),
        "message": record.message,
        "fields": fields,
    });
    format!("{value}\n")
}

impl Ship for JsonLines {
    async fn send(&mut self, batch: &[Arc<LogRecord>]) -> Result<usize, SendError> {
        let text: String = batch.iter().map(|r| line(r, &self.node)).collect();
        let failed = |e: std::io::Error| SendError::Retry(e.to_string());
        match &mut self.target {
            Target::Stdout(out) => {
                out.write_all(text.as_bytes()).await.map_err(failed)?;
                out.flush().await.map_err(failed).map(|()| 0)
            }
            Target::File { path, file } => {
                // Reopened when the path names another file now (or none).
                let current = tokio::fs::metadata(&*path).await.ok().map(|m| m.ino());
                if file.as_ref().map(|(_, ino)| Some(*ino)) != Some(current) {
                    let opened = tokio::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o640)
                        .open(&*path)
                        .await
                        .map_err(|e| SendError::Retry(format!("cannot open {}: {e}", path.display())))?;
                    let ino = opened.metadata().await.map_err(failed)?.ino();
                    *file = Some((opened, ino));
                }
                let (out, _) = file.as_mut().expect("opened");
                out.write_all(text.as_bytes()).await.map_err(failed)?;
                out.flush().await.map_err(failed).map(|()| 0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::sinks::logs::Level;

    #[test]
    fn a_line_keeps_the_fields_structured() {
        let record = LogRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_nanos(1_500_000_001),
            level: Level::Warn,
            plugin: "p".into(),
            tenant: Some("t".into()),
            message: "slow \"query\"".into(),
            fields: vec![("ms".into(), "12".into()), ("db".into(), "x\ny".into())],
        };
        let line = line(&record, "node-1");
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            json!({"time": "1970-01-01T00:00:01.500000001Z", "level": "warn", "node": "node-1", "plugin": "p", "tenant": "t",
                   "message": "slow \"query\"", "fields": {"ms": "12", "db": "x\ny"}})
        );
    }
}
