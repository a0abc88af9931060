//! The seed's use cases as bundled plugins, each checked against a ground truth the
//! kernel or the program keeps itself: `cpu-throttle` against the cpu controller's own
//! throttling accounting (`cpu.stat`), in two tenants that each see only their own;
//! `tcp-per-cgroup` against the connections, bytes and retransmits a workload made (the
//! last as the kernel's `tcpi_total_retrans`); `pg-query-latency` against
//! `pg_stat_statements` of two real PostgreSQL servers.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use wasmtap_tests::{
    Cgroup, Daemon, HOSTILE_WASM, admin_call, built,
    postgres::{self, Postgres},
    privileged_or_skip, sample, sum_samples, unique_comm, wait_for, wait_for_removal,
};

/// The tests here run one at a time: a throttled task's wait includes any wait for a CPU
/// after its quota is refilled, which another test's load would lengthen.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

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

/// `wt-workload ARGS` in `cgroup` (and in `quota`'s cgroup), with piped stdin and stdout.
fn workload_in(cgroup: &Cgroup, quota: Option<&CpuQuota>, args: &[&str]) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > {}/cgroup.procs && {} && exec \"$0\" \"$@\"", cgroup.0.display(), quota.map_or("true".into(), CpuQuota::join)))
        .arg(built("wt-workload"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn wt-workload")
}

#[test]
fn cpu_throttle_agrees_with_the_kernels_throttling_accounting() {
    if !privileged_or_skip("cpu_throttle_agrees_with_the_kernels_throttling_accounting") {
        return;
    }
    let _serial = one_at_a_time();
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
    let (last, first) = (cpus[cpus.len() - 1].to_string(), cpus[0].to_string());
    let mut spinners = [workload_in(&throttled, Some(&quota), &["spin", &comm, &last, "3000"]), workload_in(&free, None, &["spin", &comm, &first, "3000"])];
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

fn tcp_config(cgroup: &Cgroup) -> String {
    format!("[[plugin]]\nname = \"tcp-per-cgroup\"\nbundled = \"tcp-per-cgroup\"\nconfig = {{ cgroups = [{}] }}\n", cgroup.id())
}

#[test]
fn tcp_per_cgroup_counts_connections_and_bytes_exactly() {
    if !privileged_or_skip("tcp_per_cgroup_counts_connections_and_bytes_exactly") {
        return;
    }
    let _serial = one_at_a_time();
    let cgroup = Cgroup::new("tcp");
    let daemon = Daemon::start(Some(&tcp_config(&cgroup)));
    let (n, bytes) = (25u64, 100_000u64);
    let mut child = workload_in(&cgroup, None, &["tcp", &unique_comm("tcp"), &n.to_string(), &bytes.to_string()]);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut port = String::new();
    out.read_line(&mut port).expect("the port");
    let port = port.trim().to_owned();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(child.wait().unwrap().success());

    let container = cgroup.path();
    let get = |m: &str, name: &str, direction: Option<&str>| {
        let mut labels = vec![("container", container.as_str()), ("port", port.as_str())];
        labels.extend(direction.map(|d| ("direction", d)));
        sample(m, name, &labels).unwrap_or(0.0)
    };
    // (name, direction, expected): every connection both ways, each one's bytes once.
    let expected = [
        ("tcp_per_cgroup_connections_total", Some("out"), n),
        ("tcp_per_cgroup_connections_total", Some("in"), n),
        ("tcp_per_cgroup_connect_seconds_count", None, n),
        ("tcp_per_cgroup_connection_seconds_count", Some("out"), n),
        ("tcp_per_cgroup_connection_seconds_count", Some("in"), n),
        ("tcp_per_cgroup_sent_bytes_total", Some("out"), n * bytes),
        ("tcp_per_cgroup_received_bytes_total", Some("in"), n * bytes),
        ("tcp_per_cgroup_received_bytes_total", Some("out"), 0),
        ("tcp_per_cgroup_sent_bytes_total", Some("in"), 0),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = daemon.metrics();
        let got: Vec<u64> = expected.iter().map(|(name, dir, _)| get(&m, name, *dir) as u64).collect();
        if got.iter().zip(&expected).all(|(g, e)| *g == e.2) {
            break;
        }
        if Instant::now() > deadline {
            let ours: Vec<&str> = m.lines().filter(|l| l.starts_with("tcp_per_cgroup_") && !l.contains("_bucket")).collect();
            panic!("expected {expected:?}, got {got:?}\n{}\n{}", ours.join("\n"), daemon.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(&daemon.metrics(), "tcp_per_cgroup_connect_failures_total", None), 0.0);
}

#[test]
fn tcp_per_cgroup_counts_retransmits_like_the_kernel() {
    if !privileged_or_skip("tcp_per_cgroup_counts_retransmits_like_the_kernel") {
        return;
    }
    let _serial = one_at_a_time();
    let cgroup = Cgroup::new("retransmit");
    let daemon = Daemon::start(Some(&tcp_config(&cgroup)));
    // In a network namespace of its own, where an nftables rule can drop its packets.
    let mut child = Command::new("unshare")
        .args(["-n", "sh", "-c"])
        .arg(format!("ip link set lo up && echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"", cgroup.0.display()))
        .arg(built("wt-workload"))
        .args(["retransmit", &unique_comm("retx")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn wt-workload retransmit in a network namespace");
    let pid = child.id().to_string();
    let (mut stdin, mut out) = (child.stdin.take().unwrap(), BufReader::new(child.stdout.take().unwrap()));
    // Never left behind by a failed assertion.
    struct Reap(Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reap(child);
    let mut line = String::new();
    let mut expect = |what: &str, line: &mut String| {
        line.clear();
        out.read_line(line).expect("workload output");
        assert!(line.starts_with(what), "expected {what:?}, the workload said {line:?}");
    };
    expect("connected", &mut line);
    let nft = |script: &str| {
        let mut nft =
            Command::new("nsenter").args(["-t", &pid, "-n", "nft", "-f", "-"]).stdin(Stdio::piped()).spawn().expect("nsenter nft (apt-get install nftables)");
        nft.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(nft.wait().unwrap().success(), "nft -f: {script}");
    };
    // Every TCP packet lost on its way in (dropped on output, a send would fail locally
    // instead): the byte sent next is retransmitted until the rule goes.
    nft("table inet wasmtap_test {\n chain in {\n  type filter hook input priority 0;\n  meta l4proto tcp drop\n }\n}\n");
    stdin.write_all(b"send\n").unwrap();
    expect("sent", &mut line);
    let container = cgroup.path();
    let retransmits = |d: &Daemon| sum_samples(&d.metrics(), "tcp_per_cgroup_retransmits_total", &[("container", &container)]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while retransmits(&daemon) < 1.0 {
        assert!(Instant::now() < deadline, "no retransmit counted in 20 s\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    nft("delete table inet wasmtap_test");
    stdin.write_all(b"finish\n").unwrap();
    line.clear();
    out.read_line(&mut line).expect("the kernel's retransmit count");
    let kernel: f64 = line.trim().parse().expect("tcpi_total_retrans");
    assert!(child.0.wait().unwrap().success());
    assert!(kernel >= 1.0);
    // Until the plugin has the connection's close too (its last retransmits are then in).
    let closes = |d: &Daemon| sum_samples(&d.metrics(), "tcp_per_cgroup_connection_seconds_count", &[("container", &container)]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while closes(&daemon) < 2.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("tcp-per-cgroup: retransmits plugin {} kernel {kernel}", retransmits(&daemon));
    assert_eq!(retransmits(&daemon), kernel, "the plugin's retransmits against the kernel's tcpi_total_retrans\n{}", daemon.log());
}

/// The same statements as `pg_stat_statements` normalises them, with literals.
const PG_MIX: [&str; 3] =
    ["SELECT count(*) FROM items WHERE id < $1", "INSERT INTO items (id, name) VALUES ($1, $2)", "UPDATE items SET name = $1 WHERE id = $2"];

/// `n` runs of each statement of `PG_MIX`, with literals that vary, ids from `first`.
fn pg_mix(n: u64, first: u64) -> String {
    (first..first + n)
        .map(|i| {
            format!(
                "SELECT count(*) FROM items WHERE id < {i};\nINSERT INTO items (id, name) VALUES ({i}, 'item {i}');\nUPDATE items SET name = 'renamed {}' WHERE id = {i};\n",
                i * 7
            )
        })
        .collect()
}

/// pg-query-latency's fingerprint of a statement `pg_stat_statements` shows as `query`.
fn fingerprint(query: &str) -> String {
    query.replace("$1", "?").replace("$2", "?")
}

#[test]
fn pg_query_latency_counts_queries_like_pg_stat_statements_and_scopes_by_server() {
    if !privileged_or_skip("pg_query_latency_counts_queries_like_pg_stat_statements_and_scopes_by_server") {
        return;
    }
    let _serial = one_at_a_time();
    let (a, b) = (Postgres::start(), Postgres::start());
    let binary = postgres::bin_dir().join("postgres");
    let plugin = |name: &str, pids: &str| {
        format!("[[plugin]]\nname = \"{name}\"\nbundled = \"pg-query-latency\"\nconfig = {{ binary = \"{}\"{pids} }}\n\n", binary.display())
    };
    // The kernel grants uprobe perf events only with CAP_SYS_ADMIN.
    let config = "capabilities_keep = [\"bpf\", \"perfmon\", \"sys_admin\"]\n\n".to_owned()
        + &plugin("pg-a", &format!(", pids = [{}]", a.pid()))
        + &plugin("pg-all", "");
    let daemon = Daemon::start(Some(&config));
    let count =
        |m: &str, plugin: &str, query: &str| sample(m, &format!("{plugin}_query_seconds_count"), &[("fingerprint", &fingerprint(query))]).unwrap_or(0.0) as u64;
    // The probes fire (their semaphores were raised in the running servers).
    for server in [&a, &b] {
        server.psql("CREATE TABLE items (id int PRIMARY KEY, name text)");
        wait_for(Duration::from_secs(20), "a query to be seen", || {
            server.psql("SELECT 'ready'");
            (count(&daemon.metrics(), "pg_all", "SELECT $1") > 0).then_some(())
        });
        server.psql("SELECT pg_stat_statements_reset()");
    }
    let before: Vec<u64> = PG_MIX.iter().map(|q| count(&daemon.metrics(), "pg_all", q)).collect();
    assert_eq!(before, [0, 0, 0]);
    a.run_script(&pg_mix(40, 0), false);
    b.run_script(&pg_mix(25, 1000), false);
    // Two failed queries (no `query__done`), each followed by one that ends.
    a.run_script("SELECT 1/0;\nSELECT 'after';\nSELECT 2/0;\nSELECT 'after';\n", true);

    let truth_a: Vec<u64> = PG_MIX.iter().map(|q| a.calls(q)).collect();
    let truth_b: Vec<u64> = PG_MIX.iter().map(|q| b.calls(q)).collect();
    assert_eq!((truth_a.clone(), truth_b.clone()), (vec![40; 3], vec![25; 3]), "pg_stat_statements counts the mix");
    let both: Vec<u64> = truth_a.iter().zip(&truth_b).map(|(a, b)| a + b).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = daemon.metrics();
        let scoped: Vec<u64> = PG_MIX.iter().map(|q| count(&m, "pg_a", q)).collect();
        let all: Vec<u64> = PG_MIX.iter().map(|q| count(&m, "pg_all", q)).collect();
        if scoped == truth_a && all == both {
            break;
        }
        if Instant::now() > deadline {
            let ours: Vec<&str> = m.lines().filter(|l| l.starts_with("pg_") && l.contains("_count")).collect();
            panic!("server a {truth_a:?} (pg-a got {scoped:?}), both {both:?} (pg-all got {all:?})\n{}\n{}", ours.join("\n"), daemon.log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Latencies are real: each query took more than a microsecond and less than a minute.
    let m = daemon.metrics();
    // The failed queries are counted apart (they ran after the mix: wait for them).
    let unfinished = |m: &str| [sample(m, "pg_a_unfinished_total", &[]), sample(m, "pg_all_unfinished_total", &[])];
    wait_for(Duration::from_secs(20), "2 unfinished queries", || (unfinished(&daemon.metrics()) == [Some(2.0); 2]).then_some(()));
    let sum = sample(&m, "pg_a_query_seconds_sum", &[("fingerprint", &fingerprint(PG_MIX[0]))]).unwrap();
    assert!(sum > 40e-6 && sum < 60.0, "{sum}");
}

#[test]
fn kprobe_and_fentry_points_are_refused_naming_the_tracepoint_to_use_and_tenants_get_no_points() {
    if !privileged_or_skip("kprobe_and_fentry_points_are_refused_naming_the_tracepoint_to_use_and_tenants_get_no_points") {
        return;
    }
    let cgroup = Cgroup::new("probes-tenant");
    let daemon = Daemon::start(Some(&format!("[[tenant]]\nname = \"t\"\ncgroup = \"{}\"\n", cgroup.0.display())));
    let load_as = |point: &str, tenant: &str| {
        let section = format!("name = \"probes\"\npath = \"{HOSTILE_WASM}\"\n{tenant}config = {{ mode = \"probes\", probes = [\"{point}\"] }}\n");
        admin_call(&daemon.admin_socket(), "POST", "/v1/plugins", &section)
    };
    let load = |point: &str| load_as(point, "");
    // Probe points act on every process of the node: not for tenants' plugins.
    let (code, answer) = load_as(&format!("uprobe:{}:main", built("wt-workload").display()), "tenant = \"t\"\n");
    assert_eq!(code, 422, "{answer}");
    assert!(answer.to_string().contains("not offered to tenants' plugins"), "{answer}");
    let kprobes = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    let (code, answer) = load("kprobe:tcp_retransmit_skb");
    if kprobes {
        assert_eq!(code, 200, "{answer}");
    } else {
        assert_eq!(code, 422, "{answer}");
        let error = answer.to_string();
        assert!(error.contains("no kprobe PMU") && error.contains("CONFIG_KPROBES") && error.contains("tracepoint tcp:tcp_retransmit_skb"), "{error}");
    }
    let (code, answer) = load("fentry:do_sys_openat2");
    assert_eq!(code, 422, "{answer}");
    assert!(answer.to_string().contains("does not attach fentry") && answer.to_string().contains("the syscall kind"), "{answer}");
    // The daemon carries on.
    assert_eq!(daemon.get("/healthz", None).map(|(code, _)| code), Some(200));
}

#[test]
fn uprobes_on_a_function_read_its_arguments_and_return_value_exactly() {
    if !privileged_or_skip("uprobes_on_a_function_read_its_arguments_and_return_value_exactly") {
        return;
    }
    let binary = built("wt-workload");
    let (entry, ret) = (format!("uprobe:{}:wt_probe_point", binary.display()), format!("uretprobe:{}:wt_probe_point", binary.display()));
    let config = format!(
        "capabilities_keep = [\"bpf\", \"perfmon\", \"sys_admin\"]\n\n[[plugin]]\nname = \"probes\"\npath = \"{HOSTILE_WASM}\"\n\
         config = {{ mode = \"probes\", probes = [\"{entry}\", \"{ret}\"] }}\n"
    );
    let daemon = Daemon::start(Some(&config));
    let n: u64 = 1000;
    let mut child = Command::new(&binary).args(["calls", &n.to_string()]).stdin(Stdio::piped()).spawn().expect("wt-workload");
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert!(child.wait().unwrap().success());
    let id = |point: &str| wasmtap_events::uprobe::probe_id(point).to_string();
    // wt_probe_point(i, 42) for i in 0..n returns 42 i.
    let expected = [
        (id(&entry), "hits", n),
        (id(&entry), "arg0", n * (n - 1) / 2),
        (id(&entry), "arg1", 42 * n),
        (id(&ret), "hits", n),
        (id(&ret), "arg0", 42 * n * (n - 1) / 2),
    ];
    let got = || -> Vec<u64> {
        let m = daemon.metrics();
        expected.iter().map(|(probe, what, _)| sample(&m, "probes_hits_total", &[("probe", probe), ("what", what)]).unwrap_or(0.0) as u64).collect()
    };
    let want: Vec<u64> = expected.iter().map(|e| e.2).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got() != want {
        assert!(Instant::now() < deadline, "expected {want:?}, got {:?}\n{}", got(), daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}
