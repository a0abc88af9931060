//! Event filters: what a subscription selects, and the union pushed into the kernel.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;
use wasmtap_events::{COMM_LEN, MAX_SELECTORS, RecordHeader};

use crate::probes::Kind;

/// A subscription's filter. An empty set means "all" for that dimension; a record must
/// match every non-empty one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub pids: BTreeSet<u32>,
    pub cgroups: BTreeSet<u64>,
    /// Task names, NUL padded (matched in the host only).
    pub comms: BTreeSet<[u8; COMM_LEN]>,
    /// The kind's selector values (syscall numbers, process events).
    pub selectors: BTreeSet<u32>,
    /// The kind's threshold (e.g. sched's `min_wait_ns`); 0 passes everything.
    pub min_value: u64,
}

/// What filters look at in a record, whatever its kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordKeys {
    pub pid: u32,
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
    pub selector: u32,
    /// The value the kind's threshold applies to (0 for kinds without one).
    pub value: u64,
    /// The parent's pid, for kinds whose pid filter also matches a process's children
    /// (0 for the others).
    pub parent_pid: u32,
}

impl RecordKeys {
    /// Reads the keys of one whole record of `kind`.
    #[inline]
    pub fn read(kind: Kind, raw: &[u8]) -> Self {
        let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        let comm_at = std::mem::offset_of!(RecordHeader, comm);
        Self {
            pid: u32_at(std::mem::offset_of!(RecordHeader, pid)),
            cgroup_id: u64_at(std::mem::offset_of!(RecordHeader, cgroup_id)),
            comm: raw[comm_at..comm_at + COMM_LEN].try_into().expect("comm"),
            selector: u32_at(kind.selector_offset),
            value: kind.threshold.as_ref().map_or(0, |t| u64_at(t.offset)),
            parent_pid: kind.parent_pid_offset.map_or(0, u32_at),
        }
    }
}

/// A comm as filters hold it: at most `COMM_LEN - 1` bytes (the kernel cuts longer
/// names the same way), NUL padded.
pub fn comm_key(name: &str) -> [u8; COMM_LEN] {
    let mut comm = [0; COMM_LEN];
    let bytes = &name.as_bytes()[..name.len().min(COMM_LEN - 1)];
    comm[..bytes.len()].copy_from_slice(bytes);
    comm
}

impl EventFilter {
    pub fn is_all(&self) -> bool {
        self.pids.is_empty() && self.cgroups.is_empty() && self.comms.is_empty() && self.selectors.is_empty() && self.min_value == 0
    }

    /// The reference semantics `CompiledFilters` implements.
    #[cfg(test)]
    pub fn matches(&self, r: &RecordKeys) -> bool {
        (self.pids.is_empty() || self.pids.contains(&r.pid) || (r.parent_pid != 0 && self.pids.contains(&r.parent_pid)))
            && (self.cgroups.is_empty() || self.cgroups.contains(&r.cgroup_id))
            && (self.comms.is_empty() || self.comms.contains(&r.comm))
            && (self.selectors.is_empty() || self.selectors.contains(&r.selector))
            && r.value >= self.min_value
    }

    /// The narrowest per-dimension filter that passes every record any of `filters`
    /// passes (a superset: routing narrows it again per subscriber). `None` when there
    /// is no filter at all, i.e. nobody subscribed.
    pub fn union<'a>(filters: impl IntoIterator<Item = &'a EventFilter>) -> Option<EventFilter> {
        /// `None` means "all" (some filter left the dimension open).
        fn merge<T: Ord + Copy>(acc: &mut Option<BTreeSet<T>>, set: &BTreeSet<T>) {
            match acc {
                Some(_) if set.is_empty() => *acc = None,
                Some(acc) => acc.extend(set),
                None => {}
            }
        }
        let mut filters = filters.into_iter();
        let first = filters.next()?;
        fn open<T: Ord + Copy>(set: &BTreeSet<T>) -> Option<BTreeSet<T>> {
            (!set.is_empty()).then(|| set.clone())
        }
        let (mut pids, mut cgroups, mut comms, mut selectors) = (open(&first.pids), open(&first.cgroups), open(&first.comms), open(&first.selectors));
        let mut min_value = first.min_value;
        for f in filters {
            min_value = min_value.min(f.min_value);
            merge(&mut pids, &f.pids);
            merge(&mut cgroups, &f.cgroups);
            merge(&mut comms, &f.comms);
            merge(&mut selectors, &f.selectors);
        }
        Some(EventFilter {
            pids: pids.unwrap_or_default(),
            cgroups: cgroups.unwrap_or_default(),
            comms: comms.unwrap_or_default(),
            selectors: selectors.unwrap_or_default(),
            min_value,
        })
    }
}

/// A subscriber's filters compiled for routing: a record costs four lookups whatever
/// the number of filters or entries. Bit `i` of a mask stands for filter `i`.
#[derive(Debug, Clone, Default)]
pub struct CompiledFilters {
    pids: FxHashMap<u32, u64>,
    any_pid: u64,
    cgroups: FxHashMap<u64, u64>,
    any_cgroup: u64,
    comms: FxHashMap<[u8; COMM_LEN], u64>,
    any_comm: u64,
    /// Indexed by selector, below `MAX_SELECTORS`; values past the end match only
    /// `any_selector`.
    selectors: Vec<u64>,
    /// Selectors from `MAX_SELECTORS` up (probe point ids).
    large_selectors: FxHashMap<u32, u64>,
    any_selector: u64,
    /// (filter bit, minimum) of the filters with a threshold.
    thresholds: Vec<(u64, u64)>,
    all: bool,
}

/// Filters a subscriber may have: one bit each in a mask.
pub const MAX_FILTERS: usize = 64;

impl CompiledFilters {
    /// Compiles up to `MAX_FILTERS` filters (a record matches if any of them does).
    pub fn new(filters: &[EventFilter]) -> Self {
        assert!(filters.len() <= MAX_FILTERS, "at most {MAX_FILTERS} filters");
        let mut c = Self { all: filters.iter().any(EventFilter::is_all), ..Default::default() };
        for (i, f) in filters.iter().enumerate() {
            let bit = 1u64 << i;
            if f.pids.is_empty() {
                c.any_pid |= bit
            }
            if f.cgroups.is_empty() {
                c.any_cgroup |= bit
            }
            if f.comms.is_empty() {
                c.any_comm |= bit
            }
            if f.selectors.is_empty() {
                c.any_selector |= bit
            }
            if f.min_value > 0 {
                c.thresholds.push((bit, f.min_value));
            }
            f.pids.iter().for_each(|&p| *c.pids.entry(p).or_default() |= bit);
            f.cgroups.iter().for_each(|&g| *c.cgroups.entry(g).or_default() |= bit);
            f.comms.iter().for_each(|&n| *c.comms.entry(n).or_default() |= bit);
            for &s in &f.selectors {
                if s >= MAX_SELECTORS {
                    *c.large_selectors.entry(s).or_default() |= bit;
                    continue;
                }
                if c.selectors.len() <= s as usize {
                    c.selectors.resize(s as usize + 1, 0);
                }
                c.selectors[s as usize] |= bit;
            }
        }
        c
    }

    /// Whether one of the filters passes every record.
    pub fn is_all(&self) -> bool {
        self.all
    }

    #[inline]
    pub fn matches(&self, r: &RecordKeys) -> bool {
        let mut pid = self.pids.get(&r.pid).copied().unwrap_or(0) | self.any_pid;
        if r.parent_pid != 0 {
            pid |= self.pids.get(&r.parent_pid).copied().unwrap_or(0);
        }
        let cgroup = self.cgroups.get(&r.cgroup_id).copied().unwrap_or(0) | self.any_cgroup;
        let selector = match self.selectors.get(r.selector as usize) {
            Some(&mask) => mask,
            None if r.selector >= MAX_SELECTORS => self.large_selectors.get(&r.selector).copied().unwrap_or(0),
            None => 0,
        } | self.any_selector;
        let mut mask = pid & cgroup & selector;
        for &(bit, min) in &self.thresholds {
            if r.value < min {
                mask &= !bit;
            }
        }
        if mask == 0 || self.any_comm & mask == mask {
            return mask != 0;
        }
        (self.comms.get(&r.comm).copied().unwrap_or(0) | self.any_comm) & mask != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pids: &[u32], selectors: &[u32]) -> EventFilter {
        EventFilter { pids: pids.iter().copied().collect(), selectors: selectors.iter().copied().collect(), ..Default::default() }
    }

    #[test]
    fn union_widens_per_dimension() {
        assert_eq!(EventFilter::union([]), None);
        assert_eq!(EventFilter::union([&f(&[1], &[])]), Some(f(&[1], &[])));
        assert_eq!(EventFilter::union([&f(&[1], &[5]), &f(&[2], &[6])]), Some(f(&[1, 2], &[5, 6])));
        // One subscriber wanting every pid opens the pid dimension for all.
        assert_eq!(EventFilter::union([&f(&[1], &[5]), &f(&[], &[6])]), Some(f(&[], &[5, 6])));
        assert_eq!(EventFilter::union([&f(&[], &[5]), &f(&[1], &[6])]), Some(f(&[], &[5, 6])));
    }

    #[test]
    fn matches_every_non_empty_dimension() {
        let r = RecordKeys { pid: 7, selector: 39, cgroup_id: 3, comm: comm_key("db"), value: 500, parent_pid: 0 };
        assert!(f(&[], &[]).matches(&r));
        assert!(f(&[7], &[39]).matches(&r));
        assert!(!f(&[8], &[39]).matches(&r));
        assert!(!f(&[7], &[1]).matches(&r));
        assert!(EventFilter { comms: [comm_key("db")].into(), ..f(&[7], &[]) }.matches(&r));
        assert!(!EventFilter { comms: [comm_key("web")].into(), ..f(&[7], &[]) }.matches(&r));
        assert!(EventFilter { min_value: 500, ..f(&[7], &[]) }.matches(&r));
        assert!(!EventFilter { min_value: 501, ..f(&[7], &[]) }.matches(&r));
    }

    #[test]
    fn union_keeps_the_lowest_threshold() {
        let with = |min_value| EventFilter { min_value, ..f(&[1], &[]) };
        assert_eq!(EventFilter::union([&with(500), &with(200)]).unwrap().min_value, 200);
        assert_eq!(EventFilter::union([&with(500), &with(0)]).unwrap().min_value, 0);
        assert!(!with(5).is_all());
    }

    #[test]
    fn compiled_filters_match_like_any_of_the_filters() {
        let filters = [
            f(&[1, 2], &[5]),
            f(&[], &[6]),
            EventFilter { cgroups: [9].into(), ..f(&[3], &[]) },
            EventFilter { comms: [comm_key("a")].into(), ..f(&[4], &[4]) },
            EventFilter { min_value: 1000, ..f(&[5], &[]) },
            EventFilter { min_value: 10, ..f(&[], &[2000]) },
            f(&[6], &[0xdead_beef]),
        ];
        let compiled = CompiledFilters::new(&filters);
        assert!(!compiled.is_all());
        for pid in 0..7 {
            for selector in [4, 5, 6, 2000, 0xdead_beef] {
                for cgroup_id in [1, 9] {
                    for comm in [comm_key("a"), comm_key("b")] {
                        for value in [0, 10, 999, 1000] {
                            for parent_pid in [0, 1, 6] {
                                let r = RecordKeys { pid, selector, cgroup_id, comm, value, parent_pid };
                                assert_eq!(compiled.matches(&r), filters.iter().any(|f| f.matches(&r)), "{r:?}");
                            }
                        }
                    }
                }
            }
        }
        assert!(CompiledFilters::new(&[f(&[1], &[]), f(&[], &[])]).is_all());
        assert!(!CompiledFilters::new(&[]).matches(&RecordKeys::default()));
    }

    #[test]
    fn comm_keys_are_cut_like_the_kernel_cuts_names() {
        assert_eq!(&comm_key("a-very-long-process-name")[..15], b"a-very-long-pro");
        assert_eq!(comm_key("a-very-long-process-name")[15], 0);
    }
}
