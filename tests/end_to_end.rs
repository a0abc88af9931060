//! End to end: real kernel probes, the real daemon binary, real plugins, real scrapes.
//! Every count asserted here comes from a workload the test runs itself.

use std::{io::Write as _, process::Command, time::Duration};

use wasmtap_tests::{Daemon, privileged_or_skip, run_workload, sample, unique_comm, wait_for, workload};

const GETPPID_CALLS: u64 = 20_000;
const OPENAT_CALLS: u64 = 357;
const NOISE_CALLS: u64 = 50_000;

fn latency_count(metrics: &str, comm: &str, syscall: &str) -> Option<f64> {
    sample(metrics, "syscall_latency_seconds_count", &[("comm", comm), ("syscall", syscall)])
}

/// Polls until the series reaches `want`, then asserts it is exactly `want`.
fn assert_count_settles(daemon: &Daemon, want: u64, what: &str, read: impl Fn(&str) -> Option<f64>) {
    let got = wait_for(Duration::from_secs(20), what, || read(&daemon.metrics()).filter(|v| *v >= want as f64));
    // One more drain interval and plugin flush, to catch overcounting.
    std::thread::sleep(Duration::from_millis(100));
    let settled = read(&daemon.metrics()).unwrap_or_default();
    assert_eq!((got, settled), (want as f64, want as f64), "{what}");
}

#[test]
fn syscalls_of_a_child_reach_metrics_exactly() {
    if !privileged_or_skip("syscalls_of_a_child_reach_metrics_exactly") {
        return;
    }
    let daemon = Daemon::start(None);
    let comm = unique_comm("e");
    run_workload(&comm, GETPPID_CALLS, OPENAT_CALLS);

    assert_count_settles(&daemon, GETPPID_CALLS, "getppid latency count", |m| latency_count(m, &comm, "getppid"));
    let metrics = daemon.metrics();
    assert_eq!(latency_count(&metrics, &comm, "openat"), Some(OPENAT_CALLS as f64), "openat latency count");
    assert_eq!(
        sample(&metrics, "syscall_latency_errors_total", &[("comm", &comm), ("syscall", "openat"), ("errno", "ENOENT")]),
        Some(OPENAT_CALLS as f64),
        "openat ENOENT failures"
    );
    // getppid never fails; buckets are exact counts, so +Inf equals the count.
    assert_eq!(sample(&metrics, "syscall_latency_errors_total", &[("comm", &comm), ("syscall", "getppid"), ("errno", "ENOENT")]), None);
    assert_eq!(sample(&metrics, "syscall_latency_seconds_bucket", &[("comm", &comm), ("syscall", "getppid"), ("le", "+Inf")]), Some(GETPPID_CALLS as f64));
    let delivered = sample(&metrics, "wasmtap_plugin_events_total", &[("plugin", "syscall-latency")]).unwrap();
    assert!(delivered >= (GETPPID_CALLS + OPENAT_CALLS) as f64, "self-metrics count delivered events: {delivered}");

    // OpenMetrics when the scraper asks for it.
    let (code, om) = daemon.get("/metrics", Some("application/openmetrics-text; version=1.0.0")).unwrap();
    assert_eq!(code, 200);
    assert!(om.trim_end().ends_with("# EOF"), "OpenMetrics ends with # EOF");
    assert_eq!(latency_count(&om, &comm, "getppid"), Some(GETPPID_CALLS as f64));
}

#[test]
fn promtool_accepts_the_scrape() {
    if !privileged_or_skip("promtool_accepts_the_scrape") {
        return;
    }
    let daemon = Daemon::start(None);
    let comm = unique_comm("p");
    run_workload(&comm, 100, 5);
    let text = wait_for(Duration::from_secs(20), "the workload's series", || {
        let m = daemon.metrics();
        latency_count(&m, &comm, "openat").map(|_| m)
    });
    if let Some(problems) = wasmtap_tests::promtool_problems(&text) {
        panic!("promtool check metrics reported problems:\n{problems}");
    }
}

#[test]
fn pid_filter_keeps_other_processes_out_of_the_ring_buffer() {
    if !privileged_or_skip("pid_filter_keeps_other_processes_out_of_the_ring_buffer") {
        return;
    }
    let comm = unique_comm("f");
    let mut target = workload(&comm, 1_000, 0, true);
    let config = format!("[[plugin]]\nname = \"one-pid\"\nbundled = \"syscall-latency\"\nconfig = {{ pids = [{}] }}\n", target.id());
    let daemon = Daemon::start(Some(&config));

    let before = daemon.probe_records();
    let noise = unique_comm("n");
    run_workload(&noise, NOISE_CALLS, 100);

    // Wake the target only after the noise has finished: the ring buffer is FIFO, so
    // once the target's records have been read, any noise record would have been too.
    target.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(target.wait().unwrap().success());
    let m = |d: &Daemon| sample(&d.metrics(), "one_pid_seconds_count", &[("comm", &comm), ("syscall", "getppid")]);
    let got = wait_for(Duration::from_secs(20), "the target's getppid count", || m(&daemon).filter(|v| *v >= 1_000.0));
    assert_eq!(got, 1_000.0);
    // The target made 1 000 getppid calls plus a few dozen around them (its read,
    // exit-time unmaps); the noise process made more than 50 000.
    let added = daemon.probe_records() - before;
    assert!((1_000.0..1_200.0).contains(&added), "probe recorded {added} records; the pid filter let others through");
    assert_eq!(sample(&daemon.metrics(), "one_pid_seconds_count", &[("comm", &noise), ("syscall", "getppid")]), None);
}

#[test]
fn sigterm_unloads_every_program() {
    if !privileged_or_skip("sigterm_unloads_every_program") {
        return;
    }
    let mut daemon = Daemon::start(None);
    // Every kind the default config subscribes to: syscall (sys_enter, sys_exit and the
    // thread exit and exec cleanups), process (fork, exec, exit), sched (wakeup,
    // wakeup_new, switch) and tcp (state changes, sends, receives, retransmits).
    let status = daemon.status();
    let probes = status["probes"].as_array().expect("probes in /status");
    let kinds: Vec<&str> = probes.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["syscall", "process", "sched", "tcp"]);
    let ids: Vec<u32> =
        probes.iter().flat_map(|p| p["program_ids"].as_array().expect("program ids in /status").iter().map(|v| v.as_u64().unwrap() as u32)).collect();
    assert_eq!(ids.len(), 14, "four syscall, three process, three sched and four tcp programs are loaded");
    let loaded = || -> Vec<u32> { aya::programs::loaded_programs().filter_map(Result::ok).map(|p| p.id()).collect() };
    assert!(ids.iter().all(|id| loaded().contains(id)), "programs {ids:?} are loaded while running");
    daemon.terminate();
    // The kernel frees a released program asynchronously (after an RCU grace period),
    // so poll; a program still pinned or linked would stay listed for good.
    wait_for(Duration::from_secs(10), "the daemon's programs to be unloaded", || loaded().iter().all(|id| !ids.contains(id)).then_some(()));
}

#[test]
fn a_broken_plugin_is_reported_and_the_rest_runs_on() {
    if !privileged_or_skip("a_broken_plugin_is_reported_and_the_rest_runs_on") {
        return;
    }
    let dir = wasmtap_tests::TempDir::new();
    let garbage = dir.0.join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm this is not a component").unwrap();
    let config = format!("[[plugin]]\nname = \"broken\"\npath = \"{}\"\n\n[[plugin]]\nname = \"good\"\nbundled = \"syscall-latency\"\n", garbage.display());
    // One bad plugin neither kills liveness nor readiness; it is reported.
    let daemon = Daemon::start(Some(&config));
    assert_eq!(daemon.get("/healthz", None).unwrap(), (200, "ok\n".to_owned()));
    let (_, ready) = daemon.get("/readyz", None).unwrap();
    assert!(ready.contains("plugin broken:") && ready.contains("not a valid wasmtap plugin component"), "{ready}");
    assert_eq!(daemon.status()["plugins"].as_array().unwrap().len(), 2);

    let comm = unique_comm("b");
    run_workload(&comm, 500, 0);
    let good = |m: &str| sample(m, "good_seconds_count", &[("comm", &comm), ("syscall", "getppid")]);
    assert_count_settles(&daemon, 500, "the good plugin's count", good);
}

#[test]
fn a_bad_config_is_one_clear_error() {
    let dir = wasmtap_tests::TempDir::new();
    let path = dir.0.join("bad.toml");
    std::fs::write(&path, "[probes]\ndrain_interval_ms = 0\n").unwrap();
    let out = Command::new(wasmtap_tests::built("wasmtap")).arg("run").arg("--config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: invalid config") && stderr.contains("probes.drain_interval_ms must be within 1..=1000, got 0"), "{stderr}");
}

#[test]
fn real_prometheus_scrapes_exact_counts() {
    if !privileged_or_skip("real_prometheus_scrapes_exact_counts") {
        return;
    }
    let daemon = Daemon::start(None);
    let prometheus = wasmtap_tests::Prometheus::start(daemon.addr);
    let comm = unique_comm("q");
    run_workload(&comm, GETPPID_CALLS, OPENAT_CALLS);
    prometheus.assert_exact_workload(&comm, GETPPID_CALLS, OPENAT_CALLS);
}

#[test]
fn a_full_ring_buffer_is_counted_as_kernel_drops() {
    if !privileged_or_skip("a_full_ring_buffer_is_counted_as_kernel_drops") {
        return;
    }
    // 4 KiB holds 56 records, drained once a second: a burst overflows it.
    let config = "[probes]\nring_buffer_bytes = 4096\ndrain_interval_ms = 1000\nwakeup_percent = 100\n\n\
                  [[plugin]]\nname = \"syscall-latency\"\nbundled = \"syscall-latency\"\n";
    let daemon = Daemon::start(Some(config));
    let comm = unique_comm("d");
    run_workload(&comm, GETPPID_CALLS, 0);
    // Every one of the workload's calls was either delivered or counted as dropped.
    let (counted, dropped) = wait_for(Duration::from_secs(20), "drops to be accounted", || {
        let m = daemon.metrics();
        let counted = latency_count(&m, &comm, "getppid").unwrap_or(0.0);
        let dropped = sample(&m, "wasmtap_probe_kernel_drops_total", &[("probe", "syscall")]).unwrap_or(0.0);
        (counted + dropped >= GETPPID_CALLS as f64).then_some((counted, dropped))
    });
    assert!(dropped > 0.0 && counted < GETPPID_CALLS as f64, "counted {counted}, dropped {dropped}");
}

#[test]
fn without_privileges_the_daemon_says_how_to_fix_it_and_serves_on() {
    if !privileged_or_skip("without_privileges_the_daemon_says_how_to_fix_it_and_serves_on") {
        return;
    }
    let daemon = Daemon::spawn(None, 503, Some(65534));
    let (_, ready) = daemon.get("/readyz", None).unwrap();
    assert!(ready.contains("probe syscall:") && ready.contains("fix: run wasmtap as root"), "{ready}");
    assert_eq!(daemon.get("/healthz", None).unwrap().0, 200, "alive though not ready");
    let metrics = daemon.metrics();
    assert!(metrics.contains("wasmtap_plugin_events_total{plugin=\"syscall-latency\"} 0"), "{metrics}");
    assert_eq!(daemon.status()["plugins"][0]["state"], "running");
}
