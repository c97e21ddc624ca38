"""What an OVMF / TDVF image tells the VMM: its GUIDed footer table and the metadata it names.

Layout (edk2 OvmfPkg ResetVector, read by QEMU's ``pc_system_ovmf_table_find``): the last 32
bytes of the image hold the reset vector; just before them sits the footer entry, a u16 length
and the footer GUID, covering a table of entries that each end with their own u16 length and
GUID, the entry's data in front of them. Entries used here:

* SEV metadata (``ASEV``): the pages the SNP launch measures besides the image itself;
* the SEV-ES reset block: the AP reset address (first VMSA of every AP);
* the SEV hash table location: where QEMU writes the kernel/initrd/cmdline hashes;
* TDX metadata (``TDVF``): the sections the TDX module adds and extends into MRTD.

Everything here is pure: bytes in, typed values out, :class:`MeasureError` naming the problem.
"""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass

from hypervisor.measure.errors import MeasureError

FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_ES_RESET_BLOCK_GUID = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
SEV_HASH_TABLE_GUID = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
SEV_METADATA_GUID = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")
TDX_METADATA_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2")

FOUR_GIB = 1 << 32
PAGE = 4096
_ENTRY_TAIL = struct.Struct("<H16s")  # u16 length, GUID (both at the end of each entry)
_RESET_VECTOR_BYTES = 32


class SevSectionType(enum.IntEnum):
    """OVMF SEV metadata section types (OvmfPkg/ResetVector/X64/OvmfSevMetadata.asm)."""

    SNP_SEC_MEM = 1
    SNP_SECRETS = 2
    CPUID = 3
    SVSM_CAA = 4
    SNP_KERNEL_HASHES = 0x10


class TdvfSectionType(enum.IntEnum):
    """TDVF metadata section types QEMU accepts (hw/i386/tdvf.c refuses any other)."""

    BFV = 0
    CFV = 1
    TD_HOB = 2
    TEMP_MEM = 3


TDVF_ATTR_MR_EXTEND = 0x1
TDVF_ATTR_PAGE_AUG = 0x2


@dataclass(frozen=True)
class SevSection:
    gpa: int
    size: int
    type: SevSectionType


@dataclass(frozen=True)
class TdvfSection:
    data_offset: int
    raw_size: int
    gpa: int
    size: int
    type: TdvfSectionType
    attributes: int

    @property
    def extended(self) -> bool:
        return bool(self.attributes & TDVF_ATTR_MR_EXTEND)


@dataclass(frozen=True)
class OvmfImage:
    """An OVMF/TDVF image mapped just below 4 GiB (``-bios``), with its footer table."""

    data: bytes
    table: dict[uuid.UUID, bytes]
    name: str = "<firmware>"

    @classmethod
    def parse(cls, data: bytes, name: str = "<firmware>") -> OvmfImage:
        if len(data) % PAGE or not data:
            raise MeasureError(f"{name}: {len(data)} bytes is not a whole number of 4 KiB pages")
        return cls(data, _footer_table(data, name), name)

    @property
    def gpa(self) -> int:
        """Where QEMU maps a ``-bios`` image: ending at 4 GiB."""
        return FOUR_GIB - len(self.data)

    def _u32(self, guid: uuid.UUID, what: str, need: str) -> int:
        entry = self.table.get(guid)
        if entry is None or len(entry) < 4:
            raise MeasureError(f"{self.name}: no {what} entry in the OVMF footer table "
                               f"({need})")
        return int.from_bytes(entry[:4], "little")

    def sev_es_reset_eip(self) -> int:
        """The address every AP starts at (SEV-ES/SNP)."""
        return self._u32(SEV_ES_RESET_BLOCK_GUID, "SEV-ES reset block",
                         "not an AmdSev build?")

    def sev_hash_table(self) -> tuple[int, int]:
        """(gpa, size) where QEMU writes the kernel hashes table; (0, 0) when absent."""
        entry = self.table.get(SEV_HASH_TABLE_GUID)
        if entry is None or len(entry) < 8:
            return 0, 0
        return int.from_bytes(entry[:4], "little"), int.from_bytes(entry[4:8], "little")

    def sev_sections(self) -> list[SevSection]:
        """The SEV metadata sections, in image order (the order the launch measures them)."""
        offset = self._u32(SEV_METADATA_GUID, "SEV metadata", "firmware without SEV metadata "
                           "cannot be measured for SNP: use an AmdSev OVMF build")
        start = len(self.data) - offset
        header = struct.Struct("<4sIII")
        if not 0 <= start <= len(self.data) - header.size:
            raise MeasureError(f"{self.name}: SEV metadata offset {offset:#x} is outside the "
                               "image")
        sig, length, version, count = header.unpack_from(self.data, start)
        if sig != b"ASEV" or version != 1:
            raise MeasureError(f"{self.name}: bad SEV metadata header (signature {sig!r}, "
                               f"version {version})")
        item = struct.Struct("<III")
        if length != header.size + count * item.size or start + length > len(self.data):
            raise MeasureError(f"{self.name}: SEV metadata length {length} does not fit "
                               f"{count} sections")
        out = []
        for i in range(count):
            gpa, size, kind = item.unpack_from(self.data, start + header.size + i * item.size)
            try:
                stype = SevSectionType(kind)
            except ValueError:
                raise MeasureError(f"{self.name}: SEV metadata section {i} has unknown type "
                                   f"{kind:#x}") from None
            if gpa % PAGE or size % PAGE:
                raise MeasureError(f"{self.name}: SEV metadata section {i} ({stype.name}) is "
                                   f"not page aligned: gpa {gpa:#x} size {size:#x}")
            out.append(SevSection(gpa, size, stype))
        return out

    def tdvf_sections(self) -> list[TdvfSection]:
        """The TDVF metadata sections, checked as QEMU checks them (hw/i386/tdvf.c)."""
        offset = self._u32(TDX_METADATA_GUID, "TDX metadata",
                           "firmware without TDVF metadata cannot launch a TD")
        start = len(self.data) - offset
        header = struct.Struct("<4sIII")
        if not 0 <= start <= len(self.data) - header.size:
            raise MeasureError(f"{self.name}: TDX metadata offset {offset:#x} is outside the "
                               "image")
        sig, length, version, count = header.unpack_from(self.data, start)
        if sig != b"TDVF" or version != 1:
            raise MeasureError(f"{self.name}: bad TDVF metadata header (signature {sig!r}, "
                               f"version {version})")
        entry = struct.Struct("<IIQQII")
        if count < 2 or length != header.size + count * entry.size or (
                start + length > len(self.data)):
            raise MeasureError(f"{self.name}: TDVF metadata length {length} does not fit "
                               f"{count} sections")
        out = []
        for i in range(count):
            fields = entry.unpack_from(self.data, start + header.size + i * entry.size)
            out.append(self._tdvf_section(i, *fields))
        return out

    def _tdvf_section(self, i: int, data_offset: int, raw: int, gpa: int, size: int,
                      kind: int, attributes: int) -> TdvfSection:
        where = f"{self.name}: TDVF section {i}"
        try:
            stype = TdvfSectionType(kind)
        except ValueError:
            raise MeasureError(f"{where} has type {kind}, which QEMU does not load") from None
        if gpa % PAGE or size % PAGE:
            raise MeasureError(f"{where} ({stype.name}) is not page aligned: gpa {gpa:#x} "
                               f"size {size:#x}")
        if size < raw:
            raise MeasureError(f"{where} ({stype.name}): raw size {raw:#x} exceeds memory "
                               f"size {size:#x}")
        from_image = stype in (TdvfSectionType.BFV, TdvfSectionType.CFV)
        if from_image and (raw == 0 or data_offset + size > len(self.data)):
            raise MeasureError(f"{where} ({stype.name}): data {data_offset:#x}+{size:#x} is "
                               "not inside the image")
        if not from_image and raw:
            raise MeasureError(f"{where} ({stype.name}) carries {raw:#x} raw bytes")
        if not from_image and attributes & TDVF_ATTR_MR_EXTEND:
            raise MeasureError(f"{where} ({stype.name}) asks MR.EXTEND of memory the VMM "
                               "fills at launch: its content cannot be predicted")
        return TdvfSection(data_offset, raw, gpa, size, stype, attributes)


def _footer_table(data: bytes, name: str) -> dict[uuid.UUID, bytes]:
    """GUID -> entry data; empty when the image has no footer table."""
    end = len(data) - _RESET_VECTOR_BYTES
    if end < _ENTRY_TAIL.size:
        return {}
    total, guid = _ENTRY_TAIL.unpack_from(data, end - _ENTRY_TAIL.size)
    if uuid.UUID(bytes_le=guid) != FOOTER_GUID:
        return {}
    start = end - total
    if total < _ENTRY_TAIL.size or start < 0:
        raise MeasureError(f"{name}: OVMF footer table length {total} is impossible")
    table: dict[uuid.UUID, bytes] = {}
    cursor = end - _ENTRY_TAIL.size  # entries end where the footer entry starts
    while cursor > start:
        if cursor - _ENTRY_TAIL.size < start:
            raise MeasureError(f"{name}: OVMF footer table entry overruns the table")
        size, guid = _ENTRY_TAIL.unpack_from(data, cursor - _ENTRY_TAIL.size)
        if size < _ENTRY_TAIL.size or cursor - size < start:
            raise MeasureError(f"{name}: OVMF footer table entry of length {size} is "
                               "impossible")
        table[uuid.UUID(bytes_le=guid)] = data[cursor - size:cursor - _ENTRY_TAIL.size]
        cursor -= size
    return table
