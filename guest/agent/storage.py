"""Storages: what the host asks the agent to mount before a container can use it.

Drivers (Kata's names): ``9p`` (source = 9p mount tag), ``virtio-fs`` (source = virtio-fs tag),
``blk`` / ``virtio-blk`` / ``mmioblk`` (source = a /dev path, or a PCI path such as ``02/00``
resolved to the virtio disk behind it), ``local`` (a directory created in the guest),
``ephemeral`` (a tmpfs), ``bind`` (a guest path bind-mounted). ``image_guest_pull`` is
recognised and refused as not implemented yet.

Mounts are reference-counted by mount point: the same share used by several containers is
mounted once and unmounted with its last user.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from guest.agent import mounts
from guest.agent.errors import InvalidArgument, NotFound, Unimplemented

NINEP_DEFAULTS = ("trans=virtio", "version=9p2000.L", "msize=262144", "cache=mmap")
BLOCK_DRIVERS = frozenset({"blk", "virtio-blk", "virtio-blk-pci", "mmioblk", "blk-ccw"})
DRIVERS = ("9p", "virtio-fs", "blk", "virtio-blk", "mmioblk", "local", "ephemeral", "bind")


@dataclass(frozen=True)
class StorageSpec:
    driver: str
    source: str
    fstype: str
    options: tuple[str, ...]
    mount_point: str
    driver_options: tuple[str, ...] = ()


@dataclass
class _Mounted:
    spec: StorageSpec
    users: int = 1
    created_dir: bool = False


def resolve_pci_block(pci_path: str, sys_root: Path = Path("/sys")) -> str:
    """/dev/vdX for a Kata PCI path like ``02/00`` (bridge slot / device slot) or a bare slot."""
    slots = [int(part, 16) for part in pci_path.strip("/").split("/") if part]
    if not slots:
        raise InvalidArgument(f"bad PCI path {pci_path!r}")
    for block in sorted((sys_root / "block").glob("vd*")):
        device = (block / "device").resolve()
        # .../0000:00:02.0/0000:01:00.0/virtio3 : compare the trailing slots
        functions = [p.name for p in device.parents if p.name.count(":") == 2]
        found = [int(name.split(":")[2].split(".")[0], 16) for name in reversed(functions)]
        if found[-len(slots) :] == slots:
            return f"/dev/{block.name}"
    raise NotFound(f"no virtio block device at PCI path {pci_path}")


class StorageManager:
    def __init__(self) -> None:
        self._mounted: dict[str, _Mounted] = {}

    @property
    def mount_points(self) -> list[str]:
        return sorted(self._mounted)

    def add(self, spec: StorageSpec) -> str:
        """Mount spec (or take another reference); return its mount point."""
        if not spec.mount_point or not os.path.isabs(spec.mount_point):
            raise InvalidArgument(f"storage mount point must be absolute: {spec.mount_point!r}")
        existing = self._mounted.get(spec.mount_point)
        if existing is not None:
            existing.users += 1
            return spec.mount_point
        target = Path(spec.mount_point)
        created = not target.exists()
        target.mkdir(parents=True, exist_ok=True)
        try:
            self._mount(spec)
        except Exception:
            if created:
                _rmdir_quietly(target)
            raise
        self._mounted[spec.mount_point] = _Mounted(spec, created_dir=created)
        return spec.mount_point

    def add_all(self, specs: Sequence[StorageSpec]) -> list[str]:
        """Mount all, or none: a failure unmounts what this call mounted."""
        done: list[str] = []
        try:
            for spec in specs:
                done.append(self.add(spec))
        except Exception:
            for point in reversed(done):
                self.release(point)
            raise
        return done

    def release(self, mount_point: str) -> None:
        entry = self._mounted.get(mount_point)
        if entry is None:
            return
        entry.users -= 1
        if entry.users > 0:
            return
        del self._mounted[mount_point]
        if entry.spec.driver != "local" and mounts.is_mountpoint(mount_point):
            mounts.umount(mount_point)
        if entry.created_dir:
            _rmdir_quietly(Path(mount_point))

    def release_all(self, points: Sequence[str]) -> None:
        for point in reversed(points):
            self.release(point)

    def _mount(self, spec: StorageSpec) -> None:
        driver = spec.driver
        flags, data = mounts.parse_options(spec.options)
        if driver == "9p":
            if not data:
                data = ",".join(NINEP_DEFAULTS)
            elif "trans=" not in data:
                data = ",".join([*NINEP_DEFAULTS[:1], data])
            mounts.mount(spec.source, spec.mount_point, "9p", flags, data)
        elif driver == "virtio-fs":
            mounts.mount(spec.source, spec.mount_point, "virtiofs", flags, data)
        elif driver in BLOCK_DRIVERS:
            device = (
                spec.source if spec.source.startswith("/dev/") else resolve_pci_block(spec.source)
            )
            if not os.path.exists(device):
                raise NotFound(f"block device {device} does not exist")
            mounts.mount(device, spec.mount_point, spec.fstype or "ext4", flags, data)
        elif driver == "ephemeral":
            mounts.mount("tmpfs", spec.mount_point, "tmpfs", flags, data)
        elif driver == "local":
            os.chmod(spec.mount_point, 0o777)
        elif driver == "bind":
            if not os.path.exists(spec.source):
                raise NotFound(f"bind source {spec.source} does not exist")
            mounts.mount(spec.source, spec.mount_point, "", flags | mounts.MS_BIND, data)
        elif driver == "image_guest_pull":
            raise Unimplemented("guest pull (image_guest_pull storage) is not supported yet")
        else:
            raise InvalidArgument(
                f"unknown storage driver {driver!r} (known: {', '.join(DRIVERS)})"
            )


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


__all__ = ["DRIVERS", "StorageManager", "StorageSpec", "resolve_pci_block"]
