"""TEE evidence in the shapes trustee's verifiers read.

- ``sample`` (coco-dev, no TEE): ``{"svn": "1", "report_data": <base64 of the report data>}``.
- ``snp``: ``{"attestation_report": {...}, "cert_chain": null}`` from a configfs-tsm report.
- ``tdx``: ``{"cc_eventlog": <base64 or null>, "quote": <base64>}`` from a configfs-tsm quote.

Report data is the runtime-data digest (48 bytes for SHA-384); SNP and TDX zero-pad it to the
64-byte field, the sample attester sends it as is (trustee's sample verifier compares it
exactly).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, Protocol

from guest.attestation.errors import EvidenceError
from guest.tee import Tee, TeeError, report
from guest.tee.snp import SnpReport
from guest.tee.tdx import TdxQuote
from guest.tee.tsm import TsmReports

CCEL_TABLE = Path("/sys/firmware/acpi/tables/data/CCEL")
REPORT_DATA_MAX = 64


class Attester(Protocol):
    tee: Tee

    def evidence(self, report_data: bytes) -> dict[str, Any]: ...


class SampleAttester:
    tee = Tee.SAMPLE

    def evidence(self, report_data: bytes) -> dict[str, Any]:
        return {"svn": "1", "report_data": base64.b64encode(report_data).decode()}


class _TsmAttester:
    tee: Tee

    def __init__(self, tsm: TsmReports | None = None) -> None:
        self.tsm = tsm or TsmReports()

    def _raw(self, report_data: bytes) -> bytes:
        if len(report_data) > REPORT_DATA_MAX:
            raise EvidenceError(f"report data is {len(report_data)} bytes, at most 64")
        try:
            return report(self.tee, report_data.ljust(REPORT_DATA_MAX, b"\0"), self.tsm)
        except TeeError as err:
            raise EvidenceError(f"{self.tee.value} evidence: {err}") from err


class SnpAttester(_TsmAttester):
    tee = Tee.SNP

    def evidence(self, report_data: bytes) -> dict[str, Any]:
        try:
            return SnpReport.parse(self._raw(report_data)).evidence()
        except ValueError as err:
            raise EvidenceError(f"snp evidence: {err}") from err


class TdxAttester(_TsmAttester):
    tee = Tee.TDX

    def __init__(self, tsm: TsmReports | None = None, ccel: Path = CCEL_TABLE) -> None:
        super().__init__(tsm)
        self.ccel = ccel

    def evidence(self, report_data: bytes) -> dict[str, Any]:
        try:
            quote = TdxQuote.parse(self._raw(report_data))
        except ValueError as err:
            raise EvidenceError(f"tdx evidence: {err}") from err
        try:
            eventlog: bytes | None = self.ccel.read_bytes()
        except OSError:
            eventlog = None  # no CC event log table: trustee accepts null
        return quote.evidence(eventlog)


def attester_for(tee: Tee, tsm: TsmReports | None = None) -> Attester:
    if tee is Tee.SAMPLE:
        return SampleAttester()
    if tee is Tee.SNP:
        return SnpAttester(tsm)
    return TdxAttester(tsm)
