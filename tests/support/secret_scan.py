"""Look for a secret in every byte the host handled: the proof that secrets stay in the guest.

A secret can leak in many spellings. :func:`needles` lists the byte strings that betray it:

- raw bytes, lower- and upper-case hex;
- base64 and base64url, with or without padding, and at each of the three byte alignments a
  secret can have inside a longer base64-encoded stream. For alignment ``k`` (the secret starts
  ``k`` bytes after a 3-byte group boundary) the needle is the run of base64 characters whose
  six bits all come from the secret: characters mixing in bits of the bytes before or after it
  are left out, so the needle matches whatever surrounds the secret. Unpadded and padded
  encodings contain that run, so both are found.

:func:`scan` searches :class:`Source` objects (a name and bytes, read lazily) and returns every
:class:`Finding`. :func:`file_sources` turns a directory tree into sources (regular files only,
symlinks never followed, sockets/FIFOs skipped).
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MIN_SECRET = 12  # shorter secrets make needles that random data matches


@dataclass(frozen=True)
class Needle:
    encoding: str  # e.g. "raw", "hex", "base64 align 1", "base64url align 2"
    data: bytes


@dataclass(frozen=True)
class Source:
    name: str
    read: Callable[[], bytes]

    @classmethod
    def of(cls, name: str, data: bytes) -> Source:
        return cls(name, lambda: data)

    @classmethod
    def file(cls, path: Path, name: str | None = None) -> Source:
        return cls(name or str(path), path.read_bytes)


@dataclass(frozen=True)
class Finding:
    source: str
    encoding: str
    offset: int

    def __str__(self) -> str:
        return f"{self.source}: {self.encoding} at byte {self.offset}"


def _aligned_core(secret: bytes, align: int) -> bytes:
    """The base64 characters that encode only bits of ``secret`` when it starts ``align``
    bytes into a 3-byte group (the bytes around it may be anything)."""
    encoded = base64.b64encode(bytes(align) + secret).rstrip(b"=")
    first_bit, end_bit = 8 * align, 8 * (align + len(secret))
    keep = [i for i in range(len(encoded)) if 6 * i >= first_bit and 6 * i + 6 <= end_bit]
    return encoded[keep[0]:keep[-1] + 1]


def needles(secret: bytes) -> list[Needle]:
    """Every spelling of ``secret`` the scanner looks for."""
    if len(secret) < MIN_SECRET:
        raise ValueError(f"a secret of {len(secret)} bytes is too short to scan for "
                         f"(at least {MIN_SECRET})")
    found = [Needle("raw", secret), Needle("hex", secret.hex().encode()),
             Needle("HEX", secret.hex().upper().encode())]
    url = bytes.maketrans(b"+/", b"-_")
    for align in range(3):
        core = _aligned_core(secret, align)
        found.append(Needle(f"base64 align {align}", core))
        found.append(Needle(f"base64url align {align}", core.translate(url)))
    return found


def scan(secret: bytes, sources: Iterable[Source]) -> list[Finding]:
    """Every place a spelling of ``secret`` occurs in ``sources``."""
    wanted = needles(secret)
    findings = []
    for source in sources:
        data = source.read()
        for needle in wanted:
            start = data.find(needle.data)
            while start != -1:
                findings.append(Finding(source.name, needle.encoding, start))
                start = data.find(needle.data, start + 1)
    return findings


def file_sources(root: Path, label: str | None = None) -> Iterator[Source]:
    """Each regular file under ``root`` (not following symlinks), named ``label/relative``."""
    prefix = label or str(root)
    for directory, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            path = Path(directory) / name
            try:
                mode = path.lstat().st_mode
            except FileNotFoundError:  # removed while we walk
                continue
            if stat.S_ISREG(mode):
                yield Source(f"{prefix}/{path.relative_to(root)}", _reader(path))


def _reader(path: Path) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return b""
    return read
