"""Host mounts of a pod, and the one way they are undone (by the daemon and by ``delete``).

``mount`` runs mount(8) (it knows every filesystem's option syntax); ``unmount`` and
``remove_tree`` use umount2(2) through libc, deepest mount point first, lazily only when busy,
and are synchronous and cheap to import so that ``delete`` (a short-lived process) shares them.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

MNT_DETACH: Final = 2


@dataclass(frozen=True)
class Mount:
    """containerd.types.Mount: a rootfs mount containerd prepared on the host."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


async def mount(mnt: Mount, target: Path) -> None:
    """Mount ``mnt`` on ``target`` (a bind becomes an rbind, as runc does); OSError says why."""
    fstype = "none" if mnt.type in ("bind", "rbind", "") else mnt.type
    options = list(mnt.options)
    if mnt.type in ("bind", "rbind") and not {"bind", "rbind"} & set(options):
        options.append("rbind")
    argv = ["mount", "-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    argv += [mnt.source, str(target)]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {err.decode(errors='replace').strip()}")


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below ``directory``, deepest first (from /proc/self/mountinfo).

    os.path.ismount() misses a file bind-mounted from the same filesystem (same st_dev, as
    CRI's resolv.conf/hostname/hosts usually are): mountinfo knows every mount point."""
    prefix = os.fsencode(directory.resolve())
    found: list[bytes] = []
    # Unreadable mountinfo raises: "no mounts" is never assumed before a removal.
    with open("/proc/self/mountinfo", "rb") as info:
        for line in info:
            fields = line.split()
            if len(fields) > 4:
                # mountinfo escapes space, tab, newline and backslash as octal (\040 …).
                point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4])
                if point == prefix or point.startswith(prefix + b"/"):
                    found.append(point)
    return [Path(os.fsdecode(p)) for p in sorted(found, key=len, reverse=True)]


def unmount(target: Path) -> None:
    """Unmount ``target`` and everything below it, deepest first; a busy mount is detached
    lazily. Idempotent (nothing mounted is fine); another failure raises OSError."""
    import ctypes  # libc is already mapped into the interpreter

    libc = ctypes.CDLL(None, use_errno=True)
    for point in mounts_under(target):
        for flags in (0, MNT_DETACH):
            if libc.umount2(os.fsencode(point), flags) == 0:
                break
            code = ctypes.get_errno()
            if code in (errno.EINVAL, errno.ENOENT):  # not (or no longer) a mount point
                break
            if code != errno.EBUSY or flags == MNT_DETACH:
                raise OSError(code, f"umount {point}: {os.strerror(code)}")


async def remount_read_only(target: Path) -> None:
    """Make ``target`` and every mount below it read-only on the host (an ``ro`` bind): a bind
    mount takes ``ro`` only through a remount, and ``rbind`` copies submounts writable."""
    for point in reversed(mounts_under(target)):  # the top first, then what is below it
        await mount(Mount("none", "none", options=("remount", "bind", "ro")), point)


def remove_tree(directory: Path) -> None:
    """Unmount everything below ``directory``, then remove it: a rootfs mounted inside is
    detached first, so the removal never descends into a container's filesystem. If a mount
    is still there afterwards (an unmount that failed or raced), nothing is removed: OSError
    names the mounts, and the caller reports it."""
    unmount(directory)
    left = mounts_under(directory)
    if left:
        raise OSError(errno.EBUSY, f"not removing {directory}: still mounted below it: "
                      + ", ".join(str(point) for point in left))
    shutil.rmtree(directory, ignore_errors=True)
