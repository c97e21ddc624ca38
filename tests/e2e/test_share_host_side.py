"""The development profile's 9p share, seen from the host: a root container in the guest
cannot make root-owned, setuid, setgid or device files on the host through its rootfs or a
writable bind mount, a read-only bind mount stays read-only on the host side (even after the
guest remounts it read-write), and the container still works (busybox's symlinks, writes,
a non-root user's own files).

One VM, one containerd (2.1.9): what is tested is QEMU's side of the share, which does not
depend on containerd's version."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisor.cmdline import SHARE_SERVER_GID, SHARE_SERVER_UID
from tests.e2e.conftest import CocoContainerd

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("coco", ["2.1.9"], indirect=True)]

# Run as root in the guest (privileged: it may also remount its read-only bind read-write).
ATTACK = r"""
for d in /rw ""; do
  echo data > $d/made; echo write$d=$?
  chown 0:0 $d/made; chmod 4755 $d/made; echo suid$d=$?; chmod g+s $d/made; echo sgid$d=$?
  mknod $d/mem c 1 1 2>/dev/null; echo mknod$d=$?
  mkdir $d/dir && chown 0:0 $d/dir && chmod 6777 $d/dir
done
cp /bin/busybox /copy && chmod 4755 /copy
chmod 4755 /bin/busybox; echo chmod-image=$?
chown 0:0 /tmp; echo chown-image-dir=$?
cat /made /rw/made
echo sh=$(readlink /bin/sh)
mkdir /home1000 && chown 1000:1000 /home1000; echo chown-user=$?
touch /ro/new 2>/dev/null; echo ro-write=$?
mount -o remount,bind,rw /ro; echo remount=$?
echo x > /ro/new; echo ro-write-after-remount=$?
echo x > /ro/keep; echo ro-overwrite=$?
"""
# As user 1000: what it creates stays its own (it can reopen, append, create inside).
NONROOT = r"""
mkdir /home1000/d && echo a >/home1000/d/f && echo b >>/home1000/d/f && cat /home1000/d/f
echo nonroot=$?
echo c >/tmp/f1000 && echo d >>/tmp/f1000; echo nonroot-tmp=$?
"""


def _result(out: str, key: str) -> str:
    for line in out.splitlines():
        if line.startswith(key + "="):
            return line.split("=", 1)[1]
    raise AssertionError(f"no {key}= in the container's output:\n{out}")


@pytest.fixture
def share_dirs(coco: CocoContainerd) -> Iterator[tuple[Path, Path]]:
    base = coco.base / f"binds-{uuid.uuid4().hex[:6]}"
    rw, ro = base / "rw", base / "ro"
    rw.mkdir(parents=True)
    ro.mkdir()
    (ro / "keep").write_text("original\n")
    yield rw, ro


def test_a_root_guest_cannot_make_root_or_setuid_files_on_the_host(
        coco: CocoContainerd, share_dirs: tuple[Path, Path]) -> None:
    rw, ro = share_dirs
    cid = f"share-{uuid.uuid4().hex[:6]}"
    coco.run(cid, "sleep", "600", flags=(
        "-d", "--privileged",
        "--mount", f"type=bind,src={rw},dst=/rw,options=rbind:rw",
        "--mount", f"type=bind,src={ro},dst=/ro,options=rbind:ro"))
    try:
        out = coco.ctr("task", "exec", "--exec-id", "attack", cid, "sh", "-c", ATTACK,
                       check=False).stdout.decode()
        # The container works: busybox's host-native symlinks resolve, writes land.
        assert _result(out, "sh") in ("busybox", "/bin/busybox"), out
        assert _result(out, "write") == "0" and _result(out, "write/rw") == "0", out
        assert out.count("data") >= 2, out
        # Setuid/setgid bits are refused, on the guest's own files and on root's.
        for key in ("suid", "sgid", "suid/rw", "sgid/rw", "chmod-image"):
            assert _result(out, key) != "0", (key, out)
        # A read-only bind stays read-only, also when the guest remounts it read-write.
        assert _result(out, "ro-write") != "0", out
        assert _result(out, "ro-write-after-remount") != "0", out
        assert _result(out, "ro-overwrite") != "0", out
        assert _result(out, "chown-user") == "0", out
        user = coco.ctr("task", "exec", "--exec-id", "user", "--user", "1000:1000", cid,
                        "sh", "-c", NONROOT, check=False).stdout.decode()
        assert _result(user, "nonroot") == "0" and "a\nb\n" in user, user
        assert _result(user, "nonroot-tmp") == "0", user

        # On the host, while the container runs: its rootfs as the share exports it.
        shared = coco.pod_dir(cid) / "shared" / cid
        rootfs = shared / "rootfs"
        assert (rootfs / "bin" / "busybox").is_file(), list(shared.iterdir())
        for made in (rootfs / "made", rw / "made", rootfs / "copy", rootfs / "dir",
                     rw / "dir"):
            info = made.lstat()
            assert (info.st_uid, info.st_gid) == (SHARE_SERVER_UID, SHARE_SERVER_GID), made
        assert (rootfs / "made").read_text() == "data\n"
        for mine in (rootfs / "home1000" / "d" / "f", rootfs / "tmp" / "f1000"):
            info = mine.lstat()
            assert (info.st_uid, info.st_gid) == (1000, 1000), mine
        for tree in (rootfs, rw):
            for path in (tree, *tree.rglob("*")):
                info = path.lstat()
                mode = info.st_mode
                assert not mode & (stat.S_ISUID | stat.S_ISGID), f"setuid/setgid: {path}"
                assert not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)), f"device: {path}"
        assert not (rootfs / "mem").exists() and not (rw / "mem").exists()
        assert stat.S_IMODE((rootfs / "bin" / "busybox").stat().st_mode) & 0o6000 == 0

        # The read-only bind: untouched, and read-only on the host side of the share.
        assert sorted(p.name for p in ro.iterdir()) == ["keep"]
        assert (ro / "keep").read_text() == "original\n"
        [ro_host] = [p for p in shared.iterdir() if p.name.endswith("-ro")]
        assert os.statvfs(ro_host).f_flag & os.ST_RDONLY, ro_host

        # Why: QEMU (the 9p server) runs as the share's uid/gid, no groups, with four
        # capabilities (see hypervisor.cmdline.ReducedPrivileges).
        marker = str(coco.pod_dir(cid)).encode()
        pids = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
                if _is_qemu_of(pid, marker)]
        assert len(pids) == 1, pids
        status = dict(line.split(":", 1) for line in
                      Path(f"/proc/{pids[0]}/status").read_text().splitlines())
        assert status["Uid"].split() == [str(SHARE_SERVER_UID)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(SHARE_SERVER_GID)] * 4, status["Gid"]
        assert status["Groups"].strip() == ""
        # CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER; nothing else.
        for name in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[name], 16) == 0b1111, (name, status[name])
        assert status["NoNewPrivs"].strip() == "1"
    finally:
        coco.ctr("task", "rm", "-f", cid, check=False)
        coco.ctr("container", "rm", cid, check=False)


def _is_qemu_of(pid: int, marker: bytes) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return cmdline.split(b"\0")[0].endswith(b"qemu-system-x86_64") and marker in cmdline

