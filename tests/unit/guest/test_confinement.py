"""Host-chosen paths stay beneath the shared root: CopyFile targets (never through a symlink the
host planted), container roots, and the agent's own state outside it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from guest.agent.errors import InvalidArgument, NotFound, PermissionDenied
from guest.agent.reaper import Reaper
from guest.agent.sandbox import AgentPaths, FileCopy, Sandbox


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    paths = AgentPaths(state_dir=tmp_path / "state", shared_root=tmp_path / "shared")
    paths.shared_root.mkdir()
    return Sandbox(Reaper(), paths, manage_system=False)


def copy(path: Path | str, data: bytes = b"x", mode: int = stat.S_IFREG | 0o644) -> FileCopy:
    return FileCopy(
        path=str(path), file_size=len(data), file_mode=mode, dir_mode=0o755,
        uid=-1, gid=-1, offset=0, data=data,
    )  # fmt: skip


def test_writes_a_file_and_its_parents(sandbox: Sandbox) -> None:
    target = sandbox.paths.shared_root / "sandbox/etc/hostname"
    sandbox.copy_file(copy(target, b"pod\n"))
    assert target.read_bytes() == b"pod\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_planted_directory_symlink_is_not_followed(sandbox: Sandbox, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (sandbox.paths.shared_root / "link").symlink_to(outside)
    with pytest.raises(PermissionDenied, match="symlink"):
        sandbox.copy_file(copy(sandbox.paths.shared_root / "link/evil", b"owned"))
    assert list(outside.iterdir()) == []


def test_a_planted_file_symlink_is_replaced_not_followed(sandbox: Sandbox, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = sandbox.paths.shared_root / "resolv.conf"
    link.symlink_to(victim)
    sandbox.copy_file(copy(link, b"nameserver 198.18.0.1\n"))
    assert victim.read_bytes() == b"precious"
    assert not link.is_symlink() and link.read_bytes() == b"nameserver 198.18.0.1\n"


def test_a_later_chunk_refuses_a_symlink(sandbox: Sandbox, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = sandbox.paths.shared_root / "big"
    link.symlink_to(victim)
    chunk = copy(link, b"tail")
    with pytest.raises(PermissionDenied, match="symlink"):
        sandbox.copy_file(chunk._replace(offset=4))
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize(
    "path", ["/etc/evil", "relative", "{root}", "{root}/../x", "{root}/a/../../x"]
)
def test_paths_outside_the_root_are_refused(sandbox: Sandbox, path: str) -> None:
    with pytest.raises(PermissionDenied):
        sandbox.copy_file(copy(path.format(root=sandbox.paths.shared_root)))


def test_symlinks_and_directories_are_created_beneath_the_root(sandbox: Sandbox) -> None:
    root = sandbox.paths.shared_root
    sandbox.copy_file(copy(root / "cm/..2025_01", mode=stat.S_IFDIR | 0o755))
    sandbox.copy_file(copy(root / "cm/..data", b"..2025_01", mode=stat.S_IFLNK | 0o777))
    assert os.readlink(root / "cm/..data") == "..2025_01"
    assert (root / "cm/..2025_01").is_dir()
    # Writing through the link it just made is writing through a symlink: refused.
    with pytest.raises(PermissionDenied, match="symlink"):
        sandbox.copy_file(copy(root / "cm/..data/key", b"v"))


def test_container_roots_lie_beneath_the_shared_root(sandbox: Sandbox, tmp_path: Path) -> None:
    root = sandbox.paths.shared_root
    (root / "c1/rootfs").mkdir(parents=True)
    assert sandbox._container_root("c1", "") == root / "c1/rootfs"  # kata's relative layout
    assert sandbox._container_root("c1", "rootfs") == root / "c1/rootfs"
    assert sandbox._container_root("x", f"{root}/c1/rootfs/") == root / "c1/rootfs"
    with pytest.raises(PermissionDenied, match="beneath"):
        sandbox._container_root("c1", str(tmp_path))
    with pytest.raises(PermissionDenied, match="beneath"):
        sandbox._container_root("c1", "../../outside")
    (root / "c2").symlink_to(tmp_path)
    with pytest.raises(PermissionDenied, match="symlink"):
        sandbox._container_root("c2", "")
    with pytest.raises(NotFound, match="rootfs"):
        sandbox._container_root("c3", "")


def test_the_state_dir_may_not_lie_beneath_the_shared_root(tmp_path: Path) -> None:
    paths = AgentPaths(state_dir=tmp_path / "shared/state", shared_root=tmp_path / "shared")
    with pytest.raises(InvalidArgument, match="beneath the shared root"):
        Sandbox(Reaper(), paths, manage_system=False)
