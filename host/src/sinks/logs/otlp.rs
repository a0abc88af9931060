//! OTLP logs over HTTP (`POST /v1/logs`, protobuf), the OpenTelemetry Collector's
//! `otlphttp` receiver: one `ResourceLogs` (`service.name` = wasmtap, `host.name` = the
//! node) with one scope; each record's plugin and tenant are the attributes
//! `wasmtap.plugin` and `wasmtap.tenant`, its fields the other attributes (a field
//! named like one of those two is kept as `field.<name>`), its message the body.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use opentelemetry_proto::tonic::{
    collector::logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    logs::v1::{LogRecord as OtlpRecord, ResourceLogs, ScopeLogs, SeverityNumber},
    resource::v1::Resource,
};
use prost::Message as _;

use super::{
    Level, LogRecord,
    buffer::{SendError, Ship},
    http::HttpPost,
};
use crate::config::LogOutputConfig;

pub struct Otlp {
    http: HttpPost,
    node: String,
}

impl Otlp {
    pub fn new(config: &LogOutputConfig, node: &str) -> anyhow::Result<Self> {
        let url = config.url.as_deref().context("an otlp output needs `url` (e.g. http://collector:4318/v1/logs)")?;
        Ok(Self { http: HttpPost::new(url, &config.headers, Duration::from_millis(config.timeout_ms))?, node: node.to_owned() })
    }
}

fn attribute(key: &str, value: &str) -> KeyValue {
    KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_owned())) }), ..Default::default() }
}

fn severity(level: Level) -> SeverityNumber {
    match level {
        Level::Trace => SeverityNumber::Trace,
        Level::Debug => SeverityNumber::Debug,
        Level::Info => SeverityNumber::Info,
        Level::Warn => SeverityNumber::Warn,
        Level::Error => SeverityNumber::Error,
    }
}

/// The export request for `batch`.
pub fn request(batch: &[Arc<LogRecord>], node: &str) -> ExportLogsServiceRequest {
    let log_records = batch
        .iter()
        .map(|r| {
            let mut attributes = vec![attribute("wasmtap.plugin", &r.plugin)];
            attributes.extend(r.tenant.as_deref().map(|t| attribute("wasmtap.tenant", t)));
            for (k, v) in &r.fields {
                let reserved = matches!(k.as_str(), "wasmtap.plugin" | "wasmtap.tenant");
                attributes.push(attribute(&if reserved { format!("field.{k}") } else { k.clone() }, v));
            }
            OtlpRecord {
                time_unix_nano: r.unix_nanos(),
                observed_time_unix_nano: r.unix_nanos(),
                severity_number: severity(r.level) as i32,
                severity_text: r.level.name().to_uppercase(),
                body: Some(AnyValue { value: Some(any_value::Value::StringValue(r.message.clone())) }),
                attributes,
                ..Default::default()
            }
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource { attributes: vec![attribute("service.name", "wasmtap"), attribute("host.name", node)], ..Default::default() }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope { name: "wasmtap.plugin".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() }),
                log_records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

impl Ship for Otlp {
    async fn send(&mut self, batch: &[Arc<LogRecord>]) -> Result<usize, SendError> {
        let answer = self.http.post("application/x-protobuf", request(batch, &self.node).encode_to_vec()).await?;
        // A partial success names how many records the collector refused.
        let rejected = ExportLogsServiceResponse::decode(answer).ok().and_then(|r| r.partial_success).map_or(0, |p| p.rejected_log_records.max(0) as usize);
        Ok(rejected.min(batch.len()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn a_request_round_trips_through_protobuf() {
        let record = Arc::new(LogRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_nanos(99),
            level: Level::Error,
            plugin: "p".into(),
            tenant: Some("t".into()),
            message: "m".into(),
            fields: vec![("k".into(), "v".into()), ("wasmtap.plugin".into(), "forged".into())],
        });
        let decoded = ExportLogsServiceRequest::decode(request(&[record], "n").encode_to_vec().as_slice()).unwrap();
        let r = &decoded.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!((r.time_unix_nano, r.severity_number, r.severity_text.as_str()), (99, SeverityNumber::Error as i32, "ERROR"));
        let keys: Vec<&str> = r.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["wasmtap.plugin", "wasmtap.tenant", "k", "field.wasmtap.plugin"]);
    }
}
