//! The seed's use cases as bundled plugins, each checked against a ground truth the
//! kernel keeps itself: `cpu-throttle` against the cpu controller's own throttling
//! accounting (`cpu.stat`), in two tenants that each see only their own.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use wasmtap_tests::{Cgroup, Daemon, built, privileged_or_skip, sample, unique_comm, wait_for_removal};

/// A CPU quota on a cgroup: on the cgroup v2 cgroup itself where v2 offers the cpu
/// controller, else in a cgroup of the v1 cpu hierarchy made beside it (hybrid hosts,
/// such as these VMs, keep cpu on v1).
struct CpuQuota {
    dir: PathBuf,
    v1: bool,
}

impl CpuQuota {
    fn new(cgroup: &Cgroup, quota_us: u64, period_us: u64) -> Self {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let v2_root = cgroup.0.ancestors().find(|d| d.parent().is_some_and(|p| !p.join("cgroup.controllers").is_file())).expect("the v2 mount").to_path_buf();
        let v2_has_cpu = std::fs::read_to_string(v2_root.join("cgroup.controllers")).unwrap().split_whitespace().any(|c| c == "cpu");
        if v2_has_cpu {
            std::fs::write(v2_root.join("cgroup.subtree_control"), "+cpu").expect("enable the v2 cpu controller");
            std::fs::write(cgroup.0.join("cpu.max"), format!("{quota_us} {period_us}")).expect("write cpu.max");
            return Self { dir: cgroup.0.clone(), v1: false };
        }
        let v1_cpu = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"cgroup") && f.get(3).is_some_and(|o| o.split(',').any(|o| o == "cpu"))).then(|| PathBuf::from(f[1]))
            })
            .expect("a cpu controller, on cgroup v2 or v1");
        let dir = v1_cpu.join(cgroup.path().trim_start_matches('/').replace('/', "-"));
        std::fs::create_dir_all(&dir).expect("mkdir v1 cpu cgroup");
        std::fs::write(dir.join("cpu.cfs_period_us"), period_us.to_string()).expect("write cpu.cfs_period_us");
        std::fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string()).expect("write cpu.cfs_quota_us");
        Self { dir, v1: true }
    }

    /// The shell command that moves the shell into the quota's cgroup.
    fn join(&self) -> String {
        if self.v1 { format!("echo $$ > {}/cgroup.procs", self.dir.display()) } else { "true".into() }
    }

    /// (throttled intervals, throttled nanoseconds) from the kernel's `cpu.stat`.
    fn throttling(&self) -> (u64, u64) {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).expect("read cpu.stat");
        let field = |name: &str| stat.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok());
        let count = field("nr_throttled").expect("nr_throttled");
        let ns = if self.v1 { field("throttled_time").expect("throttled_time") } else { field("throttled_usec").expect("throttled_usec") * 1000 };
        (count, ns)
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        if self.v1 {
            let _ = wait_for_removal(&self.dir);
        }
    }
}

/// Starts `wt-workload spin` in `cgroup` (and `quota`'s cgroup), pinned to `cpu`,
/// waiting for a line on stdin to start spinning.
fn spinner(cgroup: &Cgroup, quota: Option<&CpuQuota>, comm: &str, cpu: usize, millis: u64) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > {}/cgroup.procs && {} && exec \"$0\" \"$@\"", cgroup.0.display(), quota.map_or("true".into(), CpuQuota::join)))
        .arg(built("wt-workload"))
        .args(["spin", comm, &cpu.to_string(), &millis.to_string()])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn wt-workload spin")
}

#[test]
fn cpu_throttle_agrees_with_the_kernels_throttling_accounting() {
    if !privileged_or_skip("cpu_throttle_agrees_with_the_kernels_throttling_accounting") {
        return;
    }
    // Two tenants, each a cgroup subtree with its own cpu-throttle; the spinners run in
    // a cgroup below each tenant's, so the kernel's filter looks through the waiting
    // task's ancestors (and each tenant must see only its own).
    let (squeezed, roomy) = (Cgroup::new("squeezed"), Cgroup::new("roomy"));
    let (throttled, free) = (squeezed.child("spin"), roomy.child("spin"));
    // 10 % of a CPU: 10 ms of every 100 ms.
    let quota = CpuQuota::new(&throttled, 10_000, 100_000);
    // A long wait here is 50 ms (the unthrottled spinner must show none; a busy
    // machine's preemptions last a few ms); roomy records every wait, so that its
    // spinner's (at least its wakeup) show the tenant's records arrive.
    let tenant = |name: &str, cgroup: &Cgroup, min_wait_us: u32| {
        format!(
            "[[tenant]]\nname = \"{name}\"\ncgroup = \"{}\"\n\n[[plugin]]\nname = \"{name}-cpu\"\nnamespace = \"cpu\"\nbundled = \"cpu-throttle\"\n\
             tenant = \"{name}\"\nconfig = {{ throttle_ms = 50, min_wait_us = {min_wait_us} }}\n\n",
            cgroup.0.display()
        )
    };
    let daemon = Daemon::start(Some(&(tenant("squeezed", &squeezed, 1000) + &tenant("roomy", &roomy, 0))));
    // Each spinner on a CPU of its own where there are two.
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("sched_getaffinity");
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count()).filter(|&c| allowed.is_set(c).unwrap_or(false)).collect();
    let comm = unique_comm("spin");
    let mut spinners = [spinner(&throttled, Some(&quota), &comm, cpus[cpus.len() - 1], 3000), spinner(&free, None, &comm, cpus[0], 3000)];
    for s in &mut spinners {
        s.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }
    for s in &mut spinners {
        assert!(s.wait().unwrap().success());
    }
    let (intervals, throttled_ns) = quota.throttling();
    assert!(intervals >= 20, "a 3 s spin at 10 % of a CPU is throttled about 30 times; the kernel says {intervals}");

    let (throttled_path, free_path) = (throttled.path(), free.path());
    let of = |container: &str| vec![("container", container.to_owned())];
    let value = |metrics: &str, name: &str, labels: &[(&str, String)]| sample(metrics, name, &labels.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>());
    // Until the plugin counted as many throttled intervals as the kernel (its last
    // records may still be on their way), or, if its count stays off, a while.
    let deadline = Instant::now() + Duration::from_secs(3);
    let (count, seconds, metrics) = loop {
        let metrics = daemon.metrics();
        let count = value(&metrics, "squeezed_cpu_throttled_seconds_count", &of(&throttled_path)).unwrap_or(0.0);
        let seconds = value(&metrics, "squeezed_cpu_throttled_seconds_sum", &of(&throttled_path)).unwrap_or(0.0);
        if count >= intervals as f64 || Instant::now() > deadline {
            break (count, seconds, metrics);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let within = |ours: f64, theirs: f64| (ours - theirs).abs() <= 0.05 * theirs;
    eprintln!(
        "cpu-throttle: throttled intervals plugin {count} kernel {intervals}; throttled time plugin {seconds:.4} s kernel {:.4} s",
        throttled_ns as f64 / 1e9
    );
    let ours: Vec<&str> = metrics.lines().filter(|l| l.contains("_cpu_") && !l.contains("_bucket")).collect();
    let ours = ours.join("\n");
    assert!(
        within(count, intervals as f64) && within(seconds, throttled_ns as f64 / 1e9),
        "throttled intervals: plugin {count}, kernel {intervals}; throttled time: plugin {seconds:.3} s, kernel {:.3} s\n{ours}\n{}",
        throttled_ns as f64 / 1e9,
        daemon.log()
    );
    // The spinner without a quota: its waits arrive (its wakeup at least), none of them
    // throttled, none preempted for long.
    assert!(value(&metrics, "roomy_cpu_wait_seconds_count", &of(&free_path)).unwrap_or(0.0) >= 1.0, "{ours}");
    assert_eq!(value(&metrics, "roomy_cpu_throttled_seconds_count", &of(&free_path)), None, "{ours}");
    let long = |reason: &str| [("container", free_path.clone()), ("reason", reason.to_owned())];
    assert_eq!(value(&metrics, "roomy_cpu_long_waits_total", &long("preempted")), None, "{ours}");
    assert_eq!(value(&metrics, "roomy_cpu_long_waits_total", &long("throttled")), None, "{ours}");
    // Each tenant saw only its own cgroups.
    assert!(!ours.lines().any(|l| l.starts_with("squeezed_") && l.contains(&free_path)), "{ours}");
    assert!(!ours.lines().any(|l| l.starts_with("roomy_") && l.contains(&throttled_path)), "{ours}");
}
