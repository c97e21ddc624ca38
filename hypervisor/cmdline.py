"""Typed QEMU command line: each option group is a small dataclass rendering its own argv.

Nothing here decides *which* options a VM gets (that is :mod:`hypervisor.profile`); these
classes only know how to spell one option group correctly, including QEMU's comma escaping.
"""

from __future__ import annotations

import base64
import enum
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol


class Arch(enum.Enum):
    X86_64 = "x86_64"
    S390X = "s390x"
    PPC64 = "ppc64"

    @property
    def machine_type(self) -> str:
        return {"x86_64": "q35", "s390x": "s390-ccw-virtio", "ppc64": "pseries"}[self.value]

    @property
    def binary(self) -> str:
        return f"qemu-system-{self.value}"

    @property
    def virtio_transport(self) -> str:
        """Suffix of virtio device models: ``virtio-blk-pci`` or ``virtio-blk-ccw``."""
        return "ccw" if self is Arch.S390X else "pci"


class QemuArgs(Protocol):
    """Anything that renders a fragment of the QEMU command line."""

    def to_argv(self) -> list[str]: ...


OptValue = str | int | bool | Path | None


def escape(value: str) -> str:
    """QEMU option values double a literal comma."""
    return value.replace(",", ",,")


def render_value(value: str | int | bool | Path) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return escape(str(value))


def opts(head: str, *pairs: tuple[str, OptValue]) -> str:
    """``head,key=value,...``, leaving out keys whose value is None."""
    parts = [head] + [f"{k}={render_value(v)}" for k, v in pairs if v is not None]
    return ",".join(parts)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- machine, accelerator, CPU, memory -------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    type: str
    confidential_guest_support: str | None = None
    smm: bool | None = None
    pic: bool | None = None
    memory_backend: str | None = None

    def to_argv(self) -> list[str]:
        return [
            "-machine",
            opts(
                self.type,
                ("confidential-guest-support", self.confidential_guest_support),
                ("smm", self.smm),
                ("pic", self.pic),
                ("memory-backend", self.memory_backend),
            ),
        ]


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    kernel_irqchip: str | None = None  # "on", "off", "split" (a kvm-accel property)

    def to_argv(self) -> list[str]:
        return ["-accel", opts(self.name, ("kernel-irqchip", self.kernel_irqchip))]


@dataclass(frozen=True)
class Cpu:
    model: str

    def to_argv(self) -> list[str]:
        return ["-cpu", self.model]


@dataclass(frozen=True)
class Smp:
    cpus: int
    maxcpus: int | None = None

    def to_argv(self) -> list[str]:
        return ["-smp", opts(str(self.cpus), ("maxcpus", self.maxcpus))]


@dataclass(frozen=True)
class Memory:
    size_mib: int
    slots: int | None = None
    max_mib: int | None = None

    def to_argv(self) -> list[str]:
        maxmem = None if self.max_mib is None else f"{self.max_mib}M"
        return ["-m", opts(f"{self.size_mib}M", ("slots", self.slots), ("maxmem", maxmem))]


@dataclass(frozen=True)
class MemfdBackend:
    """Shared guest RAM: what vhost-user backends (hybrid vsock, virtio-fs) need."""

    id: str
    size_mib: int
    share: bool = True

    def to_argv(self) -> list[str]:
        return [
            "-object",
            opts(
                "memory-backend-memfd",
                ("id", self.id),
                ("size", f"{self.size_mib}M"),
                ("share", self.share),
            ),
        ]


# --- firmware and boot -----------------------------------------------------------------------


@dataclass(frozen=True)
class Bios:
    """Firmware loaded into memory (``-bios``); the only form SNP and TDX accept."""

    path: Path

    def to_argv(self) -> list[str]:
        return ["-bios", str(self.path)]


@dataclass(frozen=True)
class Pflash:
    """Firmware on flash: read-only code plus an optional per-VM variable store."""

    code: Path
    vars: Path | None = None

    def to_argv(self) -> list[str]:
        argv = [
            "-drive",
            opts("if=pflash", ("format", "raw"), ("unit", 0), ("file", self.code),
                 ("readonly", True)),
        ]
        if self.vars is not None:
            argv += ["-drive", opts("if=pflash", ("format", "raw"), ("unit", 1),
                                    ("file", self.vars))]
        return argv


Firmware = Bios | Pflash


@dataclass(frozen=True)
class DirectBoot:
    kernel: Path
    initrd: Path | None = None
    append: str = ""

    def to_argv(self) -> list[str]:
        argv = ["-kernel", str(self.kernel)]
        if self.initrd is not None:
            argv += ["-initrd", str(self.initrd)]
        if self.append:
            argv += ["-append", self.append]
        return argv


# --- confidential-guest objects --------------------------------------------------------------


@dataclass(frozen=True)
class SevGuest:
    """``sev-guest`` (SEV and SEV-ES; policy bit 0x4 selects ES)."""

    id: str
    cbitpos: int
    reduced_phys_bits: int
    policy: int
    kernel_hashes: bool
    legacy_vm_type: bool

    def to_argv(self) -> list[str]:
        return [
            "-object",
            opts(
                "sev-guest",
                ("id", self.id),
                ("cbitpos", self.cbitpos),
                ("reduced-phys-bits", self.reduced_phys_bits),
                ("policy", hex(self.policy)),
                ("kernel-hashes", self.kernel_hashes),
                ("legacy-vm-type", self.legacy_vm_type),
            ),
        ]


@dataclass(frozen=True)
class SnpGuest:
    """``sev-snp-guest`` (QEMU >= 9.1)."""

    id: str
    cbitpos: int
    reduced_phys_bits: int
    policy: int
    kernel_hashes: bool
    host_data: bytes | None = None
    id_block: bytes | None = None
    id_auth: bytes | None = None
    author_key_enabled: bool | None = None

    def to_argv(self) -> list[str]:
        return [
            "-object",
            opts(
                "sev-snp-guest",
                ("id", self.id),
                ("cbitpos", self.cbitpos),
                ("reduced-phys-bits", self.reduced_phys_bits),
                ("policy", hex(self.policy)),
                ("kernel-hashes", self.kernel_hashes),
                ("host-data", None if self.host_data is None else b64(self.host_data)),
                ("id-block", None if self.id_block is None else b64(self.id_block)),
                ("id-auth", None if self.id_auth is None else b64(self.id_auth)),
                ("author-key-enabled", self.author_key_enabled),
            ),
        ]


@dataclass(frozen=True)
class UnixSocketAddress:
    path: Path

    def to_qapi(self) -> dict[str, str]:
        return {"type": "unix", "path": str(self.path)}


@dataclass(frozen=True)
class VsockSocketAddress:
    cid: int
    port: int

    def to_qapi(self) -> dict[str, str]:
        # QAPI VsockSocketAddress carries cid and port as strings.
        return {"type": "vsock", "cid": str(self.cid), "port": str(self.port)}


@dataclass(frozen=True)
class TdxGuest:
    """``tdx-guest`` (QEMU >= 10.1), rendered as JSON: a SocketAddress has no dotted form."""

    id: str
    sept_ve_disable: bool = True
    mrconfigid: bytes | None = None
    mrowner: bytes | None = None
    mrownerconfig: bytes | None = None
    quote_generation_socket: UnixSocketAddress | VsockSocketAddress | None = None
    attributes: int | None = None

    def to_argv(self) -> list[str]:
        obj: dict[str, object] = {"qom-type": "tdx-guest", "id": self.id,
                                  "sept-ve-disable": self.sept_ve_disable}
        for key, blob in (("mrconfigid", self.mrconfigid), ("mrowner", self.mrowner),
                          ("mrownerconfig", self.mrownerconfig)):
            if blob is not None:
                obj[key] = b64(blob)
        if self.quote_generation_socket is not None:
            obj["quote-generation-socket"] = self.quote_generation_socket.to_qapi()
        if self.attributes is not None:
            obj["attributes"] = self.attributes
        return ["-object", json.dumps(obj, separators=(",", ":"))]


@dataclass(frozen=True)
class S390PvGuest:
    id: str

    def to_argv(self) -> list[str]:
        return ["-object", opts("s390-pv-guest", ("id", self.id))]


@dataclass(frozen=True)
class PefGuest:
    id: str

    def to_argv(self) -> list[str]:
        return ["-object", opts("pef-guest", ("id", self.id))]


ConfidentialGuest = SevGuest | SnpGuest | TdxGuest | S390PvGuest | PefGuest


# --- devices ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VirtioBlk:
    id: str
    path: Path
    readonly: bool = False
    format: str = "raw"
    transport: str = "pci"
    iommu_platform: bool = False
    # "none" (O_DIRECT) suits image files; None keeps QEMU's default for small files on tmpfs.
    cache: str | None = "none"

    def to_argv(self) -> list[str]:
        drive = f"drive-{self.id}"
        return [
            "-drive",
            opts("if=none", ("id", drive), ("file", self.path), ("format", self.format),
                 ("readonly", self.readonly or None), ("cache", self.cache),
                 ("aio", "threads")),
            "-device",
            opts(f"virtio-blk-{self.transport}", ("id", self.id), ("drive", drive),
                 ("iommu_platform", self.iommu_platform or None)),
        ]


@dataclass(frozen=True)
class VirtioNetTap:
    """virtio-net on a tap fd the caller opened (and passes to QEMU, not closing it)."""

    id: str
    tap_fd: int
    mac: str
    vhost_fd: int | None = None
    transport: str = "pci"
    iommu_platform: bool = False

    def to_argv(self) -> list[str]:
        netdev = f"netdev-{self.id}"
        return [
            "-netdev",
            opts("tap", ("id", netdev), ("fd", self.tap_fd),
                 ("vhost", True if self.vhost_fd is not None else None),
                 ("vhostfd", self.vhost_fd)),
            "-device",
            opts(f"virtio-net-{self.transport}", ("id", self.id), ("netdev", netdev),
                 ("mac", self.mac), ("iommu_platform", self.iommu_platform or None)),
        ]


@dataclass(frozen=True)
class VhostVsock:
    """Kernel vhost-vsock: QEMU gets an fd whose guest CID is already set."""

    id: str
    guest_cid: int
    vhost_fd: int
    transport: str = "pci"
    iommu_platform: bool = False

    def to_argv(self) -> list[str]:
        return [
            "-device",
            opts(f"vhost-vsock-{self.transport}", ("id", self.id),
                 ("guest-cid", self.guest_cid), ("vhostfd", self.vhost_fd),
                 ("iommu_platform", self.iommu_platform or None)),
        ]


@dataclass(frozen=True)
class VhostUserVsock:
    """Hybrid vsock: virtio-vsock served by a vhost-user backend (vhost-device-vsock)."""

    id: str
    socket: Path
    transport: str = "pci"

    def to_argv(self) -> list[str]:
        chardev = f"char-{self.id}"
        return [
            "-chardev", opts("socket", ("id", chardev), ("path", self.socket)),
            "-device", opts(f"vhost-user-vsock-{self.transport}", ("id", self.id),
                            ("chardev", chardev)),
        ]


_CONSOLE_MODEL = {Arch.X86_64: "isa-serial", Arch.PPC64: "spapr-vty",
                  Arch.S390X: "sclpconsole"}


@dataclass(frozen=True)
class VirtioBalloon:
    """virtio-balloon used only for free page reporting: the guest hands pages it freed back to
    the host (QEMU discards them), so the host keeps only what the guest uses. Never for
    confidential guests: the host cannot take their private pages (a profile invariant)."""

    id: str = "balloon0"
    free_page_reporting: bool = True
    transport: str = "pci"

    def to_argv(self) -> list[str]:
        return ["-device", opts(f"virtio-balloon-{self.transport}", ("id", self.id),
                                ("free-page-reporting", self.free_page_reporting))]


@dataclass(frozen=True)
class SerialConsole:
    """The guest console, written to a file the host can read."""

    path: Path
    arch: Arch = Arch.X86_64
    id: str = "console0"

    def to_argv(self) -> list[str]:
        return [
            "-chardev", opts("file", ("id", self.id), ("path", self.path)),
            "-device", opts(_CONSOLE_MODEL[self.arch], ("chardev", self.id)),
        ]


@dataclass(frozen=True)
class RingbufConsole:
    """The guest console kept in a fixed-size ring inside QEMU (QMP ``ringbuf-read``).

    The debug console of a TEE profile: nothing grows on the host, whatever the guest prints.
    ``size`` must be a power of two (QEMU's rule).
    """

    size: int
    arch: Arch = Arch.X86_64
    id: str = "console0"

    def to_argv(self) -> list[str]:
        return [
            "-chardev", opts("ringbuf", ("id", self.id), ("size", self.size)),
            "-device", opts(_CONSOLE_MODEL[self.arch], ("chardev", self.id)),
        ]


Console = SerialConsole | RingbufConsole


@dataclass(frozen=True)
class NinePShare:
    """virtio-9p: exposes a host directory; never for confidential guests.

    ``security_model=none``: ``mapped-xattr`` (which would keep the guest's owners and modes
    in xattrs, off the host files) cannot serve the host's own symlinks of a container's
    rootfs snapshot (QEMU 7.2: "Too many levels of symbolic links" for /bin/sh → busybox).
    What the guest may do to host files is bounded instead by the identity QEMU runs as
    (:class:`ReducedPrivileges`, chosen by ``build_command_line`` for every VM with a share)."""

    id: str
    tag: str
    path: Path
    transport: str = "pci"

    def to_argv(self) -> list[str]:
        fsdev = f"fsdev-{self.id}"
        return [
            "-fsdev", opts("local", ("id", fsdev), ("path", self.path),
                           ("security_model", "none")),
            "-device", opts(f"virtio-9p-{self.transport}", ("id", self.id), ("fsdev", fsdev),
                            ("mount_tag", self.tag)),
        ]


@dataclass(frozen=True)
class VirtioFsShare:
    """virtio-fs through a virtiofsd vhost-user socket; needs shared guest memory."""

    id: str
    tag: str
    socket: Path
    transport: str = "pci"

    def to_argv(self) -> list[str]:
        chardev = f"char-{self.id}"
        return [
            "-chardev", opts("socket", ("id", chardev), ("path", self.socket)),
            "-device", opts(f"vhost-user-fs-{self.transport}", ("id", self.id),
                            ("chardev", chardev), ("tag", self.tag)),
        ]


Share = NinePShare | VirtioFsShare
Vsock = VhostVsock | VhostUserVsock


@dataclass(frozen=True)
class QmpSocket:
    """Private QMP server socket; QEMU creates it, the monitor connects."""

    path: Path

    def to_argv(self) -> list[str]:
        # -qmp rather than -chardev + -mon: -mon is deprecated in QEMU 11 and the
        # monitor-qmp object does not exist in QEMU 7.
        return ["-qmp", opts(f"unix:{escape(str(self.path))}", ("server", True),
                             ("wait", False))]


@dataclass(frozen=True)
class SeccompSandbox:
    """QEMU's own seccomp filter (``-sandbox``), on every profile: a compromised device model
    cannot use obsolete syscalls, gain privileges (setuid & co.), spawn processes (fork,
    execve) or change scheduling and resource limits. Accepted by QEMU 7.2 and 11.1; QEMU
    needs none of these once running (taps and vsock arrive as fds or sockets)."""

    obsolete: bool = True
    elevate_privileges: bool = True
    spawn: bool = True
    resource_control: bool = True

    def to_argv(self) -> list[str]:
        def deny(on: bool) -> str | None:
            return "deny" if on else None

        return ["-sandbox", opts("on", ("obsolete", deny(self.obsolete)),
                                 ("elevateprivileges", deny(self.elevate_privileges)),
                                 ("spawn", deny(self.spawn)),
                                 ("resourcecontrol", deny(self.resource_control)))]


# The identity QEMU runs as when it serves a host share (``nobody:nogroup`` on Debian).
SHARE_SERVER_UID: Final = 65534
SHARE_SERVER_GID: Final = 65534
NOSUID_WRAPPER: Final = Path(__file__).resolve().with_name("nosuid.py")


@dataclass(frozen=True)
class ReducedPrivileges:
    """QEMU as an unprivileged uid/gid that cannot make root's, setuid or setgid files.

    Two wrappers QEMU is exec'd through (same pid): :mod:`hypervisor.nosuid` (a seccomp
    filter refusing modes with S_ISUID/S_ISGID, a chown to uid 0 a no-op) first, then
    setpriv(1): ``uid``/``gid``, no supplementary groups, no new privileges, and of all
    capabilities only ``keep`` (ambient, so they survive the exec into QEMU; nothing else in
    the bounding set), and the parent-death signal again (a credential change clears the one
    :mod:`hypervisor.lifeline` set; setpriv sets it after changing them).

    Why: QEMU's 9p ``local`` backend with ``security_model=none`` creates files as QEMU's
    own uid and applies the guest's chown/chmod on the host. As root that lets a guest make
    root-owned and setuid-root files in a container's snapshot or a writable bind mount.
    As ``nobody`` every file a guest root creates is ``nobody``'s; CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH let it read and write any file of the share and the run dir;
    CAP_CHOWN and CAP_FOWNER let a non-root guest user's files be that user's (QEMU chowns,
    then chmods what it creates: without them the guest sees its files as ``nobody``'s and
    a non-root container cannot reopen or fill what it just made), and the filter keeps
    both from reaching uid 0 or the setuid/setgid bits. Not kept: CAP_FSETID,
    CAP_SETFCAP (no file capabilities), CAP_MKNOD (no devices), CAP_SETUID/SETGID and the
    rest. The mapped security models are no alternative: they read a symlink by opening
    it, so the host-native symlinks of a snapshot (busybox) fail in the guest. QEMU's 9p
    server is not separable from QEMU (virtfs-proxy-helper is gone since QEMU 8.1), so all
    of QEMU drops. Everything else QEMU uses is passed in as fds or is a path the kept
    capabilities grant (QMP socket in the 0700 run dir, vhost-user socket, console FIFO,
    initdata disk)."""

    uid: int = SHARE_SERVER_UID
    gid: int = SHARE_SERVER_GID
    python: Path = Path(sys.executable)
    setpriv: Path = Path("/usr/bin/setpriv")
    keep: tuple[str, ...] = ("chown", "dac_override", "dac_read_search", "fowner")

    def guard_argv(self) -> list[str]:
        """The seccomp wrapper: runs on the host, before any chroot prefix."""
        return [str(self.python), "-I", "-S", str(NOSUID_WRAPPER)]

    def to_argv(self) -> list[str]:
        """The setpriv prefix: right before QEMU (inside a chroot prefix, if any)."""
        caps = ",".join(["-all", *(f"+{cap}" for cap in self.keep)])
        return [str(self.setpriv), f"--reuid={self.uid}", f"--regid={self.gid}",
                "--clear-groups", "--no-new-privs", f"--inh-caps={caps}",
                f"--ambient-caps={caps}", f"--bounding-set={caps}",
                # the uid change clears the parent-death signal hypervisor.lifeline set: again
                "--pdeathsig=KILL", "--"]


# --- the whole command line ------------------------------------------------------------------


@dataclass(frozen=True)
class QemuCommandLine:
    binary: Path
    name: str
    machine: Machine
    accel: Accel
    cpu: Cpu | None
    smp: Smp
    memory: Memory
    memory_backend: MemfdBackend | None = None
    firmware: Firmware | None = None
    boot: DirectBoot | None = None
    confidential_guest: ConfidentialGuest | None = None
    devices: Sequence[QemuArgs] = field(default_factory=tuple)
    serial: Console | None = None
    qmp: QmpSocket | None = None
    no_reboot: bool = True
    start_paused: bool = True
    sandbox: SeccompSandbox = field(default_factory=SeccompSandbox)
    run_as: ReducedPrivileges | None = None  # a setpriv(1) prefix: QEMU unprivileged

    def to_argv(self, prefix: Sequence[str] = ()) -> list[str]:
        """The whole argv; ``prefix`` (e.g. a test's ``chroot DIR``) goes after the seccomp
        wrapper of :class:`ReducedPrivileges` and before its setpriv."""
        if self.run_as is None:
            argv = list(prefix)
        else:
            argv = [*self.run_as.guard_argv(), *prefix, *self.run_as.to_argv()]
        argv += [str(self.binary), "-name", opts(escape(self.name))]
        argv += ["-no-user-config", "-nodefaults", "-display", "none"]
        argv += self.sandbox.to_argv()
        argv += self.machine.to_argv() + self.accel.to_argv()
        if self.cpu is not None:
            argv += self.cpu.to_argv()
        argv += self.smp.to_argv() + self.memory.to_argv()
        if self.memory_backend is not None:
            argv += self.memory_backend.to_argv()
        if self.confidential_guest is not None:
            argv += self.confidential_guest.to_argv()
        if self.firmware is not None:
            argv += self.firmware.to_argv()
        if self.boot is not None:
            argv += self.boot.to_argv()
        if self.serial is not None:
            argv += self.serial.to_argv()
        for device in self.devices:
            argv += device.to_argv()
        if self.qmp is not None:
            argv += self.qmp.to_argv()
        if self.no_reboot:
            argv.append("-no-reboot")
        if self.start_paused:
            argv.append("-S")
        return argv
