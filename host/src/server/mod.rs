//! HTTP: `/metrics` (Prometheus text 0.0.4, or OpenMetrics when asked), `/healthz`
//! (liveness of the daemon itself), `/readyz` (start-up done, probes attached), `/status`
//! (JSON, every probe and plugin).
//!
//! Bounded: at most `MAX_CONNECTIONS` connections (more wait in the listen backlog),
//! each must send its request head within `HEADER_TIMEOUT`, and one scrape renders at a
//! time (off the async workers, so `/healthz` answers meanwhile): concurrent scrapes
//! cannot multiply the exposition's size in memory (which the plugins' metric budgets
//! bound).

pub mod admin;
pub mod status;

use std::{
    convert::Infallible,
    sync::{Arc, RwLock},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
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
use tokio_util::sync::CancellationToken;

const MAX_CONNECTIONS: usize = 64;
const MAX_SCRAPES: usize = 1;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the endpoints read.
pub struct AppState {
    pub registry: Registry,
    pub report: RwLock<status::Report>,
    scrapes: Arc<Semaphore>,
}

impl AppState {
    pub fn new(registry: Registry) -> Self {
        Self { registry, report: RwLock::default(), scrapes: Arc::new(Semaphore::new(MAX_SCRAPES)) }
    }
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves until `stop`; in-flight requests finish on their own tasks.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, stop: CancellationToken) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            permit = connections.clone().acquire_owned() => permit.expect("never closed"),
        };
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // E.g. out of file descriptors: wait rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&req, state).await) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
            drop(permit);
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

async fn handle(req: &Request<Incoming>, state: Arc<AppState>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let wants_openmetrics = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            let Ok(permit) = state.scrapes.clone().acquire_owned().await else {
                return reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n");
            };
            let encoded = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let mut body = String::new();
                let encoded = if wants_openmetrics {
                    text::encode(&mut body, &state.registry)
                } else {
                    prometheus_text::encode(&mut body, &state.registry)
                };
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
