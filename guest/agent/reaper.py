"""Child reaping for the agent: one SIGCHLD handler owns every exit status.

The agent is a child subreaper, so container processes started by runc (which exits after
create/exec) are re-parented to it and their real exit status reaches it. Everything the agent
spawns goes through :meth:`Reaper.spawn` and is awaited through :meth:`Reaper.wait`; nothing
else may call waitpid, or a status would be lost.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO, NamedTuple

PR_SET_CHILD_SUBREAPER = 36
UNCLAIMED_LIMIT = 4096  # exits nobody asked for yet (orphans, or a pid read after its exit)


def exit_code(status: int) -> int:
    """Shell convention: the exit status, or 128 + signal for a killed process."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 255


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Spawned(NamedTuple):
    proc: subprocess.Popen[bytes]  # returncode is filled in by the reaper, never by Popen
    exited: asyncio.Future[int]


class Completed(NamedTuple):
    code: int
    stdout: bytes
    stderr: bytes


class Reaper:
    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._unclaimed: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, *, subreaper: bool = True) -> None:
        if subreaper:
            become_subreaper()
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # anything that exited before the handler was in place

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = exit_code(status)
            future = self._waiters.pop(pid, None)
            if future is not None and not future.done():
                future.set_result(code)
            else:
                if len(self._unclaimed) >= UNCLAIMED_LIMIT:
                    self._unclaimed.pop(next(iter(self._unclaimed)))
                self._unclaimed[pid] = code

    def wait(self, pid: int) -> asyncio.Future[int]:
        """A future for pid's exit code (already done if it exited unclaimed)."""
        loop = asyncio.get_running_loop()
        future = self._waiters.get(pid)
        if future is not None:
            return future
        future = loop.create_future()
        if pid in self._unclaimed:
            future.set_result(self._unclaimed.pop(pid))
        else:
            self._waiters[pid] = future
        return future

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> Spawned:
        """Start argv; its exit code arrives on the returned future (never Popen.wait)."""
        proc = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            pass_fds=tuple(pass_fds),
            close_fds=True,
        )
        # Registered before control returns to the loop, so no SIGCHLD can be handled first.
        exited = self.wait(proc.pid)
        exited.add_done_callback(lambda f: setattr(proc, "returncode", f.result()))
        return Spawned(proc, exited)

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Completed:
        """Run a short command to completion, capturing its output."""
        spawned = self.spawn(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        proc = spawned.proc
        assert proc.stdout is not None and proc.stderr is not None
        try:
            if input is not None:
                assert proc.stdin is not None
                await asyncio.to_thread(_feed, proc.stdin, input)
            out, err = await asyncio.gather(_read_all(proc.stdout), _read_all(proc.stderr))
            code = await spawned.exited
        finally:
            proc.stdout.close()
            proc.stderr.close()
        return Completed(code, out, err)


async def _read_all(pipe: IO[bytes]) -> bytes:
    """Everything until EOF, read on the event loop (no executor thread: the first would cost
    the first RPC that runs a command the import of concurrent.futures' thread pool)."""
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        return await reader.read()
    finally:
        transport.close()


def _feed(pipe: object, data: bytes) -> None:
    try:
        pipe.write(data)  # type: ignore[attr-defined]
    finally:
        pipe.close()  # type: ignore[attr-defined]
