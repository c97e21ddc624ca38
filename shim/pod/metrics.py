"""Agent statistics → the cgroup v2 ``Metrics`` containerd decodes (``ctr task metrics``, CRI).

The Kata agent answers StatsContainer with runc's view (``grpc.CgroupStats``: CPU times in
nanoseconds, memory usage/limit records, blkio entries). containerd wants
``io.containerd.cgroups.v2.Metrics`` (microseconds, flat memory fields, per-device I/O), so the
conversion lives here, pure and tested.
"""

from __future__ import annotations

from protocols.api.containerd.cgroups.v2 import metrics_pb2 as v2
from protocols.api.kata import agent_pb2

TYPE_URL = "io.containerd.cgroups.v2.Metrics"
_MEMORY_FIELDS = frozenset(f.name for f in v2.MemoryStat.DESCRIPTOR.fields)
UINT64_MAX = (1 << 64) - 1
# The guest chooses what it reports: sums saturate instead of overflowing uint64 (which would
# fail the whole Stats call), and at most this many block devices are reported.
MAX_IO_DEVICES = 64


def _add(total: int, value: int) -> int:
    return min(total + value, UINT64_MAX)


def to_cgroup2_metrics(stats: agent_pb2.StatsContainerResponse) -> v2.Metrics:
    cgroup = stats.cgroup_stats
    cpu, throttling = cgroup.cpu_stats.cpu_usage, cgroup.cpu_stats.throttling_data
    memory = cgroup.memory_stats
    out = v2.Metrics(
        pids=v2.PidsStat(current=cgroup.pids_stats.current, limit=cgroup.pids_stats.limit),
        cpu=v2.CPUStat(usage_usec=cpu.total_usage // 1000,
                       user_usec=cpu.usage_in_usermode // 1000,
                       system_usec=cpu.usage_in_kernelmode // 1000,
                       nr_periods=throttling.periods,
                       nr_throttled=throttling.throttled_periods,
                       throttled_usec=throttling.throttled_time // 1000),
    )
    mem = out.memory
    # memory.stat keys with the same name in v2 (anon, file, pgfault…) carry over as they are.
    for key, value in memory.stats.items():
        if key in _MEMORY_FIELDS:
            setattr(mem, key, value)
    mem.usage = memory.usage.usage
    mem.usage_limit = memory.usage.limit
    mem.max_usage = memory.usage.max_usage
    # runc reports cgroup v2 swap the cgroup v1 way (memory + swap, "memsw"); v2 Metrics
    # carries swap alone.
    mem.swap_usage = max(memory.swap_usage.usage - memory.usage.usage, 0)
    mem.swap_limit = memory.swap_usage.limit
    devices: dict[tuple[int, int], v2.IOEntry] = {}

    spare = v2.IOEntry()  # where the entries of devices beyond MAX_IO_DEVICES go (dropped)

    def entry(major: int, minor: int) -> v2.IOEntry:
        if (major, minor) not in devices:
            if len(devices) >= MAX_IO_DEVICES:
                return spare
            devices[(major, minor)] = v2.IOEntry(major=major, minor=minor)
        return devices[(major, minor)]

    for e in cgroup.blkio_stats.io_service_bytes_recursive:
        if e.op.lower() == "read":
            io = entry(e.major, e.minor)
            io.rbytes = _add(io.rbytes, e.value)
        elif e.op.lower() == "write":
            io = entry(e.major, e.minor)
            io.wbytes = _add(io.wbytes, e.value)
    for e in cgroup.blkio_stats.io_serviced_recursive:
        if e.op.lower() == "read":
            io = entry(e.major, e.minor)
            io.rios = _add(io.rios, e.value)
        elif e.op.lower() == "write":
            io = entry(e.major, e.minor)
            io.wios = _add(io.wios, e.value)
    out.io.usage.extend(devices[k] for k in sorted(devices))
    return out


def vm_host_metrics(pid: int) -> v2.Metrics:
    """The pod VM's footprint on the host, as cgroup v2 Metrics: CPU time and resident memory
    of the hypervisor process and its helpers (vhost-device-vsock…), the process count."""
    import psutil  # only the sandbox API's SandboxMetrics needs it

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    user = system = 0.0
    rss = 0
    for proc in procs:
        try:
            times, memory = proc.cpu_times(), proc.memory_info()
        except psutil.NoSuchProcess:
            continue
        user, system, rss = user + times.user, system + times.system, rss + memory.rss
    return v2.Metrics(
        pids=v2.PidsStat(current=len(procs)),
        cpu=v2.CPUStat(usage_usec=int((user + system) * 1e6), user_usec=int(user * 1e6),
                       system_usec=int(system * 1e6)),
        memory=v2.MemoryStat(usage=rss),
    )
