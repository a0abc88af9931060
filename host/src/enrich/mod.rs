//! Enrichment: facts about processes, cgroups and the node that plugins ask for by pid
//! or cgroup id, looked up by the host and cached, bounded.
//!
//! A pid names different processes over time, so a lookup says when the pid was seen
//! (a record's `ts-ns`) and the host answers for the process that had it then, or
//! "unknown": never another process's facts. It knows the processes' lifetimes from the
//! `process` kind's events, which it observes whenever a loaded plugin imports the
//! enrichment interface; facts are read from `/proc` while the process lives and kept
//! after it exits (for the records still in flight). Cgroup ids are never reused, so
//! cgroup facts are cached for good (bounded).

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

/// Pids whose generations are kept; past it, exited ones are forgotten first.
const MAX_PIDS: usize = 32_768;
/// Cgroups whose facts are kept.
const MAX_CGROUPS: usize = 65_536;
/// At most one cgroup tree walk this often (an unknown id waits for the next).
const CGROUP_RESCAN: Duration = Duration::from_millis(50);
/// The kernel's process start times have a tick's resolution.
const START_SLACK_NS: u64 = 10_000_000;

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

#[derive(Debug, Clone)]
pub struct NodeFacts {
    pub hostname: String,
    pub kernel_release: String,
}

/// One process (or one exec of it) that had a pid, as far as the events tell.
#[derive(Debug, Clone)]
struct Generation {
    /// Monotonic ns of its fork or exec; 0 when it predates what was observed.
    from_ns: u64,
    /// Monotonic ns of the process's fork; 0 when not observed.
    born_ns: u64,
    /// Monotonic ns of its exit or next exec; `u64::MAX` while it lives.
    ended_ns: u64,
    facts: Option<Arc<ProcessFacts>>,
}

#[derive(Debug, Default)]
struct Cgroups {
    known: FxHashMap<u64, Arc<CgroupFacts>>,
    /// Ids a walk made after they were asked for did not find.
    unknown: FxHashSet<u64>,
    last_walk: Option<Instant>,
}

pub struct Enricher {
    /// Whether process events are being observed (then facts may be cached).
    tracking: AtomicBool,
    /// The newest generations (at most two) per pid, oldest first.
    processes: Mutex<FxHashMap<u32, Vec<Generation>>>,
    cgroups: Mutex<Cgroups>,
    users: FxHashMap<u32, String>,
    node: NodeFacts,
    cgroup_root: Option<PathBuf>,
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64).unwrap_or(0)
}

impl Enricher {
    pub fn new() -> Self {
        let uname = nix::sys::utsname::uname().ok();
        let text = |s: Option<&std::ffi::OsStr>| s.map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Self {
            tracking: AtomicBool::new(false),
            processes: Mutex::default(),
            cgroups: Mutex::default(),
            users: procfs::users().into_iter().collect(),
            node: NodeFacts {
                hostname: text(uname.as_ref().map(|u| u.nodename())),
                kernel_release: text(uname.as_ref().map(|u| u.release())),
            },
            cgroup_root: crate::events::scope::cgroup2_mount(),
        }
    }

    pub fn node(&self) -> &NodeFacts {
        &self.node
    }

    /// From now on process events reach `observe`: process facts may be cached.
    pub fn start_tracking(&self) {
        self.tracking.store(true, Relaxed);
    }

    /// Learns lifetimes from a batch of `process` records.
    pub fn observe(&self, records: &[u8]) {
        let mut processes = self.processes.lock().expect("enrich lock");
        for raw in records.chunks_exact(ProcessRecord::SIZE) {
            let r = ProcessRecord::read(raw);
            let at = r.header.ts_ns;
            let (pid, starts) = match r.event {
                event::FORK => (r.child_pid, true),
                event::EXEC => (r.header.pid, true),
                event::EXIT => (r.header.pid, false),
                _ => continue,
            };
            if processes.len() >= MAX_PIDS && !processes.contains_key(&pid) {
                processes.retain(|_, g| g.last().is_some_and(|g| g.ended_ns == u64::MAX));
                if processes.len() >= MAX_PIDS {
                    processes.clear();
                }
            }
            let generations = processes.entry(pid).or_default();
            // An exec starts a generation of the same process (new exe, comm, cmdline).
            let mut born = if r.event == event::FORK { at } else { 0 };
            match generations.last_mut() {
                Some(g) if g.ended_ns == u64::MAX => {
                    g.ended_ns = at;
                    if r.event == event::EXEC {
                        born = g.born_ns;
                    }
                }
                // An exit of a process seen neither forking nor being read: it ended
                // unknown, and is not to be read from /proc after this.
                _ if !starts => generations.push(Generation { from_ns: 0, born_ns: 0, ended_ns: at, facts: None }),
                _ => {}
            }
            if starts {
                generations.push(Generation { from_ns: at, born_ns: born, ended_ns: u64::MAX, facts: None });
            }
            if generations.len() > 2 {
                generations.remove(0);
            }
        }
    }

    /// Facts about the process that had `pid` at monotonic time `seen_ns` (0: now).
    pub fn process(&self, pid: u32, seen_ns: u64) -> Option<Arc<ProcessFacts>> {
        let seen = if seen_ns == 0 { monotonic_ns() } else { seen_ns };
        if self.tracking.load(Relaxed) {
            let processes = self.processes.lock().expect("enrich lock");
            let mut born = 0;
            if let Some(generations) = processes.get(&pid) {
                let i = generations.iter().rposition(|g| g.from_ns <= seen && seen <= g.ended_ns)?;
                let g = &generations[i];
                if let Some(facts) = &g.facts {
                    return Some(facts.clone());
                }
                if g.ended_ns != u64::MAX {
                    return None; // gone before anyone asked: /proc has nothing true left
                }
                born = g.born_ns;
            }
            // Read outside the lock: /proc reads take microseconds.
            drop(processes);
            let facts = self.read_process(pid, seen, born)?;
            let mut processes = self.processes.lock().expect("enrich lock");
            if processes.len() < MAX_PIDS || processes.contains_key(&pid) {
                let generations = processes.entry(pid).or_default();
                match generations.last_mut() {
                    Some(g) if g.ended_ns == u64::MAX => g.facts = Some(facts.clone()),
                    None => generations.push(Generation { from_ns: 0, born_ns: 0, ended_ns: u64::MAX, facts: Some(facts.clone()) }),
                    Some(_) => return None, // it exited while being read
                }
            }
            Some(facts)
        } else {
            self.read_process(pid, seen, 0)
        }
    }

    /// Reads `/proc/<pid>`, refusing a process that started after `seen` (the pid
    /// was reused since) or before `born` (not the generation asked about).
    fn read_process(&self, pid: u32, seen: u64, born: u64) -> Option<Arc<ProcessFacts>> {
        let facts = procfs::read(pid)?;
        if facts.started_ns > seen.saturating_add(START_SLACK_NS) || facts.started_ns.saturating_add(START_SLACK_NS) < born {
            return None;
        }
        let cgroup = facts.cgroup_path.as_deref().and_then(|path| self.cgroup_by_path(path));
        Some(Arc::new(ProcessFacts {
            pid,
            ppid: facts.ppid,
            uid: facts.uid,
            user: self.users.get(&facts.uid).cloned(),
            comm: facts.comm,
            exe: facts.exe,
            cmdline: facts.cmdline,
            cgroup,
        }))
    }

    fn cgroup_by_path(&self, path: &str) -> Option<Arc<CgroupFacts>> {
        use std::os::unix::fs::MetadataExt as _;
        let dir = self.cgroup_root.as_ref()?.join(path.trim_start_matches('/'));
        let id = std::fs::metadata(dir).ok()?.ino();
        let mut cgroups = self.cgroups.lock().expect("enrich lock");
        Some(Self::remember(&mut cgroups, id, path))
    }

    fn remember(cgroups: &mut Cgroups, id: u64, path: &str) -> Arc<CgroupFacts> {
        if let Some(known) = cgroups.known.get(&id) {
            return known.clone();
        }
        if cgroups.known.len() >= MAX_CGROUPS {
            cgroups.known.clear();
        }
        let path = if path.is_empty() { "/".to_owned() } else { path.to_owned() };
        let facts = Arc::new(CgroupFacts { id, container_id: container::container_id(&path), pod_uid: container::pod_uid(&path), path });
        cgroups.known.insert(id, facts.clone());
        facts
    }

    /// Facts about cgroup v2 id `id`. An id not seen before is looked for by a walk of
    /// the cgroup tree made after the call (at most one per `CGROUP_RESCAN`).
    pub fn cgroup(&self, id: u64) -> Option<Arc<CgroupFacts>> {
        let mut cgroups = self.cgroups.lock().expect("enrich lock");
        if let Some(known) = cgroups.known.get(&id) {
            return Some(known.clone());
        }
        if cgroups.unknown.contains(&id) {
            return None;
        }
        let root = self.cgroup_root.clone()?;
        if let Some(last) = cgroups.last_walk {
            std::thread::sleep(CGROUP_RESCAN.saturating_sub(last.elapsed()));
        }
        cgroups.last_walk = Some(Instant::now());
        walk(&root, |ino, path| {
            Self::remember(&mut cgroups, ino, path);
        });
        if let Some(known) = cgroups.known.get(&id) {
            return Some(known.clone());
        }
        if cgroups.unknown.len() >= MAX_CGROUPS {
            cgroups.unknown.clear();
        }
        cgroups.unknown.insert(id);
        None
    }
}

impl Default for Enricher {
    fn default() -> Self {
        Self::new()
    }
}

/// Visits every cgroup below `root` (itself as "/"), at most `MAX_CGROUPS`.
fn walk(root: &std::path::Path, mut visit: impl FnMut(u64, &str)) {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(meta) = std::fs::metadata(root) else { return };
    visit(meta.ino(), "/");
    let mut dirs = vec![(root.to_path_buf(), String::new())];
    let mut seen = 1;
    while let Some((dir, path)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.filter_map(Result::ok) {
            if seen >= MAX_CGROUPS {
                return;
            }
            if let Ok(meta) = entry.metadata()
                && meta.is_dir()
            {
                let child = format!("{path}/{}", entry.file_name().to_string_lossy());
                visit(meta.ino(), &child);
                seen += 1;
                dirs.push((entry.path(), child));
            }
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
        enricher.start_tracking();
        let me = std::process::id();
        let now = monotonic_ns();
        let facts = enricher.process(me, now).expect("this process");
        assert_eq!(facts.exe.as_deref(), std::env::current_exe().ok().as_deref().and_then(std::path::Path::to_str));
        // The pid's process exits, and another one gets the pid: records from before
        // the exit still get the old facts, later ones are not answered from them.
        let mut batch = record(event::EXIT, me, 0, now + 10);
        batch.extend(record(event::FORK, 1, me, now + 1_000_000_000));
        enricher.observe(&batch);
        assert_eq!(enricher.process(me, now + 5), Some(facts));
        assert_eq!(enricher.process(me, now + 15), None, "between the two processes");
        // The new one is read from /proc (this process again, started before: refused
        // as the pid's new owner would have started after its fork).
        assert_eq!(enricher.process(me, now + 1_000_000_005), None);
        // A process that exited before anyone asked is unknown, not read from /proc.
        enricher.observe(&record(event::EXIT, 4_000_000, 0, now + 30));
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
