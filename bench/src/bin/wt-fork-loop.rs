//! The process-kind workload: N times fork, exec `/bin/true` in the child, wait;
//! optionally pinned to one CPU; prints ns per fork+exec+exit.
//!
//! usage: wt-fork-loop N [CPU]

use std::process::Command;

use nix::{sched::CpuSet, unistd::Pid};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).expect("usage: wt-fork-loop N [CPU]");
    if let Some(cpu) = args.next() {
        let mut set = CpuSet::new();
        set.set(cpu.parse().expect("CPU")).expect("CPU in range");
        nix::sched::sched_setaffinity(Pid::from_raw(0), &set).expect("pin to CPU");
    }
    nix::sys::prctl::set_name(c"wt-fork-loop").expect("prctl");
    let started = std::time::Instant::now();
    for _ in 0..n {
        assert!(Command::new("/bin/true").status().expect("run /bin/true").success());
    }
    println!("{:.1}", started.elapsed().as_nanos() as f64 / n as f64);
}
