"""Test plumbing: fast timeouts, a task owner (what the daemon's TaskGroup is), FIFO ends for
containerd's side."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.core.timeouts import AGENT_RPC, Timeouts
from shim.task.stdio import _wait_fd

FAST = Timeouts(agent={name: (None if bound is None else 1.0)
                       for name, bound in AGENT_RPC.items()},
                agent_dial_retry_pause=0.01, boot=2.0, vm_stop=1.0,
                vm_exit_reports=1.0, execs_after_init=1.0, event_attempt=0.5,
                event_attempts=3, event_retry_pause=0.01, event_drain=1.0, shutdown_reply=0.0,
                server_grace=0.1, output_drain=0.3, stdin_flush=0.3, oom_event_interval=0.3)


class Owner:
    """Owns background tasks like the daemon's TaskGroup; a crashed task fails ``aclose``."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.crashed: list[BaseException] = []

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.crashed.append(task.exception())  # type: ignore[arg-type]

    async def aclose(self) -> None:
        pending = list(self.tasks)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert not self.crashed, self.crashed


@dataclass
class Fifos:
    stdin: Path
    stdout: Path
    stderr: Path


def make_fifos(directory: Path, name: str = "io") -> Fifos:
    fifos = Fifos(directory / f"{name}-stdin", directory / f"{name}-stdout",
                  directory / f"{name}-stderr")
    for path in (fifos.stdin, fifos.stdout, fifos.stderr):
        os.mkfifo(path)
    return fifos


async def read_to_eof(path: Path) -> bytes:
    """containerd's side of an output FIFO: everything until the shim closes it.

    Open it (start this task) before the shim does, as containerd does.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    chunks: list[bytes] = []
    try:
        while True:
            # Wait first: a FIFO that never had a writer reads as end of file, but only polls
            # as hung up after a writer came and went.
            await _wait_fd(fd, write=False)
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not data:
                return b"".join(chunks)
            chunks.append(data)
    finally:
        os.close(fd)


async def write_fifo(path: Path, data: bytes) -> None:
    """containerd's side of the stdin FIFO (the shim already holds it open)."""
    from shim.task.stdio import write_all

    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        await write_all(fd, data)
    finally:
        os.close(fd)


@contextlib.contextmanager
def short_listener() -> Iterator[tuple[Path, socket.socket]]:
    """A listening unix socket in a fresh directory under /tmp (a pytest tmp_path can exceed
    sun_path's 108 bytes), for a server to take; the directory is removed afterwards."""
    short = Path(tempfile.mkdtemp(prefix="cs", dir="/tmp"))
    try:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with listener:
            listener.bind(str(short / "s.sock"))
            listener.listen()
            yield short / "s.sock", listener
    finally:
        shutil.rmtree(short)
