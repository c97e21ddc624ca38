"""hypervisor.measure on a synthetic firmware: parsing, unit vectors, the SNP oracle, one source
of truth with the argv, output that moves exactly with the launch inputs, RVPS, the CLI."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from sevsnpmeasure import guest as oracle
from sevsnpmeasure.sev_mode import SevMode

from hypervisor.config import parse_profile
from hypervisor.errors import ConfigError
from hypervisor.measure import MeasureError, launch_inputs, measure, report
from hypervisor.measure.amd import KernelHashes, SnpLaunchDigest
from hypervisor.measure.ovmf import OvmfImage, SevSectionType, TdvfSectionType
from hypervisor.measure.tdx import cross_check, mr_extend_record, mrtd, page_add_record
from hypervisor.measure.vmsa import CPU_MODELS, cpuid_signature, model_signature, vmsa_page
from hypervisor.profile import RuntimeProfile, TeeKind
from protocols import initdata
from shim.cli import main as cli
from tests.unit.hypervisor.fake_ovmf import AP_EIP, FakeOvmf

# MRTD of FakeOvmf().build() and FakeOvmf(fill=7).build(): computed by this code and, for the
# same bytes, by td-shim's td_shim_tee_info_hash.py (confidential-containers/td-shim 125eeab5).
FAKE_MRTD = ("b611a3572d60017e80f5fa64d47fe8039698836c45827fe6c26ebd5a08c134af"
             "b930b8edc6e14f7407933b455a06c662")
FAKE7_MRTD = ("93a2fd7694ba4a3947fb73aa3efa6d5ad158fca7c01b3c798363bf470d3fe3a5"
              "e92321fb797502b40f35b0a217fe96d0")


# --- firmware parsing ------------------------------------------------------------------------

def test_footer_table_and_metadata() -> None:
    image = OvmfImage.parse(FakeOvmf().build(), "fake.fd")
    assert image.gpa == 0xFFFF0000
    assert image.sev_es_reset_eip() == AP_EIP
    assert image.sev_hash_table() == (0x805C00, 0x400)
    assert [(s.gpa, s.size, s.type) for s in image.sev_sections()][:5] == [
        (0x800000, 0x2000, SevSectionType.SNP_SEC_MEM),
        (0x802000, 0x1000, SevSectionType.SNP_SECRETS),
        (0x803000, 0x1000, SevSectionType.CPUID),
        (0x804000, 0x1000, SevSectionType.SVSM_CAA),
        (0x805000, 0x1000, SevSectionType.SNP_KERNEL_HASHES)]
    tdvf = image.tdvf_sections()
    assert [s.type for s in tdvf] == [TdvfSectionType.BFV, TdvfSectionType.CFV,
                                      TdvfSectionType.TEMP_MEM, TdvfSectionType.TD_HOB,
                                      TdvfSectionType.TEMP_MEM]
    assert [s.extended for s in tdvf] == [True, False, False, False, False]


FIRMWARE_ERRORS = [
    (FakeOvmf(footer=False), "sev_sections", "no SEV metadata entry"),
    (FakeOvmf(footer=False), "tdvf_sections", "firmware without TDVF metadata"),
    (FakeOvmf(ap_eip=None), "sev_es_reset_eip", "no SEV-ES reset block entry"),
    (FakeOvmf(sev_signature=b"XXXX"), "sev_sections", "bad SEV metadata header"),
    (FakeOvmf(tdvf_signature=b"XXXX"), "tdvf_sections", "bad TDVF metadata header"),
    (FakeOvmf(sev_sections=[(0x800100, 0x1000, 1)]), "sev_sections", "not page aligned"),
    (FakeOvmf(sev_sections=[(0x800000, 0x1000, 9)]), "sev_sections", "unknown type 0x9"),
    (FakeOvmf(tdvf_sections=[(0, 0x1000, 0xFFFF0000, 0x1000, 0, 1),
                             (0, 0, 0x800000, 0x1000, 5, 0)]),
     "tdvf_sections", "has type 5, which QEMU does not load"),
    (FakeOvmf(tdvf_sections=[(0, 0x1000, 0xFFFF0000, 0x1000, 0, 1),
                             (0, 0, 0x809000, 0x1000, 2, 1)]),
     "tdvf_sections", "(TD_HOB) asks MR.EXTEND of memory the VMM fills"),
    (FakeOvmf(tdvf_sections=[(0xF000, 0x2000, 0xFFFF0000, 0x2000, 0, 1),
                             (0, 0, 0x800000, 0x1000, 3, 0)]),
     "tdvf_sections", "is not inside the image"),
    (FakeOvmf(tdvf_sections=[(0, 0x2000, 0xFFFF0000, 0x1000, 0, 1),
                             (0, 0, 0x800000, 0x1000, 3, 0)]),
     "tdvf_sections", "raw size 0x2000 exceeds memory size 0x1000"),
    (FakeOvmf(tdvf_sections=[(0, 0x1000, 0xFFFF0000, 0x1000, 0, 1)]),
     "tdvf_sections", "does not fit 1 sections"),
]


@pytest.mark.parametrize(("fake", "method", "message"), FIRMWARE_ERRORS,
                         ids=[f"{m}:{msg}" for _, m, msg in FIRMWARE_ERRORS])
def test_firmware_problems_are_named(fake: FakeOvmf, method: str, message: str) -> None:
    image = OvmfImage.parse(fake.build(), "fake.fd")
    with pytest.raises(MeasureError) as info:
        getattr(image, method)()
    assert message in str(info.value) and "fake.fd" in str(info.value)


def test_image_must_be_whole_pages() -> None:
    with pytest.raises(MeasureError, match="not a whole number of 4 KiB pages"):
        OvmfImage.parse(b"x" * 5000, "odd.fd")


def test_broken_footer_table_is_named() -> None:
    data = bytearray(FakeOvmf().build())
    end = len(data) - 32
    struct.pack_into("<H", data, end - 18, 0xFFF0)  # footer length beyond the image start?
    struct.pack_into("<H", data, end - 18 - 18, 3)  # first entry shorter than its header
    with pytest.raises(MeasureError, match="impossible"):
        OvmfImage.parse(bytes(data), "broken.fd")


# --- unit vectors ----------------------------------------------------------------------------

def test_tdx_records_byte_for_byte() -> None:
    add = page_add_record(0x809000)
    assert len(add) == 128
    assert add == b"MEM.PAGE.ADD" + bytes(4) + bytes.fromhex("0090800000000000") + bytes(104)
    ext = mr_extend_record(0xFFFF8100, bytes(range(256)))
    assert len(ext) == 384
    assert ext[:128] == b"MR.EXTEND" + bytes(7) + bytes.fromhex("0081ffff00000000") + bytes(104)
    assert ext[128:] == bytes(range(256))
    with pytest.raises(ValueError, match="256 bytes"):
        mr_extend_record(0, b"short")


def test_mrtd_step_by_step_and_independent_vectors() -> None:
    data = FakeOvmf().build()
    image = OvmfImage.parse(data)
    # Written out longhand: every page added, BFV pages (attribute 1) extended chunk by chunk.
    h = hashlib.sha384()
    for offset, _raw, gpa, size, _type, attr in (
            (0x8000, 0, 0xFFFF8000, 0x8000, 0, 1), (0, 0, 0xFFFF0000, 0x8000, 1, 0),
            (0, 0, 0x810000, 0x2000, 3, 0), (0, 0, 0x809000, 0x2000, 2, 0),
            (0, 0, 0x800000, 0x6000, 3, 0)):
        for page in range(0, size, 4096):
            h.update(b"MEM.PAGE.ADD".ljust(16, b"\0") + (gpa + page).to_bytes(8, "little")
                     + bytes(104))
            for chunk in range(0, 4096 if attr else 0, 256):
                at = gpa + page + chunk
                h.update(b"MR.EXTEND".ljust(16, b"\0") + at.to_bytes(8, "little") + bytes(104))
                h.update(data[offset + page + chunk:offset + page + chunk + 256])
    assert mrtd(image).hex() == h.hexdigest() == FAKE_MRTD
    assert mrtd(OvmfImage.parse(FakeOvmf(fill=7).build())).hex() == FAKE7_MRTD


def test_mrtd_cross_check_labels() -> None:
    assert cross_check("00" * 32, bytes(48)).startswith("not cross-checked")
    sid = "a265075b4147a096109e501e76196df1ec8a18659c26f7401492c597ec88f312"
    with pytest.raises(MeasureError, match="disagrees with td-shim"):
        cross_check(sid, bytes(48))


def test_cpuid_signatures() -> None:
    assert cpuid_signature(23, 1, 2) == 0x800F12  # EPYC (Naples)
    assert cpuid_signature(23, 49, 0) == 0x830F10  # Rome
    assert cpuid_signature(25, 1, 1) == 0xA00F11  # Milan
    assert cpuid_signature(25, 17, 0) == 0xA10F10  # Genoa
    assert cpuid_signature(26, 0, 0) == 0xB00F00  # Turin
    assert cpuid_signature(6, 85, 7) == 0x50657  # family below 0xF: no extended family
    assert model_signature("EPYC-Milan-v2") == 0xA00F11
    assert set(CPU_MODELS) >= {"EPYC-v4", "EPYC-Milan", "EPYC-Genoa"}
    with pytest.raises(MeasureError, match="host: the signature is the host CPU's"):
        model_signature("host")
    with pytest.raises(MeasureError, match="CPU model 'qemu64' has no known signature"):
        model_signature("qemu64")


def test_vmsa_fields_at_their_offsets() -> None:
    page = vmsa_page(0x0080B004, 0xA00F11, 0x1)
    assert len(page) == 4096
    assert struct.unpack_from("<HHIQ", page, 0x10) == (0xF000, 0x9B, 0xFFFF, 0x800000)  # cs
    assert struct.unpack_from("<HHIQ", page, 0x70) == (0, 0x82, 0xFFFF, 0)  # ldtr
    assert struct.unpack_from("<HHIQ", page, 0x90) == (0, 0x8B, 0xFFFF, 0)  # tr
    assert struct.unpack_from("<Q", page, 0x178) == (0xB004,)  # rip
    assert struct.unpack_from("<Q", page, 0x310) == (0xA00F11,)  # rdx: signature
    assert struct.unpack_from("<Q", page, 0x3B0) == (0x1,)  # sev_features
    assert struct.unpack_from("<I", page, 0x408) == (0x1F80,)  # mxcsr


def test_kernel_hashes_table_layout(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"kernel")
    table = KernelHashes.of(tmp_path / "k", None, "quiet").table()
    assert len(table) == 176  # 168 bytes of table, padded to 16
    assert table[16:18] == (168).to_bytes(2, "little")
    assert table[34:36] == (50).to_bytes(2, "little")
    assert table[36:68] == hashlib.sha256(b"quiet\0").digest()  # cmdline first, NUL included
    assert table[84:86] == (50).to_bytes(2, "little")
    assert table[86:118] == hashlib.sha256(b"").digest()  # no initrd: hash of nothing
    assert table[136:168] == hashlib.sha256(b"kernel").digest()
    assert table[168:] == bytes(8)
    guids = [table[i:i + 16] for i in (0, 18, 68, 118)]
    assert guids[0] == bytes.fromhex("06d63894224fc94cb479a793d411fd21")  # 9438d606-... LE


def test_snp_page_info_unit_vector() -> None:
    ld = SnpLaunchDigest()
    ld.normal(0xFFFFF000, bytes(4096))
    expect = hashlib.sha384(bytes(48) + hashlib.sha384(bytes(4096)).digest()
                            + bytes.fromhex("7000") + b"\x01" + bytes(5)
                            + (0xFFFFF000).to_bytes(8, "little")).digest()
    assert ld.ld == expect and ld.pages == 1


# --- whole launches on a fake QEMU root ------------------------------------------------------

SNP = """
[hypervisor]
tee = "snp"
qemu_path = "/usr/bin/qemu-system-x86_64"
kernel = "/guest/vmlinuz"
initrd = "/guest/initrd.img"
kernel_params = "quiet panic=1"
cpu_model = "EPYC-Milan"
vcpus = 2
firmware = "/fw/OVMF.fd"
vsock = "kernel"
[snp]
cbitpos = 51
reduced_phys_bits = 1
"""
TDX = """
[hypervisor]
tee = "tdx"
qemu_path = "/usr/bin/qemu-system-x86_64"
kernel = "/guest/vmlinuz"
initrd = "/guest/initrd.img"
firmware = "/fw/OVMF.fd"
vsock = "kernel"
"""
DOC = b'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"aa.toml" = "x"\n'


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    for rel, data in (("usr/bin/qemu-system-x86_64", b""), ("guest/vmlinuz", b"K" * 9000),
                      ("guest/initrd.img", b"I" * 5000), ("fw/OVMF.fd", FakeOvmf().build())):
        (r / rel).parent.mkdir(parents=True, exist_ok=True)
        (r / rel).write_bytes(data)
    return r


def load(text: str, root: Path) -> RuntimeProfile:
    return parse_profile(text, "test.toml", qemu_root=root)


@pytest.mark.parametrize("hashes", [True, False])
@pytest.mark.parametrize("vcpus", [1, 3])
def test_snp_digest_equals_the_oracle_on_a_synthetic_firmware(root: Path, hashes: bool,
                                                              vcpus: int) -> None:
    text = SNP if hashes else SNP.replace("reduced_phys_bits = 1\n",
                                          "reduced_phys_bits = 1\nkernel_hashes = false\n")
    text = text if hashes else _no_direct_boot(text)
    m = measure(load(text, root), vcpus=vcpus)
    expected = oracle.calc_launch_digest(
        SevMode.SEV_SNP, vcpus, 0xA00F11, str(root / "fw/OVMF.fd"),
        str(root / "guest/vmlinuz") if hashes else None,
        str(root / "guest/initrd.img") if hashes else None, "quiet panic=1" if hashes else None,
        0x1)
    assert m.value("snp_launch_measurement") == expected.hex()


def test_sev_and_sev_es_digests_equal_the_oracle(root: Path) -> None:
    for tee, mode in (("sev", SevMode.SEV), ("sev-es", SevMode.SEV_ES)):
        text = SNP.replace('"snp"', f'"{tee}"').replace("[snp]", "[sev]")
        m = measure(load(text, root), vcpus=2)
        expected = oracle.calc_launch_digest(mode, 2, 0xA00F11, str(root / "fw/OVMF.fd"),
                                             str(root / "guest/vmlinuz"),
                                             str(root / "guest/initrd.img"), "quiet panic=1", 0)
        assert m.values[0].value == expected.hex(), tee


def test_one_source_of_truth_inputs_are_the_argv(root: Path) -> None:
    doc = initdata.from_toml(DOC)
    inputs = launch_inputs(load(SNP, root), vcpus=4, initdata=doc)
    argv = list(inputs.argv)

    def after(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert after("-bios") == str(inputs.firmware.path) == "/fw/OVMF.fd"
    assert after("-kernel") == str(inputs.kernel.path if inputs.kernel else None)
    assert after("-initrd") == str(inputs.initrd.path if inputs.initrd else None)
    assert after("-append") == inputs.append == "quiet panic=1"
    assert after("-smp") == str(inputs.vcpus) == "4"
    assert after("-cpu") == inputs.cpu_model == "EPYC-Milan"
    obj = after("-object")
    assert f"policy={inputs.policy:#x}" in obj and "kernel-hashes=on" in obj
    assert inputs.kernel_hashes is True
    assert inputs.host_data == doc.fitted(32)
    assert f"host-data={base64.b64encode(doc.fitted(32)).decode()}" in obj
    assert inputs.firmware.sha256 == hashlib.sha256((root / "fw/OVMF.fd").read_bytes()).hexdigest()


def _rewrite(root: Path, rel: str, data: bytes) -> None:
    (root / rel).write_bytes(data)


def _no_direct_boot(text: str) -> str:
    for line in ('kernel = "/guest/vmlinuz"\n', 'initrd = "/guest/initrd.img"\n',
                 'kernel_params = "quiet panic=1"\n'):
        text = text.replace(line, "")
    return text


def _change(name: str, root: Path) -> tuple[str, int | None]:
    """SNP with one launch input changed (files rewritten under ``root``), and the vCPUs."""
    if name == "vcpus":
        return SNP, 3
    if name == "kernel":
        _rewrite(root, "guest/vmlinuz", b"k" * 9000)
    elif name == "initrd":
        _rewrite(root, "guest/initrd.img", b"i" * 5000)
    elif name == "firmware":
        _rewrite(root, "fw/OVMF.fd", FakeOvmf(fill=1).build())
    elif name == "cmdline":
        return SNP.replace("quiet panic=1", "quiet panic=2"), None
    elif name == "cpu model":
        return SNP.replace("EPYC-Milan", "EPYC-v4"), None
    elif name == "kernel hashes":
        return _no_direct_boot(SNP), None
    return SNP, None


SNP_CHANGES = ("vcpus", "kernel", "initrd", "cmdline", "firmware", "cpu model", "kernel hashes")
SNP_SAME = {
    "memory": SNP.replace("vcpus = 2", "vcpus = 2\nmemory_mib = 4096"),
    "cbitpos": SNP.replace("cbitpos = 51", "cbitpos = 47"),
    "dial timeout": SNP + "[runtime]\ndial_timeout = 5\n",
    "machine type spelled out": SNP.replace("vcpus = 2", 'vcpus = 2\nmachine_type = "q35"'),
}


def test_snp_output_changes_when_and_only_when_an_input_changes(root: Path) -> None:
    base = measure(load(SNP, root))
    for name in SNP_CHANGES:
        fresh = root.parent / f"r-{name.replace(' ', '-')}"
        shutil.copytree(root, fresh)
        text, vcpus = _change(name, fresh)
        m = measure(load(text, fresh), vcpus=vcpus)
        assert m.value("snp_launch_measurement") != base.value("snp_launch_measurement"), name
    policy = measure(load(SNP.replace("cbitpos = 51", "cbitpos = 51\npolicy = 0x20000"), root))
    assert policy.value("policy") == "0x20000" != base.value("policy")
    bound = measure(load(SNP, root), initdata=initdata.from_toml(DOC))
    assert bound.value("snp_host_data") != base.value("snp_host_data")
    assert bound.value("snp_launch_measurement") == base.value("snp_launch_measurement")
    for name, text in SNP_SAME.items():
        assert measure(load(text, root)).values == base.values, name


def test_tdx_mrtd_follows_the_firmware_and_mrconfigid_the_initdata(root: Path) -> None:
    base = measure(load(TDX, root))
    assert base.value("mr_td") == FAKE_MRTD
    assert base.value("mr_config_id") == "00" * 48
    assert any(n.startswith("MRTD not cross-checked") for n in base.notes)
    assert any("RTMR0-3 not computed" in n for n in base.notes)
    others = measure(load(TDX.replace("/guest/initrd.img", "/guest/vmlinuz"), root), vcpus=4)
    assert others.value("mr_td") == FAKE_MRTD  # kernel, initrd, vCPUs go to RTMRs, not MRTD
    doc = initdata.from_toml(DOC)
    bound = measure(load(TDX, root), initdata=doc)
    assert bound.value("mr_config_id") == doc.fitted(48).hex() == bound.value("init_data")
    _rewrite(root, "fw/OVMF.fd", FakeOvmf(fill=7).build())
    assert measure(load(TDX, root)).value("mr_td") == FAKE7_MRTD


MEASURE_ERRORS: list[tuple[str, type[Exception], str]] = [
    (SNP.replace('"snp"', '"none"').replace("[snp]\ncbitpos = 51\nreduced_phys_bits = 1\n", ""),
     MeasureError, "tee none): no TEE measures this launch"),
    (SNP.replace('cpu_model = "EPYC-Milan"', 'cpu_model = "host"'), MeasureError,
     "host CPU's"),
    (SNP.replace('"snp"', '"sev-es"').replace("[snp]", "[sev]\nlegacy_vm_type = true"),
     MeasureError, "legacy_vm_type = true"),
    (SNP.replace("cbitpos = 51", "cbitpos = 51\npolicy = 0x70000"), ConfigError, "MIGRATE_MA"),
]


@pytest.mark.parametrize(("text", "kind", "message"), MEASURE_ERRORS,
                         ids=[m for _, _, m in MEASURE_ERRORS])
def test_errors_name_what_is_missing(root: Path, text: str, kind: type[Exception],
                                     message: str) -> None:
    with pytest.raises(kind) as info:
        measure(load(text, root))
    assert message in str(info.value)


def test_firmware_without_the_needed_metadata(root: Path) -> None:
    _rewrite(root, "fw/OVMF.fd", FakeOvmf(footer=False).build())
    with pytest.raises(MeasureError, match="firmware without SEV metadata"):
        measure(load(SNP, root))
    with pytest.raises(MeasureError, match="firmware without TDVF metadata"):
        measure(load(TDX, root))
    _rewrite(root, "fw/OVMF.fd", FakeOvmf(
        sev_sections=[(0x800000, 0x1000, 1), (0x801000, 0x1000, 2)]).build())
    with pytest.raises(MeasureError, match="no KERNEL_HASHES section"):
        measure(load(SNP, root))


def test_s390_and_pef_are_not_measured(root: Path) -> None:
    for tee in (TeeKind.S390_PV, TeeKind.PEF):
        bad = replace(load(SNP, root), tee=tee, tee_params=None, firmware=None)
        with pytest.raises(MeasureError, match=f"tee {tee.value}.*not computed here"):
            measure(bad)


# --- RVPS and the command line ---------------------------------------------------------------

def test_rvps_message_per_pod_shape(root: Path, tmp_path: Path) -> None:
    doc = initdata.from_toml(DOC)
    m = measure(load(SNP, root), vcpus=4, initdata=doc)
    path = report.write_rvps(m, tmp_path / "rvps")
    assert path.name == f"test-4vcpu-initdata-{doc.digest().hex()[:12]}.json"
    message = json.loads(path.read_text())
    assert message["version"] == "0.1.0" and message["type"] == "sample"
    payload = json.loads(base64.b64decode(message["payload"]))
    assert payload == {"snp_launch_measurement": [m.value("snp_launch_measurement")],
                       "snp_host_data": [doc.fitted(32).hex()],
                       "init_data": [doc.digest().hex()]}
    tdx = measure(load(TDX, root))
    assert json.loads(base64.b64decode(report.rvps_message(tdx)["payload"])) == {
        "mr_td": [FAKE_MRTD], "mr_config_id": ["00" * 48]}
    sev = measure(load(SNP.replace('"snp"', '"sev"').replace("[snp]", "[sev]"), root))
    with pytest.raises(MeasureError, match="no reference values for sev"):
        report.write_rvps(sev, tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_cli_measure_text_json_rvps(root: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "snp.toml"
    profile.write_text(SNP)
    doc = tmp_path / "initdata.toml"
    doc.write_bytes(DOC)
    args = ["measure", "--profile", str(profile), "--qemu-root", str(root), "--vcpus", "2"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    expected = measure(load(SNP, root), vcpus=2).value("snp_launch_measurement")
    assert f"snp_launch_measurement   {expected}" in text
    assert "cpu model        EPYC-Milan (signature 0xa00f11)" in text
    assert "sev-snp-measure --mode snp --vcpus 2 --vcpu-sig 0xa00f11" in text
    assert cli.main([*args, "--json", "--initdata", str(doc), "--rvps",
                     str(tmp_path / "rv")]) == 0
    out = capsys.readouterr()
    parsed = json.loads(out.out)
    assert set(parsed["inputs"]) >= {"firmware", "kernel", "initrd", "cmdline", "vcpus",
                                     "cpu_model", "policy", "guest_features", "initdata",
                                     "kernel_hashes", "qemu_argv", "cpu_signature"}
    assert parsed["inputs"]["guest_features"] == "0x1"
    assert parsed["results"]["snp_launch_measurement"] == expected
    assert "reference values written to" in out.err
    assert len(list((tmp_path / "rv").iterdir())) == 1
    assert cli.main(["measure", "--profile", str(profile), "--qemu-root", str(tmp_path)]) == 2
    assert "coco-shim measure: " in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_bytes(DOC.replace(b"sha384", b"md5"))
    assert cli.main([*args, "--initdata", str(bad)]) == 2
    assert "algorithm must be one of" in capsys.readouterr().err


def test_text_report_is_stable_for_a_tdx_profile(root: Path) -> None:
    text = report.render_text(measure(load(TDX, root)))
    assert "kernel hashes    n/a (TDVF measures" in text
    assert f"mr_td                    {FAKE_MRTD}" in text
    assert io.StringIO(text).read().endswith("\n")


def test_product_code_never_imports_the_oracle() -> None:
    repo = Path(__file__).resolve().parents[3]
    for package in ("hypervisor", "shim", "protocols", "guest"):
        for source in (repo / package).rglob("*.py"):
            assert "sevsnpmeasure" not in source.read_text(), source


def _with_root_image(root: Path, root_hash: str) -> str:
    """SNP with the device form: the root image, its verity parameters beside it."""
    (root / "guest/coco-guest.erofs").write_bytes(b"E" * 8192)
    (root / "guest/coco-guest.erofs.verity").write_text(json.dumps({
        "data_blocks": 2, "hash_start_block": 2, "root_hash": root_hash, "salt": "5" * 64,
        "hash": "sha256", "block_size": 4096}))
    return SNP.replace('kernel_params = "quiet panic=1"\n',
                       'kernel_params = "quiet panic=1"\nimage = "/guest/coco-guest.erofs"\n')


def test_the_root_images_verity_hash_is_measured_with_the_command_line(root: Path) -> None:
    first = measure(load(_with_root_image(root, "a" * 64), root))
    second = measure(load(_with_root_image(root, "b" * 64), root))
    assert first.inputs.append == f"quiet panic=1 coco.root=verity:2:2:{'a' * 64}:{'5' * 64}"
    assert f"coco.root=verity:2:2:{'a' * 64}" in report.render_text(first)
    assert (first.value("snp_launch_measurement")
            != second.value("snp_launch_measurement"))
