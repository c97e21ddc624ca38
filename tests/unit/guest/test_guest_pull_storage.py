"""The image_guest_pull storage handler in the StorageManager: validation, the pause bundle,
and nothing left behind when a pull fails (the overlay itself is covered on the host and in
the VM by the integration tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guest.agent.errors import DataLoss, InvalidArgument, PermissionDenied
from guest.agent.storage import StorageManager, StorageSpec
from guest.image.build import write_pause_bundle
from guest.image_pull.config import PullConfig
from guest.image_pull.puller import GuestPullStorage, ImagePuller, PulledImage


class FailingPuller(ImagePuller):
    async def pull(self, reference: str) -> PulledImage:
        raise DataLoss(f"image {reference}: layer sha256:abc: content has digest sha256:def")


def storage(mount_point: Path, *, sandbox: bool = False, source: str = "reg.test/app:1",
            ) -> StorageSpec:
    kind = "sandbox" if sandbox else "container"
    option = json.dumps({"metadata": {"io.kubernetes.cri.container-type": kind}})
    return StorageSpec(driver="image_guest_pull", source="pause" if sandbox else source,
                       fstype="overlay", options=(), mount_point=str(mount_point),
                       driver_options=(f"image_guest_pull={option}",))


@pytest.fixture
def manager(tmp_path: Path) -> StorageManager:
    bundle = tmp_path / "pause_bundle"
    (tmp_path / "pause-program").write_bytes(b"\x7fELF pause")
    write_pause_bundle(bundle, tmp_path / "pause-program")
    (tmp_path / "shared").mkdir()
    handler = GuestPullStorage(
        lambda: FailingPuller(PullConfig(work_dir=tmp_path / "images")), tmp_path / "shared",
        bundle)
    return StorageManager(tmp_path / "shared", handler)


async def test_the_sandbox_gets_the_pause_bundle_and_gives_it_back(
    manager: StorageManager, tmp_path: Path
) -> None:
    point = tmp_path / "shared/pod/rootfs"
    mounted = await manager.add_all([storage(point, sandbox=True)], "pod")
    assert (point / "pause").read_bytes() == b"\x7fELF pause"
    rootfs = manager.guest_rootfs(mounted)
    assert rootfs is not None
    spec = rootfs.apply({"process": {"args": ["/app"]}, "root": {"path": "x"}})
    assert spec["process"]["args"] == ["/pause", "-P"] and spec["root"]["path"] == str(point)
    manager.release_all(mounted)
    assert not (tmp_path / "shared/pod").exists() and manager.mount_points == []


async def test_a_failed_pull_leaves_nothing(manager: StorageManager, tmp_path: Path) -> None:
    point = tmp_path / "shared/c1/rootfs"
    with pytest.raises(DataLoss, match="sha256:abc"):
        await manager.add_all([storage(point)], "c1")
    assert not (tmp_path / "shared/c1").exists() and manager.mount_points == []


async def test_mount_points_outside_the_shared_root_or_in_use_are_refused(
    manager: StorageManager, tmp_path: Path
) -> None:
    with pytest.raises(PermissionDenied, match="beneath"):
        await manager.add_all([storage(tmp_path / "elsewhere/rootfs")], "c1")
    (tmp_path / "shared/link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(PermissionDenied):  # never through a symlink the host planted
        await manager.add_all([storage(tmp_path / "shared/link/rootfs", sandbox=True)], "c5")
    assert not (tmp_path / "elsewhere/rootfs").exists()
    busy = tmp_path / "shared/c2/rootfs"
    busy.mkdir(parents=True)
    (busy / "file").write_text("x")
    with pytest.raises(InvalidArgument, match="in use"):
        await manager.add_all([storage(busy)], "c2")
    assert (busy / "file").exists()
    with pytest.raises(InvalidArgument, match="outside CreateContainer"):
        await manager.add_all([storage(tmp_path / "shared/c3/rootfs")])
    with pytest.raises(InvalidArgument, match="image reference"):
        await manager.add_all([storage(tmp_path / "shared/c4/rootfs", source="")], "c4")
