"""AMD launch digests of a QEMU/KVM guest: SEV, SEV-ES and SEV-SNP.

* SEV-SNP (SNP ABI, SNP_LAUNCH_UPDATE): the launch digest starts as 48 zero bytes and every
  page the VMM hands the firmware folds in as ``LD = SHA-384(PAGE_INFO)`` where PAGE_INFO is
  ``LD || contents || u16 0x70 || u8 type || u8 imi || u8 vmpl3 || u8 vmpl2 || u8 vmpl1 ||
  u8 0 || u64 gpa`` and contents is SHA-384 of the page for NORMAL and VMSA pages, zeros
  otherwise. QEMU hands over: the firmware image (NORMAL, ending at 4 GiB), then the firmware's
  SEV metadata sections in order (SEC_MEM and SVSM_CAA as ZERO, SECRETS, CPUID, and
  KERNEL_HASHES as a NORMAL page holding the hashes table when direct boot uses kernel-hashes,
  else ZERO), then one VMSA per vCPU at GPA 0xFFFFFFFFF000.
* SEV and SEV-ES (LAUNCH_UPDATE_DATA/VMSA): SHA-256 over the firmware image, the padded hashes
  table when kernel-hashes is on, and (SEV-ES) each VMSA page. That is the firmware's GCTX.LD;
  the MEASUREMENT it returns is an HMAC over it with the session key, so only LD is predictable.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hypervisor.measure.errors import MeasureError
from hypervisor.measure.ovmf import PAGE, OvmfImage, SevSectionType
from hypervisor.measure.vmsa import vmsa_pages

VMSA_GPA = 0xFFFFFFFFF000  # (u64)-1 page-aligned, bits above 51 cleared


class PageType:
    """SNP_LAUNCH_UPDATE page types."""

    NORMAL = 0x01
    VMSA = 0x02
    ZERO = 0x03
    UNMEASURED = 0x04
    SECRETS = 0x05
    CPUID = 0x06


_PAGE_INFO_TAIL = struct.Struct("<HBBBBBBQ")  # len, type, imi, vmpl3, vmpl2, vmpl1, 0, gpa
_ZERO48 = bytes(48)

# QEMU's SEV hashes table (target/i386/sev.c): header GUID, u16 length, then cmdline, initrd,
# kernel entries of (GUID, u16 length, SHA-256), padded to 16 bytes.
HASH_TABLE_GUID = uuid.UUID("9438d606-4f22-4cc9-b479-a793d411fd21")
CMDLINE_GUID = uuid.UUID("97d02dd8-bd20-4c94-aa78-e7714d36ab2a")
INITRD_GUID = uuid.UUID("44baf731-3a2f-4bd7-9af1-41e29169781d")
KERNEL_GUID = uuid.UUID("4de79437-abd2-427f-b835-d5b172d2045b")


def sha256_file(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


@dataclass(frozen=True)
class KernelHashes:
    """SHA-256 of the kernel file, the initrd file (empty when none) and the command line plus
    its NUL, as QEMU puts them in the table OVMF checks before booting the kernel."""

    kernel: bytes
    initrd: bytes
    cmdline: bytes

    @classmethod
    def of(cls, kernel: Path, initrd: Path | None, append: str) -> KernelHashes:
        return cls(kernel=sha256_file(kernel),
                   initrd=sha256_file(initrd) if initrd is not None else
                   hashlib.sha256(b"").digest(),
                   cmdline=hashlib.sha256(append.encode() + b"\0").digest())

    def table(self) -> bytes:
        entry = struct.Struct("<16sH32s")
        body = b"".join(entry.pack(guid.bytes_le, entry.size, digest) for guid, digest in (
            (CMDLINE_GUID, self.cmdline), (INITRD_GUID, self.initrd),
            (KERNEL_GUID, self.kernel)))
        header = struct.pack("<16sH", HASH_TABLE_GUID.bytes_le, 18 + len(body))
        table = header + body
        return table + bytes(-len(table) % 16)


class SnpLaunchDigest:
    """The SNP launch digest as pages are added (SNP ABI, PAGE_INFO)."""

    def __init__(self) -> None:
        self.ld = _ZERO48
        self.pages = 0

    def _update(self, page_type: int, gpa: int, contents: bytes) -> None:
        info = self.ld + contents + _PAGE_INFO_TAIL.pack(0x70, page_type, 0, 0, 0, 0, 0, gpa)
        self.ld = hashlib.sha384(info).digest()
        self.pages += 1

    def normal(self, gpa: int, data: bytes) -> None:
        if len(data) % PAGE:
            raise ValueError("normal pages come whole")
        for offset in range(0, len(data), PAGE):
            self._update(PageType.NORMAL, gpa + offset,
                         hashlib.sha384(data[offset:offset + PAGE]).digest())

    def typed(self, page_type: int, gpa: int, size: int) -> None:
        """ZERO, SECRETS, CPUID (or UNMEASURED) pages: no contents in the digest."""
        for offset in range(0, size, PAGE):
            self._update(page_type, gpa + offset, _ZERO48)

    def vmsa(self, page: bytes) -> None:
        self._update(PageType.VMSA, VMSA_GPA, hashlib.sha384(page).digest())


def _hashes_section(image: OvmfImage, size: int, gpa: int, hashes: KernelHashes) -> bytes:
    table_gpa, table_size = image.sev_hash_table()
    table = hashes.table()
    offset = table_gpa - gpa
    if table_gpa == 0 or not 0 <= offset <= size - len(table) or table_size < len(table):
        raise MeasureError(f"{image.name}: its SEV hash table ({table_gpa:#x}, {table_size} "
                           f"bytes) does not lie in the KERNEL_HASHES section at {gpa:#x}")
    return bytes(offset) + table + bytes(size - offset - len(table))


def snp_launch_digest(image: OvmfImage, vcpus: int, signature: int, sev_features: int,
                      hashes: KernelHashes | None) -> bytes:
    """The 48-byte SNP launch measurement QEMU/KVM produce for this launch."""
    ld = SnpLaunchDigest()
    ld.normal(image.gpa, image.data)
    sections = image.sev_sections()
    if hashes is not None and not any(s.type is SevSectionType.SNP_KERNEL_HASHES
                                      for s in sections):
        raise MeasureError(f"{image.name}: kernel-hashes is on but the firmware's SEV metadata "
                           "has no KERNEL_HASHES section (QEMU would refuse to launch)")
    for section in sections:
        kind = section.type
        if kind in (SevSectionType.SNP_SEC_MEM, SevSectionType.SVSM_CAA):
            ld.typed(PageType.ZERO, section.gpa, section.size)
        elif kind is SevSectionType.SNP_SECRETS:
            ld.typed(PageType.SECRETS, section.gpa, section.size)
        elif kind is SevSectionType.CPUID:
            ld.typed(PageType.CPUID, section.gpa, section.size)
        elif hashes is not None:  # KERNEL_HASHES
            ld.normal(section.gpa, _hashes_section(image, section.size, section.gpa, hashes))
        else:
            ld.typed(PageType.ZERO, section.gpa, section.size)
    for page in vmsa_pages(vcpus, image.sev_es_reset_eip(), signature, sev_features):
        ld.vmsa(page)
    return ld.ld


def _checked_table(image: OvmfImage, hashes: KernelHashes | None) -> bytes:
    if hashes is None:
        return b""
    table_gpa, _ = image.sev_hash_table()
    if table_gpa == 0:
        raise MeasureError(f"{image.name}: kernel-hashes is on but the firmware has no SEV hash "
                           "table (not an AmdSev build?)")
    return hashes.table()


def sev_launch_digest(image: OvmfImage, hashes: KernelHashes | None) -> bytes:
    """SEV GCTX.LD (SHA-256): the firmware image, then the hashes table."""
    return hashlib.sha256(image.data + _checked_table(image, hashes)).digest()


def sev_es_launch_digest(image: OvmfImage, vcpus: int, signature: int,
                         hashes: KernelHashes | None) -> bytes:
    """SEV-ES GCTX.LD: as SEV, then every VMSA (SEV features 0 under KVM_SEV_INIT2)."""
    digest = hashlib.sha256(image.data + _checked_table(image, hashes))
    pages: Iterable[bytes] = vmsa_pages(vcpus, image.sev_es_reset_eip(), signature, 0)
    for page in pages:
        digest.update(page)
    return digest.digest()
