//! The daemon as a node agent, tried as an operator and a local user would: planted
//! compile artifacts, capabilities, idle connections, cardinality floods, malformed
//! configs, the systemd unit.

use std::{
    fs,
    io::Write as _,
    net::TcpStream,
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use wasmtap_tests::{
    Daemon, Launch, SYSCALL_LATENCY_VARIANT_WASM, TempDir, built, privileged_or_skip, run_workload, sample, sum_samples, unique_comm, wait_for,
};

const NOBODY: u32 = 65534;

/// The flood of process names fills every daemon's syscall-latency families (each
/// daemon traces the whole node): tests here that count a workload exactly hold this
/// for reading, the flood for writing.
static FLOOD: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn exact_counts() -> std::sync::RwLockReadGuard<'static, ()> {
    FLOOD.read().unwrap_or_else(|e| e.into_inner())
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).expect("chown");
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn with_cache(cache: &Path) -> String {
    format!("cache_dir = \"{}\"\n[[plugin]]\nname = \"syscall-latency\"\nbundled = \"syscall-latency\"\n", cache.display())
}

/// Whether the daemon runs the bundled build (no `build` label) and counts a workload
/// exactly, and whether the planted build's marker (its `build` label) shows.
fn runs_the_real_build(daemon: &Daemon) -> bool {
    let comm = unique_comm("pl");
    run_workload(&comm, 300, 0);
    let m = wait_for(Duration::from_secs(20), "the workload counted", || {
        let m = daemon.metrics();
        (sum_samples(&m, "syscall_latency_seconds_count", &[("comm", &comm), ("syscall", "getppid")]) >= 300.0).then_some(m)
    });
    let planted = m.lines().any(|l| l.starts_with("syscall_latency_seconds") && l.contains("build=\"variant\""));
    if !planted {
        assert_eq!(sample(&m, "syscall_latency_seconds_count", &[("comm", &comm), ("syscall", "getppid")]), Some(300.0));
    }
    !planted
}

/// Copies `artifact` to `dir/name`, owned by `uid` with `mode`.
fn plant(dir: &Path, name: &str, artifact: &[u8], uid: u32, mode: u32) {
    let path = dir.join(name);
    fs::write(&path, artifact).expect("plant");
    chown(&path, uid);
    chmod(&path, mode);
}

#[test]
fn planted_artifacts_are_never_run() {
    if !privileged_or_skip("planted_artifacts_are_never_run") {
        return;
    }
    let _counting = exact_counts();
    // What would be planted: the variant build, precompiled (its `build` label is the
    // marker that it ran), under the file name of the bundled build's artifact.
    let compiled = Command::new(built("wasmtap"))
        .args(["compile-plugin", "4294967296"])
        .stdin(fs::File::open(SYSCALL_LATENCY_VARIANT_WASM).expect("variant"))
        .output()
        .expect("compile-plugin");
    assert!(compiled.status.success() && !compiled.stdout.is_empty(), "{}", String::from_utf8_lossy(&compiled.stderr));
    let planted = compiled.stdout;
    let root = TempDir::new();
    let trusted = root.0.join("trusted");
    let name = {
        let mut daemon = Daemon::start(Some(&with_cache(&trusted)));
        daemon.terminate();
        let names: Vec<String> = fs::read_dir(&trusted).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let meta = fs::metadata(trusted.join(&names[0])).unwrap();
        assert_eq!((meta.mode() & 0o777, fs::metadata(&trusted).unwrap().mode() & 0o777), (0o600, 0o700));
        names[0].clone()
    };

    // Control: the daemon does run what its own trusted cache holds, so the marker
    // would show if a planted file ran.
    plant(&trusted, &name, &planted, 0, 0o600);
    let daemon = Daemon::start(Some(&with_cache(&trusted)));
    assert!(!runs_the_real_build(&daemon), "control: a trusted artifact is loaded");
    drop(daemon);

    // 1. cache_dir inside a directory a user owns: that user swapped in their own
    //    cache directory with the planted artifact.
    let user_dir = root.0.join("user");
    fs::create_dir(&user_dir).unwrap();
    chmod(&root.0, 0o755);
    chown(&user_dir, NOBODY);
    let cache = user_dir.join("cache");
    fs::create_dir(&cache).unwrap();
    chown(&cache, NOBODY);
    plant(&cache, &name, &planted, NOBODY, 0o644);
    let daemon = Daemon::start(Some(&with_cache(&cache)));
    assert!(runs_the_real_build(&daemon), "setup 1 ran the planted artifact:\n{}", daemon.log());
    assert!(daemon.log().contains("it is owned by uid 65534"), "{}", daemon.log());
    drop(daemon);

    // 2. Started under umask 0: what it creates is still 0700/0600; and a cache left
    //    world-writable (by an old version under umask 0), where a user replaced the
    //    artifact, is not used.
    let fresh = root.0.join("fresh");
    let sh = ["sh", "-c", "umask 0; exec \"$0\" \"$@\""];
    let mut daemon = Daemon::launch(Launch { config: Some(&with_cache(&fresh)), wrapper: &sh, ..Launch::default() });
    daemon.terminate();
    assert_eq!(fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
    assert_eq!(fs::metadata(fresh.join(&name)).unwrap().mode() & 0o777, 0o600);
    let loose = root.0.join("loose");
    fs::create_dir(&loose).unwrap();
    chmod(&loose, 0o777);
    plant(&loose, &name, &planted, NOBODY, 0o666);
    let daemon = Daemon::launch(Launch { config: Some(&with_cache(&loose)), wrapper: &sh, ..Launch::default() });
    assert!(runs_the_real_build(&daemon), "setup 2 ran the planted artifact:\n{}", daemon.log());
    assert!(daemon.log().contains("mode 777"), "{}", daemon.log());
    drop(daemon);

    // 3. The `setcap cap_bpf,cap_perfmon+ep` deployment, run by a user whose
    //    XDG_CACHE_HOME holds the planted artifact, and whose config names it too.
    let home = root.0.join("home");
    let xdg = home.join("wasmtap");
    fs::create_dir_all(&xdg).unwrap();
    for dir in [&home, &xdg] {
        chown(dir, NOBODY);
        chmod(dir, 0o700);
    }
    plant(&xdg, &name, &planted, NOBODY, 0o600);
    let config = with_cache(&xdg);
    let xdg_env = home.display().to_string();
    let daemon = Daemon::launch(Launch {
        config: Some(&config),
        uid: Some(NOBODY),
        file_caps: Some("cap_bpf,cap_perfmon+ep"),
        env: &[("XDG_CACHE_HOME", &xdg_env), ("HOME", &xdg_env)],
        ..Launch::default()
    });
    assert!(runs_the_real_build(&daemon), "setup 3 ran the planted artifact:\n{}", daemon.log());
    assert!(daemon.log().contains("could carry planted code"), "{}", daemon.log());
}

/// `CapPrm`, `CapEff`, `CapBnd`, `CapInh`, `CapAmb` and `NoNewPrivs` of a task.
fn privileges(status: &Path) -> Vec<(String, String)> {
    let text = fs::read_to_string(status).expect("task status");
    text.lines()
        .filter(|l| l.starts_with("Cap") || l.starts_with("NoNewPrivs"))
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.to_owned(), v.trim().to_owned())))
        .collect()
}

#[test]
fn every_thread_keeps_only_the_kept_capabilities() {
    if !privileged_or_skip("every_thread_keeps_only_the_kept_capabilities") {
        return;
    }
    let _counting = exact_counts();
    let kept = format!("{:016x}", (1u64 << 38) | (1 << 39)); // perfmon, bpf
    let want = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    let expected = vec![
        want("CapInh", "0000000000000000"),
        want("CapPrm", &kept),
        want("CapEff", &kept),
        want("CapBnd", &kept),
        want("CapAmb", "0000000000000000"),
        want("NoNewPrivs", "1"),
    ];
    let daemon = Daemon::start(None);
    // The probes work with what is kept, and so does attaching a kind at run time.
    let comm = unique_comm("cap");
    run_workload(&comm, 100, 0);
    wait_for(Duration::from_secs(20), "the workload counted", || {
        (sample(&daemon.metrics(), "syscall_latency_seconds_count", &[("comm", &comm), ("syscall", "getppid")]) == Some(100.0)).then_some(())
    });
    let (ok, out, err) = daemon.plugin_cli(&["unload", "process-churn"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = daemon.plugin_cli(&["load", "churn2", "--bundled", "process-churn"]);
    assert!(ok, "attaching the process kind again with the kept capabilities: {out}{err}\n{}", daemon.log());
    let tasks: Vec<PathBuf> = fs::read_dir(format!("/proc/{}/task", daemon.pid())).unwrap().map(|e| e.unwrap().path().join("status")).collect();
    assert!(tasks.len() > 3, "threads: {tasks:?}");
    for task in tasks {
        assert_eq!(privileges(&task), expected, "{}", task.display());
    }
    // Another set on the command line.
    let daemon = Daemon::spawn_with_args(None, 200, None, &["--capabilities-keep", "bpf,perfmon,sys_ptrace"]);
    let status = privileges(Path::new(&format!("/proc/{}/status", daemon.pid())));
    assert!(status.contains(&want("CapEff", &format!("{:016x}", (1u64 << 38) | (1 << 39) | (1 << 19)))), "{status:?}");
}

#[test]
fn idle_connections_cannot_keep_a_scrape_out() {
    if !privileged_or_skip("idle_connections_cannot_keep_a_scrape_out") {
        return;
    }
    // This test holds 1 100 sockets itself.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let daemon = Daemon::launch(Launch { wrapper: &["prlimit", "--nofile=1024:1024", "--"], ..Launch::default() });
    let mut idle = Vec::new();
    for _ in 0..1_100 {
        let mut stream = TcpStream::connect(daemon.addr).expect("connect");
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").expect("half a request");
        idle.push(stream);
    }
    let started = Instant::now();
    let (code, body) = daemon.get("/metrics", None).expect("a scrape gets an answer");
    let took = started.elapsed();
    assert_eq!(code, 200);
    assert!(took < Duration::from_secs(1), "the scrape took {took:?}");
    assert!(sample(&body, "wasmtap_http_refused_total", &[("reason", "connection_evicted")]).unwrap_or(0.0) >= 1.0, "evictions are counted");
    // Only GET and HEAD.
    let mut stream = TcpStream::connect(daemon.addr).unwrap();
    stream.write_all(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    drop(idle);
    let log = daemon.log();
    assert!(log.len() < 1 << 20, "the log grew to {} bytes", log.len());
    assert!(!log.contains('\x1b'), "no colours in a log file");
}

#[test]
fn a_flood_of_process_names_does_not_hide_a_later_process() {
    if !privileged_or_skip("a_flood_of_process_names_does_not_hide_a_later_process") {
        return;
    }
    let _flood = FLOOD.write().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start(None);
    // 20 000 processes with distinct names, as an unprivileged user: twice the series
    // syscall-latency may hold.
    let status = Command::new(built("wt-workload")).args(["names", "wtflood", "20000"]).uid(NOBODY).gid(NOBODY).status().expect("flood");
    assert!(status.success());
    let other = [("comm", "__other__"), ("syscall", "__other__")];
    let refused =
        |m: &str| sample(m, "wasmtap_plugin_series_refused_total", &[("plugin", "syscall-latency"), ("family", "syscall_latency_seconds")]).unwrap_or(0.0);
    let before = wait_for(Duration::from_secs(30), "the family to fill up", || {
        let m = daemon.metrics();
        (refused(&m) >= 1.0).then_some(m)
    });
    let series = sample(&before, "wasmtap_plugin_series", &[("plugin", "syscall-latency")]).unwrap();
    assert!(series <= 10_000.0, "{series} series");
    assert!(daemon.log().contains("metric family full"), "said in the log");
    // A process started afterwards is still counted: in the overflow series.
    let comm = unique_comm("late");
    let calls = 5_000;
    let status = Command::new(built("wt-workload")).args([comm.as_str(), &calls.to_string(), "0"]).uid(NOBODY).gid(NOBODY).status().unwrap();
    assert!(status.success());
    let base = sample(&before, "syscall_latency_seconds_count", &other).unwrap_or(0.0);
    // Its own series if the family's last bytes fit it, else the overflow series (and
    // the refusal is counted).
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_for(Duration::from_secs(21), "the late process counted", || {
        let m = daemon.metrics();
        if Instant::now() > deadline {
            let lines: Vec<&str> = m
                .lines()
                .filter(|l| {
                    l.contains(&comm) || l.contains("__other__\"") && l.contains("_count") || l.contains("refused") || l.starts_with("wasmtap_plugin_series")
                })
                .collect();
            panic!("the late process {comm} is not counted (overflow series was {base}):\n{}", lines.join("\n"));
        }
        let own = sample(&m, "syscall_latency_seconds_count", &[("comm", &comm), ("syscall", "getppid")]);
        let overflow = sample(&m, "syscall_latency_seconds_count", &other).unwrap_or(0.0) - base;
        (own == Some(calls as f64) || (own.is_none() && overflow >= calls as f64 && refused(&m) > refused(&before))).then_some(())
    });
}

/// One malformed config: its text (or a path to use as the config), and what its
/// one-line error must say.
struct Bad {
    name: String,
    text: String,
    says: &'static str,
    /// Also refused by `wasmtap run` (plugin sources are checked only by
    /// `check-config`; a daemon reports a broken plugin and runs on).
    fatal: bool,
}

fn bad(name: impl Into<String>, text: impl Into<String>, says: &'static str) -> Bad {
    Bad { name: name.into(), text: text.into(), says, fatal: true }
}

fn malformed_configs(dir: &Path) -> Vec<Bad> {
    let mut cases = Vec::new();
    let limits = [
        "memory_bytes",
        "call_deadline_ms",
        "queue_batches",
        "metric_bytes",
        "series",
        "families",
        "buckets",
        "labels",
        "label_value_bytes",
        "help_bytes",
        "log_bytes_per_second",
        "subscriptions",
        "filter_entries",
        "component_bytes",
        "compile_timeout_ms",
        "compile_memory_bytes",
        "shutdown_ms",
        "max_faults",
        "fault_window_ms",
    ];
    for key in limits {
        // (A u32 limit is out of the type's range before it is out of ours.)
        let huge = if key == "max_faults" { "expected u32" } else { "must be within" };
        cases.push(bad(format!("{key} huge"), format!("[plugin_defaults]\n{key} = 4611686018427387904\n"), huge));
        cases.push(bad(format!("{key} negative"), format!("[plugin_defaults]\n{key} = -1\n"), "invalid value"));
        cases.push(bad(format!("{key} string"), format!("[[plugin]]\nname = \"p\"\nbundled = \"syscall-latency\"\n{key} = \"x\"\n"), "invalid type"));
    }
    for (key, value) in [("queue_batches", "1099511627776"), ("queue_batches", "1000000000"), ("memory_bytes", "0"), ("buckets", "100000")] {
        cases.push(bad(format!("{key} = {value}"), format!("[[plugin]]\nname = \"p\"\nbundled = \"syscall-latency\"\n{key} = {value}\n"), "must be within"));
    }
    for (key, value) in [
        ("drain_interval_ms", "0"),
        ("drain_interval_ms", "1000000000"),
        ("ring_buffer_bytes", "1000"),
        ("ring_buffer_bytes", "2147483648"),
        ("wakeup_percent", "0"),
        ("wakeup_percent", "101"),
    ] {
        cases.push(bad(format!("probes.{key} = {value}"), format!("[probes]\n{key} = {value}\n"), "probes."));
    }
    for (key, value) in
        [("max_connections", "0"), ("max_connections", "100000000"), ("max_requests", "0"), ("header_timeout_ms", "1"), ("connection_max_ms", "0")]
    {
        cases.push(bad(format!("server.{key} = {value}"), format!("[server]\n{key} = {value}\n"), "server."));
    }
    for (key, value) in
        [("memory_bytes", "1"), ("series", "0"), ("cpu_percent", "0"), ("cpu_period_ms", "100000000"), ("log_bytes_per_second", "4611686018427387904")]
    {
        cases.push(bad(
            format!("tenant quota.{key} = {value}"),
            format!("[[tenant]]\nname = \"t\"\ncgroup = \"t\"\nquota = {{ {key} = {value} }}\n"),
            "must be within",
        ));
    }
    let plugin = |name: &str, extra: &str| format!("[[plugin]]\nname = \"{name}\"\nbundled = \"syscall-latency\"\n{extra}\n");
    for (what, text, says) in [
        ("NUL in a name", plugin("a\\u0000b", ""), "is not allowed"),
        ("empty name", plugin("", ""), "is not allowed"),
        ("long name", plugin(&"n".repeat(65), ""), "is not allowed"),
        ("slash in a name", plugin("a/b", ""), "is not allowed"),
        ("namespace a-b", plugin("p", "namespace = \"a-b\""), "namespace \"a-b\" is invalid"),
        ("namespace 9x", plugin("p", "namespace = \"9x\""), "is invalid"),
        ("namespace wasmtap", plugin("p", "namespace = \"wasmtap\""), "reserved"),
        ("namespace wasmtap_x", plugin("p", "namespace = \"wasmtap_x\""), "reserved"),
        ("namespace ends in _", plugin("p", "namespace = \"p_\""), "is invalid"),
        ("plugin named wasmtap", plugin("wasmtap", ""), "reserved"),
        ("names that collapse", plugin("a-b", "") + &plugin("a_b", ""), "clashing metric namespaces"),
        ("names that collapse with a dot", plugin("a.b", "") + &plugin("a_b", ""), "clashing metric namespaces"),
        ("a namespace that prefixes another", plugin("a", "") + &plugin("a_b", ""), "clashing metric namespaces"),
        ("an explicit namespace clashing with a name", plugin("a", "") + &plugin("b", "namespace = \"a\""), "clashing metric namespaces"),
        ("plugin and tenant namespaces", "[[tenant]]\nname = \"t\"\ncgroup = \"t\"\n".to_owned() + &plugin("t", ""), "clashing metric namespaces"),
        ("twice the same name", plugin("a", "") + &plugin("a", ""), "used twice"),
        ("unknown tenant", plugin("a", "tenant = \"nope\""), "no [[tenant]]"),
        ("tenant twice", "[[tenant]]\nname = \"t\"\ncgroup = \"t\"\n[[tenant]]\nname = \"t\"\ncgroup = \"u\"\n".to_owned(), "used twice"),
        ("tenant cgroup escapes", "[[tenant]]\nname = \"t\"\ncgroup = \"../../etc\"\n".to_owned(), "may not contain"),
        ("bad tenant name", "[[tenant]]\nname = \"t t\"\ncgroup = \"t\"\n".to_owned(), "is not allowed"),
        ("both bundled and path", plugin("a", "path = \"/x.wasm\""), "exactly one of"),
        ("neither bundled nor path", "[[plugin]]\nname = \"a\"\n".to_owned(), "exactly one of"),
        ("unknown top-level key", "lisen = \"127.0.0.1:1\"\n".to_owned(), "unknown field `lisen`"),
        ("unknown probes key", "[probes]\nring = 1\n".to_owned(), "unknown field `ring`"),
        ("unknown server key", "[server]\nmax_conns = 1\n".to_owned(), "unknown field `max_conns`"),
        ("unknown plugin key", plugin("a", "memory_byte = 1"), "unknown field `memory_byte`"),
        ("unknown quota key", "[[tenant]]\nname = \"t\"\ncgroup = \"t\"\nquota = { cpu = 1 }\n".to_owned(), "unknown field `cpu`"),
        ("bad overflow policy", plugin("a", "series_overflow = \"drop\""), "unknown variant"),
        ("bad family overflow policy", plugin("a", "family_overflow = { seconds = \"x\" }"), "unknown variant"),
        ("unknown capability", "capabilities_keep = [\"bpff\"]\n".to_owned(), "unknown capability"),
        ("relative cache_dir", "cache_dir = \"cache\"\n".to_owned(), "absolute path"),
        ("long admin_socket", format!("admin_socket = \"/{}\"\n", "s".repeat(200)), "absolute path"),
        ("bad listen", "listen = \"localhost\"\n".to_owned(), "invalid socket address"),
        ("cache_max_bytes 0", "cache_max_bytes = 0\n".to_owned(), "must be within"),
        ("unclosed array", "listen = [1, 2\n".to_owned(), "line 1"),
        ("unclosed string", "listen = \"127.0.0.1:1\n".to_owned(), "line 1"),
        ("duplicate key", "listen = \"127.0.0.1:1\"\nlisten = \"127.0.0.1:2\"\n".to_owned(), "duplicate key"),
        ("not TOML", "{{{{\n".to_owned(), "line 1"),
        ("a bad value at the end of a 1 MB line", format!("listen = \"{}\" x\n", "a".repeat(1_000_000)), "line 1"),
        ("a 1 MB unknown key", format!("{} = 1\n", "k".repeat(1_000_000)), "unknown field"),
        ("too many plugins", (0..300).map(|i| plugin(&format!("p{i}"), "")).collect::<String>(), "at most 256 plugins"),
        ("a 1 MB string where a number goes", format!("[probes]\nwakeup_percent = \"{}\"\n", "9".repeat(1_000_000)), "invalid type"),
    ] {
        cases.push(bad(what, text, says));
    }
    // Files that are no config, and plugin files that are no component.
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let text_file = dir.join("text.wasm");
    fs::write(&text_file, "hello").unwrap();
    let core_module = dir.join("core.wasm");
    fs::write(&core_module, b"\0asm\x01\0\0\0").unwrap();
    fs::write(dir.join("big.toml"), "# comment\n".repeat(200_000)).unwrap();
    fs::write(dir.join("latin1.toml"), b"listen = \"\xe9\"\n").unwrap();
    for (what, path, says) in [
        ("config is a FIFO", fifo.display().to_string(), "not a regular file"),
        ("config is /dev/zero", "/dev/zero".into(), "not a regular file"),
        ("config is a directory", dir.display().to_string(), "not a regular file"),
        ("config is missing", dir.join("missing.toml").display().to_string(), "cannot read"),
        ("config is 2 MB", dir.join("big.toml").display().to_string(), "larger than"),
        ("config is not UTF-8", dir.join("latin1.toml").display().to_string(), "not UTF-8"),
    ] {
        cases.push(Bad { name: what.into(), text: format!("@{path}"), says, fatal: true });
    }
    let path_plugin = |path: &Path, extra: &str| format!("[[plugin]]\nname = \"p\"\npath = \"{}\"\n{extra}\n", path.display());
    for (what, text, says) in [
        ("plugin path is a FIFO", path_plugin(&fifo, ""), "not a regular file"),
        ("plugin path is /dev/zero", path_plugin(Path::new("/dev/zero"), ""), "not a regular file"),
        ("plugin path is a directory", path_plugin(dir, ""), "not a regular file"),
        ("plugin path is missing", path_plugin(&dir.join("missing.wasm"), ""), "cannot read"),
        ("plugin is a text file", path_plugin(&text_file, ""), "not a WebAssembly component"),
        ("plugin is a core module", path_plugin(&core_module, ""), "not a WebAssembly component"),
        ("plugin over component_bytes", path_plugin(Path::new(SYSCALL_LATENCY_VARIANT_WASM), "component_bytes = 1000"), "component_bytes"),
        ("unknown bundled plugin", plugin("p", "").replace("syscall-latency\"", "nope\""), "no bundled plugin"),
    ] {
        cases.push(Bad { name: what.into(), text, says, fatal: false });
    }
    cases
}

/// Runs `wasmtap ARGS` under a 256 MiB address-space limit; (exit code, stdout,
/// stderr, time taken). Killed after 5 s.
fn bounded_run(args: &[&str]) -> (Option<i32>, String, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new("prlimit")
        .arg("--as=268435456")
        .arg("--")
        .arg(built("wasmtap"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("prlimit");
    let status = wait_for(Duration::from_secs(5), "wasmtap to exit", || child.try_wait().unwrap());
    let took = started.elapsed();
    let out = child.wait_with_output().unwrap();
    (status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned(), took)
}

#[test]
fn malformed_configs_are_one_clear_error_each() {
    let dir = TempDir::new();
    let cases = malformed_configs(&dir.0);
    assert!(cases.len() >= 100, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let path = match case.text.strip_prefix('@') {
            Some(path) => PathBuf::from(path),
            None => {
                let path = dir.0.join(format!("case-{i}.toml"));
                fs::write(&path, &case.text).unwrap();
                path
            }
        };
        let path = path.display().to_string();
        let mut runs = vec![vec!["check-config", path.as_str()]];
        if case.fatal {
            runs.push(vec!["run", "--config", path.as_str(), "--listen", "127.0.0.1:0", "--admin-socket", "/nonexistent/wasmtap/admin.sock"]);
        }
        for args in runs {
            let (code, stdout, stderr, took) = bounded_run(&args);
            let lines: Vec<&str> = stderr.lines().collect();
            let one_clear_line = lines.len() == 1 && lines[0].starts_with("error: ") && lines[0].len() < 600 && lines[0].contains(case.says);
            if code != Some(1) || !stdout.is_empty() || !one_clear_line || took > Duration::from_secs(2) || stderr.contains("panicked") {
                failures.push(format!(
                    "{} ({}): exit {code:?} in {took:?}\nstdout: {stdout}\nstderr: {}",
                    case.name,
                    args[0],
                    &stderr[..stderr.len().min(800)]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    // The embedded default and the shipped unit's check pass.
    let default = dir.0.join("default.toml");
    fs::write(&default, Command::new(built("wasmtap")).arg("default-config").output().unwrap().stdout).unwrap();
    let (code, stdout, stderr, _) = bounded_run(&["check-config", &default.display().to_string()]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
}

#[test]
fn broken_plugin_files_and_a_broken_reload_leave_the_daemon_running() {
    if !privileged_or_skip("broken_plugin_files_and_a_broken_reload_leave_the_daemon_running") {
        return;
    }
    let dir = TempDir::new();
    let fifo = dir.0.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let mut config = "[[plugin]]\nname = \"syscall-latency\"\nbundled = \"syscall-latency\"\n".to_owned();
    for (name, path) in [("fifo", fifo.as_path()), ("zero", Path::new("/dev/zero")), ("dir", dir.0.as_path())] {
        config += &format!("[[plugin]]\nname = \"{name}\"\npath = \"{}\"\n", path.display());
    }
    let started = Instant::now();
    let daemon = Daemon::start(Some(&config));
    assert!(started.elapsed() < Duration::from_secs(10), "ready in {:?}", started.elapsed());
    for name in ["fifo", "zero", "dir"] {
        let status = daemon.plugin_status(name);
        assert_eq!(status["state"], "failed", "{status}");
        assert!(status["last_error"].as_str().unwrap().contains("not a regular file"), "{status}");
    }
    // SIGHUP with a config that does not parse: logged, nothing changes, still serving.
    fs::write(daemon.config_path(), "[[plugin\n").unwrap();
    daemon.hup();
    wait_for(Duration::from_secs(10), "the reload error in the log", || daemon.log().contains("config not reloaded").then_some(()));
    assert_eq!(daemon.plugin_status("syscall-latency")["state"], "running");
    assert_eq!(daemon.get("/healthz", None).map(|(code, _)| code), Some(200));
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/wasmtap.service")).expect("deploy/wasmtap.service");
    for option in ["CapabilityBoundingSet=", "NoNewPrivileges=yes", "ProtectSystem=strict", "LimitNOFILE=", "SystemCallFilter=", "ExecReload="] {
        assert!(unit.contains(option), "the unit sets {option}");
    }
    // With this build's binary in place of the installed one (verify checks it exists).
    let dir = TempDir::new();
    let path = dir.0.join("wasmtap.service");
    fs::write(&path, unit.replace("/usr/local/bin/wasmtap", &built("wasmtap").display().to_string())).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze (systemd) is installed");
    assert!(out.status.success() && out.stderr.is_empty(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// `curl` over TLS, trusting `ca`: (status, body).
fn curl(ca: &Path, url: &str, user: Option<&str>) -> Option<(u16, String)> {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-m", "5", "-w", "\n%{http_code}", "--cacert"]).arg(ca).arg(url);
    if let Some(user) = user {
        cmd.args(["-u", user]);
    }
    let out = cmd.output().expect("curl is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.parse().ok().filter(|c| *c != 0)?, body.to_owned()))
}

#[test]
fn metrics_over_tls_with_basic_auth_reach_a_real_prometheus() {
    if !privileged_or_skip("metrics_over_tls_with_basic_auth_reach_a_real_prometheus") {
        return;
    }
    let _counting = exact_counts();
    let dir = TempDir::new();
    let (cert, key, web) = (dir.0.join("tls.crt"), dir.0.join("tls.key"), dir.0.join("web.toml"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=wasmtap"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let hash = bcrypt::hash("s3cret", 6).unwrap();
    fs::write(
        &web,
        format!("[tls_server_config]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n[basic_auth_users]\nprom = \"{hash}\"\n", cert.display(), key.display()),
    )
    .unwrap();
    let config = format!("[server]\nweb_config = \"{}\"\n\n[[plugin]]\nname = \"syscall-latency\"\nbundled = \"syscall-latency\"\n", web.display());
    let checked = dir.0.join("wasmtap.toml");
    fs::write(&checked, &config).unwrap();
    let out = Command::new(built("wasmtap")).arg("check-config").arg(&checked).output().unwrap();
    assert!(out.status.success(), "check-config reads the web config too: {}", String::from_utf8_lossy(&out.stderr));
    let ready = |addr: std::net::SocketAddr| curl(&cert, &format!("https://{addr}/readyz"), None);
    let daemon = Daemon::launch(Launch { config: Some(&config), ready_probe: Some(&ready), ..Launch::default() });
    let base = format!("https://{}", daemon.addr);
    // Health stays open; what the probes saw needs the password.
    assert_eq!(curl(&cert, &format!("{base}/healthz"), None).map(|r| r.0), Some(200));
    for user in [None, Some("prom:wrong"), Some("other:s3cret")] {
        assert_eq!(curl(&cert, &format!("{base}/metrics"), user).map(|r| r.0), Some(401), "{user:?}");
        assert_eq!(curl(&cert, &format!("{base}/status"), user).map(|r| r.0), Some(401), "{user:?}");
    }
    assert_eq!(curl(&cert, &format!("{base}/metrics"), Some("prom:s3cret")).map(|r| r.0), Some(200));
    // Plain HTTP gets no metrics out of the TLS port.
    assert_ne!(daemon.get("/metrics", None).map(|r| r.0), Some(200));
    // A real Prometheus scrapes it over TLS with the password, exactly.
    let prometheus = wasmtap_tests::Prometheus::start_with(
        daemon.addr,
        &format!("    scheme: https\n    tls_config:\n      ca_file: {}\n    basic_auth:\n      username: prom\n      password: s3cret\n", cert.display()),
    );
    let comm = unique_comm("tls");
    run_workload(&comm, 1_234, 5);
    prometheus.assert_exact_workload(&comm, 1_234, 5);
    let (_, m) = curl(&cert, &format!("{base}/metrics"), Some("prom:s3cret")).unwrap();
    assert!(sample(&m, "wasmtap_http_refused_total", &[("reason", "unauthorized")]).unwrap_or(0.0) >= 6.0, "refusals counted");
}
