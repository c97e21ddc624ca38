"""A container's resource usage read from its cgroup v2 files.

The shape is that of ``runc events --stats`` (``data``), which :func:`guest.agent.service.
stats_to_proto` turns into Kata's ``CgroupStats``: on a pure cgroup2 hierarchy (the guest) the
agent reads the files itself, as runc does, so stats work with any OCI runtime (crun has no
``events`` command); elsewhere it asks the runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED = (1 << 64) - 1  # runc's value for "max"


def is_cgroup2(root: Path = CGROUP_ROOT) -> bool:
    """True when ``root`` is a cgroup2 mount (not v1, not the hybrid layout)."""
    return (root / "cgroup.controllers").is_file()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:  # controller not enabled for this cgroup, or the file is not in this kernel
        return None


def _number(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def flat_keyed(path: Path) -> dict[str, int]:
    """``key value`` lines (cpu.stat, memory.stat, memory.events)."""
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def _io_entries(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """io.stat (``8:0 rbytes=1 wbytes=2 rios=3 wios=4 ...``) → (bytes, ios) blkio entries."""
    service_bytes: list[dict[str, Any]] = []
    serviced: list[dict[str, Any]] = []
    for line in (_read(path) or "").splitlines():
        device, *pairs = line.split()
        major, _, minor = device.partition(":")
        try:
            numbers = {"major": int(major), "minor": int(minor)}
        except ValueError:
            continue
        values = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        for key, op, target in (
            ("rbytes", "Read", service_bytes),
            ("wbytes", "Write", service_bytes),
            ("rios", "Read", serviced),
            ("wios", "Write", serviced),
        ):
            if key in values and values[key].isdigit():
                target.append({**numbers, "op": op, "value": int(values[key])})
    return service_bytes, serviced


def stats(cgroup: Path) -> dict[str, Any]:
    """The ``runc events --stats`` data of the cgroup at ``cgroup`` (cgroup v2)."""
    cpu = flat_keyed(cgroup / "cpu.stat")
    memory_stat = flat_keyed(cgroup / "memory.stat")
    service_bytes, serviced = _io_entries(cgroup / "io.stat")
    memory: dict[str, Any] = {
        "usage": {
            "usage": _number(cgroup / "memory.current") or 0,
            "limit": _number(cgroup / "memory.max") or 0,
            "max": _number(cgroup / "memory.peak") or 0,
            "failcnt": flat_keyed(cgroup / "memory.events").get("max", 0),
        },
        "swap": {
            "usage": _number(cgroup / "memory.swap.current") or 0,
            "limit": _number(cgroup / "memory.swap.max") or 0,
        },
        "raw": memory_stat,
    }
    if "file" in memory_stat:
        memory["cache"] = memory_stat["file"]
    pids_limit = _number(cgroup / "pids.max")
    return {
        "cpu": {
            "usage": {
                "total": cpu.get("usage_usec", 0) * 1000,
                "kernel": cpu.get("system_usec", 0) * 1000,
                "user": cpu.get("user_usec", 0) * 1000,
            },
            "throttling": {
                "periods": cpu.get("nr_periods", 0),
                "throttledPeriods": cpu.get("nr_throttled", 0),
                "throttledTime": cpu.get("throttled_usec", 0) * 1000,
            },
        },
        "memory": memory,
        "pids": {
            "current": _number(cgroup / "pids.current") or 0,
            "limit": 0 if pids_limit in (None, UNLIMITED) else pids_limit,
        },
        "blkio": {
            "ioServiceBytesRecursive": service_bytes,
            "ioServicedRecursive": serviced,
        },
    }
