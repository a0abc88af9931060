//! Enrichment: facts about processes, cgroups and the node that plugins ask for by pid
//! or cgroup id, looked up by the host and cached, bounded.
//!
//! A pid names different processes over time, so a lookup says when the pid was seen
//! (a record's `ts-ns`) and the host answers for the process that had it then, or
//! "unknown": never another process's facts. It knows the processes' lifetimes from the
//! `process` kind's events, which it observes whenever a loaded plugin imports the
//! enrichment interface; facts are read from `/proc` while the process lives (checked
//! against its start time) and kept after it exits (for the records still in flight).
//! Cgroup ids are never reused, so cgroup facts are cached for good. Everything is
//! bounded in entries and bytes. A lookup that races an exec of the same process may
//! describe the image after the exec.

pub mod container;
pub mod procfs;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use rustc_hash::{FxHashMap, FxHashSet};
use wasmtap_events::{ProcessRecord, Record as _, process::event};

use crate::{
    events::{Batch, route::Observer, scope::walk_cgroups},
    probes::{Kind, process},
};

/// Pids whose generations are kept; past it, exited ones are forgotten, and everything
/// if that is not enough.
const MAX_PIDS: usize = 32_768;
/// Bytes of process facts kept (command lines and paths); past it, exited processes'
/// facts are forgotten, and everything if that is not enough.
const MAX_PROCESS_BYTES: usize = 32 << 20;
/// Cgroups whose facts are kept, and their bytes.
const MAX_CGROUPS: usize = 65_536;
const MAX_CGROUP_BYTES: usize = 16 << 20;
/// At most one cgroup tree walk this often.
const CGROUP_RESCAN: Duration = Duration::from_millis(50);
/// Slack for converting `/proc`'s boot-time start into the monotonic clock.
const CLOCK_SLACK_NS: u64 = 1_000_000;

#[derive(Debug, Clone, PartialEq)]
pub struct CgroupFacts {
    pub id: u64,
    pub path: String,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProcessFacts {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub user: Option<String>,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    pub cgroup: Option<Arc<CgroupFacts>>,
}

impl ProcessFacts {
    fn bytes(&self) -> usize {
        64 + self.comm.len() + self.exe.as_ref().map_or(0, String::len) + self.cmdline.iter().map(String::len).sum::<usize>()
    }
}

#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub hostname: String,
    pub kernel_release: String,
}

/// One process (or one exec of it) that had a pid, as far as the events tell.
#[derive(Debug, Clone)]
struct Generation {
    /// Monotonic ns of its fork or exec; for one seen only exiting, the previous
    /// generation's end (0 when none).
    from_ns: u64,
    /// Monotonic ns of the process's fork; 0 when not observed.
    born_ns: u64,
    /// Monotonic ns of its exit or next exec; `u64::MAX` while it lives.
    ended_ns: u64,
    /// Facts, and when they were read.
    facts: Option<(Arc<ProcessFacts>, u64)>,
}

impl Generation {
    fn alive(&self) -> bool {
        self.ended_ns == u64::MAX
    }
}

#[derive(Debug, Default)]
struct Processes {
    /// The newest generations (at most two) per pid, oldest first.
    by_pid: FxHashMap<u32, Vec<Generation>>,
    /// Bytes of the facts held.
    bytes: usize,
}

impl Processes {
    fn facts_bytes(g: &Generation) -> usize {
        g.facts.as_ref().map_or(0, |(f, _)| f.bytes())
    }

    /// Makes room for one more pid and `incoming` more bytes.
    fn make_room(&mut self, incoming: usize) {
        if self.by_pid.len() < MAX_PIDS && self.bytes + incoming <= MAX_PROCESS_BYTES {
            return;
        }
        // Exited processes first; if that is not enough, everything. Down to three
        // quarters, so the next inserts do not scan again.
        self.by_pid.retain(|_, g| g.last().is_some_and(Generation::alive));
        for g in self.by_pid.values_mut() {
            g.drain(..g.len() - 1);
        }
        self.bytes = self.by_pid.values().flatten().map(Self::facts_bytes).sum();
        if self.by_pid.len() > MAX_PIDS * 3 / 4 || self.bytes + incoming > MAX_PROCESS_BYTES * 3 / 4 {
            self.by_pid.clear();
            self.bytes = 0;
        }
    }

    fn push(&mut self, pid: u32, generation: Generation) {
        if !self.by_pid.contains_key(&pid) {
            self.make_room(0);
        }
        let generations = self.by_pid.entry(pid).or_default();
        generations.push(generation);
        if generations.len() > 2 {
            let old = generations.remove(0);
            self.bytes -= Self::facts_bytes(&old);
        }
    }
}

#[derive(Debug, Default)]
struct Cgroups {
    known: FxHashMap<u64, Arc<CgroupFacts>>,
    /// Ids a walk that started after they were asked for did not find.
    unknown: FxHashSet<u64>,
    bytes: usize,
}

impl Cgroups {
    fn remember(&mut self, id: u64, path: &str) -> Arc<CgroupFacts> {
        if let Some(known) = self.known.get(&id) {
            return known.clone();
        }
        if self.known.len() >= MAX_CGROUPS || self.bytes + path.len() > MAX_CGROUP_BYTES {
            self.known.clear();
            self.bytes = 0;
        }
        let path = if path.is_empty() { "/".to_owned() } else { path.to_owned() };
        self.bytes += 64 + path.len();
        let facts = Arc::new(CgroupFacts { id, container_id: container::container_id(&path), pod_uid: container::pod_uid(&path), path });
        self.known.insert(id, facts.clone());
        facts
    }
}

#[derive(Debug, Default)]
struct Walks {
    last_start: Option<Instant>,
    /// Highest cgroup id the last walk, and the one before it, found.
    last_max: u64,
    previous_max: u64,
}

pub struct Enricher {
    /// Whether process events are being observed (then facts may be cached).
    tracking: AtomicBool,
    /// Whether this daemon sees the kernel's pids in its `/proc` (it runs in the
    /// initial pid namespace); if not, processes are never looked up.
    host_pids: bool,
    processes: Mutex<Processes>,
    cgroups: Mutex<Cgroups>,
    /// Cgroup tree walks; held while one runs.
    walk: Mutex<Walks>,
    users: FxHashMap<u32, String>,
    node: NodeFacts,
    cgroup_root: Option<PathBuf>,
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64).unwrap_or(0)
}

/// Whether this process is in the initial pid namespace (`NSpid` lists one pid).
fn in_initial_pid_namespace() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("NSpid:").map(|v| v.split_whitespace().count() == 1)))
        .unwrap_or(true)
}

impl Enricher {
    pub fn new() -> Self {
        let uname = nix::sys::utsname::uname().ok();
        let text = |s: Option<&std::ffi::OsStr>| s.map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let host_pids = in_initial_pid_namespace();
        if !host_pids {
            tracing::warn!("wasmtap runs in a child pid namespace: enrichment cannot look processes up (run it with the host's pid namespace)");
        }
        Self {
            tracking: AtomicBool::new(false),
            host_pids,
            processes: Mutex::default(),
            cgroups: Mutex::default(),
            walk: Mutex::default(),
            users: procfs::users().into_iter().collect(),
            node: NodeFacts { hostname: text(uname.as_ref().map(|u| u.nodename())), kernel_release: text(uname.as_ref().map(|u| u.release())) },
            cgroup_root: crate::events::scope::cgroup2_mount(),
        }
    }

    pub fn node(&self) -> &NodeFacts {
        &self.node
    }

    /// Whether process events reach `observe` from now on (process facts may be cached
    /// only then). Turned off, what is cached is forgotten: it can no longer be kept right.
    pub fn set_tracking(&self, on: bool) {
        if !self.tracking.swap(on, Relaxed) || on {
            return;
        }
        self.lost_processes();
    }

    /// Learns lifetimes from a batch of `process` records.
    pub fn observe_processes(&self, records: &[u8]) {
        let mut processes = self.processes.lock().expect("enrich lock");
        for raw in records.chunks_exact(ProcessRecord::SIZE) {
            let r = ProcessRecord::read(raw);
            let at = r.header.ts_ns;
            let pid = match r.event {
                event::FORK => r.child_pid,
                event::EXEC | event::EXIT => r.header.pid,
                _ => continue,
            };
            let processes = &mut *processes;
            let last = processes.by_pid.get_mut(&pid).and_then(|g| g.last_mut());
            let (previous_end, mut born, mut carried) = (last.as_ref().map_or(0, |g| g.ended_ns.min(at)), 0, None);
            if let Some(g) = last
                && g.alive()
            {
                g.ended_ns = at;
                if r.event == event::EXEC {
                    born = g.born_ns;
                    // Facts read after the exec describe the new image: they move on.
                    if g.facts.as_ref().is_some_and(|(_, read_at)| *read_at > at) {
                        carried = g.facts.take();
                    }
                }
            }
            let generation = match r.event {
                event::FORK => Generation { from_ns: at, born_ns: at, ended_ns: u64::MAX, facts: None },
                event::EXEC => Generation { from_ns: at, born_ns: born, ended_ns: u64::MAX, facts: carried },
                // An exit of a process seen neither forking nor being read: it ended
                // unknown, and is not to be read from /proc after this.
                _ if processes.by_pid.get(&pid).and_then(|g| g.last()).is_none_or(|g| g.ended_ns != at) => {
                    Generation { from_ns: previous_end, born_ns: 0, ended_ns: at, facts: None }
                }
                _ => continue,
            };
            processes.push(pid, generation);
        }
    }

    /// Process events were lost (the kind's ring buffer was full): what the host knows
    /// of lifetimes may be stale, so it starts over (answers come from `/proc` again,
    /// under its start-time check).
    pub fn lost_processes(&self) {
        let mut processes = self.processes.lock().expect("enrich lock");
        processes.by_pid.clear();
        processes.bytes = 0;
    }

    /// Facts about the process that had `pid` at monotonic time `seen_ns` (0: now).
    pub fn process(&self, pid: u32, seen_ns: u64) -> Option<Arc<ProcessFacts>> {
        if !self.host_pids {
            return None;
        }
        let seen = if seen_ns == 0 { monotonic_ns() } else { seen_ns };
        if !self.tracking.load(Relaxed) {
            return self.read_process(pid, seen, 0).map(|(facts, _)| facts);
        }
        // The generation asked about (by its start), if the events told of one.
        let mut asked = None;
        {
            let processes = self.processes.lock().expect("enrich lock");
            if let Some(generations) = processes.by_pid.get(&pid) {
                let g = generations.iter().rev().find(|g| g.from_ns <= seen && seen <= g.ended_ns)?;
                if let Some((facts, _)) = &g.facts {
                    return Some(facts.clone());
                }
                if !g.alive() {
                    return None; // gone before anyone asked: /proc has nothing true left
                }
                asked = Some((g.from_ns, g.born_ns));
            }
        }
        // Read outside the lock: /proc reads take microseconds.
        let read_at = monotonic_ns();
        let (facts, started) = self.read_process(pid, seen, asked.map_or(0, |(_, born)| born))?;
        let mut processes = self.processes.lock().expect("enrich lock");
        let bytes = facts.bytes();
        processes.make_room(bytes);
        let generations = processes.by_pid.entry(pid).or_default();
        // Kept only where it belongs: the generation asked about, still alive (the
        // events may have moved on meanwhile).
        match (generations.last_mut(), asked) {
            (Some(g), Some((from, _))) if g.from_ns == from && g.alive() => g.facts = Some((facts.clone(), read_at)),
            // Its start, to the tick, is when it began to hold the pid.
            (None, None) => generations.push(Generation { from_ns: started, born_ns: 0, ended_ns: u64::MAX, facts: Some((facts.clone(), read_at)) }),
            _ => return Some(facts),
        }
        processes.bytes += bytes;
        Some(facts)
    }

    /// Reads `/proc/<pid>` and accepts only the process that had the pid at `seen`:
    /// the one forked at `born` when that is known, else one that surely started
    /// before `seen` (`/proc` knows a start only to the tick, and only one process
    /// holds a pid at a time).
    /// Returns the facts and the process's start (rounded down to the tick).
    fn read_process(&self, pid: u32, seen: u64, born: u64) -> Option<(Arc<ProcessFacts>, u64)> {
        let facts = procfs::read(pid)?;
        let ours = if born > 0 {
            facts.started_ns <= born + CLOCK_SLACK_NS && facts.started_ns + facts.tick_ns + CLOCK_SLACK_NS >= born
        } else {
            facts.started_ns + facts.tick_ns <= seen
        };
        if !ours {
            return None;
        }
        let cgroup = facts.cgroup_path.as_deref().and_then(|path| self.cgroup_by_path(path));
        let process = ProcessFacts {
            pid,
            ppid: facts.ppid,
            uid: facts.uid,
            user: self.users.get(&facts.uid).cloned(),
            comm: facts.comm,
            exe: facts.exe,
            cmdline: facts.cmdline,
            cgroup,
        };
        Some((Arc::new(process), facts.started_ns))
    }

    fn cgroup_by_path(&self, path: &str) -> Option<Arc<CgroupFacts>> {
        use std::os::unix::fs::MetadataExt as _;
        let dir = self.cgroup_root.as_ref()?.join(path.trim_start_matches('/'));
        let id = std::fs::metadata(dir).ok()?.ino();
        Some(self.cgroups.lock().expect("enrich lock").remember(id, path))
    }

    /// Facts about cgroup v2 id `id`. An id not seen before is looked for by a walk of
    /// the cgroup tree that starts after the call (one walk at a time, at most one per
    /// `CGROUP_RESCAN`, shared by every caller waiting for one; the cache stays usable
    /// meanwhile), so a new cgroup is found. Ids only grow: one below the highest id the
    /// walk before the last one saw, and not found by the last, is gone, and answered
    /// "unknown" at once.
    pub fn cgroup(&self, id: u64) -> Option<Arc<CgroupFacts>> {
        let asked = Instant::now();
        loop {
            {
                let cgroups = self.cgroups.lock().expect("enrich lock");
                if let Some(known) = cgroups.known.get(&id) {
                    return Some(known.clone());
                }
                if cgroups.unknown.contains(&id) {
                    return None;
                }
            }
            let root = self.cgroup_root.as_ref()?;
            let mut walks = self.walk.lock().expect("enrich lock");
            if id < walks.previous_max || walks.last_start.is_some_and(|at| at > asked) {
                // A walk that saw the cgroup's creation, or one that began after the
                // call, did not find it: it is gone.
                let mut cgroups = self.cgroups.lock().expect("enrich lock");
                if !cgroups.known.contains_key(&id) {
                    if cgroups.unknown.len() >= MAX_CGROUPS {
                        cgroups.unknown.clear();
                    }
                    cgroups.unknown.insert(id);
                }
                continue;
            }
            let wait = walks.last_start.map_or(Duration::ZERO, |at| CGROUP_RESCAN.saturating_sub(at.elapsed()));
            if !wait.is_zero() {
                drop(walks);
                std::thread::sleep(wait);
                continue;
            }
            walks.last_start = Some(Instant::now());
            let mut found = Vec::new();
            walk_cgroups(root, MAX_CGROUPS, |ino, dir| {
                let below = dir.strip_prefix(root).unwrap_or(dir).to_string_lossy();
                found.push((ino, format!("/{below}")));
            });
            walks.previous_max = walks.last_max;
            walks.last_max = found.iter().map(|(ino, _)| *ino).max().unwrap_or(0);
            let mut cgroups = self.cgroups.lock().expect("enrich lock");
            for (ino, path) in &found {
                cgroups.remember(*ino, path);
            }
        }
    }
}

impl Default for Enricher {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer for Enricher {
    fn observe(&self, batch: &Batch) {
        if batch.kind == &process::KIND {
            self.observe_processes(&batch.records);
        }
    }

    fn lost(&self, kind: Kind) {
        if kind == &process::KIND {
            self.lost_processes();
        }
    }
}

#[cfg(test)]
mod tests {
    use wasmtap_events::RecordHeader;

    use super::*;

    fn record(kind: u32, pid: u32, child_pid: u32, ts_ns: u64) -> Vec<u8> {
        let header = RecordHeader { pid, ts_ns, ..Default::default() };
        ProcessRecord { header, event: kind, child_pid, ..Default::default() }.as_bytes().to_vec()
    }

    #[test]
    fn answers_for_the_process_that_had_the_pid_then() {
        let enricher = Enricher::new();
        enricher.set_tracking(true);
        let me = std::process::id();
        // A moment more than a tick after this process started (/proc knows starts to the
        // tick; a younger process is not surely the pid's owner at `now`).
        let now = monotonic_ns() + 20_000_000;
        let facts = enricher.process(me, now).expect("this process");
        assert_eq!(enricher.process(me, 1), None, "a time before this process started");
        assert_eq!(facts.exe.as_deref(), std::env::current_exe().ok().as_deref().and_then(std::path::Path::to_str));
        // The pid's process exits, and another one gets the pid: records from before
        // the exit still get the old facts, later ones are not answered from them.
        let mut batch = record(event::EXIT, me, 0, now + 10);
        batch.extend(record(event::FORK, 1, me, now + 1_000_000_000));
        enricher.observe_processes(&batch);
        assert_eq!(enricher.process(me, now + 5), Some(facts));
        assert_eq!(enricher.process(me, now + 15), None, "between the two processes");
        // The new one is read from /proc (this process again, started before: refused
        // as the pid's new owner would have started after its fork).
        assert_eq!(enricher.process(me, now + 1_000_000_005), None);
        // A process that exited before anyone asked is unknown, not read from /proc.
        enricher.observe_processes(&record(event::EXIT, 4_000_000, 0, now + 30));
        assert_eq!(enricher.process(4_000_000, now + 5), None);
    }

    #[test]
    fn cgroup_ids_resolve_to_paths() {
        let enricher = Enricher::new();
        let Some(root) = enricher.cgroup_root.clone() else { return };
        use std::os::unix::fs::MetadataExt as _;
        let root_id = std::fs::metadata(&root).unwrap().ino();
        assert_eq!(enricher.cgroup(root_id).unwrap().path, "/");
        assert!(enricher.cgroup(u64::MAX).is_none());
    }
}
