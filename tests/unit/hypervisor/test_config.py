"""Runtime profile TOML loading: every shipped profile loads; every bad key is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hypervisor.cmdline import Arch, Bios, Pflash, UnixSocketAddress, VsockSocketAddress
from hypervisor.config import load_profile, parse_profile
from hypervisor.errors import ConfigError
from hypervisor.firmware import find_firmware
from hypervisor.profile import (
    KernelVsock,
    RuntimeProfile,
    SevParams,
    SnpParams,
    TdxParams,
    TeeKind,
    VmInstance,
)
from hypervisor.profile import build_command_line as build

CONFIGS = Path(__file__).resolve().parents[3] / "firmware-configs"
SHIPPED = ["qemu-none", "qemu-coco-dev", "qemu-snp", "qemu-tdx", "qemu-sev", "qemu-sev-es",
           "qemu-se", "qemu-pef"]
GUEST_FILES = ["vmlinuz", "initrd.img", "vmlinuz-confidential", "initrd-confidential.img",
               "vmlinux-confidential", "kata-containers-se.img"]


def _descriptor(path: Path, features: list[str], mapping: dict[str, object]) -> None:
    path.write_text(json.dumps({
        "interface-types": ["uefi"], "mapping": mapping, "features": features,
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
    }))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A fake QEMU root: binaries, guest files and firmware descriptors (like Debian's)."""
    r = tmp_path / "root"
    for binary in ("qemu-system-x86_64", "qemu-system-s390x", "qemu-system-ppc64"):
        (r / "usr/bin").mkdir(parents=True, exist_ok=True)
        (r / "usr/bin" / binary).touch()
    (r / "guest").mkdir()
    for name in GUEST_FILES:
        (r / "guest" / name).touch()
    fw = r / "usr/share/qemu/firmware"
    fw.mkdir(parents=True)
    (r / "usr/share/ovmf").mkdir(parents=True)
    (r / "usr/share/OVMF").mkdir(parents=True)
    for f in ("usr/share/ovmf/OVMF.amdsev.fd", "usr/share/ovmf/OVMF.inteltdx.ms.fd",
              "usr/share/OVMF/OVMF_CODE_4M.fd", "usr/share/OVMF/OVMF_VARS_4M.fd"):
        (r / f).touch()
    _descriptor(fw / "50-edk2-x86_64-secure.json", ["amd-sev", "secure-boot"], {
        "device": "flash", "executable": {"filename": "/usr/share/OVMF/OVMF_CODE_4M.fd"},
        "nvram-template": {"filename": "/usr/share/OVMF/OVMF_VARS_4M.fd"}})
    _descriptor(fw / "60-edk2-x86_64-amdsev.json", ["amd-sev", "amd-sev-es", "amd-sev-snp"],
                {"device": "memory", "filename": "/usr/share/ovmf/OVMF.amdsev.fd"})
    _descriptor(fw / "60-edk2-x86_64-inteltdx.json", ["intel-tdx"],
                {"device": "memory", "filename": "/usr/share/ovmf/OVMF.inteltdx.ms.fd"})
    (fw / "99-broken.json").write_text("{not json")
    return r


def load(name: str, root: Path) -> object:
    return load_profile(CONFIGS / f"{name}.toml", variables={"guest_image_dir": "/guest"},
                        qemu_root=root)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_and_builds(name: str, root: Path) -> None:
    p = load_profile(CONFIGS / f"{name}.toml", variables={"guest_image_dir": "/guest"},
                     qemu_root=root)
    assert p.name == name
    assert p.qemu_root == root
    accel = "tcg" if p.accel == "auto" else None
    argv = build(p, VmInstance(run_dir=Path("/run/x"), accel=accel,
                               vsock=KernelVsock(3, 9))).to_argv()
    assert argv[0] == str(p.qemu)
    if p.tee.confidential:  # TEE profiles ship no console and no console= (the host is out)
        assert "-chardev" not in argv and "console=" not in " ".join(argv)


def test_shipped_profiles_cover_every_tee(root: Path) -> None:
    tees = {load_profile(CONFIGS / f"{n}.toml", variables={"guest_image_dir": "/guest"},
                         qemu_root=root).tee for n in SHIPPED}
    assert tees == set(TeeKind)
    assert sorted(p.stem for p in CONFIGS.glob("*.toml")) == sorted(SHIPPED)


def test_snp_profile_values(root: Path) -> None:
    p = load_profile(CONFIGS / "qemu-snp.toml", variables={"guest_image_dir": "/guest"},
                     qemu_root=root)
    assert p.tee is TeeKind.SNP and p.arch is Arch.X86_64
    assert p.firmware == Bios(Path("/usr/share/ovmf/OVMF.amdsev.fd"))
    assert p.kernel == Path("/guest/vmlinuz-confidential")
    assert p.tee_params == SnpParams(policy=0x30000, cbitpos=51, reduced_phys_bits=1,
                                     kernel_hashes=True)
    assert p.dial_timeout == 90.0
    assert "io.katacontainers.config.hypervisor.cc_init_data" in p.enable_annotations


def test_tdx_profile_values(root: Path) -> None:
    p = load_profile(CONFIGS / "qemu-tdx.toml", variables={"guest_image_dir": "/guest"},
                     qemu_root=root)
    assert p.firmware == Bios(Path("/usr/share/ovmf/OVMF.inteltdx.ms.fd"))
    assert p.tee_params == TdxParams(quote_generation_socket=VsockSocketAddress(2, 4050))


def test_sev_picks_memory_mapped_firmware_over_earlier_flash(root: Path) -> None:
    p = load_profile(CONFIGS / "qemu-sev.toml", variables={"guest_image_dir": "/guest"},
                     qemu_root=root)
    assert p.firmware == Bios(Path("/usr/share/ovmf/OVMF.amdsev.fd"))
    assert isinstance(p.tee_params, SevParams) and p.tee_params.policy == 0x1


def test_firmware_lookup_flash_and_missing(root: Path) -> None:
    desc = find_firmware("amd-sev", root=root)
    assert desc.firmware() == Pflash(Path("/usr/share/OVMF/OVMF_CODE_4M.fd"))
    assert desc.nvram_template == Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
    with pytest.raises(ConfigError, match="no firmware descriptor for x86_64/q35 offers it"):
        find_firmware("arm-cca", root=root)
    override = root / "etc/qemu/firmware"
    override.mkdir(parents=True)
    (override / "60-edk2-x86_64-inteltdx.json").write_text("{}")  # /etc hides /usr/share
    with pytest.raises(ConfigError, match="'intel-tdx'"):
        find_firmware("intel-tdx", root=root)


MINIMAL = """
[hypervisor]
tee = "none"
qemu_path = "/usr/bin/qemu-system-x86_64"
kernel = "{guest_image_dir}/vmlinuz"
"""


def parse(text: str, root: Path) -> RuntimeProfile:
    return parse_profile(text, "test.toml", variables={"guest_image_dir": "/guest"},
                         qemu_root=root)


BAD: list[tuple[str, str, str]] = [
    (MINIMAL + "vcpu = 2\n", "hypervisor.vcpu", "unknown key"),
    (MINIMAL + 'vcpus = "2"\n', "hypervisor.vcpus", "must be of type int, got str"),
    (MINIMAL + "vcpus = true\n", "hypervisor.vcpus", "must be of type int, got bool"),
    (MINIMAL + "vcpus = 0\n", "hypervisor.vcpus", "must be positive"),
    (MINIMAL + 'initrd = "/guest/missing.img"\n', "hypervisor.initrd", "file does not exist"),
    (MINIMAL.replace("{guest_image_dir}", "{image_dir}"), "hypervisor.kernel",
     "unknown placeholder {image_dir}"),
    (MINIMAL + 'accelerator = "hvf"\n', "hypervisor.accelerator", "must be one of"),
    (MINIMAL + 'vsock = "virtio"\n', "hypervisor.vsock", "must be one of"),
    (MINIMAL.replace('tee = "none"', 'tee = "cca"'), "hypervisor.tee", "must be one of"),
    (MINIMAL.replace('qemu_path = "/usr/bin/qemu-system-x86_64"\n', ""),
     "hypervisor.qemu_path", "missing required key"),
    (MINIMAL + "[network]\nmodel = 1\n", "network", "unknown section"),
    (MINIMAL + "[snp]\npolicy = 1\n", "snp", "does not apply to tee = 'none'"),
    (MINIMAL.replace('"none"', '"snp"') + 'firmware = "/usr/share/ovmf/OVMF.amdsev.fd"\n'
     "[snp]\nhost_data = \"%%%\"\n", "snp.host_data", "must be base64"),
    (MINIMAL.replace('"none"', '"snp"') + "[snp]\nhostdata = 1\n", "snp.hostdata",
     "unknown key"),
    (MINIMAL.replace('"none"', '"tdx"') + '[tdx]\nquote_generation_socket = "tcp:1"\n',
     "tdx.quote_generation_socket", "must be unix:<path> or vsock:<cid>:<port>"),
    (MINIMAL + 'firmware = "/usr/share/ovmf/OVMF.amdsev.fd"\nfirmware_feature = "amd-sev"\n',
     "hypervisor.firmware_feature", "not both"),
    (MINIMAL + "[runtime]\nenable_annotations = [1]\n", "runtime.enable_annotations",
     "list of strings"),
    (MINIMAL + "[runtime]\ndial_timeout = -1\n", "runtime.dial_timeout", "must be positive"),
    (MINIMAL + "[runtime]\nboot_slots = -1\n", "runtime.boot_slots", "must be 0 (no limit)"),
    (MINIMAL + '[runtime]\nboot_slots = "auto"\n', "runtime.boot_slots", "must be of type int"),
    ("[hypervisor\n", "<toml>", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "key", "message"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_profile_names_file_key_and_value(text: str, key: str, message: str,
                                              root: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, root)
    assert info.value.source == "test.toml"
    assert info.value.key == key
    assert message in str(info.value)
    assert str(info.value).startswith(f"test.toml: {key}: ")


def test_boot_slots(root: Path) -> None:
    """[runtime] boot_slots: absent → None (one per host CPU, decided by the shim), 0 → no
    limit, N → N."""
    assert parse(MINIMAL, root).boot_slots is None
    assert parse(MINIMAL + "[runtime]\nboot_slots = 0\n", root).boot_slots == 0
    assert parse(MINIMAL + "[runtime]\nboot_slots = 3\n", root).boot_slots == 3


def test_wrong_type_error_shows_value(root: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse(MINIMAL + 'memory_mib = "lots"\n', root)
    assert "(value 'lots')" in str(info.value)


def test_missing_file_error_shows_path(root: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse(MINIMAL + 'image = "{guest_image_dir}/root.img"\n', root)
    assert "'/guest/root.img'" in str(info.value) and f"under {root}" in str(info.value)


def test_load_profile_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_profile(tmp_path / "nope.toml")


def test_relative_paths_resolve_against_profile_dir(tmp_path: Path) -> None:
    (tmp_path / "k").touch()
    (tmp_path / "qemu").touch()
    f = tmp_path / "p.toml"
    f.write_text('[hypervisor]\ntee = "none"\nqemu_path = "qemu"\nkernel = "k"\n')
    p = load_profile(f)
    assert p.kernel == tmp_path / "k" and p.qemu == tmp_path / "qemu"


def test_tee_sections_parse(root: Path) -> None:
    host_data = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    p = parse(MINIMAL.replace('"none"', '"snp"') + 'firmware_feature = "amd-sev-snp"\n'
              f'[snp]\nhost_data = "{host_data}"\npolicy = 0x30000\n', root)
    assert isinstance(p, object)
    t = parse(MINIMAL.replace('"none"', '"tdx"') +
              '[tdx]\nquote_generation_socket = "unix:/run/qgs.sock"\nsept_ve_disable = false\n',
              root)
    params = getattr(t, "tee_params", None)
    assert params == TdxParams(sept_ve_disable=False,
                               quote_generation_socket=UnixSocketAddress(Path("/run/qgs.sock")))
    snp = getattr(p, "tee_params", None)
    assert isinstance(snp, SnpParams) and snp.host_data == bytes(range(32))


def test_shipped_none_profile_returns_free_pages(root: Path) -> None:
    p = load_profile(CONFIGS / "qemu-none.toml", variables={"guest_image_dir": "/guest"},
                     qemu_root=root)
    assert p.free_page_reporting is True and p.memory_mib == 512


def test_deeply_nested_profile_is_a_config_error(root: Path) -> None:
    # Found by `make fuzz`: tomllib's RecursionError used to escape parse_profile.
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse("[hypervisor]\nx = " + "[" * 5000 + "]" * 5000 + "\n", root)
