"""mount(2)/umount2(2) through libc, with errno turned into typed errors."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

from guest.agent.errors import from_os_error

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# Options that are flags; anything else goes into the filesystem's data string.
FLAG_OPTIONS: dict[str, tuple[int, bool]] = {  # name -> (flag, set?)
    "ro": (MS_RDONLY, True),
    "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True),
    "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True),
    "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True),
    "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True),
    "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True),
    "remount": (MS_REMOUNT, True),
    "mand": (MS_MANDLOCK, True),
    "noatime": (MS_NOATIME, True),
    "nodiratime": (MS_NODIRATIME, True),
    "bind": (MS_BIND, True),
    "rbind": (MS_BIND | MS_REC, True),
    "relatime": (MS_RELATIME, True),
    "strictatime": (MS_STRICTATIME, True),
    "defaults": (0, True),
}


def parse_options(options: Sequence[str]) -> tuple[int, str]:
    """(mount flags, data string) for fstab-style options."""
    flags = 0
    data: list[str] = []
    for option in options:
        for part in option.split(","):
            part = part.strip()
            if not part:
                continue
            known = FLAG_OPTIONS.get(part)
            if known is None:
                data.append(part)
            elif known[1]:
                flags |= known[0]
            else:
                flags &= ~known[0]
    return flags, ",".join(data)


_libc = ctypes.CDLL(None, use_errno=True)


def mount(
    source: str, target: str, fstype: str, flags: int = 0, data: str = "", *, shown: str = ""
) -> None:
    """mount(2); ``shown`` names the target in errors when ``target`` is a /proc/self/fd path."""
    result = _libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if result != 0:
        err = ctypes.get_errno()
        raise from_os_error(
            OSError(err, os.strerror(err)), f"mount {source} on {shown or target} ({fstype})"
        )


def umount(target: str, *, detach: bool = True) -> None:
    """umount2(2), never following a symlink in the last component."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0)
    if _libc.umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise from_os_error(OSError(err, os.strerror(err)), f"umount {target}")


def is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False
