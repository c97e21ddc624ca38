"""Node-wide boot admission (shim.pod.admission): N flock'd slots shared by every daemon."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shim.pod.admission import BootSlots


async def test_at_most_n_holders_and_each_waiter_gets_the_next_free_slot(tmp_path: Path) -> None:
    slots = BootSlots(tmp_path / "slots", 2, poll=0.005)
    holding = 0
    most = 0
    order: list[int] = []

    async def boot(n: int) -> None:
        nonlocal holding, most
        async with slots.slot(f"p{n}"):
            holding += 1
            most = max(most, holding)
            await asyncio.sleep(0.03)
            holding -= 1
            order.append(n)

    await asyncio.gather(*(boot(n) for n in range(6)))
    assert most == 2
    assert sorted(order) == list(range(6))
    assert slots.try_take() is not None  # all given back


async def test_waiting_is_cancellable_and_holds_nothing(tmp_path: Path) -> None:
    slots = BootSlots(tmp_path / "slots", 1, poll=0.005)
    async with slots.slot():
        waiter = asyncio.create_task(slots.slot().__aenter__())
        await asyncio.sleep(0.03)
        assert not waiter.done()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    taken = slots.try_take()
    assert taken is not None  # the cancelled waiter took nothing
    os.close(taken[1])


def test_slots_are_shared_between_processes_and_a_dead_holder_frees_its_slot(
        tmp_path: Path) -> None:
    directory = tmp_path / "slots"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom pathlib import Path\nfrom shim.pod.admission import BootSlots\n"
         f"taken = BootSlots(Path({str(directory)!r}), 1).try_take()\n"
         "print('held' if taken else 'none', flush=True)\ntime.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        slots = BootSlots(directory, 1)
        assert slots.try_take() is None  # held by the other process
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        deadline = time.monotonic() + 5
        while (taken := slots.try_take()) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert taken is not None  # the kernel released the dead holder's lock
        os.close(taken[1])
    finally:
        holder.kill()
        holder.wait()


def test_slot_files_are_close_on_exec(tmp_path: Path) -> None:
    """QEMU, spawned while a slot is held, must not inherit (and keep) the lock."""
    taken = BootSlots(tmp_path / "slots", 1).try_take()
    assert taken is not None
    try:
        assert not os.get_inheritable(taken[1])
    finally:
        os.close(taken[1])


def test_at_least_one_slot() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BootSlots(Path("/nonexistent"), 0)
