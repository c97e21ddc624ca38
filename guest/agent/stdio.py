"""Process stdio inside the guest: bounded output buffers and a stdin writer.

Output is read from the process's pipe (or pty master) into a buffer of at most ``limit``
bytes; when it is full the agent stops reading, the pipe fills and the writer blocks, so a
container flooding stdout costs the guest at most ``limit`` bytes per stream. ReadStdout waits
until there is data or EOF; at EOF (and once drained) reads return b"".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os

DEFAULT_LIMIT = 1 << 20  # per stream; also the largest chunk one read returns
READ_CHUNK = 64 * 1024


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
        assert self._fd is not None
        try:
            chunk = os.read(self._fd, min(READ_CHUNK, self._limit - len(self._data)))
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno != errno.EIO:  # EIO: a pty whose other side is gone, i.e. EOF
                raise
            chunk = b""
        if chunk:
            self._data += chunk
            if len(self._data) >= self._limit:
                self._pause()
        else:
            self._finish()
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
