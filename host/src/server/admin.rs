//! The admin API: HTTP/JSON on a Unix socket, for the daemon's own user only (the
//! socket's directory is 0700, the socket 0600, and each connection's peer uid is
//! checked). `wasmtap plugin …` is its client.
//!
//! - `GET /v1/plugins`: every plugin with state, version (content hash) and stats;
//! - `POST /v1/plugins`: load; the body is a `[[plugin]]` section in TOML;
//! - `PUT /v1/plugins/NAME`: replace with a new build or config; the body holds the
//!   keys that change (`path`, `bundled`, `config`, a limit…);
//! - `DELETE /v1/plugins/NAME`: unload;
//! - `POST /v1/reload`: re-read the config file and apply the difference (as SIGHUP).
//!
//! Answers are JSON; a failed change answers 4xx with `{"error": "…"}` and changes
//! nothing. Bounded like the public server: few connections, a header deadline, small
//! bodies, one change at a time (the registry's lock).

use std::{
    convert::Infallible,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::{net::UnixListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{config::Config, plugins::registry::Registry};

const MAX_CONNECTIONS: usize = 8;
const MAX_BODY_BYTES: usize = 64 * 1024;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin API acts on.
pub struct Admin {
    pub registry: Arc<Registry>,
    /// Re-reads the config file (SIGHUP does the same).
    pub reload: Box<dyn Fn() -> anyhow::Result<Config> + Send + Sync>,
    /// The config in force (its plugin defaults complete a section given at run time).
    pub config: std::sync::RwLock<Config>,
}

/// Binds the socket in a directory only this user can enter. A live socket of another
/// daemon at the path is an error; a stale one is replaced.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        bail!("{} belongs to uid {}, not to the daemon's user: choose another admin_socket", dir.display(), meta.uid());
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("making {} private", dir.display()))?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another daemon answers on {}: give this one its own admin_socket", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves until `stop`, then removes the socket.
pub async fn serve(listener: UnixListener, path: PathBuf, admin: Arc<Admin>, stop: CancellationToken) {
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let me = nix::unistd::geteuid().as_raw();
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            permit = connections.clone().acquire_owned() => permit.expect("never closed"),
        };
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    continue;
                }
            },
        };
        let allowed = stream.peer_cred().is_ok_and(|c| c.uid() == me || c.uid() == 0);
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move {
                    if !allowed {
                        return Ok::<_, Infallible>(error(StatusCode::FORBIDDEN, "the admin API is only for the daemon's own user"));
                    }
                    Ok::<_, Infallible>(handle(req, admin).await)
                }
            });
            let connection =
                http1::Builder::new().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!("admin connection ended: {e}");
            }
            drop(permit);
        });
    }
    let _ = std::fs::remove_file(&path);
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string() + "\n")))
        .expect("static response parts are valid")
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": message.to_string() }))
}

async fn handle(req: Request<Incoming>, admin: Arc<Admin>) -> Response<Full<Bytes>> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, format_args!("bodies are at most {MAX_BODY_BYTES} bytes")),
    };
    let Ok(body) = String::from_utf8(body.to_vec()) else { return error(StatusCode::BAD_REQUEST, "the body is not UTF-8") };
    let name = path.strip_prefix("/v1/plugins/").map(str::to_owned);
    // Changes compile and call into plugins: off the async workers.
    let work = move || -> (StatusCode, anyhow::Result<serde_json::Value>) {
        let registry = &admin.registry;
        match (&method, path.as_str(), name) {
            (&Method::GET, "/v1/plugins", _) => (StatusCode::OK, Ok(json!(registry.list()))),
            (&Method::POST, "/v1/plugins", _) => {
                let config = admin.config.read().expect("config").plugin(&body, None);
                (StatusCode::CREATED, config.and_then(|c| registry.load(&c)).map(|info| json!(info)))
            }
            (&Method::PUT, _, Some(name)) => {
                let Some(base) = registry.config_of(&name) else {
                    return (StatusCode::NOT_FOUND, Err(anyhow::anyhow!("no plugin {name:?} is loaded")));
                };
                let body = format!("{body}\nname = {}\n", toml::Value::from(name.as_str()));
                let config = admin.config.read().expect("config").plugin(&body, Some(&base));
                (StatusCode::OK, config.and_then(|c| registry.replace(&c)).map(|info| json!(info)))
            }
            (&Method::DELETE, _, Some(name)) => (StatusCode::OK, registry.unload(&name).map(|()| json!({ "unloaded": name }))),
            (&Method::POST, "/v1/reload", _) => (StatusCode::OK, reload(&admin).map(|applied| json!(applied))),
            _ => (StatusCode::NOT_FOUND, Err(anyhow::anyhow!("no such admin call: GET|POST /v1/plugins, PUT|DELETE /v1/plugins/NAME, POST /v1/reload"))),
        }
    };
    match tokio::task::spawn_blocking(work).await {
        Ok((status, Ok(value))) => reply(status, value),
        Ok((StatusCode::NOT_FOUND, Err(e))) => error(StatusCode::NOT_FOUND, format_args!("{e:#}")),
        Ok((_, Err(e))) => error(StatusCode::UNPROCESSABLE_ENTITY, format_args!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Re-reads the config file and applies its plugins' difference. Other settings
/// (listen address, probes, tenants) take a restart; a change to them is said in the log.
pub fn reload(admin: &Admin) -> anyhow::Result<crate::plugins::registry::Applied> {
    let config = (admin.reload)()?;
    {
        let current = admin.config.read().expect("config");
        if current.listen != config.listen || current.probes != config.probes || current.tenants != config.tenants || current.admin_socket != config.admin_socket {
            tracing::warn!("the config's listen, probes, tenants or admin_socket changed: those take a restart; applying the plugins only");
        }
    }
    let applied = admin.registry.apply(&config.plugins)?;
    *admin.config.write().expect("config") = config;
    tracing::info!(loaded = ?applied.loaded, replaced = ?applied.replaced, unloaded = ?applied.unloaded, failed = applied.failed.len(), "config reloaded");
    Ok(applied)
}
