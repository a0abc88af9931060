//! What a kind is to the host (its descriptor), and a loaded kind (its probe).

use std::collections::BTreeSet;

use anyhow::Context as _;
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{BtfTracePoint, Program, TracePoint, UProbe},
};
use wasmtap_events::{FILTER_CGROUPS, FILTER_PIDS, FILTER_SELECTORS, MAX_FILTER_ENTRIES, MAX_SELECTORS, ProbeConfig, maps};

use super::{btf::KernelBtf, explain, system, uprobe};
use crate::{
    config::ProbeSettings,
    events::{EventFilter, ring::RingReader},
};

/// A kind, as the rest of the host refers to it.
pub type Kind = &'static KindSpec;

/// Everything the host knows about one event kind.
pub struct KindSpec {
    /// What plugins subscribe to; also the `probe` label of the self-metrics.
    pub name: &'static str,
    /// The kind's kernel object (built by `host/build.rs`).
    pub object: &'static [u8],
    /// Bytes per record the kernel writes.
    pub record_size: usize,
    /// Where the record's selector (a `u32`) sits: the number filtered on besides pid,
    /// cgroup and comm (syscall number, process event).
    pub selector_offset: usize,
    /// The subscription parameter that lists selectors by name, e.g. "syscalls".
    pub selector_param: &'static str,
    /// What the parameter's values name, and how they become selectors.
    pub selectors: Selectors,
    /// Where the record's parent pid sits, for a kind whose pid filter also matches a
    /// process's direct children.
    pub parent_pid_offset: Option<usize>,
    /// The kind's threshold, if it has one: records with a smaller value are not
    /// written by the kernel (nor delivered to the subscriptions asking for it).
    pub threshold: Option<Threshold>,
    /// Ways to attach, best first; the first whose programs all attach wins.
    pub flavours: &'static [Flavour],
    /// Globals to set in the object before loading (kernel struct offsets).
    pub globals: fn(Option<&KernelBtf>) -> anyhow::Result<Globals>,
}

/// What a kind's selector parameter names.
pub enum Selectors {
    /// Fixed values by name (syscalls, process events), filtered in the kernel.
    Named(fn(&str) -> Option<u32>),
    /// Probe points, resolved from their text to their id: the kind's programs are
    /// attached per point rather than at fixed places, so its selector is not filtered
    /// in the kernel (only wanted points are attached), and a subscription must name
    /// its points.
    Points(fn(&str) -> anyhow::Result<u32>),
}

/// A subscription parameter that sets a minimum for one `u64` field of the record.
pub struct Threshold {
    /// The parameter, e.g. "min_wait_ns" (one integer).
    pub param: &'static str,
    /// Where the `u64` it applies to sits in a record.
    pub offset: usize,
}

/// Probe points one subscription may name (each one's binary is read to resolve it).
pub const MAX_POINTS_PER_SUBSCRIPTION: usize = 64;

/// (global name in the object, value).
pub type Globals = Vec<(&'static str, u32)>;

impl KindSpec {
    /// Whether the kind's programs are attached per probe point ([`Selectors::Points`]).
    pub fn attaches_points(&self) -> bool {
        matches!(self.selectors, Selectors::Points(_))
    }

    /// A subscription's filter: the common fields as given, the kind's selector
    /// parameter parsed by name, and its threshold parameter (the only parameters a
    /// kind takes).
    pub fn parse_filter(&self, pids: &[u32], cgroups: &[u64], comms: &[String], params: &[(String, Vec<String>)]) -> anyhow::Result<EventFilter> {
        let sanitize = |text: &str| crate::sinks::logs::sanitize(text, 64);
        let mut selectors = BTreeSet::new();
        let mut min_value = None;
        for (name, values) in params {
            if let Some(threshold) = self.threshold.as_ref().filter(|t| t.param == name) {
                anyhow::ensure!(min_value.is_none(), "{} is given twice in a {} subscription", threshold.param, self.name);
                min_value = Some(
                    match values.as_slice() {
                        [value] => value.parse().ok(),
                        _ => None,
                    }
                    .with_context(|| format!("{} in a {} subscription takes one integer, not {:?}", threshold.param, self.name, sanitize(&values.join(","))))?,
                );
                continue;
            }
            if name != self.selector_param {
                let takes = match &self.threshold {
                    Some(t) => format!("{:?} and {:?}", self.selector_param, t.param),
                    None => format!("{:?}", self.selector_param),
                };
                anyhow::bail!("the {} kind has no filter parameter {:?}; it takes {takes}", self.name, sanitize(name));
            }
            if self.attaches_points() && values.len() > MAX_POINTS_PER_SUBSCRIPTION {
                anyhow::bail!("a {} subscription names {} probe points; the limit is {MAX_POINTS_PER_SUBSCRIPTION}", self.name, values.len());
            }
            for value in values {
                let selector = match self.selectors {
                    Selectors::Points(resolve) => resolve(value)?,
                    Selectors::Named(parse) => {
                        parse(value).with_context(|| format!("unknown {} value {:?} in a {} subscription", self.selector_param, sanitize(value), self.name))?
                    }
                };
                selectors.insert(selector);
            }
        }
        if self.attaches_points() && selectors.is_empty() {
            anyhow::bail!("a {} subscription names its probe points in the filter parameter {:?}", self.name, self.selector_param);
        }
        Ok(EventFilter {
            pids: pids.iter().copied().collect(),
            cgroups: cgroups.iter().copied().collect(),
            comms: comms.iter().map(|c| crate::events::filter::comm_key(c)).collect(),
            selectors,
            min_value: min_value.unwrap_or(0),
        })
    }
}

impl std::fmt::Debug for KindSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl PartialEq for KindSpec {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

pub struct Flavour {
    /// Shown in `/status` and the log, e.g. "tp_btf".
    pub name: &'static str,
    /// (program name in the object, where it attaches).
    pub programs: &'static [(&'static str, Point)],
}

pub enum Point {
    /// A BTF-enabled tracepoint (`tp_btf/<name>`).
    Btf(&'static str),
    /// A classic tracepoint (category, name), through tracefs.
    Tracepoint(&'static str, &'static str),
    /// A uprobe program, loaded here and attached at each wanted probe point's sites.
    PerSelector,
}

/// One loaded kind: programs, filter maps, config. Dropping it detaches and unloads
/// every program and frees its maps.
pub struct Probe {
    pub kind: Kind,
    ebpf: Ebpf,
    attach: &'static str,
    config: ProbeConfig,
    installed: EventFilter,
    widened: Vec<&'static str>,
    /// The probe points attached, for a kind attached per point, and why some could
    /// not be at the last change.
    points: uprobe::Points,
    point_errors: Option<String>,
}

/// What the reader owns: the ring buffer and the kernel drop counters.
pub struct ProbeStream {
    pub kind: Kind,
    pub ring: RingReader,
    pub drops: PerCpuArray<MapData, u64>,
}

impl Probe {
    /// Loads the kind's object, programs `filter` into the kernel, then attaches.
    pub fn start(kind: Kind, settings: &ProbeSettings, filter: &EventFilter) -> anyhow::Result<(Self, ProbeStream)> {
        let btf = Btf::from_sys_fs().ok();
        let globals = (kind.globals)(KernelBtf::load().ok().as_ref())?;
        let mut loader = EbpfLoader::new();
        loader.btf(btf.as_ref()).map_max_entries(maps::EVENTS, settings.ring_buffer_bytes);
        for (name, value) in &globals {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader.load(kind.object).map_err(|e| explain(e, &format!("cannot load the {} probe's eBPF object", kind.name)))?;
        let ring = RingReader::new(ebpf.take_map(maps::EVENTS).context("object lacks EVENTS")?)?;
        let drops = PerCpuArray::try_from(ebpf.take_map(maps::COUNTERS).context("object lacks COUNTERS")?)?;
        let config = ProbeConfig {
            filters: 0,
            ignore_pid: std::process::id(),
            wakeup_bytes: u64::from(settings.ring_buffer_bytes) * u64::from(settings.wakeup_percent) / 100,
            min_value: 0,
        };
        let mut probe =
            Self { kind, ebpf, attach: "", config, installed: EventFilter::default(), widened: Vec::new(), points: Default::default(), point_errors: None };
        probe.set_filter(filter)?;
        probe.attach(btf.as_ref())?;
        if kind.attaches_points() {
            // A point that cannot be attached is the problem of the subscriptions that
            // want it: the kind runs for the others.
            probe.point_errors = probe.points.sync(&mut probe.ebpf, &filter.selectors).err().map(|e| format!("{e:#}"));
        }
        Ok((probe, ProbeStream { kind, ring, drops }))
    }

    fn attach(&mut self, btf: Option<&Btf>) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        for flavour in self.kind.flavours {
            match self.attach_flavour(flavour, btf) {
                Ok(()) => {
                    self.attach = flavour.name;
                    for failure in failures {
                        tracing::warn!(kind = self.kind.name, "{failure:#}; fell back to {}", flavour.name);
                    }
                    return Ok(());
                }
                Err(e) => {
                    // Nothing of a failed flavour may stay attached beside the next one.
                    for (program, _) in flavour.programs {
                        match self.ebpf.program_mut(program) {
                            Some(Program::BtfTracePoint(p)) => drop(p.unload()),
                            Some(Program::TracePoint(p)) => drop(p.unload()),
                            Some(Program::UProbe(p)) => drop(p.unload()),
                            _ => {}
                        }
                    }
                    failures.push(e.context(format!("{} attach failed", flavour.name)));
                }
            }
        }
        Err(failures.pop().unwrap_or_else(|| anyhow::anyhow!("the {} kind has no programs", self.kind.name)))
    }

    fn attach_flavour(&mut self, flavour: &Flavour, btf: Option<&Btf>) -> anyhow::Result<()> {
        for (program, point) in flavour.programs {
            let program_mut = self.ebpf.program_mut(program).with_context(|| format!("object lacks program {program}"))?;
            match point {
                Point::Btf(event) => {
                    let btf = btf.context("no kernel BTF (/sys/kernel/btf/vmlinux)")?;
                    let p: &mut BtfTracePoint = program_mut.try_into()?;
                    p.load(event, btf).map_err(|e| explain(e, &format!("cannot load tp_btf/{event}")))?;
                    p.attach().map_err(|e| explain(e, &format!("cannot attach tp_btf/{event}")))?;
                }
                Point::Tracepoint(category, event) => {
                    system::ensure_mounted(system::TRACEFS, "tracefs")?;
                    let p: &mut TracePoint = program_mut.try_into()?;
                    p.load().map_err(|e| explain(e, &format!("cannot load tracepoint {category}/{event}")))?;
                    p.attach(category, event).map_err(|e| explain(e, &format!("cannot attach tracepoint {category}/{event}")))?;
                }
                Point::PerSelector => {
                    let p: &mut UProbe = program_mut.try_into()?;
                    p.load().map_err(|e| explain(e, &format!("cannot load the {} program", self.kind.name)))?;
                }
            }
        }
        Ok(())
    }

    /// How the programs were attached, e.g. "tp_btf".
    pub fn attach_kind(&self) -> &'static str {
        self.attach
    }

    /// Kernel ids of the loaded programs (for status and for leak checks).
    pub fn program_ids(&self) -> Vec<u32> {
        self.ebpf.programs().filter_map(|(_, p)| p.info().ok()).map(|i| i.id()).collect()
    }

    /// The probe points that could not be attached at the last change, and why.
    pub fn point_errors(&self) -> Option<&str> {
        self.point_errors.as_deref()
    }

    /// Filter dimensions left open in the kernel because the union did not fit.
    pub fn widened(&self) -> Vec<&'static str> {
        self.widened.clone()
    }

    /// Programs the kernel filter maps. Entries are added before the switch bits are set
    /// and removed after, so a change never briefly narrows what is recorded. A pid or
    /// cgroup set larger than its map is not pushed: that dimension stays open in the
    /// kernel (the host's routing still delivers each plugin exactly its records), rather
    /// than the probe recording for nobody. Comms are matched in the host only.
    pub fn set_filter(&mut self, filter: &EventFilter) -> anyhow::Result<()> {
        let mut filter = filter.clone();
        // A kind attached per point records only the points wanted: its selectors are
        // attachments, not kernel filter entries.
        let points = self.kind.attaches_points().then(|| std::mem::take(&mut filter.selectors));
        if let Some(&s) = filter.selectors.iter().find(|&&s| s >= MAX_SELECTORS) {
            anyhow::bail!("{} selector {s} is beyond the probe's table of {MAX_SELECTORS}", self.kind.selector_param);
        }
        self.widened.clear();
        let kind = self.kind.name;
        let mut widen = |dimension: &'static str, len: usize| {
            let too_big = len > MAX_FILTER_ENTRIES as usize;
            if too_big {
                tracing::warn!(
                    kind,
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
        filter.comms.clear();
        let filter = &filter;
        // Until every update went through, what may be in the kernel is both sets: a
        // failure midway leaves no entry the next change would not remove.
        let old = self.installed.clone();
        self.installed.pids.extend(&filter.pids);
        self.installed.cgroups.extend(&filter.cgroups);
        self.installed.selectors.extend(&filter.selectors);
        sync_set(&mut self.ebpf, maps::PID_FILTER, &old.pids, &filter.pids, Stage::Add)?;
        sync_set(&mut self.ebpf, maps::CGROUP_FILTER, &old.cgroups, &filter.cgroups, Stage::Add)?;
        set_selectors(&mut self.ebpf, filter.selectors.difference(&old.selectors), 1)?;
        let mut filters = 0;
        for (bit, on) in
            [(FILTER_PIDS, !filter.pids.is_empty()), (FILTER_CGROUPS, !filter.cgroups.is_empty()), (FILTER_SELECTORS, !filter.selectors.is_empty())]
        {
            if on {
                filters |= bit;
            }
        }
        self.config.filters = filters;
        self.config.min_value = filter.min_value;
        let mut config: Array<_, ProbeConfig> = Array::try_from(self.ebpf.map_mut(maps::CONFIG).context("CONFIG")?)?;
        config.set(0, self.config, 0).context("writing the probe config")?;
        // Between adding and removing filter entries: what is recorded meanwhile is the
        // union of both.
        if let Some(points) = points.filter(|_| !self.attach.is_empty()) {
            self.point_errors = self.points.sync(&mut self.ebpf, &points).err().map(|e| format!("{e:#}"));
        }
        set_selectors(&mut self.ebpf, old.selectors.difference(&filter.selectors), 0)?;
        sync_set(&mut self.ebpf, maps::PID_FILTER, &old.pids, &filter.pids, Stage::Remove)?;
        sync_set(&mut self.ebpf, maps::CGROUP_FILTER, &old.cgroups, &filter.cgroups, Stage::Remove)?;
        self.installed = filter.clone();
        Ok(())
    }
}

fn set_selectors<'a>(ebpf: &mut Ebpf, mut selectors: impl Iterator<Item = &'a u32>, value: u8) -> anyhow::Result<()> {
    let mut map: Array<_, u8> = Array::try_from(ebpf.map_mut(maps::SELECTOR_FILTER).context("object lacks SELECTOR_FILTER")?)?;
    selectors.try_for_each(|&s| map.set(s, value, 0)).context("updating SELECTOR_FILTER")
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

#[cfg(test)]
mod tests {
    use crate::probes::{sched, syscall};

    fn parse(kind: super::Kind, params: &[(&str, &[&str])]) -> anyhow::Result<crate::events::EventFilter> {
        let params: Vec<(String, Vec<String>)> = params.iter().map(|(n, v)| (n.to_string(), v.iter().map(|s| s.to_string()).collect())).collect();
        kind.parse_filter(&[], &[], &[], &params)
    }

    #[test]
    fn a_threshold_is_one_integer_given_once() {
        let filter = parse(&sched::KIND, &[("min_wait_ns", &["5000"]), ("reasons", &["preempted"])]).unwrap();
        assert_eq!((filter.min_value, filter.selectors.len()), (5000, 1));
        assert!(format!("{:#}", parse(&sched::KIND, &[("min_wait_ns", &["5ms"])]).unwrap_err()).contains("takes one integer"));
        assert!(format!("{:#}", parse(&sched::KIND, &[("min_wait_ns", &["1", "2"])]).unwrap_err()).contains("takes one integer"));
        assert!(format!("{:#}", parse(&sched::KIND, &[("min_wait_ns", &["1"]), ("min_wait_ns", &["2"])]).unwrap_err()).contains("twice"));
        let other = format!("{:#}", parse(&sched::KIND, &[("syscalls", &["read"])]).unwrap_err());
        assert!(other.contains("\"reasons\" and \"min_wait_ns\""), "{other}");
        // A kind without a threshold has no such parameter.
        assert!(parse(&syscall::KIND, &[("min_wait_ns", &["1"])]).is_err());
    }
}
