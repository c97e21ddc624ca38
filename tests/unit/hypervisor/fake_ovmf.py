"""A small synthetic OVMF/TDVF image (64 KiB) with the footer table, SEV and TDVF metadata laid
out as edk2 lays them out, for fast unit tests of the measurement code."""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

from hypervisor.measure.ovmf import (
    FOOTER_GUID,
    SEV_ES_RESET_BLOCK_GUID,
    SEV_HASH_TABLE_GUID,
    SEV_METADATA_GUID,
    TDX_METADATA_GUID,
)

TDVF_DESCRIPTOR_GUID = uuid.UUID("e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae")
SIZE = 0x10000
SEV_META_AT = 0x1000  # image offsets of the metadata blobs
TDX_META_AT = 0x1800

# (gpa, size, type)
SEV_SECTIONS = [(0x800000, 0x2000, 1), (0x802000, 0x1000, 2), (0x803000, 0x1000, 3),
                (0x804000, 0x1000, 4), (0x805000, 0x1000, 0x10), (0x806000, 0x0, 4)]
HASH_TABLE = (0x805C00, 0x400)
AP_EIP = 0x0080B004
# (data_offset, raw, gpa, size, type, attributes)
TDVF_SECTIONS = [(0x8000, 0x8000, 0xFFFF8000, 0x8000, 0, 1),
                 (0x0, 0x8000, 0xFFFF0000, 0x8000, 1, 0), (0, 0, 0x810000, 0x2000, 3, 0),
                 (0, 0, 0x809000, 0x2000, 2, 0), (0, 0, 0x800000, 0x6000, 3, 0)]


@dataclass
class FakeOvmf:
    sev_sections: list[tuple[int, int, int]] = field(default_factory=lambda: list(SEV_SECTIONS))
    tdvf_sections: list[tuple[int, int, int, int, int, int]] = field(
        default_factory=lambda: list(TDVF_SECTIONS))
    hash_table: tuple[int, int] | None = HASH_TABLE
    ap_eip: int | None = AP_EIP
    sev_signature: bytes = b"ASEV"
    tdvf_signature: bytes = b"TDVF"
    fill: int = 0  # byte value the code area is filled with (changes the firmware)
    footer: bool = True

    def build(self) -> bytes:
        image = bytearray(bytes(range(256)) * (SIZE // 256))
        for i in range(0x4000, 0xC000):
            image[i] = (image[i] + self.fill) & 0xFF
        sev = struct.pack("<4sIII", self.sev_signature, 16 + 12 * len(self.sev_sections), 1,
                          len(self.sev_sections))
        sev += b"".join(struct.pack("<III", *s) for s in self.sev_sections)
        image[SEV_META_AT:SEV_META_AT + len(sev)] = sev
        tdx = struct.pack("<4sIII", self.tdvf_signature, 16 + 32 * len(self.tdvf_sections), 1,
                          len(self.tdvf_sections))
        tdx += b"".join(struct.pack("<IIQQII", *s) for s in self.tdvf_sections)
        image[TDX_META_AT:TDX_META_AT + len(tdx)] = tdx
        image[TDX_META_AT - 16:TDX_META_AT] = TDVF_DESCRIPTOR_GUID.bytes_le  # as edk2 has it
        entries: list[tuple[uuid.UUID, bytes]] = [
            (SEV_METADATA_GUID, struct.pack("<I", SIZE - SEV_META_AT)),
            (TDX_METADATA_GUID, struct.pack("<I", SIZE - TDX_META_AT)),
        ]
        if self.ap_eip is not None:
            entries.append((SEV_ES_RESET_BLOCK_GUID, struct.pack("<I", self.ap_eip)))
        if self.hash_table is not None:
            entries.append((SEV_HASH_TABLE_GUID, struct.pack("<II", *self.hash_table)))
        table = b"".join(data + struct.pack("<H", len(data) + 18) + guid.bytes_le
                         for guid, data in entries)
        if self.footer:
            table += struct.pack("<H", len(table) + 18) + FOOTER_GUID.bytes_le
        end = SIZE - 32
        image[end - len(table):end] = table
        return bytes(image)
