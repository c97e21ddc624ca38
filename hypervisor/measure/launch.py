"""From a runtime profile to what its TEE will report, through the launch's own command line.

One source of truth: :func:`launch_inputs` builds the QEMU command line exactly as a launch
would (:func:`hypervisor.profile.build_command_line`) and reads the firmware, kernel, initrd,
command line, kernel-hashes choice, vCPUs, CPU model, policy and bound initdata back from its
typed parts, so what is measured cannot drift from what is launched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from hypervisor.cmdline import Bios, SevGuest, SnpGuest, TdxGuest
from hypervisor.errors import InvariantError
from hypervisor.measure import amd, tdx, vmsa
from hypervisor.measure.errors import MeasureError
from hypervisor.measure.ovmf import OvmfImage
from hypervisor.profile import (
    SNP_HOST_DATA_LEN,
    TDX_MR_LEN,
    KernelVsock,
    RuntimeProfile,
    TeeKind,
    VmInstance,
    build_command_line,
)
from protocols.initdata import Initdata

# Stand-ins for what only a real launch knows; none of them is measured.
PLACEHOLDER_RUN_DIR = Path("/run/coco-shim/measure")
_PLACEHOLDER_VSOCK = KernelVsock(guest_cid=3, vhost_fd=3)
_PLACEHOLDER_CBITPOS, _PLACEHOLDER_RPB = 51, 1
_MEASURED_TEES = (TeeKind.SEV, TeeKind.SEV_ES, TeeKind.SNP, TeeKind.TDX)


@dataclass(frozen=True)
class FileInput:
    """A measured file: the path in the QEMU argv, where it was read here, its SHA-256."""

    path: Path
    host_path: Path
    sha256: str

    def to_json(self) -> dict[str, str]:
        return {"path": str(self.path), "read_from": str(self.host_path),
                "sha256": self.sha256}


@dataclass(frozen=True)
class LaunchInputs:
    """Every input of the launch measurement, as the QEMU command line has it."""

    profile: str
    tee: TeeKind
    argv: tuple[str, ...]
    firmware: FileInput
    kernel: FileInput | None
    initrd: FileInput | None
    append: str | None  # None: no direct kernel boot
    kernel_hashes: bool | None  # AMD only (TDX: TDVF measures the kernel into RTMRs)
    vcpus: int
    cpu_model: str | None
    policy: int | None
    host_data: bytes | None  # SNP: what the report's HOST_DATA will hold
    mrconfigid: bytes | None  # TDX: what the report's MRCONFIGID will hold
    legacy_vm_type: bool | None  # SEV / SEV-ES only
    initdata: Initdata | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, object]:
        return {
            "profile": self.profile, "tee": self.tee.value,
            "firmware": self.firmware.to_json(),
            "kernel": None if self.kernel is None else self.kernel.to_json(),
            "initrd": None if self.initrd is None else self.initrd.to_json(),
            "cmdline": self.append, "kernel_hashes": self.kernel_hashes, "vcpus": self.vcpus,
            "cpu_model": self.cpu_model,
            "policy": None if self.policy is None else hex(self.policy),
            "legacy_vm_type": self.legacy_vm_type,
            "initdata": None if self.initdata is None else {
                "algorithm": self.initdata.algorithm,
                "digest": self.initdata.digest().hex(),
                "toml_sha256": hashlib.sha256(self.initdata.toml).hexdigest()},
            "qemu_argv": list(self.argv),
            "qemu_argv_placeholders": "run directory, vsock guest CID and fd, and cbitpos/"
            "reduced-phys-bits when the launch probes them: none of them is measured",
        }


def _host_path(profile: RuntimeProfile, path: Path) -> Path:
    return profile.qemu_root / path.relative_to("/") if path.is_absolute() else path


def _file(profile: RuntimeProfile, path: Path, what: str) -> FileInput:
    host = _host_path(profile, path)
    try:
        digest = amd.sha256_file(host).hex()
    except OSError as err:
        raise MeasureError(f"{what} {path} (read from {host}): {err.strerror}") from err
    return FileInput(path, host, digest)


def launch_inputs(profile: RuntimeProfile, *, vcpus: int | None = None,
                  initdata: Initdata | None = None) -> LaunchInputs:
    """The measured inputs of one pod shape, read back from the command line QEMU would get."""
    tee = profile.tee
    if tee not in _MEASURED_TEES:
        why = ("no TEE measures this launch" if tee is TeeKind.NONE else
               "its launch measurement is not computed here (s390x Secure Execution measures "
               "the genprotimg image, PEF the ultravisor's ESM blob)")
        raise MeasureError(f"runtime profile {profile.source} (tee {tee.value}): {why}")
    if vcpus is not None:
        if vcpus < 1:
            raise MeasureError(f"vcpus must be >= 1, got {vcpus}")
        profile = replace(profile, vcpus=vcpus, max_vcpus=None)
    vm = VmInstance(run_dir=PLACEHOLDER_RUN_DIR, vsock=_PLACEHOLDER_VSOCK,
                    sev_cbitpos=_PLACEHOLDER_CBITPOS, sev_reduced_phys_bits=_PLACEHOLDER_RPB,
                    initdata=initdata)
    try:
        cmd = build_command_line(profile, vm)
    except InvariantError as err:
        raise MeasureError(f"runtime profile {profile.source} cannot launch: {err}") from err
    if not isinstance(cmd.firmware, Bios):
        kind = "no firmware" if cmd.firmware is None else "pflash firmware"
        feature = tee.firmware_feature or tee.value
        raise MeasureError(f"runtime profile {profile.source}: {kind}; the measurement needs a "
                           f"memory-mapped (-bios) OVMF for {feature} (firmware_feature = "
                           f"\"{feature}\" or firmware = <path>)")
    guest = cmd.confidential_guest
    boot = cmd.boot
    policy: int | None = None
    kernel_hashes: bool | None = None
    host_data = mrconfigid = None
    legacy: bool | None = None
    if isinstance(guest, SnpGuest):
        policy, kernel_hashes = guest.policy, guest.kernel_hashes
        host_data = guest.host_data if guest.host_data is not None else bytes(SNP_HOST_DATA_LEN)
    elif isinstance(guest, SevGuest):
        policy, kernel_hashes, legacy = guest.policy, guest.kernel_hashes, guest.legacy_vm_type
    elif isinstance(guest, TdxGuest):
        mrconfigid = guest.mrconfigid if guest.mrconfigid is not None else bytes(TDX_MR_LEN)
    return LaunchInputs(
        profile=profile.source, tee=tee, argv=tuple(cmd.to_argv()),
        firmware=_file(profile, cmd.firmware.path, "firmware"),
        kernel=None if boot is None else _file(profile, boot.kernel, "kernel"),
        initrd=None if boot is None or boot.initrd is None else
        _file(profile, boot.initrd, "initrd"),
        append=None if boot is None else boot.append,
        kernel_hashes=kernel_hashes, vcpus=cmd.smp.cpus,
        cpu_model=None if cmd.cpu is None else cmd.cpu.model,
        policy=policy, host_data=host_data, mrconfigid=mrconfigid, legacy_vm_type=legacy,
        initdata=initdata,
    )


@dataclass(frozen=True)
class Value:
    """One expected value of the TEE's report (or an input it is checked with)."""

    name: str  # the RVPS / report name (snp_launch_measurement, mr_td, ...)
    value: str  # lowercase hex, or a hex integer for policies
    meaning: str


@dataclass(frozen=True)
class Measurement:
    inputs: LaunchInputs
    values: tuple[Value, ...]
    notes: tuple[str, ...]
    cpu_signature: int | None = None
    guest_features: int | None = None
    reference_command: tuple[str, ...] | None = None  # sev-snp-measure on the same inputs

    def value(self, name: str) -> str:
        for v in self.values:
            if v.name == name:
                return v.value
        raise KeyError(name)

    def to_json(self) -> dict[str, object]:
        inputs = self.inputs.to_json()
        inputs["cpu_signature"] = None if self.cpu_signature is None else hex(
            self.cpu_signature)
        inputs["guest_features"] = None if self.guest_features is None else hex(
            self.guest_features)
        return {
            "inputs": inputs,
            "results": {v.name: v.value for v in self.values},
            "meaning": {v.name: v.meaning for v in self.values},
            "notes": list(self.notes),
            "reference_command": None if self.reference_command is None else list(
                self.reference_command),
        }


def measure(profile: RuntimeProfile, *, vcpus: int | None = None,
            initdata: Initdata | None = None) -> Measurement:
    """What the TEE will report for a pod of this profile with ``vcpus`` and ``initdata``."""
    inputs = launch_inputs(profile, vcpus=vcpus, initdata=initdata)
    try:
        image = OvmfImage.parse(inputs.firmware.host_path.read_bytes(), str(inputs.firmware.path))
    except OSError as err:
        raise MeasureError(f"firmware {inputs.firmware.host_path}: {err.strerror}") from err
    init_values = () if initdata is None else (
        Value("init_data", initdata.digest().hex(),
              f"{initdata.algorithm} of the initdata TOML (what a KBS recomputes)"),)
    if inputs.tee is TeeKind.TDX:
        return _tdx(inputs, image, init_values)
    return _amd(inputs, image, init_values)


def _hashes(inputs: LaunchInputs) -> amd.KernelHashes | None:
    if not inputs.kernel_hashes:
        return None
    assert inputs.kernel is not None and inputs.append is not None  # invariant: direct boot
    return amd.KernelHashes.of(inputs.kernel.host_path,
                               None if inputs.initrd is None else inputs.initrd.host_path,
                               inputs.append)


def _amd(inputs: LaunchInputs, image: OvmfImage,
         init_values: tuple[Value, ...]) -> Measurement:
    hashes = _hashes(inputs)
    policy = Value("policy", hex(inputs.policy or 0), "guest policy the launch sets")
    if inputs.tee is TeeKind.SEV:
        digest = amd.sev_launch_digest(image, hashes)
        return Measurement(inputs, (Value(
            "sev_launch_digest", digest.hex(), "SEV GCTX.LD (SHA-256); the firmware's "
            "MEASUREMENT is an HMAC over it with the session's TIK"), policy, *init_values),
            _unbound_note(inputs))
    signature = vmsa.model_signature(inputs.cpu_model)
    if inputs.tee is TeeKind.SEV_ES:
        if inputs.legacy_vm_type:
            raise MeasureError("legacy_vm_type = true: KVM_SEV_INIT lets the host kernel pick "
                               "the VMSA features (debug-swap), so the SEV-ES digest is not "
                               "computable; set legacy_vm_type = false (KVM_SEV_INIT2)")
        digest = amd.sev_es_launch_digest(image, inputs.vcpus, signature, hashes)
        return Measurement(inputs, (Value(
            "sev_es_launch_digest", digest.hex(), "SEV-ES GCTX.LD (SHA-256) over firmware, "
            "hashes table and VMSAs; the MEASUREMENT is an HMAC over it"), policy,
            *init_values), _unbound_note(inputs), signature, 0)
    features = vmsa.SEV_FEATURE_SNP_ACTIVE  # QEMU 11.1 asks KVM for no other VMSA feature
    digest = amd.snp_launch_digest(image, inputs.vcpus, signature, features, hashes)
    assert inputs.host_data is not None
    return Measurement(
        inputs,
        (Value("snp_launch_measurement", digest.hex(), "MEASUREMENT of the SNP attestation "
               "report"),
         Value("snp_host_data", inputs.host_data.hex(), "HOST_DATA of the report (initdata "
               "digest fitted to 32 bytes, zeros without initdata)"),
         policy, *init_values),
        ("guest features 0x1 (SNP_ACTIVE): QEMU 11.1 sets no other SEV feature",),
        signature, features, _reference_command(inputs, signature, features))


def _unbound_note(inputs: LaunchInputs) -> tuple[str, ...]:
    if inputs.initdata is None:
        return ()
    return (f"{inputs.tee.value} has no launch field for initdata: the digest above is not "
            "bound to the launch (profile sets allow_unbound_initdata)",)


def _reference_command(inputs: LaunchInputs, signature: int,
                       features: int) -> tuple[str, ...]:
    cmd = ["sev-snp-measure", "--mode", "snp", "--vcpus", str(inputs.vcpus), "--vcpu-sig",
           hex(signature), "--guest-features", hex(features), "--ovmf",
           str(inputs.firmware.host_path)]
    if inputs.kernel_hashes and inputs.kernel is not None:
        cmd += ["--kernel", str(inputs.kernel.host_path)]
        if inputs.initrd is not None:
            cmd += ["--initrd", str(inputs.initrd.host_path)]
        cmd += ["--append", inputs.append or ""]
    return tuple(cmd)


def _tdx(inputs: LaunchInputs, image: OvmfImage,
         init_values: tuple[Value, ...]) -> Measurement:
    value = tdx.mrtd(image)
    state = tdx.cross_check(inputs.firmware.sha256, value)
    assert inputs.mrconfigid is not None
    return Measurement(
        inputs,
        (Value("mr_td", value.hex(), "MRTD of the TD quote (firmware pages as TDX adds them)"),
         Value("mr_config_id", inputs.mrconfigid.hex(), "MRCONFIGID (initdata digest fitted "
               "to 48 bytes, zeros without initdata)"), *init_values),
        (f"MRTD {state}",
         "RTMR0-3 not computed: they hold TDVF's event log (TD HOB, ACPI tables, kernel, "
         "initrd, command line), which depends on more than the profile",))
