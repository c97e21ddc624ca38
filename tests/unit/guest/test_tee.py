"""guest.tee: configfs-tsm against a fake tree; SNP/TDX layouts built from the spec offsets."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from guest.tee import Tee, TeeError, bound_field, detect
from guest.tee.snp import SnpReport, SnpReportError
from guest.tee.tdx import TdxQuote, TdxQuoteError
from guest.tee.tsm import TsmError, TsmReports
from tests.unit.guest.tee_fakes import FakeTsm, snp_report, tdx_quote

TOML = b'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"aa.toml" = ""\n'


def snp_tsm(tmp_path: Path, host_data: bytes, *, racer: bool = False) -> FakeTsm:
    return FakeTsm(tmp_path / "report", "sev_guest",
                   lambda inblob: snp_report(report_data=inblob, host_data=host_data),
                   racer=racer)


def tdx_tsm(tmp_path: Path, mrconfigid: bytes, version: int = 4) -> FakeTsm:
    return FakeTsm(tmp_path / "report", "tdx_guest",
                   lambda inblob: tdx_quote(report_data=inblob, mrconfigid=mrconfigid,
                                            version=version))


def test_snp_report_fields_at_spec_offsets() -> None:
    raw = snp_report(report_data=b"R" * 64, host_data=b"H" * 32)
    report = SnpReport.parse(raw)
    assert report.version == 3
    assert report.report_data == b"R" * 64
    assert report.host_data == b"H" * 32
    assert report.measurement == b"\x11" * 48
    assert report.policy == 0x30000


def test_snp_evidence_is_the_sev_crate_serde_shape() -> None:
    report = SnpReport.parse(snp_report(report_data=b"\x01" * 48, host_data=b"\x02" * 32))
    evidence = report.evidence()
    assert set(evidence) == {"attestation_report", "cert_chain"}
    rep = evidence["attestation_report"]
    assert rep["report_data"] == [1] * 48 + [0] * 16
    assert rep["host_data"] == [2] * 32
    assert rep["current_tcb"] == {"fmc": None, "bootloader": 3, "tee": 0, "snp": 8,
                                  "microcode": 115}
    assert rep["current"] == {"major": 1, "minor": 55, "build": 21}
    assert rep["committed"] == {"major": 1, "minor": 54, "build": 20}
    assert (rep["cpuid_fam_id"], rep["cpuid_mod_id"], rep["cpuid_step"]) == (0x19, 0x11, 1)
    assert rep["signature"] == {"r": [0xAA] * 72, "s": [0xBB] * 72}
    assert rep["launch_mit_vector"] is None  # only version 5 reports carry it
    assert len(rep) == 29  # every field of sev's AttestationReport


def test_snp_turin_tcb_layout_and_v2_without_cpuid() -> None:
    turin = SnpReport.parse(snp_report(cpuid=(0x1A, 0x02, 0))).evidence()["attestation_report"]
    assert turin["current_tcb"] == {"fmc": 3, "bootloader": 0, "tee": 0, "snp": 0,
                                    "microcode": 115}
    v2 = SnpReport.parse(snp_report(version=2)).evidence()["attestation_report"]
    assert v2["cpuid_fam_id"] is None


def test_snp_report_rejects_short_and_unknown_versions() -> None:
    with pytest.raises(SnpReportError, match="1184 bytes, got 100"):
        SnpReport.parse(b"\0" * 100)
    with pytest.raises(SnpReportError, match="version 9"):
        SnpReport.parse(snp_report(version=9))


@pytest.mark.parametrize("version", [4, 5])
def test_tdx_quote_fields_at_spec_offsets(version: int) -> None:
    quote = TdxQuote.parse(tdx_quote(report_data=b"R" * 64, mrconfigid=b"C" * 48,
                                     version=version))
    assert quote.version == version
    assert quote.mrconfigid == b"C" * 48
    assert quote.report_data == b"R" * 64
    assert quote.mrtd == b"\x22" * 48
    assert quote.rtmr(2) == bytes([0x32]) * 48
    evidence = quote.evidence(b"eventlog")
    assert base64.b64decode(evidence["quote"]) == quote.raw
    assert base64.b64decode(evidence["cc_eventlog"]) == b"eventlog"


def test_tdx_quote_refuses_other_tees() -> None:
    raw = bytearray(tdx_quote())
    raw[4] = 0x00  # TEE type SGX
    with pytest.raises(TdxQuoteError, match="not a TDX quote"):
        TdxQuote.parse(bytes(raw))


def test_tsm_report_writes_inblob_reads_outblob_and_cleans_up(tmp_path: Path) -> None:
    tsm = snp_tsm(tmp_path, b"")
    made = tsm.report(b"abc")
    assert made.provider == "sev_guest"
    assert tsm.inblobs == [b"abc".ljust(64, b"\0")]
    assert SnpReport.parse(made.outblob).report_data.startswith(b"abc")
    assert list(tsm.root.iterdir()) == []  # the report directory was removed


def test_tsm_generation_race_is_refused(tmp_path: Path) -> None:
    tsm = snp_tsm(tmp_path, b"", racer=True)
    with pytest.raises(TsmError, match="another process wrote"):
        tsm.report(b"x")
    assert list(tsm.root.iterdir()) == []


def test_tsm_missing_interface_and_oversized_report_data(tmp_path: Path) -> None:
    with pytest.raises(TsmError, match="no configfs-tsm report interface"):
        TsmReports(tmp_path / "absent").report(b"")
    with pytest.raises(TsmError, match="at most 64"):
        snp_tsm(tmp_path, b"").report(b"x" * 65)


def test_detect(tmp_path: Path) -> None:
    assert detect(TsmReports(tmp_path / "absent")) is Tee.SAMPLE
    assert detect(snp_tsm(tmp_path / "s", b"")) is Tee.SNP
    assert detect(tdx_tsm(tmp_path / "t", b"")) is Tee.TDX
    with pytest.raises(TeeError, match="unsupported configfs-tsm provider 'arm_cca_guest'"):
        detect(FakeTsm(tmp_path / "c", "arm_cca_guest", lambda b: b"x"))


def test_bound_field_snp(tmp_path: Path) -> None:
    digest = hashlib.sha384(TOML).digest()
    assert bound_field(Tee.SNP, snp_tsm(tmp_path / "good", digest[:32])) == digest[:32]
    assert bound_field(Tee.SNP, snp_tsm(tmp_path / "other", b"\x07" * 32)) == b"\x07" * 32


def test_bound_field_tdx(tmp_path: Path) -> None:
    digest = hashlib.sha256(TOML).digest()
    tsm = tdx_tsm(tmp_path, digest + b"\0" * 16, version=5)
    assert bound_field(Tee.TDX, tsm) == digest + b"\0" * 16


def test_sample_binds_nothing() -> None:
    assert bound_field(Tee.SAMPLE) is None


def test_provider_mismatch_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TeeError, match="provider is 'tdx_guest', not one for snp"):
        bound_field(Tee.SNP, tdx_tsm(tmp_path, b""))
