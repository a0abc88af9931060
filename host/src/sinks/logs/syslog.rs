//! Syslog: RFC 5424 messages over TCP with octet-counting framing (RFC 6587), the
//! form rsyslog's `imtcp` and syslog-ng's `syslog()` source take. The host's fields go
//! in one structured-data element (`[wasmtap@32473 plugin=… tenant=…]`, the SD-ID
//! configurable as `sd_id`), the plugin's in a second (`[fields@32473 …]`), the
//! message as MSG.
//!
//! Plain TCP has no acknowledgement: records written into a connection the receiver
//! has just closed would be lost, so before each batch the connection is checked for
//! the receiver's close (it never sends anything) and reopened.

use std::{fmt::Write as _, io::ErrorKind, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

use super::{
    Level, LogRecord,
    buffer::{SendError, Ship},
};
use crate::config::LogOutputConfig;

pub struct Syslog {
    address: String,
    header: Header,
    timeout: Duration,
    stream: Option<TcpStream>,
}

/// What every message of this daemon shares.
struct Header {
    facility: u8,
    hostname: String,
    procid: String,
    sd_id: String,
    fields_sd_id: String,
}

/// Facilities by name (RFC 5424 table 1).
const FACILITIES: [(&str, u8); 12] = [
    ("user", 1),
    ("daemon", 3),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
    ("syslog", 5),
    ("audit", 13),
];

pub fn facility(name: &str) -> anyhow::Result<u8> {
    FACILITIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|&(_, f)| f)
        .with_context(|| format!("unknown syslog facility {name:?} (one of {})", FACILITIES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")))
}

/// An SD-ID of the form name@enterprise-number (RFC 5424 7.2.2).
pub fn check_sd_id(sd_id: &str) -> anyhow::Result<()> {
    let ok = sd_id.split_once('@').is_some_and(|(name, number)| {
        !name.is_empty() && param_name(name) == name && !number.is_empty() && number.split('.').all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    });
    anyhow::ensure!(ok && sd_id.len() <= 32, "sd_id {sd_id:?} is not name@enterprise-number (at most 32 characters)");
    Ok(())
}

impl Syslog {
    pub fn new(config: &LogOutputConfig, node: &str) -> anyhow::Result<Self> {
        let address = config.address.clone().context("a syslog output needs `address` (host:port of a TCP syslog receiver)")?;
        let sd_id = config.sd_id.clone();
        let enterprise = sd_id.split_once('@').map_or("32473", |(_, pen)| pen).to_owned();
        let header = Header {
            facility: facility(&config.facility)?,
            hostname: printable(node, 255),
            procid: std::process::id().to_string(),
            fields_sd_id: format!("fields@{enterprise}"),
            sd_id,
        };
        Ok(Self { address, header, timeout: Duration::from_millis(config.timeout_ms), stream: None })
    }

    /// The open connection, unless the receiver closed it (then a new one).
    async fn connection(&mut self) -> Result<&mut TcpStream, SendError> {
        if let Some(stream) = &self.stream {
            let mut probe = [0u8; 64];
            match stream.try_read(&mut probe) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // Closed (0), or anything sent to us (a receiver never does), or an error.
                _ => self.stream = None,
            }
        }
        if self.stream.is_none() {
            let stream = tokio::time::timeout(self.timeout, TcpStream::connect(&self.address))
                .await
                .map_err(|_| SendError::Retry(format!("connecting to {} timed out", self.address)))?
                .map_err(|e| SendError::Retry(format!("cannot connect to {}: {e}", self.address)))?;
            stream.set_nodelay(true).ok();
            self.stream = Some(stream);
        }
        Ok(self.stream.as_mut().expect("connected"))
    }
}

impl Ship for Syslog {
    async fn send(&mut self, batch: &[Arc<LogRecord>]) -> Result<usize, SendError> {
        let mut frames = Vec::new();
        for record in batch {
            let message = message(&self.header, record);
            frames.extend_from_slice(format!("{} ", message.len()).as_bytes());
            frames.extend_from_slice(message.as_bytes());
        }
        let (address, timeout) = (self.address.clone(), self.timeout);
        let stream = self.connection().await?;
        let written = tokio::time::timeout(timeout, stream.write_all(&frames)).await;
        match written {
            Ok(Ok(())) => Ok(0),
            Ok(Err(e)) => {
                self.stream = None;
                Err(SendError::Retry(format!("writing to {address}: {e}")))
            }
            Err(_) => {
                self.stream = None;
                Err(SendError::Retry(format!("writing to {address} timed out")))
            }
        }
    }
}

/// Severity (RFC 5424 table 2) of a level.
fn severity(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// One RFC 5424 message (without framing).
fn message(h: &Header, r: &LogRecord) -> String {
    let mut m = format!(
        "<{}>1 {} {} wasmtap {} plugin [{}",
        h.facility * 8 + severity(r.level),
        humantime::format_rfc3339_micros(r.time),
        h.hostname,
        h.procid,
        h.sd_id
    );
    let param = |m: &mut String, name: &str, value: &str| {
        let _ = write!(m, " {}=\"{}\"", param_name(name), escape(value));
    };
    param(&mut m, "plugin", &r.plugin);
    if let Some(tenant) = &r.tenant {
        param(&mut m, "tenant", tenant);
    }
    param(&mut m, "level", r.level.name());
    m.push(']');
    if !r.fields.is_empty() {
        let _ = write!(m, "[{}", h.fields_sd_id);
        for (k, v) in &r.fields {
            param(&mut m, k, v);
        }
        m.push(']');
    }
    m.push(' ');
    m.push_str(&r.message);
    m
}

/// A PARAM-NAME: 1–32 printable ASCII characters other than `=`, space, `]` and `"`
/// (others become `_`).
fn param_name(name: &str) -> String {
    let name: String = name.chars().take(32).map(|c| if c.is_ascii_graphic() && !matches!(c, '=' | ']' | '"') { c } else { '_' }).collect();
    if name.is_empty() { "_".to_owned() } else { name }
}

/// A PARAM-VALUE: `"`, `\` and `]` escaped with a backslash.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A header field: printable ASCII only (others become `_`), at most `max`, `-` if empty.
fn printable(text: &str, max: usize) -> String {
    let text: String = text.chars().take(max).map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect();
    if text.is_empty() { "-".to_owned() } else { text }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn a_message_is_rfc5424_with_structured_data() {
        let h = Header {
            facility: 16,
            hostname: printable("node 1", 255),
            procid: "42".into(),
            sd_id: "wasmtap@32473".into(),
            fields_sd_id: "fields@32473".into(),
        };
        let r = LogRecord {
            time: SystemTime::UNIX_EPOCH,
            level: Level::Warn,
            plugin: "pg".into(),
            tenant: Some("team-a".into()),
            message: "slow query".into(),
            fields: vec![("ms".into(), "12".into()), ("q x=]".into(), "a\"b]c\\".into())],
        };
        assert_eq!(
            message(&h, &r),
            r#"<132>1 1970-01-01T00:00:00.000000Z node_1 wasmtap 42 plugin [wasmtap@32473 plugin="pg" tenant="team-a" level="warn"][fields@32473 ms="12" q_x__="a\"b\]c\\"] slow query"#
        );
        assert_eq!(facility("daemon").unwrap(), 3);
        assert!(facility("kern").unwrap_err().to_string().contains("local0"));
    }
}
