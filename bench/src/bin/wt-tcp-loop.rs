//! The tcp kind's workload: N times connect to a local listener, send 100 bytes, close
//! once the other side has read them and closed (a thread accepts and reads); pinned to
//! one CPU; prints ns per connection.
//!
//! usage: wt-tcp-loop N CPU

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
};

use nix::{sched::CpuSet, unistd::Pid};

fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    set.set(cpu).expect("CPU in range");
    nix::sched::sched_setaffinity(Pid::from_raw(0), &set).expect("pin to CPU");
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).expect("usage: wt-tcp-loop N CPU");
    let cpu: usize = args.next().and_then(|a| a.parse().ok()).expect("usage: wt-tcp-loop N CPU");
    nix::sys::prctl::set_name(c"wt-tcp-loop").expect("prctl");
    pin(cpu);
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        pin(cpu);
        for _ in 0..n {
            let (mut conn, _) = listener.accept().expect("accept");
            std::io::copy(&mut conn, &mut std::io::sink()).expect("read");
        }
    });
    let payload = [7u8; 100];
    let started = std::time::Instant::now();
    for _ in 0..n {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        conn.write_all(&payload).expect("send");
        conn.shutdown(Shutdown::Write).expect("shutdown");
        assert_eq!(conn.read(&mut [0u8; 1]).expect("read"), 0);
    }
    server.join().expect("server");
    println!("{:.1}", started.elapsed().as_nanos() as f64 / n as f64);
}
