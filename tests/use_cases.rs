//! The seed's use cases as bundled plugins, each checked against a ground truth the
//! kernel keeps itself: `cpu-throttle` against the cpu controller's own throttling
//! accounting (`cpu.stat`).

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
        let dir = v1_cpu.join(cgroup.0.file_name().unwrap());
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
    let (throttled, free) = (Cgroup::new("throttled"), Cgroup::new("unthrottled"));
    // 10 % of a CPU: 10 ms of every 100 ms.
    let quota = CpuQuota::new(&throttled, 10_000, 100_000);
    let config = format!("[[plugin]]\nname = \"cpu-throttle\"\nbundled = \"cpu-throttle\"\nconfig = {{ cgroups = [{}, {}] }}\n", throttled.id(), free.id());
    let daemon = Daemon::start(Some(&config));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let comm = unique_comm("spin");
    let mut spinners = [spinner(&throttled, Some(&quota), &comm, cpus - 1, 3000), spinner(&free, None, &comm, 0, 3000)];
    for s in &mut spinners {
        s.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }
    for s in &mut spinners {
        assert!(s.wait().unwrap().success());
    }
    let (intervals, throttled_ns) = quota.throttling();
    assert!(intervals >= 20, "a 3 s spin at 10 % of a CPU is throttled about 30 times; the kernel says {intervals}");

    // Until the plugin counted as many throttled intervals as the kernel (its last
    // records may still be on their way), or, if its count stays off, a while.
    let container = [("container", throttled.path())];
    let labels = || container.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>();
    let deadline = Instant::now() + Duration::from_secs(3);
    let (count, seconds, metrics) = loop {
        let metrics = daemon.metrics();
        let count = sample(&metrics, "cpu_throttle_throttled_seconds_count", &labels()).unwrap_or(0.0);
        let seconds = sample(&metrics, "cpu_throttle_throttled_seconds_sum", &labels()).unwrap_or(0.0);
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
    let ours: Vec<&str> = metrics.lines().filter(|l| l.starts_with("cpu_throttle_") && !l.contains("_bucket")).collect();
    assert!(
        within(count, intervals as f64) && within(seconds, throttled_ns as f64 / 1e9),
        "throttled intervals: plugin {count}, kernel {intervals}; throttled time: plugin {seconds:.3} s, kernel {:.3} s\n{}\n{}",
        throttled_ns as f64 / 1e9,
        ours.join("\n"),
        daemon.log()
    );
    // The spinner without a quota was never throttled, nor left waiting that long.
    let unthrottled = [("container", free.path())];
    let unthrottled: Vec<(&str, &str)> = unthrottled.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(sample(&metrics, "cpu_throttle_throttled_seconds_count", &unthrottled), None, "{}", ours.join("\n"));
    let free_long = [("container", free.path()), ("reason", "preempted".into())];
    let free_long: Vec<(&str, &str)> = free_long.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(sample(&metrics, "cpu_throttle_long_waits_total", &free_long), None, "{}", ours.join("\n"));
}
