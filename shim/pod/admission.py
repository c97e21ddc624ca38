"""Node-wide admission for pod boots: at most N VMs boot at once across every shim daemon.

A boot (QEMU start to the pod's sandbox usable) is CPU-bound; with more boots than CPUs
every one of them slows down and all pods become ready only at the end of a burst, near the
dial timeout. So each daemon takes one of N slots before it launches QEMU and gives it back
once its pod is usable: its first container started (:class:`SlotHold`; the agent's Check,
SetPolicy, the guest's network, CreateSandbox and the first CreateContainer/StartContainer run
inside the slot, so a pod that got one is not slowed down by the next boots), the hold bounded
by ``Timeouts.boot_slot_hold`` from the agent's first answer (a pod whose agent stalls, or that
never starts a container, cannot hold the node), and released at once on any failure or
teardown. The slots are files ``slot-0`` … ``slot-<N-1>`` in
``/run/coco-shim/boot-slots`` (``$COCO_SHIM_BOOT_SLOTS_DIR``; beside the pods' run root,
never in it), each held with ``flock``: the kernel releases a lock when its holder's file is
closed, so a daemon that crashes or is killed frees its slot by itself and nothing needs
cleaning up. The files are opened close-on-exec (QEMU never inherits a slot);
a holder writes its pid and pod into its file, so a waiter can say whom it waits for.

While a boot waits for its slot, its daemon runs at the lowest CPU priority
(:class:`Priority`, nice 19, every thread, and so the netns helper it spawns meanwhile): in a
burst the work every waiting pod does before its boot (its network wired, …) yields the CPU to
the boots holding a slot; the daemon is back at its own priority as soon as it holds one, before
QEMU starts (QEMU and vhost-device-vsock inherit that).

N is the profile's ``[runtime] boot_slots``: absent, one per CPU this process may run on; 0,
no limit. Daemons whose profiles give different N share the same files: each admits itself
while fewer than its own N boots run. The wait has no bound here: the caller owns it (the
boot script bounds it by ``Timeouts.boot_slot_wait`` and stops the boot's own clock meanwhile).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from shim.core import paths

log = logging.getLogger(__name__)

POLL: Final = 0.05  # seconds between looks at the slots while all are taken
WAITING_NICE: Final = 19  # a daemon's nice while its boot waits for a slot


class Priority:
    """This process's CPU priority (nice), lowered while a boot waits and given back after.

    Linux keeps a nice value per thread (``setpriority(PRIO_PROCESS, tid)``; a new thread or
    child inherits its creator's), so both set every thread in ``/proc/self/task``. The
    priority is lowered only if the process may raise it back (root, CAP_SYS_NICE-less
    processes within their RLIMIT_NICE): a VM must never be left at nice 19."""

    def __init__(self, nice: int = WAITING_NICE) -> None:
        self.nice = nice
        self._before: int | None = None

    def lower(self) -> None:
        before = os.getpriority(os.PRIO_PROCESS, 0)
        if before >= self.nice or not _may_raise_to(before):
            return
        self._before = before
        _set_every_thread(self.nice)

    def restore(self) -> None:
        """Back to the priority before :meth:`lower`. Idempotent."""
        before, self._before = self._before, None
        if before is not None:
            try:
                _set_every_thread(before)
            except PermissionError as err:  # _may_raise_to said yes: a changed rlimit
                log.warning("could not restore the daemon's nice %d: %s", before, err)


def _may_raise_to(nice: int) -> bool:
    if os.geteuid() == 0:
        return True
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    return soft == resource.RLIM_INFINITY or 20 - nice <= soft


def _set_every_thread(nice: int) -> None:
    for name in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(name), nice)
        except ProcessLookupError:  # the thread ended meanwhile
            continue


def host_cpus() -> int:
    return max(1, len(os.sched_getaffinity(0)))


class HeldSlot:
    """One slot, locked until :meth:`release` (or until the process dies)."""

    def __init__(self, index: int, fd: int) -> None:
        self.index = index
        self._fd: int | None = fd

    def release(self) -> None:
        """Unlock (closing the file releases the flock). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class SlotHold:
    """A pod's hold on its boot slot, from the launch to its sandbox usable.

    Released by the first of: :meth:`release` (the pod's first container started, a failed
    boot, the pod's teardown) and the bound set by :meth:`bound` (a timer on the event loop,
    cancelled by the release: no task to own). Idempotent; ``on_release`` hears why, once."""

    def __init__(self, slot: HeldSlot, name: str,
                 on_release: Callable[[str, float], None] | None = None) -> None:
        self.slot: HeldSlot | None = slot
        self.name = name
        self.taken = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        self._on_release = on_release

    @property
    def held(self) -> bool:
        return self.slot is not None

    def bound(self, seconds: float) -> None:
        """Release the slot ``seconds`` from now if nothing released it before."""
        if self.slot is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(
            seconds, self.release, f"held {seconds:g} s past the agent's first answer")

    def release(self, why: str) -> None:
        slot, self.slot = self.slot, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if slot is None:
            return
        slot.release()
        held = time.monotonic() - self.taken
        log.info("%s: boot slot %d given back after %.3f s (%s)", self.name, slot.index,
                 held, why)
        if self._on_release is not None:
            self._on_release(why, held)


class BootSlots:
    """N flock'd slot files in ``directory``; :meth:`wait` holds one."""

    def __init__(self, directory: Path, slots: int, *, poll: float = POLL) -> None:
        if slots < 1:
            raise ValueError(f"boot slots must be at least 1, not {slots}")
        self.directory = directory
        self.slots = slots
        self.poll = poll

    @classmethod
    def for_node(cls, setting: int | None) -> BootSlots | None:
        """The node's slots: ``setting`` of them (None: one per host CPU;
        0: no admission limit, None is returned)."""
        if setting == 0:
            return None
        return cls(paths.boot_slots_dir(), host_cpus() if setting is None else setting)

    def try_take(self, holder: str = "") -> HeldSlot | None:
        """A free slot now, or None when all are held."""
        for index in range(self.slots):
            fd = self._open(index)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise
            try:  # who holds it, for the log lines of those who wait
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {holder}\n".encode(), 0)
            except OSError:
                pass  # a full disk costs the diagnostic only
            return HeldSlot(index, fd)
        return None

    def _open(self, index: int) -> int:
        """Slot ``index``'s file, opened (made, with its directory, the first time: not on
        every poll of a wait)."""
        path = self.directory / f"slot-{index}"
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        try:
            return os.open(path, flags, 0o600)
        except FileNotFoundError:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            return os.open(path, flags, 0o600)

    def holders(self) -> list[str]:
        """What the slot files say about their holders (pid and pod), for diagnostics."""
        found = []
        for index in range(self.slots):
            try:
                text = (self.directory / f"slot-{index}").read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                found.append(text.strip()[:200])
        return found

    async def wait(self, name: str = "") -> HeldSlot:
        """Wait for a slot and hold it (unbounded: the caller owns the deadline). Cancelled,
        it holds nothing."""
        taken = self.try_take(name)
        if taken is not None:
            return taken
        started = time.monotonic()
        log.info("%s: all %d boot slots are taken (%s): waiting", name or "boot", self.slots,
                 "; ".join(self.holders()) or "holders unknown")
        # Polled: a slot is freed by another process (or by the kernel, for a dead one).
        while (taken := self.try_take(name)) is None:  # noqa: ASYNC110
            await asyncio.sleep(self.poll)
        log.info("%s: boot slot %d of %d after waiting %.1f s", name or "boot", taken.index,
                 self.slots, time.monotonic() - started)
        return taken
