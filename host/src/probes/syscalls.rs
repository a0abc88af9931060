//! The `raw_syscalls` probe family: one record per completed syscall.

use std::collections::BTreeSet;

use anyhow::Context as _;
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{BtfTracePoint, TracePoint},
};
use wasmtap_events::{FILTER_CGROUPS, FILTER_PIDS, FILTER_SYSCALLS, MAX_FILTER_ENTRIES, MAX_SYSCALLS, ProbeConfig, maps};

use super::{EBPF_OBJECT, explain, system};
use crate::{
    config::ProbeSettings,
    events::{EventFilter, ring::RingReader},
};

/// How the programs were attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// BTF-enabled tracepoints (`tp_btf/sys_enter`, `tp_btf/sys_exit`): cheapest.
    BtfTracepoint,
    /// Classic tracepoints (`raw_syscalls:sys_enter`, `raw_syscalls:sys_exit`).
    Tracepoint,
}

/// Owns the loaded object: programs, filter maps, config. Dropping it detaches and
/// unloads every program.
pub struct SyscallProbe {
    ebpf: Ebpf,
    attach: Attach,
    config: ProbeConfig,
    installed: EventFilter,
    widened: Vec<&'static str>,
}

/// What the reader owns: the ring buffer and the kernel drop counters.
pub struct SyscallStream {
    pub ring: RingReader,
    pub drops: PerCpuArray<MapData, u64>,
}

impl SyscallProbe {
    /// Loads the object, programs `filter` into the kernel, then attaches.
    pub fn start(settings: &ProbeSettings, filter: &EventFilter) -> anyhow::Result<(Self, SyscallStream)> {
        let btf = Btf::from_sys_fs().ok();
        let mut ebpf = EbpfLoader::new()
            .btf(btf.as_ref())
            .map_max_entries(maps::SYSCALL_EVENTS, settings.ring_buffer_bytes)
            .load(EBPF_OBJECT)
            .map_err(|e| explain(e, "cannot load the syscall probe's eBPF object"))?;
        let ring = RingReader::new(ebpf.take_map(maps::SYSCALL_EVENTS).context("object lacks SYSCALL_EVENTS")?)?;
        let drops = PerCpuArray::try_from(ebpf.take_map(maps::COUNTERS).context("object lacks COUNTERS")?)?;
        let config = ProbeConfig {
            filters: 0,
            ignore_pid: std::process::id(),
            wakeup_bytes: u64::from(settings.ring_buffer_bytes) * u64::from(settings.wakeup_percent) / 100,
        };
        let mut probe = Self { ebpf, attach: Attach::Tracepoint, config, installed: EventFilter::default(), widened: Vec::new() };
        probe.set_filter(filter)?;
        probe.attach = match &btf {
            Some(btf) => match probe.attach_btf(btf) {
                Ok(()) => Attach::BtfTracepoint,
                Err(e) => {
                    tracing::warn!("tp_btf attach failed, falling back to tracepoints: {e:#}");
                    probe.attach_tracepoints()?;
                    Attach::Tracepoint
                }
            },
            None => {
                tracing::warn!("no kernel BTF (/sys/kernel/btf/vmlinux): using classic tracepoints");
                probe.attach_tracepoints()?;
                Attach::Tracepoint
            }
        };
        Ok((probe, SyscallStream { ring, drops }))
    }

    fn attach_btf(&mut self, btf: &Btf) -> anyhow::Result<()> {
        for (program, event) in [("wt_sys_enter", "sys_enter"), ("wt_sys_exit", "sys_exit")] {
            let p: &mut BtfTracePoint = self.ebpf.program_mut(program).context("missing program")?.try_into()?;
            p.load(event, btf).map_err(|e| explain(e, &format!("cannot load tp_btf/{event}")))?;
            p.attach().map_err(|e| explain(e, &format!("cannot attach tp_btf/{event}")))?;
        }
        Ok(())
    }

    fn attach_tracepoints(&mut self) -> anyhow::Result<()> {
        system::ensure_mounted(system::TRACEFS, "tracefs")?;
        for (program, event) in [("wt_sys_enter_tp", "sys_enter"), ("wt_sys_exit_tp", "sys_exit")] {
            let p: &mut TracePoint = self.ebpf.program_mut(program).context("missing program")?.try_into()?;
            p.load().map_err(|e| explain(e, &format!("cannot load tracepoint raw_syscalls/{event}")))?;
            p.attach("raw_syscalls", event)
                .map_err(|e| explain(e, &format!("cannot attach tracepoint raw_syscalls/{event}")))?;
        }
        Ok(())
    }

    pub fn attach_kind(&self) -> Attach {
        self.attach
    }

    /// Kernel ids of the loaded programs (for status and for leak checks).
    pub fn program_ids(&self) -> Vec<u32> {
        self.ebpf.programs().filter_map(|(_, p)| p.info().ok()).map(|i| i.id()).collect()
    }

    /// Filter dimensions left open in the kernel because the union did not fit.
    pub fn widened(&self) -> Vec<&'static str> {
        self.widened.clone()
    }

    /// Programs the kernel filter maps. Entries are added before the switch bits are set
    /// and removed after, so a change never briefly narrows what is recorded. A pid or
    /// cgroup set larger than its map is not pushed: that dimension stays open in the
    /// kernel (the host's routing still delivers each plugin exactly its records), rather
    /// than the probe recording for nobody.
    pub fn set_filter(&mut self, filter: &EventFilter) -> anyhow::Result<()> {
        if let Some(&nr) = filter.syscalls.iter().find(|&&nr| nr >= MAX_SYSCALLS) {
            anyhow::bail!("syscall number {nr} is beyond the probe's table of {MAX_SYSCALLS}");
        }
        let mut filter = filter.clone();
        self.widened.clear();
        let mut widen = |dimension: &'static str, len: usize| {
            let too_big = len > MAX_FILTER_ENTRIES as usize;
            if too_big {
                tracing::warn!(
                    "the plugins' {dimension} filters hold {len} entries, more than the kernel map's {MAX_FILTER_ENTRIES}: \
                     {dimension} are not filtered in the kernel, only in the host"
                );
                self.widened.push(dimension);
            }
            too_big
        };
        if widen("pids", filter.pids.len()) {
            filter.pids.clear();
        }
        if widen("cgroups", filter.cgroups.len()) {
            filter.cgroups.clear();
        }
        let filter = &filter;
        let old = std::mem::take(&mut self.installed);
        sync_set(&mut self.ebpf, maps::PID_FILTER, &old.pids, &filter.pids, Stage::Add)?;
        sync_set(&mut self.ebpf, maps::CGROUP_FILTER, &old.cgroups, &filter.cgroups, Stage::Add)?;
        let mut syscalls: Array<_, u8> = Array::try_from(self.ebpf.map_mut(maps::SYSCALL_FILTER).context("SYSCALL_FILTER")?)?;
        for &nr in filter.syscalls.difference(&old.syscalls) {
            syscalls.set(nr, 1, 0)?;
        }
        let mut filters = 0;
        for (bit, on) in [
            (FILTER_PIDS, !filter.pids.is_empty()),
            (FILTER_CGROUPS, !filter.cgroups.is_empty()),
            (FILTER_SYSCALLS, !filter.syscalls.is_empty()),
        ] {
            if on {
                filters |= bit;
            }
        }
        self.config.filters = filters;
        let mut config: Array<_, ProbeConfig> = Array::try_from(self.ebpf.map_mut(maps::CONFIG).context("CONFIG")?)?;
        config.set(0, self.config, 0).context("writing the probe config")?;

        let mut syscalls: Array<_, u8> = Array::try_from(self.ebpf.map_mut(maps::SYSCALL_FILTER).context("SYSCALL_FILTER")?)?;
        for &nr in old.syscalls.difference(&filter.syscalls) {
            syscalls.set(nr, 0, 0)?;
        }
        sync_set(&mut self.ebpf, maps::PID_FILTER, &old.pids, &filter.pids, Stage::Remove)?;
        sync_set(&mut self.ebpf, maps::CGROUP_FILTER, &old.cgroups, &filter.cgroups, Stage::Remove)?;
        self.installed = filter.clone();
        Ok(())
    }
}

enum Stage {
    Add,
    Remove,
}

fn sync_set<K: aya::Pod + Ord>(ebpf: &mut Ebpf, name: &str, old: &BTreeSet<K>, new: &BTreeSet<K>, stage: Stage) -> anyhow::Result<()> {
    let mut map: HashMap<_, K, u8> = HashMap::try_from(ebpf.map_mut(name).with_context(|| format!("object lacks {name}"))?)?;
    match stage {
        Stage::Add => new.difference(old).try_for_each(|k| map.insert(k, 1, 0)),
        Stage::Remove => old.difference(new).try_for_each(|k| map.remove(k)),
    }
    .with_context(|| format!("updating {name}"))
}
