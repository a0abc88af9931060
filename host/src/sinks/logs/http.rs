//! A small HTTP/1.1 POST client for the HTTP log outputs (Loki, OTLP): one kept-alive
//! connection, reopened when lost; answers sorted into delivered, retry and rejected.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Request, StatusCode, Uri,
    body::Bytes,
    client::conn::http1::SendRequest,
    header::{HeaderName, HeaderValue},
};
use hyper_util::rt::TokioIo;

use super::buffer::SendError;
use crate::sinks::logs::sanitize;

/// Most of an answer's body read (an error message, or an OTLP partial success).
const MAX_ANSWER_BYTES: usize = 64 << 10;

pub struct HttpPost {
    uri: Uri,
    address: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpPost {
    pub fn new(url: &str, headers: &BTreeMap<String, String>, timeout: Duration) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("not a URL: {url:?}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => bail!("{url}: https is not supported yet; send to a local agent or a TLS-terminating proxy over http"),
            _ => bail!("{url}: the URL must start with http://"),
        }
        let host = uri.host().context("the URL has no host")?;
        let address = format!("{host}:{}", uri.port_u16().unwrap_or(80));
        let headers = headers
            .iter()
            .map(|(k, v)| {
                Ok((
                    HeaderName::try_from(k.as_str()).with_context(|| format!("header name {k:?}"))?,
                    HeaderValue::try_from(v.as_str()).context("header value")?,
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { uri, address, headers, timeout, sender: None })
    }

    /// POSTs `body`; the answer's body when the receiver took it (2xx).
    pub async fn post(&mut self, content_type: &'static str, body: Vec<u8>) -> Result<Bytes, SendError> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.exchange(content_type, body)).await {
            Ok(answer) => answer,
            Err(_) => {
                self.sender = None;
                Err(SendError::Retry(format!("{} did not answer within {timeout:?}", self.uri)))
            }
        }
    }

    async fn exchange(&mut self, content_type: &'static str, body: Vec<u8>) -> Result<Bytes, SendError> {
        let retry = |what: &str, e: &dyn std::fmt::Display| SendError::Retry(format!("{what} {}: {e}", self.uri));
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(&self.address).await.map_err(|e| retry("cannot connect to", &e))?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| retry("cannot talk to", &e))?;
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected");
        // Origin-form (`POST /path`), as HTTP/1.1 clients send to origin servers.
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut request = Request::post(path)
            .header(hyper::header::HOST, self.uri.authority().map_or("", |a| a.as_str()))
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        request.headers_mut().extend(self.headers.iter().cloned());
        let answer = match sender.send_request(request).await {
            Ok(answer) => answer,
            Err(e) => {
                self.sender = None;
                return Err(retry("sending to", &e));
            }
        };
        let status = answer.status();
        let body = Limited::new(answer.into_body(), MAX_ANSWER_BYTES).collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        if status.is_success() {
            return Ok(body);
        }
        let why = format!("{} answered {status}: {}", self.uri, sanitize(&String::from_utf8_lossy(&body), 200));
        Err(if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT {
            SendError::Retry(why)
        } else {
            SendError::Rejected(why)
        })
    }
}
