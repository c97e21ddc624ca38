"""cgroup v2 files → `runc events --stats` data → Kata CgroupStats."""

from __future__ import annotations

from pathlib import Path

from guest.agent import cgroups
from guest.agent.service import stats_to_proto


def write(cgroup: Path, files: dict[str, str]) -> None:
    cgroup.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (cgroup / name).write_text(text)


def test_is_cgroup2(tmp_path: Path) -> None:
    assert not cgroups.is_cgroup2(tmp_path)
    (tmp_path / "cgroup.controllers").write_text("")
    assert cgroups.is_cgroup2(tmp_path)


def test_every_file_read_and_converted(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "cpu.stat": "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n"
            "nr_periods 10\nnr_throttled 4\nthrottled_usec 300\n",
            "memory.current": "1048576\n",
            "memory.max": "max\n",
            "memory.peak": "2097152\n",
            "memory.events": "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n",
            "memory.swap.current": "0\n",
            "memory.swap.max": "4096\n",
            "memory.stat": "anon 4096\nfile 8192\nkernel 512\n",
            "pids.current": "3\n",
            "pids.max": "64\n",
            "io.stat": "254:0 rbytes=4096 wbytes=512 rios=2 wios=1 dbytes=0 dios=0\n",
        },
    )
    data = cgroups.stats(tmp_path)
    assert data["cpu"]["usage"] == {"total": 2_500_000, "kernel": 500_000, "user": 2_000_000}
    assert data["cpu"]["throttling"] == {
        "periods": 10,
        "throttledPeriods": 4,
        "throttledTime": 300_000,
    }
    assert data["memory"]["usage"] == {
        "usage": 1 << 20,
        "limit": cgroups.UNLIMITED,
        "max": 2 << 20,
        "failcnt": 2,
    }
    assert data["memory"]["swap"] == {"usage": 0, "limit": 4096}
    assert data["memory"]["cache"] == 8192
    assert data["memory"]["raw"] == {"anon": 4096, "file": 8192, "kernel": 512}
    assert data["pids"] == {"current": 3, "limit": 64}
    assert data["blkio"]["ioServiceBytesRecursive"] == [
        {"major": 254, "minor": 0, "op": "Read", "value": 4096},
        {"major": 254, "minor": 0, "op": "Write", "value": 512},
    ]
    assert data["blkio"]["ioServicedRecursive"] == [
        {"major": 254, "minor": 0, "op": "Read", "value": 2},
        {"major": 254, "minor": 0, "op": "Write", "value": 1},
    ]

    proto = stats_to_proto(data, []).cgroup_stats
    assert proto.cpu_stats.cpu_usage.total_usage == 2_500_000
    assert proto.cpu_stats.throttling_data.throttled_periods == 4
    assert proto.cpu_stats.throttling_data.throttled_time == 300_000
    assert proto.memory_stats.usage.usage == 1 << 20
    assert proto.memory_stats.usage.max_usage == 2 << 20
    assert proto.memory_stats.cache == 8192
    assert proto.pids_stats.current == 3 and proto.pids_stats.limit == 64
    assert [e.op for e in proto.blkio_stats.io_service_bytes_recursive] == ["Read", "Write"]


def test_missing_controllers_and_unlimited_pids_give_zeros(tmp_path: Path) -> None:
    write(tmp_path, {"pids.current": "1\n", "pids.max": "max\n", "io.stat": "garbage\n"})
    data = cgroups.stats(tmp_path)
    assert data["pids"] == {"current": 1, "limit": 0}  # runc: 0 means no limit
    assert data["cpu"]["usage"] == {"total": 0, "kernel": 0, "user": 0}
    assert data["memory"]["usage"]["usage"] == 0
    assert "cache" not in data["memory"]
    assert data["blkio"] == {"ioServiceBytesRecursive": [], "ioServicedRecursive": []}
