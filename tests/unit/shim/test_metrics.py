"""Agent CgroupStats → containerd's cgroup v2 Metrics."""

from __future__ import annotations

from protocols.api.kata import agent_pb2 as a
from shim.pod.metrics import MAX_IO_DEVICES, UINT64_MAX, to_cgroup2_metrics


def test_units_and_fields_are_converted() -> None:
    stats = a.StatsContainerResponse(cgroup_stats=a.CgroupStats(
        cpu_stats=a.CpuStats(
            cpu_usage=a.CpuUsage(total_usage=5_000_000, usage_in_usermode=3_000_000,
                                 usage_in_kernelmode=2_000_000),
            throttling_data=a.ThrottlingData(periods=7, throttled_periods=2,
                                             throttled_time=9_000)),
        memory_stats=a.MemoryStats(
            usage=a.MemoryData(usage=4096, limit=1 << 30, max_usage=8192),
            swap_usage=a.MemoryData(usage=4096 + 1, limit=2),
            stats={"anon": 100, "file": 200, "pgfault": 3, "not_a_v2_key": 9}),
        pids_stats=a.PidsStats(current=4, limit=64),
        blkio_stats=a.BlkioStats(
            io_service_bytes_recursive=[
                a.BlkioStatsEntry(major=254, minor=0, op="Read", value=10),
                a.BlkioStatsEntry(major=254, minor=0, op="Write", value=20),
                a.BlkioStatsEntry(major=254, minor=0, op="Total", value=30)],
            io_serviced_recursive=[a.BlkioStatsEntry(major=254, minor=0, op="Read", value=1)]),
    ))
    m = to_cgroup2_metrics(stats)
    assert (m.pids.current, m.pids.limit) == (4, 64)
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (5000, 3000, 2000)
    assert (m.cpu.nr_periods, m.cpu.nr_throttled, m.cpu.throttled_usec) == (7, 2, 9)
    assert (m.memory.usage, m.memory.usage_limit, m.memory.max_usage) == (4096, 1 << 30, 8192)
    assert (m.memory.swap_usage, m.memory.swap_limit) == (1, 2)
    assert (m.memory.anon, m.memory.file, m.memory.pgfault) == (100, 200, 3)
    [io] = m.io.usage
    assert (io.major, io.minor, io.rbytes, io.wbytes, io.rios, io.wios) == (254, 0, 10, 20, 1, 0)


def test_empty_stats_give_empty_metrics() -> None:
    m = to_cgroup2_metrics(a.StatsContainerResponse())
    assert m.memory.usage == 0 and not m.io.usage


def test_hostile_counters_saturate_and_devices_are_bounded() -> None:
    """A guest's uint64 counters summed past 2**64 used to fail the whole Stats call
    (protobuf ValueError); thousands of devices are cut to MAX_IO_DEVICES."""
    top = UINT64_MAX
    entries = [a.BlkioStatsEntry(major=8, minor=0, op="Read", value=top)] * 3
    entries += [a.BlkioStatsEntry(major=8, minor=n, op="Write", value=top)
                for n in range(1, 5000)]
    stats = a.StatsContainerResponse(cgroup_stats=a.CgroupStats(
        blkio_stats=a.BlkioStats(io_service_bytes_recursive=entries,
                                          io_serviced_recursive=entries)))
    out = to_cgroup2_metrics(stats)
    assert len(out.io.usage) == MAX_IO_DEVICES
    first = out.io.usage[0]
    assert (first.major, first.minor, first.rbytes, first.rios) == (8, 0, top, top)
    assert all(e.wbytes == top for e in out.io.usage[1:])
    assert len(out.SerializeToString()) < 8192
