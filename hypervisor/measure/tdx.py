"""Intel TDX MRTD of a QEMU/KVM TD, from the TDVF metadata of its firmware.

MRTD is one SHA-384 over 128-byte records the TDX module appends while the VMM builds the TD
(TDX module ABI, TDH.MEM.PAGE.ADD and TDH.MR.EXTEND):

* ``MEM.PAGE.ADD``: ``"MEM.PAGE.ADD"`` padded to 16 bytes, the page's GPA (u64 LE), zeros to 128;
* ``MR.EXTEND`` of a 256-byte chunk: ``"MR.EXTEND"`` padded to 16, the chunk's GPA, zeros to 128,
  then the chunk's 256 bytes.

QEMU hands KVM every TDVF section in metadata order (``KVM_TDX_INIT_MEM_REGION``, measured when
the section has the MR.EXTEND attribute) and KVM adds page by page: PAGE.ADD of the page, then
its 16 MR.EXTENDs. BFV/CFV content comes from the image; TD_HOB and TEMP_MEM are only added
(their GPA is measured, their content is not). The RTMRs (TDVF's event log of the TD HOB, ACPI
tables, kernel, initrd, command line) are not computed here.
"""

from __future__ import annotations

import hashlib
import struct

from hypervisor.measure.errors import MeasureError
from hypervisor.measure.ovmf import PAGE, OvmfImage

CHUNK = 256
_RECORD = struct.Struct("<16sQ104x")


def page_add_record(gpa: int) -> bytes:
    return _RECORD.pack(b"MEM.PAGE.ADD", gpa)


def mr_extend_record(gpa: int, chunk: bytes) -> bytes:
    if len(chunk) != CHUNK:
        raise ValueError(f"MR.EXTEND covers {CHUNK} bytes, got {len(chunk)}")
    return _RECORD.pack(b"MR.EXTEND", gpa) + chunk


def mrtd(image: OvmfImage) -> bytes:
    """The 48-byte MRTD of a TD booted from this TDVF image by QEMU/KVM."""
    digest = hashlib.sha384()
    for section in image.tdvf_sections():
        for page in range(section.size // PAGE):
            gpa = section.gpa + page * PAGE
            digest.update(page_add_record(gpa))
            if not section.extended:
                continue
            base = section.data_offset + page * PAGE
            for chunk in range(0, PAGE, CHUNK):
                digest.update(mr_extend_record(gpa + chunk,
                                               image.data[base + chunk:base + chunk + CHUNK]))
    return digest.digest()


# MRTDs an independent implementation computed for exact firmware images (sha256 of the file).
# Source: confidential-containers/td-shim, td-shim-tools/src/bin/td-shim-tee-info-hash/
# td_shim_tee_info_hash.py at commit 125eeab5 (2026-08-18), run by hand on the image.
CROSS_CHECKED: dict[str, tuple[str, str]] = {
    "a265075b4147a096109e501e76196df1ec8a18659c26f7401492c597ec88f312": (
        "a7a1f751abc454f9cbab198ca8d2edb2821935df525c74182b5e776cb0929e8c"
        "59aefecce725b0d08a5e9d3d3183bd08",
        "Debian ovmf-inteltdx 2026.08+ds-2, OVMF.inteltdx.ms.fd"),
    "3e4fd0b3fe3b2dbe481c3d9e99418a034174f26cbe1f55aa212b0f18c12d2d6f": (
        "5f77220a7135b2be2087c3555b897a1c56ca84516fafc622a33fa498a46305a1"
        "2597a18bb57bc50f714ffab9fe6f004d",
        "Debian ovmf-amdsev 2026.08+ds-2, OVMF.amdsev.fd (it carries TDVF metadata too)"),
}
CROSS_CHECKER = ("td-shim's td_shim_tee_info_hash.py (confidential-containers/td-shim "
                 "125eeab5)")


def cross_check(image_sha256: str, value: bytes) -> str:
    """How far this MRTD is checked: an independent value for this exact image, or nothing.

    An image on the list whose MRTD disagrees with the recorded value is an error: the value
    printed would be known wrong.
    """
    known = CROSS_CHECKED.get(image_sha256)
    if known is None:
        return ("not cross-checked: computed step by step from the TDVF metadata (no "
                "independent value recorded for this image)")
    expected, what = known
    if value.hex() != expected:
        raise MeasureError(f"MRTD {value.hex()} disagrees with {CROSS_CHECKER}'s {expected} "
                           f"for {what}")
    return f"cross-checked: equal to {CROSS_CHECKER} on this exact image ({what})"
