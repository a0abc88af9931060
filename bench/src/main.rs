//! Traced-workload overhead and host CPU per event.
//!
//! Runs the same getppid loop untraced, under wasmtap (embedded default config:
//! syscall-latency observing every process), and under bpftrace running the same
//! per-comm latency histogram on raw_syscalls, interleaved over several rounds, and
//! prints medians side by side. Also the daemon's CPU time per event at the loop's
//! full rate. Prints; asserts nothing.
//!
//! ./dev bench   (root)

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use wasmtap_tests::{Daemon, sample, wait_for};

const CALLS: u64 = 3_000_000;
const ROUNDS: usize = 5;
const BPFTRACE_PROGRAM: &str = "tracepoint:raw_syscalls:sys_enter { @start[tid] = nsecs; } \
    tracepoint:raw_syscalls:sys_exit /@start[tid]/ { @lat[comm] = hist(nsecs - @start[tid]); delete(@start[tid]); }";

fn loop_binary() -> PathBuf {
    std::env::current_exe().expect("current_exe").with_file_name("wt-syscall-loop")
}

/// Runs the loop once; ns per call.
fn syscall_loop() -> f64 {
    let out = Command::new(loop_binary()).arg(CALLS.to_string()).output().expect("run wt-syscall-loop");
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

fn under_wasmtap() -> WasmtapRun {
    let daemon = Daemon::start(None);
    let events = |d: &Daemon| sample(&d.metrics(), "wasmtap_plugin_events_total", &[("plugin", "syscall-latency")]).unwrap_or(0.0);
    let read = |d: &Daemon| sample(&d.metrics(), "wasmtap_probe_records_total", &[("probe", "syscalls")]).unwrap_or(0.0);
    let (events0, cpu0) = (events(&daemon), cpu_ns(daemon.child.id()));
    let ns_per_call = syscall_loop();
    // Wait until the plugin has everything the probe read, so the CPU spent on this
    // loop's events is all counted.
    let events1 = wait_for(Duration::from_secs(30), "the plugin to catch up", || {
        let (e, r) = (events(&daemon), read(&daemon));
        (e >= r && e - events0 >= CALLS as f64).then_some(e)
    });
    let cpu1 = cpu_ns(daemon.child.id());
    WasmtapRun { ns_per_call, cpu_ns_per_event: (cpu1 - cpu0) / (events1 - events0) }
}

fn under_bpftrace() -> f64 {
    let mut bpftrace = Command::new("bpftrace")
        .args(["-e", BPFTRACE_PROGRAM])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bpftrace is installed (./dev setup installs it)");
    // bpftrace prints "Attaching N probes..." once its programs are attached.
    let mut stdout = BufReader::new(bpftrace.stdout.take().unwrap());
    let mut line = String::new();
    while stdout.read_line(&mut line).expect("bpftrace stdout") > 0 && !line.contains("Attaching") {
        line.clear();
    }
    // Give bpftrace its own drain of the remaining output so it never blocks on a pipe.
    let drain = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let ns = syscall_loop();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(bpftrace.id() as i32), nix::sys::signal::SIGINT).ok();
    bpftrace.wait().expect("bpftrace exit");
    let _ = drain.join();
    ns
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
    let (mut base, mut wasmtap, mut cpu, mut bpftrace) = (vec![], vec![], vec![], vec![]);
    for round in 1..=ROUNDS {
        base.push(syscall_loop());
        let w = under_wasmtap();
        wasmtap.push(w.ns_per_call);
        cpu.push(w.cpu_ns_per_event);
        bpftrace.push(under_bpftrace());
        eprintln!(
            "round {round}: untraced {:.0}  wasmtap {:.0}  bpftrace {:.0} ns/call; wasmtap CPU {:.1} ns/event",
            base[round - 1], wasmtap[round - 1], bpftrace[round - 1], cpu[round - 1]
        );
    }
    let (base, wasmtap, bpftrace, cpu) = (median(base), median(wasmtap), median(bpftrace), median(cpu));
    let (w_added, b_added) = (wasmtap - base, bpftrace - base);
    println!("traced workload: {CALLS} getppid calls, median of {ROUNDS} interleaved rounds");
    println!("  untraced                                   {base:>7.0} ns/call");
    println!("  wasmtap (syscall-latency, all processes)   {wasmtap:>7.0} ns/call  (+{w_added:.0})");
    println!("  bpftrace (per-comm hist on raw_syscalls)   {bpftrace:>7.0} ns/call  (+{b_added:.0})");
    println!("  wasmtap added / bpftrace added: {:.2}   (target <= 0.65)", w_added / b_added);
    println!("host CPU per event (daemon user+sys / events delivered): {cpu:.1} ns   (target <= 50)");
}
