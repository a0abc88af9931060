//! Test workload: renames itself (comm), optionally waits for a line on stdin, then
//! makes exactly the requested syscalls and exits.
//!
//! usage: wt-workload COMM GETPPID_CALLS OPENAT_CALLS [--wait-stdin]

use std::io::BufRead as _;

use nix::{fcntl::OFlag, sys::stat::Mode};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, comm, getppid, openat, rest @ ..] = args.as_slice() else {
        eprintln!("usage: wt-workload COMM GETPPID_CALLS OPENAT_CALLS [--wait-stdin]");
        std::process::exit(2);
    };
    let getppid: u64 = getppid.parse().expect("GETPPID_CALLS");
    let openat: u64 = openat.parse().expect("OPENAT_CALLS");
    nix::sys::prctl::set_name(&std::ffi::CString::new(comm.as_str()).expect("comm")).expect("prctl");
    if rest.iter().any(|a| a == "--wait-stdin") {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).expect("stdin");
    }
    for _ in 0..getppid {
        std::hint::black_box(nix::unistd::getppid());
    }
    for _ in 0..openat {
        let err = nix::fcntl::open("/nonexistent-wasmtap/missing", OFlag::O_RDONLY, Mode::empty()).unwrap_err();
        assert_eq!(err, nix::errno::Errno::ENOENT);
    }
}
