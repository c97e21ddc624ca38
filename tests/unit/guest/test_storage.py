"""Storage option parsing and driver selection (mounting itself is covered in the VM)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from guest.agent import mounts
from guest.agent.errors import InvalidArgument, NotFound, PermissionDenied, Unimplemented
from guest.agent.storage import StorageManager, StorageSpec


def test_parse_options_splits_flags_and_data() -> None:
    flags, data = mounts.parse_options(["ro", "nodev,trans=virtio", "version=9p2000.L", "rw", "ro"])
    assert flags == mounts.MS_RDONLY | mounts.MS_NODEV
    assert data == "trans=virtio,version=9p2000.L"
    assert mounts.parse_options(["rbind"])[0] == mounts.MS_BIND | mounts.MS_REC


def spec(driver: str, mount_point: str, source: str = "x") -> StorageSpec:
    return StorageSpec(driver=driver, source=source, fstype="", options=(), mount_point=mount_point)


async def test_refusals(tmp_path: Path) -> None:
    manager = StorageManager(tmp_path)
    with pytest.raises(InvalidArgument, match="unknown storage driver"):
        manager.add(spec("floppy", str(tmp_path / "a")))
    with pytest.raises(Unimplemented, match="no image puller"):
        await manager.add_all([spec("image_guest_pull", str(tmp_path / "b"))], "c1")
    with pytest.raises(InvalidArgument, match="absolute"):
        manager.add(spec("local", "relative/path"))
    for outside in ("/etc", str(tmp_path), f"{tmp_path}/../x", f"{tmp_path}/a/../../x"):
        with pytest.raises(PermissionDenied, match="beneath"):
            manager.add(spec("ephemeral", outside))
    with pytest.raises(NotFound):
        manager.add(spec("blk", str(tmp_path / "c"), source="/dev/nonexistent-disk"))
    assert manager.mount_points == []
    assert not (tmp_path / "a").exists()  # directories it created are removed again


def test_local_storage_is_reference_counted(tmp_path: Path) -> None:
    manager = StorageManager(tmp_path)
    point = str(tmp_path / "empty-dir")
    asyncio.run(manager.add_all([spec("local", point)]))
    manager.add(spec("local", point))
    manager.release(point)
    assert Path(point).is_dir()
    manager.release(point)
    assert not Path(point).exists()
    assert manager.mount_points == []


async def test_add_all_is_all_or_nothing(tmp_path: Path) -> None:
    manager = StorageManager(tmp_path)
    with pytest.raises(InvalidArgument):
        await manager.add_all(
            [spec("local", str(tmp_path / "ok")), spec("floppy", str(tmp_path / "bad"))]
        )
    assert manager.mount_points == []
    assert not (tmp_path / "ok").exists()


def test_a_symlink_on_the_way_to_a_mount_point_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    agent_files = tmp_path / "agent-state"
    agent_files.mkdir()
    root.mkdir()
    (root / "planted").symlink_to(agent_files)
    manager = StorageManager(root)
    with pytest.raises(PermissionDenied, match="symlink"):
        manager.add(spec("local", f"{root}/planted/over"))
    with pytest.raises(PermissionDenied, match="symlink"):
        manager.add(spec("local", f"{root}/planted"))
    assert list(agent_files.iterdir()) == []
    assert manager.mount_points == []


def test_mount_points_are_normalised(tmp_path: Path) -> None:
    manager = StorageManager(tmp_path)
    assert manager.add(spec("local", f"{tmp_path}/a/./b/")) == f"{tmp_path}/a/b"
    assert manager.add(spec("local", f"{tmp_path}/a/b")) == f"{tmp_path}/a/b"
    manager.release_all([f"{tmp_path}/a/b", f"{tmp_path}/a/b"])
    assert not (tmp_path / "a/b").exists()
