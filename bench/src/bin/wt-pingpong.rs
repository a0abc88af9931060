//! The sched kind's workload: two threads pinned to one CPU hand a byte back and forth
//! over two pipes N times, so every hand-over is a wakeup and a context switch; prints
//! ns per hand-over (half a round trip).
//!
//! usage: wt-pingpong N CPU

use std::{
    fs::File,
    io::{Read as _, Write as _},
};

use nix::{sched::CpuSet, unistd::Pid};

fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).expect("CPU in range");
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set).expect("pin to CPU");
}

/// Reads a byte from `from` and writes it to `to`, `n` times (`first`: write first).
fn relay(mut from: File, mut to: File, n: u64, first: bool) {
    let mut byte = [0u8; 1];
    for _ in 0..n {
        if first {
            to.write_all(&byte).expect("write");
            from.read_exact(&mut byte).expect("read");
        } else {
            from.read_exact(&mut byte).expect("read");
            to.write_all(&byte).expect("write");
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).expect("usage: wt-pingpong N CPU");
    let cpu: usize = args.next().and_then(|a| a.parse().ok()).expect("usage: wt-pingpong N CPU");
    nix::sys::prctl::set_name(c"wt-pingpong").expect("prctl");
    let (ping_r, ping_w) = nix::unistd::pipe().expect("pipe");
    let (pong_r, pong_w) = nix::unistd::pipe().expect("pipe");
    pin(cpu);
    let started = std::time::Instant::now();
    let other = std::thread::spawn(move || {
        pin(cpu);
        relay(File::from(ping_r), File::from(pong_w), n, false);
    });
    relay(File::from(pong_r), File::from(ping_w), n, true);
    other.join().expect("the other thread");
    println!("{:.1}", started.elapsed().as_nanos() as f64 / (2 * n) as f64);
}
