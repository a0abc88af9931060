"""syscall-latency in Python: the Rust plugin's twin (same families, labels, buckets),
built with componentize-py against the same WIT contract.

Config (all optional): `pids`, `cgroups`, `comms`, `syscalls` narrow the subscription.
"""

import wasmtap_sdk as sdk
from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import types

# Upper bounds in nanoseconds: powers of two from 128 ns to ~8.6 s.
BOUNDS = [1 << shift for shift in range(7, 34)]

_plugin = None


def _labels(key):
    comm, nr = key
    return [sdk.comm_label(comm), sdk.syscall_label(nr)]


def _error_labels(key):
    (comm, nr), code = key
    return [sdk.comm_label(comm), sdk.syscall_label(nr), sdk.errno_label(code)]


class SyscallLatency:
    def __init__(self):
        self.latency = sdk.HistogramVec("seconds", "Latency of completed system calls.", ["comm", "syscall"], BOUNDS, 1e-9)
        self.errors = sdk.CounterVec("errors", "System calls that returned an error.", ["comm", "syscall", "errno"])

    def observe(self, records):
        latency, errors = self.latency, self.errors
        for r in records:
            key = (r.comm, r.syscall_nr)
            latency.observe(key, r.latency_ns, _labels)
            if -4095 <= r.ret <= -1:
                errors.add((key, -r.ret), 1, _error_labels)
        latency.flush()
        errors.flush()


class Handler(exports.Handler):
    def init(self, host, config):
        global _plugin
        config = sdk.Config(config)
        try:
            filt = types.Filter(
                pids=[int(p) for p in config.list("pids")],
                cgroups=[int(c) for c in config.list("cgroups")],
                comms=[str(c) for c in config.list("comms")],
                params=[("syscalls", [str(s) for s in config.list("syscalls")])],
            )
        except (TypeError, ValueError) as e:
            raise Err(f"config: {e}")
        _plugin = SyscallLatency()
        return types.Manifest(subscriptions=[types.Subscription(kind="syscall", filter=filt)], tick_interval_ms=0)

    def on_batch(self, kind, record_size, records, dropped):
        if kind == "syscall":
            _plugin.observe(sdk.syscall_records(records, record_size))

    def tick(self, now_ns):
        pass


class State(sdk.Plugin, exports.State):
    pass
