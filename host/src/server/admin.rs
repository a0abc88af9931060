//! The admin API: HTTP/JSON on a Unix socket, for the daemon's own user (and root)
//! only: the socket's directory is 0700, the socket 0600, and each connection's peer
//! uid is checked. `wasmtap plugin …` is its client.
//!
//! - `GET /v1/plugins`: every plugin with state, version (content hash) and stats;
//! - `POST /v1/plugins`: load; the body is a `[[plugin]]` section in TOML;
//! - `PUT /v1/plugins/NAME`: replace with a new build or config; the body holds the
//!   keys that change (`path`, `bundled`, `config`, a limit…);
//! - `DELETE /v1/plugins/NAME`: unload;
//! - `POST /v1/reload`: re-read the config file and apply the difference (as SIGHUP).
//!
//! Answers are JSON; a failed change answers 404 (no such plugin) or 422 with
//! `{"error": "…"}` and changes nothing (400, 403, 408, 413 for bad requests). Bounded like the public server: few connections, a header deadline, small
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
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the admin API acts on.
pub struct Admin {
    pub registry: Arc<Registry>,
    /// The config file (none: the embedded default), and the command-line settings that
    /// override it.
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
    /// The config in force (its plugin defaults complete a section given at run time).
    pub config: std::sync::RwLock<Config>,
    /// Held from reading the file to applying it, so reloads apply in order.
    pub reloading: std::sync::Mutex<()>,
}

/// Settings given on the command line, which win over the config file's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<std::net::SocketAddr>,
    pub admin_socket: Option<PathBuf>,
    pub capabilities_keep: Option<Vec<String>>,
}

impl Overrides {
    pub fn apply(&self, mut config: Config) -> Config {
        config.listen = self.listen.unwrap_or(config.listen);
        config.admin_socket = self.admin_socket.clone().or(config.admin_socket);
        config.capabilities_keep = self.capabilities_keep.clone().unwrap_or(config.capabilities_keep);
        config
    }
}

/// Binds the socket in a directory only this user can enter: made 0700 when missing;
/// an existing one must be the daemon user's and 0700 already (it is never changed: it
/// could be /run or /tmp). A live socket at the path is an error, a stale one is
/// replaced, anything else there is left alone (an error).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        bail!(
            "{} must be a directory of the daemon's user that no one else may enter (0700): give admin_socket a directory of its own, e.g. /run/wasmtap/admin.sock",
            dir.display()
        );
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => bail!("{} exists and is not a socket: choose another admin_socket", path.display()),
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            bail!("another daemon answers on {}: give this one its own admin_socket", path.display())
        }
        Ok(_) => std::fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?,
        Err(_) => {}
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
                    // E.g. out of file descriptors: wait rather than spin.
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
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
            let connection = http1::Builder::new().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).serve_connection(TokioIo::new(stream), service);
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
    let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(req.into_body(), MAX_BODY_BYTES).collect()).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, format_args!("bodies are at most {MAX_BODY_BYTES} bytes"));
        }
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, format_args!("reading the body: {e}")),
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, format_args!("the body did not arrive within {BODY_TIMEOUT:?}")),
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
            (&Method::PUT | &Method::DELETE, _, Some(name)) if registry.config_of(&name).is_none() => {
                (StatusCode::NOT_FOUND, Err(anyhow::anyhow!("no plugin {name:?} is loaded")))
            }
            (&Method::PUT, _, Some(name)) => {
                let base = registry.config_of(&name);
                let config = admin.config.read().expect("config").plugin(&body, base.as_ref());
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

/// Re-reads the config file and applies the edit of its plugins. Other settings
/// (listen address, probes, tenants, log outputs, cache, admin socket) take a restart; a change to
/// them is said in the log.
pub fn reload(admin: &Admin) -> anyhow::Result<crate::plugins::registry::Applied> {
    let _reloading = admin.reloading.lock().expect("reload lock");
    let config = admin.overrides.apply(Config::load(admin.path.as_deref())?);
    {
        let c = admin.config.read().expect("config");
        let restart = (c.listen, &c.server, &c.probes, &c.tenants, &c.cache_dir, c.cache_max_bytes, &c.admin_socket, &c.capabilities_keep, &c.logs)
            != (
                config.listen,
                &config.server,
                &config.probes,
                &config.tenants,
                &config.cache_dir,
                config.cache_max_bytes,
                &config.admin_socket,
                &config.capabilities_keep,
                &config.logs,
            );
        if restart {
            tracing::warn!(
                "the config's listen, server, probes, tenants, logs, cache_dir, cache_max_bytes, admin_socket or capabilities_keep changed: those take a restart; applying the plugins only"
            );
        }
    }
    let applied = admin.registry.apply_file(&config.plugins)?;
    *admin.config.write().expect("config") = config;
    tracing::info!(loaded = ?applied.loaded, replaced = ?applied.replaced, unloaded = ?applied.unloaded, failed = applied.failed.len(), "config reloaded");
    Ok(applied)
}
