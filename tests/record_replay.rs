//! Record and replay: `wasmtap record` captures a workload's events beside a live
//! daemon, and `wasmtap replay`, run as an unprivileged user, gives the plugin's metrics
//! exactly as the live daemon serves them.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    process::{Command, Stdio},
    time::Duration,
};

use wasmtap_tests::{Daemon, TempDir, built, privileged_or_skip, run_workload, sample, unique_comm, wait_for};

/// `nobody`.
const UNPRIVILEGED: u32 = 65534;

/// The lines of a scrape that belong to `comm`'s series of syscall-latency.
fn series_of(text: &str, comm: &str) -> Vec<String> {
    let mut lines: Vec<String> =
        text.lines().filter(|l| l.starts_with("syscall_latency_") && l.contains(&format!("comm=\"{comm}\""))).map(str::to_owned).collect();
    lines.sort();
    lines
}

#[test]
fn a_replay_of_a_live_recording_gives_exactly_the_live_metrics_without_root() {
    if !privileged_or_skip("a_replay_of_a_live_recording_gives_exactly_the_live_metrics_without_root") {
        return;
    }
    let comm = unique_comm("rec");
    let config = format!("[[plugin]]\nname = \"syscall-latency\"\nbundled = \"syscall-latency\"\n[plugin.config]\ncomms = [\"{comm}\"]\n");
    // Readable by `nobody`: the replay runs as that user, from a copy of the binary
    // (the checkout may be below a directory only root can enter).
    let dir = TempDir::new();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.0.join("wasmtap");
    std::fs::copy(built("wasmtap"), &binary).unwrap();
    let recording = dir.0.join("live.wtrec");
    let mut daemon = Daemon::spawn_with_args(Some(&config), 200, None, &["--record", recording.to_str().unwrap()]);
    run_workload(&comm, 3000, 40);
    let live_count = || sample(&daemon.metrics(), "syscall_latency_seconds_count", &[("comm", &comm), ("syscall", "getppid")]);
    wait_for(Duration::from_secs(20), "the live plugin to count the workload", || (live_count() == Some(3000.0)).then_some(()));
    let live = series_of(&daemon.metrics(), &comm);
    daemon.terminate(); // finishes the recording
    assert!(daemon.log().contains("recording written"), "{}", daemon.log());
    std::fs::set_permissions(&recording, std::fs::Permissions::from_mode(0o644)).unwrap();

    let replay = Command::new(&binary)
        .args(["replay", "--bundled", "syscall-latency", "--set"])
        .arg(format!("comms = [\"{comm}\"]"))
        .arg(&recording)
        .uid(UNPRIVILEGED)
        .gid(UNPRIVILEGED)
        .output()
        .unwrap();
    assert!(replay.status.success(), "replay failed: {}", String::from_utf8_lossy(&replay.stderr));
    let replayed = series_of(&String::from_utf8_lossy(&replay.stdout), &comm);
    assert!(live.iter().any(|l| l.contains("syscall=\"openat\"") && l.contains("errno=\"ENOENT\"")), "{live:#?}");
    assert!(replayed.len() > 40, "every bucket of every series: {replayed:#?}");
    assert_eq!(replayed, live, "the replay's series are the live ones, bucket for bucket, sums to the last digit");
}

/// `wasmtap record` (its own probes, filtered in the kernel by comm) and a replay as an
/// unprivileged user: every call of the workload, counted exactly.
#[test]
fn wasmtap_record_captures_a_workload_for_an_unprivileged_replay() {
    if !privileged_or_skip("wasmtap_record_captures_a_workload_for_an_unprivileged_replay") {
        return;
    }
    let comm = unique_comm("rec");
    let dir = TempDir::new();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.0.join("wasmtap");
    std::fs::copy(built("wasmtap"), &binary).unwrap();
    let recording = dir.0.join("run.wtrec");
    let mut recorder =
        Command::new(&binary).args(["record", "--kinds", "syscall,process", "--comm", &comm, "--out"]).arg(&recording).stderr(Stdio::piped()).spawn().unwrap();
    let mut said = BufReader::new(recorder.stderr.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    assert!(line.starts_with("recording syscall, process to"), "the recorder attached: {line}");
    run_workload(&comm, 2500, 30);
    // The workload has exited; its last records reach the file when the recorder stops.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(recorder.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(recorder.wait().unwrap().success());
    let mut summary = String::new();
    std::io::Read::read_to_string(&mut said, &mut summary).unwrap();
    assert!(summary.contains("0 dropped"), "{summary}");
    std::fs::set_permissions(&recording, std::fs::Permissions::from_mode(0o644)).unwrap();
    let replay = Command::new(&binary).args(["replay", "--bundled", "syscall-latency"]).arg(&recording).uid(UNPRIVILEGED).gid(UNPRIVILEGED).output().unwrap();
    assert!(replay.status.success(), "replay failed: {}", String::from_utf8_lossy(&replay.stderr));
    let text = String::from_utf8_lossy(&replay.stdout);
    assert_eq!(sample(&text, "syscall_latency_seconds_count", &[("comm", &comm), ("syscall", "getppid")]), Some(2500.0));
    assert_eq!(sample(&text, "syscall_latency_errors_total", &[("comm", &comm), ("syscall", "openat"), ("errno", "ENOENT")]), Some(30.0));
}

#[test]
fn replay_says_what_is_wrong_with_its_input() {
    let dir = TempDir::new();
    let bad = dir.0.join("bad.wtrec");
    std::fs::write(&bad, "not a recording").unwrap();
    let out = Command::new(built("wasmtap")).args(["replay", "--bundled", "syscall-latency"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a wasmtap recording"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(built("wasmtap")).args(["replay"]).arg(&bad).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--path FILE.wasm or --bundled NAME"));
}

/// The Python twin of syscall-latency (plugins/syscall-latency-py, built by `./dev` with
/// componentize-py) gives the Rust plugin's exposition, line for line, on the same
/// recording.
#[test]
fn the_python_plugin_gives_exactly_the_rust_plugins_metrics_on_the_same_recording() {
    if !privileged_or_skip("the_python_plugin_gives_exactly_the_rust_plugins_metrics_on_the_same_recording") {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let python = root.join("target/python/syscall-latency-py.wasm");
    assert!(python.is_file(), "{} is missing: `./dev test` builds it (componentize-py)", python.display());
    let comm = unique_comm("py");
    let config = format!("[[plugin]]\nname = \"syscall-latency\"\nbundled = \"syscall-latency\"\n[plugin.config]\ncomms = [\"{comm}\"]\n");
    let dir = TempDir::new();
    let recording = dir.0.join("twin.wtrec");
    let mut daemon = Daemon::spawn_with_args(Some(&config), 200, None, &["--record", recording.to_str().unwrap()]);
    run_workload(&comm, 5000, 60);
    wait_for(Duration::from_secs(20), "the live plugin to count the workload", || {
        (sample(&daemon.metrics(), "syscall_latency_seconds_count", &[("comm", &comm), ("syscall", "getppid")]) == Some(5000.0)).then_some(())
    });
    daemon.terminate();
    let replay = |source: &[&str]| {
        let out = Command::new(built("wasmtap"))
            .arg("replay")
            .args(source)
            .args(["--name", "syscall-latency", "--set"])
            .arg(format!("comms = [\"{comm}\"]"))
            .arg(&recording)
            .output()
            .unwrap();
        assert!(out.status.success(), "replay {source:?}: {}", String::from_utf8_lossy(&out.stderr));
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
        lines.sort();
        lines
    };
    let rust = replay(&["--bundled", "syscall-latency"]);
    let python = replay(&["--path", python.to_str().unwrap()]);
    assert!(rust.iter().any(|l| l.contains(&comm) && l.contains("errno=\"ENOENT\"} 60")), "{rust:#?}");
    assert_eq!(python, rust, "the same exposition, HELP and TYPE lines, buckets and sums included");
}
