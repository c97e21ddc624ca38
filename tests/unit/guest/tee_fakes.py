"""Fakes of the TEE side for unit tests: configfs-tsm emulated on a plain directory tree, and
SNP reports / TDX quotes built field by field at the published offsets."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from guest.tee.tsm import TsmReports


def snp_report(*, report_data: bytes = b"", host_data: bytes = b"", version: int = 3,
               measurement: bytes = b"\x11" * 48, policy: int = 0x30000,
               cpuid: tuple[int, int, int] = (0x19, 0x11, 0x1)) -> bytes:
    """An SNP ATTESTATION_REPORT (0x4A0 bytes) per the SEV-SNP ABI spec's offsets."""
    raw = bytearray(0x4A0)
    struct.pack_into("<I", raw, 0x00, version)
    struct.pack_into("<I", raw, 0x04, 7)  # guest svn
    struct.pack_into("<Q", raw, 0x08, policy)
    raw[0x10:0x20] = b"\x01" * 16  # family id
    raw[0x20:0x30] = b"\x02" * 16  # image id
    struct.pack_into("<I", raw, 0x30, 0)  # vmpl
    struct.pack_into("<I", raw, 0x34, 1)  # sig algo: ECDSA P-384 with SHA-384
    raw[0x38:0x40] = bytes([3, 0, 0, 0, 0, 0, 8, 115])  # current tcb (Milan/Genoa layout)
    struct.pack_into("<Q", raw, 0x40, 0b11)  # platform info
    struct.pack_into("<I", raw, 0x48, 0)  # key info
    raw[0x50:0x90] = report_data.ljust(64, b"\0")
    raw[0x90:0xC0] = measurement
    raw[0xC0:0xE0] = host_data.ljust(32, b"\0")
    raw[0x180:0x188] = bytes([3, 0, 0, 0, 0, 0, 8, 115])  # reported tcb
    if version >= 3:
        raw[0x188], raw[0x189], raw[0x18A] = cpuid
    raw[0x1A0:0x1E0] = b"\xcc" * 64  # chip id
    raw[0x1E8:0x1EB] = bytes([21, 55, 1])  # current build, minor, major
    raw[0x1EC:0x1EF] = bytes([20, 54, 1])  # committed
    raw[0x2A0:0x2E8] = b"\xaa" * 72  # signature r
    raw[0x2E8:0x330] = b"\xbb" * 72  # signature s
    return bytes(raw)


def tdx_quote(*, report_data: bytes = b"", mrconfigid: bytes = b"", version: int = 4,
              mrtd: bytes = b"\x22" * 48) -> bytes:
    """A TDX quote (v4, or v5 with a TDX 1.0 body descriptor) with a dummy signature part."""
    header = struct.pack("<HHIHH16s20s", version, 2, 0x81, 0, 0, b"\x93" * 16, b"\0" * 20)
    body = bytearray(584)
    body[136:184] = mrtd
    body[184:232] = mrconfigid.ljust(48, b"\0")
    for i in range(4):
        body[328 + 48 * i:376 + 48 * i] = bytes([0x30 + i]) * 48
    body[520:584] = report_data.ljust(64, b"\0")
    descriptor = struct.pack("<HI", 2, 584) if version == 5 else b""
    signature = b"\x55" * 64
    return header + descriptor + bytes(body) + struct.pack("<I", len(signature)) + signature


class FakeTsm(TsmReports):
    """configfs-tsm on an ordinary directory: mkdir fills the attributes, writing inblob bumps
    generation and writes outblob = make(inblob), as the kernel does."""

    def __init__(self, root: Path, provider: str, make: Callable[[bytes], bytes],
                 *, racer: bool = False) -> None:
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root)
        self.provider_name = provider
        self.make = make
        self.racer = racer  # another writer bumps generation behind our back
        self.inblobs: list[bytes] = []

    def _mkdir(self, path: Path) -> None:
        super()._mkdir(path)
        (path / "provider").write_text(self.provider_name + "\n")
        (path / "generation").write_text("0\n")

    def _rmdir(self, path: Path) -> None:
        for child in path.iterdir():
            child.unlink()
        super()._rmdir(path)

    def _write(self, path: Path, data: bytes) -> None:
        path.write_bytes(data)
        generation = int((path.parent / "generation").read_text()) + 1 + int(self.racer)
        (path.parent / "generation").write_text(f"{generation}\n")
        if path.name == "inblob":
            self.inblobs.append(data)
            (path.parent / "outblob").write_bytes(self.make(data))
