"""Process stdio inside the guest: bounded output buffers and a stdin writer.

Output is read from the process's pipe (or pty master) into a buffer of at most ``limit``
bytes; when it is full the agent stops reading, the pipe fills and the writer blocks, so a
container flooding stdout costs the agent at most ``limit`` bytes per stream (and the pipe as
much again, kernel memory charged to the writer's cgroup). ReadStdout waits
until there is data or EOF; at EOF (and once drained) reads return b"".

A process's output pipe is grown to ``limit`` (:func:`grow_pipe`) and each wakeup drains what
the pipe holds: under TCG every guest syscall and context switch is dear (busybox writes 4 KiB
at a time), and with the default 64 KiB pipe the writer stalled each time the agent was busy
answering the last ReadStdout, so replies carried at most 64 KiB each. With room for a whole
reply the writer keeps writing meanwhile and the next reply carries all of it
(``make bench-stdout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os

DEFAULT_LIMIT = 1 << 20  # per stream; also the largest chunk one read returns
READ_CHUNK = 64 * 1024  # one os.read; a wakeup reads on while the pipe gives full chunks


def grow_pipe(fd: int, size: int = DEFAULT_LIMIT) -> None:
    """Give a process's output pipe room for ``size`` bytes where the kernel allows (up to
    /proc/sys/fs/pipe-max-size for anyone, beyond only with CAP_SYS_RESOURCE); else keep its
    size: a smaller pipe is slower, not wrong."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)


class OutputBuffer:
    def __init__(self, fd: int, *, limit: int = DEFAULT_LIMIT) -> None:
        self._fd: int | None = fd
        self._limit = limit
        self._data = bytearray()
        self._eof = False
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._reading = False
        os.set_blocking(fd, False)
        self._resume()

    @property
    def buffered(self) -> int:
        return len(self._data)

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._data

    def _resume(self) -> None:
        if self._fd is not None and not self._reading and not self._eof:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._fd is not None and self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        """Read what the pipe holds, in READ_CHUNK pieces, up to the limit: a short read
        means it is empty (a pipe or pty gives what it has)."""
        assert self._fd is not None
        while True:
            want = min(READ_CHUNK, self._limit - len(self._data))
            try:
                chunk = os.read(self._fd, want)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno != errno.EIO:  # EIO: a pty whose other side is gone, i.e. EOF
                    raise
                chunk = b""
            if not chunk:
                self._finish()
                break
            self._data += chunk
            if len(self._data) >= self._limit:
                self._pause()
                break
            if len(chunk) < want:
                break
        self._changed.set()

    def _finish(self) -> None:
        self._pause()
        self._eof = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def read(self, size: int) -> bytes:
        """Up to size bytes (at most limit); waits for data; b"" means EOF."""
        size = max(1, min(size or self._limit, self._limit))
        while not self._data and not self._eof:
            self._changed.clear()
            await self._changed.wait()
        chunk = bytes(self._data[:size])
        del self._data[:size]
        if len(self._data) < self._limit:
            self._resume()
        return chunk

    def close(self) -> None:
        """Stop reading and wake readers (with whatever is buffered, then EOF)."""
        self._finish()
        self._changed.set()


class InputPipe:
    """The writing end of a process's stdin (a pipe, or the pty master for a terminal)."""

    def __init__(self, fd: int, *, terminal: bool = False) -> None:
        self._fd: int | None = fd
        self._terminal = terminal
        self._owns_fd = not terminal  # the pty master is owned by the output side
        os.set_blocking(fd, False)

    @property
    def closed(self) -> bool:
        return self._fd is None

    async def write(self, data: bytes) -> int:
        if self._fd is None:
            raise BrokenPipeError(errno.EPIPE, "stdin is closed")
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
                view = view[written:]
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                fd = self._fd
                loop.add_writer(fd, _set_once, ready)
                try:
                    await ready
                finally:
                    loop.remove_writer(fd)
        return len(data)

    def close(self) -> None:
        """EOF for the process: close the pipe, or send ^D on a terminal."""
        if self._fd is None:
            return
        if self._terminal:
            with contextlib.suppress(OSError):
                os.write(self._fd, b"\x04")
        elif self._owns_fd:
            os.close(self._fd)
        self._fd = None


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
