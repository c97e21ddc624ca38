"""inotify(7) through libc, read on the event loop: which watched file changed.

The agent watches each container's ``memory.events`` (cgroup v2 announces every change of that
file as a modification), so an OOM kill is noticed when it happens, without polling.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct
from collections.abc import Callable
from pathlib import Path

from guest.agent.errors import from_os_error

IN_MODIFY = 0x00000002
IN_IGNORED = 0x00008000  # the watch is gone (file removed, or inotify_rm_watch)
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)

_libc = ctypes.CDLL(None, use_errno=True)


def parse_events(data: bytes) -> list[tuple[int, int]]:
    """(watch descriptor, mask) of each ``struct inotify_event`` in ``data``."""
    out: list[tuple[int, int]] = []
    offset = 0
    while offset + _EVENT.size <= len(data):
        wd, mask, _cookie, name_len = _EVENT.unpack_from(data, offset)
        out.append((wd, mask))
        offset += _EVENT.size + name_len
    return out


class Inotify:
    """One inotify instance; ``on_change(key)`` runs on the loop for each modified file."""

    def __init__(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change
        self._fd = -1
        self._keys: dict[int, str] = {}
        self._wds: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _open(self) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise from_os_error(OSError(err, os.strerror(err)), "inotify_init1")
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._read)

    def watch(self, key: str, path: Path) -> None:
        """Report modifications of ``path`` as ``key`` (replaces an earlier watch of key)."""
        if self._fd < 0:
            self._open()
        self.unwatch(key)
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(path), IN_MODIFY)
        if wd < 0:
            err = ctypes.get_errno()
            raise from_os_error(OSError(err, os.strerror(err)), f"inotify_add_watch {path}")
        self._keys[wd] = key
        self._wds[key] = wd

    def unwatch(self, key: str) -> None:
        wd = self._wds.pop(key, None)
        if wd is not None:
            self._keys.pop(wd, None)
            _libc.inotify_rm_watch(self._fd, wd)  # fails harmlessly if the file is gone

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        for wd, mask in parse_events(data):
            key = self._keys.get(wd)
            if key is None:
                continue
            if mask & IN_IGNORED:
                self._keys.pop(wd, None)
                self._wds.pop(key, None)
            elif mask & IN_MODIFY:
                self._on_change(key)

    def close(self) -> None:
        if self._fd >= 0:
            if self._loop is not None:
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        self._keys.clear()
        self._wds.clear()
