//! Loki's push API (`POST /loki/api/v1/push`, JSON): one stream per label set, with
//! low-cardinality labels only (`service_name`, `node`, `plugin`, `tenant`, `level`,
//! and the output's static `labels`); the message is the line, and the plugin's fields
//! go in each entry's structured metadata (indexed by nothing, so any number of
//! distinct values costs Loki no streams).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::Context as _;

use super::{
    Level, LogRecord,
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

/// The push request's JSON body, written directly (a `serde_json::Value` tree per
/// record cost several µs of allocation per record).
pub fn body(batch: &[Arc<LogRecord>], node: &str, static_labels: &BTreeMap<String, String>) -> Vec<u8> {
    // Streams by (plugin, tenant, level), in order of first appearance: few per batch.
    type Stream<'a> = ((&'a str, Option<&'a str>, Level), Vec<&'a LogRecord>);
    let mut streams: Vec<Stream> = Vec::new();
    for r in batch {
        let key = (&*r.plugin, r.tenant.as_deref(), r.level);
        match streams.iter_mut().find(|(k, _)| *k == key) {
            Some((_, records)) => records.push(r),
            None => streams.push((key, vec![r])),
        }
    }
    let mut out = Vec::with_capacity(batch.len() * 160);
    let string = |out: &mut Vec<u8>, s: &str| serde_json::to_writer(out, s).expect("a string encodes");
    out.extend_from_slice(b"{\"streams\":[");
    for (i, ((plugin, tenant, level), records)) in streams.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"stream\":{");
        let labels =
            static_labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).filter(|(k, _)| !matches!(*k, "service_name" | "node" | "plugin" | "tenant" | "level"));
        let own = [("service_name", "wasmtap"), ("node", node), ("plugin", plugin), ("level", level.name())].into_iter().chain(tenant.map(|t| ("tenant", t)));
        for (j, (k, v)) in labels.chain(own).enumerate() {
            if j > 0 {
                out.push(b',');
            }
            string(&mut out, k);
            out.push(b':');
            string(&mut out, v);
        }
        out.extend_from_slice(b"},\"values\":[");
        for (j, r) in records.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            out.extend_from_slice(format!("[\"{}\",", r.unix_nanos()).as_bytes());
            string(&mut out, &r.message);
            out.extend_from_slice(b",{");
            for (n, (k, v)) in r.fields.iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                string(&mut out, k);
                out.push(b':');
                string(&mut out, v);
            }
            out.extend_from_slice(b"}]");
        }
        out.extend_from_slice(b"]}");
    }
    out.extend_from_slice(b"]}");
    out
}

impl Ship for Loki {
    async fn send(&mut self, batch: &[Arc<LogRecord>]) -> Result<usize, SendError> {
        self.http.post("application/json", body(batch, &self.node, &self.labels)).await.map(|_| 0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use serde_json::{Value, json};

    use super::*;

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
        let body: Value = serde_json::from_slice(&body(&batch, "n1", &BTreeMap::from([("cluster".to_owned(), "c".to_owned())]))).unwrap();
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
