//! Loki's push API (`POST /loki/api/v1/push`, JSON): one stream per label set, with
//! low-cardinality labels only (`service_name`, `node`, `plugin`, `tenant`, `level`,
//! and the output's static `labels`); the message is the line, and the plugin's fields
//! go in each entry's structured metadata (indexed by nothing, so any number of
//! distinct values costs Loki no streams).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{
    LogRecord,
    buffer::{SendError, Ship},
    http::HttpPost,
};
use crate::config::LogOutputConfig;

pub struct Loki {
    http: HttpPost,
    node: String,
    labels: BTreeMap<String, String>,
}

impl Loki {
    pub fn new(config: &LogOutputConfig, node: &str) -> anyhow::Result<Self> {
        let url = config.url.as_deref().context("a loki output needs `url` (e.g. http://loki:3100/loki/api/v1/push)")?;
        Ok(Self { http: HttpPost::new(url, &config.headers, Duration::from_millis(config.timeout_ms))?, node: node.to_owned(), labels: config.labels.clone() })
    }
}

/// The push request's JSON body.
pub fn body(batch: &[Arc<LogRecord>], node: &str, static_labels: &BTreeMap<String, String>) -> Value {
    let mut streams: Vec<(BTreeMap<&str, &str>, Vec<Value>)> = Vec::new();
    for r in batch {
        let mut labels: BTreeMap<&str, &str> = static_labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        labels.extend([("service_name", "wasmtap"), ("node", node), ("plugin", &r.plugin), ("level", r.level.name())]);
        if let Some(tenant) = &r.tenant {
            labels.insert("tenant", tenant);
        }
        let metadata: serde_json::Map<String, Value> = r.fields.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
        let entry = json!([r.unix_nanos().to_string(), r.message, metadata]);
        match streams.iter_mut().find(|(l, _)| *l == labels) {
            Some((_, values)) => values.push(entry),
            None => streams.push((labels, vec![entry])),
        }
    }
    json!({ "streams": streams.into_iter().map(|(stream, values)| json!({"stream": stream, "values": values})).collect::<Vec<_>>() })
}

impl Ship for Loki {
    async fn send(&mut self, batch: &[Arc<LogRecord>]) -> Result<usize, SendError> {
        let body = serde_json::to_vec(&body(batch, &self.node, &self.labels)).expect("JSON");
        self.http.post("application/json", body).await.map(|_| 0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::sinks::logs::Level;

    #[test]
    fn records_group_into_streams_by_labels_with_fields_as_metadata() {
        let record = |plugin: &str, level, message: &str| {
            Arc::new(LogRecord {
                time: SystemTime::UNIX_EPOCH + Duration::from_nanos(7),
                level,
                plugin: plugin.into(),
                tenant: None,
                message: message.into(),
                fields: vec![("pid".into(), "1".into())],
            })
        };
        let batch = [record("a", Level::Info, "one"), record("b", Level::Info, "two"), record("a", Level::Info, "three")];
        let body = body(&batch, "n1", &BTreeMap::from([("cluster".to_owned(), "c".to_owned())]));
        assert_eq!(
            body,
            json!({"streams": [
                {"stream": {"cluster": "c", "level": "info", "node": "n1", "plugin": "a", "service_name": "wasmtap"},
                 "values": [["7", "one", {"pid": "1"}], ["7", "three", {"pid": "1"}]]},
                {"stream": {"cluster": "c", "level": "info", "node": "n1", "plugin": "b", "service_name": "wasmtap"},
                 "values": [["7", "two", {"pid": "1"}]]},
            ]})
        );
    }
}
