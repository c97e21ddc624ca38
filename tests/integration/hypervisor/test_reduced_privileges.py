"""The wrappers a VM with a host share runs QEMU through (Fix 8, the 9p part), on the real
kernel: the nosuid seccomp filter, then setpriv to nobody with four capabilities (chown,
DAC override and read-search, fowner). What the process can and cannot do to files is what
QEMU's 9p server can do for a guest."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from hypervisor.cmdline import (
    SHARE_SERVER_GID,
    SHARE_SERVER_UID,
    NinePShare,
    ReducedPrivileges,
    SeccompSandbox,
)
from tests import envinfo

pytestmark = pytest.mark.integration

# As the wrapped process: each line says what happened (0 = the call succeeded).
PROBE = r"""
grep -E '^(Uid|Gid|Groups|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp_filters):' \
  /proc/self/status
cat secret >/dev/null; echo read-root-0600=$?
echo more >>secret; echo write-root-0600=$?
echo x >made; echo create=$?
chown 0:0 made; echo chown-root=$?
chown 0 made; echo chown-uid-0=$?
chgrp 0 made; echo chgrp-0=$?
chmod 4755 made; echo suid=$?
chmod 2755 made; echo sgid=$?
chmod 1755 made; echo sticky=$?
chmod 755 made; echo plain=$?
chmod 4755 secret; echo suid-root=$?
mknod dev c 1 3 2>/dev/null; echo mknod=$?
mkfifo fifo; echo mkfifo=$?
echo y >user; chown 1000:1000 user; echo chown-user=$?; chmod 640 user; echo chmod-user=$?
"""
# Creating with the bits set, through open/openat (what QEMU's 9p create does first).
CREATE = ("import os\n"
          "for m in (0o4755, 0o2755):\n"
          "    try:\n"
          "        os.close(os.open('c%o' % m, os.O_CREAT | os.O_WRONLY, m)); print('open', m)\n"
          "    except PermissionError:\n"
          "        pass\n")


def _wrapped(*argv: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    privileges = ReducedPrivileges()
    return subprocess.run([*privileges.guard_argv(), *privileges.to_argv(), *argv], cwd=cwd,
                          input=stdin, capture_output=True, text=True, timeout=30,
                          check=False)


def _results(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) if "=" in line else line.split(":", 1)
                for line in out.splitlines())


def test_the_wrapped_process_cannot_make_root_owned_setuid_or_device_files() -> None:
    envinfo.require(ReducedPrivileges().setpriv, "apt-get install util-linux")
    with tempfile.TemporaryDirectory(prefix="coco-priv-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o700)  # like a pod's run dir and containerd's snapshots: root's
        (work / "secret").write_text("root's\n")
        os.chmod(work / "secret", 0o600)
        done = _wrapped("/bin/sh", "-c", PROBE, cwd=work)
        created = _wrapped("/usr/bin/python3", "-I", "-c", CREATE, cwd=work)
        got = _results(done.stdout)
        assert got["Uid"].split() == [str(SHARE_SERVER_UID)] * 4, done
        assert got["Gid"].split() == [str(SHARE_SERVER_GID)] * 4, done
        assert got["Groups"].strip() == ""
        for name in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):  # chown, DAC both, fowner
            assert int(got[name], 16) == 0b1111, (name, got[name])
        assert got["NoNewPrivs"].strip() == "1" and int(got["Seccomp_filters"]) >= 1
        # Any file can be read and written (the guest's rootfs works) ...
        assert (got["read-root-0600"], got["write-root-0600"], got["create"]) == ("0",) * 3
        # chown to root "succeeds" without effect (as QEMU's none model treats owners).
        for allowed in ("sticky", "plain", "mkfifo", "chown-user", "chmod-user", "chgrp-0",
                        "chown-root", "chown-uid-0"):
            assert got[allowed] == "0", (allowed, done.stdout)  # a guest user's own files
        # ... but nothing becomes root's, setuid, setgid or a device.
        for refused in ("suid", "sgid", "suid-root", "mknod"):
            assert got[refused] != "0", (refused, done.stdout)
        assert created.returncode == 0 and created.stdout == "", created
        made = (work / "made").lstat()
        assert (made.st_uid, made.st_gid) == (SHARE_SERVER_UID, 0)  # chgrp 0 is allowed
        assert stat.S_IMODE(made.st_mode) == 0o755
        assert stat.S_IMODE((work / "secret").stat().st_mode) == 0o600
        user = (work / "user").lstat()
        assert (user.st_uid, user.st_gid, stat.S_IMODE(user.st_mode)) == (1000, 1000, 0o640)
        assert not (work / "dev").exists() and not list(work.glob("c*"))


def test_qemu_72_starts_unprivileged_with_the_sandbox_and_the_share() -> None:
    """QEMU itself accepts the wrappers (memfd, QEMU's own seccomp filter stacked on ours)."""
    with tempfile.TemporaryDirectory(prefix="coco-priv-") as tmp:
        share = Path(tmp) / "shared"
        share.mkdir(mode=0o700)
        done = _wrapped("qemu-system-x86_64", "-machine", "q35", "-accel", "tcg",
                        "-nodefaults", "-display", "none", *SeccompSandbox().to_argv(),
                        *NinePShare("fs0", "kataShared", share).to_argv(),
                        "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
                        "-S", "-monitor", "stdio", cwd=Path(tmp), stdin="quit\n")
    assert done.returncode == 0 and done.stderr == "", done
