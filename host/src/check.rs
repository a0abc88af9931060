//! `wasmtap check`: what this machine offers wasmtap, each problem with its fix.

use std::path::Path;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_map_supported, is_program_supported},
};

use crate::{
    config::ProbeSettings,
    events::EventFilter,
    probes::{self, Probe, kind::Selectors, system},
};

struct Report {
    failures: usize,
}

impl Report {
    fn ok(&self, what: &str, detail: &str) {
        println!("ok    {what}: {detail}");
    }

    /// Something wasmtap needs is missing.
    fn fail(&mut self, what: &str, detail: &str, fix: &str) {
        self.failures += 1;
        println!("FAIL  {what}: {detail}\n      fix: {fix}");
    }

    /// Something optional is unavailable; wasmtap works without it.
    fn unavailable(&self, what: &str, detail: &str) {
        println!("no    {what}: {detail}");
    }
}

/// Attaches `probe` (a kind attached per point) at `main` of this executable.
fn attach_a_point(probe: &mut Probe, resolve: fn(&str) -> anyhow::Result<u32>, nobody: &EventFilter) -> anyhow::Result<String> {
    let point = format!("uprobe:{}:main", std::env::current_exe()?.display());
    probe.set_filter(&EventFilter { selectors: [resolve(&point)?].into(), ..nobody.clone() })?;
    match probe.point_errors() {
        Some(e) => anyhow::bail!("{e}"),
        None => Ok(point),
    }
}

/// Prints the report; returns whether everything wasmtap needs is there.
pub fn run() -> bool {
    let mut r = Report { failures: 0 };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    r.ok("kernel", &format!("{} ({})", release.trim(), std::env::consts::ARCH));

    if Path::new("/sys/kernel/btf/vmlinux").is_file() {
        r.ok("BTF", "/sys/kernel/btf/vmlinux");
    } else {
        r.unavailable("BTF", "no /sys/kernel/btf/vmlinux; the syscall probe falls back to classic tracepoints and the process probe cannot load");
    }

    let root = nix::unistd::geteuid().is_root();
    let privileged = root || (system::has_cap(system::CAP_BPF) && system::has_cap(system::CAP_PERFMON));
    if privileged {
        r.ok("privileges", if root { "root" } else { "CAP_BPF and CAP_PERFMON" });
    } else {
        r.fail("privileges", "neither root nor CAP_BPF+CAP_PERFMON", "run as root, or: setcap cap_bpf,cap_perfmon+ep $(which wasmtap)");
    }

    for (path, fstype, need) in [(system::TRACEFS, "tracefs", "classic tracepoints"), (system::BPFFS, "bpf", "pinning")] {
        match system::ensure_mounted(path, fstype) {
            Ok(false) => r.ok(fstype, &format!("mounted at {path}")),
            Ok(true) => r.ok(fstype, &format!("was not mounted; mounted it at {path}")),
            Err(e) => r.unavailable(fstype, &format!("{e:#} (needed for {need})")),
        }
    }

    match crate::events::scope::cgroup2_mount() {
        Some(path) => r.ok("cgroup v2", &format!("mounted at {}", path.display())),
        None => r.unavailable("cgroup v2", "not mounted; [[tenant]] scopes need it (mount -t cgroup2 none /sys/fs/cgroup/unified)"),
    }

    match is_map_supported(MapType::RingBuf) {
        Ok(true) => r.ok("ring buffers", "supported"),
        Ok(false) => r.fail("ring buffers", "BPF_MAP_TYPE_RINGBUF not supported", "use a kernel >= 5.8"),
        Err(e) => r.fail("ring buffers", &format!("probe failed: {e}"), "run as root"),
    }

    for (name, ty) in [("tracepoint programs", ProgramType::TracePoint), ("raw tracepoint programs", ProgramType::RawTracePoint)] {
        match is_program_supported(ty) {
            Ok(true) => r.ok(name, "supported"),
            Ok(false) => r.unavailable(name, "not supported by this kernel"),
            Err(e) => r.unavailable(name, &format!("probe refused: {:#}", anyhow::Error::from(e))),
        }
    }
    if Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        r.ok("uprobes", "supported (the uprobe kind needs \"sys_admin\" in capabilities_keep: the kernel grants uprobe perf events only with it)");
    } else {
        r.unavailable("uprobes", "this kernel has no uprobe PMU (CONFIG_UPROBE_EVENTS off); the uprobe kind cannot attach");
    }
    if Path::new("/sys/bus/event_source/devices/kprobe").exists() {
        r.ok("kprobes", "supported (kprobe: points of the uprobe kind)");
    } else {
        r.unavailable("kprobes", "this kernel has no kprobe PMU (CONFIG_KPROBES off); kprobe: points are refused, naming the tracepoint to use instead");
    }
    match is_program_supported(ProgramType::Tracing) {
        Ok(true) => r.ok("fentry/fexit", "supported by the kernel; wasmtap does not attach fentry programs (use tracepoints)"),
        Ok(false) => r.unavailable("fentry/fexit", "not supported by this kernel; wasmtap does not attach fentry programs (use tracepoints)"),
        Err(e) => r.unavailable(
            "fentry/fexit",
            &format!("refused by the kernel ({:#}); wasmtap does not attach fentry programs (use tracepoints)", anyhow::Error::from(e)),
        ),
    }

    // The real thing: load and attach every kind's probe, recording nothing. (A small
    // ring buffer: nothing is written to it.)
    let nobody = EventFilter { pids: [u32::MAX].into(), ..Default::default() };
    let settings = ProbeSettings { ring_buffer_bytes: 1 << 16, ..Default::default() };
    for &kind in probes::KINDS {
        let what = format!("{} probe", kind.name);
        match Probe::start(kind, &settings, &nobody) {
            Ok((mut probe, _stream)) => match kind.selectors {
                // Attached per point: attach one, at this binary's `main`.
                Selectors::Points(resolve) => match attach_a_point(&mut probe, resolve, &nobody) {
                    Ok(point) => r.ok(&what, &format!("loaded, and attached at {point}")),
                    Err(e) => r.unavailable(&what, &format!("loaded, but a point cannot be attached: {e:#}")),
                },
                Selectors::Named(_) => r.ok(&what, &format!("loaded and attached via {}", probe.attach_kind())),
            },
            Err(e) => r.fail(&what, &format!("{e:#}"), "see the lines above"),
        }
    }

    if r.failures == 0 {
        println!("wasmtap can run here.");
    } else {
        println!("{} problem(s) keep wasmtap from running here.", r.failures);
    }
    r.failures == 0
}
