"""What containers need of the guest beyond init's boot: their filesystems under /dev and lo up.

Init used to do this in two background boot steps of busybox processes (mkdir, mount, ln,
``ip link``), each process tens of milliseconds under TCG, after Check and before the
AgentService served. The agent does it with a few system calls instead (``--finish-boot``),
once its container machinery is imported and while init still loads drivers: mount(2) for
devpts, /dev/shm and mqueue, symlink(2) for /dev/fd, and one SIOCGIFFLAGS/SIOCSIFFLAGS pair
for lo. A failure is a failed boot, named
like init's (:class:`BootStepFailed`): the AgentService answers every call with it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Final

from guest.agent import mounts
from guest.agent.bootsteps import BootStepFailed

# (source, target beneath /dev, type, data): the kubelet's containers expect exactly these
# (a tty's group 5 = tty, mode 0620; ptmx usable by everyone; shm world-writable, sticky).
CONTAINER_FILESYSTEMS: Final = (
    ("devpts", "pts", "devpts", "gid=5,mode=0620,ptmxmode=0666"),
    ("tmpfs", "shm", "tmpfs", "mode=1777"),
    ("mqueue", "mqueue", "mqueue", ""),
)

SIOCGIFFLAGS: Final = 0x8913
SIOCSIFFLAGS: Final = 0x8914
IFF_UP: Final = 0x1
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: the name, then ifr_flags (40 bytes in all)

Mount = Callable[[str, str, str, int, str], None]
Ioctl = Callable[[int, int, bytes], bytes]


def mount_container_filesystems(dev: Path = Path("/dev"), *, mount: Mount = mounts.mount,
                                mounted: Callable[[str], bool] = mounts.is_mountpoint) -> None:
    """devpts, /dev/shm and mqueue under ``dev`` (each unless already mounted), and
    ``dev``/fd → /proc/self/fd unless it exists."""
    for source, name, fstype, data in CONTAINER_FILESYSTEMS:
        target = dev / name
        target.mkdir(exist_ok=True)
        if not mounted(str(target)):
            mount(source, str(target), fstype, 0, data)
    if not (dev / "pts" / "ptmx").exists():
        raise FileNotFoundError(f"{dev / 'pts' / 'ptmx'} missing after the devpts mount")
    fd = dev / "fd"
    if not os.path.lexists(fd):
        fd.symlink_to("/proc/self/fd")


def interface_up(name: str = "lo", *, ioctl: Ioctl = fcntl.ioctl) -> None:
    """Set IFF_UP on ``name`` (its other flags kept), as ``ip link set NAME up`` does."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = _IFREQ.pack(name.encode(), 0)
        _, flags = _IFREQ.unpack(ioctl(sock.fileno(), SIOCGIFFLAGS, request))
        if not flags & IFF_UP:
            ioctl(sock.fileno(), SIOCSIFFLAGS, _IFREQ.pack(name.encode(), flags | IFF_UP))


def finish_boot(dev: Path = Path("/dev"), *, mount: Mount = mounts.mount,
                mounted: Callable[[str], bool] = mounts.is_mountpoint,
                ioctl: Ioctl = fcntl.ioctl) -> None:
    """Both, or :class:`BootStepFailed` naming which failed and why."""
    try:
        mount_container_filesystems(dev, mount=mount, mounted=mounted)
    except Exception as err:
        raise BootStepFailed(f"the containers' filesystems: {err}") from err
    try:
        interface_up("lo", ioctl=ioctl)
    except OSError as err:
        raise BootStepFailed(f"lo up: {err}") from err
