"""A reproducible initramfs: newc cpio of a directory tree, compressed without timestamps.

Reproducible means the bytes depend only on the tree's paths, file contents, modes and symlink
targets: entries are sorted, every mtime is the given epoch, owners are root, inode numbers are
assigned in order and hard links are stored as separate files.

Compression: ``lz4`` (the default) is the kernel's legacy LZ4 format; the guest decompresses it
at boot 2.3x faster than gzip under TCG (0.69 s against 1.62 s for the same 61 MB archive;
zstd was slower still, 1.74 s), for an archive 20 % larger. ``gzip`` and ``none`` remain.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
COMPRESSIONS = ("lz4", "gzip", "none")
LZ4_LEGACY_MAGIC = 0x184C2102  # lib/decompress_unlz4.c: ARCHIVE_MAGICNUMBER
LZ4_LEGACY_BLOCK = 8 << 20  # input bytes per block (LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE)


class Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


class Lz4LegacyWriter:
    """The LZ4 legacy stream the kernel's unpacker reads: the magic, then for every 8 MiB of
    input a 32-bit little-endian compressed size and one LZ4 block (high compression)."""

    def __init__(self, raw: BinaryIO) -> None:
        import lz4.block  # the builder's dependency only (never in the guest)

        self._compress = lz4.block.compress
        self._raw = raw
        self._buffer = bytearray()
        raw.write(struct.pack("<I", LZ4_LEGACY_MAGIC))

    def write(self, data: bytes, /) -> int:
        self._buffer += data
        while len(self._buffer) >= LZ4_LEGACY_BLOCK:
            self._block(LZ4_LEGACY_BLOCK)
        return len(data)

    def _block(self, size: int) -> None:
        block = self._compress(bytes(self._buffer[:size]), mode="high_compression",
                               compression=9, store_size=False)
        self._raw.write(struct.pack("<I", len(block)) + block)
        del self._buffer[:size]

    def close(self) -> None:
        if self._buffer:
            self._block(len(self._buffer))


def read_initramfs(data: bytes) -> bytes:
    """The cpio inside an image this module wrote (any of its compressions; for tests)."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] != struct.pack("<I", LZ4_LEGACY_MAGIC):
        return data
    import lz4.block

    out = bytearray()
    offset = 4
    while offset < len(data):
        (size,) = struct.unpack_from("<I", data, offset)
        block = data[offset + 4:offset + 4 + size]
        out += lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK)
        offset += 4 + size
    return bytes(out)


def lz4_library_version() -> str:
    """Part of the image's cache key: another liblz4 may compress to other bytes."""
    import lz4

    return f"python-lz4 {lz4.__version__} liblz4 {lz4.library_version_string()}"


@dataclass(frozen=True)
class DeviceNode:
    """A device node to put in the archive without creating it on the build host."""

    path: str  # relative, e.g. "dev/console"
    mode: int  # full st_mode, e.g. stat.S_IFCHR | 0o600
    major: int
    minor: int


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioWriter:
    def __init__(self, out: Sink, mtime: int) -> None:
        self._out = out
        self._mtime = mtime
        self._ino = 0
        self.entries = 0

    def _header(self, name: str, mode: int, size: int, rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        self.entries += 1
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (self._ino, mode, 0, 0, nlink, self._mtime, size, 0, 0, *rdev, len(encoded), 0)
        header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
        self._out.write(header + encoded + _pad(len(header) + len(encoded)))

    def add_bytes(self, name: str, mode: int, data: bytes) -> None:
        self._header(name, mode, len(data))
        self._out.write(data + _pad(len(data)))

    def add_directory(self, name: str, mode: int) -> None:
        self._header(name, stat.S_IFDIR | stat.S_IMODE(mode), 0)

    def add_device(self, node: DeviceNode) -> None:
        self._header(node.path, node.mode, 0, (node.major, node.minor))

    def add_path(self, name: str, path: Path) -> None:
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode):
            self.add_directory(name, st.st_mode)
        elif stat.S_ISLNK(st.st_mode):
            self.add_bytes(name, stat.S_IFLNK | 0o777, os.readlink(path).encode())
        elif stat.S_ISREG(st.st_mode):
            self.add_bytes(name, stat.S_IFREG | stat.S_IMODE(st.st_mode), path.read_bytes())
        else:
            raise ValueError(f"{path}: unsupported file type {stat.filemode(st.st_mode)}")

    def finish(self) -> None:
        self._header(TRAILER, 0, 0)
        self.entries -= 1  # the trailer is not an entry


def walk_sorted(root: Path) -> Iterator[tuple[str, Path]]:
    """(archive name, path) for every entry under root, parents before children, sorted."""
    names = sorted(os.listdir(root))
    for name in names:
        path = root / name
        yield name, path
        if path.is_dir() and not path.is_symlink():
            for sub, subpath in walk_sorted(path):
                yield f"{name}/{sub}", subpath


def write_initramfs(
    root: Path,
    dest: Path,
    *,
    mtime: int,
    devices: tuple[DeviceNode, ...] = (),
    compression: str = "lz4",
    compresslevel: int = 9,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write root (plus device nodes) as a compressed newc cpio to dest; the entry count."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got "
                         f"{compression!r}")
    extra = {node.path: node for node in devices}
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(dest.open("wb"))
        out: Sink
        if compression == "gzip":
            out = stack.enter_context(gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0))
        elif compression == "lz4":
            lz4_out = Lz4LegacyWriter(raw)
            stack.callback(lz4_out.close)
            out = lz4_out
        else:
            out = raw
        writer = CpioWriter(out, mtime)
        writer.add_directory(".", 0o755)
        for name, path in walk_sorted(root):
            if name in extra:
                continue
            writer.add_path(name, path)
            if progress is not None:
                progress(writer.entries)
        for node in sorted(devices, key=lambda n: n.path):
            writer.add_device(node)
        writer.finish()
        return writer.entries
