"""Run QEMU 11.1 from the Debian sid root (chroot) for option-parsing and QOM checks.

``-accel kvm`` needs /dev (and /proc) inside the root: those bind mounts are made in a
private mount namespace (``unshare --mount --propagation private``), so they disappear with
the process and never leak onto the host even if a test is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

from hypervisor.monitor import QmpMonitor

GUEST_FILES = ("vmlinuz", "initrd.img", "vmlinuz-confidential", "initrd-confidential.img",
               "vmlinux-confidential", "kata-containers-se.img")

_RUN_IN_ROOT = 'mount --bind /dev "$0/dev" && mount --bind /proc "$0/proc" && exec chroot "$0" "$@"'


@contextlib.contextmanager
def guest_dir(root: Path) -> Iterator[Path]:
    """Placeholder (empty) guest files inside the root; yields the path as QEMU sees it."""
    host = Path(tempfile.mkdtemp(prefix="coco-hv-", dir=root / "tmp"))
    try:
        for name in GUEST_FILES:
            (host / name).touch()
        (host / "run").mkdir()  # per-VM run directory (console log, QMP socket)
        yield Path("/") / host.relative_to(root)
    finally:
        shutil.rmtree(host, ignore_errors=True)


def run_in_root(root: Path, argv: Sequence[str], pass_fds: Sequence[int] = (),
                timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` chrooted in ``root`` with /dev and /proc bound (private mount ns)."""
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", _RUN_IN_ROOT,
         str(root), *argv],
        capture_output=True, text=True, timeout=timeout, pass_fds=tuple(pass_fds),
    )


def mounts_under(root: Path) -> list[str]:
    prefix = str(root.resolve())
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(prefix)]


@contextlib.asynccontextmanager
async def qmp_none_machine(root: Path, binary: str) -> AsyncIterator[QmpMonitor]:
    """A ``-machine none`` QEMU in the root, with its QMP socket reachable from the host."""
    host_dir = Path(tempfile.mkdtemp(prefix="coco-qmp-", dir=root / "tmp"))
    inside = Path("/") / host_dir.relative_to(root) / "qmp.sock"
    proc = await asyncio.create_subprocess_exec(
        "chroot", str(root), binary, "-machine", "none", "-accel", "tcg", "-nodefaults",
        "-display", "none", "-qmp", f"unix:{inside},server=on,wait=off",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    monitor = QmpMonitor("qom")
    try:
        async with asyncio.timeout(10):
            while not (host_dir / "qmp.sock").exists():
                if proc.returncode is not None:
                    raise RuntimeError(f"{binary} exited: {await proc.stderr.read()!r}"
                                       if proc.stderr else binary)
                await asyncio.sleep(0.02)
        await monitor.connect(host_dir / "qmp.sock")
        yield monitor
    finally:
        await monitor.close()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        shutil.rmtree(host_dir, ignore_errors=True)


def option_groups(argv: Sequence[str]) -> list[tuple[str, str, set[str]]]:
    """(option, type, property names) for every -machine/-object/-device in argv."""
    groups = []
    for opt, value in itertools.pairwise(argv):
        if opt not in ("-machine", "-accel", "-object", "-device"):
            continue
        if value.startswith("{"):
            obj = json.loads(value)
            groups.append((opt, obj["qom-type"], set(obj) - {"qom-type", "id"}))
            continue
        head, *pairs = value.replace(",,", "\0").split(",")
        keys = {p.split("=", 1)[0] for p in pairs} - {"id"}
        groups.append((opt, head, keys))
    return groups
