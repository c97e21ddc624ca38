"""Storage option parsing and driver selection (mounting itself is covered in the VM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest.agent import mounts
from guest.agent.errors import InvalidArgument, NotFound, Unimplemented
from guest.agent.storage import StorageManager, StorageSpec


def test_parse_options_splits_flags_and_data() -> None:
    flags, data = mounts.parse_options(["ro", "nodev,trans=virtio", "version=9p2000.L", "rw", "ro"])
    assert flags == mounts.MS_RDONLY | mounts.MS_NODEV
    assert data == "trans=virtio,version=9p2000.L"
    assert mounts.parse_options(["rbind"])[0] == mounts.MS_BIND | mounts.MS_REC


def spec(driver: str, mount_point: str, source: str = "x") -> StorageSpec:
    return StorageSpec(driver=driver, source=source, fstype="", options=(), mount_point=mount_point)


def test_refusals(tmp_path: Path) -> None:
    manager = StorageManager()
    with pytest.raises(InvalidArgument, match="unknown storage driver"):
        manager.add(spec("floppy", str(tmp_path / "a")))
    with pytest.raises(Unimplemented):
        manager.add(spec("image_guest_pull", str(tmp_path / "b")))
    with pytest.raises(InvalidArgument, match="absolute"):
        manager.add(spec("local", "relative/path"))
    with pytest.raises(NotFound):
        manager.add(spec("blk", str(tmp_path / "c"), source="/dev/nonexistent-disk"))
    assert manager.mount_points == []
    assert not (tmp_path / "a").exists()  # directories it created are removed again


def test_local_storage_is_reference_counted(tmp_path: Path) -> None:
    manager = StorageManager()
    point = str(tmp_path / "empty-dir")
    manager.add_all([spec("local", point)])
    manager.add(spec("local", point))
    manager.release(point)
    assert Path(point).is_dir()
    manager.release(point)
    assert not Path(point).exists()
    assert manager.mount_points == []


def test_add_all_is_all_or_nothing(tmp_path: Path) -> None:
    manager = StorageManager()
    with pytest.raises(InvalidArgument):
        manager.add_all(
            [spec("local", str(tmp_path / "ok")), spec("floppy", str(tmp_path / "bad"))]
        )
    assert manager.mount_points == []
    assert not (tmp_path / "ok").exists()
