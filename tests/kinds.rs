//! Event kinds against the real kernel: the process kind with enrichment (exact counts
//! from a workload the test makes, in cgroups it makes), the pid-reuse fix of the
//! syscall kind, and compatibility: a plugin built against the frozen WIT 0.2.0 loads
//! and counts exactly in this host, reading the prefix it knows of grown records.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::symlink,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use wasmtap_tests::{Cgroup, Daemon, TempDir, built, privileged_or_skip, promtool_problems, sample, unique_comm, wait_for, workload};

const COMPAT: &str = env!("COMPAT_WASM");

fn counter(metrics: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    sample(metrics, name, labels).unwrap_or(0.0) as u64
}

/// One `wt-workload churn` run: `forks` children exiting with `codes` distinct codes,
/// and `execs` children exec'ing `exec_path`.
struct Churn<'a> {
    comm: &'a str,
    forks: u32,
    codes: u32,
    exec_path: &'a str,
    execs: u32,
}

/// Runs `run` in `cgroup`, waiting while the exec'd children live until the plugin
/// counted their execs (and the workload's own) as `(container, exe)` (enrichment
/// reads their facts then);
/// returns once everything has exited.
fn churn(daemon: &Daemon, cgroup: &Cgroup, run: Churn<'_>, container: &str, exe: &str) {
    let Churn { comm, forks, codes, exec_path, execs } = run;
    // Into the cgroup before wt-workload is exec'd: moved after `spawn` returns, its
    // exec could still be reported from the cgroup it then is in (execve tells the
    // parent it succeeded before the kernel reports the exec).
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"", cgroup.0.display()))
        .arg(built("wt-workload"))
        .args(["churn", comm, &forks.to_string(), &codes.to_string(), exec_path, &execs.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn wt-workload churn");
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut spawned = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut spawned).expect("read spawned");
    assert_eq!(spawned.trim(), "spawned");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = daemon.metrics();
        // Its held children's execs, and its own.
        if counter(&m, "process_churn_execs_total", &[("container", container), ("exe", exe)]) == u64::from(execs) + 1 {
            break;
        }
        if Instant::now() > deadline {
            let execs: Vec<&str> = m.lines().filter(|l| l.starts_with("process_churn_execs_total") || l.starts_with("wasmtap_probe")).collect();
            panic!("timed out after 20s waiting for the execs to be counted as ({container}, {exe}):\n{}\n{}", execs.join("\n"), daemon.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.stdin.as_mut().unwrap().write_all(b"release\n").unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn process_churn_counts_forks_execs_and_exit_codes_per_container_exactly() {
    if !privileged_or_skip("process_churn_counts_forks_execs_and_exit_codes_per_container_exactly") {
        return;
    }
    // sys_ptrace: enrichment reads the executables' real paths.
    let mut daemon = Daemon::spawn_with_args(None, 200, None, &["--capabilities-keep", "bpf,perfmon,sys_ptrace"]);
    let (forks, codes, execs) = (24, 3, 4);
    // Exec'd through a symlink: the record carries the path given to exec, enrichment
    // the executable's real path, which is what the plugin labels with.
    let dir = TempDir::new();
    let link = dir.0.join("wt-hold");
    symlink(built("wt-workload"), &link).unwrap();
    let exe = built("wt-workload").canonicalize().unwrap().display().to_string();

    let plain = Cgroup::new("churn");
    let comm = unique_comm("ch");
    let exec_path = link.to_str().unwrap();
    churn(&daemon, &plain, Churn { comm: &comm, forks, codes, exec_path, execs }, &plain.path(), &exe);
    let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    let docker = plain.child(&format!("docker-{id}.scope"));
    churn(&daemon, &docker, Churn { comm: &unique_comm("dk"), forks: 5, codes: 1, exec_path, execs: 1 }, id, &exe);

    // The workload itself and its held children exit with 0, its forks with 10, 11, 12.
    let container = plain.path();
    let exits = |m: &str, c: &str, code: &str| counter(m, "process_churn_exits_total", &[("container", c), ("code", code)]);
    let m = wait_for(Duration::from_secs(20), "every exit to be counted", || {
        let m = daemon.metrics();
        (exits(&m, &container, "0") == u64::from(execs) + 1 && exits(&m, id, "0") == 2).then_some(m)
    });
    assert_eq!(counter(&m, "process_churn_forks_total", &[("container", &container)]), u64::from(forks + execs));
    for code in 0..codes {
        assert_eq!(exits(&m, &container, &(10 + code).to_string()), u64::from(forks / codes), "exit code {}", 10 + code);
    }
    let lifetimes = counter(&m, "process_churn_lifetime_seconds_count", &[("container", &container)]);
    assert_eq!(lifetimes, u64::from(forks + execs + 1), "one lifetime per exit");
    // The container-style cgroup is labelled with its container id.
    assert_eq!(counter(&m, "process_churn_forks_total", &[("container", id)]), 6);
    assert_eq!(exits(&m, id, "10"), 5);
    assert_eq!(promtool_problems(&m), None);
    daemon.terminate();
}

#[test]
fn no_syscall_is_paired_with_a_dead_threads_entry_after_pid_reuse() {
    if !privileged_or_skip("no_syscall_is_paired_with_a_dead_threads_entry_after_pid_reuse") {
        return;
    }
    let comm = unique_comm("ru");
    let config = format!("[[plugin]]\nname = \"reuse\"\nbundled = \"syscall-latency\"\nconfig = {{ comms = [\"{comm}\"] }}\n");
    let mut daemon = Daemon::start(Some(&config));
    let rounds = 300;
    let started = Instant::now();
    let out = Command::new(built("wt-workload")).args(["reuse", &comm, &rounds.to_string()]).output().expect("run wt-workload reuse");
    let duration = started.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reused: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(reused >= rounds / 2, "only {reused} of {rounds} forks reused the pid: the test did not exercise reuse");

    // Every round's parent makes wait4 and write calls; wait for them to arrive.
    let m = wait_for(Duration::from_secs(20), "the workload's syscalls", || {
        let m = daemon.metrics();
        (sample(&m, "reuse_seconds_count", &[("comm", &comm), ("syscall", "wait4")]).unwrap_or(0.0) >= f64::from(2 * rounds)).then_some(m)
    });
    let ours: Vec<&str> = m.lines().filter(|l| l.starts_with("reuse_seconds_bucket{") && l.contains(&format!("comm=\"{comm}\""))).collect();
    for dying in ["exit", "exit_group"] {
        assert!(!ours.iter().any(|l| l.contains(&format!("syscall=\"{dying}\""))), "a latency for {dying}, which never returns:\n{}", ours.join("\n"));
    }
    // No latency longer than the whole workload: each series' bucket just above the
    // duration already holds all of its observations.
    let limit = duration.as_secs_f64();
    for line in &ours {
        let (labels, value) = line.rsplit_once(' ').unwrap();
        let le: f64 = labels.split("le=\"").nth(1).unwrap().trim_end_matches("\"}").replace("+Inf", "inf").parse().unwrap();
        if le >= limit && le.is_finite() {
            let total = labels.replace(&format!("le=\"{}\"", labels.split("le=\"").nth(1).unwrap().trim_end_matches("\"}")), "le=\"+Inf\"");
            let all = ours.iter().find(|l| l.starts_with(&total)).unwrap().rsplit_once(' ').unwrap().1;
            assert_eq!(value, all, "a latency beyond the workload's {duration:?}: {line}");
        }
    }
    daemon.terminate();
}

#[test]
fn a_plugin_built_against_wit_0_2_0_loads_and_counts_exactly() {
    if !privileged_or_skip("a_plugin_built_against_wit_0_2_0_loads_and_counts_exactly") {
        return;
    }
    let comm = unique_comm("cp");
    let config = format!("[[plugin]]\nname = \"compat\"\npath = \"{COMPAT}\"\nconfig = {{ comm = \"{comm}\" }}\n");
    let mut daemon = Daemon::start(Some(&config));
    assert_eq!(daemon.plugin_status("compat")["state"], "running");
    // Syscalls by the comm, and exits of its processes (records the host has grown
    // since 0.2.0: the plugin reads its 64-byte prefix at the host's stride).
    let calls = 2500;
    let mut child = workload(&comm, calls, 0, true);
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(child.wait().unwrap().success());
    let (forks, codes) = (9, 3);
    let mut churn = Command::new(built("wt-workload"))
        .args(["churn", &comm, &forks.to_string(), &codes.to_string(), "/nonexistent", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    churn.stdin.as_mut().unwrap().write_all(b"go\nrelease\n").unwrap();
    assert!(churn.wait().unwrap().success());

    let getppid = wasmtap_nr("getppid");
    let m = wait_for(Duration::from_secs(20), "the fixture's counts", || {
        let m = daemon.metrics();
        let done = counter(&m, "compat_calls_total", &[("nr", &getppid)]) >= calls && counter(&m, "compat_exits_total", &[("code", "0")]) >= 2;
        done.then_some(m)
    });
    assert_eq!(counter(&m, "compat_calls_total", &[("nr", &getppid)]), calls);
    // The two workload processes exit with 0; the churn's forks with 10, 11, 12.
    assert_eq!(counter(&m, "compat_exits_total", &[("code", "0")]), 2);
    for code in 10..13 {
        assert_eq!(counter(&m, "compat_exits_total", &[("code", &code.to_string())]), 3, "code {code}");
    }
    daemon.terminate();
}

/// The syscall number of `name` on this architecture, as the fixture labels it.
fn wasmtap_nr(name: &str) -> String {
    match (std::env::consts::ARCH, name) {
        ("x86_64", "getppid") => "110".into(),
        ("aarch64", "getppid") => "173".into(),
        (arch, name) => panic!("no number for {name} on {arch}"),
    }
}
