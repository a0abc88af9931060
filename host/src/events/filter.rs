//! Event filters: what a subscription selects, and the union pushed into the kernel.

use std::collections::BTreeSet;

use rustc_hash::FxHashMap;
use wasmtap_events::SyscallRecord;

/// A subscription's filter. An empty set means "all" for that dimension; a record must
/// match every non-empty one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    pub pids: BTreeSet<u32>,
    pub cgroups: BTreeSet<u64>,
    pub syscalls: BTreeSet<u32>,
}

impl EventFilter {
    pub fn is_all(&self) -> bool {
        self.pids.is_empty() && self.cgroups.is_empty() && self.syscalls.is_empty()
    }

    /// The reference semantics `CompiledFilters` implements.
    #[cfg(test)]
    pub fn matches(&self, r: &SyscallRecord) -> bool {
        (self.pids.is_empty() || self.pids.contains(&r.pid))
            && (self.cgroups.is_empty() || self.cgroups.contains(&r.cgroup_id))
            && (self.syscalls.is_empty() || self.syscalls.contains(&r.syscall_nr))
    }

    /// The narrowest per-dimension filter that passes every record any of `filters`
    /// passes (a superset: routing narrows it again per subscriber). `None` when there
    /// is no filter at all, i.e. nobody subscribed.
    pub fn union<'a>(filters: impl IntoIterator<Item = &'a EventFilter>) -> Option<EventFilter> {
        fn merge<T: Ord + Copy>(acc: &mut Option<BTreeSet<T>>, set: &BTreeSet<T>) {
            match acc {
                Some(_) if set.is_empty() => *acc = None,
                Some(acc) => acc.extend(set),
                None => {}
            }
        }
        let mut any = false;
        let (mut pids, mut cgroups, mut syscalls) = (Some(BTreeSet::new()), Some(BTreeSet::new()), Some(BTreeSet::new()));
        for f in filters {
            if !any {
                any = true;
                (pids, cgroups, syscalls) = (Some(f.pids.clone()), Some(f.cgroups.clone()), Some(f.syscalls.clone()));
                // An empty set in the first filter already means "all".
                if f.pids.is_empty() { pids = None }
                if f.cgroups.is_empty() { cgroups = None }
                if f.syscalls.is_empty() { syscalls = None }
                continue;
            }
            merge(&mut pids, &f.pids);
            merge(&mut cgroups, &f.cgroups);
            merge(&mut syscalls, &f.syscalls);
        }
        any.then(|| EventFilter {
            pids: pids.unwrap_or_default(),
            cgroups: cgroups.unwrap_or_default(),
            syscalls: syscalls.unwrap_or_default(),
        })
    }
}

/// A subscriber's filters compiled for routing: a record costs three lookups whatever
/// the number of filters or entries. Bit `i` of a mask stands for filter `i`.
#[derive(Debug, Clone, Default)]
pub struct CompiledFilters {
    pids: FxHashMap<u32, u64>,
    any_pid: u64,
    cgroups: FxHashMap<u64, u64>,
    any_cgroup: u64,
    /// Indexed by syscall number; numbers past the end match only `any_syscall`.
    syscalls: Vec<u64>,
    any_syscall: u64,
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
            if f.pids.is_empty() { c.any_pid |= bit }
            if f.cgroups.is_empty() { c.any_cgroup |= bit }
            if f.syscalls.is_empty() { c.any_syscall |= bit }
            f.pids.iter().for_each(|&p| *c.pids.entry(p).or_default() |= bit);
            f.cgroups.iter().for_each(|&g| *c.cgroups.entry(g).or_default() |= bit);
            for &nr in &f.syscalls {
                if c.syscalls.len() <= nr as usize {
                    c.syscalls.resize(nr as usize + 1, 0);
                }
                c.syscalls[nr as usize] |= bit;
            }
        }
        c
    }

    /// Whether one of the filters passes every record.
    pub fn is_all(&self) -> bool {
        self.all
    }

    #[inline]
    pub fn matches(&self, r: &SyscallRecord) -> bool {
        let pid = self.pids.get(&r.pid).copied().unwrap_or(0) | self.any_pid;
        let cgroup = self.cgroups.get(&r.cgroup_id).copied().unwrap_or(0) | self.any_cgroup;
        let syscall = self.syscalls.get(r.syscall_nr as usize).copied().unwrap_or(0) | self.any_syscall;
        pid & cgroup & syscall != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pids: &[u32], syscalls: &[u32]) -> EventFilter {
        EventFilter { pids: pids.iter().copied().collect(), syscalls: syscalls.iter().copied().collect(), ..Default::default() }
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
        let r = SyscallRecord { pid: 7, syscall_nr: 39, cgroup_id: 3, ..Default::default() };
        assert!(f(&[], &[]).matches(&r));
        assert!(f(&[7], &[39]).matches(&r));
        assert!(!f(&[8], &[39]).matches(&r));
        assert!(!f(&[7], &[1]).matches(&r));
    }

    #[test]
    fn compiled_filters_match_like_any_of_the_filters() {
        let filters = [f(&[1, 2], &[5]), f(&[], &[6]), EventFilter { cgroups: [9].into(), ..f(&[3], &[]) }];
        let compiled = CompiledFilters::new(&filters);
        assert!(!compiled.is_all());
        for pid in 0..5 {
            for nr in [4, 5, 6, 2000] {
                for cgroup_id in [1, 9] {
                    let r = SyscallRecord { pid, syscall_nr: nr, cgroup_id, ..Default::default() };
                    assert_eq!(compiled.matches(&r), filters.iter().any(|f| f.matches(&r)), "{r:?}");
                }
            }
        }
        assert!(CompiledFilters::new(&[f(&[1], &[]), f(&[], &[])]).is_all());
        assert!(!CompiledFilters::new(&[]).matches(&SyscallRecord::default()));
    }
}
