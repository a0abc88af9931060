//! Optional TLS and basic auth for the public server, for nodes where local users must
//! not read what the probes see of other users' processes. Set in a web config file
//! (`server.web_config`), TOML with the keys of the Prometheus exporter toolkit's
//! web config:
//!
//! ```toml
//! [tls_server_config]
//! cert_file = "/etc/wasmtap/tls.crt"   # PEM, the chain
//! key_file = "/etc/wasmtap/tls.key"    # PEM, PKCS#8, PKCS#1 or SEC1
//!
//! [basic_auth_users]
//! prometheus = "$2y$10$…"              # bcrypt hash (htpasswd -nbB USER PASS)
//! ```
//!
//! With users, `/metrics` and `/status` answer 401 without valid credentials;
//! `/healthz` and `/readyz` stay open for liveness and readiness probes. A bcrypt check
//! costs milliseconds of CPU, so checks run one at a time off the async workers (a
//! request arriving during one is answered 503 at once, never queued), and credentials
//! that passed are remembered (a hash of them, a few at most) and pass without a check:
//! a flood of wrong passwords costs at most one core and never delays a scraper whose
//! credentials passed once.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    },
};

use crate::config::read_regular_file;

const MAX_FILE_BYTES: usize = 1 << 20;
/// Credentials remembered as proven.
const REMEMBERED: usize = 8;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfig {
    tls_server_config: Option<TlsFiles>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFiles {
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// What the web config asks of the server.
#[derive(Default)]
pub struct Web {
    pub tls: Option<TlsAcceptor>,
    pub auth: Option<BasicAuth>,
}

impl Web {
    /// Reads and checks the web config (none: plain HTTP, no auth).
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else { return Ok(Self::default()) };
        let what = || format!("web config {}", path.display());
        let text = String::from_utf8(read_regular_file(path, MAX_FILE_BYTES).with_context(what)?).map_err(|_| anyhow::anyhow!("{} is not UTF-8", what()))?;
        let config: WebConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", what(), crate::sinks::logs::sanitize(e.message().trim(), 200)))?;
        let tls = config.tls_server_config.map(|files| acceptor(&files)).transpose().with_context(what)?;
        let auth = (!config.basic_auth_users.is_empty()).then(|| BasicAuth::new(config.basic_auth_users)).transpose().with_context(what)?;
        Ok(Self { tls, auth })
    }
}

fn acceptor(files: &TlsFiles) -> anyhow::Result<TlsAcceptor> {
    let read = |path: &Path| read_regular_file(path, MAX_FILE_BYTES);
    let certs = CertificateDer::pem_slice_iter(&read(&files.cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("no PEM certificates in {}", files.cert_file.display()))?;
    if certs.is_empty() {
        bail!("no PEM certificates in {}", files.cert_file.display());
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key_file)?).with_context(|| format!("no PEM private key in {}", files.key_file.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not make a TLS identity")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Users and their bcrypt hashes.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    /// Checked for an unknown user, so that a wrong name takes as long as a wrong
    /// password (the answer's time does not tell which names exist).
    decoy: String,
    /// SHA-256 of `user:password` pairs that passed.
    proven: Mutex<VecDeque<[u8; 32]>>,
    checking: Arc<Semaphore>,
}

/// What a request's credentials get.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Denied,
    /// Another check is running: try again (bcrypt checks run one at a time).
    Busy,
}

/// Bcrypt costs accepted: below, hashes are cheap to crack; above, one check takes
/// seconds to hours.
const COSTS: std::ops::RangeInclusive<u32> = 4..=14;

impl BasicAuth {
    fn new(users: BTreeMap<String, String>) -> anyhow::Result<Self> {
        for (user, hash) in &users {
            let cost = hash.parse::<bcrypt::HashParts>().map(|h| h.get_cost()).ok();
            if user.contains(':') || !cost.is_some_and(|c| COSTS.contains(&c)) {
                bail!("basic_auth_users: {user:?} needs a name without `:` and a bcrypt hash of cost 4 to 14 (htpasswd -nbB -C 10 USER PASSWORD)");
            }
        }
        let cost = users.values().filter_map(|h| h.parse::<bcrypt::HashParts>().ok()).map(|h| h.get_cost()).max().unwrap_or(4);
        let decoy = bcrypt::hash("wasmtap decoy", cost).context("making the decoy hash")?;
        Ok(Self { users, decoy, proven: Mutex::default(), checking: Arc::new(Semaphore::new(1)) })
    }

    /// What an `Authorization` header value gets: credentials proven before pass at
    /// once; others wait for no one (one check at a time, the rest are told to retry).
    pub async fn check(self: &Arc<Self>, header: Option<&[u8]>) -> Verdict {
        let Some(credentials) = header.and_then(|h| h.strip_prefix(b"Basic ")).and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok()) else {
            return Verdict::Denied;
        };
        let Some((user, password)) = std::str::from_utf8(&credentials).ok().and_then(|c| c.split_once(':')) else { return Verdict::Denied };
        let digest: [u8; 32] = Sha256::digest(&credentials).into();
        if self.proven.lock().expect("proven").contains(&digest) {
            return Verdict::Allowed;
        }
        let Ok(_turn) = self.checking.clone().try_acquire_owned() else { return Verdict::Busy };
        let (known, hash) = match self.users.get(user) {
            Some(hash) => (true, hash.clone()),
            None => (false, self.decoy.clone()),
        };
        let password = password.to_owned();
        let valid = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false)).await.unwrap_or(false);
        if !(known && valid) {
            return Verdict::Denied;
        }
        let mut proven = self.proven.lock().expect("proven");
        if proven.len() == REMEMBERED {
            proven.pop_front();
        }
        proven.push_back(digest);
        Verdict::Allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_known_user_with_the_right_password_passes() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let auth = Arc::new(BasicAuth::new([("prom".to_owned(), hash)].into()).unwrap());
        let header = |c: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(c));
        assert_eq!(auth.check(Some(header("prom:s3cret").as_bytes())).await, Verdict::Allowed);
        {
            let _busy = auth.checking.clone().try_acquire_owned().unwrap();
            assert_eq!(auth.check(Some(header("prom:s3cret").as_bytes())).await, Verdict::Allowed, "remembered");
            assert_eq!(auth.check(Some(header("prom:nope").as_bytes())).await, Verdict::Busy, "no queue behind a check");
        }
        for wrong in ["prom:nope", "other:s3cret", "prom", ""] {
            assert_eq!(auth.check(Some(header(wrong).as_bytes())).await, Verdict::Denied, "{wrong}");
        }
        assert_eq!(auth.check(None).await, Verdict::Denied);
        assert!(BasicAuth::new([("prom".to_owned(), "plain".to_owned())].into()).is_err(), "a hash, not a password");
        let slow = bcrypt::hash("x", 4).unwrap().replacen("$04$", "$20$", 1);
        assert!(BasicAuth::new([("prom".to_owned(), slow)].into()).is_err(), "a cost that would take minutes per check");
    }
}
