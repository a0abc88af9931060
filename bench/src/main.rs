//! Traced-workload overhead and host CPU per event, the process kind's cost, the cost
//! of an enrichment lookup, hot-swap latency and plugin load time.
//!
//! Runs the same getppid loop untraced, under wasmtap (embedded default config:
//! syscall-latency observing every process), and under bpftrace running the same
//! per-comm latency histogram on raw_syscalls, interleaved over several rounds, and
//! prints medians side by side. Also the daemon's CPU time per event at the loop's
//! full rate; a fork+exec+exit loop untraced and under wasmtap with process-churn; and
//! the time a plugin's cached enrichment lookup takes; and a context-switch ping-pong
//! untraced, under wasmtap's sched kind (cpu-throttle) and under bpftrace's runqlat;
//! a connect/send/close loop untraced, under the tcp kind (tcp-per-cgroup) and under
//! bpftrace following the same socket states and sends; pgbench's select-only
//! transactions against a real PostgreSQL untraced, under the uprobe kind
//! (pg-query-latency on its USDT query probes) and under bpftrace timing the same
//! probes. Prints; asserts nothing.
//!
//! Each round pins the loop to one CPU, the same for all three setups, taking the CPUs
//! in turn: bpftrace's cost differs a lot between the two CPUs of this machine (about
//! 1 050 vs 650 ns/call), so an unpinned loop measured it bimodally.
//!
//! ./dev bench   (root)

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use wasmtap_tests::{
    Daemon, HOSTILE_WASM, SYSCALL_LATENCY_VARIANT_WASM, TempDir, admin_call,
    postgres::{self, Postgres},
    sample, wait_for,
};

const CALLS: u64 = 3_000_000;
const ROUNDS: usize = 6;
/// BEGIN runs once every probe is attached, so its line marks the start of tracing.
const BPFTRACE_PROGRAM: &str = "BEGIN { printf(\"tracing\\n\"); } \
    tracepoint:raw_syscalls:sys_enter { @start[tid] = nsecs; } \
    tracepoint:raw_syscalls:sys_exit /@start[tid]/ { @lat[comm] = hist(nsecs - @start[tid]); delete(@start[tid]); }";

fn loop_binary() -> PathBuf {
    std::env::current_exe().expect("current_exe").with_file_name("wt-syscall-loop")
}

/// Runs the loop once on `cpu`; ns per call.
fn syscall_loop(cpu: usize) -> f64 {
    syscall_loop_n(CALLS, cpu)
}

fn syscall_loop_n(calls: u64, cpu: usize) -> f64 {
    let out = Command::new(loop_binary()).args([calls.to_string(), cpu.to_string()]).output().expect("run wt-syscall-loop");
    assert!(out.status.success(), "wt-syscall-loop failed");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("ns per call")
}

/// CPU time (user + system) of all of `pid`'s threads, in nanoseconds: the sum of each
/// thread's `sum_exec_runtime` (first field of /proc/PID/task/TID/schedstat), which
/// unlike /proc/PID/stat is not rounded to clock ticks. The daemon's threads live for
/// its whole run, so none is missed.
fn cpu_ns(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}

struct WasmtapRun {
    ns_per_call: f64,
    cpu_ns_per_event: f64,
}

fn under_wasmtap(cpu: usize) -> WasmtapRun {
    let daemon = Daemon::start(None);
    let (ns_per_call, cpu_ns_per_event) = traced(&daemon, "syscall-latency", "syscall", || syscall_loop(cpu), |_| CALLS as f64);
    WasmtapRun { ns_per_call, cpu_ns_per_event }
}

/// Runs `workload` under `daemon`, then waits until `plugin` has every record the
/// `probe` kind read so far, and at least the `min_records` the workload made (from its
/// result), so the CPU spent on them is all counted (records of the rest of the machine
/// meanwhile are counted too). Returns the workload's result and the daemon's CPU time
/// per record the plugin handled.
fn traced<T>(daemon: &Daemon, plugin: &str, probe: &str, workload: impl FnOnce() -> T, min_records: impl Fn(&T) -> f64) -> (T, f64) {
    let events = || sample(&daemon.metrics(), "wasmtap_plugin_events_total", &[("plugin", plugin)]).unwrap_or(0.0);
    let read = || sample(&daemon.metrics(), "wasmtap_probe_records_total", &[("probe", probe)]).unwrap_or(0.0);
    let (e0, c0) = (events(), cpu_ns(daemon.child.id()));
    let result = workload();
    let min = min_records(&result);
    let e1 = wait_for(Duration::from_secs(30), "the plugin to handle the workload's records", || {
        let (e, r) = (events(), read());
        (e >= r && e - e0 >= min).then_some(e)
    });
    let cpu = (cpu_ns(daemon.child.id()) - c0) / (e1 - e0);
    (result, cpu)
}

fn under_bpftrace(cpu: usize) -> f64 {
    with_bpftrace(BPFTRACE_PROGRAM, || syscall_loop(cpu))
}

/// Runs `workload` while bpftrace runs `program` (which prints "tracing" in BEGIN).
fn with_bpftrace<T>(program: &str, workload: impl FnOnce() -> T) -> T {
    let mut bpftrace = Command::new("bpftrace")
        .args(["-e", program])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bpftrace is installed (./dev setup installs it)");
    // "Attaching N probes..." comes before the attach; the BEGIN line comes after it.
    let mut stdout = BufReader::new(bpftrace.stdout.take().unwrap());
    let mut line = String::new();
    while stdout.read_line(&mut line).expect("bpftrace stdout") > 0 && line.trim() != "tracing" {
        line.clear();
    }
    // Give bpftrace its own drain of the remaining output so it never blocks on a pipe.
    let drain = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let ns = workload();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(bpftrace.id() as i32), nix::sys::signal::SIGINT).ok();
    bpftrace.wait().expect("bpftrace exit");
    let _ = drain.join();
    ns
}

const HANDOVERS: u64 = 200_000;
/// runqlat: the run-queue wait of every switched-in task into a histogram.
const BPFTRACE_RUNQLAT: &str = "BEGIN { printf(\"tracing\\n\"); } \
    tracepoint:sched:sched_wakeup, tracepoint:sched:sched_wakeup_new { @qtime[args->pid] = nsecs; } \
    tracepoint:sched:sched_switch { if (args->prev_state == 0) { @qtime[args->prev_pid] = nsecs; } \
    $ns = @qtime[args->next_pid]; if ($ns) { @usecs = hist((nsecs - $ns) / 1000); } delete(@qtime[args->next_pid]); }";

/// Runs the ping-pong once on `cpu`; ns per hand-over (one wakeup, one switch).
fn pingpong(cpu: usize) -> f64 {
    let exe = std::env::current_exe().expect("current_exe").with_file_name("wt-pingpong");
    let out = Command::new(exe).args([HANDOVERS.to_string(), cpu.to_string()]).output().expect("run wt-pingpong");
    assert!(out.status.success(), "wt-pingpong failed");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("ns per hand-over")
}

/// The sched kind on its matching workload: the ping-pong untraced, under wasmtap with
/// cpu-throttle at its default threshold (1 ms: the programs run on every switch, but
/// no wait of the ping-pong is that long, so no record is written), with every wait
/// recorded (`min_wait_us = 0`: one record per hand-over, through the whole pipeline),
/// and under bpftrace's runqlat (every wait into an in-kernel histogram).
fn sched_kind(cpus: usize) {
    let config = |min_wait_us: u64| format!("[[plugin]]\nname = \"cpu-throttle\"\nbundled = \"cpu-throttle\"\nconfig = {{ min_wait_us = {min_wait_us} }}\n");
    let (mut untraced, mut threshold, mut every, mut bpftrace, mut daemon_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let cpu = round % cpus;
        untraced.push(pingpong(cpu));
        let daemon = Daemon::start(Some(&config(1000)));
        threshold.push(pingpong(cpu));
        drop(daemon);
        let daemon = Daemon::start(Some(&config(0)));
        let (ns, cpu_per_record) = traced(&daemon, "cpu-throttle", "sched", || pingpong(cpu), |_| 2.0 * HANDOVERS as f64);
        every.push(ns);
        daemon_cpu.push(cpu_per_record);
        drop(daemon);
        bpftrace.push(with_bpftrace(BPFTRACE_RUNQLAT, || pingpong(cpu)));
        eprintln!(
            "round {}: cpu {cpu}  untraced {:.0}  wasmtap {:.0}  wasmtap every wait {:.0}  bpftrace runqlat {:.0} ns/hand-over",
            round + 1,
            untraced[round],
            threshold[round],
            every[round],
            bpftrace[round]
        );
    }
    let (base, t, e, b) = (median(untraced), median(threshold), median(every), median(bpftrace));
    println!("sched kind: {HANDOVERS} x2 pipe hand-overs between two threads on one CPU (a wakeup and a context switch each), medians of {ROUNDS} rounds");
    println!(
        "  untraced {base:.0}  wasmtap cpu-throttle (1 ms threshold) {t:.0} (+{:.0})  every wait recorded {e:.0} (+{:.0})  bpftrace runqlat {b:.0} (+{:.0}) ns/hand-over",
        t - base,
        e - base,
        b - base
    );
    println!("  host CPU per recorded wait, every wait recorded (daemon user+sys / events delivered): {:.1} ns", median(daemon_cpu));
}

const CONNECTIONS: u64 = 20_000;
/// The tcp kind's work in bpftrace: per-socket SYN time, connect latency histogram,
/// closes and bytes sent and received per socket.
const BPFTRACE_TCP: &str = "BEGIN { printf(\"tracing\\n\"); } \
    tracepoint:sock:inet_sock_set_state /args->protocol == 6/ { \
      if (args->newstate == 2) { @syn[args->skaddr] = nsecs; } \
      if (args->oldstate == 2 && args->newstate == 1) { @connect = hist(nsecs - @syn[args->skaddr]); delete(@syn[args->skaddr]); } \
      if (args->newstate == 7) { @closes = count(); delete(@sent[args->skaddr]); delete(@received[args->skaddr]); } } \
    tracepoint:sock:sock_send_length /args->ret > 0/ { @sent[args->sk] = sum(args->ret); } \
    tracepoint:sock:sock_recv_length /args->ret > 0/ { @received[args->sk] = sum(args->ret); } \
    tracepoint:tcp:tcp_retransmit_skb { @retransmits = count(); }";

/// Runs the connect/send/close loop once on `cpu`; ns per connection.
fn tcp_loop(cpu: usize) -> f64 {
    let exe = std::env::current_exe().expect("current_exe").with_file_name("wt-tcp-loop");
    let out = Command::new(exe).args([CONNECTIONS.to_string(), cpu.to_string()]).output().expect("run wt-tcp-loop");
    assert!(out.status.success(), "wt-tcp-loop failed");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("ns per connection")
}

/// The tcp kind on its matching workload: the loop untraced, under wasmtap with
/// tcp-per-cgroup (4 records per connection: connect, accept, two closes), and under
/// bpftrace doing the same following in the kernel.
fn tcp_kind(cpus: usize) {
    let config = "[[plugin]]\nname = \"tcp-per-cgroup\"\nbundled = \"tcp-per-cgroup\"\n";
    let (mut untraced, mut wasmtap, mut bpftrace, mut daemon_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let cpu = round % cpus;
        untraced.push(tcp_loop(cpu));
        let daemon = Daemon::start(Some(config));
        let (ns, cpu_per_record) = traced(&daemon, "tcp-per-cgroup", "tcp", || tcp_loop(cpu), |_| 4.0 * CONNECTIONS as f64);
        wasmtap.push(ns);
        daemon_cpu.push(cpu_per_record);
        drop(daemon);
        bpftrace.push(with_bpftrace(BPFTRACE_TCP, || tcp_loop(cpu)));
        eprintln!(
            "round {}: cpu {cpu}  untraced {:.0}  wasmtap {:.0}  bpftrace {:.0} ns/connection",
            round + 1,
            untraced[round],
            wasmtap[round],
            bpftrace[round]
        );
    }
    let (base, w, b) = (median(untraced), median(wasmtap), median(bpftrace));
    println!("tcp kind: {CONNECTIONS} loopback connect + send 100 bytes + close, medians of {ROUNDS} rounds");
    println!(
        "  untraced {base:.0}  wasmtap tcp-per-cgroup {w:.0} (+{:.0})  bpftrace (same states and sends) {b:.0} (+{:.0}) ns/connection",
        w - base,
        b - base
    );
    println!("  host CPU per record (daemon user+sys / events delivered; 4 records per connection): {:.1} ns", median(daemon_cpu));
}

const FORKS: u64 = 2000;

/// Seconds each pgbench run lasts, and rounds (more than the other sections: a run's
/// throughput swings by 20 % on this VM, more than tracing costs).
const PGBENCH_SECONDS: u32 = 3;
const PG_ROUNDS: usize = 10;

/// CPU 1's busy time so far (/proc/stat, in ticks of 10 ms), in nanoseconds.
fn cpu1_busy_ns() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let line = stat.lines().find(|l| l.starts_with("cpu1 ")).expect("a cpu1 line");
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy: u64 = line.split_whitespace().skip(1).take(8).enumerate().filter(|(i, _)| ![3, 4].contains(i)).map(|(_, v)| v.parse::<u64>().unwrap_or(0)).sum();
    busy as f64 * 1e7
}

/// One pgbench select-only run over one connection, pgbench and the server's backend
/// sharing CPU 1 (the daemon and bpftrace drain on CPU 0): (transactions per second, CPU
/// 1's busy time per transaction in ns). The busy time is the steadier figure: the
/// throughput of this hand-over between two processes swings by 30 % between runs.
fn pgbench(pg: &Postgres) -> (f64, f64) {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "1"]).arg(postgres::bin_dir().join("pgbench")).args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres"]);
    let busy = cpu1_busy_ns();
    let out = cmd.args(["-S", "-n", "-c", "1", "-j", "1", "-T", &PGBENCH_SECONDS.to_string(), "postgres"]).output().expect("run pgbench");
    let busy = cpu1_busy_ns() - busy;
    assert!(out.status.success(), "pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| -> f64 {
        text.lines().find_map(|l| l.strip_prefix(prefix)?.split_whitespace().next()?.parse().ok()).unwrap_or_else(|| panic!("no {prefix:?} in {text}"))
    };
    (field("tps = "), busy / field("number of transactions actually processed: "))
}

/// The uprobe kind on PostgreSQL's query probes: pgbench select-only untraced, under
/// wasmtap with pg-query-latency (two records per query: start with the query text,
/// done), and under bpftrace timing the same probes (no query text).
fn pg_kind() {
    let pg = Postgres::start();
    // The postmaster's backends inherit its CPU.
    let pinned = Command::new("taskset").args(["-pc", "1", &pg.pid().to_string()]).output().expect("taskset (util-linux)");
    assert!(pinned.status.success(), "taskset failed");
    let init = pg.tool("pgbench").args(["-i", "-q", "-s", "1", "postgres"]).output().expect("pgbench -i");
    assert!(init.status.success(), "pgbench -i failed: {}", String::from_utf8_lossy(&init.stderr));
    let binary = postgres::bin_dir().join("postgres");
    let config = format!(
        "capabilities_keep = [\"bpf\", \"perfmon\", \"sys_admin\"]\n[[plugin]]\nname = \"pg-query-latency\"\nbundled = \"pg-query-latency\"\nconfig = {{ binary = \"{}\" }}\n",
        binary.display()
    );
    let program = format!(
        "BEGIN {{ printf(\"tracing\\n\"); }} usdt:{0}:postgresql:query__start {{ @start[tid] = nsecs; }} \
         usdt:{0}:postgresql:query__done /@start[tid]/ {{ @lat = hist(nsecs - @start[tid]); delete(@start[tid]); }}",
        binary.display()
    );
    let (mut untraced, mut wasmtap, mut bpftrace, mut daemon_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..PG_ROUNDS {
        untraced.push(pgbench(&pg));
        let daemon = Daemon::start(Some(&config));
        // Two records per query; pgbench's rate is an average, hence the margin.
        let min_records = |&(tps, _): &(f64, f64)| 2.0 * tps * f64::from(PGBENCH_SECONDS) * 0.9;
        let (run, cpu_per_record) = traced(&daemon, "pg-query-latency", "uprobe", || pgbench(&pg), min_records);
        wasmtap.push(run);
        daemon_cpu.push(cpu_per_record);
        drop(daemon);
        bpftrace.push(with_bpftrace(&program, || pgbench(&pg)));
        let show = |(tps, busy): (f64, f64)| format!("{tps:.0} tps {busy:.0} ns");
        eprintln!("round {}: untraced {}  wasmtap {}  bpftrace {}", round + 1, show(untraced[round]), show(wasmtap[round]), show(bpftrace[round]));
    }
    let tps = |runs: &[(f64, f64)]| median(runs.iter().map(|r| r.0).collect());
    let busy = |runs: &[(f64, f64)]| median(runs.iter().map(|r| r.1).collect());
    // Added CPU time per query, paired with each round's untraced run (the throughput
    // drifts between rounds more than tracing costs).
    let added = |runs: &[(f64, f64)]| median(runs.iter().zip(&untraced).map(|(t, u)| t.1 - u.1).collect());
    println!("uprobe kind: pgbench -S (select only, 1 connection, {PGBENCH_SECONDS} s; pgbench and the server on CPU 1), medians of {PG_ROUNDS} rounds");
    println!(
        "  untraced {:.0} tps, {:.0} ns CPU/query  wasmtap pg-query-latency {:.0} tps, {:.0} ns (+{:.0})  bpftrace (same probes, no query text) {:.0} tps, {:.0} ns (+{:.0})",
        tps(&untraced),
        busy(&untraced),
        tps(&wasmtap),
        busy(&wasmtap),
        added(&wasmtap),
        tps(&bpftrace),
        busy(&bpftrace),
        added(&bpftrace)
    );
    println!("  host CPU per record (daemon user+sys / events delivered; 2 records per query): {:.1} ns", median(daemon_cpu));
}

/// Runs the fork+exec+exit loop once on `cpu`; ns per iteration.
fn fork_loop(cpu: usize) -> f64 {
    let exe = std::env::current_exe().expect("current_exe").with_file_name("wt-fork-loop");
    let out = Command::new(exe).args([FORKS.to_string(), cpu.to_string()]).output().expect("run wt-fork-loop");
    assert!(out.status.success(), "wt-fork-loop failed");
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("ns per iteration")
}

/// Kernel time the programs with `ids` ran so far (bpf stats on), and their runs.
fn program_time(ids: &[u64]) -> (f64, u64) {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&u64::from(p.id())))
        .fold((0.0, 0), |(ns, runs), p| (ns + p.run_time().as_nanos() as f64, runs + p.run_count()))
}

/// The process kind alone (process-churn, with enrichment) against an untraced loop:
/// wall time per fork+exec+exit (noisy: an exec takes most of a millisecond here),
/// and, exactly, the kernel time its programs add (bpf stats) and the daemon's CPU.
fn process_kind(cpus: usize) {
    let config = "[[plugin]]\nname = \"process-churn\"\nbundled = \"process-churn\"\n";
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("enable bpf stats (root)");
    let (mut untraced, mut traced, mut kernel, mut daemon_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let cpu = round % cpus;
        untraced.push(fork_loop(cpu));
        let daemon = Daemon::start(Some(config));
        let status = daemon.status();
        let ids: Vec<u64> = status["probes"]
            .as_array()
            .expect("probes")
            .iter()
            .filter(|p| p["name"] == "process")
            .flat_map(|p| p["program_ids"].as_array().expect("ids").iter().filter_map(|v| v.as_u64()))
            .collect();
        let ((k0, _), c0) = (program_time(&ids), cpu_ns(daemon.child.id()));
        traced.push(fork_loop(cpu));
        // Let the plugin handle the loop's events before the daemon's CPU is read.
        let exits = |d: &Daemon| -> f64 {
            let m = d.metrics();
            m.lines().filter(|l| l.starts_with("process_churn_lifetime_seconds_count")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
        };
        wait_for(Duration::from_secs(30), "the exits to be counted", || (exits(&daemon) >= FORKS as f64).then_some(()));
        let ((k1, _), c1) = (program_time(&ids), cpu_ns(daemon.child.id()));
        kernel.push((k1 - k0) / FORKS as f64);
        daemon_cpu.push((c1 - c0) / FORKS as f64);
        drop(daemon);
    }
    let (base, wasmtap) = (median(untraced), median(traced));
    println!("process kind: {FORKS} fork+exec(/bin/true)+exit, medians of {ROUNDS} interleaved rounds");
    println!(
        "  wall: untraced {:.1} us  wasmtap (process-churn) {:.1} us  ({:+.1} us, within this VM's noise)",
        base / 1e3,
        wasmtap / 1e3,
        (wasmtap - base) / 1e3
    );
    println!("  added, measured exactly: kernel programs {:.0} ns + daemon CPU {:.0} ns per fork+exec+exit", median(kernel), median(daemon_cpu));
}

/// A cached enrichment lookup from a plugin: the hostile test plugin's `enrich-*` modes
/// make 1000 lookups per batch; a third instance with the same subscription and no
/// lookups gives the per-batch cost to take off.
fn enrichment() {
    let instance = |name: &str, mode: &str| {
        format!("[[plugin]]\nname = \"{name}\"\npath = \"{HOSTILE_WASM}\"\nconfig = {{ mode = \"{mode}\", comm = \"wt-syscall-loop\" }}\n\n")
    };
    let config = instance("e-process", "enrich-process") + &instance("e-cgroup", "enrich-cgroup") + &instance("e-none", "none");
    let daemon = Daemon::start(Some(&config));
    let calls = 400_000;
    syscall_loop_n(calls, 0);
    let get = |m: &str, name: &str, plugin: &str| sample(m, name, &[("plugin", plugin)]).unwrap_or(0.0);
    let m = wait_for(Duration::from_secs(60), "the plugins to catch up", || {
        let m = daemon.metrics();
        ["e-process", "e-cgroup", "e-none"].iter().all(|p| get(&m, "wasmtap_plugin_events_total", p) >= calls as f64).then_some(m)
    });
    let per_batch = |p: &str| get(&m, "wasmtap_plugin_busy_seconds_total", p) / get(&m, "wasmtap_plugin_batches_total", p);
    let base = per_batch("e-none");
    println!("enrichment: a cached lookup from a plugin (busy time per batch of 1000 lookups, minus a batch's own cost)");
    for (what, plugin) in [("process(pid, seen-ns)", "e-process"), ("cgroup(id)", "e-cgroup")] {
        println!("  {what:<22} {:>7.0} ns/call", (per_batch(plugin) - base) / 1000.0 * 1e9);
    }
}

/// A Loki push receiver that only counts the entries it takes (so it is never the
/// bottleneck): HTTP/1.1 keep-alive, one thread per connection.
fn loki_counter() -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::{io::Read as _, io::Write as _, sync::atomic::Ordering::Relaxed};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let counted = counted.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut writer = stream;
                loop {
                    let mut length = 0;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let push: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let entries: usize = push["streams"].as_array().into_iter().flatten().map(|s| s["values"].as_array().map_or(0, Vec::len)).sum();
                    counted.fetch_add(entries as u64, Relaxed);
                    if writer.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, count)
}

/// Log export to Loki: a plugin logs one record (three fields) per getppid of the
/// syscall loop; records/s delivered, and the daemon's CPU per record over the same
/// plugin logging nothing.
fn log_export() {
    use std::sync::atomic::Ordering::Relaxed;
    const RECORDS: u64 = 300_000;
    let (port, received) = loki_counter();
    let plugin = |mode: &str| {
        format!(
            "[[plugin]]\nname = \"logger\"\npath = \"{HOSTILE_WASM}\"\nlog_bytes_per_second = 67108864\nqueue_batches = 4096\n\
             config = {{ mode = \"{mode}\", comm = \"wt-syscall-loop\", syscall = \"getppid\", token = \"bench\" }}\n"
        )
    };
    let output = format!(
        "[[logs.output]]\nkind = \"loki\"\nurl = \"http://127.0.0.1:{port}/loki/api/v1/push\"\nbuffer_records = 400000\nbuffer_bytes = 1073741824\nbatch_records = 5000\nbatch_wait_ms = 100\n\n"
    );
    let mut cpu = Vec::new();
    let mut rates = Vec::new();
    for mode in ["none", "log-each"] {
        let daemon = Daemon::start(Some(&(output.clone() + &plugin(mode))));
        let before = received.load(Relaxed);
        let c0 = cpu_ns(daemon.child.id());
        let started = std::time::Instant::now();
        syscall_loop_n(RECORDS, 0);
        let events = || sample(&daemon.metrics(), "wasmtap_plugin_events_total", &[("plugin", "logger")]).unwrap_or(0.0);
        wait_for(Duration::from_secs(120), "the plugin to handle every call", || (events() >= RECORDS as f64).then_some(()));
        if mode == "log-each" {
            wait_for(Duration::from_secs(120), "Loki to receive every record", || (received.load(Relaxed) - before >= RECORDS).then_some(()));
            rates.push(RECORDS as f64 / started.elapsed().as_secs_f64());
            let dropped = wasmtap_tests::sum_samples(&daemon.metrics(), "wasmtap_log_dropped_records_total", &[]);
            assert_eq!(dropped, 0.0, "no record dropped");
        }
        cpu.push(cpu_ns(daemon.child.id()) - c0);
    }
    println!("log export to Loki (push API, JSON): one record with 3 fields per getppid, {RECORDS} records");
    println!("  delivered {:.0} records/s (loop start to the last record received)", rates[0]);
    println!(
        "  daemon CPU: {:.0} ms without logging, {:.0} ms logging and exporting: {:.0} ns per record (the plugin's log call, the host's record and the export)",
        cpu[0] / 1e6,
        cpu[1] / 1e6,
        (cpu[1] - cpu[0]) / RECORDS as f64
    );
}

/// The Python twin of syscall-latency beside the Rust plugin, each replayed over the
/// same recording of a syscall loop: component size, load (compile) and init time, and
/// events/s inside the plugin's batch calls.
fn python_plugin() {
    const CALLS: u64 = 1_000_000;
    let root = std::env::current_dir().expect("cwd");
    let python = root.join("target/python/syscall-latency-py.wasm");
    let dir = TempDir::new();
    let recording = dir.0.join("loop.wtrec");
    let wasmtap = loop_binary().with_file_name("wasmtap");
    let mut recorder = Command::new(&wasmtap)
        .args(["record", "--kinds", "syscall", "--comm", "wt-syscall-loop", "--out"])
        .arg(&recording)
        .stderr(Stdio::piped())
        .spawn()
        .expect("wasmtap record");
    let mut said = BufReader::new(recorder.stderr.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    syscall_loop_n(CALLS, 0);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(recorder.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    recorder.wait().unwrap();
    let replay = |source: &[&str]| {
        let out = Command::new(&wasmtap).arg("replay").args(source).args(["--name", "syscall-latency"]).arg(&recording).output().expect("replay");
        assert!(out.status.success(), "replay: {}", String::from_utf8_lossy(&out.stderr));
        let said = String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default().to_owned();
        // "replayed N records in B batches: X ms in the plugin (R records/s); loaded in L ms, init I ms"
        let number = |after: &str| {
            said.split(after)
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|n| n.trim_matches(|c| c == '(' || c == ',').parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        (number("ms in the plugin ("), number("loaded in "), number("init "), number("replayed "))
    };
    let (rust_rate, rust_load, rust_init, records) = replay(&["--bundled", "syscall-latency"]);
    let (py_rate, py_load, py_init, _) = replay(&["--path", python.to_str().unwrap()]);
    let py_size = std::fs::metadata(&python).map_or(0, |m| m.len());
    let rust_size = std::fs::read_dir(root.join("target/release/build"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|d| d.path().join("out/plugins-target/wasm32-wasip2/release/syscall_latency.wasm"))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    println!("second plugin language: syscall-latency in Python (componentize-py) beside Rust, replaying the same {records:.0} records (a syscall loop)");
    println!("  {:<8} {:>12} {:>14} {:>10} {:>16}", "", "component", "load+compile", "init", "events/s");
    println!("  {:<8} {:>9.0} KiB {:>11.0} ms {:>7.0} ms {:>16.0}", "Rust", rust_size as f64 / 1024.0, rust_load, rust_init, rust_rate);
    println!("  {:<8} {:>9.0} KiB {:>11.0} ms {:>7.0} ms {:>16.0}", "Python", py_size as f64 / 1024.0, py_load, py_init, py_rate);
    println!("  Python / Rust events/s: {:.3}", py_rate / rust_rate);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !std::path::Path::new("/sys/kernel/tracing/events").exists() {
        // bpftrace attaches classic tracepoints through tracefs.
        let _ = Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]).status();
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    // One section only: `wasmtap-bench overhead|process|enrichment|sched|tcp|pg|logs|python|swap|load`.
    let only = std::env::args().nth(1);
    let run = |section: &str| only.as_deref().is_none_or(|o| o == section);
    if run("overhead") {
        overhead(cpus);
    }
    if run("process") {
        process_kind(cpus);
    }
    if run("enrichment") {
        enrichment();
    }
    if run("sched") {
        sched_kind(cpus);
    }
    if run("tcp") {
        tcp_kind(cpus);
    }
    if run("pg") {
        // pgbench and the server share one CPU, the daemon drains on another.
        if cpus >= 2 { pg_kind() } else { println!("uprobe kind: needs two CPUs, this machine has one") }
    }
    if run("logs") {
        log_export();
    }
    if run("python") {
        python_plugin();
    }
    if run("swap") {
        swap();
    }
    if run("load") {
        cold_load();
    }
}

/// The traced workload (untraced, wasmtap, bpftrace) and host CPU per event.
fn overhead(cpus: usize) {
    // (cpu, untraced, wasmtap, bpftrace, wasmtap CPU ns/event) per round.
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let cpu = round % cpus;
        let base = syscall_loop(cpu);
        let w = under_wasmtap(cpu);
        let b = under_bpftrace(cpu);
        eprintln!(
            "round {}: cpu {cpu}  untraced {base:.0}  wasmtap {:.0}  bpftrace {b:.0} ns/call; wasmtap CPU {:.1} ns/event",
            round + 1,
            w.ns_per_call,
            w.cpu_ns_per_event
        );
        rounds.push((cpu, base, w.ns_per_call, b, w.cpu_ns_per_event));
    }
    println!("traced workload: {CALLS} getppid calls, medians of {ROUNDS} interleaved rounds, loop pinned to each CPU in turn");
    let mut groups: Vec<(String, Vec<_>)> = (0..cpus.min(ROUNDS)).map(|c| (format!("cpu {c}"), rounds.iter().filter(|r| r.0 == c).collect())).collect();
    groups.push(("all".into(), rounds.iter().collect()));
    for (name, rs) in &groups {
        let pick = |f: fn(&&(usize, f64, f64, f64, f64)) -> f64| median(rs.iter().map(f).collect());
        let (base, wasmtap, bpftrace) = (pick(|r| r.1), pick(|r| r.2), pick(|r| r.3));
        let (w_added, b_added) = (wasmtap - base, bpftrace - base);
        println!(
            "  {name:<5} untraced {base:>5.0}  wasmtap {wasmtap:>5.0} (+{w_added:.0})  bpftrace {bpftrace:>5.0} (+{b_added:.0}) ns/call  \
             wasmtap/bpftrace added: {:.2}  (target <= 0.65)",
            w_added / b_added
        );
    }
    let cpu = median(rounds.iter().map(|r| r.4).collect());
    println!("host CPU per event (daemon user+sys / events delivered): {cpu:.1} ns   (target <= 40)");
}

const SWAPS: usize = 40;

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Replaces syscall-latency (default config: every process) over and over, alternating
/// its two builds, while a getppid loop feeds it: the time from each replace request to
/// the first batch the new build handled (the daemon measures it: `swap_us` in the admin
/// API's plugin list), and the request's round trip (it answers once the new build runs).
fn swap() {
    let daemon = Daemon::start(None);
    let socket = daemon.admin_socket();
    let events = |d: &Daemon| sample(&d.metrics(), "wasmtap_plugin_events_total", &[("plugin", "syscall-latency")]).unwrap_or(0.0);
    // One loop, on CPU 0 (a second one would take the CPU the daemon works on).
    let mut feed = [Command::new(loop_binary()).args(["4000000000", "0"]).spawn().expect("run wt-syscall-loop")];
    wait_for(Duration::from_secs(10), "the feed to flow", || (events(&daemon) > 1e6).then_some(()));
    let (e0, t0) = (events(&daemon), std::time::Instant::now());
    let (mut first_batch, mut round_trip) = (Vec::new(), Vec::new());
    for i in 0..SWAPS {
        let body = if i % 2 == 0 { format!("path = {:?}", SYSCALL_LATENCY_VARIANT_WASM) } else { "bundled = \"syscall-latency\"".into() };
        let started = std::time::Instant::now();
        let (code, answer) = admin_call(&socket, "PUT", "/v1/plugins/syscall-latency", &body);
        round_trip.push(started.elapsed().as_secs_f64() * 1e3);
        assert_eq!(code, 200, "{answer}");
        let version = answer["version"].as_str().expect("version").to_owned();
        let us = wait_for(Duration::from_secs(10), "the new build's first batch", || {
            let (_, list) = admin_call(&socket, "GET", "/v1/plugins", "");
            list.as_array()?.iter().find(|p| p["name"] == "syscall-latency" && p["version"] == version.as_str())?["swap_us"].as_f64()
        });
        first_batch.push(us / 1e3);
    }
    let rate = (events(&daemon) - e0) / t0.elapsed().as_secs_f64();
    for loop_ in &mut feed {
        let _ = loop_.kill();
        let _ = loop_.wait();
    }
    println!("hot swap: {SWAPS} replaces of syscall-latency alternating two builds, fed {:.2} M events/s", rate / 1e6);
    println!(
        "  request to the new build's first batch: p50 {:.2} ms  p99 {:.2} ms  (target p99 < 5 ms)",
        percentile(first_batch.clone(), 0.5),
        percentile(first_batch, 0.99)
    );
    println!(
        "  request round trip (answered once the new build runs): p50 {:.2} ms  p99 {:.2} ms",
        percentile(round_trip.clone(), 0.5),
        percentile(round_trip, 0.99)
    );
}

/// Loading a plugin through the admin API (request to running): compiled (empty
/// precompiled cache; in a child process), from the on-disk cache (a fresh daemon), and
/// from the daemon's memory (loaded again). The bundled syscall-latency keeps the kinds
/// attached, so no probe attach is counted.
fn cold_load() {
    let cache = TempDir::new();
    let config = format!("cache_dir = {:?}\n[[plugin]]\nname = \"syscall-latency\"\nbundled = \"syscall-latency\"\n", cache.0.display().to_string());
    let body = format!("name = \"v\"\npath = {:?}\n", SYSCALL_LATENCY_VARIANT_WASM);
    let load = |daemon: &Daemon| {
        let started = std::time::Instant::now();
        let (code, answer) = admin_call(&daemon.admin_socket(), "POST", "/v1/plugins", &body);
        assert_eq!(code, 201, "{answer}");
        let ms = started.elapsed().as_secs_f64() * 1e3;
        assert_eq!(admin_call(&daemon.admin_socket(), "DELETE", "/v1/plugins/v", "").0, 200);
        ms
    };
    let (mut compiled, mut disk, mut memory) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        for entry in std::fs::read_dir(&cache.0).expect("cache dir").filter_map(Result::ok) {
            let _ = std::fs::remove_file(entry.path());
        }
        compiled.push(load(&Daemon::start(Some(&config))));
        let daemon = Daemon::start(Some(&config));
        disk.push(load(&daemon));
        memory.push(load(&daemon));
    }
    let kib = std::fs::metadata(SYSCALL_LATENCY_VARIANT_WASM).map_or(0, |m| m.len() / 1024);
    println!("plugin load (syscall-latency variant, {kib} KiB component, request to running), medians of 3:");
    println!("  compiled {:.0} ms   from the on-disk cache {:.1} ms   from memory {:.1} ms", median(compiled), median(disk), median(memory));
}
