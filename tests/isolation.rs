//! Isolation: hostile plugins (tests/hostile-plugin, one attack per `mode`) run beside
//! the healthy syscall-latency plugin under a workload the test makes itself. For every
//! case the daemon stays up within its memory bound, the healthy plugin's counts are
//! exact, a real Prometheus scrapes `up` = 1 and the healthy series, and the hostile
//! plugin's refusal or fault is visible with its reason. Then tenants.

use std::{
    io::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use wasmtap_tests::{
    Cgroup, Daemon, HOSTILE_WASM as HOSTILE, Prometheus, TempDir, admin_call, privileged_or_skip, promtool_problems, run_workload, sample, sum_samples,
    unique_comm, wait_for, workload,
};

const HOSTILE_FS: &str = env!("HOSTILE_FS_WASM");
const MULTI_MEMORY: &str = env!("MULTI_MEMORY_WASM");
const GETPPID_CALLS: u64 = 20_000;
const OPENAT_CALLS: u64 = 357;

/// A `[[plugin]]` section for the hostile component in `mode`, with extra keys.
fn hostile(name: &str, mode: &str, extra: &str) -> String {
    hostile_from(HOSTILE, name, mode, extra)
}

fn hostile_from(path: &str, name: &str, mode: &str, extra: &str) -> String {
    format!("[[plugin]]\nname = \"{name}\"\npath = \"{path}\"\n{extra}\nconfig = {{ mode = \"{mode}\", token = \"tok-{name}\" }}\n\n")
}

fn refusals(metrics: &str, plugin: &str, reason: &str) -> f64 {
    sample(metrics, "wasmtap_plugin_refusals_total", &[("plugin", plugin), ("reason", reason)]).unwrap_or(0.0)
}

fn latency_count(metrics: &str, prefix: &str, comm: &str) -> Option<f64> {
    sample(metrics, &format!("{prefix}_seconds_count"), &[("comm", comm), ("syscall", "getppid")])
}

#[test]
fn hostile_plugins_hurt_neither_the_healthy_one_nor_the_scrape() {
    if !privileged_or_skip("hostile_plugins_hurt_neither_the_healthy_one_nor_the_scrape") {
        return;
    }
    let cache = TempDir::new();
    let mut config = format!("cache_dir = \"{}\"\n\n[plugin_defaults]\nmemory_bytes = 33554432\n\n", cache.0.display());
    // First, while the compile cache is empty: a compile that takes too long.
    config += &hostile("h-compile-time", "", "compile_timeout_ms = 1");
    config += "[[plugin]]\nname = \"syscall-latency\"\nbundled = \"syscall-latency\"\n\n";
    config += &hostile("h-compile-size", "", "component_bytes = 10000");
    for mode in [
        "bucket-bomb",
        "help-bomb",
        "help-injection",
        "dup-labels",
        "derived-names",
        "wide-labels",
        "counter-overflow",
        "non-finite",
        "log-injection",
        "panic",
        "memory-bomb",
        "std",
        "filter-bomb",
        "ticks",
        "sleep",
    ] {
        config += &hostile(&format!("h-{mode}"), mode, "");
    }
    config += &hostile("h-series-bomb", "series-bomb", "metric_bytes = 262144\nseries_overflow = \"refuse\"");
    config += &hostile("h-handle-bomb", "handle-bomb", "series = 100\nfamilies = 4");
    config += &hostile("h-log-flood", "log-flood", "log_bytes_per_second = 4096");
    config += &hostile("h-huge-error", "huge-error", "memory_bytes = 67108864");
    config += &hostile("h-trap-storm", "trap-storm", "max_faults = 3");
    config += &hostile_from(HOSTILE_FS, "h-fs", "fs", "");
    // 1 + 16 memories of 4 MiB: each fits the 32 MiB cap alone, together they do not.
    config += &hostile_from(MULTI_MEMORY, "h-multi-memory", "", "");

    let started = Instant::now();
    let daemon = Daemon::start(Some(&config));
    let prometheus = Prometheus::start(daemon.addr);
    let comm = unique_comm("h");
    run_workload(&comm, GETPPID_CALLS, OPENAT_CALLS);

    // The healthy plugin: exact, through a real Prometheus, with the target up.
    prometheus.assert_exact_workload(&comm, GETPPID_CALLS, OPENAT_CALLS);
    assert_eq!(prometheus.query("sum(wasmtap_probe_records_total)").map(|v| v > 0.0), Some(true), "self-metrics ingested");

    // Let the storm, the panics and the ticks run under load for a while.
    let noise = std::thread::spawn(|| run_workload(&unique_comm("z"), 2_000_000, 0));
    wait_for(Duration::from_secs(60), "the trap storm to be quarantined", || (daemon.plugin_status("h-trap-storm")["state"] == "quarantined").then_some(()));
    noise.join().unwrap();

    let m = daemon.metrics();
    let failed = |name: &str| daemon.plugin_status(name);
    let last_error = |name: &str| failed(name)["last_error"].as_str().unwrap_or_default().to_owned();

    // Host memory a plugin drives: refused past its budget, counted with the reason.
    assert!(refusals(&m, "h-bucket-bomb", "buckets") >= 1.0, "bucket bomb");
    assert!(refusals(&m, "h-help-bomb", "help") >= 1.0, "help bomb");
    assert!(refusals(&m, "h-wide-labels", "label_bytes") >= 1.0, "wide labels");
    assert!(refusals(&m, "h-series-bomb", "metric_bytes") >= 1.0, "series bomb");
    assert!(refusals(&m, "h-handle-bomb", "handles") >= 1.0, "handle bomb");
    assert_eq!(failed("h-handle-bomb")["state"], "running", "a refused handle is an error value, not a trap");
    let held = sample(&m, "wasmtap_plugin_metric_bytes", &[("plugin", "h-series-bomb")]).unwrap();
    assert!(held > 0.0 && held <= 262_144.0, "series bomb holds {held} metric bytes");
    // Invalid exposition input: refused.
    assert!(refusals(&m, "h-help-injection", "help") >= 1.0, "help injection");
    assert!(refusals(&m, "h-dup-labels", "invalid_metric") >= 1.0, "duplicate labels");
    assert!(refusals(&m, "h-derived-names", "invalid_metric") >= 1.0, "derived sample names");
    assert!(!m.contains("forged_total") && !m.contains("h_derived_names_lat_count "), "nothing forged reaches the scrape");
    // Values: counters saturate at u64::MAX by refusal, non-finite gauges are refused.
    assert!(refusals(&m, "h-counter-overflow", "overflow") >= 1.0, "counter overflow");
    assert_eq!(sample(&m, "h_counter_overflow_big_total", &[]), Some(u64::MAX as f64));
    assert!(refusals(&m, "h-non-finite", "non_finite") >= 1.0, "non-finite gauge");
    assert_eq!(sample(&m, "h_non_finite_level", &[]), Some(0.0));
    // Namespaces are owned: collisions (the same name after normalisation, a prefix,
    // the reserved one) are config errors (see tests/hardening.rs) and refused when
    // loaded at run time.
    for (name, extra, why) in [
        ("syscall_latency", "", "clashes"),
        ("syscall", "", "clashes"),
        ("wasmtap", "", "reserved"),
        ("h-derived-ns", "namespace = \"wasmtap_plugin\"", "reserved"),
    ] {
        let section = hostile(name, "", extra).replacen("[[plugin]]\n", "", 1);
        let (code, answer) = admin_call(&daemon.admin_socket(), "POST", "/v1/plugins", &section);
        assert_eq!(code, 422, "{name}: {answer}");
        assert!(answer["error"].as_str().unwrap_or_default().contains(why), "{name}: {answer}");
    }
    // Load-time budgets and the WASI rule.
    assert!(last_error("h-filter-bomb").contains("20000 subscriptions"), "{}", last_error("h-filter-bomb"));
    assert!(refusals(&m, "h-filter-bomb", "subscriptions") >= 1.0);
    assert!(last_error("h-compile-size").contains("component_bytes"), "{}", last_error("h-compile-size"));
    assert!(last_error("h-compile-time").contains("compile_timeout_ms"), "{}", last_error("h-compile-time"));
    assert!(last_error("h-fs").contains("wasi:filesystem"), "{}", last_error("h-fs"));
    assert!(refusals(&m, "h-fs", "import") >= 1.0);
    // A plugin that sleeps for an hour per batch cannot block its worker.
    assert_eq!(failed("h-sleep")["state"], "running");
    assert!(sample(&m, "wasmtap_plugin_batches_total", &[("plugin", "h-sleep")]).unwrap_or(0.0) >= 2.0, "h-sleep's batches");
    // Ordinary std runs (empty environment: the gauge is 0 variables + 1).
    assert_eq!(failed("h-std")["state"], "running");
    assert_eq!(sample(&m, "h_std_std_ok", &[]), Some(1.0));
    // Faults: bounded error text, the panic message, the out-of-memory reason, quarantine.
    let huge = last_error("h-huge-error");
    assert!(huge.starts_with("init refused: EEEE") && huge.len() < 1200, "{} bytes: {}", huge.len(), &huge[..huge.len().min(100)]);
    assert!(last_error("h-panic").contains("hostile panic tok-h-panic"), "{}", last_error("h-panic"));
    assert!(last_error("h-memory-bomb").contains("out of memory"), "{}", last_error("h-memory-bomb"));
    assert!(refusals(&m, "h-memory-bomb", "memory") >= 1.0);
    let memory = sample(&m, "wasmtap_plugin_memory_bytes", &[("plugin", "h-memory-bomb")]).unwrap_or(0.0);
    assert!(memory <= 33_554_432.0, "memory gauge {memory}");
    assert_eq!(failed("h-multi-memory")["state"], "failed");
    assert!(last_error("h-multi-memory").contains("out of memory"), "{}", last_error("h-multi-memory"));
    assert!(refusals(&m, "h-multi-memory", "memory") >= 1.0);
    let storm = failed("h-trap-storm");
    assert!(last_error("h-trap-storm").contains("storm tok-h-trap-storm"), "{storm}");
    let restarts = sample(&m, "wasmtap_plugin_restarts_total", &[("plugin", "h-trap-storm")]).unwrap();
    assert!(restarts <= 2.0, "quarantined after 3 faults: {restarts} restarts");
    assert_eq!(sample(&m, "wasmtap_plugin_quarantined", &[("plugin", "h-trap-storm")]), Some(1.0));
    // tick fires on schedule (every 100 ms) while batches keep coming.
    let ticks = sample(&m, "h_ticks_ticks_total", &[]).unwrap_or(0.0);
    let expected = started.elapsed().as_millis() as f64 / 100.0;
    assert!(ticks >= expected * 0.5, "{ticks} ticks in {:?}", started.elapsed());

    // Logs: nothing a plugin writes forges a line; the flood stays within its budget.
    let log = daemon.log();
    for line in log.lines().filter(|l| l.contains("FORGED")) {
        assert!(line.contains("h-log-injection"), "a forged line: {line}");
    }
    assert!(!log.lines().any(|l| l.starts_with("FORGED")), "forged line in\n{log}");
    let flood: usize = log.lines().filter(|l| l.contains("plugin=h-log-flood") || l.contains("\"h-log-flood\"")).map(str::len).sum();
    let allowance = 4 * 4096 + started.elapsed().as_secs_f64() as usize * 4096;
    assert!(flood <= allowance + 64 * 1024, "log flood wrote {flood} bytes (allowance {allowance})");
    assert!(refusals(&m, "h-log-flood", "log_bytes") >= 1.0);

    // The scrape stays valid for promtool and OpenMetrics; the daemon within its bound.
    // (promtool also lints style, e.g. "_counter" in a name: a hostile plugin may pick
    // such names for its own families; anything else is a failure.)
    if let Some(problems) = promtool_problems(&m) {
        let others: Vec<&str> = problems.lines().filter(|l| !l.starts_with("h_")).collect();
        assert!(others.is_empty(), "promtool: {problems}");
    }
    let (_, om) = daemon.get("/metrics", Some("application/openmetrics-text; version=1.0.0")).unwrap();
    assert_eq!(om.matches("# EOF").count(), 1);
    assert!(om.ends_with("# EOF\n") && !om.contains("inf\n") && !om.contains("NaN"));
    let rss = daemon.rss_bytes();
    assert!(rss < 768 << 20, "daemon RSS {rss} bytes");
    assert_eq!(prometheus.query("up{job=\"wasmtap\"}"), Some(1.0));
    eprintln!("hostile suite: daemon RSS {} MiB, {} ticks, log flood {flood} bytes", rss >> 20, ticks);
    for plugin in daemon.status()["plugins"].as_array().unwrap() {
        let name = plugin["name"].as_str().unwrap();
        let reasons: Vec<String> = m
            .lines()
            .filter(|l| l.starts_with("wasmtap_plugin_refusals_total{") && l.contains(&format!("plugin=\"{name}\"")))
            .map(|l| l.split("reason=\"").nth(1).unwrap_or("").replace("\"}", ""))
            .collect();
        let error = plugin["last_error"].as_str().unwrap_or("");
        eprintln!("  {name:<20} {:<12} refusals [{}] {}", plugin["state"].as_str().unwrap(), reasons.join(", "), &error[..error.len().min(150)]);
    }
}

#[test]
fn a_pid_union_too_big_for_the_kernel_map_widens_it_and_routes_in_the_host() {
    if !privileged_or_skip("a_pid_union_too_big_for_the_kernel_map_widens_it_and_routes_in_the_host") {
        return;
    }
    let comm = unique_comm("w");
    let mut target = workload(&comm, 1_000, 0, true);
    let mut config = format!("[[plugin]]\nname = \"one-pid\"\nbundled = \"syscall-latency\"\nconfig = {{ pids = [{}] }}\n\n", target.id());
    config += &hostile("h-pids", "pids", "filter_entries = 8192");
    let daemon = Daemon::start(Some(&config));
    let prometheus = Prometheus::start(daemon.addr);
    assert_eq!(daemon.status()["probes"][0]["widened"], serde_json::json!(["pids"]));
    let noise = unique_comm("n");
    run_workload(&noise, 5_000, 0);
    target.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(target.wait().unwrap().success());
    let got = wait_for(Duration::from_secs(20), "the target's count", || latency_count(&daemon.metrics(), "one_pid", &comm).filter(|v| *v >= 1_000.0));
    assert_eq!(got, 1_000.0);
    std::thread::sleep(Duration::from_millis(100));
    let m = daemon.metrics();
    assert_eq!(latency_count(&m, "one_pid", &comm), Some(1_000.0));
    assert_eq!(latency_count(&m, "one_pid", &noise), None, "the host routed only the target's records");
    let count = format!("one_pid_seconds_count{{comm=\"{comm}\",syscall=\"getppid\"}}");
    wait_for(Duration::from_secs(60), "Prometheus to scrape the target's count", || (prometheus.query(&count) == Some(1_000.0)).then_some(()));
    assert_eq!(prometheus.query("up{job=\"wasmtap\"}"), Some(1.0));
}

#[test]
fn a_slow_plugin_gets_a_bounded_shutdown_and_its_leftovers_are_counted() {
    if !privileged_or_skip("a_slow_plugin_gets_a_bounded_shutdown_and_its_leftovers_are_counted") {
        return;
    }
    let config = hostile("h-slow", "slow", "shutdown_ms = 1000") + "[[plugin]]\nname = \"syscall-latency\"\nbundled = \"syscall-latency\"\n";
    let mut daemon = Daemon::start(Some(&config));
    let prometheus = Prometheus::start(daemon.addr);
    let comm = unique_comm("s");
    run_workload(&comm, 200_000, OPENAT_CALLS);
    // The slow plugin holds up nobody else.
    prometheus.assert_exact_workload(&comm, 200_000, OPENAT_CALLS);
    // Batches queue up behind 400 ms calls.
    wait_for(Duration::from_secs(20), "a backlog", || {
        (sample(&daemon.metrics(), "wasmtap_plugin_batches_total", &[("plugin", "h-slow")]).unwrap_or(0.0) >= 2.0).then_some(())
    });
    let asked = Instant::now();
    daemon.terminate();
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(4), "SIGTERM took {took:?}");
    assert!(daemon.log().contains("ran out of shutdown time"), "{}", daemon.log());
}

#[test]
fn json_logs_keep_plugin_fields_structured_and_escaped() {
    if !privileged_or_skip("json_logs_keep_plugin_fields_structured_and_escaped") {
        return;
    }
    let config = hostile("h-log-injection", "log-injection", "");
    let daemon = Daemon::spawn_with_args(Some(&config), 200, None, &["--json-logs"]);
    run_workload(&unique_comm("j"), 100, 0);
    let record = wait_for(Duration::from_secs(20), "the plugin's log record", || {
        daemon
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["fields"]["plugin"] == "h-log-injection" && r["level"] == "WARN")
    });
    assert_eq!(record["fields"]["message"], "hello\\nFORGED-LINE wasmtap: all good", "{record}");
    assert_eq!(record["fields"]["attrs"]["x\\ny"], "a\\nFORGED-FIELD", "{record}");
    for line in daemon.log().lines() {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "every line is one JSON record: {line}");
    }
}

#[test]
fn a_nul_in_a_plugin_name_is_a_clear_config_error() {
    let dir = TempDir::new();
    let path = dir.0.join("nul.toml");
    std::fs::write(&path, "[[plugin]]\nname = \"a\\u0000b\"\nbundled = \"syscall-latency\"\n").unwrap();
    let out = Command::new(wasmtap_tests::built("wasmtap")).arg("run").arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "a clean exit with an error, not a panic");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: invalid config") && stderr.contains("is not allowed"), "{stderr}");
}

fn tenant(name: &str, cgroup: &Path, quota: &str) -> String {
    format!("[[tenant]]\nname = \"{name}\"\ncgroup = \"{}\"\nquota = {{ {quota} }}\n\n", cgroup.display())
}

#[test]
fn tenants_see_only_their_cgroups_and_one_at_quota_does_not_touch_the_other() {
    if !privileged_or_skip("tenants_see_only_their_cgroups_and_one_at_quota_does_not_touch_the_other") {
        return;
    }
    let (a, b) = (Cgroup::new("a"), Cgroup::new("b"));
    let mut config = tenant("alpha", &a.0, "series = 1000");
    config += &tenant("beta", &b.0, "series = 3, cpu_percent = 5");
    config += "[[plugin]]\nname = \"a-calls\"\nnamespace = \"calls\"\nbundled = \"syscall-latency\"\ntenant = \"alpha\"\n\n";
    config += "[[plugin]]\nname = \"a-peek\"\nnamespace = \"peek\"\npath = \"HOSTILE\"\ntenant = \"alpha\"\nconfig = { mode = \"enrich-peek\" }\n\n";
    config += "[[plugin]]\nname = \"b-calls\"\nnamespace = \"calls\"\nbundled = \"syscall-latency\"\ntenant = \"beta\"\n\n";
    config += "[[plugin]]\nname = \"b-bomb\"\nnamespace = \"bomb\"\npath = \"HOSTILE\"\ntenant = \"beta\"\nconfig = { mode = \"series-bomb\" }\n\n";
    // 400 ms per batch against beta's 50 ms of CPU per second.
    config += "[[plugin]]\nname = \"b-slow\"\nnamespace = \"slow\"\npath = \"HOSTILE\"\ntenant = \"beta\"\nconfig = { mode = \"slow\" }\n\n";
    let config = config.replace("HOSTILE", HOSTILE);
    let daemon = Daemon::start(Some(&config));
    // Made after the daemon started: the scope takes in new cgroups below it, in the
    // kernel (ancestor match) and in the host.
    let inner = a.child("inner");
    let (comm_a, comm_b, outside) = (unique_comm("ta"), unique_comm("tb"), unique_comm("to"));
    let before = daemon.probe_records();
    inner.run(&comm_a, 3_000);
    b.run(&comm_b, 2_000);
    run_workload(&outside, 1_000, 0);
    // A second burst in beta, a few drains later, finds beta's CPU share spent.
    std::thread::sleep(Duration::from_millis(50));
    b.run(&unique_comm("tc"), 100);

    wait_for(Duration::from_secs(20), "tenant alpha's workload counted", || {
        (latency_count(&daemon.metrics(), "alpha_calls", &comm_a) >= Some(3_000.0)).then_some(())
    });
    std::thread::sleep(Duration::from_millis(100));
    let m = daemon.metrics();
    assert_eq!(latency_count(&m, "alpha_calls", &comm_a), Some(3_000.0), "tenant alpha: its own workload, exactly");
    assert_eq!(latency_count(&m, "alpha_calls", &comm_b), None, "tenant alpha sees nothing of beta");
    assert_eq!(latency_count(&m, "alpha_calls", &outside), None, "tenant alpha sees nothing outside its cgroup");
    // Enrichment answers a tenant's plugin about its own cgroups only.
    assert!(sample(&m, "alpha_peek_answers_total", &[("about", "own")]).unwrap_or(0.0) >= 1.0, "enrichment of its own cgroup");
    assert_eq!(sample(&m, "alpha_peek_answers_total", &[("about", "init")]), Some(0.0), "no facts about a process outside the tenant");
    // Only the tenants' cgroups reach the ring buffer: the outside workload's 1 000
    // calls were filtered in the kernel.
    let added = daemon.probe_records() - before;
    assert!((5_000.0..5_500.0).contains(&added), "probe recorded {added} records");
    // Tenant beta is at its series quota: refusals counted, its plugins' series bounded,
    // and alpha's counts untouched (above).
    let b_series: f64 = ["b-calls", "b-bomb", "b-slow"].iter().filter_map(|p| sample(&m, "wasmtap_plugin_series", &[("plugin", p)])).sum();
    assert!(b_series <= 3.0, "tenant beta holds {b_series} series, over its quota of 3");
    // (Refused outright, or counted in a family's overflow series.)
    let b_refused: f64 =
        ["b-calls", "b-bomb"].iter().map(|p| refusals(&m, p, "series") + sum_samples(&m, "wasmtap_plugin_series_refused_total", &[("plugin", p)])).sum();
    assert!(b_refused >= 1.0, "tenant beta's quota refused series");
    assert!(latency_count(&m, "beta_calls", &comm_a).is_none() && latency_count(&m, "beta_calls", &outside).is_none());
    wait_for(Duration::from_secs(10), "beta's CPU share to refuse a batch", || {
        let m = daemon.metrics();
        (["b-calls", "b-bomb", "b-slow"].iter().map(|p| refusals(&m, p, "cpu")).sum::<f64>() >= 1.0).then_some(())
    });
    // Every family of a tenant's plugin is in the tenant's namespace.
    for line in m.lines().filter(|l| l.starts_with("# TYPE ") && !l.starts_with("# TYPE wasmtap_")) {
        assert!(line.starts_with("# TYPE alpha_") || line.starts_with("# TYPE beta_"), "{line}");
    }
    if let Some(problems) = promtool_problems(&m) {
        panic!("promtool: {problems}");
    }
}
