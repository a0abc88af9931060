//! HTTP: `/metrics` (Prometheus text 0.0.4, or OpenMetrics when asked), `/healthz`
//! (liveness of the daemon itself), `/readyz` (start-up done, probes attached), `/status`
//! (JSON, every probe and plugin).
//!
//! Bounded as a node agent's server must be against any local user:
//! - at most `max_connections` connections ([`connections`]: a new one takes the place
//!   of the longest idle, so idle or half-sent connections cannot keep a scrape out;
//!   never more than the open-file limit allows);
//! - each request head (also the wait for the next one on a kept-alive connection) must
//!   arrive within `header_timeout_ms`, and a connection lives at most
//!   `connection_max_ms`;
//! - at most `max_requests` requests are answered at once (more get 503), and one
//!   scrape renders at a time (off the async workers, so `/healthz` answers meanwhile):
//!   concurrent scrapes cannot multiply the exposition's size in memory (which the
//!   plugins' metric budgets bound);
//! - only GET and HEAD (405 otherwise); accept errors back off;
//! - optionally TLS and basic auth ([`web`]).

pub mod admin;
pub mod connections;
pub mod status;
pub mod web;

use std::{
    convert::Infallible,
    sync::{Arc, RwLock, atomic::Ordering::Relaxed},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::{prometheus_text, text},
    registry::Registry,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::ServerSettings;
use connections::{AcceptBackoff, Connections, Refused, RefusedLabels};

const MAX_SCRAPES: usize = 1;
/// File descriptors kept for everything but HTTP connections (probes and the uprobe
/// kind's sites, plugins, the compiler's pipes, the admin API, logs).
const RESERVED_FDS: u64 = 256 + wasmtap_events::uprobe::MAX_SITES as u64;

/// What the endpoints read.
pub struct AppState {
    pub registry: Registry,
    pub report: RwLock<status::Report>,
    scrapes: Arc<Semaphore>,
    requests: Arc<Semaphore>,
    settings: ServerSettings,
    refused: Refused,
    auth: Option<Arc<web::BasicAuth>>,
}

impl AppState {
    pub fn new(mut registry: Registry, settings: ServerSettings, auth: Option<web::BasicAuth>) -> Self {
        let refused = Refused::default();
        registry.register(
            "wasmtap_http_refused",
            "Connections and requests the HTTP server turned away: connection_evicted (an idle one made room for a newer one), connection_refused, too_many_requests, accept_error, tls_handshake, unauthorized, auth_busy",
            refused.clone(),
        );
        Self {
            registry,
            report: RwLock::default(),
            scrapes: Arc::new(Semaphore::new(MAX_SCRAPES)),
            requests: Arc::new(Semaphore::new(settings.max_requests)),
            settings,
            refused,
            auth: auth.map(Arc::new),
        }
    }
}

/// `max_connections`, lowered (and said) to what the open-file limit leaves.
fn connection_limit(wanted: usize) -> usize {
    let files = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    let room = files.saturating_sub(RESERVED_FDS).max(16) as usize;
    if room < wanted {
        tracing::warn!(max_connections = room, "server.max_connections lowered from {wanted} to fit the open-file limit ({files}); raise LimitNOFILE for more");
    }
    wanted.min(room)
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves until `stop` (over TLS with `tls`); in-flight requests finish on their own
/// tasks.
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, state: Arc<AppState>, stop: CancellationToken) {
    let connections = Connections::new(connection_limit(state.settings.max_connections), state.refused.clone());
    let mut backoff = AcceptBackoff::default();
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // E.g. out of file descriptors: wait rather than spin.
                    let delay = backoff.failed(&e, &state.refused);
                    tokio::time::sleep(delay).await;
                    continue;
                }
            },
        };
        backoff.succeeded();
        let Some(connection) = connections.admit() else { continue };
        let (state, tls) = (state.clone(), tls.clone());
        tokio::spawn(async move {
            let connection = Arc::new(connection);
            let close = connection.close.clone();
            let served = async {
                match tls {
                    None => serve_connection(stream, state, connection).await,
                    Some(tls) => {
                        // The handshake, too, within the time a request head has.
                        let timeout = Duration::from_millis(state.settings.header_timeout_ms);
                        match tokio::time::timeout(timeout, tls.accept(stream)).await {
                            Ok(Ok(stream)) => serve_connection(stream, state, connection).await,
                            _ => drop(state.refused.get_or_create(&RefusedLabels { reason: "tls_handshake" }).inc()),
                        }
                    }
                }
            };
            // Evicted (it was idle): closed at once.
            tokio::select! {
                () = served => {}
                () = close.cancelled() => {}
            }
        });
    }
    connections.close_all();
}

/// HTTP/1.1 on one connection, plain or TLS. At `connection_max_ms` it closes once the
/// request in flight (if any) is answered.
async fn serve_connection<I>(io: I, state: Arc<AppState>, connection: Arc<connections::Connection>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = Duration::from_millis(state.settings.header_timeout_ms);
    let lifetime = Duration::from_millis(state.settings.connection_max_ms);
    let service = service_fn(move |req| {
        let (state, connection) = (state.clone(), connection.clone());
        async move {
            connection.in_request.store(true, Relaxed);
            let response = handle(&req, state).await;
            connection.idle();
            Ok::<_, Infallible>(response)
        }
    });
    let served = http1::Builder::new().timer(TokioTimer::new()).header_read_timeout(header_timeout).serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = tokio::time::sleep(lifetime) => {
            served.as_mut().graceful_shutdown();
            // The answer under way gets as long as a request head would.
            match tokio::time::timeout(header_timeout, served).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!("connection ended: {e}");
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder().status(status).header(header::CONTENT_TYPE, content_type).body(Full::new(body.into())).expect("static response parts are valid")
}

async fn handle(req: &Request<Incoming>, state: Arc<AppState>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET and HEAD\n");
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    // What the probes saw needs credentials (when users are set); health does not.
    // Checked before a request slot is taken, so waiting checks hold none.
    if let Some(auth) = &state.auth
        && matches!(req.uri().path(), "/metrics" | "/status")
    {
        match auth.check(req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes())).await {
            web::Verdict::Allowed => {}
            web::Verdict::Busy => {
                state.refused.get_or_create(&RefusedLabels { reason: "auth_busy" }).inc();
                return reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "checking other credentials; retry\n");
            }
            web::Verdict::Denied => {
                state.refused.get_or_create(&RefusedLabels { reason: "unauthorized" }).inc();
                let mut response = reply(StatusCode::UNAUTHORIZED, "text/plain", "credentials needed\n");
                response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Basic realm=\"wasmtap\""));
                return response;
            }
        }
    }
    let Ok(_request) = state.requests.clone().try_acquire_owned() else {
        state.refused.get_or_create(&RefusedLabels { reason: "too_many_requests" }).inc();
        return reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "too many concurrent requests (server.max_requests)\n");
    };
    match req.uri().path() {
        "/metrics" => {
            let wants_openmetrics = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/openmetrics-text"));
            let Ok(permit) = state.scrapes.clone().acquire_owned().await else {
                return reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n");
            };
            let encoded = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let mut body = String::new();
                let encoded = if wants_openmetrics { text::encode(&mut body, &state.registry) } else { prometheus_text::encode(&mut body, &state.registry) };
                encoded.map(|()| body)
            })
            .await;
            let content_type = if wants_openmetrics { OPENMETRICS } else { PROMETHEUS_TEXT };
            match encoded {
                Ok(Ok(body)) => reply(StatusCode::OK, content_type, body),
                _ => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "encoding metrics failed\n"),
            }
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let report = state.report.read().expect("report");
            let not_ready = report.not_ready();
            let mut body = if not_ready.is_empty() { "ready\n".to_owned() } else { not_ready.join("\n") + "\n" };
            for problem in report.plugin_problems() {
                body.push_str(&format!("(does not affect readiness) {problem}\n"));
            }
            let code = if not_ready.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            reply(code, "text/plain", body)
        }
        "/status" => reply(StatusCode::OK, "application/json", state.report.read().expect("report").to_json().to_string()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /healthz, /readyz or /status\n"),
    }
}
