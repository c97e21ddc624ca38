"""How a container's root filesystem reaches the guest: a strategy per profile kind.

A :class:`RootfsStrategy` is chosen by the runtime profile (:func:`rootfs_for`) when the pod
boots. It may give the VM devices (a share) and CreateSandbox storages, and per container it
yields the agent's Storage list, the guest path of the root and the spec's mounts with host
sources made guest paths (:class:`ContainerRootfs`); ``remove`` undoes one container's host
side, ``close`` the whole pod's. All host unmounts go through :mod:`shim.pod.mounts`, which
``delete`` uses too.

:class:`HostShare` (development profile): one host directory per pod exported over virtio-9p
(tag ``kataShared``); each container's rootfs (the snapshot containerd prepared) is mounted
under it and the agent sees it at ``/run/kata-containers/shared/containers/<id>/rootfs``.

:class:`GuestPull` (every confidential profile, coco-dev included): the image is pulled,
verified and unpacked inside the guest. Each container gets the Storage kata builds for it
(driver ``image_guest_pull``), so upstream guests work; nothing of the host snapshot is
mounted, shared or opened, and host bind mounts are not passed on (they would name host files
the guest cannot see).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final, Protocol

from hypervisor.cmdline import NinePShare, Share
from hypervisor.profile import RuntimeProfile
from protocols.api.kata import agent_pb2
from shim.core.errors import FailedPrecondition, Internal, InvalidArgument
from shim.pod.guest_spec import annotations_of, for_guest_annotations, spec_mounts
from shim.pod.mounts import Mount, mount, remount_read_only, remove_tree

log = logging.getLogger(__name__)

SHARE_TAG: Final = "kataShared"
GUEST_SHARED: Final = PurePosixPath("/run/kata-containers/shared/containers")
GUEST_CONTAINERS: Final = PurePosixPath("/run/kata-containers")
GUEST_PULL_DRIVER: Final = "image_guest_pull"
IMAGE_NAME_ANNOTATION: Final = "io.kubernetes.cri.image-name"
CONTAINER_TYPE_ANNOTATION: Final = "io.kubernetes.cri.container-type"
PAUSE_SOURCE: Final = "pause"  # kata: the sandbox container's image is the guest's own pause


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
    """The strategy a runtime profile calls for: guest pull for every confidential profile
    (TEE or coco-dev), the 9p host share for development ones."""
    if profile.confidential:
        return GuestPull()
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
                if "ro" in (entry.get("options") or []):
                    # Read-only on the host side of the share too: the guest's own ro bind
                    # is only as good as the guest.
                    await self._read_only(container_id, source, base / name)
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
    async def _read_only(container_id: str, source: Path, target: Path) -> None:
        try:
            await remount_read_only(target)
        except OSError as err:
            raise Internal(f"container {container_id}: making bind mount {source} read-only "
                           f"failed: {err}") from err

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


class GuestPull:
    """The image is pulled in the guest: the host only names it (confidential profiles).

    The Storage is kata's (runtime/virtcontainers ``handleImageGuestPullBlockVolume``):
    ``driver`` ``image_guest_pull``, ``driver_options`` ``["image_guest_pull=" + JSON
    {"metadata": annotations}]``, ``source`` the image reference (the literal ``pause`` for a
    CRI sandbox container), ``fstype`` ``overlay``, ``mount_point``
    ``/run/kata-containers/<cid>/rootfs``, which is the guest spec's root too.
    """

    def vm_shares(self) -> tuple[Share, ...]:
        return ()

    def sandbox_storages(self) -> list[agent_pb2.Storage]:
        return []

    async def open(self) -> None:
        return None

    async def add(self, container_id: str, bundle: Path, spec: Mapping[str, object],
                  rootfs: Sequence[Mount]) -> ContainerRootfs:
        """The Storage for ``container_id``; ``bundle`` and ``rootfs`` (the host snapshot) are
        deliberately left untouched."""
        del bundle, rootfs
        storage = guest_pull_storage(container_id, annotations_of(spec))
        mounts: list[dict[str, Any]] = []
        dropped: list[str] = []
        for entry in spec_mounts(spec):
            if _is_bind(entry):
                dropped.append(str(entry.get("destination", "?")))
            else:
                mounts.append(dict(entry))
        if dropped:
            log.info("container %s: host bind mounts not passed to the confidential guest: %s",
                     container_id, ", ".join(dropped))
        return ContainerRootfs(root_path=storage.mount_point, storages=(storage,),
                               mounts=mounts)

    async def remove(self, container_id: str) -> None:
        return None  # nothing on the host; the agent's RemoveContainer unmounts the overlay

    async def close(self) -> None:
        return None


def guest_pull_storage(container_id: str, annotations: Mapping[str, str]) -> agent_pb2.Storage:
    """Kata's guest-pull Storage for one container. No image reference is InvalidArgument
    naming the annotation (``ctr run`` users pass ``--annotation
    io.kubernetes.cri.image-name=<ref>``)."""
    if annotations.get(CONTAINER_TYPE_ANNOTATION) == "sandbox":
        source = PAUSE_SOURCE
    else:
        source = annotations.get(IMAGE_NAME_ANNOTATION, "")
        if not source:
            raise InvalidArgument(
                f"container {container_id}: no image reference for the guest to pull: the "
                f"annotation {IMAGE_NAME_ANNOTATION} is missing (CRI sets it; with ctr run pass "
                f"--annotation {IMAGE_NAME_ANNOTATION}=<ref>)")
    metadata = for_guest_annotations(annotations)
    mount_point = str(GUEST_CONTAINERS / container_id / "rootfs")
    return agent_pb2.Storage(
        driver=GUEST_PULL_DRIVER,
        driver_options=[f"{GUEST_PULL_DRIVER}=" + json.dumps({"metadata": metadata})],
        source=source, fstype="overlay", mount_point=mount_point)
