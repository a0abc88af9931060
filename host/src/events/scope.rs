//! A tenant's cgroup scope: a cgroup v2 directory and everything below it.
//!
//! Records carry the task's cgroup v2 id, which is the inode number of the cgroup's
//! directory on the cgroup2 filesystem; the scope knows the ids of its subtree by walking
//! it, and walks again when it meets an id it has not seen, so cgroups created later are
//! found. The walk runs at most every `RESCAN`: an unknown id waits for the next one
//! rather than being judged on an older walk, so a new cgroup's first events are not
//! lost. Ids are never reused and cgroups never change parent, so an id found outside
//! the scope stays outside (remembered, up to `MAX_OUTSIDE`).

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        Mutex, RwLock,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use wasmtap_events::MAX_CGROUP_DEPTH;

const RESCAN: Duration = Duration::from_millis(50);
/// Cgroups one walk visits at most.
const MAX_SCOPE_CGROUPS: usize = 65_536;
/// Bound on remembered outside ids; the set is cleared when it fills.
const MAX_OUTSIDE: usize = 65_536;

#[derive(Debug)]
pub struct CgroupScope {
    dir: PathBuf,
    root_id: u64,
    inside: RwLock<HashSet<u64>>,
    outside: Mutex<(HashSet<u64>, Instant)>,
    /// Said once in the log: the subtree is past `MAX_SCOPE_CGROUPS`.
    too_big: AtomicBool,
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on unified systems,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace().skip(1);
        let (path, fstype) = (f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

impl CgroupScope {
    /// Opens `dir` (absolute, or relative to the cgroup v2 mount).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let mount = cgroup2_mount().context("no cgroup2 filesystem is mounted\n  fix: mount -t cgroup2 none /sys/fs/cgroup/unified")?;
        let dir = if dir.is_absolute() { dir.to_path_buf() } else { mount.join(dir) };
        if !dir.join("cgroup.procs").is_file() {
            bail!("{} is not a cgroup v2 directory (no cgroup.procs)\n  fix: mkdir it under the cgroup2 mount", dir.display());
        }
        // The kernel looks for a scope among a task's first MAX_CGROUP_DEPTH ancestors.
        let depth = dir.strip_prefix(&mount).map(|rel| rel.components().count()).unwrap_or(usize::MAX);
        if depth == 0 || depth > MAX_CGROUP_DEPTH as usize {
            bail!("{} is {depth} levels below the cgroup2 mount {}; a scope must be 1 to {MAX_CGROUP_DEPTH} levels below it", dir.display(), mount.display());
        }
        let root_id = std::fs::metadata(&dir).with_context(|| format!("cannot stat {}", dir.display()))?.ino();
        let scope = Self { dir, root_id, inside: RwLock::default(), outside: Mutex::new((HashSet::new(), Instant::now())), too_big: AtomicBool::new(false) };
        scope.rescan();
        Ok(scope)
    }

    #[cfg(test)]
    pub fn root_for_tests() -> Self {
        Self {
            dir: PathBuf::from("/nonexistent"),
            root_id: 1,
            inside: RwLock::new([1].into()),
            outside: Mutex::new((HashSet::new(), Instant::now())),
            too_big: AtomicBool::new(false),
        }
    }

    /// The id of the scope's own cgroup.
    pub fn root_id(&self) -> u64 {
        self.root_id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether cgroup `id` is the scope's cgroup or below it.
    pub fn contains(&self, id: u64) -> bool {
        if self.inside.read().expect("scope").contains(&id) {
            return true;
        }
        let mut outside = self.outside.lock().expect("scope");
        if outside.0.contains(&id) {
            return false;
        }
        // Decide on a walk made after this record was: wait for the next allowed one.
        std::thread::sleep(RESCAN.saturating_sub(outside.1.elapsed()));
        outside.1 = Instant::now();
        self.rescan();
        if self.inside.read().expect("scope").contains(&id) {
            return true;
        }
        if outside.0.len() >= MAX_OUTSIDE {
            outside.0.clear();
        }
        outside.0.insert(id);
        false
    }

    fn rescan(&self) {
        let mut ids = HashSet::new();
        let cut = walk_cgroups(&self.dir, MAX_SCOPE_CGROUPS, |id, _| {
            ids.insert(id);
        });
        ids.insert(self.root_id);
        if cut && !self.too_big.swap(true, Relaxed) {
            tracing::warn!("cgroup scope {} has more than {MAX_SCOPE_CGROUPS} cgroups; the rest are out of scope", self.dir.display());
        }
        *self.inside.write().expect("scope") = ids;
    }
}

/// Visits `root` and every cgroup directory below it, at most `max` in all, with its
/// id (the directory's inode number) and path; whether the walk was cut at `max`.
pub fn walk_cgroups(root: &Path, max: usize, mut visit: impl FnMut(u64, &Path)) -> bool {
    let Ok(meta) = std::fs::metadata(root) else { return false };
    visit(meta.ino(), root);
    let mut seen = 1;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.filter_map(Result::ok) {
            if seen >= max {
                return true;
            }
            if let Ok(meta) = entry.metadata()
                && meta.is_dir()
            {
                let path = entry.path();
                visit(meta.ino(), &path);
                seen += 1;
                dirs.push(path);
            }
        }
    }
    false
}
