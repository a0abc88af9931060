//! The on-disk cache of precompiled components: native code the daemon will map and
//! run, so only ever read from a directory nobody but the daemon's user (or root) can
//! change, and written so that nobody can slip a file in on the way.
//!
//! - The directory is the daemon user's and writable by no one else (the daemon creates
//!   it 0700 whatever the umask), and no directory above it may be writable by anyone
//!   else (the sticky `/tmp` excepted): checked when the daemon starts and again before
//!   every read.
//! - Artifacts are the daemon user's regular files, not writable by group or others.
//! - New artifacts are written to a fresh file (`O_EXCL`, `O_NOFOLLOW`, mode 0600) and
//!   renamed into place whole.
//! - The cache is bounded (`cache_max_bytes`): the least recently used artifacts go
//!   first; leftovers of interrupted writes are removed.
//!
//! A cache that fails a check is not used (the daemon compiles in memory) and says why
//! once.

use std::{
    fs::{self, DirBuilder, OpenOptions},
    io::{Read as _, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::PathBuf,
    sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    time::{Duration, SystemTime},
};

/// Temporary files older than this are leftovers of an interrupted write.
const STALE_TMP: Duration = Duration::from_secs(3600);

#[derive(Debug)]
pub struct ArtifactCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Whether a failed check was said in the log already.
    said: AtomicBool,
    written: AtomicU64,
}

impl ArtifactCache {
    /// Makes `dir` (0700; missing parents 0755) and checks it; `None` (said in the
    /// log) if it cannot be trusted.
    pub fn open(dir: PathBuf, max_bytes: u64) -> Option<Self> {
        let cache = Self { dir, max_bytes, said: AtomicBool::new(false), written: AtomicU64::new(0) };
        if let Some(parent) = cache.dir.parent() {
            let _ = DirBuilder::new().recursive(true).mode(0o755).create(parent);
        }
        // `create` fails on an existing path, whoever made it: the check below decides.
        let _ = DirBuilder::new().mode(0o700).create(&cache.dir);
        match cache.trusted() {
            Ok(()) => {
                cache.clean();
                Some(cache)
            }
            Err(why) => {
                tracing::warn!("plugin cache {} not used, compiling in memory: {why}", cache.dir.display());
                None
            }
        }
    }

    /// Whether the directory (and everything above it) can only be changed by this
    /// user or root.
    pub fn trusted(&self) -> Result<(), String> {
        let me = nix::unistd::geteuid().as_raw();
        let meta = fs::symlink_metadata(&self.dir).map_err(|e| format!("cannot inspect it: {e}"))?;
        if !meta.is_dir() {
            return Err("it is not a directory (a symlink?)".into());
        }
        if meta.uid() != me || meta.mode() & 0o022 != 0 {
            return Err(format!(
                "it is owned by uid {} with mode {:o}; it must be uid {me}'s, writable by no one else (fix: chown {me} and chmod 700 it, or remove it)",
                meta.uid(),
                meta.mode() & 0o7777
            ));
        }
        // Checked and used by the same path: one with a symlink in it could be pointed
        // elsewhere between the check and the use.
        let real = fs::canonicalize(&self.dir).map_err(|e| format!("cannot resolve it: {e}"))?;
        if real != self.dir {
            return Err(format!("it is reached through a symlink (it is {}); give cache_dir as that path", real.display()));
        }
        for above in real.ancestors().skip(1) {
            let meta = fs::metadata(above).map_err(|e| format!("cannot inspect {}: {e}", above.display()))?;
            let sticky = meta.mode() & 0o1000 != 0;
            if (meta.uid() != 0 && meta.uid() != me) || (meta.mode() & 0o022 != 0 && !sticky) {
                return Err(format!(
                    "{} (uid {}, mode {:o}) lets another user replace the cache: put cache_dir where only root and uid {me} can write",
                    above.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                ));
            }
        }
        Ok(())
    }

    /// Says (once) why the cache is skipped.
    fn distrust(&self, why: &str) {
        if !self.said.swap(true, Relaxed) {
            tracing::warn!("plugin cache {} skipped, compiling in memory: {why}", self.dir.display());
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.cwasm"))
    }

    /// The artifact of `key`, if the cache holds a trustworthy one (of at most `max`
    /// bytes).
    pub fn load(&self, key: &str, max: u64) -> Option<Vec<u8>> {
        if let Err(why) = self.trusted() {
            self.distrust(&why);
            return None;
        }
        let path = self.path(key);
        let file = OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK).open(&path).ok()?;
        let meta = file.metadata().ok()?;
        let me = nix::unistd::geteuid().as_raw();
        if !meta.is_file() || meta.uid() != me || meta.mode() & 0o022 != 0 || meta.len() > max {
            tracing::warn!("discarding cached {}: not a regular file of uid {me}, writable only by it, of at most {max} bytes", path.display());
            let _ = fs::remove_file(&path);
            return None;
        }
        // Its use is its age for `clean`.
        let _ = file.set_modified(SystemTime::now());
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(max).read_to_end(&mut bytes).ok()?;
        Some(bytes)
    }

    /// Stores `bytes` as the artifact of `key` (best effort: a failure is only logged).
    pub fn store(&self, key: &str, bytes: &[u8]) {
        if let Err(why) = self.trusted() {
            return self.distrust(&why);
        }
        let n = self.written.fetch_add(1, Relaxed);
        let tmp = self.dir.join(format!("{key}.{}.{n}.tmp", std::process::id()));
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .and_then(|mut f| f.write_all(bytes))
            .and_then(|()| fs::rename(&tmp, self.path(key)));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            tracing::warn!("cannot cache a compiled plugin in {}: {e}", self.dir.display());
        }
        self.clean();
    }

    /// Removes leftover temporary files, then the least recently used artifacts until
    /// the rest fit in `max_bytes`.
    fn clean(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        let mut artifacts = Vec::new();
        for entry in entries.flatten() {
            let (Ok(meta), path) = (entry.metadata(), entry.path()) else { continue };
            let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            match path.extension().and_then(|e| e.to_str()) {
                Some("cwasm") => artifacts.push((modified, meta.len(), path)),
                Some("tmp") if modified.elapsed().unwrap_or_default() > STALE_TMP => drop(fs::remove_file(&path)),
                _ => {}
            }
        }
        artifacts.sort();
        let mut total: u64 = artifacts.iter().map(|(_, len, _)| len).sum();
        for (_, len, path) in artifacts {
            if total <= self.max_bytes {
                break;
            }
            if fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}

/// Where the cache goes: `cache_dir`, else `/var/cache/wasmtap` for root, else the XDG
/// cache. None when the process has privileges beyond its user's (file capabilities,
/// set-id): everything under that user's control (the environment, the config, any
/// directory they own) could then carry native code to run with those privileges.
pub fn location(configured: Option<PathBuf>) -> Result<PathBuf, &'static str> {
    if nix::unistd::geteuid().is_root() {
        return Ok(configured.unwrap_or_else(|| PathBuf::from("/var/cache/wasmtap")));
    }
    if elevated() {
        return Err("the daemon has privileges its user lacks (capabilities or set-id), and a cache that user can write could carry planted code");
    }
    if let Some(dir) = configured {
        return Ok(dir);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("wasmtap"))
        .ok_or("neither XDG_CACHE_HOME nor HOME is set; set cache_dir")
}

/// Whether this process has more privileges than its real user: any permitted
/// capability, or set-uid/gid.
fn elevated() -> bool {
    let uids = nix::unistd::getresuid().map(|r| r.real != r.effective || r.real != r.saved).unwrap_or(true);
    let gids = nix::unistd::getresgid().map(|r| r.real != r.effective || r.real != r.saved).unwrap_or(true);
    uids || gids || caps::read(None, caps::CapSet::Permitted).map_or(true, |set| !set.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wasmtap-cache-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn artifacts_round_trip_and_the_cache_stays_bounded() {
        let dir = scratch("bounded");
        let cache = ArtifactCache::open(dir.join("c"), 2500).expect("a fresh cache is trusted");
        assert_eq!(fs::metadata(&cache.dir).unwrap().mode() & 0o777, 0o700);
        for key in ["a", "b", "c"] {
            cache.store(key, &[7u8; 1000]);
            std::thread::sleep(Duration::from_millis(20)); // distinct mtimes
        }
        assert_eq!(fs::metadata(cache.path("c")).unwrap().mode() & 0o777, 0o600);
        assert!(cache.load("a", 1 << 20).is_none(), "the least recently used went");
        assert_eq!(cache.load("c", 1 << 20).unwrap(), vec![7u8; 1000]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cache_others_can_write_to_is_not_used() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = scratch("loose");
        fs::create_dir_all(dir.join("c")).unwrap();
        fs::set_permissions(dir.join("c"), fs::Permissions::from_mode(0o777)).unwrap();
        assert!(ArtifactCache::open(dir.join("c"), 1 << 20).is_none());
        fs::set_permissions(dir.join("c"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let err = ArtifactCache { dir: dir.join("c"), max_bytes: 0, said: AtomicBool::new(false), written: AtomicU64::new(0) }.trusted().unwrap_err();
        assert!(err.contains("lets another user replace the cache"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
