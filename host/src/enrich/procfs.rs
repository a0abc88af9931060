//! Reading one process's facts from `/proc`, bounded, and telling whether the process
//! found there could be the one a record was about.

use std::{io::Read as _, path::Path};

/// Most arguments, and bytes of all arguments, a command line is cut to.
pub const MAX_ARGS: usize = 64;
pub const MAX_CMDLINE_BYTES: usize = 4096;

/// What `/proc/<pid>` says, read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcFacts {
    pub ppid: u32,
    pub uid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    /// Path below the cgroup v2 mount ("0::" line of /proc/<pid>/cgroup).
    pub cgroup_path: Option<String>,
    /// Start, on the monotonic clock, rounded down to the kernel's start-time
    /// resolution: the process started in `[started_ns, started_ns + tick_ns)`.
    pub started_ns: u64,
    pub tick_ns: u64,
}

/// Reads at most `max` bytes of a file.
fn read_bounded(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(max as u64).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Parses `/proc/<pid>/stat`: (comm, ppid, start time in clock ticks since boot).
fn stat(dir: &Path) -> Option<(String, u32, u64)> {
    let stat = String::from_utf8_lossy(&read_bounded(&dir.join("stat"), 4096).ok()?).into_owned();
    // "pid (comm) state ppid ..." where comm may itself hold ") ".
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // Fields after comm start at field 3 (state): ppid is field 4, starttime field 22.
    Some((comm, fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// Nanoseconds to add to a boot-time instant to get the monotonic clock's reading.
fn boot_to_monotonic_ns() -> i128 {
    use nix::time::{ClockId, clock_gettime};
    let ns = |id| clock_gettime(id).map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128).unwrap_or(0);
    ns(ClockId::CLOCK_MONOTONIC) - ns(ClockId::CLOCK_BOOTTIME)
}

/// Reads process `pid`'s facts; `None` when it does not exist (or vanished, or was
/// replaced by another process, while being read).
pub fn read(pid: u32) -> Option<ProcFacts> {
    let dir = Path::new("/proc").join(pid.to_string());
    let (comm, ppid, start_ticks) = stat(&dir)?;
    let status = String::from_utf8_lossy(&read_bounded(&dir.join("status"), 16 << 10).ok()?).into_owned();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().next()?.parse().ok())?;
    let exe = std::fs::read_link(dir.join("exe")).ok().map(|p| p.to_string_lossy().into_owned());
    let cmdline = read_bounded(&dir.join("cmdline"), MAX_CMDLINE_BYTES)
        .map(|raw| raw.split(|&b| b == 0).filter(|a| !a.is_empty()).take(MAX_ARGS).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
        .unwrap_or_default();
    let cgroup_path = read_bounded(&dir.join("cgroup"), 64 << 10)
        .ok()
        .and_then(|raw| String::from_utf8_lossy(&raw).lines().find_map(|l| l.strip_prefix("0::").map(str::to_owned)));
    // The same process from start to end: a pid reused meanwhile has another start.
    let (_, _, again) = stat(&dir)?;
    if again != start_ticks {
        return None;
    }
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100).max(1) as i128;
    let started_ns = (start_ticks as i128 * 1_000_000_000 / hz + boot_to_monotonic_ns()).max(0) as u64;
    Some(ProcFacts { ppid, uid, comm, exe, cmdline, cgroup_path, started_ns, tick_ns: (1_000_000_000 / hz) as u64 })
}

/// User names by uid from `/etc/passwd` (read once, bounded).
pub fn users() -> Vec<(u32, String)> {
    let Ok(raw) = read_bounded(Path::new("/etc/passwd"), 1 << 20) else { return Vec::new() };
    String::from_utf8_lossy(&raw)
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            Some((f.nth(1)?.parse().ok()?, name.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = read(std::process::id()).expect("this process");
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
        assert_eq!(me.uid, nix::unistd::getuid().as_raw());
        assert_eq!(me.exe.as_deref(), std::env::current_exe().ok().as_deref().and_then(Path::to_str));
        assert!(!me.cmdline.is_empty());
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
        assert!(me.started_ns <= now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64);
        assert!(read(u32::MAX).is_none());
    }
}
