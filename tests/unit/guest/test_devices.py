"""guest.agent.devices: the containers' filesystems under /dev and lo up, with the system
calls faked (the real ones run in every VM test: exec -it needs devpts, lo the pod's
loopback)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from guest.agent import devices
from guest.agent.bootsteps import BootStepFailed
from guest.agent.errors import from_os_error


class FakeMounts:
    def __init__(self, already: frozenset[str] = frozenset(), fail: str = "") -> None:
        self.calls: list[tuple[str, str, str, int, str]] = []
        self.already = set(already)
        self.fail = fail

    def mount(self, source: str, target: str, fstype: str, flags: int, data: str) -> None:
        if fstype == self.fail:
            raise from_os_error(OSError(19, "No such device"),
                                f"mount {source} on {target} ({fstype})")
        self.calls.append((source, target, fstype, flags, data))
        if fstype == "devpts":
            Path(target, "ptmx").touch()

    def mounted(self, target: str) -> bool:
        return target in self.already


def test_mounts_exactly_what_containers_expect_and_links_dev_fd(tmp_path: Path) -> None:
    fake = FakeMounts()
    devices.mount_container_filesystems(tmp_path, mount=fake.mount, mounted=fake.mounted)
    assert fake.calls == [
        ("devpts", str(tmp_path / "pts"), "devpts", 0, "gid=5,mode=0620,ptmxmode=0666"),
        ("tmpfs", str(tmp_path / "shm"), "tmpfs", 0, "mode=1777"),
        ("mqueue", str(tmp_path / "mqueue"), "mqueue", 0, ""),
    ]
    assert (tmp_path / "fd").is_symlink()
    assert str((tmp_path / "fd").readlink()) == "/proc/self/fd"


def test_what_is_already_there_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "pts").mkdir()
    (tmp_path / "pts" / "ptmx").touch()
    (tmp_path / "fd").symlink_to("/elsewhere")
    fake = FakeMounts(already=frozenset({str(tmp_path / "pts")}))
    devices.mount_container_filesystems(tmp_path, mount=fake.mount, mounted=fake.mounted)
    assert [c[2] for c in fake.calls] == ["tmpfs", "mqueue"]
    assert str((tmp_path / "fd").readlink()) == "/elsewhere"


def test_a_failed_mount_is_a_failed_boot_naming_it(tmp_path: Path) -> None:
    fake = FakeMounts(fail="mqueue")
    with pytest.raises(BootStepFailed, match=r"^the containers' filesystems: mount mqueue on "
                       r".*/mqueue \(mqueue\): No such device$"):
        devices.finish_boot(tmp_path, mount=fake.mount, mounted=fake.mounted,
                            ioctl=lambda fd, op, arg: arg)


def test_a_devpts_without_ptmx_is_a_failed_boot(tmp_path: Path) -> None:
    with pytest.raises(BootStepFailed, match="pts/ptmx missing after the devpts mount"):
        devices.finish_boot(tmp_path, mount=lambda *a: None, mounted=lambda t: False,
                            ioctl=lambda fd, op, arg: arg)


def ifreq(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def test_lo_up_keeps_its_other_flags() -> None:
    seen: list[tuple[int, bytes]] = []

    def ioctl(fd: int, op: int, arg: bytes) -> bytes:
        seen.append((op, arg))
        return ifreq("lo", 0x8 | 0x40) if op == devices.SIOCGIFFLAGS else arg

    devices.interface_up("lo", ioctl=ioctl)
    assert len(arg := seen[0][1]) == 40 and arg == ifreq("lo", 0)
    assert seen[1] == (devices.SIOCSIFFLAGS, ifreq("lo", 0x8 | 0x40 | devices.IFF_UP))


def test_lo_already_up_is_not_set_again() -> None:
    ops: list[int] = []

    def ioctl(fd: int, op: int, arg: bytes) -> bytes:
        ops.append(op)
        return ifreq("lo", devices.IFF_UP | 0x8)

    devices.interface_up("lo", ioctl=ioctl)
    assert ops == [devices.SIOCGIFFLAGS]


def test_a_failed_lo_is_a_failed_boot_naming_it(tmp_path: Path) -> None:
    fake = FakeMounts()

    def ioctl(fd: int, op: int, arg: bytes) -> bytes:
        raise OSError(19, "No such device")

    with pytest.raises(BootStepFailed, match=r"^lo up: \[Errno 19\] No such device$"):
        devices.finish_boot(tmp_path, mount=fake.mount, mounted=fake.mounted, ioctl=ioctl)


def test_the_real_ioctl_reads_this_host_s_lo() -> None:
    """The struct layout against the kernel: SIOCGIFFLAGS on this host's lo answers it up."""
    import fcntl
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _, flags = struct.unpack("16sH22x", fcntl.ioctl(sock.fileno(), devices.SIOCGIFFLAGS,
                                                        ifreq("lo", 0)))
    assert flags & devices.IFF_UP and flags & 0x8  # IFF_LOOPBACK
