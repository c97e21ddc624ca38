"""The crash record: what a shim made on the host, written as it makes it, for ``delete``.

``<state root>/<namespace>/<id>/`` holds ``shim.json`` (daemon pid + start time, socket,
group), ``init.pid``, ``pids`` (QEMU, vhost-device-vsock: ``<pid> <start time>`` per line),
``dirs`` (the pod's run directory), ``cgroups`` (the pod's host cgroup directories the shim
made) and ``network.json`` (the wired pod netns). ``start`` writes
the daemon's entry; the pod's boot script adds each pid right after the process exists and
each directory just before it is made, so a daemon killed at any point of a boot leaves
``delete`` everything it needs to reap (a helper spawned in the instant before its pid could be
written still names the recorded run directory on its command line: ``delete`` reaps those
too). A clean daemon exit removes the record.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

from shim.core import paths


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: tells a live process from a recycled pid. None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, start_time = fields[0], int(fields[19])
    return None if state in ("Z", "X") else start_time


def kill_if_same(pid: int, start_time: int) -> bool:
    """SIGKILL ``pid`` only if it is still the process we recorded; True if a signal was sent."""
    if pid <= 1 or process_start_time(pid) != start_time:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


class ShimState:
    """The per-shim state directory (written by start and the daemon, read by delete).

    A plain class, not a dataclass, and ``shutil`` only on removal: ``start`` imports this
    module, and ``dataclasses`` and ``shutil`` (with its zlib, bz2 and lzma) cost it ≈ 10 ms.
    """

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"ShimState({self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShimState) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @classmethod
    def of(cls, namespace: str, task_id: str) -> ShimState:
        return cls(paths.state_dir(namespace, task_id))

    def _dir(self) -> Path:
        paths.private_root(self.path.parent.parent)  # the state root: <root>/<ns>/<id>
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.path

    def _append(self, name: str, line: str) -> None:
        with (self._dir() / name).open("a") as f:
            f.write(f"{line}\n")
            f.flush()

    def _replace(self, name: str, text: str) -> None:
        tmp = self._dir() / f"{name}.tmp"
        tmp.write_text(text)
        tmp.rename(self.path / name)

    def _lines(self, name: str) -> list[str]:
        with contextlib.suppress(OSError):
            return [line for line in (self.path / name).read_text().splitlines() if line]
        return []

    def write_shim(self, pid: int, sock: Path, group: str) -> None:
        self._replace("shim.json", json.dumps({
            "pid": pid, "start_time": process_start_time(pid), "socket": str(sock),
            "group": group}))

    def read_shim(self) -> dict[str, object]:
        try:
            record = json.loads((self.path / "shim.json").read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def write_init_pid(self, pid: int) -> None:
        (self._dir() / "init.pid").write_text(str(pid))

    def read_init_pid(self) -> int:
        try:
            return int((self.path / "init.pid").read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def add_pid(self, pid: int) -> None:
        """Record a helper process (QEMU, vhost-device-vsock) for delete to reap."""
        start = process_start_time(pid)
        if start is not None:
            self._append("pids", f"{pid} {start}")

    def pids(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for line in self._lines("pids"):
            parts = line.split()
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                out.append((int(parts[0]), int(parts[1])))
        return out

    def add_dir(self, path: Path) -> None:
        """Record a directory (the pod VM's run dir) for delete to unmount and remove; done
        before it is made, so there is no moment when it exists unrecorded."""
        self._append("dirs", str(path))

    def dirs(self) -> list[Path]:
        return [Path(line) for line in self._lines("dirs")]

    def add_cgroup(self, path: Path) -> None:
        """Record a cgroup directory (the pod's, under the cgroup v2 mount) for delete to
        empty and remove; done before it is made."""
        self._append("cgroups", str(path))

    def cgroups(self) -> list[Path]:
        return [Path(line) for line in self._lines("cgroups")]

    def add_network(self, record: str) -> None:
        """Record the pod's wired network (PodNetwork JSON) for delete to unwire."""
        self._replace("network.json", record)

    def clear_network(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / "network.json").unlink()

    def network(self) -> str | None:
        with contextlib.suppress(OSError):
            return (self.path / "network.json").read_text()
        return None

    def remove(self) -> None:
        import shutil  # delete and the daemon's exit only

        shutil.rmtree(self.path, ignore_errors=True)
