//! Syscall and errno names for this host's architecture.

use std::str::FromStr as _;

use syscalls::{Errno, Sysno};

pub fn syscall_name(nr: u32) -> Option<&'static str> {
    Sysno::new(nr as usize).map(|s| s.name())
}

pub fn syscall_number(name: &str) -> Option<u32> {
    Sysno::from_str(name).ok().map(|s| s.id() as u32)
}

pub fn errno_name(errno: u16) -> Option<&'static str> {
    Errno::new(i32::from(errno)).name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let nr = syscall_number("getppid").unwrap();
        assert_eq!(syscall_name(nr), Some("getppid"));
        assert_eq!(syscall_number("no_such_call"), None);
        assert_eq!(errno_name(2), Some("ENOENT"));
        assert_eq!(errno_name(4000), None);
    }
}
