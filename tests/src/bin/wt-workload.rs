//! Test workload with a chosen comm. Modes:
//!
//! - `wt-workload COMM GETPPID_CALLS OPENAT_CALLS [--wait-stdin]`: optionally waits for a
//!   line on stdin, then makes exactly the requested syscalls and exits.
//! - `wt-workload churn COMM FORKS CODES EXEC_PATH EXECS`: waits for a line on stdin;
//!   forks FORKS children that exit at once with codes 10, 11, ... (CODES distinct
//!   ones, in turn); starts EXECS children that exec EXEC_PATH (`EXEC_PATH hold`, which
//!   lives until its stdin closes); prints "spawned", waits for another line, lets the
//!   held children go, waits for all and exits 0.
//! - `wt-workload hold`: reads stdin to its end, exits 0.
//! - `wt-workload rounds COMM GETPPID_CALLS`: per line read from stdin, makes the calls
//!   and answers "done"; exits at the end of stdin.
//! - `wt-workload names PREFIX N`: forks N children one after another, each named
//!   PREFIX followed by its number, which makes one getppid call and exits.
//! - `wt-workload reuse COMM ROUNDS`: per round, forks a child that exits at once, then
//!   sets the kernel's last pid so the next fork reuses the child's pid, and forks a
//!   child that exits at once again; prints how many rounds did reuse the pid (needs
//!   root: it writes /proc/sys/kernel/ns_last_pid).
//! - `wt-workload tcp COMM N BYTES`: listens on 127.0.0.1 (prints the port), waits for a
//!   line on stdin, then makes N connections to itself, each sending BYTES bytes and
//!   closing once the accepting side has read them all and closed; prints "done".
//! - `wt-workload retransmit COMM`: listens on 127.0.0.1 and connects to itself once,
//!   prints "connected", waits for a line, sends one byte, prints "sent", waits for a
//!   line, then waits until the byte arrived and prints the kernel's count of
//!   retransmitted segments on the connecting socket (`tcpi_total_retrans`) and closes.
//! - `wt-workload spin COMM CPU MILLIS`: pinned to CPU, waits for a line on stdin, then
//!   keeps the CPU busy for MILLIS ms of wall-clock time (never sleeping) and exits.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    process::{Command, Stdio},
};

use nix::{
    fcntl::OFlag,
    sys::{stat::Mode, wait::waitpid},
    unistd::{ForkResult, fork},
};

fn set_comm(comm: &str) {
    nix::sys::prctl::set_name(&std::ffi::CString::new(comm).expect("comm")).expect("prctl");
}

/// A function the uprobe tests attach to, with known arguments and return value.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn wt_probe_point(a: u64, b: u64) -> u64 {
    std::hint::black_box(a.wrapping_mul(b))
}

fn read_line() {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).expect("stdin");
}

/// Forks a child that exits at once with `code`; returns its pid once it is reaped.
fn fork_exit(code: i32) -> i32 {
    // SAFETY: single-threaded; the child only calls `_exit`.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => unsafe { nix::libc::_exit(code) },
        ForkResult::Parent { child } => {
            waitpid(child, None).expect("waitpid");
            child.as_raw()
        }
    }
}

fn churn(comm: &str, forks: u32, codes: u32, exec_path: &str, execs: u32) {
    set_comm(comm);
    read_line();
    for i in 0..forks {
        fork_exit(10 + (i % codes) as i32);
    }
    let held: Vec<_> = (0..execs).map(|_| Command::new(exec_path).arg("hold").stdin(Stdio::piped()).spawn().expect("spawn the exec child")).collect();
    println!("spawned");
    std::io::stdout().flush().expect("stdout");
    read_line();
    for mut child in held {
        drop(child.stdin.take());
        assert!(child.wait().expect("wait").success());
    }
}

fn reuse(comm: &str, rounds: u32) {
    set_comm(comm);
    let mut reused = 0;
    for _ in 0..rounds {
        let first = fork_exit(0);
        std::fs::write("/proc/sys/kernel/ns_last_pid", (first - 1).to_string()).expect("write ns_last_pid (needs root)");
        if fork_exit(0) == first {
            reused += 1;
        }
    }
    println!("{reused}");
}

/// A listener on 127.0.0.1 whose accepted connections are read to their end and
/// closed, `n` of them, on a thread; its port.
fn echo_sink(n: usize) -> (u16, std::thread::JoinHandle<u64>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("local addr").port();
    let server = std::thread::spawn(move || {
        let mut total = 0;
        for _ in 0..n {
            let (mut conn, _) = listener.accept().expect("accept");
            total += std::io::copy(&mut conn, &mut std::io::sink()).expect("read");
        }
        total
    });
    (port, server)
}

fn tcp(comm: &str, n: usize, bytes: usize) {
    set_comm(comm);
    let (port, server) = echo_sink(n);
    println!("{port}");
    std::io::stdout().flush().expect("stdout");
    read_line();
    let payload = vec![7u8; bytes];
    for _ in 0..n {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        conn.write_all(&payload).expect("send");
        conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
        // Until the accepting side read everything and closed.
        assert_eq!(conn.read(&mut [0u8; 1]).expect("read"), 0);
    }
    assert_eq!(server.join().expect("server"), (n * bytes) as u64);
    println!("done");
}

fn retransmit(comm: &str) {
    use std::os::fd::AsRawFd as _;
    set_comm(comm);
    let (port, server) = echo_sink(1);
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    println!("connected");
    std::io::stdout().flush().expect("stdout");
    read_line();
    conn.write_all(b"x").expect("send");
    println!("sent");
    std::io::stdout().flush().expect("stdout");
    read_line();
    conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
    assert_eq!(server.join().expect("server"), 1);
    // SAFETY: tcp_info is plain integers, for which all zeros is a value.
    let mut info: nix::libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<nix::libc::tcp_info>() as nix::libc::socklen_t;
    // SAFETY: `info` is a writable tcp_info of `len` bytes.
    let rc = unsafe { nix::libc::getsockopt(conn.as_raw_fd(), nix::libc::IPPROTO_TCP, nix::libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    assert_eq!(rc, 0, "getsockopt(TCP_INFO)");
    println!("{}", info.tcpi_total_retrans);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        [_, "hold"] => {
            std::io::stdin().read_to_end(&mut Vec::new()).expect("stdin");
        }
        [_, "churn", comm, forks, codes, exec_path, execs] => {
            churn(comm, forks.parse().expect("FORKS"), codes.parse().expect("CODES"), exec_path, execs.parse().expect("EXECS"))
        }
        [_, "names", prefix, n] => {
            for i in 0..n.parse::<u32>().expect("N") {
                let comm = format!("{prefix}{i}");
                // SAFETY: single-threaded; the child names itself, calls getppid and `_exit`s.
                match unsafe { fork() }.expect("fork") {
                    ForkResult::Child => {
                        set_comm(&comm);
                        std::hint::black_box(nix::unistd::getppid());
                        unsafe { nix::libc::_exit(0) }
                    }
                    ForkResult::Parent { child } => drop(waitpid(child, None).expect("waitpid")),
                }
            }
        }
        [_, "reuse", comm, rounds] => reuse(comm, rounds.parse().expect("ROUNDS")),
        [_, "tcp", comm, n, bytes] => tcp(comm, n.parse().expect("N"), bytes.parse().expect("BYTES")),
        [_, "retransmit", comm] => retransmit(comm),
        // N calls of `wt_probe_point(i, 42)`, i from 0, after a line on stdin.
        [_, "calls", n] => {
            read_line();
            for i in 0..n.parse::<u64>().expect("N") {
                std::hint::black_box(wt_probe_point(std::hint::black_box(i), 42));
            }
        }
        [_, "spin", comm, cpu, millis] => {
            let run = std::time::Duration::from_millis(millis.parse().expect("MILLIS"));
            set_comm(comm);
            let mut cpus = nix::sched::CpuSet::new();
            cpus.set(cpu.parse().expect("CPU")).expect("CPU in range");
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).expect("sched_setaffinity");
            read_line();
            let started = std::time::Instant::now();
            while started.elapsed() < run {
                std::hint::black_box(0u64.wrapping_add(1));
            }
        }
        // N getppid calls per line read from stdin, each round answered with a line.
        [_, "rounds", comm, getppid] => {
            let getppid: u64 = getppid.parse().expect("GETPPID_CALLS");
            set_comm(comm);
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).expect("stdin") > 0 {
                for _ in 0..getppid {
                    std::hint::black_box(nix::unistd::getppid());
                }
                println!("done");
                line.clear();
            }
        }
        [_, comm, getppid, openat, rest @ ..] => {
            let getppid: u64 = getppid.parse().expect("GETPPID_CALLS");
            let openat: u64 = openat.parse().expect("OPENAT_CALLS");
            set_comm(comm);
            if rest.contains(&"--wait-stdin") {
                read_line();
            }
            for _ in 0..getppid {
                std::hint::black_box(nix::unistd::getppid());
            }
            for _ in 0..openat {
                let err = nix::fcntl::open("/nonexistent-wasmtap/missing", OFlag::O_RDONLY, Mode::empty()).unwrap_err();
                assert_eq!(err, nix::errno::Errno::ENOENT);
            }
        }
        _ => {
            eprintln!("usage: see the comment at the top of tests/src/bin/wt-workload.rs");
            std::process::exit(2);
        }
    }
}
