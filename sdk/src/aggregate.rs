//! Guest-side pre-aggregation: observe per event, flush one delta per series per batch.
//!
//! Each distinct key (e.g. `(comm, syscall)`) is interned into a host series handle the
//! first time it is seen; the host call happens once per key, not per event.

use std::hash::Hash;

use rustc_hash::FxHashMap;

use crate::host::{FamilyDesc, HostApi, MetricKind, Wit};

/// Key → slot table with a one-entry cache for runs of the same key (the common case:
/// a thread issuing the same syscall in a loop). Removed slots are reused. Every key
/// the host answers with the family's overflow series shares one slot (and handle).
struct Slots<K, V, H: HostApi> {
    host: H,
    family: H::Family,
    index: FxHashMap<K, usize>,
    slots: Vec<Slot<V, H::Series>>,
    free: Vec<usize>,
    dirty: Vec<usize>,
    last: Option<(K, usize)>,
    /// The slot of the family's overflow series, once the host answered with it.
    overflow: Option<usize>,
    /// Keys the host answered with the overflow series (each asked once, so the host
    /// counts each label set once), up to `MAX_OVERFLOWED`; past it, new keys go to the
    /// overflow slot unasked and unkept (a flood of keys cannot exhaust the plugin's
    /// memory), until a series is removed (`room`: there may be room again).
    overflowed: usize,
    room: bool,
    /// Slots sent by the last `flush` (kept to reuse its allocation).
    sent: Vec<usize>,
}

/// Overflowed keys remembered per family (a few MiB at most).
const MAX_OVERFLOWED: usize = 65_536;

struct Slot<V, S> {
    /// `None` when the host refused the series (e.g. the family's series limit).
    series: Option<S>,
    value: V,
    dirty: bool,
}

impl<K: Hash + Eq + Clone, V, H: HostApi> Slots<K, V, H> {
    fn new(host: H, family: H::Family) -> Self {
        Self {
            host,
            family,
            index: FxHashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            dirty: Vec::new(),
            last: None,
            overflow: None,
            overflowed: 0,
            room: false,
            sent: Vec::new(),
        }
    }

    /// The value of `key`'s slot, marked to be sent. Inlined into the caller's loop:
    /// the common case is one compare with the last key; the rest stays out of line.
    #[inline]
    fn get(&mut self, key: K, labels: impl FnOnce(&K) -> Vec<String>, init: impl FnOnce() -> V) -> &mut V {
        let i = match &self.last {
            Some((k, i)) if *k == key => *i,
            _ => self.find(key, labels, init),
        };
        self.touch(i)
    }

    fn find(&mut self, key: K, labels: impl FnOnce(&K) -> Vec<String>, init: impl FnOnce() -> V) -> usize {
        let i = match self.index.get(&key) {
            Some(&i) => i,
            None => match self.insert(&key, labels, init) {
                Some(i) => i,
                // The overflow slot, for a key not kept.
                None => return self.overflow.expect("keys overflowed"),
            },
        };
        self.last = Some((key, i));
        i
    }

    /// A slot for a key seen for the first time (`None`: the overflow slot, key not kept).
    #[cold]
    fn insert(&mut self, key: &K, labels: impl FnOnce(&K) -> Vec<String>, init: impl FnOnce() -> V) -> Option<usize> {
        if self.overflowed >= MAX_OVERFLOWED && !self.room {
            return None;
        }
        let series = self.host.series(&self.family, &labels(key)).ok();
        let overflow = series.as_ref().is_some_and(|s| self.host.is_overflow(s));
        let i = match self.overflow.filter(|_| overflow) {
            Some(shared) => shared, // (the new handle is dropped)
            None => {
                let slot = Slot { series, value: init(), dirty: false };
                let i = match self.free.pop() {
                    Some(i) => {
                        self.slots[i] = slot;
                        i
                    }
                    None => {
                        self.slots.push(slot);
                        self.slots.len() - 1
                    }
                };
                if overflow {
                    self.overflow = Some(i);
                }
                i
            }
        };
        if overflow {
            self.room = false;
            if self.overflowed >= MAX_OVERFLOWED {
                return None;
            }
            self.overflowed += 1;
        }
        self.index.insert(key.clone(), i);
        Some(i)
    }

    /// Slot `i`'s value, marked to be sent.
    #[inline]
    fn touch(&mut self, i: usize) -> &mut V {
        let slot = &mut self.slots[i];
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push(i);
        }
        &mut slot.value
    }

    /// Hands each dirty slot's value to `send` and clears the dirty list.
    fn drain(&mut self, mut send: impl FnMut(&H, Option<&H::Series>, &mut V)) {
        for i in self.dirty.drain(..) {
            let slot = &mut self.slots[i];
            if slot.dirty {
                slot.dirty = false;
                send(&self.host, slot.series.as_ref(), &mut slot.value);
            }
        }
    }

    /// Hands each dirty slot's value to `take` (with whether the slot has a series, so
    /// the value is to be sent) and clears the dirty list; then sends what was taken, in
    /// one host call, through `send`.
    fn flush<A>(&mut self, acc: &mut A, mut take: impl FnMut(&mut A, bool, &mut V), send: impl FnOnce(&H, &[&H::Series], &A)) {
        let mut sent = std::mem::take(&mut self.sent);
        for i in self.dirty.drain(..) {
            let slot = &mut self.slots[i];
            if std::mem::replace(&mut slot.dirty, false) {
                take(acc, slot.series.is_some(), &mut slot.value);
                if slot.series.is_some() {
                    sent.push(i);
                }
            }
        }
        if !sent.is_empty() {
            let series: Vec<&H::Series> = sent.iter().filter_map(|&i| self.slots[i].series.as_ref()).collect();
            send(&self.host, &series, acc);
        }
        sent.clear();
        self.sent = sent;
    }

    /// Forgets `key` and deletes its series in the host (unsent changes are dropped).
    fn remove(&mut self, key: &K) {
        let Some(i) = self.index.remove(key) else { return };
        if self.last.as_ref().is_some_and(|(_, l)| *l == i) {
            self.last = None;
        }
        if self.overflow == Some(i) {
            self.overflowed -= 1;
            return; // shared with other keys
        }
        self.room = true;
        let slot = &mut self.slots[i];
        slot.dirty = false;
        if let Some(series) = slot.series.take() {
            self.host.remove_series(series);
        }
        self.free.push(i);
    }
}

fn declare<H: HostApi>(host: &H, name: &str, help: &str, kind: MetricKind, labels: &[&str], buckets: Vec<f64>) -> Result<H::Family, String> {
    host.declare_family(&FamilyDesc { name: name.into(), help: help.into(), kind, label_names: labels.iter().map(|s| s.to_string()).collect(), buckets })
}

/// A histogram family whose observations are integers in some unit (e.g. nanoseconds)
/// and are reported scaled (e.g. to seconds). Counts are exact: each observation adds
/// one to exactly one bucket.
pub struct HistogramVec<K, H: HostApi = Wit> {
    bounds: Bounds,
    scale: f64,
    slots: Slots<K, HistogramDelta, H>,
    /// A flush's bucket counts and sums (kept to reuse the allocations).
    flushed: (Vec<u64>, Vec<f64>),
}

struct HistogramDelta {
    /// Non-cumulative counts per bucket, plus one for `+Inf`.
    counts: Vec<u64>,
    sum: u64,
}

impl<K: Hash + Eq + Clone, H: HostApi> HistogramVec<K, H> {
    /// Declares the family. `bounds` are inclusive upper bounds in observation units,
    /// strictly increasing; the host sees `bound * scale`.
    pub fn declare(host: H, name: &str, help: &str, labels: &[&str], bounds: Vec<u64>, scale: f64) -> Result<Self, String> {
        let buckets = bounds.iter().map(|&b| b as f64 * scale).collect();
        let family = declare(&host, name, help, MetricKind::Histogram, labels, buckets)?;
        Ok(Self { bounds: Bounds::new(bounds), scale, slots: Slots::new(host, family), flushed: Default::default() })
    }

    /// The host this family reports to.
    pub fn host(&self) -> &H {
        &self.slots.host
    }

    /// Adds one observation of `value` under `key`; `labels` names a new key's series.
    #[inline]
    pub fn observe(&mut self, key: K, value: u64, labels: impl FnOnce(&K) -> Vec<String>) {
        let bucket = self.bounds.index(value);
        let buckets = self.bounds.bounds.len() + 1;
        let delta = self.slots.get(key, labels, || HistogramDelta { counts: vec![0; buckets], sum: 0 });
        delta.counts[bucket] += 1;
        delta.sum = delta.sum.wrapping_add(value);
    }

    /// Sends the accumulated deltas of the touched series to the host, in one call.
    pub fn flush(&mut self) {
        let (scale, buckets) = (self.scale, self.bounds.bounds.len() + 1);
        let take = |(counts, sums): &mut (Vec<u64>, Vec<f64>), send: bool, delta: &mut HistogramDelta| {
            if send {
                counts.extend_from_slice(&delta.counts);
                sums.push(delta.sum as f64 * scale);
            }
            delta.counts.fill(0);
            delta.sum = 0;
        };
        let send = |host: &H, series: &[&H::Series], (counts, sums): &(Vec<u64>, Vec<f64>)| host.merge_histograms(series, buckets, counts, sums);
        self.slots.flush(&mut self.flushed, take, send);
        self.flushed.0.clear();
        self.flushed.1.clear();
    }

    /// Deletes `key`'s series.
    pub fn remove(&mut self, key: &K) {
        self.slots.remove(key);
    }
}

/// Histogram upper bounds, with an O(1) lookup when they are consecutive powers of two
/// (the common exponential layout), a binary search otherwise.
struct Bounds {
    bounds: Vec<u64>,
    /// `Some(k)` when `bounds == [2^k, 2^(k+1), ...]`.
    pow2_from: Option<u32>,
}

impl Bounds {
    fn new(bounds: Vec<u64>) -> Self {
        let pow2_from = bounds
            .first()
            .filter(|b| b.is_power_of_two())
            .map(|b| b.trailing_zeros())
            .filter(|&k| bounds.iter().enumerate().all(|(i, &b)| k as usize + i < 64 && b == 1 << (k as usize + i)));
        Self { bounds, pow2_from }
    }

    /// The bucket `value` falls in (inclusive upper bounds); `len` means `+Inf`.
    #[inline]
    fn index(&self, value: u64) -> usize {
        match self.pow2_from {
            Some(k) if value <= 1 << k => 0,
            // ceil(log2(value)) - k, for value > 2^k >= 1.
            Some(k) => ((64 - (value - 1).leading_zeros() - k) as usize).min(self.bounds.len()),
            None => self.bounds.partition_point(|&b| b < value),
        }
    }
}

/// A counter family aggregated in the guest.
pub struct CounterVec<K, H: HostApi = Wit> {
    slots: Slots<K, u64, H>,
    /// A flush's values (kept to reuse the allocation).
    flushed: Vec<u64>,
}

impl<K: Hash + Eq + Clone, H: HostApi> CounterVec<K, H> {
    /// Declares the family; `name` without the `_total` suffix (the host adds it).
    pub fn declare(host: H, name: &str, help: &str, labels: &[&str]) -> Result<Self, String> {
        let family = declare(&host, name, help, MetricKind::Counter, labels, Vec::new())?;
        Ok(Self { slots: Slots::new(host, family), flushed: Vec::new() })
    }

    /// Adds `n` under `key`; `labels` names a new key's series.
    #[inline]
    pub fn add(&mut self, key: K, n: u64, labels: impl FnOnce(&K) -> Vec<String>) {
        *self.slots.get(key, labels, || 0) += n;
    }

    /// Sends the accumulated deltas of the touched series to the host, in one call.
    pub fn flush(&mut self) {
        let take = |values: &mut Vec<u64>, send: bool, n: &mut u64| {
            if send {
                values.push(*n);
            }
            *n = 0;
        };
        self.slots.flush(&mut self.flushed, take, |host, series, values| host.add_counters(series, values));
        self.flushed.clear();
    }

    /// Deletes `key`'s series (e.g. for a process that exited).
    pub fn remove(&mut self, key: &K) {
        self.slots.remove(key);
    }
}

/// A gauge family whose values are set in the guest and sent on `flush`.
pub struct GaugeVec<K, H: HostApi = Wit> {
    slots: Slots<K, f64, H>,
}

impl<K: Hash + Eq + Clone, H: HostApi> GaugeVec<K, H> {
    pub fn declare(host: H, name: &str, help: &str, labels: &[&str]) -> Result<Self, String> {
        let family = declare(&host, name, help, MetricKind::Gauge, labels, Vec::new())?;
        Ok(Self { slots: Slots::new(host, family) })
    }

    /// Sets `key`'s gauge; `labels` names a new key's series.
    #[inline]
    pub fn set(&mut self, key: K, value: f64, labels: impl FnOnce(&K) -> Vec<String>) {
        *self.slots.get(key, labels, || 0.0) = value;
    }

    /// Adds `delta` to `key`'s gauge (as the guest knows it).
    #[inline]
    pub fn add(&mut self, key: K, delta: f64, labels: impl FnOnce(&K) -> Vec<String>) {
        *self.slots.get(key, labels, || 0.0) += delta;
    }

    /// Sends the changed values to the host, one call per touched series.
    pub fn flush(&mut self) {
        self.slots.drain(|host, series, v| {
            if let Some(series) = series {
                host.gauge_set(series, *v);
            }
        });
    }

    /// Deletes `key`'s series (e.g. for a process that exited).
    pub fn remove(&mut self, key: &K) {
        self.slots.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::Bounds;

    #[test]
    fn power_of_two_lookup_matches_binary_search() {
        let pow2 = Bounds::new((7..=33).map(|k| 1u64 << k).collect());
        assert_eq!(pow2.pow2_from, Some(7));
        let search = Bounds { bounds: pow2.bounds.clone(), pow2_from: None };
        let mut values: Vec<u64> = vec![0, 1, 127, 128, 129, 255, 256, 257, u64::MAX, 1 << 33, (1 << 33) + 1];
        values.extend((0..64).flat_map(|k| [(1u64 << k).saturating_sub(1), 1 << k, (1u64 << k).saturating_add(1)]));
        for v in values {
            assert_eq!(pow2.index(v), search.index(v), "value {v}");
        }
        assert_eq!(Bounds::new(vec![1, 3, 4]).pow2_from, None);
    }
}
