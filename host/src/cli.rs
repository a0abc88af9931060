//! `wasmtap plugin list|load|replace|unload|reload`: the admin API's client. Prints
//! what changed, or one line saying what went wrong and what to do.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// One admin call.
pub enum Request {
    List,
    /// A `[[plugin]]` section (TOML).
    Load(String),
    /// The plugin and the keys of its section that change.
    Replace(String, String),
    Unload(String),
    Reload,
}

/// A plugin section in TOML from the CLI's flags; `set` lines form its `config` table.
pub fn section(name: Option<&str>, path: Option<PathBuf>, bundled: Option<String>, set: &[String]) -> String {
    let mut out = String::new();
    if let Some(name) = name {
        out += &format!("name = {}\n", toml::Value::from(name));
    }
    if let Some(path) = path {
        let path = std::path::absolute(&path).unwrap_or(path);
        out += &format!("path = {}\n", toml::Value::from(path.display().to_string()));
    }
    if let Some(bundled) = bundled {
        out += &format!("bundled = {}\n", toml::Value::from(bundled));
    }
    if !set.is_empty() {
        out += "[config]\n";
        set.iter().for_each(|line| out += &format!("{line}\n"));
    }
    out
}

pub fn run(socket: &Path, request: Request) -> anyhow::Result<String> {
    let (method, uri, body) = match &request {
        Request::List => (Method::GET, "/v1/plugins".to_owned(), String::new()),
        Request::Load(section) => (Method::POST, "/v1/plugins".to_owned(), section.clone()),
        Request::Replace(name, changes) => (Method::PUT, format!("/v1/plugins/{name}"), changes.clone()),
        Request::Unload(name) => (Method::DELETE, format!("/v1/plugins/{name}"), String::new()),
        Request::Reload => (Method::POST, "/v1/reload".to_owned(), String::new()),
    };
    let (status, answer) = tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(call(socket, method, &uri, body))?;
    if !status.is_success() {
        bail!("{}", answer.get("error").and_then(Value::as_str).unwrap_or("the daemon refused the call"));
    }
    Ok(match request {
        Request::List => list(&answer),
        Request::Load(_) => format!("loaded {}\n", plugin_line(&answer)),
        Request::Replace(..) => format!("replaced: now {}; state {}\n", plugin_line(&answer), answer["state_handoff"].as_str().unwrap_or("none")),
        Request::Unload(name) => format!("unloaded {name}\n"),
        Request::Reload => {
            let names = |key: &str| answer[key].as_array().map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")).unwrap_or_default();
            let out = format!("loaded: {}\nreplaced: {}\nunloaded: {}\n", names("loaded"), names("replaced"), names("unloaded"));
            let failed: Vec<String> = answer["failed"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| format!("{}: {}", f[0].as_str().unwrap_or("?"), f[1].as_str().unwrap_or("?")))
                .collect();
            if !failed.is_empty() {
                bail!("{out}not applied (the rest was):\n{}", failed.join("\n"));
            }
            out
        }
    })
}

async fn call(socket: &Path, method: Method, uri: &str, body: String) -> anyhow::Result<(StatusCode, Value)> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            anyhow::anyhow!("{}: permission denied: the admin socket is only for the daemon's user (run as that user, e.g. root)", socket.display())
        }
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            anyhow::anyhow!("no daemon answers on {}: is `wasmtap run` running? (--socket picks another)", socket.display())
        }
        _ => anyhow::anyhow!("cannot reach the daemon on {}: {e}", socket.display()),
    })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("talking to the daemon")?;
    tokio::spawn(connection);
    let request = hyper::Request::builder().method(method).uri(uri).header("host", "wasmtap").body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await.context("the daemon closed the connection")?;
    let status = response.status();
    let bytes = response.into_body().collect().await.context("reading the daemon's answer")?.to_bytes();
    let value = serde_json::from_slice(&bytes).with_context(|| format!("the daemon answered {status} with something other than JSON"))?;
    Ok((status, value))
}

fn plugin_line(p: &Value) -> String {
    let s = |k: &str| p[k].as_str().unwrap_or("").to_owned();
    format!("{} {} version {} ({})", s("name"), s("state"), s("version").get(..12).unwrap_or(""), s("source"))
}

fn list(answer: &Value) -> String {
    let mut out = format!("{:<24} {:<12} {:<12} {:>12} {:>10} {:>6}  {}\n", "NAME", "STATE", "VERSION", "EVENTS", "DROPPED", "FAULTS", "SOURCE");
    for p in answer.as_array().into_iter().flatten() {
        let s = |k: &str| p[k].as_str().unwrap_or("").to_owned();
        let n = |k: &str| p[k].as_u64().unwrap_or(0);
        out += &format!(
            "{:<24} {:<12} {:<12} {:>12} {:>10} {:>6}  {}\n",
            s("name"),
            s("state"),
            s("version").get(..12).unwrap_or(""),
            n("events"),
            n("dropped"),
            n("faults"),
            s("source")
        );
        if let Some(error) = p["last_error"].as_str() {
            out += &format!("    last error: {error}\n");
        }
    }
    out
}
