"""TEE profiles: named, documented combinations of QEMU options, with their invariants.

A :class:`RuntimeProfile` (usually loaded from ``firmware-configs/*.toml``) says what kind of VM
to build; a :class:`VmInstance` carries what is specific to one VM (run directory, vsock, disks,
NICs, initdata). :func:`build_command_line` checks every invariant first and raises
:class:`~hypervisor.errors.InvariantError` naming the conflict, so an impossible combination
never becomes a silently wrong VM.

On a TEE the host is the adversary: :func:`tee_safety_conflicts` lists the settings that would
let the host debug the guest, swap its unmeasured parts or read its console, each naming the
profile key (the loader turns them into ``ConfigError``; ``check_invariants`` refuses them for
profiles built in code).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from hypervisor.cmdline import (
    Accel,
    Arch,
    Bios,
    ConfidentialGuest,
    Console,
    Cpu,
    DirectBoot,
    Firmware,
    Machine,
    MemfdBackend,
    Memory,
    NinePShare,
    PefGuest,
    Pflash,
    QemuArgs,
    QemuCommandLine,
    QmpSocket,
    ReducedPrivileges,
    RingbufConsole,
    S390PvGuest,
    SerialConsole,
    SevGuest,
    Share,
    Smp,
    SnpGuest,
    TdxGuest,
    UnixSocketAddress,
    VhostUserVsock,
    VhostVsock,
    VirtioBalloon,
    VirtioBlk,
    VirtioFsShare,
    VirtioNetTap,
    VsockSocketAddress,
)
from hypervisor.errors import InvariantError
from hypervisor.rootimage import RootImage
from protocols.initdata import SNP_HOST_DATA_BYTES, TDX_MRCONFIGID_BYTES, Initdata

SEV_POLICY_NODBG = 0x1  # bit 0: the host may not debug the guest
SEV_POLICY_ES = 0x4
SNP_POLICY_RESERVED_ONE = 0x20000  # bit 17 must be 1 (SNP ABI)
SNP_POLICY_MIGRATE_MA = 1 << 18  # a migration agent may be associated (exports guest memory)
SNP_POLICY_DEBUG = 1 << 19  # the host may debug the guest
SNP_POLICY_DEFAULT = 0x30000  # bit 17 + SMT allowed
SNP_HOST_DATA_LEN = SNP_HOST_DATA_BYTES
SNP_ID_BLOCK_LEN = 96
SNP_ID_AUTH_MAX = 4096
TDX_MR_LEN = TDX_MRCONFIGID_BYTES
TDX_ATTR_DEBUG = 0x1  # TD attributes bit 0: the host may debug the TD
# QEMU splits option values on commas: names are refused outside this set.
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
KERNEL_PARAMS_ANNOTATION = "io.katacontainers.config.hypervisor.kernel_params"
# Pod-chosen base size: honoured on non-confidential profiles only (a TEE's size is part of
# what the pod's limits and the operator decide, see shim/pod/sizing.py).
SIZE_ANNOTATIONS = ("io.katacontainers.config.hypervisor.default_vcpus",
                    "io.katacontainers.config.hypervisor.default_memory")
# Kernel parameters that route guest output to a host-readable device.
_CONSOLE_PARAMS = ("console=", "earlycon", "earlyprintk")
DEBUG_CONSOLE_MIN = 4096
DEBUG_CONSOLE_MAX = 16 * 1024 * 1024


class TeeKind(enum.Enum):
    """Which trusted execution environment a VM runs in."""

    NONE = "none"  # development: no TEE, any accelerator
    SEV = "sev"  # AMD SEV: memory encryption (sev-guest, policy without ES bit)
    SEV_ES = "sev-es"  # AMD SEV-ES: + encrypted register state (policy bit 0x4)
    SNP = "snp"  # AMD SEV-SNP: + integrity, attestation reports (sev-snp-guest)
    TDX = "tdx"  # Intel TDX (tdx-guest)
    S390_PV = "s390-pv"  # IBM Secure Execution (s390-pv-guest)
    PEF = "pef"  # IBM Power Protected Execution Facility (pef-guest)

    @property
    def confidential(self) -> bool:
        return self is not TeeKind.NONE

    @property
    def arch(self) -> Arch | None:
        """The only architecture this TEE exists on (None: any)."""
        return {
            TeeKind.NONE: None,
            TeeKind.SEV: Arch.X86_64,
            TeeKind.SEV_ES: Arch.X86_64,
            TeeKind.SNP: Arch.X86_64,
            TeeKind.TDX: Arch.X86_64,
            TeeKind.S390_PV: Arch.S390X,
            TeeKind.PEF: Arch.PPC64,
        }[self]

    @property
    def qom_type(self) -> str | None:
        return {
            TeeKind.NONE: None,
            TeeKind.SEV: "sev-guest",
            TeeKind.SEV_ES: "sev-guest",
            TeeKind.SNP: "sev-snp-guest",
            TeeKind.TDX: "tdx-guest",
            TeeKind.S390_PV: "s390-pv-guest",
            TeeKind.PEF: "pef-guest",
        }[self]

    @property
    def initdata_field(self) -> tuple[str, int] | None:
        """The launch field initdata's digest is bound to (name, bytes), if this TEE has one."""
        return {
            TeeKind.SNP: ("host-data", SNP_HOST_DATA_LEN),
            TeeKind.TDX: ("mrconfigid", TDX_MR_LEN),
        }.get(self)

    @property
    def firmware_feature(self) -> str | None:
        """Feature name in QEMU firmware descriptors (docs/interop/firmware.json)."""
        return {
            TeeKind.SEV: "amd-sev",
            TeeKind.SEV_ES: "amd-sev-es",
            TeeKind.SNP: "amd-sev-snp",
            TeeKind.TDX: "intel-tdx",
        }.get(self)


@dataclass(frozen=True)
class SevParams:
    """sev / sev-es. ``cbitpos``/``reduced_phys_bits`` None: ask ``query-sev-capabilities``."""

    policy: int | None = None  # default 0x1 (sev) / 0x5 (sev-es)
    cbitpos: int | None = None
    reduced_phys_bits: int | None = None
    kernel_hashes: bool | None = None  # default: on for direct kernel boot
    # Pinned, because KVM_SEV_INIT vs KVM_SEV_INIT2 changes the launch measurement.
    legacy_vm_type: bool = False


@dataclass(frozen=True)
class SnpParams:
    policy: int = SNP_POLICY_DEFAULT
    cbitpos: int | None = None
    reduced_phys_bits: int | None = None
    kernel_hashes: bool | None = None
    host_data: bytes | None = None
    id_block: bytes | None = None
    id_auth: bytes | None = None
    author_key_enabled: bool | None = None


@dataclass(frozen=True)
class TdxParams:
    sept_ve_disable: bool = True
    mrconfigid: bytes | None = None
    mrowner: bytes | None = None
    mrownerconfig: bytes | None = None
    quote_generation_socket: UnixSocketAddress | VsockSocketAddress | None = None
    attributes: int | None = None


TeeParams = SevParams | SnpParams | TdxParams | None


def params_class(tee: TeeKind) -> type[SevParams] | type[SnpParams] | type[TdxParams] | None:
    return {
        TeeKind.SEV: SevParams,
        TeeKind.SEV_ES: SevParams,
        TeeKind.SNP: SnpParams,
        TeeKind.TDX: TdxParams,
    }.get(tee)


@dataclass(frozen=True)
class RuntimeProfile:
    """Everything a runtime profile TOML says, resolved and typed."""

    name: str
    tee: TeeKind
    qemu: Path
    kernel: Path | None
    arch: Arch = Arch.X86_64
    initrd: Path | None = None
    image: RootImage | None = None  # the read-only root filesystem image (hypervisor/rootimage)
    kernel_params: str = ""
    machine_type: str | None = None
    cpu_model: str | None = None
    accel: str = "kvm"  # "kvm" | "tcg" | "auto" (decided by a probe before launch)
    vcpus: int = 1
    max_vcpus: int | None = None
    memory_mib: int = 2048
    memory_slots: int | None = None
    max_memory_mib: int | None = None
    firmware: Firmware | None = None
    tee_params: TeeParams = None
    dial_timeout: float = 30.0
    enable_annotations: tuple[str, ...] = ()
    vsock: str = "auto"  # "kernel" | "hybrid" | "auto" | "none"
    free_page_reporting: bool = False  # virtio-balloon returning free guest pages (no TEE)
    source: str = "<code>"
    qemu_root: Path = Path("/")  # filesystem root QEMU sees (chroot); paths are inside it
    # TEE escape hatches, each explicit in the profile and logged for every VM that uses it.
    allow_debug: bool = False  # SEV without NODBG, SNP DEBUG, TDX DEBUG
    debug_console_bytes: int | None = None  # console kept in a QEMU ring of this many bytes
    allow_unbound_initdata: bool = False  # deliver initdata where no launch field binds it
    initdata: Path | None = None  # default initdata TOML (host path) when a pod brings none
    # coco-dev: the confidential code path on a host without TEE hardware ([runtime]
    # confidential = true on tee "none"). It protects nothing: development and CI only.
    confidential_without_tee: bool = False
    # Static sizing (kata's static_sandbox_resource_mgmt): the pod VM gets vcpus/memory_mib
    # plus the pod's limits, up to these maxima (None: the host's CPUs / memory).
    static_sizing: bool = True
    sandbox_max_vcpus: int | None = None
    sandbox_max_memory_mib: int | None = None
    # Node-wide boot admission (the shim's shim/pod/admission.py): at most this many pod VMs
    # boot at once across the node's daemons (None: one per host CPU; 0: no limit).
    boot_slots: int | None = None

    @property
    def confidential(self) -> bool:
        """The confidential code path: every TEE profile, and coco-dev."""
        return self.tee.confidential or self.confidential_without_tee


@dataclass(frozen=True)
class KernelVsock:
    """A /dev/vhost-vsock fd with its guest CID set (see hypervisor.vsock)."""

    guest_cid: int
    vhost_fd: int


@dataclass(frozen=True)
class HybridVsock:
    """A vhost-user socket served by vhost-device-vsock (see hypervisor.vsock)."""

    vhost_user_socket: Path


@dataclass(frozen=True)
class VmInstance:
    """What differs between two VMs of the same profile."""

    run_dir: Path
    name: str = "coco"
    vsock: KernelVsock | HybridVsock | None = None
    disks: Sequence[VirtioBlk] = ()
    nics: Sequence[VirtioNetTap] = ()
    shares: Sequence[Share] = ()
    extra_kernel_params: str = ""
    accel: str | None = None  # overrides profile.accel ("auto" must be decided by now)
    sev_cbitpos: int | None = None  # from query-sev-capabilities when the profile has none
    sev_reduced_phys_bits: int | None = None
    start_paused: bool = True
    log_dir: Path | None = None  # console log here instead of the run directory
    initdata: Initdata | None = None  # bound to host-data/mrconfigid, delivered as a disk

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def initdata_disk(self) -> Path:
        """The raw initdata disk image (written 0600 by the launcher before QEMU starts)."""
        return self.run_dir / "initdata.img"

    @property
    def console_log(self) -> Path:
        """The guest console as the host keeps it (capped: hypervisor.caplog)."""
        return (self.log_dir or self.run_dir) / "console.log"

    @property
    def console_pipe(self) -> Path:
        """The FIFO QEMU's console chardev writes into; the launcher drains it into
        :attr:`console_log`."""
        return self.run_dir / "console.pipe"


@dataclass(frozen=True)
class Conflict:
    """A refused profile setting: the TOML key it comes from, why, and the value."""

    key: str
    message: str
    value: object = None


def _kernel_console_params(params: str) -> list[str]:
    return [p for p in params.split() if p.startswith(_CONSOLE_PARAMS)]


def _sev_policy(tee: TeeKind, params: SevParams) -> int:
    if params.policy is not None:
        return params.policy
    return 0x5 if tee is TeeKind.SEV_ES else 0x1


def tee_safety_conflicts(profile: RuntimeProfile) -> list[Conflict]:
    """Settings refused because they let the host debug, swap or watch the guest.

    Every profile: ``machine_type``/``cpu_model`` limited to ``[A-Za-z0-9._-]`` (a comma would
    smuggle extra QEMU options in). TEE profiles: debug policy bits (unless ``allow_debug``),
    SNP MIGRATE_MA, direct kernel boot without ``kernel_hashes``, a console without the capped
    ``debug_console_bytes``, vsock ``none``, and a default initdata file
    where no launch field can bind it (unless ``allow_unbound_initdata``). (Free page
    reporting is refused for every confidential profile: the ``no-balloon`` invariant.)
    """
    out: list[Conflict] = []
    for key, value in (("hypervisor.machine_type", profile.machine_type),
                       ("hypervisor.cpu_model", profile.cpu_model)):
        if value is not None and not SAFE_NAME.fullmatch(value):
            out.append(Conflict(key, "may only contain letters, digits, '.', '_' and '-' "
                                "(QEMU would read anything else as more options)", value))
    size = profile.debug_console_bytes
    if size is not None and not (DEBUG_CONSOLE_MIN <= size <= DEBUG_CONSOLE_MAX
                                 and size & (size - 1) == 0):
        out.append(Conflict("hypervisor.debug_console_bytes", "must be a power of two from "
                            f"{DEBUG_CONSOLE_MIN} to {DEBUG_CONSOLE_MAX}", size))
    tee = profile.tee
    if not tee.confidential:
        return out
    params = profile.tee_params
    debug_ok = profile.allow_debug
    if isinstance(params, SevParams) and tee in (TeeKind.SEV, TeeKind.SEV_ES):
        policy = _sev_policy(tee, params)
        if not policy & SEV_POLICY_NODBG and not debug_ok:
            out.append(Conflict("sev.policy", f"policy {policy:#x} lacks NODBG (bit 0): the "
                                "host could debug the guest (allow_debug = true for a debug "
                                "profile)", policy))
    if isinstance(params, SnpParams) and tee is TeeKind.SNP:
        if params.policy & SNP_POLICY_DEBUG and not debug_ok:
            out.append(Conflict("snp.policy", f"policy {params.policy:#x} sets DEBUG (bit 19): "
                                "the host could debug the guest (allow_debug = true for a "
                                "debug profile)", params.policy))
        if params.policy & SNP_POLICY_MIGRATE_MA:
            out.append(Conflict("snp.policy", f"policy {params.policy:#x} sets MIGRATE_MA (bit "
                                "18): a migration agent could export the guest's memory",
                                params.policy))
    attributes = params.attributes if isinstance(params, TdxParams) else None
    if attributes is not None and attributes & TDX_ATTR_DEBUG and not debug_ok:
        out.append(Conflict("tdx.attributes", f"attributes {attributes:#x} set DEBUG (bit 0): "
                            "the host could read and change the TD's state (allow_debug = "
                            "true for a debug profile)", attributes))
    if isinstance(params, SevParams | SnpParams) and profile.kernel is not None and (
            params.kernel_hashes is False):
        section = "snp" if tee is TeeKind.SNP else "sev"
        out.append(Conflict(f"{section}.kernel_hashes", "direct kernel boot without "
                            "kernel_hashes: the host could swap the kernel, initrd or command "
                            "line unmeasured", False))
    consoles = _kernel_console_params(profile.kernel_params)
    if consoles and profile.debug_console_bytes is None:
        out.append(Conflict("hypervisor.kernel_params", f"{' '.join(consoles)} sends guest "
                            "output to the host; a TEE console needs the explicit, capped "
                            "debug_console_bytes", profile.kernel_params))
    if profile.vsock == "none":
        out.append(Conflict("hypervisor.vsock", "a TEE guest without vsock cannot be reached "
                            "by the shim (use \"kernel\")", profile.vsock))
    if profile.initdata is not None and tee.initdata_field is None and (
            not profile.allow_unbound_initdata):
        out.append(Conflict("runtime.initdata", unbound_initdata_message(tee),
                            str(profile.initdata)))
    return out


def unbound_initdata_message(tee: TeeKind) -> str:
    return (f"{tee.value} has no launch field to bind initdata to (only snp host-data and tdx "
            "mrconfigid do): the guest could not tell it from the host's; set "
            "allow_unbound_initdata = true to deliver it unmeasured anyway")


GUEST_CONFIDENTIAL_PARAM = "coco.agent.confidential=1"


@dataclass(frozen=True)
class ConfidentialInvariant:
    """One rule every confidential profile obeys, coco-dev and each TEE alike."""

    name: str
    rule: str


# The confidential invariants, in one place. A TEE adds hardware rules of its own (KVM, no
# hybrid vsock, no console, measured boot: tee_safety_conflicts / _check_tee); these hold for
# every profile whose pods take the confidential code path, with or without TEE hardware.
CONFIDENTIAL_INVARIANTS: tuple[ConfidentialInvariant, ...] = (
    ConfidentialInvariant("no-host-share", "no host filesystem share (9p/virtio-fs): the "
                          "container's rootfs is pulled in the guest"),
    ConfidentialInvariant("static-sizing", "no memory or CPU hotplug (memory_slots, "
                          "max_memory_mib, max_vcpus above vcpus)"),
    ConfidentialInvariant("measured-cmdline", f"pods cannot change the kernel command line "
                          f"({KERNEL_PARAMS_ANNOTATION} is not allow-listed)"),
    ConfidentialInvariant("guest-knows", f"the guest knows it is confidential: a TEE it "
                          f"detects, or {GUEST_CONFIDENTIAL_PARAM} on the kernel command line"),
    ConfidentialInvariant("no-balloon", "no virtio-balloon (free_page_reporting): the host "
                          "never gets the guest's pages back, free or not"),
)


def confidential_conflicts(profile: RuntimeProfile,
                           shares: Sequence[Share] = ()) -> list[Conflict]:
    """The :data:`CONFIDENTIAL_INVARIANTS` a confidential profile (or one VM of it, with its
    ``shares``) breaks; nothing for a development profile."""
    if not profile.confidential:
        return []
    out: list[Conflict] = []
    if shares:
        out.append(Conflict("shares", "(no-host-share) shared filesystems (9p/virtio-fs) "
                            "would expose guest data to the host", [s.id for s in shares]))
    if profile.memory_slots is not None or profile.max_memory_mib is not None:
        out.append(Conflict("hypervisor.memory_slots", "(static-sizing) memory hotplug "
                            "(memory_slots/max_memory_mib) is not possible in a confidential "
                            "guest", profile.memory_slots or profile.max_memory_mib))
    if profile.max_vcpus not in (None, profile.vcpus):
        out.append(Conflict("hypervisor.max_vcpus", f"(static-sizing) CPU hotplug (max_vcpus="
                            f"{profile.max_vcpus} > vcpus={profile.vcpus}) is not possible in a "
                            "confidential guest", profile.max_vcpus))
    if KERNEL_PARAMS_ANNOTATION in profile.enable_annotations:
        out.append(Conflict("runtime.enable_annotations", f"(measured-cmdline) "
                            f"{KERNEL_PARAMS_ANNOTATION} would let a pod change the measured "
                            "kernel command line", KERNEL_PARAMS_ANNOTATION))
    for key in SIZE_ANNOTATIONS:
        if key in profile.enable_annotations:
            out.append(Conflict("runtime.enable_annotations", f"(static-sizing) {key} would "
                                "let a pod choose its own VM size (a confidential pod is "
                                "sized from its limits)", key))
    if profile.free_page_reporting:
        out.append(Conflict("hypervisor.free_page_reporting", "(no-balloon) virtio-balloon "
                            "would hand the guest's private pages to the host", True))
    if not profile.tee.confidential and (
            GUEST_CONFIDENTIAL_PARAM not in profile.kernel_params.split()):
        out.append(Conflict("hypervisor.kernel_params", f"(guest-knows) no TEE for the guest "
                            f"to detect: kernel_params must carry {GUEST_CONFIDENTIAL_PARAM}",
                            profile.kernel_params))
    return out


@dataclass
class _Checker:
    tee: TeeKind
    conflicts: list[str] = field(default_factory=list)

    def require(self, ok: bool, conflict: str) -> None:
        if not ok:
            self.conflicts.append(conflict)

    def raise_if_any(self) -> None:
        if self.conflicts:
            raise InvariantError(self.tee.value, "; ".join(self.conflicts))


def _accel(profile: RuntimeProfile, vm: VmInstance) -> str:
    return vm.accel if vm.accel is not None else profile.accel


def _check_len(chk: _Checker, name: str, blob: bytes | None, exact: int) -> None:
    if blob is not None:
        chk.require(len(blob) == exact, f"{name} must be exactly {exact} bytes, got {len(blob)}")


def check_invariants(profile: RuntimeProfile, vm: VmInstance) -> None:
    """Raise InvariantError listing every conflict in this profile/VM combination."""
    tee = profile.tee
    chk = _Checker(tee)
    accel = _accel(profile, vm)
    machine = profile.machine_type or profile.arch.machine_type
    chk.require(accel in ("kvm", "tcg"), f"accelerator must be kvm or tcg at launch, got {accel!r}")
    chk.require(profile.vcpus >= 1, f"vcpus must be >= 1, got {profile.vcpus}")
    chk.require(profile.memory_mib >= 64, f"memory must be >= 64 MiB, got {profile.memory_mib}")
    if tee.arch is not None:
        chk.require(profile.arch is tee.arch,
                    f"{tee.value} exists only on {tee.arch.value}, not {profile.arch.value}")
    chk.require(machine.startswith(profile.arch.machine_type),
                f"machine {machine!r} is not a {profile.arch.machine_type} machine "
                f"({profile.arch.value})")
    expected = params_class(tee)
    if expected is None:
        chk.require(profile.tee_params is None,
                    f"{tee.value} takes no TEE parameters, got {type(profile.tee_params).__name__}")
    else:
        chk.require(isinstance(profile.tee_params, expected),
                    f"{tee.value} needs {expected.__name__}, got "
                    f"{type(profile.tee_params).__name__}")
    if isinstance(vm.vsock, HybridVsock):
        chk.require(profile.arch is Arch.X86_64, "hybrid vsock is only wired for x86_64")
    if (profile.image is not None and profile.confidential and profile.kernel is not None
            and tee is not TeeKind.S390_PV):  # no kernel: the firmware boots the disk itself
        chk.require(profile.image.verity is not None,
                    f"root image {profile.image.path} has no dm-verity parameters: a "
                    "confidential guest mounts its root only under a measured root hash "
                    f"(the builder writes them to {profile.image.path.name}.verity)")
    for conflict in tee_safety_conflicts(profile):
        chk.conflicts.append(f"{conflict.key}: {conflict.message}")
    if vm.initdata is not None:
        _check_initdata(chk, profile, vm.initdata)
    for conflict in confidential_conflicts(profile, vm.shares):
        chk.conflicts.append(f"{conflict.key}: {conflict.message}")
    if tee.confidential:
        _check_tee(chk, profile, vm, accel)
    params = profile.tee_params
    if tee in (TeeKind.SEV, TeeKind.SEV_ES) and isinstance(params, SevParams):
        _check_sev(chk, profile, params)
    if tee is TeeKind.SNP and isinstance(params, SnpParams):
        _check_snp(chk, profile, params)
    if tee is TeeKind.TDX and isinstance(params, TdxParams):
        _check_tdx(chk, profile, params)
    if tee is TeeKind.S390_PV:
        chk.require(profile.cpu_model in (None, "host"),
                    f"s390-pv needs -cpu host (unpack facility), got {profile.cpu_model!r}")
        chk.require(profile.initrd is None,
                    "s390-pv boots one genprotimg image: initrd must be inside it, not separate")
        chk.require(not (profile.kernel_params or vm.extra_kernel_params),
                    "s390-pv boots one genprotimg image: kernel parameters must be inside it")
        chk.require(profile.firmware is None, "s390-pv takes no -bios/pflash firmware")
    chk.raise_if_any()


def _check_initdata(chk: _Checker, profile: RuntimeProfile, initdata: Initdata) -> None:
    tee = profile.tee
    if tee.confidential and tee.initdata_field is None:
        chk.require(profile.allow_unbound_initdata, unbound_initdata_message(tee))
    params = profile.tee_params
    if isinstance(params, SnpParams):
        chk.require(params.host_data is None, "host_data is set by the profile and initdata "
                    "binds it too: remove snp.host_data")
    if isinstance(params, TdxParams):
        chk.require(params.mrconfigid is None, "mrconfigid is set by the profile and initdata "
                    "binds it too: remove tdx.mrconfigid")


def _check_tee(chk: _Checker, profile: RuntimeProfile, vm: VmInstance, accel: str) -> None:
    """What TEE hardware needs beyond the :data:`CONFIDENTIAL_INVARIANTS`."""
    chk.require(accel == "kvm", f"confidential guests need accelerator kvm, got {accel!r}")
    chk.require(not isinstance(vm.vsock, HybridVsock),
                "hybrid vsock needs shared guest memory (vhost-user); confidential guests use "
                "kernel vhost-vsock only")
    chk.require(profile.vsock != "hybrid",
                "vsock = \"hybrid\" needs shared guest memory; use \"kernel\"")
    consoles = _kernel_console_params(vm.extra_kernel_params)
    chk.require(not consoles or profile.debug_console_bytes is not None,
                f"extra kernel parameters {' '.join(consoles)} send guest output to the host; "
                "a TEE console needs the explicit, capped debug_console_bytes")


def _check_sev(chk: _Checker, profile: RuntimeProfile, params: SevParams) -> None:
    tee = profile.tee
    if params.policy is not None:
        has_es = bool(params.policy & SEV_POLICY_ES)
        if tee is TeeKind.SEV:
            chk.require(not has_es, f"policy {params.policy:#x} sets the SEV-ES bit 0x4: use "
                        "profile sev-es")
        else:
            chk.require(has_es, f"policy {params.policy:#x} lacks the SEV-ES bit 0x4")
    chk.require(profile.firmware is not None, f"{tee.value} needs OVMF firmware with AMD SEV "
                "support (firmware or firmware_feature)")
    if params.kernel_hashes:
        chk.require(profile.kernel is not None, "kernel_hashes needs direct kernel boot (kernel)")


def _check_snp(chk: _Checker, profile: RuntimeProfile, params: SnpParams) -> None:
    chk.require(bool(params.policy & SNP_POLICY_RESERVED_ONE),
                f"SNP policy {params.policy:#x} must set reserved bit 17 (0x20000)")
    chk.require(params.policy < 2**64, "SNP policy must fit in 64 bits")
    chk.require(isinstance(profile.firmware, Bios),
                "SNP needs firmware loaded with -bios (pflash does not work with SNP), got "
                f"{type(profile.firmware).__name__ if profile.firmware else 'none'}")
    _check_len(chk, "host_data", params.host_data, SNP_HOST_DATA_LEN)
    _check_len(chk, "id_block", params.id_block, SNP_ID_BLOCK_LEN)
    if params.id_auth is not None:
        chk.require(len(params.id_auth) <= SNP_ID_AUTH_MAX,
                    f"id_auth must be at most {SNP_ID_AUTH_MAX} bytes, got {len(params.id_auth)}")
    chk.require((params.id_block is None) == (params.id_auth is None),
                "id_block and id_auth come as a pair")
    if params.kernel_hashes:
        chk.require(profile.kernel is not None, "kernel_hashes needs direct kernel boot (kernel)")


def _check_tdx(chk: _Checker, profile: RuntimeProfile, params: TdxParams) -> None:
    chk.require(profile.cpu_model in (None, "host"),
                f"TDX needs -cpu host (named CPU models are refused), got {profile.cpu_model!r}")
    chk.require(isinstance(profile.firmware, Bios),
                "TDX needs TDVF loaded with -bios (no pflash), got "
                f"{type(profile.firmware).__name__ if profile.firmware else 'none'}")
    _check_len(chk, "mrconfigid", params.mrconfigid, TDX_MR_LEN)
    _check_len(chk, "mrowner", params.mrowner, TDX_MR_LEN)
    _check_len(chk, "mrownerconfig", params.mrownerconfig, TDX_MR_LEN)


# --- composition -----------------------------------------------------------------------------

_GUEST_ID = {
    TeeKind.SEV: "sev0",
    TeeKind.SEV_ES: "sev0",
    TeeKind.SNP: "snp0",
    TeeKind.TDX: "tdx0",
    TeeKind.S390_PV: "pv0",
    TeeKind.PEF: "pef0",
}


def _sev_geometry(profile: RuntimeProfile, vm: VmInstance, cbitpos: int | None,
                  rpb: int | None) -> tuple[int, int]:
    cbit = cbitpos if cbitpos is not None else vm.sev_cbitpos
    bits = rpb if rpb is not None else vm.sev_reduced_phys_bits
    if cbit is None or bits is None:
        raise InvariantError(profile.tee.value, "cbitpos and reduced_phys_bits are unknown: set "
                             "them in the profile or probe query-sev-capabilities first")
    return cbit, bits


def confidential_object(profile: RuntimeProfile, vm: VmInstance) -> ConfidentialGuest | None:
    tee = profile.tee
    params = profile.tee_params
    direct_boot = profile.kernel is not None
    if tee is TeeKind.NONE:
        return None
    gid = _GUEST_ID[tee]
    bound = None if vm.initdata is None or tee.initdata_field is None else (
        vm.initdata.fitted(tee.initdata_field[1]))
    if isinstance(params, SevParams):
        cbit, bits = _sev_geometry(profile, vm, params.cbitpos, params.reduced_phys_bits)
        return SevGuest(
            id=gid, cbitpos=cbit, reduced_phys_bits=bits, policy=_sev_policy(tee, params),
            kernel_hashes=direct_boot if params.kernel_hashes is None else params.kernel_hashes,
            legacy_vm_type=params.legacy_vm_type,
        )
    if isinstance(params, SnpParams):
        cbit, bits = _sev_geometry(profile, vm, params.cbitpos, params.reduced_phys_bits)
        return SnpGuest(
            id=gid, cbitpos=cbit, reduced_phys_bits=bits, policy=params.policy,
            kernel_hashes=direct_boot if params.kernel_hashes is None else params.kernel_hashes,
            host_data=bound if bound is not None else params.host_data,
            id_block=params.id_block, id_auth=params.id_auth,
            author_key_enabled=params.author_key_enabled,
        )
    if isinstance(params, TdxParams):
        return TdxGuest(
            id=gid, sept_ve_disable=params.sept_ve_disable,
            mrconfigid=bound if bound is not None else params.mrconfigid,
            mrowner=params.mrowner, mrownerconfig=params.mrownerconfig,
            quote_generation_socket=params.quote_generation_socket,
            attributes=params.attributes,
        )
    if tee is TeeKind.S390_PV:
        return S390PvGuest(id=gid)
    return PefGuest(id=gid)


def _machine(profile: RuntimeProfile, backend: MemfdBackend | None) -> Machine:
    tee = profile.tee
    mtype = profile.machine_type or profile.arch.machine_type
    x86_tee = tee.confidential and profile.arch is Arch.X86_64
    return Machine(
        type=mtype,
        confidential_guest_support=_GUEST_ID.get(tee),
        smm=False if x86_tee else None,
        pic=False if tee is TeeKind.TDX else None,
        memory_backend=None if backend is None else backend.id,
    )


def _default_cpu(profile: RuntimeProfile, accel: str) -> str | None:
    if profile.cpu_model is not None:
        return profile.cpu_model
    if profile.tee in (TeeKind.TDX, TeeKind.S390_PV):
        return "host"
    if profile.tee in (TeeKind.SNP, TeeKind.SEV, TeeKind.SEV_ES):
        return "EPYC-v4"
    if profile.arch is Arch.X86_64:
        return "host" if accel == "kvm" else "max"
    return None


def _with_transport(device: QemuArgs, transport: str, iommu: bool) -> QemuArgs:
    """Re-render a device for the architecture's virtio transport and the TEE's DMA rules."""
    if isinstance(device, VirtioBlk | VirtioNetTap | VhostVsock):
        return replace(device, transport=transport, iommu_platform=iommu or device.iommu_platform)
    if isinstance(device, VhostUserVsock | NinePShare | VirtioFsShare | VirtioBalloon):
        return replace(device, transport=transport)
    return device


def _console(profile: RuntimeProfile, vm: VmInstance) -> Console | None:
    """A capped ring when the profile asks for one; a file for development VMs; on a TEE
    nothing at all (the host must not read what the guest prints)."""
    if profile.debug_console_bytes is not None:
        return RingbufConsole(profile.debug_console_bytes, profile.arch)
    if profile.tee.confidential:
        return None
    return SerialConsole(vm.console_pipe, profile.arch)


def kernel_append(profile: RuntimeProfile, vm: VmInstance) -> str:
    """The guest kernel command line: the profile's parameters, how to mount the root image
    (``coco.root=``, with its dm-verity root hash on a confidential profile: measured with the
    command line), then the VM's extra ones. s390-pv boots one genprotimg image whose
    command line is inside it (the root parameter too: see firmware-configs/qemu-se.toml)."""
    root = None
    if profile.image is not None and profile.tee is not TeeKind.S390_PV:
        root = profile.image.kernel_param()
    return " ".join(p for p in (profile.kernel_params, root, vm.extra_kernel_params) if p)


def build_command_line(profile: RuntimeProfile, vm: VmInstance) -> QemuCommandLine:
    """Compose the QEMU command line for one VM of this profile (invariants checked first)."""
    check_invariants(profile, vm)
    if profile.tee.confidential and vm.vsock is None:
        raise InvariantError(profile.tee.value, "no vsock device: a TEE guest's agent would be "
                             "unreachable (vsock resolved to none: is /dev/vhost-vsock there?)")
    accel = _accel(profile, vm)
    transport = profile.arch.virtio_transport
    # Confidential guests refuse virtio devices without VIRTIO_F_ACCESS_PLATFORM (bounce
    # buffers through shared pages); s390 Secure Execution requires it outright.
    iommu = profile.tee.confidential
    needs_shared_ram = isinstance(vm.vsock, HybridVsock) or any(
        isinstance(s, VirtioFsShare) for s in vm.shares)
    backend = MemfdBackend("mem", profile.memory_mib) if needs_shared_ram else None

    devices: list[QemuArgs] = []
    if profile.image is not None:
        # One file for every pod of the node, read through the host's page cache (shared by
        # all of them: QEMU's default cache mode, not O_DIRECT).
        devices.append(VirtioBlk("image0", profile.image.path, readonly=True, cache=None))
    if vm.initdata is not None:
        # Read-only and tiny: QEMU's default cache (no O_DIRECT, which tmpfs may refuse).
        devices.append(VirtioBlk("initdata", vm.initdata_disk, readonly=True, cache=None))
    devices += list(vm.disks) + list(vm.nics)
    if profile.free_page_reporting:
        devices.append(VirtioBalloon())
    if isinstance(vm.vsock, KernelVsock):
        devices.append(VhostVsock("vsock0", vm.vsock.guest_cid, vm.vsock.vhost_fd))
    elif isinstance(vm.vsock, HybridVsock):
        devices.append(VhostUserVsock("vsock0", vm.vsock.vhost_user_socket))
    devices += list(vm.shares)
    devices = [_with_transport(d, transport, iommu) for d in devices]

    append = kernel_append(profile, vm)
    boot = None
    if profile.kernel is not None:
        boot = DirectBoot(profile.kernel, profile.initrd, append)
    cpu_model = _default_cpu(profile, accel)
    return QemuCommandLine(
        binary=profile.qemu,
        name=vm.name,
        machine=_machine(profile, backend),
        # SNP and TDX keep the IOAPIC in QEMU (split irqchip): the in-kernel one cannot
        # inject interrupts into a guest whose state the host cannot read.
        accel=Accel(accel, "split" if profile.tee in (TeeKind.SNP, TeeKind.TDX) else None),
        cpu=None if cpu_model is None else Cpu(cpu_model),
        smp=Smp(profile.vcpus, profile.max_vcpus),
        memory=Memory(profile.memory_mib, profile.memory_slots, profile.max_memory_mib),
        memory_backend=backend,
        firmware=profile.firmware,
        boot=boot,
        confidential_guest=confidential_object(profile, vm),
        devices=tuple(devices),
        serial=_console(profile, vm),
        qmp=QmpSocket(vm.qmp_socket),
        no_reboot=True,
        start_paused=vm.start_paused,
        # A VM that serves a host share never runs QEMU as root (see ReducedPrivileges).
        run_as=ReducedPrivileges() if vm.shares else None,
    )


__all__ = [
    "CONFIDENTIAL_INVARIANTS",
    "Bios",
    "ConfidentialInvariant",
    "Conflict",
    "HybridVsock",
    "KernelVsock",
    "NinePShare",
    "Pflash",
    "RuntimeProfile",
    "SevParams",
    "SnpParams",
    "TdxParams",
    "TeeKind",
    "VirtioFsShare",
    "VmInstance",
    "build_command_line",
    "check_invariants",
    "confidential_conflicts",
    "kernel_append",
    "tee_safety_conflicts",
]
