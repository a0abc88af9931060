//! Event filters: what a subscription selects, and the union pushed into the kernel.

use std::collections::BTreeSet;

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

    #[inline]
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
}
