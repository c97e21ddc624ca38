"""The pod's host cgroup (cgroup v2): where the pod VM is accounted, like kata's
``sandbox_cgroup_only``.

containerd gives the sandbox container a ``cgroupsPath`` (``linux.cgroupsPath`` of the pause
container's spec; the sandbox API sends ``PodSandboxConfig.linux.cgroup_parent`` and the path
is derived the way containerd derives it). Two drivers spell it differently:

- cgroupfs: a path, ``/kubepods/burstable/pod<uid>/<sandbox id>``;
- systemd: ``<slice>:<prefix>:<name>`` (runc's form), e.g.
  ``kubepods-burstable-pod<uid>.slice:cri-containerd:<id>``, which is the cgroup
  ``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/
  cri-containerd-<id>.scope`` (each ``-`` of a slice name is one level of nesting).

:func:`relative_path` turns either into a path below the cgroup v2 mount; :class:`PodCgroup`
makes what is missing (recording each directory first, for ``delete``), moves processes in
and removes only the directories it made. Standard library only: ``delete`` imports it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Final

MOUNTINFO: Final = Path("/proc/self/mountinfo")
_SYSTEMD_PARTS: Final = 3


class CgroupError(ValueError):
    """A cgroupsPath that names no cgroup we may use."""


def sandbox_cgroups_path(cgroup_parent: str, sandbox_id: str) -> str:
    """containerd's ``getCgroupsPath`` for a sandbox: the systemd form when the parent's last
    element is a ``.slice``, else the parent joined with the id."""
    base = PurePosixPath(cgroup_parent).name
    if base.endswith(".slice"):
        return f"{base}:cri-containerd:{sandbox_id}"
    return str(PurePosixPath(cgroup_parent) / sandbox_id)


def _expand_slice(slice_name: str) -> PurePosixPath:
    """systemd's slice nesting: ``a-b-c.slice`` lives in ``a.slice/a-b.slice/a-b-c.slice``."""
    if slice_name in ("", "-.slice"):
        return PurePosixPath()
    if not slice_name.endswith(".slice") or "/" in slice_name:
        raise CgroupError(f"{slice_name!r} is not a systemd slice name")
    stem = slice_name.removesuffix(".slice")
    parts = stem.split("-")
    if not all(parts):
        raise CgroupError(f"{slice_name!r}: empty component in a systemd slice name")
    return PurePosixPath(*(f"{'-'.join(parts[:i + 1])}.slice" for i in range(len(parts))))


def relative_path(cgroups_path: str) -> PurePosixPath:
    """The cgroup a ``cgroupsPath`` names, relative to the cgroup v2 root."""
    if not cgroups_path:
        raise CgroupError("empty cgroupsPath")
    if ":" in cgroups_path:
        parts = cgroups_path.split(":")
        if len(parts) != _SYSTEMD_PARTS:
            raise CgroupError(f"{cgroups_path!r}: the systemd form is slice:prefix:name")
        slice_name, prefix, name = parts
        if not name or "/" in name or "/" in prefix:
            raise CgroupError(f"{cgroups_path!r}: bad unit name")
        unit = name if name.endswith(".slice") else (
            f"{prefix}-{name}.scope" if prefix else f"{name}.scope")
        return _expand_slice(slice_name) / unit
    path = PurePosixPath(cgroups_path)
    if ".." in path.parts:
        raise CgroupError(f"{cgroups_path!r}: '..' is not allowed")
    relative = path.relative_to("/") if path.is_absolute() else path
    if not relative.parts:
        raise CgroupError(f"{cgroups_path!r} names the root cgroup")
    return relative


def unified_mount(mountinfo: Path = MOUNTINFO) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup``, or
    ``/sys/fs/cgroup/unified`` on a hybrid host); None without one."""
    with contextlib.suppress(OSError):
        for line in mountinfo.read_text().splitlines():
            left, sep, right = line.partition(" - ")
            if sep and right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split(" ")[4])
    return None


def own_cgroup(pid: int | str = "self") -> PurePosixPath | None:
    """A process's cgroup v2 path (the ``0::`` line of /proc/<pid>/cgroup)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return PurePosixPath(line[3:])
    return None


def move(directory: Path, pid: int) -> None:
    """Move ``pid`` (all its threads) into the cgroup at ``directory``."""
    (directory / "cgroup.procs").write_text(f"{pid}\n")


def populated(directory: Path) -> bool:
    """Whether any process is left in the cgroup (or below it)."""
    try:
        events = (directory / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    return "populated 1" in events.split("\n")


def remove_made(directories: list[Path], timeout: float, poll: float = 0.02) -> list[str]:
    """Remove the cgroups one pod's shim made (a chain: the pod's own cgroup, deepest, and the
    parents that were missing). What is left in the pod's own cgroup is killed
    (``cgroup.kill``) and waited for up to ``timeout`` (polling every ``poll`` s); a parent is
    removed only if it is empty: another pod below it keeps it (as runc leaves parents).
    Returns the problems."""
    problems: list[str] = []
    chain = sorted(directories, key=lambda d: len(d.parts), reverse=True)
    for index, directory in enumerate(chain):
        if not directory.exists():
            continue
        own = index == 0
        if own and populated(directory):
            with contextlib.suppress(OSError):
                (directory / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + (timeout if own else 0)
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as err:
                if not own and err.errno in (errno.EBUSY, errno.ENOTEMPTY):
                    break  # another pod's cgroup lives below it now
                if err.errno != errno.EBUSY or time.monotonic() >= deadline:
                    problems.append(f"{directory}: {err.strerror}")
                    break
                time.sleep(poll)
    return problems


@dataclass
class PodCgroup:
    """The pod's cgroup under the v2 mount; ``made`` lists the directories this shim created
    (the pod-level parents the kubelet made are never among them)."""

    path: Path
    made: list[Path] = field(default_factory=list)

    @classmethod
    def create(cls, root: Path, relative: PurePosixPath,
               record: object | None = None) -> PodCgroup:
        """Make the missing directories from ``root`` down to ``relative``; ``record`` (a
        callable taking a Path) learns each one before it is made."""
        cgroup = cls(root / relative)
        current = root
        try:
            for part in relative.parts:
                current = current / part
                if current.is_dir():
                    continue
                if callable(record):
                    record(current)
                os.mkdir(current, 0o755)
                cgroup.made.append(current)
        except OSError:
            remove_made(cgroup.made, 0)
            raise
        return cgroup

    def add(self, pid: int) -> None:
        move(self.path, pid)

    def remove(self, timeout: float) -> list[str]:
        return remove_made(list(self.made), timeout)
