"""Whether the template's code on disk is still what it imported, cheaply, on every ``start``.

The full check (:func:`changed`: the size and mtime of every module file the template loaded,
≈ 350 ``stat`` calls, 1 to 2 ms) ran before every request's fork, on ``start``'s critical path.
:class:`CodeWatch` keeps inotify watches on the directories holding those files: the kernel
queues an event the moment one of their entries is written, touched, replaced, created or
removed, so before a ``start`` that connected after such a change the event is already there.
A request then costs one non-blocking read of the inotify descriptor; only when events were
queued does it run the full check (the events only say "maybe": a neighbouring file, a ``.pyc``
beside a module, an edit that restored the same bytes and mtime). Without inotify (no instance
or watch left under the per-user limits) every request runs the full check, as before.

No library: the standard library has no inotify binding, and the three libc calls it needs
are smaller than any dependency (the template already loads ctypes for ``rename_process``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterable
from typing import Final

# linux/inotify.h: what may change a module file or the directory that holds it.
IN_MODIFY: Final = 0x002
IN_ATTRIB: Final = 0x004
IN_CLOSE_WRITE: Final = 0x008
IN_MOVED_FROM: Final = 0x040
IN_MOVED_TO: Final = 0x080
IN_CREATE: Final = 0x100
IN_DELETE: Final = 0x200
IN_DELETE_SELF: Final = 0x400
IN_MOVE_SELF: Final = 0x800
WATCHED: Final = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO
                  | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)
IN_NONBLOCK: Final = os.O_NONBLOCK
IN_CLOEXEC: Final = os.O_CLOEXEC

Stamp = dict[str, tuple[int, int]]


def code_stamp(modules: Iterable[object] | None = None) -> Stamp:
    """(size, mtime) of every loaded module's file, and of the interpreter."""
    import sys

    stamp: Stamp = {}
    files = [sys.executable]
    for module in list(sys.modules.values()) if modules is None else modules:
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            files.append(path)
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            stamp[path] = (-1, -1)
        else:
            stamp[path] = (st.st_size, st.st_mtime_ns)
    return stamp


def changed(stamp: Stamp) -> str | None:
    """The first file whose size or mtime differs from ``stamp``; None if none does."""
    for path, (size, mtime) in stamp.items():
        try:
            st = os.stat(path)
        except OSError:
            now = (-1, -1)
        else:
            now = (st.st_size, st.st_mtime_ns)
        if now != (size, mtime):
            return path
    return None


def directories(stamp: Stamp) -> set[str]:
    """Every directory an entry of ``stamp`` lives in, through symbolic links and not (a
    changed link and a changed target both count)."""
    found = set()
    for path in stamp:
        found.add(os.path.dirname(os.path.abspath(path)))
        found.add(os.path.dirname(os.path.realpath(path)))
    return found


class CodeWatch:
    """:func:`changed`, run only when inotify saw something in the code's directories."""

    def __init__(self, stamp: Stamp) -> None:
        self.stamp = stamp
        self.fd = _inotify(directories(stamp))
        self.stale: str | None = None  # once changed, changed for good (the events are read)

    @property
    def watching(self) -> bool:
        return self.fd >= 0

    def changed(self) -> str | None:
        """The first changed file (None: the code is what was imported)."""
        if self.stale is None and (self.fd < 0 or self._drain()):
            self.stale = changed(self.stamp)
        return self.stale

    def _drain(self) -> bool:
        """Read every queued event; whether there was any (an unreadable descriptor counts
        as one: the full check decides)."""
        seen = False
        while True:
            try:
                if not os.read(self.fd, 1 << 16):
                    return True
            except BlockingIOError:
                return seen
            except OSError:
                return True
            seen = True

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _inotify(paths: Iterable[str]) -> int:
    """An inotify descriptor watching every directory of ``paths``; -1 if inotify or one of
    the watches is refused (a directory already gone is stale code: -1, the full check says
    so)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
    if fd < 0:
        return -1
    for path in sorted(paths):
        if libc.inotify_add_watch(fd, os.fsencode(path), WATCHED) < 0:
            with contextlib.suppress(OSError):
                os.close(fd)
            return -1
    return fd
