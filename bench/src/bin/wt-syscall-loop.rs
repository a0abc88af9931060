//! The traced workload: N getppid calls in a tight loop; prints ns per call.
//!
//! usage: wt-syscall-loop N

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).expect("usage: wt-syscall-loop N");
    nix::sys::prctl::set_name(c"wt-syscall-loop").expect("prctl");
    let started = std::time::Instant::now();
    for _ in 0..n {
        std::hint::black_box(nix::unistd::getppid());
    }
    println!("{:.1}", started.elapsed().as_nanos() as f64 / n as f64);
}
