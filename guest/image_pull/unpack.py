"""Layer streams: decompression (gzip, zstd or none, told by content) and a hostile-tar-safe
unpacker.

The unpacker writes one layer into its own empty directory, in overlayfs's format: an OCI
whiteout ``.wh.<name>`` becomes a 0:0 character device ``<name>``, an opaque marker
``.wh..wh..opq`` becomes the ``trusted.overlay.opaque=y`` attribute of its directory.

Safety, entry by entry (Python 3.11's tarfile has no extraction filters, so this module does
every file operation itself, relative to directory descriptors, never following a symlink):

- names: leading ``/`` and ``./`` are stripped; a ``..`` component refuses the layer;
- every parent directory is opened with ``O_NOFOLLOW | O_DIRECTORY`` from the layer's root, so
  an entry can never be written through a symlink (absolute or escaping ones included) made by
  an earlier entry: such an entry refuses the layer;
- symlinks are created verbatim (they mean something only inside the container, whose root
  the runtime confines them to) and are never followed by the agent;
- hard links must name an earlier entry of the same layer, resolved the same way; directories
  cannot be hard-linked;
- character and block devices are skipped (counted, logged): a pulled image gets no device
  nodes; FIFOs are made;
- modes keep setuid/setgid/sticky bits (images legitimately ship setuid programs) but the
  layer cache directory is 0700, so nothing outside a container can reach them;
- only ``security.capability`` and ``user.*`` extended attributes are applied; ``trusted.*``
  ones (overlayfs's own, e.g. redirects) and everything else are dropped.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guest.agent.errors import DataLoss, InvalidArgument
from guest.image_pull.digest import Digest, Readable
from guest.image_pull.timing import PhaseTimer

log = logging.getLogger(__name__)

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
ALLOWED_XATTRS = ("security.capability",)
ALLOWED_XATTR_PREFIXES = ("user.",)
PAX_XATTR = "SCHILY.xattr."


class Decompressed:
    """The uncompressed bytes of a layer stream, the compression told by its magic (gzip,
    zstd through the image's libzstd, else a plain tar), hashed as they pass so the diff ID can
    be checked. Input is fed in pieces of FEED and output kept in one bounded buffer, so reads
    of any size cost no re-copying of large tails and memory stays bounded.

    ``raw_digest``: the digest the caller verifies ``raw`` against (a VerifyingReader below).
    A plain tar's diff ID is its blob's digest when that is a sha256 one, so such a layer is
    hashed once, not twice: :attr:`diff_id` is then that digest, and means something only
    once the caller's verification has passed (the puller compares diff IDs after it)."""

    # Bigger pieces mean fewer interpreter round trips per MiB (measured in a TCG guest:
    # inflating in 1 MiB pieces ran at 151 MiB/s, in 64 KiB pieces with bounded output at 111).
    FEED = 1 << 20

    def __init__(
        self,
        raw: Readable,
        what: str,
        timer: PhaseTimer | None = None,
        *,
        raw_digest: Digest | None = None,
    ) -> None:
        self.raw = raw
        self.what = what
        self.timer = timer if timer is not None else PhaseTimer()  # unread when not given
        head = raw.read(4)
        self._pending = head
        self._inflater: Any = None
        if head.startswith(GZIP_MAGIC):
            self.kind = "gzip"
            self._inflater = zlib.decompressobj(wbits=31)
        elif head.startswith(ZSTD_MAGIC):
            from guest.image_pull.zstd import ZstdDecompressor

            self.kind = "zstd"
            self._inflater = ZstdDecompressor(what)
        else:
            self.kind = "tar"
        self._same_as_raw = (
            raw_digest if self.kind == "tar" and raw_digest and raw_digest.algorithm == "sha256"
            else None
        )
        self._hash: Any = None if self._same_as_raw else hashlib.sha256()
        self.size = 0
        self._eof = False
        self._buffer = b""
        self._offset = 0

    def _source(self, size: int) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        return self.raw.read(size)

    def read(self, size: int = -1, /) -> bytes:
        want = CHUNK if size is None or size < 0 else max(size, 1)
        if self._offset >= len(self._buffer):
            self._buffer, self._offset = self._produce(max(want, CHUNK)), 0
        out = self._buffer[self._offset : self._offset + want]
        self._offset += len(out)
        return out

    def _produce(self, want: int) -> bytes:
        """Up to ``want`` more uncompressed bytes (b"" at the end), hashed."""
        timer = self.timer
        if self._inflater is None:
            out = self._source(want)
        else:
            previous = timer.enter("inflate")
            out = self._inflate(want)
            timer.leave(previous)
        if self._hash is not None:  # None: a plain tar whose diff ID is its verified digest
            previous = timer.enter("diff_id")
            self._hash.update(out)
            timer.leave(previous)
        self.size += len(out)
        return out

    def _inflate(self, want: int) -> bytes:
        while not self._eof:
            inflater = self._inflater
            data = inflater.unconsumed_tail or self._source(self.FEED)
            if not data:
                if self.kind == "zstd":
                    rest = inflater.decompress(b"", want)  # flush what the decoder holds
                    if rest:
                        return bytes(rest)
                    if not inflater.frame_done:
                        raise DataLoss(f"{self.what}: zstd stream ends early")
                elif not inflater.eof:
                    raise DataLoss(f"{self.what}: gzip stream ends early")
                self._eof = True
                return b""
            try:
                out = inflater.decompress(data, want)
            except zlib.error as err:
                raise DataLoss(f"{self.what}: corrupt gzip data: {err}") from err
            if self.kind == "gzip" and inflater.eof:
                # Concatenated gzip members are one stream (RFC 1952).
                rest = inflater.unused_data
                self._inflater = zlib.decompressobj(wbits=31)
                self._pending = rest
                if not rest:
                    nxt = self._source(self.FEED)
                    if nxt:
                        self._pending = nxt
                    else:
                        self._eof = True
            if out:
                return bytes(out)
        return b""

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    @property
    def diff_id(self) -> Digest:
        if self._same_as_raw is not None:
            return self._same_as_raw
        return Digest("sha256", self._hash.hexdigest())


@dataclass
class UnpackStats:
    entries: int = 0
    bytes: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    skipped: list[str] = field(default_factory=list)


class _Refused(InvalidArgument):
    pass


def clean_name(name: str, what: str) -> list[str]:
    """The path components of a tar entry name; a '..' refuses the layer."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Refused(f"{what}: entry {name!r} escapes the layer root")
    return parts


class Unpacker:
    """Extract one tar stream into ``dest`` (an empty directory)."""

    def __init__(
        self,
        dest: Path,
        what: str,
        check: Callable[[], None] = lambda: None,
        timer: PhaseTimer | None = None,
    ) -> None:
        self.dest = dest
        self.what = what
        self.check = check
        self.timer = timer if timer is not None else PhaseTimer()  # unread when not given
        self.stats = UnpackStats()
        self._dir_times: list[tuple[list[str], int]] = []
        self._root = -1

    def run(self, stream: Readable) -> UnpackStats:
        self._root = os.open(self.dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as archive:  # type: ignore[call-overload]
                for member in archive:
                    self.check()
                    self.stats.entries += 1
                    self._entry(archive, member)
            for parts, mtime in sorted(self._dir_times, key=lambda t: -len(t[0])):
                self._set_time(parts, mtime)
        except tarfile.TarError as err:
            raise DataLoss(f"{self.what}: not a valid tar stream: {err}") from err
        finally:
            os.close(self._root)
        return self.stats

    # -- one entry ---------------------------------------------------------------------------

    def _entry(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = clean_name(member.name, self.what)
        if not parts:  # the layer root itself
            if member.isdir():
                os.chmod(self._root, member.mode & 0o7777)
                os.chown(self._root, member.uid, member.gid)
            return
        base = parts[-1]
        parent = self._open_parent(parts, member.name)
        try:
            if base == OPAQUE:
                os.setxattr(parent, OPAQUE_XATTR, b"y")
                self.stats.opaque_dirs += 1
            elif base.startswith(WHITEOUT):
                self._whiteout(parent, base[len(WHITEOUT) :], member.name)
            elif member.isdir():
                self._directory(parent, base, member, parts)
            elif member.isreg():
                self._regular(archive, parent, base, member)
            elif member.issym():
                self._clear(parent, base)
                os.symlink(member.linkname, base, dir_fd=parent)
                os.chown(base, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
                self._utime(parent, base, member.mtime)
            elif member.islnk():
                self._hardlink(parent, base, member)
            elif member.isfifo():
                self._clear(parent, base)
                os.mkfifo(base, member.mode & 0o777, dir_fd=parent)
                self._owner_mode_time(parent, base, member)
            elif member.ischr() or member.isblk():
                self.stats.skipped.append(member.name)
                log.warning("%s: device node %s skipped", self.what, member.name)
            else:
                self.stats.skipped.append(member.name)
                log.warning("%s: entry %s of type %r skipped", self.what, member.name, member.type)
        finally:
            os.close(parent)

    def _open_parent(self, parts: list[str], name: str) -> int:
        """A descriptor of the entry's parent, walking without following any symlink and
        making missing directories (0755, root) on the way."""
        fd = os.dup(self._root)
        try:
            for part in parts[:-1]:
                try:
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as err:
                    if err.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _Refused(
                            f"{self.what}: entry {name!r} goes through {part!r}, "
                            "which is not a directory (a symlink?)"
                        ) from err
                    raise
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _clear(self, parent: int, base: str, *, keep_dir: bool = False) -> bool:
        """Remove what is at base (a later entry replaces an earlier one); True if a directory
        was kept."""
        try:
            info = os.stat(base, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(info.st_mode):
            if keep_dir:
                return True
            shutil.rmtree(base, dir_fd=parent)
        else:
            os.unlink(base, dir_fd=parent)
        return False

    def _directory(self, parent: int, base: str, member: tarfile.TarInfo, parts: list[str]) -> None:
        if not self._clear(parent, base, keep_dir=True):
            os.mkdir(base, 0o700, dir_fd=parent)
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
        try:
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, member.mode & 0o7777)
            self._xattrs(fd, member)
        finally:
            os.close(fd)
        self._dir_times.append((parts, int(member.mtime)))

    def _regular(
        self, archive: tarfile.TarFile, parent: int, base: str, member: tarfile.TarInfo
    ) -> None:
        self._clear(parent, base)
        fd = os.open(
            base,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=parent,
        )
        try:
            source = archive.extractfile(member)
            if source is not None:
                timer = self.timer
                while chunk := source.read(CHUNK):
                    self.check()
                    previous = timer.enter("write")
                    _write_all(fd, chunk)
                    timer.leave(previous)
                    self.stats.bytes += len(chunk)
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, member.mode & 0o7777)  # after chown, which clears setuid bits
            self._xattrs(fd, member)
            os.utime(fd, ns=(int(member.mtime) * 10**9,) * 2)
        finally:
            os.close(fd)

    def _hardlink(self, parent: int, base: str, member: tarfile.TarInfo) -> None:
        target = clean_name(member.linkname, self.what)
        if not target:
            raise _Refused(f"{self.what}: hard link {member.name!r} to the layer root")
        target_parent = self._open_parent(target, member.linkname)
        try:
            try:
                info = os.stat(target[-1], dir_fd=target_parent, follow_symlinks=False)
            except FileNotFoundError as err:
                raise _Refused(
                    f"{self.what}: hard link {member.name!r} to {member.linkname!r}, "
                    "which is not an earlier entry of this layer"
                ) from err
            if stat.S_ISDIR(info.st_mode):
                raise _Refused(f"{self.what}: hard link {member.name!r} to a directory")
            if target == clean_name(member.name, self.what):
                return
            self._clear(parent, base)
            os.link(
                target[-1],
                base,
                src_dir_fd=target_parent,
                dst_dir_fd=parent,
                follow_symlinks=False,
            )
        finally:
            os.close(target_parent)

    def _whiteout(self, parent: int, target: str, name: str) -> None:
        if target in ("", ".", "..") or "/" in target:
            raise _Refused(f"{self.what}: malformed whiteout {name!r}")
        try:
            os.stat(target, dir_fd=parent, follow_symlinks=False)
            return  # a whiteout hides lower layers only, never its own layer's entry
        except FileNotFoundError:
            pass
        os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=parent)
        self.stats.whiteouts += 1

    def _owner_mode_time(self, parent: int, base: str, member: tarfile.TarInfo) -> None:
        os.chown(base, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        os.chmod(base, member.mode & 0o7777, dir_fd=parent)
        self._utime(parent, base, member.mtime)

    def _xattrs(self, fd: int, member: tarfile.TarInfo) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith(PAX_XATTR):
                continue
            name = key[len(PAX_XATTR) :]
            if name in ALLOWED_XATTRS or name.startswith(ALLOWED_XATTR_PREFIXES):
                data = value.encode("utf-8", "surrogateescape")
                try:
                    os.setxattr(fd, name, data)
                except OSError as err:
                    log.warning("%s: %s: xattr %s not set: %s", self.what, member.name, name, err)
            else:
                log.warning("%s: %s: xattr %s dropped", self.what, member.name, name)

    @staticmethod
    def _utime(parent: int, base: str, mtime: float) -> None:
        with contextlib.suppress(OSError):
            ns = int(mtime) * 10**9
            os.utime(base, ns=(ns, ns), dir_fd=parent, follow_symlinks=False)

    def _set_time(self, parts: list[str], mtime: int) -> None:
        try:
            parent = self._open_parent(parts, "/".join(parts))
        except (OSError, InvalidArgument):
            return
        try:
            self._utime(parent, parts[-1], mtime)
        finally:
            os.close(parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def unpack(
    stream: Readable,
    dest: Path,
    what: str,
    check: Callable[[], None],
    timer: PhaseTimer | None = None,
) -> UnpackStats:
    """Extract a tar stream into the empty directory ``dest``."""
    return Unpacker(dest, what, check, timer).run(stream)
