"""Size-capped logs for what the guest can make the host write.

The guest console, QEMU's stderr and vhost-device-vsock's output repeat whatever the guest
does (a console loop, a device error per request), so none of them is a file the child
process appends to: the child writes into a pipe (or, for QEMU's console chardev, a FIFO),
and the event loop copies at most ``limit`` bytes into the log file, then one line saying
how much was dropped, and discards the rest (still reading, so the writer never blocks).

No task: a reader callback on the running loop, owned by whoever launched the process (it
calls :meth:`CappedLog.close` in its teardown, after the process is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

LOG_CAP_BYTES: Final = 1 << 20  # per log file of one VM
_CHUNK: Final = 1 << 16


class CappedLog:
    """One capped log file fed by a pipe or FIFO the loop drains."""

    def __init__(self, path: Path, limit: int = LOG_CAP_BYTES,
                 watch: Callable[[bytes], None] | None = None) -> None:
        self.path = path
        self.limit = limit
        self.watch = watch  # sees every byte read, past the cap too (hypervisor.console)
        self.written = 0
        self.dropped = 0
        self._file = -1
        self._read_end = -1
        self._loop: asyncio.AbstractEventLoop | None = None

    def pipe(self) -> int:
        """A new pipe's write end for the child's stdout/stderr (the caller closes its copy
        once the child has it). End of file (the child gone) closes the reader."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self._attach(read_end)
        return write_end

    def fifo(self, path: Path) -> None:
        """A FIFO at ``path`` for a writer that opens a path (QEMU's file chardev). Held open
        read-write here, so it never reads as end of file: :meth:`close` ends it."""
        os.mkfifo(path, 0o600)
        self._attach(os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))

    def _attach(self, read_end: int) -> None:
        try:
            os.set_blocking(read_end, False)
            self._file = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                 | os.O_CLOEXEC, 0o600)
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(read_end, self._readable)
        except BaseException:
            os.close(read_end)
            self.close()
            raise
        self._read_end = read_end

    def _readable(self) -> None:
        if self._take() == 0:
            self.close()  # end of file: the writer is gone

    def _take(self) -> int | None:
        """Read one chunk into the log (or drop it past the cap): its size, 0 at end of file,
        None when nothing is there now."""
        try:
            data = os.read(self._read_end, _CHUNK)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if data and self.watch is not None:
            self.watch(data)
        keep = data[: max(self.limit - self.written, 0)]
        if keep:
            with contextlib.suppress(OSError):
                os.write(self._file, keep)
            self.written += len(keep)
        self.dropped += len(data) - len(keep)
        return len(data)

    def close(self) -> None:
        """Take what is still buffered, stop reading, note what was dropped, close.
        Idempotent."""
        if self._read_end >= 0:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._read_end)
            for _ in range(64):  # what the writer left in the pipe (bounded: it may go on)
                if not self._take():
                    break
            with contextlib.suppress(OSError):
                os.close(self._read_end)
            self._read_end = -1
        if self._file >= 0:
            if self.dropped:
                with contextlib.suppress(OSError):
                    os.write(self._file, f"\n[coco-shim: log capped at {self.limit} bytes, "
                                         f"{self.dropped} more dropped]\n".encode())
            with contextlib.suppress(OSError):
                os.close(self._file)
            self._file = -1
