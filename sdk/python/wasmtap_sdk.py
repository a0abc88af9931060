"""The Python SDK for wasmtap plugins (built into components with componentize-py).

It sits on the bindings componentize-py generates from the WIT contract (`wit_world`):
typed views over a batch's records, the plugin's configuration, and metric helpers that
aggregate in the guest and flush one delta per series per batch (one host call per
family), as the Rust SDK's do. A plugin module defines the `Handler` and `State`
classes the world exports; `wasmtap_sdk.Plugin` gives both their defaults.
"""

import struct
from collections import namedtuple

from componentize_py_types import Err
from wit_world.imports import logs, metrics, names, types

# The record layouts (little-endian, C layout): wit/wasmtap.wit documents each field.
HEADER = "QQII16s"
SYSCALL = struct.Struct("<" + HEADER + "QqII")
SyscallRecord = namedtuple("SyscallRecord", "ts_ns cgroup_id pid tid comm latency_ns ret syscall_nr reserved")


def records(layout, tuple_type, data, record_size):
    """The records of a batch as named tuples. A stride longer than the layout (a newer
    host) is read as the prefix this SDK knows; a shorter one yields nothing."""
    if record_size == layout.size:
        return map(tuple_type._make, layout.iter_unpack(data[: len(data) - len(data) % layout.size]))
    if record_size > layout.size:
        return (tuple_type._make(layout.unpack_from(data, at)) for at in range(0, len(data) - record_size + 1, record_size))
    return iter(())


def syscall_records(data, record_size):
    return records(SYSCALL, SyscallRecord, data, record_size)


def errno(record):
    """The errno of a failed syscall (its return value in -4095..-1), else None."""
    return -record.ret if -4095 <= record.ret <= -1 else None


def comm_label(comm):
    return comm.split(b"\0", 1)[0].decode("utf-8", "replace")


def syscall_label(nr):
    return names.syscall_name(nr) or f"syscall_{nr}"


def errno_label(code):
    return names.errno_name(code) or str(code)


class Config:
    """The plugin's configuration tree (TOML types kept)."""

    def __init__(self, nodes):
        self.nodes = nodes

    def _plain(self, at):
        node = self.nodes[at]
        if isinstance(node, types.ConfigValue_Array):
            return [self._plain(i) for i in node.value]
        if isinstance(node, types.ConfigValue_Table):
            return {k: self._plain(i) for k, i in node.value}
        return node.value

    def get(self, key, default=None):
        root = self.nodes[0] if self.nodes else None
        if isinstance(root, types.ConfigValue_Table):
            for k, at in root.value:
                if k == key:
                    return self._plain(at)
        return default

    def list(self, key):
        value = self.get(key, [])
        return value if isinstance(value, list) else [value]


def log(level, message, **fields):
    logs.log(level, message, [(k, str(v)) for k, v in fields.items()])


def _declare(name, help, kind, labels, buckets=()):
    try:
        return metrics.declare_family(metrics.FamilyDesc(name, help, kind, list(labels), list(buckets)))
    except Err as e:
        raise Err(f"declaring {name}: {e.value}")


# Keys remembered per family (a flood of keys cannot exhaust the plugin's memory).
MAX_KEYS = 65536


class _Slots:
    """Key -> series, made on first use (the host call happens once per key). Keys the
    host answers with the family's overflow series share one handle; past MAX_KEYS, new
    keys go to the overflow series (once there is one) unasked and unkept."""

    def __init__(self, family):
        self.family = family
        self.series = {}
        self.overflow = None

    def get(self, key, labels):
        series = self.series.get(key)
        if series is None:
            if len(self.series) >= MAX_KEYS:
                return self.overflow
            try:
                series = self.family.series(labels(key))
                if series.is_overflow():
                    if self.overflow is None:
                        self.overflow = series
                    else:
                        series.__exit__(None, None, None)  # the same series: drop this handle
                        series = self.overflow
            except Err:
                series = False  # refused (the family's series limit): counted by the host
            self.series[key] = series
        return series or None


class CounterVec:
    """A counter family aggregated in the guest; `name` without `_total`."""

    def __init__(self, name, help, labels):
        self.slots = _Slots(_declare(name, help, metrics.MetricKind.COUNTER, labels))
        self.pending = {}  # id(series) -> [series, value]

    def add(self, key, value, labels):
        series = self.slots.get(key, labels)
        if series is None:
            return
        pending = self.pending.get(id(series))
        if pending is None:
            self.pending[id(series)] = [series, value]
        else:
            pending[1] += value

    def flush(self):
        if self.pending:
            values = list(self.pending.values())
            metrics.add_counters([series for series, _ in values], [value for _, value in values])
        self.pending.clear()


class HistogramVec:
    """A histogram family aggregated in the guest: values in integer units (e.g. ns),
    bounds in the same units, reported times `scale` (e.g. 1e-9 for seconds)."""

    def __init__(self, name, help, labels, bounds, scale):
        self.bounds = list(bounds)
        self.scale = scale
        self.slots = _Slots(_declare(name, help, metrics.MetricKind.HISTOGRAM, labels, [b * scale for b in self.bounds]))
        self.pending = {}  # id(series) -> [series, counts, sum]
        # Powers of two from 2^k: the bucket is a bit length, not a search.
        first = self.bounds[0]
        self.pow2_from = first.bit_length() - 1 if all(b == first << i for i, b in enumerate(self.bounds)) else None

    def index(self, value):
        k = self.pow2_from
        if k is not None:
            return 0 if value <= 1 << k else min((value - 1).bit_length() - k, len(self.bounds))
        lo, hi = 0, len(self.bounds)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.bounds[mid] < value:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def observe(self, key, value, labels):
        series = self.slots.get(key, labels)
        if series is None:
            return
        pending = self.pending.get(id(series))
        if pending is None:
            pending = self.pending[id(series)] = [series, [0] * (len(self.bounds) + 1), 0]
        pending[1][self.index(value)] += 1
        pending[2] += value

    def flush(self):
        if self.pending:
            values = list(self.pending.values())
            counts = [c for _, bucket_counts, _ in values for c in bucket_counts]
            sums = [float(total & 0xFFFFFFFFFFFFFFFF) * self.scale for _, _, total in values]
            metrics.merge_histograms([series for series, _, _ in values], counts, sums)
        self.pending.clear()


class Plugin:
    """Defaults for the exported interfaces: no ticks' work, no state carried."""

    def tick(self, now_ns):
        pass

    def snapshot(self):
        return None

    def restore(self, state):
        pass
