//! HTTP: `/metrics` (Prometheus text 0.0.4, or OpenMetrics when asked), `/healthz`,
//! `/status`.

pub mod status;

use std::{convert::Infallible, sync::Arc};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{prometheus_text, text},
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the endpoints read.
pub struct AppState {
    pub registry: Registry,
    pub report: status::Report,
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves until `stop`; in-flight requests finish on their own tasks.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&req, &state)) }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!("connection ended: {e}");
            }
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

fn handle(req: &Request<Incoming>, state: &AppState) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            let wants_openmetrics = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            let mut body = String::new();
            let (encoded, content_type) = if wants_openmetrics {
                (text::encode(&mut body, &state.registry), OPENMETRICS)
            } else {
                (prometheus_text::encode(&mut body, &state.registry), PROMETHEUS_TEXT)
            };
            match encoded {
                Ok(()) => reply(StatusCode::OK, content_type, body),
                Err(_) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "encoding metrics failed\n"),
            }
        }
        "/healthz" => {
            let problems = state.report.problems();
            if problems.is_empty() {
                reply(StatusCode::OK, "text/plain", "ok\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", problems.join("\n") + "\n")
            }
        }
        "/status" => reply(StatusCode::OK, "application/json", state.report.to_json().to_string()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /healthz or /status\n"),
    }
}
