"""Node-wide admission for pod boots: at most N VMs boot at once across every shim daemon.

A boot (QEMU start to the agent's first Check answered) is CPU-bound; with more boots than
CPUs every one of them slows down and all pods become ready only at the end of a burst, near
the dial timeout. So each daemon takes one of N slots before it launches QEMU and gives it
back once the agent has answered. The slots are files ``slot-0`` … ``slot-<N-1>`` under
``<run root>/boot-slots``, each held with ``flock``: the kernel releases a lock when its
holder's file is closed, so a daemon that crashes or is killed frees its slot by itself and
nothing needs cleaning up. The files are opened close-on-exec (QEMU never inherits a slot).

Waiting for a slot is not part of the dial timeout: the boot's own clock starts when it has
a slot. N defaults to the CPUs this process may run on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from shim.core import paths

log = logging.getLogger(__name__)

SLOTS_DIR: Final = "boot-slots"
POLL: Final = 0.05  # seconds between looks at the slots while all are taken


def host_cpus() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class BootSlots:
    """N flock'd slot files in ``directory``; ``async with slots.slot():`` holds one."""

    def __init__(self, directory: Path, slots: int, *, poll: float = POLL) -> None:
        if slots < 1:
            raise ValueError(f"boot slots must be at least 1, not {slots}")
        self.directory = directory
        self.slots = slots
        self.poll = poll

    @classmethod
    def for_node(cls) -> BootSlots:
        return cls(paths.run_root() / SLOTS_DIR, host_cpus())

    def try_take(self) -> tuple[int, int] | None:
        """A free slot now, as (index, locked fd), or None when all are held."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for index in range(self.slots):
            fd = os.open(self.directory / f"slot-{index}",
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise
            return index, fd
        return None

    @contextlib.asynccontextmanager
    async def slot(self, name: str = "") -> AsyncIterator[int]:
        """Wait (unbounded: the caller owns the deadline) for a slot and hold it."""
        started = time.monotonic()
        # Polled: a slot is freed by another process (or by the kernel, for a dead one).
        while (taken := self.try_take()) is None:  # noqa: ASYNC110
            await asyncio.sleep(self.poll)
        index, fd = taken
        waited = time.monotonic() - started
        if waited >= self.poll:
            log.info("%sboot slot %d of %d after waiting %.1f s", f"{name}: " if name else "",
                     index, self.slots, waited)
        try:
            yield index
        finally:
            os.close(fd)  # releases the lock
