"""Relay between containerd's stdio FIFOs and the agent's ReadStdout/ReadStderr/WriteStdin.

Each stream is one sequential loop, so bytes are never reordered; a loop only reads the next
chunk after the previous one was fully written, so a slow reader on either side pushes back
(the pipe buffer fills, the agent stops being asked for more) instead of growing memory.

Output FIFOs are opened O_RDWR | O_NONBLOCK, like containerd's runc shim keeps a reader open on
them: the open never blocks and a consumer that goes away does not break the stream. The stdin
FIFO is opened O_RDONLY | O_NONBLOCK and only read once it polls readable: a FIFO whose writer
has not arrived yet reads as end of file but does not poll as hung up, so the end of stdin is
seen exactly when containerd closes its writer (what ``ctr run`` relies on) — or at CloseIO,
after what containerd already wrote has been relayed.

``output_done`` is what Wait and the exit event wait for: the process's output has been copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Protocol

from shim.core.errors import Unavailable

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # the agent's maximum data chunk (1 MiB)

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class Streams(Protocol):
    """The agent RPCs a relay uses (:class:`shim.pod.agent.Agent` has them, bounded by its
    table; the reads and writes are long polls)."""

    async def read_stdout(self, container_id: str, exec_id: str, size: int) -> bytes: ...

    async def read_stderr(self, container_id: str, exec_id: str, size: int) -> bytes: ...

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int: ...

    async def close_stdin(self, container_id: str, exec_id: str) -> None: ...


# Log URIs containerd may pass instead of FIFOs (``ctr run --log-uri``, CRI never does).
LOG_URI_SCHEMES: Final = ("binary://", "file://", "fifo://")


def _open_checked(path: str, flags: int) -> int:
    """Open ``path`` only if it is a FIFO: a regular file or a device named as stdio is refused
    (never written over, never opened with a device's side effects), and so is a symlink."""
    if path.startswith(LOG_URI_SCHEMES):
        raise OSError(errno.EINVAL, f"{path}: log URIs (binary://, file://) are not supported "
                                    "by this shim: give FIFOs")
    try:
        info = os.lstat(path)
    except OSError as err:
        raise OSError(err.errno, f"{path}: {err.strerror}") from err
    if not stat.S_ISFIFO(info.st_mode):
        raise OSError(errno.EINVAL, f"{path} is not a FIFO (mode {stat.filemode(info.st_mode)})")
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # replaced between lstat and open
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a FIFO")
    return fd


PIPE_SIZE: Final = 1 << 20  # /proc/sys/fs/pipe-max-size's default: what anyone may ask for


def open_fifo(path: str) -> int:
    """An output FIFO, its pipe grown to one agent chunk where the kernel allows (the default
    64 KiB took 16 writes, each waiting for the reader, per chunk)."""
    fd = _open_checked(path, os.O_RDWR | os.O_NONBLOCK)
    with contextlib.suppress(OSError):  # over a limit: as is
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return fd


async def _wait_fd(fd: int, *, write: bool, wake: asyncio.Event | None = None) -> None:
    """Until ``fd`` is readable/writable (or ``wake`` is set)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def fire() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, fire)
    waiter = asyncio.ensure_future(wake.wait()) if wake is not None else None
    if waiter is not None:
        waiter.add_done_callback(lambda _: fire())
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
        if waiter is not None:
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter


async def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await _wait_fd(fd, write=True)
            continue
        view = view[written:]


async def _cancel(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait until it has finished (its own cancellation is not ours)."""
    if task is None or task.done():
        return
    task.cancel()
    await asyncio.wait([task])


class ProcessIO:
    """The stdio relay of one process (init or exec)."""

    def __init__(self, agent: Streams, container_id: str, exec_id: str, *,
                 stdin: str = "", stdout: str = "", stderr: str = "",
                 terminal: bool = False) -> None:
        self._agent = agent
        self._cid = container_id
        self._eid = exec_id
        self._paths = (stdin, stdout, stderr)
        self._terminal = terminal
        self._fds: list[int] = []
        self._stdin_fd = self._stdout_fd = self._stderr_fd = -1
        self._tasks: list[asyncio.Task[None]] = []
        self._closing_stdin = asyncio.Event()
        self._stdin_closed = asyncio.Event()
        self._output_done = asyncio.Event()
        self._started = False
        self._output_task: asyncio.Task[None] | None = None
        self._stdin_task: asyncio.Task[None] | None = None

    def open(self) -> None:
        """Open the FIFOs containerd made (raises OSError for a bad path)."""
        stdin, stdout, stderr = self._paths
        try:
            if stdin:
                self._stdin_fd = _open_checked(stdin, os.O_RDONLY | os.O_NONBLOCK)
                self._fds.append(self._stdin_fd)
            if stdout:
                self._stdout_fd = open_fifo(stdout)
                self._fds.append(self._stdout_fd)
            if stderr and not self._terminal:
                self._stderr_fd = open_fifo(stderr)
                self._fds.append(self._stderr_fd)
        except OSError:
            self.close_fds()
            raise

    def start(self, spawn: Spawn) -> None:
        """Start the relay loops (after the process exists in the guest)."""
        if self._started:
            return
        self._started = True
        self._output_task = spawn(self._outputs())
        self._tasks.append(self._output_task)
        if self._stdin_fd >= 0:
            self._stdin_task = spawn(self._copy_in())
            self._tasks.append(self._stdin_task)
        else:
            self._stdin_closed.set()

    async def output_done(self) -> None:
        """Until stdout and stderr reached end of stream and were written out."""
        if self._started:
            await self._output_done.wait()

    async def cancel_output(self) -> None:
        """Stop relaying output (the drain after the exit took too long); the FIFOs close."""
        await _cancel(self._output_task)
        self._output_done.set()

    async def abort_stdin(self) -> None:
        """CloseIO could not flush (a WriteStdin the guest never takes): cancel the relay and
        close the process's stdin anyway (CloseStdin, bounded by the agent's table)."""
        await _cancel(self._stdin_task)
        try:
            await self._agent.close_stdin(self._cid, self._eid)
        except Exception as err:
            log.warning("%s/%s CloseStdin: %s", self._cid, self._eid or "init", err)

    async def close_stdin(self) -> None:
        """CloseIO: relay what containerd already wrote, then close the process's stdin.

        containerd may send it before Start (``ctr run`` closes a short stdin at once): then the
        relay, once started, copies what is buffered and closes right away.
        """
        self._closing_stdin.set()
        if self._started and self._stdin_fd >= 0:
            await self._stdin_closed.wait()

    async def aclose(self) -> None:
        """Stop the loops and close the FIFOs (idempotent)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self.close_fds()

    def close_fds(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._stdin_fd = self._stdout_fd = self._stderr_fd = -1

    async def _outputs(self) -> None:
        try:
            loops = [self._copy_out(self._agent.read_stdout, self._stdout_fd, "stdout")]
            if not self._terminal:  # a terminal merges stderr into stdout
                loops.append(
                    self._copy_out(self._agent.read_stderr, self._stderr_fd, "stderr"))
            await asyncio.gather(*loops)
        finally:
            self._output_done.set()

    async def _copy_out(self, read: Callable[[str, str, int], Awaitable[bytes]], fd: int,
                        name: str) -> None:
        """One chunk is asked for while the previous one is written: the agent's round trip
        and the FIFO writes overlap instead of adding up, and at most two chunks are held.
        Chunks are still written in the order they were read."""
        ahead: asyncio.Future[bytes] | None = None
        try:
            ahead = asyncio.ensure_future(read(self._cid, self._eid, CHUNK))
            while data := await ahead:
                ahead = asyncio.ensure_future(read(self._cid, self._eid, CHUNK))
                if fd >= 0:  # nobody asked for this stream: drain it so the guest never blocks
                    await write_all(fd, data)
            ahead = None
        except Unavailable as err:  # the VM or its agent went away: the stream is over
            log.info("%s/%s %s relay ended: %s", self._cid, self._eid or "init", name, err)
        except Exception as err:  # the stream is over either way; the exit still gets reported
            log.warning("%s/%s %s relay ended: %s", self._cid, self._eid or "init", name, err)
        finally:
            if ahead is not None and not ahead.done():
                ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ahead
            self._close_fd(fd)  # containerd's reader sees end of file once we let go

    def _close_fd(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.remove(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    async def _copy_in(self) -> None:
        fd = self._stdin_fd
        try:
            while True:
                # Readable first, then read: see the module docstring on early end of file.
                await _wait_fd(fd, write=False, wake=self._closing_stdin)
                try:
                    data = os.read(fd, CHUNK)
                except BlockingIOError:
                    if self._closing_stdin.is_set():
                        break  # everything written before CloseIO has been relayed
                    continue
                if not data:
                    break  # containerd closed its writer
                view = memoryview(data)
                while view:
                    taken = await self._agent.write_stdin(self._cid, self._eid, bytes(view))
                    if taken <= 0:
                        raise Unavailable(f"agent accepted no stdin bytes ({taken})")
                    view = view[taken:]
            await self._agent.close_stdin(self._cid, self._eid)
        except Exception as err:
            log.warning("%s/%s stdin relay ended: %s", self._cid, self._eid or "init", err)
        finally:
            self._stdin_closed.set()
