"""Storages: what the host asks the agent to mount before a container can use it.

Drivers (Kata's names): ``9p`` (source = 9p mount tag), ``virtio-fs`` (source = virtio-fs tag),
``blk`` / ``virtio-blk`` / ``mmioblk`` (source = a /dev path, or a PCI path such as ``02/00``
resolved to the virtio disk behind it), ``local`` (a directory created in the guest),
``ephemeral`` (a tmpfs), ``bind`` (a guest path bind-mounted), ``image_guest_pull`` (the image
is pulled and mounted in the guest by :mod:`guest.image_pull`; only through :meth:`add_all`,
which awaits the pull).

Mount points are host-chosen paths, so they are confined: strictly beneath the manager's root
(the shared root, ``/run/kata-containers`` in the guest), resolved without following any symlink
(:mod:`guest.agent.beneath`), and the mount goes onto the directory that walk opened. Nothing can
mount over the agent's own files, which live outside that root.

Mounts are reference-counted by mount point: the same share used by several containers is
mounted once and unmounted with its last user.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, NamedTuple, Protocol

from guest.agent import beneath, mounts
from guest.agent.errors import InvalidArgument, NotFound, Unimplemented

if TYPE_CHECKING:
    from guest.image_pull.puller import GuestRootfs

NINEP_DEFAULTS = ("trans=virtio", "version=9p2000.L", "msize=262144", "cache=mmap")
BLOCK_DRIVERS = frozenset({"blk", "virtio-blk", "virtio-blk-pci", "mmioblk", "blk-ccw"})
GUEST_PULL = "image_guest_pull"
DRIVERS = (
    "9p",
    "virtio-fs",
    "blk",
    "virtio-blk",
    "mmioblk",
    "local",
    "ephemeral",
    "bind",
    GUEST_PULL,
)


class GuestPull(Protocol):
    """The ``image_guest_pull`` handler (:class:`guest.image_pull.puller.GuestPullStorage`).

    ``mount_point`` is the confined, normalised mount point; ``target`` the /proc/self/fd path
    of that directory, opened without following symlinks, to copy into and mount onto."""

    async def mount(
        self,
        container_id: str,
        source: str,
        driver_options: tuple[str, ...],
        mount_point: str,
        target: str | None = None,
    ) -> GuestRootfs: ...

    def release(self, mount_point: str) -> None: ...


class StorageSpec(NamedTuple):
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
    parts: tuple[str, ...] = ()  # the mount point beneath the root
    rootfs: GuestRootfs | None = None  # a guest-pulled image (or the pause bundle)
    created_levels: int = 0  # trailing components of parts add_all made (guest pull)


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
    def __init__(self, root: Path, guest_pull: GuestPull | None = None) -> None:
        self.root = root  # every mount point lies strictly beneath it
        self._mounted: dict[str, _Mounted] = {}
        self.guest_pull = guest_pull

    @property
    def mount_points(self) -> list[str]:
        return sorted(self._mounted)

    def add(self, spec: StorageSpec) -> str:
        """Mount spec (or take another reference); return its (normalised) mount point."""
        if not spec.mount_point or not os.path.isabs(spec.mount_point):
            raise InvalidArgument(f"storage mount point must be absolute: {spec.mount_point!r}")
        parts = beneath.parts_beneath(self.root, spec.mount_point, "storage mount point")
        point = str(PurePosixPath(self.root, *parts))
        existing = self._mounted.get(point)
        if existing is not None:
            existing.users += 1
            return point
        created = not os.path.lexists(point)
        with beneath.open_directory(
            self.root, parts, create_mode=0o755, what="storage mount point"
        ) as target:
            try:
                self._mount(spec, beneath.fd_path(target), point)
            except Exception:
                if created:
                    self._remove_directory(parts)
                raise
        self._mounted[point] = _Mounted(spec, created_dir=created, parts=parts)
        return point

    async def add_all(self, specs: Sequence[StorageSpec], container_id: str = "") -> list[str]:
        """Mount all, or none: a failure (or cancellation) unmounts what this call mounted."""
        done: list[str] = []
        try:
            for spec in specs:
                if spec.driver == GUEST_PULL and self.guest_pull is not None:
                    done.append(await self._add_guest_pull(spec, container_id))
                else:
                    done.append(self.add(spec))
        except BaseException:
            for point in reversed(done):
                self.release(point)
            raise
        return done

    async def _add_guest_pull(self, spec: StorageSpec, container_id: str) -> str:
        """The mount point is confined like any other (no symlink on the way, made here); the
        handler pulls and mounts onto the directory this walk opened."""
        assert self.guest_pull is not None
        if not container_id:
            raise InvalidArgument(f"{GUEST_PULL} storage outside CreateContainer")
        if not spec.mount_point or not os.path.isabs(spec.mount_point):
            raise InvalidArgument(f"storage mount point must be absolute: {spec.mount_point!r}")
        parts = beneath.parts_beneath(self.root, spec.mount_point, "storage mount point")
        point = str(PurePosixPath(self.root, *parts))
        if point in self._mounted:
            raise InvalidArgument(f"{GUEST_PULL} mount point {point} is in use")
        levels = self._missing_levels(parts)  # /run/kata-containers/<cid>/rootfs: usually 2
        with beneath.open_directory(
            self.root, parts, create_mode=0o755, what="storage mount point"
        ) as target:
            try:
                rootfs = await self.guest_pull.mount(
                    container_id, spec.source, spec.driver_options, point, beneath.fd_path(target)
                )
            except BaseException:
                self._remove_levels(parts, levels)
                raise
        self._mounted[point] = _Mounted(spec, parts=parts, rootfs=rootfs, created_levels=levels)
        return point

    def _missing_levels(self, parts: tuple[str, ...]) -> int:
        return sum(
            not os.path.lexists(PurePosixPath(self.root, *parts[: i + 1]))
            for i in range(len(parts))
        )

    def _remove_levels(self, parts: tuple[str, ...], levels: int) -> None:
        for depth in range(len(parts), len(parts) - levels, -1):
            self._remove_directory(parts[:depth])

    def guest_rootfs(self, points: Sequence[str]) -> GuestRootfs | None:
        """The guest-pulled rootfs among these mount points (a container has at most one)."""
        found = [m.rootfs for p in points if (m := self._mounted.get(p)) and m.rootfs]
        if len(found) > 1:
            raise InvalidArgument(f"more than one {GUEST_PULL} storage for one container")
        return found[0] if found else None

    def release(self, mount_point: str) -> None:
        entry = self._mounted.get(mount_point)
        if entry is None:
            return
        entry.users -= 1
        if entry.users > 0:
            return
        del self._mounted[mount_point]
        if entry.rootfs is not None and self.guest_pull is not None:
            self.guest_pull.release(mount_point)
            self._remove_levels(entry.parts, entry.created_levels)
            return
        if entry.spec.driver != "local" and mounts.is_mountpoint(mount_point):
            mounts.umount(mount_point)
        if entry.created_dir:
            self._remove_directory(entry.parts)

    def _remove_directory(self, parts: tuple[str, ...]) -> None:
        """rmdir the (empty) directory add() created, through the same no-symlink walk."""
        with contextlib.suppress(OSError), beneath.open_directory(self.root, parts[:-1]) as parent:
            os.rmdir(parts[-1], dir_fd=parent)

    def release_all(self, points: Sequence[str]) -> None:
        for point in reversed(points):
            self.release(point)

    def _mount(self, spec: StorageSpec, target: str, shown: str) -> None:
        """Mount onto ``target`` (the /proc/self/fd path of the checked directory)."""
        driver = spec.driver
        flags, data = mounts.parse_options(spec.options)
        if driver == "9p":
            if not data:
                data = ",".join(NINEP_DEFAULTS)
            elif "trans=" not in data:
                data = ",".join([*NINEP_DEFAULTS[:1], data])
            mounts.mount(spec.source, target, "9p", flags, data, shown=shown)
        elif driver == "virtio-fs":
            mounts.mount(spec.source, target, "virtiofs", flags, data, shown=shown)
        elif driver in BLOCK_DRIVERS:
            device = (
                spec.source if spec.source.startswith("/dev/") else resolve_pci_block(spec.source)
            )
            if not os.path.exists(device):
                raise NotFound(f"block device {device} does not exist")
            mounts.mount(device, target, spec.fstype or "ext4", flags, data, shown=shown)
        elif driver == "ephemeral":
            mounts.mount("tmpfs", target, "tmpfs", flags, data, shown=shown)
        elif driver == "local":
            os.chmod(target, 0o777)
        elif driver == "bind":
            if not os.path.exists(spec.source):
                raise NotFound(f"bind source {spec.source} does not exist")
            mounts.mount(spec.source, target, "", flags | mounts.MS_BIND, data, shown=shown)
        elif driver == GUEST_PULL:
            raise Unimplemented(f"{GUEST_PULL}: this agent has no image puller configured")
        else:
            raise InvalidArgument(
                f"unknown storage driver {driver!r} (known: {', '.join(DRIVERS)})"
            )


__all__ = [
    "DRIVERS",
    "GUEST_PULL",
    "GuestPull",
    "StorageManager",
    "StorageSpec",
    "resolve_pci_block",
]
