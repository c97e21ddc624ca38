"""AMD SEV-SNP attestation report (SEV-SNP firmware ABI spec, ATTESTATION_REPORT structure).

The report is 0x4A0 bytes, little-endian. Offsets of the fields used here:

==========  ====  ==========================================
offset      size  field
==========  ====  ==========================================
0x000       4     VERSION (2, 3 or 5)
0x004       4     GUEST_SVN
0x008       8     POLICY
0x010       16    FAMILY_ID
0x020       16    IMAGE_ID
0x030       4     VMPL
0x034       4     SIGNATURE_ALGO
0x038       8     CURRENT_TCB
0x040       8     PLATFORM_INFO
0x048       4     KEY_INFO (author key en, mask chip key, signing key)
0x050       64    REPORT_DATA (guest supplied)
0x090       48    MEASUREMENT
0x0C0       32    HOST_DATA (supplied by the host at launch: the initdata digest)
0x0E0       48    ID_KEY_DIGEST
0x110       48    AUTHOR_KEY_DIGEST
0x140       32    REPORT_ID
0x160       32    REPORT_ID_MA
0x180       8     REPORTED_TCB
0x188       1 each CPUID_FAM_ID, CPUID_MOD_ID, CPUID_STEP (version ≥ 3)
0x1A0       64    CHIP_ID
0x1E0       8     COMMITTED_TCB
0x1E8       3     CURRENT build, minor, major
0x1EC       3     COMMITTED build, minor, major
0x1F0       8     LAUNCH_TCB
0x1F8       8     LAUNCH_MIT_VECTOR (version ≥ 5)
0x200       8     CURRENT_MIT_VECTOR (version ≥ 5)
0x2A0       72+72 SIGNATURE r, s (little-endian, zero-extended)
==========  ====  ==========================================

:meth:`SnpReport.evidence` renders the report as trustee's SNP verifier deserialises it
(``SnpEvidence { attestation_report, cert_chain }`` with the virtee ``sev`` crate's serde
form of ``AttestationReport``: byte arrays as arrays of numbers, bitfield newtypes as
integers, TCB versions as ``{fmc, bootloader, tee, snp, microcode}``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

REPORT_SIZE = 0x4A0
REPORT_DATA = slice(0x50, 0x90)
MEASUREMENT = slice(0x90, 0xC0)
HOST_DATA = slice(0xC0, 0xE0)
HOST_DATA_SIZE = 32
TURIN_FAMILY = 0x1A  # TCB version layout changed with Zen 5 (fmc byte first)


class SnpReportError(ValueError):
    pass


def _tcb(raw: bytes, turin: bool) -> dict[str, int | None]:
    if turin:
        return {"fmc": raw[0], "bootloader": raw[1], "tee": raw[2], "snp": raw[3],
                "microcode": raw[7]}
    return {"fmc": None, "bootloader": raw[0], "tee": raw[1], "snp": raw[6],
            "microcode": raw[7]}


@dataclass(frozen=True)
class SnpReport:
    raw: bytes

    @classmethod
    def parse(cls, data: bytes) -> SnpReport:
        if len(data) < REPORT_SIZE:
            raise SnpReportError(
                f"an SNP attestation report is {REPORT_SIZE} bytes, got {len(data)}"
            )
        report = cls(bytes(data[:REPORT_SIZE]))
        if report.version not in (2, 3, 4, 5):
            raise SnpReportError(f"unsupported SNP report version {report.version}")
        return report

    def _u32(self, offset: int) -> int:
        return int(struct.unpack_from("<I", self.raw, offset)[0])

    def _u64(self, offset: int) -> int:
        return int(struct.unpack_from("<Q", self.raw, offset)[0])

    @property
    def version(self) -> int:
        return self._u32(0x0)

    @property
    def policy(self) -> int:
        return self._u64(0x8)

    @property
    def report_data(self) -> bytes:
        return self.raw[REPORT_DATA]

    @property
    def measurement(self) -> bytes:
        return self.raw[MEASUREMENT]

    @property
    def host_data(self) -> bytes:
        return self.raw[HOST_DATA]

    @property
    def _cpuid(self) -> tuple[int | None, int | None, int | None]:
        if self.version < 3:
            return None, None, None
        return self.raw[0x188], self.raw[0x189], self.raw[0x18A]

    def evidence(self) -> dict[str, Any]:
        """trustee's ``SnpEvidence`` JSON (no certificate chain: the verifier fetches VCEK)."""
        fam, mod, step = self._cpuid
        turin = fam == TURIN_FAMILY
        raw = self.raw

        def arr(start: int, size: int) -> list[int]:
            return list(raw[start:start + size])

        def version_at(offset: int) -> dict[str, int]:
            return {"major": raw[offset + 2], "minor": raw[offset + 1], "build": raw[offset]}

        v5 = self.version >= 5
        report = {
            "version": self.version,
            "guest_svn": self._u32(0x4),
            "policy": self.policy,
            "family_id": arr(0x10, 16),
            "image_id": arr(0x20, 16),
            "vmpl": self._u32(0x30),
            "sig_algo": self._u32(0x34),
            "current_tcb": _tcb(raw[0x38:0x40], turin),
            "plat_info": self._u64(0x40),
            "key_info": self._u32(0x48),
            "report_data": arr(0x50, 64),
            "measurement": arr(0x90, 48),
            "host_data": arr(0xC0, 32),
            "id_key_digest": arr(0xE0, 48),
            "author_key_digest": arr(0x110, 48),
            "report_id": arr(0x140, 32),
            "report_id_ma": arr(0x160, 32),
            "reported_tcb": _tcb(raw[0x180:0x188], turin),
            "cpuid_fam_id": fam,
            "cpuid_mod_id": mod,
            "cpuid_step": step,
            "chip_id": arr(0x1A0, 64),
            "committed_tcb": _tcb(raw[0x1E0:0x1E8], turin),
            "current": version_at(0x1E8),
            "committed": version_at(0x1EC),
            "launch_tcb": _tcb(raw[0x1F0:0x1F8], turin),
            "launch_mit_vector": self._u64(0x1F8) if v5 else None,
            "current_mit_vector": self._u64(0x200) if v5 else None,
            "signature": {"r": arr(0x2A0, 72), "s": arr(0x2E8, 72)},
        }
        return {"attestation_report": report, "cert_chain": None}
