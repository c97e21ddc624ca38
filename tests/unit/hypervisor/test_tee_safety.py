"""TEE launches the host cannot debug or swap, and initdata bound into the launch.

Every refused setting is refused twice: by the TOML loader (ConfigError naming the key) and
by ``check_invariants`` for profiles built in code (InvariantError naming the setting).
"""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from hypervisor.cmdline import Arch, RingbufConsole
from hypervisor.config import parse_profile
from hypervisor.errors import ConfigError, InvariantError
from hypervisor.initdata import (
    InitdataNotAllowedError,
    load_initdata_file,
    resolve_initdata,
    write_disk,
)
from hypervisor.profile import (
    KernelVsock,
    RuntimeProfile,
    SevParams,
    SnpParams,
    TdxParams,
    TeeKind,
    VmInstance,
    build_command_line,
    confidential_conflicts,
    tee_safety_conflicts,
)
from protocols import initdata
from protocols.initdata import InitdataError, InitdataVersionError
from tests.unit.hypervisor.test_profiles import PROFILES, RUN
from tests.unit.protocols.test_initdata import DOCS, EXPECTED, annotation_of

VSOCK = KernelVsock(7, 9)
ANN = initdata.ANNOTATION


def argv(profile: RuntimeProfile, **kw: object) -> list[str]:
    return build_command_line(profile, VmInstance(run_dir=RUN, vsock=VSOCK, **kw)  # type: ignore[arg-type]
                              ).to_argv()


def tee_object(args: list[str]) -> str:
    return args[args.index("-object") + 1]


# --- the table of refused TEE settings ------------------------------------------------------

S = PROFILES
SNP_P = SnpParams(cbitpos=51, reduced_phys_bits=1)
REFUSED: list[tuple[str, RuntimeProfile, str, str]] = [
    ("sev-without-nodbg", replace(S["sev"], tee_params=SevParams(policy=0x0, cbitpos=47,
                                                                reduced_phys_bits=1)),
     "sev.policy", "policy 0x0 lacks NODBG (bit 0)"),
    ("sev-es-without-nodbg", replace(S["sev-es"], tee_params=SevParams(
        policy=0x4, cbitpos=47, reduced_phys_bits=1)),
     "sev.policy", "policy 0x4 lacks NODBG (bit 0)"),
    ("snp-debug", replace(S["snp"], tee_params=replace(SNP_P, policy=0xB0000)),
     "snp.policy", "policy 0xb0000 sets DEBUG (bit 19)"),
    ("snp-migrate-ma", replace(S["snp"], tee_params=replace(SNP_P, policy=0x70000)),
     "snp.policy", "policy 0x70000 sets MIGRATE_MA (bit 18)"),
    ("tdx-debug", replace(S["tdx"], tee_params=TdxParams(attributes=0x10000001)),
     "tdx.attributes", "attributes 0x10000001 set DEBUG (bit 0)"),
    ("snp-direct-boot-unmeasured", replace(S["snp"], tee_params=replace(
        SNP_P, kernel_hashes=False)), "snp.kernel_hashes",
     "direct kernel boot without kernel_hashes"),
    ("sev-direct-boot-unmeasured", replace(S["sev"], tee_params=SevParams(
        cbitpos=47, reduced_phys_bits=1, kernel_hashes=False)), "sev.kernel_hashes",
     "direct kernel boot without kernel_hashes"),
    ("snp-console", replace(S["snp"], kernel_params="console=ttyS0 quiet"),
     "hypervisor.kernel_params", "console=ttyS0 sends guest output to the host"),
    ("tdx-earlyprintk", replace(S["tdx"], kernel_params="earlyprintk=serial"),
     "hypervisor.kernel_params", "earlyprintk=serial sends guest output"),
    ("pef-hvc-console", replace(S["pef"], kernel_params="console=hvc0"),
     "hypervisor.kernel_params", "console=hvc0 sends guest output"),
    ("snp-vsock-none", replace(S["snp"], vsock="none"), "hypervisor.vsock",
     "a TEE guest without vsock cannot be reached"),
    ("tdx-free-page-reporting", replace(S["tdx"], free_page_reporting=True),
     "hypervisor.free_page_reporting", "virtio-balloon would hand the guest's private pages"),
    ("tdx-kernel-params-annotation", replace(S["tdx"], enable_annotations=(
        "io.katacontainers.config.hypervisor.kernel_params",)),
     "runtime.enable_annotations", "would let a pod change the measured kernel command line"),
    ("sev-default-initdata-unbound", replace(S["sev"], initdata=Path("/etc/i.toml")),
     "runtime.initdata", "sev has no launch field to bind initdata to"),
    ("machine-type-comma", replace(S["snp"], machine_type="q35,smm=on"),
     "hypervisor.machine_type", "may only contain letters, digits"),
    ("cpu-model-flags", replace(S["snp"], cpu_model="EPYC-v4,+invtsc"),
     "hypervisor.cpu_model", "may only contain letters, digits"),
    ("none-cpu-model-space", replace(S["none"], cpu_model="max -S"),
     "hypervisor.cpu_model", "may only contain letters, digits"),
    ("debug-console-not-power-of-two", replace(S["snp"], debug_console_bytes=5000),
     "hypervisor.debug_console_bytes", "must be a power of two from 4096 to 16777216"),
]


@pytest.mark.parametrize(("case", "prof", "key", "message"), REFUSED,
                         ids=[r[0] for r in REFUSED])
def test_refused_setting_names_key_and_cause(case: str, prof: RuntimeProfile, key: str,
                                             message: str) -> None:
    found = {(c.key, c.message)
             for c in [*tee_safety_conflicts(prof), *confidential_conflicts(prof)]}
    assert any(k == key and message in m for k, m in found), found
    with pytest.raises(InvariantError) as info:
        argv(prof, accel="tcg" if prof.tee is TeeKind.NONE else None)
    assert f"{key}: " in str(info.value) and message in str(info.value)


def test_the_shipped_style_profiles_have_no_conflict() -> None:
    for name, prof in PROFILES.items():
        assert tee_safety_conflicts(prof) == [], name


def test_allow_debug_relaxes_debug_bits_only() -> None:
    debug = [replace(S["sev"], allow_debug=True, tee_params=SevParams(
                 policy=0x0, cbitpos=47, reduced_phys_bits=1)),
             replace(S["snp"], allow_debug=True, tee_params=replace(SNP_P, policy=0xB0000)),
             replace(S["tdx"], allow_debug=True, tee_params=TdxParams(attributes=0x1))]
    for prof in debug:
        assert tee_safety_conflicts(prof) == [], prof.tee
        argv(prof)
    migrate = replace(S["snp"], allow_debug=True, tee_params=replace(SNP_P, policy=0x70000))
    assert [c.key for c in tee_safety_conflicts(migrate)] == ["snp.policy"]


def test_no_kernel_hashes_is_fine_without_direct_boot() -> None:
    prof = replace(S["snp"], kernel=None, initrd=None, kernel_params="",
                   tee_params=replace(SNP_P, kernel_hashes=False))
    assert "kernel-hashes=off" in tee_object(argv(prof))


def test_tee_profiles_have_no_console_device() -> None:
    for name, prof in PROFILES.items():
        args = argv(prof, accel="tcg" if name == "none" else None)
        assert ("-chardev" in args) == (name == "none"), name


def test_debug_console_is_a_capped_ring_and_allows_console_param() -> None:
    prof = replace(S["snp"], kernel_params="console=ttyS0", debug_console_bytes=65536)
    args = argv(prof)
    assert args[args.index("-chardev"):args.index("-chardev") + 4] == [
        "-chardev", "ringbuf,id=console0,size=65536", "-device", "isa-serial,chardev=console0"]
    assert "console.log" not in " ".join(args)
    pef = replace(S["pef"], kernel_params="console=hvc0", debug_console_bytes=4096)
    assert "spapr-vty,chardev=console0" in argv(pef)
    assert RingbufConsole(4096, Arch.S390X).to_argv()[-1] == "sclpconsole,chardev=console0"


def test_console_in_extra_kernel_params_is_refused_on_a_tee() -> None:
    with pytest.raises(InvariantError, match="extra kernel parameters console=ttyS0"):
        argv(S["snp"], extra_kernel_params="console=ttyS0")
    argv(S["none"], accel="tcg", extra_kernel_params="console=ttyS0")


def test_tee_without_a_vsock_device_is_refused() -> None:
    with pytest.raises(InvariantError, match="no vsock device"):
        build_command_line(S["tdx"], VmInstance(run_dir=RUN))


# --- the same refusals from a TOML profile (ConfigError naming the key) ---------------------

SNP_TOML = """
[hypervisor]
tee = "snp"
qemu_path = "/usr/bin/qemu-system-x86_64"
kernel = "/guest/vmlinuz"
firmware = "/fw.fd"
vsock = "kernel"
{hv}
[snp]
cbitpos = 51
reduced_phys_bits = 1
{snp}
[runtime]
{rt}
"""
TOML_REFUSALS = [
    ({"snp": "policy = 0xB0000"}, "snp.policy", "sets DEBUG (bit 19)"),
    ({"snp": "policy = 0x70000"}, "snp.policy", "sets MIGRATE_MA (bit 18)"),
    ({"snp": "kernel_hashes = false"}, "snp.kernel_hashes", "without kernel_hashes"),
    ({"hv": 'kernel_params = "console=ttyS0"'}, "hypervisor.kernel_params", "console=ttyS0"),
    ({"hv": 'vsock = "none"'}, "hypervisor.vsock", "without vsock"),
    ({"hv": 'machine_type = "q35,accel=tcg"'}, "hypervisor.machine_type", "letters, digits"),
    ({"hv": 'cpu_model = "EPYC-v4,-sev"'}, "hypervisor.cpu_model", "letters, digits"),
    ({"hv": "debug_console_bytes = 1000"}, "hypervisor.debug_console_bytes", "power of two"),
    ({"rt": 'enable_annotations = ["io.katacontainers.config.hypervisor.kernel_params"]'},
     "runtime.enable_annotations", "measured kernel command line"),
]


def _snp_text(hv: str = "", snp: str = "", rt: str = "") -> str:
    text = SNP_TOML.format(hv=hv, snp=snp, rt=rt)
    if 'vsock = "none"' in hv:
        text = text.replace('vsock = "kernel"\n', "")
    return text


@pytest.mark.parametrize(("parts", "key", "message"), TOML_REFUSALS,
                         ids=[r[1] + ":" + r[2] for r in TOML_REFUSALS])
def test_loader_refuses_with_the_key(parts: dict[str, str], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_profile(_snp_text(**parts), "snp.toml", check_files=False)
    assert info.value.key == key
    assert message in str(info.value)


def test_loader_accepts_the_explicit_escape_hatches(tmp_path: Path) -> None:
    prof = parse_profile(_snp_text(hv='allow_debug = true\ndebug_console_bytes = 65536\n'
                                      'kernel_params = "console=ttyS0"',
                                   snp="policy = 0xB0000"), "snp.toml", check_files=False)
    assert prof.allow_debug and prof.debug_console_bytes == 65536


def test_loader_default_initdata_file(tmp_path: Path) -> None:
    good = tmp_path / "initdata.toml"
    good.write_bytes(DOCS["sha384-kbs"])
    prof = parse_profile(_snp_text(rt='initdata = "initdata.toml"'), "snp.toml",
                         base_dir=tmp_path, check_files=False)
    assert prof.initdata == good
    (tmp_path / "bad.toml").write_bytes(DOCS["sha384-kbs"].replace(b"0.1.0", b"9"))
    (tmp_path / "fw.fd").touch()
    for rt, message in (('initdata = "bad.toml"', "version must be '0.1.0'"),
                        ('initdata = "missing.toml"', "file does not exist")):
        with pytest.raises(ConfigError) as info:
            parse_profile(_snp_text(rt=rt).replace('"/fw.fd"', f'"{tmp_path}/fw.fd"')
                          .replace('"/guest/vmlinuz"', f'"{good}"')
                          .replace('"/usr/bin/qemu-system-x86_64"', f'"{good}"'),
                          "snp.toml", base_dir=tmp_path)
        assert info.value.key == "runtime.initdata" and message in str(info.value)


# --- initdata bound into the launch ---------------------------------------------------------

def _doc(name: str) -> initdata.Initdata:
    return initdata.decode_annotation(annotation_of(DOCS[name]))


DISK = ["-drive", "if=none,id=drive-initdata,file=/run/vm/initdata.img,format=raw,readonly=on,"
        "aio=threads", "-device", "virtio-blk-pci,id=initdata,drive=drive-initdata,"
        "iommu_platform=on"]


@pytest.mark.parametrize("name", sorted(DOCS))
def test_snp_host_data_argv_is_the_fitted_digest(name: str) -> None:
    args = argv(replace(S["snp"], tee_params=SNP_P), initdata=_doc(name))
    obj = tee_object(args)
    assert obj == ("sev-snp-guest,id=snp0,cbitpos=51,reduced-phys-bits=1,policy=0x30000,"
                   f"kernel-hashes=on,host-data={EXPECTED[name][1]}")
    start = args.index("-drive")
    assert args[start:start + 4] == DISK


@pytest.mark.parametrize("name", sorted(DOCS))
def test_tdx_mrconfigid_argv_is_the_fitted_digest(name: str) -> None:
    args = argv(replace(S["tdx"], tee_params=TdxParams()), initdata=_doc(name))
    obj = json.loads(tee_object(args))
    assert obj["mrconfigid"] == EXPECTED[name][2]
    assert len(base64.b64decode(obj["mrconfigid"])) == 48
    start = args.index("-drive")
    assert args[start:start + 4] == DISK


def test_development_profile_gets_the_disk_without_binding() -> None:
    args = argv(S["none"], accel="tcg", initdata=_doc("sha256-kbs"))
    assert "-object" not in args  # no TEE object, nothing to bind to
    start = args.index("-drive")
    assert args[start:start + 4] == [DISK[0], DISK[1], DISK[2],
                                     "virtio-blk-pci,id=initdata,drive=drive-initdata"]


@pytest.mark.parametrize("name", ["sev", "sev-es", "s390-pv", "pef"])
def test_unbindable_tees_refuse_initdata_unless_opted_in(name: str) -> None:
    with pytest.raises(InvariantError, match=f"{name} has no launch field to bind initdata"):
        argv(S[name], initdata=_doc("sha256-kbs"))
    args = argv(replace(S[name], allow_unbound_initdata=True), initdata=_doc("sha256-kbs"))
    assert "drive-initdata" in " ".join(args)


def test_profile_host_data_and_initdata_conflict() -> None:
    prof = replace(S["snp"], tee_params=replace(SNP_P, host_data=bytes(32)))
    with pytest.raises(InvariantError, match=r"remove snp\.host_data"):
        argv(prof, initdata=_doc("sha256-kbs"))
    tdx = replace(S["tdx"], tee_params=TdxParams(mrconfigid=bytes(48)))
    with pytest.raises(InvariantError, match=r"remove tdx\.mrconfigid"):
        argv(tdx, initdata=_doc("sha256-kbs"))


# --- resolve_initdata: the one call the shim makes ------------------------------------------

SNP_ALLOWED = replace(S["snp"], tee_params=SNP_P, enable_annotations=(ANN,))


def test_resolve_prefers_the_annotation_then_the_profile_file(tmp_path: Path) -> None:
    default = tmp_path / "default.toml"
    default.write_bytes(DOCS["sha512-policy"])
    prof = replace(SNP_ALLOWED, initdata=default)
    from_pod = resolve_initdata(prof, {ANN: annotation_of(DOCS["sha256-kbs"])})
    assert from_pod is not None and from_pod.toml == DOCS["sha256-kbs"]
    fallback = resolve_initdata(prof, {"other": "x"})
    assert fallback is not None and fallback.toml == DOCS["sha512-policy"]
    assert resolve_initdata(SNP_ALLOWED, {}) is None
    assert resolve_initdata(SNP_ALLOWED) is None


def test_resolve_refusals_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(InitdataNotAllowedError, match="not allowed by runtime profile"):
        resolve_initdata(replace(SNP_ALLOWED, enable_annotations=()),
                         {ANN: annotation_of(DOCS["sha256-kbs"])})
    with pytest.raises(InitdataVersionError, match="got '2'"):
        resolve_initdata(SNP_ALLOWED, {ANN: annotation_of(DOCS["sha256-kbs"].replace(
            b'"0.1.0"', b'"2"'))})
    sev = replace(S["sev"], enable_annotations=(ANN,))
    with pytest.raises(InitdataNotAllowedError, match="sev has no launch field"):
        resolve_initdata(sev, {ANN: annotation_of(DOCS["sha256-kbs"])})
    assert resolve_initdata(replace(sev, allow_unbound_initdata=True),
                            {ANN: annotation_of(DOCS["sha256-kbs"])}) is not None
    gone = replace(SNP_ALLOWED, initdata=tmp_path / "gone.toml")
    with pytest.raises(InitdataError, match="cannot read the profile's initdata file"):
        resolve_initdata(gone, {})
    with pytest.raises(InitdataError, match="cannot read"):
        load_initdata_file(tmp_path / "gone.toml")


def test_write_disk_is_0600_and_never_follows_or_overwrites(tmp_path: Path) -> None:
    doc = _doc("sha384-kbs")
    target = tmp_path / "initdata.img"
    write_disk(target, doc)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_bytes() == doc.disk_image()
    with pytest.raises(FileExistsError):
        write_disk(target, doc)
    link = tmp_path / "link.img"
    os.symlink(tmp_path / "elsewhere", link)
    with pytest.raises(OSError):
        write_disk(link, doc)
    assert not (tmp_path / "elsewhere").exists()
