"""A reproducible initramfs: newc cpio of a directory tree, gzip-compressed without timestamps.

Reproducible means the bytes depend only on the tree's paths, file contents, modes and symlink
targets: entries are sorted, every mtime is the given epoch, owners are root, inode numbers are
assigned in order and hard links are stored as separate files.
"""

from __future__ import annotations

import gzip
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


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
    def __init__(self, out: BinaryIO | gzip.GzipFile, mtime: int) -> None:
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
    compresslevel: int = 9,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write root (plus device nodes) as a gzip'd newc cpio to dest; return the entry count."""
    extra = {node.path: node for node in devices}
    with (
        dest.open("wb") as raw,
        gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0
        ) as out,
    ):
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
