//! Harness for the end-to-end tests: run the real daemon, run workloads, scrape.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub mod postgres;

/// The hostile test plugin (tests/hostile-plugin, built by build.rs).
pub const HOSTILE_WASM: &str = env!("HOSTILE_WASM");
/// syscall-latency's second build (other buckets, a `build` label), built by build.rs.
pub const SYSCALL_LATENCY_VARIANT_WASM: &str = env!("SYSCALL_LATENCY_VARIANT_WASM");

/// Returns false (after saying so loudly) when the test cannot run here; under CI a
/// missing privilege fails the test instead.
pub fn privileged_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let msg = format!("{test}: needs root to load eBPF programs (run `./dev test` as root)");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}; CI=true, so this is a failure, not a skip");
    }
    eprintln!("\n!!! SKIPPED {msg}\n");
    false
}

/// The build's target directory (`target/<profile>/`), from this binary's path (a test
/// in `target/<profile>/deps/`, or a bench driver in `target/<profile>/`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("binary in a directory");
    if dir.ends_with("deps") { dir.parent().expect("target/<profile>").to_path_buf() } else { dir.to_path_buf() }
}

/// Path of a binary built in this workspace (`wasmtap`, `wt-workload`, ...).
pub fn built(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(path.is_file(), "{} is missing: build it first (`./dev test` does)", path.display());
    path
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How to start the daemon (see [`Daemon::launch`]).
pub struct Launch<'a> {
    /// The config file's text (None: the embedded default).
    pub config: Option<&'a str>,
    /// The `/readyz` status to wait for.
    pub ready: u16,
    /// Run as this user (and group of the same number), from a copy of the binary.
    pub uid: Option<u32>,
    /// More `wasmtap run` arguments.
    pub args: &'a [&'a str],
    /// A command the daemon is run under (`prlimit --nofile=…`, `sh -c …`).
    pub wrapper: &'a [&'a str],
    /// File capabilities for the copy run as `uid` (`setcap` syntax).
    pub file_caps: Option<&'a str>,
    pub env: &'a [(&'a str, &'a str)],
    /// How to ask `/readyz` (default: plain HTTP): `(status, body)` or None.
    pub ready_probe: Option<&'a dyn Fn(SocketAddr) -> Option<(u16, String)>>,
}

impl Default for Launch<'_> {
    fn default() -> Self {
        Self { config: None, ready: 200, uid: None, args: &[], wrapper: &[], file_caps: None, env: &[], ready_probe: None }
    }
}

/// A running `wasmtap run`, killed (SIGKILL) if the test did not stop it.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Daemon {
    /// Starts the daemon with `config` (None: the embedded default) and waits until it
    /// reports ready.
    pub fn start(config: Option<&str>) -> Self {
        Self::start_until(config, 200)
    }

    /// Starts the daemon and waits until `/readyz` answers with `ready` (e.g. 503 for
    /// a daemon whose probe could not attach).
    pub fn start_until(config: Option<&str>, ready: u16) -> Self {
        Self::spawn(config, ready, None)
    }

    /// Starts the daemon, optionally as user `uid` (to test it without privileges).
    pub fn spawn(config: Option<&str>, ready: u16, uid: Option<u32>) -> Self {
        Self::spawn_with_args(config, ready, uid, &[])
    }

    /// Starts the daemon with extra `wasmtap run` arguments.
    pub fn spawn_with_args(config: Option<&str>, ready: u16, uid: Option<u32>, args: &[&str]) -> Self {
        Self::launch(Launch { config, ready, uid, args, ..Launch::default() })
    }

    /// Starts the daemon as `launch` says.
    pub fn launch(launch: Launch) -> Self {
        let Launch { config, ready, uid, args, wrapper, file_caps, env, ready_probe } = launch;
        let dir = TempDir::new();
        let addr = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
        let mut binary = built("wasmtap");
        if uid.is_some() {
            // The checkout may sit below a directory only root can enter (mktemp -d);
            // run a copy from this world-readable temp dir instead.
            use std::os::unix::fs::PermissionsExt as _;
            let copy = dir.0.join("wasmtap");
            std::fs::copy(&binary, &copy).expect("copy wasmtap");
            for path in [&dir.0, &copy] {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            }
            if let Some(caps) = file_caps {
                let status = Command::new("setcap").arg(caps).arg(&copy).status().expect("setcap (libcap2-bin) is installed");
                assert!(status.success(), "setcap {caps} failed");
            }
            binary = copy;
        }
        let mut cmd = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut cmd = Command::new(program);
                cmd.args(wrapper_args).arg(binary);
                cmd
            }
            None => Command::new(binary),
        };
        cmd.args(["run", "--listen", &addr.to_string()]).arg("--admin-socket").arg(dir.0.join("admin/admin.sock")).args(args);
        cmd.envs(env.iter().copied());
        if let Some(uid) = uid {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, uid);
        }
        if let Some(config) = config {
            let path = dir.0.join("wasmtap.toml");
            std::fs::write(&path, config).expect("write config");
            cmd.arg("--config").arg(path);
        }
        let log = std::fs::File::create(dir.0.join("daemon.log")).expect("log file");
        let child = cmd.stdout(log.try_clone().expect("log")).stderr(log).spawn().expect("spawn wasmtap");
        let mut daemon = Self { child, addr, _dir: dir };
        wait_for(Duration::from_secs(120), "the daemon's /readyz", || {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("wasmtap exited early ({status}):\n{}", daemon.log());
            }
            let answer = match ready_probe {
                Some(probe) => probe(daemon.addr),
                None => daemon.get("/readyz", None),
            };
            answer.filter(|(code, body)| *code == ready && !body.contains("starting"))
        });
        daemon
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self._dir.0.join("admin/admin.sock")
    }

    /// The config file the daemon was started with (rewrite it, then [`Daemon::hup`]).
    pub fn config_path(&self) -> PathBuf {
        self._dir.0.join("wasmtap.toml")
    }

    /// Sends SIGHUP.
    pub fn hup(&self) {
        use nix::{sys::signal, unistd::Pid};
        signal::kill(Pid::from_raw(self.child.id() as i32), signal::Signal::SIGHUP).expect("SIGHUP");
    }

    /// Runs `wasmtap plugin --socket <admin> ARGS`: (success, stdout, stderr).
    pub fn plugin_cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(built("wasmtap")).arg("plugin").arg("--socket").arg(self.admin_socket()).args(args).output().expect("run wasmtap plugin");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Records the syscall probe has read so far.
    pub fn probe_records(&self) -> f64 {
        sample(&self.metrics(), "wasmtap_probe_records_total", &[("probe", "syscall")]).unwrap_or(0.0)
    }

    /// Resident memory of the daemon, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("daemon status");
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).expect("VmRSS") * 1024
    }

    /// The `/status` entry of plugin `name`.
    pub fn plugin_status(&self, name: &str) -> serde_json::Value {
        let status = self.status();
        status["plugins"].as_array().expect("plugins").iter().find(|p| p["name"] == name).cloned().unwrap_or_else(|| panic!("no plugin {name} in {status}"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.0.join("daemon.log")).unwrap_or_default()
    }

    /// HTTP GET; returns (status, body), or None when the daemon does not answer.
    pub fn get(&self, path: &str, accept: Option<&str>) -> Option<(u16, String)> {
        http_get(self.addr, path, accept)
    }

    pub fn metrics(&self) -> String {
        let (code, body) = self.get("/metrics", None).expect("scrape /metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/status", None).expect("GET /status").1).expect("status JSON")
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) {
        use nix::{sys::signal, unistd::Pid};
        signal::kill(Pid::from_raw(self.child.id() as i32), signal::Signal::SIGTERM).expect("SIGTERM");
        let status = wait_for(Duration::from_secs(20), "the daemon to exit", || self.child.try_wait().ok().flatten());
        assert!(status.success(), "wasmtap exited with {status}:\n{}", self.log());
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `name{labels}` in Prometheus text, if present.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        let got = label_pairs(rest.strip_suffix('}').unwrap_or(rest));
        (metric == name && got.len() == want.len() && want.iter().all(|w| got.contains(w))).then(|| value.parse().ok()).flatten()
    })
}

/// `k="v"` pairs of a sample's labels, split at the commas outside quoted values.
fn label_pairs(labels: &str) -> Vec<String> {
    let (mut pairs, mut pair, mut quoted, mut escaped) = (Vec::new(), String::new(), false, false);
    for c in labels.chars() {
        match c {
            ',' if !quoted => pairs.push(std::mem::take(&mut pair)),
            '"' if !escaped => {
                quoted = !quoted;
                pair.push(c);
            }
            _ => pair.push(c),
        }
        escaped = quoted && c == '\\' && !escaped;
    }
    pairs.push(pair);
    pairs.retain(|p| !p.is_empty());
    pairs
}

/// The sum of every sample `name{…}` whose labels include `labels` (others free).
pub fn sum_samples(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let got: Vec<&str> = rest.trim_end_matches('}').split(',').collect();
            (metric == name && want.iter().all(|w| got.contains(&w.as_str()))).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A unique 15-byte task name for one test's workload.
pub fn unique_comm(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let mut comm = format!("wt{tag}{:x}{nanos:x}", std::process::id());
    comm.truncate(15);
    comm
}

/// promtool's verdict on a scrape: None when it finds nothing wrong.
pub fn promtool_problems(text: &str) -> Option<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (./dev setup installs it)");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    let ok = out.status.success() && out.stdout.is_empty() && out.stderr.is_empty();
    (!ok).then(|| format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Spawns the workload helper.
pub fn workload(comm: &str, getppid: u64, openat: u64, wait_stdin: bool) -> Child {
    let mut cmd = Command::new(built("wt-workload"));
    cmd.args([comm, &getppid.to_string(), &openat.to_string()]);
    if wait_stdin {
        cmd.arg("--wait-stdin").stdin(Stdio::piped());
    }
    cmd.spawn().expect("spawn wt-workload")
}

/// Runs the workload to completion.
pub fn run_workload(comm: &str, getppid: u64, openat: u64) {
    let status = workload(comm, getppid, openat, false).wait().expect("wait wt-workload");
    assert!(status.success(), "wt-workload failed: {status}");
}

/// One admin API call over the daemon's Unix socket: (status, JSON answer).
pub fn admin_call(socket: &Path, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect to the admin socket");
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: wasmtap\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the answer");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP answer");
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { unchunk(body) } else { body.to_owned() };
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status");
    (status, serde_json::from_str(&body).expect("a JSON answer"))
}

/// Minimal HTTP/1.1 GET against a loopback server; (status, body), or None when it
/// does not answer.
pub fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { unchunk(body) } else { body.to_owned() };
    Some((head.split_whitespace().nth(1)?.parse().ok()?, body))
}

fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// A real Prometheus server (Debian's `prometheus`) scraping `target` every second.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    pub fn start(target: SocketAddr) -> Self {
        Self::start_with(target, "")
    }

    /// Starts Prometheus with more keys (YAML, indented 4) in its scrape config.
    pub fn start_with(target: SocketAddr, scrape: &str) -> Self {
        let dir = TempDir::new();
        let addr = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: wasmtap\n{scrape}    static_configs:\n      - targets: ['{target}']\n"),
        )
        .expect("prometheus config");
        let log = std::fs::File::create(dir.0.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("prometheus is installed (./dev setup installs it)");
        let prometheus = Self { child, addr, _dir: dir };
        wait_for(Duration::from_secs(60), "Prometheus to be ready", || http_get(prometheus.addr, "/-/ready", None).filter(|(code, _)| *code == 200));
        prometheus
    }

    /// Waits until Prometheus has scraped the workload `comm` (`getppid` calls, failing
    /// `openat` calls) from syscall-latency, and asserts the counts are exact and the
    /// target is up.
    pub fn assert_exact_workload(&self, comm: &str, getppid: u64, openat: u64) {
        let count = format!("syscall_latency_seconds_count{{comm=\"{comm}\",syscall=\"getppid\"}}");
        let got = wait_for(Duration::from_secs(60), "Prometheus to scrape the workload", || self.query(&count).filter(|v| *v >= getppid as f64));
        assert_eq!(got, getppid as f64);
        let errors = format!("syscall_latency_errors_total{{comm=\"{comm}\",syscall=\"openat\",errno=\"ENOENT\"}}");
        assert_eq!(self.query(&errors), Some(openat as f64));
        assert_eq!(self.query("up{job=\"wasmtap\"}"), Some(1.0));
    }

    /// The value of an instant query with exactly one result, if it has one.
    pub fn query(&self, promql: &str) -> Option<f64> {
        let encoded: String =
            promql.bytes().map(|b| if b.is_ascii_alphanumeric() || b"_.-".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect();
        let (code, body) = http_get(self.addr, &format!("/api/v1/query?query={encoded}"), None)?;
        if code != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = json["data"]["result"].as_array()?;
        (result.len() == 1).then(|| result[0]["value"][1].as_str()?.parse().ok()).flatten()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let path = std::env::temp_dir().join(format!("wasmtap-test-{}-{nanos}", std::process::id()));
        // 0700, like a directory the daemon trusts (e.g. as its cache).
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700).create(&path).expect("temp dir");
        Self(path)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A cgroup v2 directory made by the test, removed on drop.
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    pub fn new(tag: &str) -> Self {
        let mount = std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
            })
            .expect("a cgroup2 mount");
        let dir = mount.join(format!("wasmtap-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir cgroup");
        Self(dir)
    }

    /// A cgroup below this one.
    pub fn child(&self, name: &str) -> Self {
        let dir = self.0.join(name);
        std::fs::create_dir(&dir).expect("mkdir child cgroup");
        Self(dir)
    }

    /// Its cgroup id (the directory's inode number), as records carry it.
    pub fn id(&self) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&self.0).expect("stat cgroup"))
    }

    /// Its path below the cgroup v2 mount, as enrichment reports it.
    pub fn path(&self) -> String {
        let mount = self.0.ancestors().find(|d| d.join("cgroup.controllers").is_file() && !d.parent().is_some_and(|p| p.join("cgroup.controllers").is_file()));
        format!("/{}", self.0.strip_prefix(mount.expect("under a cgroup2 mount")).unwrap().display())
    }

    /// Runs the workload inside this cgroup.
    pub fn run(&self, comm: &str, getppid: u64) {
        let mut child = workload(comm, getppid, 0, true);
        std::fs::write(self.0.join("cgroup.procs"), child.id().to_string()).expect("move into cgroup");
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        assert!(child.wait().unwrap().success());
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its workloads have exited; the kernel may take a moment to let go of them.
        let _ = wait_for_removal(&self.0);
    }
}

pub fn wait_for_removal(dir: &Path) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(16) && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            other => return other,
        }
    }
}
