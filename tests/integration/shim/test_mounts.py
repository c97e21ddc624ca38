"""Host mounts with real mount(8)/umount2(2): the one unmount path the daemon and ``delete``
share, and the host-share rootfs strategy (a mount failure is reported as such, nothing of the
container is left)."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from pathlib import Path

import pytest

from shim.core.errors import Internal, InvalidArgument
from shim.pod.mounts import Mount, mounts_under, remove_tree, unmount
from shim.pod.rootfs import GUEST_SHARED, HostShare

pytestmark = pytest.mark.integration


def test_file_bind_mount_on_the_same_filesystem_is_unmounted(tmp_path: Path) -> None:
    """A file bind-mounted from the same filesystem (CRI's resolv.conf, hostname, hosts) is a
    mount point too, though os.path.ismount() says otherwise."""
    source = tmp_path / "resolv.conf"
    source.write_text("nameserver 198.18.0.53\n")
    target = tmp_path / "share" / "mount-0-resolv.conf"
    target.parent.mkdir()
    target.touch()
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        assert not os.path.ismount(target)  # the trap
        assert mounts_under(target) == [target.resolve()]
        unmount(target)
        assert mounts_under(target) == []
        unmount(target)  # idempotent
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def test_remove_tree_never_descends_into_a_mounted_rootfs(tmp_path: Path) -> None:
    rootfs = tmp_path / "snapshot"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "keep").write_text("the container's data")
    pod = tmp_path / "pod"
    target = pod / "shared" / "c1" / "rootfs"
    target.mkdir(parents=True)
    subprocess.run(["mount", "--rbind", str(rootfs), str(target)], check=True)
    try:
        remove_tree(pod)
        assert not pod.exists()
        assert (rootfs / "etc" / "keep").read_text() == "the container's data"
    finally:
        subprocess.run(["umount", "-R", "-l", str(target)], capture_output=True, check=False)


def test_host_share_mounts_and_removes_a_container(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    (tmp_path / "pod").mkdir()
    share = HostShare(tmp_path / "pod" / "shared")

    async def run() -> None:
        await share.open()
        prepared = await share.add("c1", bundle, {"mounts": [
            {"destination": "/etc/hosts", "source": str(hosts), "type": "bind"},
            {"destination": "/proc", "source": "proc", "type": "proc"}]}, ())
        assert prepared.root_path == str(GUEST_SHARED / "c1" / "rootfs")
        assert prepared.mounts[0]["source"] == str(GUEST_SHARED / "c1" / "mount-0-hosts")
        assert prepared.mounts[1]["source"] == "proc"  # not a bind: left for the guest
        assert (share.host_dir / "c1" / "rootfs" / "bin").is_dir()
        assert len(mounts_under(share.host_dir / "c1")) == 2
        await share.remove("c1")
        assert not (share.host_dir / "c1").exists()
        await share.close()
        assert not share.host_dir.exists()

    asyncio.run(run())


def test_a_rootfs_mount_failure_is_reported_as_such(tmp_path: Path) -> None:
    share = HostShare(tmp_path / "shared")

    async def run() -> None:
        await share.open()
        broken = Mount("overlay", "overlay", options=(f"lowerdir={tmp_path / 'nope'}",))
        with pytest.raises(Internal, match="container c1: mounting its rootfs failed: mount"):
            await share.add("c1", tmp_path, {}, (broken,))
        assert not (share.host_dir / "c1").exists()
        with pytest.raises(InvalidArgument, match="bind mount source /nonexistent"):
            await share.add("c2", tmp_path, {"mounts": [
                {"destination": "/x", "source": "/nonexistent", "type": "bind"}]},
                (Mount("bind", str(tmp_path)),))
        assert not (share.host_dir / "c2").exists() and mounts_under(share.host_dir) == []
        await share.close()

    asyncio.run(run())


def test_remove_tree_never_removes_below_a_mount_it_could_not_unmount(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unmount that failed (or raced) must not turn into an rmtree of live data."""
    import shim.pod.mounts as mounts

    rootfs = tmp_path / "snapshot"
    rootfs.mkdir()
    (rootfs / "keep").write_text("live data")
    target = tmp_path / "pod" / "shared" / "c1" / "rootfs"
    target.mkdir(parents=True)
    subprocess.run(["mount", "--rbind", str(rootfs), str(target)], check=True)
    monkeypatch.setattr(mounts, "unmount", lambda directory: None)  # the failed unmount
    try:
        with pytest.raises(OSError, match=r"still mounted below it: .*c1/rootfs"):
            remove_tree(tmp_path / "pod")
        assert (rootfs / "keep").read_text() == "live data"
        assert (target / "keep").exists()
    finally:
        subprocess.run(["umount", "-R", "-l", str(target)], capture_output=True, check=False)


def test_a_read_only_bind_is_read_only_on_the_host_side_of_the_share(tmp_path: Path) -> None:
    """An ``ro`` bind mount (and what is mounted below its source) cannot be written through
    the host directory QEMU exports."""
    source = tmp_path / "data"
    (source / "sub").mkdir(parents=True)
    inner = tmp_path / "inner"
    inner.mkdir()
    subprocess.run(["mount", "--bind", str(inner), str(source / "sub")], check=True)
    writable = tmp_path / "scratch"
    writable.mkdir()
    share = HostShare(tmp_path / "pod" / "shared")
    (tmp_path / "pod").mkdir()

    async def run() -> None:
        await share.open()
        prepared = await share.add("c1", tmp_path, {"mounts": [
            {"destination": "/data", "source": str(source), "type": "bind",
             "options": ["rbind", "ro"]},
            {"destination": "/scratch", "source": str(writable), "type": "bind",
             "options": ["rbind", "rw"]}]}, (Mount("bind", str(tmp_path / "snapshot")),))
        host = share.host_dir / "c1"
        ro, rw = (host / Path(m["source"]).name for m in prepared.mounts)
        try:
            for path in (ro / "new", ro / "sub" / "new"):
                with pytest.raises(OSError) as err:
                    path.write_text("x")
                assert err.value.errno == errno.EROFS
            (rw / "new").write_text("ok")  # rw binds stay writable
            assert (writable / "new").read_text() == "ok"
        finally:
            await share.close()
        assert not share.host_dir.exists()

    (tmp_path / "snapshot").mkdir()
    try:
        asyncio.run(run())
    finally:
        subprocess.run(["umount", "-l", str(source / "sub")], capture_output=True, check=False)
