//! Hot swap through the admin API against the real kernel: replaces under load count
//! every event exactly once and never make a series go down; failed replaces leave the
//! old build running; in-guest state is carried across; unload narrows the kernel and
//! detaches a kind nobody wants; the CLI works for root and refuses other users; SIGHUP
//! applies exactly the config's difference.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use wasmtap_tests::{
    Daemon, HOSTILE_WASM, SYSCALL_LATENCY_VARIANT_WASM, TempDir, built, privileged_or_skip, promtool_problems, run_workload, sample, sum_samples, unique_comm,
    wait_for,
};

const CALLS_PER_RUN: u64 = 20_000;

/// The daemon's config: `plugins` as `[[plugin]]` sections, nothing else.
fn config(plugins: &str) -> String {
    format!("[plugin_defaults]\nshutdown_ms = 5000\n{plugins}")
}

/// The test plugin counting getppid calls (of `filter`: `comm = "…"` or `pid = …`) in
/// the guest, a count its `state` export carries across a replace.
fn stateful_plugin(name: &str, filter: &str) -> String {
    format!("[[plugin]]\nname = \"{name}\"\npath = \"{HOSTILE_WASM}\"\nconfig = {{ mode = \"stateful\", {filter}, syscall = \"getppid\" }}\n")
}

/// The guest-held count of `plugin` (see [`stateful_plugin`]).
fn guest_records(daemon: &Daemon, plugin: &str) -> u64 {
    sample(&daemon.metrics(), &format!("{plugin}_guest_records"), &[]).unwrap_or(0.0) as u64
}

fn latency_plugin(comm: &str) -> String {
    format!("[[plugin]]\nname = \"lat\"\nbundled = \"syscall-latency\"\nconfig = {{ comms = [\"{comm}\"], syscalls = [\"getppid\"] }}\n")
}

/// getppid calls `lat` counted for `comm`, over every label set (the builds differ in labels).
fn counted(daemon: &Daemon, comm: &str) -> u64 {
    sum_samples(&daemon.metrics(), "lat_seconds_count", &[("comm", comm), ("syscall", "getppid")]) as u64
}

/// Every `lat_` sample by identity, labels with an empty value left out (Prometheus
/// treats them as absent).
fn series(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with("lat_"))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
            let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').filter(|l| !l.is_empty() && !l.ends_with("=\"\"")).collect();
            labels.sort();
            Some((format!("{name}{{{}}}", labels.join(",")), value.parse().ok()?))
        })
        .collect()
}

/// A `wt-workload rounds` child: each `round()` makes `calls` getppid calls.
struct Rounds {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Rounds {
    fn spawn(comm: &str, calls: u64) -> Self {
        let mut child = Command::new(built("wt-workload"))
            .args(["rounds", comm, &calls.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn wt-workload rounds");
        let (stdin, stdout) = (child.stdin.take().unwrap(), BufReader::new(child.stdout.take().unwrap()));
        Self { child, stdin, stdout }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn round(&mut self) {
        self.stdin.write_all(b"go\n").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "done");
    }
}

impl Drop for Rounds {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn plugin_version(daemon: &Daemon, name: &str) -> String {
    daemon.plugin_status(name)["version"].as_str().expect("version").to_owned()
}

#[test]
fn twenty_replaces_under_load_count_every_event_once() {
    if !privileged_or_skip("twenty_replaces_under_load_count_every_event_once") {
        return;
    }
    let comm = unique_comm("swap");
    let daemon = Daemon::start(Some(&config(&latency_plugin(&comm))));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (comm, stop) = (comm.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(Relaxed) {
                run_workload(&comm, CALLS_PER_RUN, 0);
                runs += 1;
            }
            runs
        })
    };
    wait_for(Duration::from_secs(20), "the workload to be counted", || (counted(&daemon, &comm) > 0).then_some(()));
    let mut before = series(&daemon.metrics());
    let mut versions = Vec::new();
    for i in 0..20 {
        let source = if i % 2 == 0 { ["--path", SYSCALL_LATENCY_VARIANT_WASM] } else { ["--bundled", "syscall-latency"] };
        let (ok, out, err) = daemon.plugin_cli(&["replace", "lat", source[0], source[1]]);
        assert!(ok, "replace {i} failed: {err}\n{}", daemon.log());
        assert!(out.starts_with("replaced: now lat running") && out.contains("state none"), "{out}");
        versions.push(plugin_version(&daemon, "lat"));
        // No series Prometheus knows ever goes down across a swap (no fake reset).
        let text = daemon.metrics();
        let after = series(&text);
        for (identity, old) in &before {
            if let Some(new) = after.get(identity) {
                assert!(new >= old, "{identity} went from {old} to {new} at replace {i}");
            }
        }
        before = after;
    }
    stop.store(true, Relaxed);
    let runs = load.join().unwrap();
    let total = runs * CALLS_PER_RUN;
    let got = wait_for(Duration::from_secs(30), "every call to be counted", || {
        let n = counted(&daemon, &comm);
        (n >= total).then_some(n)
    });
    let text = daemon.metrics();
    assert_eq!(got, total, "{runs} runs of {CALLS_PER_RUN} calls");
    assert_eq!(sample(&text, "wasmtap_plugin_dropped_events_total", &[("plugin", "lat")]).unwrap_or(0.0), 0.0);
    assert_eq!(sample(&text, "wasmtap_probe_kernel_drops_total", &[("probe", "syscall")]).unwrap_or(0.0), 0.0);
    assert_ne!(versions[0], versions[1], "the two builds differ");
    assert!(versions.windows(2).all(|w| w[0] != w[1]), "each replace switched builds");
    // The last build is the bundled one: its buckets, no `build` label left over.
    assert!(text.contains(&format!("lat_seconds_bucket{{comm=\"{comm}\",syscall=\"getppid\",le=\"1.28e-07\"}}")), "{text}");
    assert!(!text.contains("build=\""), "{text}");
    assert_eq!(promtool_problems(&text), None);
}

#[test]
fn failed_replaces_leave_the_old_build_running() {
    if !privileged_or_skip("failed_replaces_leave_the_old_build_running") {
        return;
    }
    let comm = unique_comm("keep");
    let daemon = Daemon::start(Some(&config(&stateful_plugin("st", &format!("comm = \"{comm}\"")))));
    let version = plugin_version(&daemon, "st");
    let guest = |d: &Daemon| guest_records(d, "st");
    let dir = TempDir::new();
    let broken = dir.0.join("broken.wasm");
    std::fs::write(&broken, b"\0asm\x0d\0\x01\0 not a component").unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["--path", broken.to_str().unwrap()], "not a valid wasmtap plugin component"),
        (&["--set", "mode = \"init-fail\""], "init refused: init refused on purpose"),
        (&["--set", "mode = \"restore-fail\""], "restore refused: restore refused on purpose"),
    ];
    let mut expected = 0;
    for (args, error) in cases {
        run_workload(&comm, 1000, 0);
        expected += 1000;
        let (ok, _, err) = daemon.plugin_cli(&[&["replace", "st"], args].concat());
        assert!(!ok, "the replace {args:?} succeeded");
        assert!(err.contains(error), "{args:?}: {err}");
        assert_eq!(plugin_version(&daemon, "st"), version);
        assert_eq!(daemon.plugin_status("st")["state"], "running");
        // The old build still counts, and lost nothing queued while the replace ran.
        run_workload(&comm, 1000, 0);
        expected += 1000;
        let counted = wait_for(Duration::from_secs(20), "the old build to count on", || {
            let n = guest(&daemon);
            (n >= expected).then_some(n)
        });
        assert_eq!(counted, expected, "after {args:?}:\n{}", daemon.log());
    }
    let (ok, out, _) = daemon.plugin_cli(&["list"]);
    assert!(ok && out.contains("st ") && out.contains(&version[..12]), "{out}");
}

#[test]
fn in_guest_state_is_carried_across_a_replace() {
    if !privileged_or_skip("in_guest_state_is_carried_across_a_replace") {
        return;
    }
    let comm = unique_comm("state");
    let daemon = Daemon::start(Some(&config(&stateful_plugin("st", &format!("comm = \"{comm}\"")))));
    let guest = |d: &Daemon| guest_records(d, "st");
    run_workload(&comm, 3000, 0);
    wait_for(Duration::from_secs(20), "the first count", || (guest(&daemon) == 3000).then_some(()));
    // A new config is a new instance; only `restore` can bring the count along.
    let (ok, out, err) = daemon.plugin_cli(&[
        "replace",
        "st",
        "--set",
        "mode = \"stateful\"",
        "--set",
        &format!("comm = \"{comm}\""),
        "--set",
        "syscall = \"getppid\"",
        "--set",
        "token = \"two\"",
    ]);
    assert!(ok && out.contains("state carried (8 bytes)"), "{out}{err}");
    run_workload(&comm, 2000, 0);
    wait_for(Duration::from_secs(20), "the carried-over count", || (guest(&daemon) == 5000).then_some(()));
}

#[test]
fn unload_narrows_the_kernel_and_detaches_the_last_kind() {
    if !privileged_or_skip("unload_narrows_the_kernel_and_detaches_the_last_kind") {
        return;
    }
    let comm = unique_comm("unl");
    let (mut one, mut two) = (Rounds::spawn(&comm, 1000), Rounds::spawn(&comm, 1000));
    let plugins = stateful_plugin("one", &format!("pid = {}", one.pid())) + &stateful_plugin("two", &format!("pid = {}", two.pid()));
    let daemon = Daemon::start(Some(&config(&plugins)));
    let guest = |name: &str| guest_records(&daemon, name);
    one.round();
    two.round();
    wait_for(Duration::from_secs(20), "both plugins' counts", || (guest("one") == 1000 && guest("two") == 1000).then_some(()));
    let records = daemon.probe_records();
    assert_eq!(records, 2000.0, "the kernel records the two pids' getppid calls, nothing else");

    let (ok, out, err) = daemon.plugin_cli(&["unload", "two"]);
    assert!(ok && out.contains("unloaded two"), "{err}");
    two.round();
    one.round();
    wait_for(Duration::from_secs(20), "one's count", || (guest("one") == 2000).then_some(()));
    assert_eq!(daemon.probe_records(), records + 1000.0, "two's pid is out of the kernel filter");
    let metrics = daemon.metrics();
    assert!(!metrics.contains("two_guest_records") && !metrics.contains("plugin=\"two\""), "its metrics went with it:\n{metrics}");
    let program_ids: Vec<u64> = daemon.status()["probes"][0]["program_ids"].as_array().unwrap().iter().filter_map(|v| v.as_u64()).collect();
    assert!(!program_ids.is_empty());

    let (ok, _, err) = daemon.plugin_cli(&["unload", "one"]);
    assert!(ok, "{err}");
    assert_eq!(daemon.status()["probes"].as_array().map(Vec::len), Some(0), "{}", daemon.status());
    // The kernel frees a program once its last reference is gone (deferred work).
    for id in program_ids {
        wait_for(Duration::from_secs(10), &format!("program {id} to be unloaded"), || {
            let shown = Command::new("bpftool").args(["prog", "show", "id", &id.to_string()]).output().expect("bpftool");
            (!shown.status.success()).then_some(())
        });
    }
    let (ok, out, _) = daemon.plugin_cli(&["list"]);
    assert!(ok && !out.lines().any(|l| l.starts_with("one ") || l.starts_with("two ")), "{out}");
}

#[test]
fn cli_round_trip_and_other_users_refused() {
    if !privileged_or_skip("cli_round_trip_and_other_users_refused") {
        return;
    }
    let comm = unique_comm("cli");
    let daemon = Daemon::start(Some(&config(&latency_plugin(&comm))));
    let (ok, out, err) = daemon.plugin_cli(&["load", "st", "--path", HOSTILE_WASM, "--set", "mode = \"stateful\"", "--set", &format!("comm = \"{comm}\"")]);
    assert!(ok, "{err}");
    assert!(out.starts_with("loaded st running version "), "{out}");
    let (ok, _, err) = daemon.plugin_cli(&["load", "st", "--path", HOSTILE_WASM]);
    assert!(!ok && err.contains("already running"), "{err}");
    let (ok, out, _) = daemon.plugin_cli(&["list"]);
    assert!(ok && out.lines().any(|l| l.starts_with("st ") && l.contains("running")), "{out}");
    let (ok, out, err) = daemon.plugin_cli(&["replace", "st", "--set", "mode = \"ticks\""]);
    assert!(ok && out.starts_with("replaced: now st running"), "{out}{err}");
    let (ok, _, err) = daemon.plugin_cli(&["replace", "nope", "--bundled", "syscall-latency"]);
    assert!(!ok && err.contains("no plugin \"nope\""), "{err}");
    let (ok, _, err) = daemon.plugin_cli(&["load", "x", "--bundled", "no-such-plugin"]);
    assert!(!ok && err.contains("no bundled plugin"), "{err}");
    let (ok, _, _) = daemon.plugin_cli(&["unload", "st"]);
    assert!(ok);
    let (ok, out, _) = daemon.plugin_cli(&["list"]);
    assert!(ok && !out.lines().any(|l| l.starts_with("st ") || l.starts_with("x ")), "a failed load is not kept: {out}");

    // Another user: the socket's directory is the daemon user's alone.
    let dir = TempDir::new();
    let copy = dir.0.join("wasmtap");
    std::fs::copy(built("wasmtap"), &copy).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    for path in [&dir.0, &copy] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut cmd = Command::new(&copy);
    cmd.args(["plugin", "--socket"]).arg(daemon.admin_socket()).args(["unload", "lat"]);
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("permission denied"), "{err}");
    assert_eq!(daemon.plugin_status("lat")["state"], "running");
}

#[test]
fn sighup_applies_exactly_the_difference() {
    if !privileged_or_skip("sighup_applies_exactly_the_difference") {
        return;
    }
    let comm = unique_comm("hup");
    let hostile =
        |name: &str, mode: &str| format!("[[plugin]]\nname = \"{name}\"\npath = \"{HOSTILE_WASM}\"\nconfig = {{ mode = \"{mode}\", comm = \"{comm}\" }}\n");
    let before = config(&format!("{}{}{}", latency_plugin(&comm), hostile("gone", "ticks"), hostile("changed", "ticks")));
    let mut daemon = Daemon::start(Some(&before));
    let (lat, changed) = (plugin_version(&daemon, "lat"), daemon.plugin_status("changed"));
    // Loaded through the admin API: an edit of the file that does not name it leaves it.
    let (ok, _, err) = daemon.plugin_cli(&["load", "api", "--path", HOSTILE_WASM, "--set", "mode = \"ticks\""]);
    assert!(ok, "{err}");
    run_workload(&comm, 4000, 0);
    wait_for(Duration::from_secs(20), "the first calls", || (counted(&daemon, &comm) == 4000).then_some(()));

    let after = config(&format!("{}{}{}", latency_plugin(&comm), hostile("changed", "stateful"), hostile("added", "ticks")));
    std::fs::write(daemon.config_path(), after).unwrap();
    daemon.hup();
    wait_for(Duration::from_secs(30), "the reload", || daemon.log().contains("config reloaded").then_some(()));
    let status = daemon.status();
    let names: Vec<&str> = status["plugins"].as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["lat", "changed", "api", "added"], "{status}");
    let metrics = daemon.metrics();
    let replaces = |plugin: &str| sample(&metrics, "wasmtap_plugin_replaces_total", &[("plugin", plugin)]).unwrap_or(0.0);
    assert_eq!((replaces("lat"), replaces("changed"), replaces("added"), replaces("api")), (0.0, 1.0, 0.0, 0.0));
    assert!(!metrics.contains("plugin=\"gone\""), "an unloaded plugin's self-metrics go with it");
    assert_eq!(plugin_version(&daemon, "lat"), lat, "the untouched plugin kept its build");
    assert_eq!(daemon.plugin_status("changed")["version"], changed["version"], "same build, new config");
    assert_eq!(sample(&metrics, "wasmtap_plugin_restarts_total", &[("plugin", "lat")]).unwrap_or(0.0), 0.0);
    run_workload(&comm, 3000, 0);
    wait_for(Duration::from_secs(20), "every call", || (counted(&daemon, &comm) >= 7000).then_some(()));
    assert_eq!(counted(&daemon, &comm), 7000, "the untouched plugin counted exactly");
    wait_for(Duration::from_secs(20), "the changed plugin's new mode", || sample(&daemon.metrics(), "changed_guest_records", &[]).map(|_| ()));
    daemon.terminate();
}
