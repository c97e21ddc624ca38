"""How a container's root filesystem reaches the guest: a strategy per profile kind.

A :class:`RootfsStrategy` is chosen by the runtime profile (:func:`rootfs_for`) when the pod
boots. It may give the VM devices (a share) and CreateSandbox storages, and per container it
yields the agent's Storage list, the guest path of the root and the spec's mounts with host
sources made guest paths (:class:`ContainerRootfs`); ``remove`` undoes one container's host
side, ``close`` the whole pod's. All host unmounts go through :mod:`shim.pod.mounts`, which
``delete`` uses too.

Today's strategy is :class:`HostShare` (development profile): one host directory per pod
exported over virtio-9p (tag ``kataShared``); each container's rootfs (the snapshot containerd
prepared) is mounted under it and the agent sees it at
``/run/kata-containers/shared/containers/<id>/rootfs``. Confidential profiles refuse host
sharing: their rootfs must come from inside the guest (guest image pull, the next strategy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final, Protocol

from hypervisor.cmdline import NinePShare, Share
from hypervisor.profile import RuntimeProfile
from protocols.api.kata import agent_pb2
from shim.core.errors import FailedPrecondition, Internal, InvalidArgument
from shim.pod.guest_spec import spec_mounts
from shim.pod.mounts import Mount, mount, remove_tree

SHARE_TAG: Final = "kataShared"
GUEST_SHARED: Final = PurePosixPath("/run/kata-containers/shared/containers")


@dataclass(frozen=True)
class ContainerRootfs:
    """What one container's CreateContainer needs from the rootfs strategy."""

    root_path: str  # the root as the agent sees it
    storages: tuple[agent_pb2.Storage, ...] = ()  # mounted by the agent before the container
    mounts: list[dict[str, Any]] = field(default_factory=list)  # the spec's, sources for the guest


class RootfsStrategy(Protocol):
    """The seam for rootfs delivery; one instance per pod VM."""

    def vm_shares(self) -> tuple[Share, ...]:
        """Host shares the VM is launched with."""
        ...

    def sandbox_storages(self) -> list[agent_pb2.Storage]:
        """Storages CreateSandbox mounts in the guest for the whole pod."""
        ...

    async def open(self) -> None:
        """Make the pod's host side (before the VM is launched)."""
        ...

    async def add(self, container_id: str, bundle: Path, spec: Mapping[str, object],
                  rootfs: Sequence[Mount]) -> ContainerRootfs:
        """Prepare one container from its OCI spec as containerd wrote it (annotations name
        its image, mounts name host paths) and the rootfs mounts containerd prepared; on
        failure nothing of it is left on the host."""
        ...

    async def remove(self, container_id: str) -> None:
        """Undo :meth:`add` on the host. Idempotent."""
        ...

    async def close(self) -> None:
        """Undo :meth:`open` and every :meth:`add`. Idempotent."""
        ...


def rootfs_for(profile: RuntimeProfile, pod_dir: Path) -> RootfsStrategy:
    """The strategy a runtime profile calls for."""
    if profile.tee.confidential:
        raise FailedPrecondition(
            f"runtime profile {profile.source} is confidential ({profile.tee.value}): it "
            "refuses host filesystem sharing, and guest image pull is not implemented yet")
    return HostShare(pod_dir / "shared")


def _is_bind(entry: Mapping[str, Any]) -> bool:
    options = entry.get("options") or []
    return entry.get("type") in ("bind", "rbind") or "bind" in options or "rbind" in options


class HostShare:
    """Host → guest rootfs over one virtio-9p export per pod (development profile)."""

    def __init__(self, host_dir: Path) -> None:
        self.host_dir = host_dir

    def vm_shares(self) -> tuple[Share, ...]:
        return (NinePShare(id="share0", tag=SHARE_TAG, path=self.host_dir),)

    def sandbox_storages(self) -> list[agent_pb2.Storage]:
        return [agent_pb2.Storage(driver="9p", source=SHARE_TAG, fstype="9p",
                                  options=["trans=virtio", "version=9p2000.L", "msize=262144",
                                           "cache=mmap"],
                                  mount_point=str(GUEST_SHARED))]

    async def open(self) -> None:
        self.host_dir.mkdir(mode=0o700)

    async def add(self, container_id: str, bundle: Path, spec: Mapping[str, object],
                  rootfs: Sequence[Mount]) -> ContainerRootfs:
        """Mount the container's rootfs and its host bind mounts under the share."""
        if len(rootfs) > 1:
            raise InvalidArgument(f"container {container_id}: {len(rootfs)} rootfs mounts "
                                  "given, only one is supported")
        base = self.host_dir / container_id
        try:
            (base / "rootfs").mkdir(parents=True)
        except FileExistsError as err:
            raise FailedPrecondition(f"container {container_id}: {base} exists") from err
        mounts = [dict(entry) for entry in spec_mounts(spec)]
        try:
            # containerd may leave the rootfs in the bundle (e.g. ctr run --rootfs).
            root = rootfs[0] if rootfs else Mount("bind", str(bundle / "rootfs"))
            await self._mount(container_id, "rootfs", root, base / "rootfs")
            for index, entry in enumerate(mounts):
                if not _is_bind(entry):
                    continue
                source = Path(str(entry.get("source", "")))
                name = f"mount-{index}-{source.name or 'root'}"
                self._bind_target(container_id, source, base / name)
                await self._mount(container_id, f"bind mount {source}",
                                  Mount("bind", str(source), options=("rbind",)), base / name)
                entry["source"] = str(GUEST_SHARED / container_id / name)
        except BaseException:
            await self.remove(container_id)
            raise
        return ContainerRootfs(root_path=str(GUEST_SHARED / container_id / "rootfs"),
                               mounts=mounts)

    @staticmethod
    async def _mount(container_id: str, what: str, mnt: Mount, target: Path) -> None:
        try:
            await mount(mnt, target)
        except OSError as err:
            raise Internal(f"container {container_id}: mounting its {what} failed: "
                           f"{err}") from err

    @staticmethod
    def _bind_target(container_id: str, source: Path, host: Path) -> None:
        """Create the file or directory a host bind mount is mounted onto."""
        if not source.is_absolute() or not source.exists():
            raise InvalidArgument(f"container {container_id}: bind mount source {source} does "
                                  "not exist on the host")
        if source.is_dir():
            host.mkdir()
        else:
            host.touch()

    async def remove(self, container_id: str) -> None:
        base = self.host_dir / container_id
        if base.exists():
            remove_tree(base)

    async def close(self) -> None:
        if self.host_dir.exists():
            remove_tree(self.host_dir)
