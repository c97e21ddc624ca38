"""Initdata in the guest: disk discovery on fake block devices, bounds, validation, the binding
to the TEE's evidence field, the files written, and what the agent settles before serving."""

from __future__ import annotations

import gzip
import hashlib
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from guest.agent import initdata
from guest.agent.__main__ import RefusingHealth, parse_args, prepare
from guest.agent.errors import InvalidArgument
from guest.agent.initdata import Initdata, InitdataError, NoTee
from protocols import initdata as format_
from protocols.api.kata import health_pb2
from protocols.ttrpc import Code, RequestContext, TtrpcError

POLICY = "package agent_policy\ndefault ExecProcessRequest := false\n"
DOC = (
    'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n'
    '"aa.toml" = "[token_configs]\\n"\n'
    '"cdh.toml" = "socket = \'unix:///run/confidential-containers/cdh.sock\'\\n"\n'
    f'"policy.rego" = """\n{POLICY}"""\n'
).encode()


def disk_bytes(document: bytes, *, magic: bytes = b"initdata", length: int | None = None) -> bytes:
    stream = gzip.compress(document, mtime=0)
    raw = magic + struct.pack("<Q", len(stream) if length is None else length) + stream
    return raw + b"\0" * (-len(raw) % 512)


@pytest.fixture
def fake_machine(tmp_path: Path) -> tuple[Path, Path]:
    """A /sys/class/block listing and a /dev holding what those devices read as."""
    sys_block, dev = tmp_path / "sys/class/block", tmp_path / "dev"
    sys_block.mkdir(parents=True)
    dev.mkdir()
    return sys_block, dev


def add_device(machine: tuple[Path, Path], name: str, content: bytes | None) -> Path:
    sys_block, dev = machine
    (sys_block / name).mkdir()
    path = dev / name
    if content is not None:
        path.write_bytes(content)
    return path


def test_finds_the_disk_with_the_magic(fake_machine: tuple[Path, Path]) -> None:
    add_device(fake_machine, "loop0", disk_bytes(DOC))  # not a vd*/sd* disk: never read
    add_device(fake_machine, "nvme0n1", disk_bytes(DOC))
    add_device(fake_machine, "vda", b"\x53\xef" + b"\0" * 1022)  # some other disk
    add_device(fake_machine, "vda1", None)  # listed, but its node is gone: skipped
    wanted = add_device(fake_machine, "vdb", disk_bytes(DOC))
    add_device(fake_machine, "sda", b"\0" * 512)
    assert initdata.find_disk(*fake_machine) == wanted


def test_two_initdata_disks_are_a_refusal(fake_machine: tuple[Path, Path]) -> None:
    add_device(fake_machine, "vdb", disk_bytes(DOC))
    add_device(fake_machine, "sda", disk_bytes(b'version = "0.1.0"\nalgorithm = "sha256"\n'))
    with pytest.raises(InitdataError, match=r"more than one initdata disk: .*/sda, .*/vdb"):
        initdata.find_disk(*fake_machine)


def test_no_disk_no_initdata(fake_machine: tuple[Path, Path], tmp_path: Path) -> None:
    add_device(fake_machine, "vda", b"\0" * 512)
    assert initdata.find_disk(*fake_machine) is None
    assert initdata.find_disk(tmp_path / "no-sysfs", tmp_path) is None


def test_reads_and_parses_the_document(tmp_path: Path) -> None:
    disk = tmp_path / "vdb"
    disk.write_bytes(disk_bytes(DOC))
    assert disk.stat().st_size % 512 == 0
    found = initdata.read_disk(disk)
    assert found.toml == DOC and found.algorithm == "sha384"
    assert found.policy == POLICY
    assert found.digest == hashlib.sha384(DOC).digest()
    assert found.source == str(disk)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"initdata\x01", "shorter than its 16-byte header"),
        (disk_bytes(DOC, magic=b"notinit!"), "no initdata magic"),
        (disk_bytes(DOC, length=format_.MAX_GZIP_BYTES + 1), "more than"),
        (disk_bytes(DOC)[:40], "only 24 follow the header"),
        (b"initdata" + struct.pack("<Q", 5) + b"hello", "not a valid gzip stream"),
        (disk_bytes(b'version = "0.2.0"\nalgorithm = "sha256"\n[data]\n'), "got '0.2.0'"),
        (disk_bytes(b"#" * (format_.MAX_TOML_BYTES + 1)), "exceeds"),  # a gzip bomb
    ],
)
def test_bad_disks_are_refusals_naming_the_device(tmp_path: Path, raw: bytes, match: str) -> None:
    disk = tmp_path / "vdb"
    disk.write_bytes(raw)
    with pytest.raises(InitdataError, match=f"^initdata on {disk}: .*{match}"):
        initdata.read_disk(disk)
    with pytest.raises(InitdataError, match="No such file"):
        initdata.read_disk(tmp_path / "gone")


@dataclass
class FakeTee:
    platform: str | None
    field: bytes | None

    def init_data_field(self) -> bytes | None:
        return self.field


def test_verify_binds_to_the_evidence_field() -> None:
    found = Initdata(format_.from_toml(DOC), "/dev/vdb")
    initdata.verify(found, NoTee())
    initdata.verify(found, FakeTee("snp", format_.fit_digest(found.digest, 32)))
    initdata.verify(found, FakeTee("tdx", format_.fit_digest(found.digest, 48)))
    initdata.verify(found, FakeTee("sev", None))  # a TEE without the field: nothing to bind
    initdata.verify(None, FakeTee("snp", bytes(32)))  # no initdata, and none was measured
    with pytest.raises(InitdataError) as info:
        initdata.verify(found, FakeTee("snp", b"\x01" * 32))
    message = str(info.value)
    assert message.startswith("initdata digest mismatch: sha384 of the initdata on /dev/vdb")
    assert found.digest[:32].hex() in message and "HOSTDATA (set at launch) is 0101" in message
    with pytest.raises(InitdataError, match=r"MRCONFIGID .* no initdata disk was found"):
        initdata.verify(None, FakeTee("tdx", format_.fit_digest(found.digest, 48)))


def test_write_out_puts_the_files_for_the_guest_components(tmp_path: Path) -> None:
    out = tmp_path / "run/confidential-containers/initdata"
    written = initdata.write_out(Initdata(format_.from_toml(DOC)), out)
    assert sorted(p.name for p in written) == [
        "aa.toml", "cdh.toml", "initdata.toml", "policy.rego",
    ]  # fmt: skip
    assert (out / "initdata.toml").read_bytes() == DOC
    assert (out / "policy.rego").read_text() == POLICY
    assert stat.S_IMODE((out / "aa.toml").stat().st_mode) == 0o600
    minimal = Initdata(format_.from_toml(b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n'))
    assert [p.name for p in initdata.write_out(minimal, tmp_path / "m")] == ["initdata.toml"]


# -- what the agent settles before serving ----------------------------------------------------


def args_for(tmp_path: Path, *extra: str) -> SimpleNamespace:
    return parse_args(
        ["--unix", str(tmp_path / "s"), "--initdata-dir", str(tmp_path / "out"), *extra]
    )


def disk_file(tmp_path: Path, document: bytes = DOC) -> str:
    path = tmp_path / "initdata.img"
    path.write_bytes(disk_bytes(document))
    return str(path)


def test_without_initdata_or_tee_the_guest_is_a_development_one(tmp_path: Path) -> None:
    startup = prepare(args_for(tmp_path), NoTee())
    assert not startup.confidential and startup.initdata is None
    assert startup.policy.origin == "built-in development default (allow all)"


def test_confidential_by_flag_by_tee_or_by_initdata(tmp_path: Path) -> None:
    by_flag = prepare(args_for(tmp_path, "--confidential"), NoTee())
    assert by_flag.confidential and by_flag.policy.origin == "built-in confidential default"
    by_tee = prepare(args_for(tmp_path), FakeTee("snp", bytes(32)))
    assert by_tee.confidential and by_tee.policy.origin == "built-in confidential default"
    plain = disk_file(tmp_path, b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n')
    by_initdata = prepare(args_for(tmp_path, "--initdata", plain), NoTee())
    assert by_initdata.confidential
    assert by_initdata.policy.origin == "built-in confidential default"
    assert (tmp_path / "out/initdata.toml").exists()


def test_initdata_policy_replaces_any_default(tmp_path: Path) -> None:
    given = tmp_path / "given.rego"
    given.write_text("package agent_policy\ndefault ExecProcessRequest := true\n")
    startup = prepare(
        args_for(tmp_path, "--initdata", disk_file(tmp_path), "--policy", str(given)), NoTee()
    )
    assert startup.policy.origin == "initdata policy.rego"
    assert (tmp_path / "out/policy.rego").read_text() == POLICY
    without_initdata = prepare(args_for(tmp_path, "--policy", str(given)), NoTee())
    assert without_initdata.policy.origin == str(given)


def test_refusals_before_serving(tmp_path: Path) -> None:
    with pytest.raises(InitdataError, match="mismatch"):
        prepare(args_for(tmp_path, "--initdata", disk_file(tmp_path)), FakeTee("snp", bytes(32)))
    assert not (tmp_path / "out").exists()  # nothing written for a refused initdata
    bad_policy = DOC.replace(b"default ExecProcessRequest := false", b"default := ")
    with pytest.raises(InvalidArgument, match=r"initdata policy\.rego"):
        prepare(args_for(tmp_path, "--initdata", disk_file(tmp_path, bad_policy)), NoTee())
    assert not (tmp_path / "out").exists()


async def test_a_refusing_guest_answers_health_with_the_reason() -> None:
    health = RefusingHealth("guest refused to start: initdata digest mismatch: …")
    ctx = RequestContext("grpc.Health", "Check", {}, None)
    with pytest.raises(TtrpcError) as info:
        await health.Check(health_pb2.CheckRequest(), ctx)
    assert info.value.code == Code.FAILED_PRECONDITION
    assert info.value.message.startswith("guest refused to start: initdata digest mismatch")
    assert health.answered.is_set()


def test_the_guest_reads_the_disk_the_host_writes(fake_machine: tuple[Path, Path]) -> None:
    written_by_the_host = format_.from_toml(DOC).disk_image()  # protocols.initdata, host side
    add_device(fake_machine, "vdb", written_by_the_host)
    disk = initdata.find_disk(*fake_machine)
    assert disk is not None
    found = initdata.read_disk(disk)
    assert found.toml == DOC and found.policy == POLICY and found.source == str(disk)


def test_the_evidence_comes_from_guest_tee(monkeypatch: pytest.MonkeyPatch) -> None:
    import guest.tee
    from guest.agent.__main__ import TeeEvidence

    monkeypatch.setattr(guest.tee, "detect", lambda: guest.tee.Tee.SNP)
    monkeypatch.setattr(guest.tee, "bound_field", lambda tee: b"\x07" * 32)
    evidence = TeeEvidence()
    assert evidence.platform == "snp" and evidence.init_data_field() == b"\x07" * 32

    def broken(tee: object) -> bytes:
        raise guest.tee.TeeError("configfs-tsm: no outblob")

    monkeypatch.setattr(guest.tee, "bound_field", broken)
    with pytest.raises(InitdataError, match="reading the TEE's evidence failed: configfs-tsm"):
        evidence.init_data_field()
    monkeypatch.setattr(guest.tee, "detect", lambda: guest.tee.Tee.SAMPLE)
    assert TeeEvidence().platform is None  # coco-dev: no TEE, nothing bound


def test_the_dev_evidence_field_counts_only_without_a_tee(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """coco-dev tests give a no-TEE guest a field to mismatch; a TEE's report always wins."""
    import guest.tee
    from guest.agent.__main__ import TeeEvidence, dev_evidence_field, parser

    field = b"\x5a" * 48
    monkeypatch.setattr(guest.tee, "detect", lambda: guest.tee.Tee.SAMPLE)
    evidence = TeeEvidence(field)
    assert evidence.platform is None and evidence.init_data_field() == field
    found = Initdata(format_.from_toml(DOC), "/dev/vdb")
    with pytest.raises(InitdataError, match="initdata digest mismatch"):
        initdata.verify(found, evidence)
    initdata.verify(found, TeeEvidence(format_.fit_digest(found.digest, 48)))  # a match passes
    monkeypatch.setattr(guest.tee, "detect", lambda: guest.tee.Tee.TDX)
    monkeypatch.setattr(guest.tee, "bound_field", lambda tee: b"\x07" * 48)
    assert TeeEvidence(field).init_data_field() == b"\x07" * 48  # ignored on a TEE
    assert dev_evidence_field("ab" * 32) == b"\xab" * 32
    with pytest.raises(SystemExit):
        parser().parse_args(["--dev-evidence-field", "abcd"])
