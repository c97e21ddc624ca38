"""Node-wide boot admission (shim.pod.admission): N flock'd slots shared by every daemon."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shim.core import paths
from shim.pod.admission import BootSlots, host_cpus
from shim.pod.vm import BootClock


async def test_at_most_n_holders_and_each_waiter_gets_the_next_free_slot(tmp_path: Path) -> None:
    slots = BootSlots(tmp_path / "slots", 2, poll=0.005)
    holding = 0
    most = 0
    order: list[int] = []

    async def boot(n: int) -> None:
        nonlocal holding, most
        held = await slots.wait(f"p{n}")
        try:
            holding += 1
            most = max(most, holding)
            await asyncio.sleep(0.03)
            holding -= 1
            order.append(n)
        finally:
            held.release()

    await asyncio.gather(*(boot(n) for n in range(6)))
    assert most == 2
    assert sorted(order) == list(range(6))
    assert slots.try_take() is not None  # all given back


async def test_waiting_is_cancellable_and_holds_nothing(tmp_path: Path) -> None:
    slots = BootSlots(tmp_path / "slots", 1, poll=0.005)
    held = await slots.wait("first")
    waiter = asyncio.create_task(slots.wait("second"))
    await asyncio.sleep(0.03)
    assert not waiter.done()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    held.release()
    held.release()  # idempotent
    taken = slots.try_take()
    assert taken is not None  # the cancelled waiter took nothing
    taken.release()


async def test_a_waiter_logs_whom_it_waits_for(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="shim.pod.admission")
    slots = BootSlots(tmp_path / "slots", 1, poll=0.005)
    held = slots.try_take("pod a")
    assert held is not None
    assert slots.holders() == [f"{os.getpid()} pod a"]
    waiter = asyncio.create_task(slots.wait("pod b"))
    await asyncio.sleep(0.03)
    held.release()
    (await waiter).release()
    messages = [r.getMessage() for r in caplog.records if r.name == "shim.pod.admission"]
    assert messages[0].startswith("pod b: all 1 boot slots are taken (") and \
        messages[0].endswith(" pod a): waiting")
    assert messages[1].startswith("pod b: boot slot 0 of 1 after waiting ")


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
        taken.release()
    finally:
        holder.kill()
        holder.wait()


def test_slot_files_are_close_on_exec(tmp_path: Path) -> None:
    """QEMU, spawned while a slot is held, must not inherit (and keep) the lock."""
    taken = BootSlots(tmp_path / "slots", 1).try_take()
    assert taken is not None
    try:
        (fd_path,) = [p for p in Path("/proc/self/fd").iterdir()
                      if p.exists() and p.resolve() == tmp_path / "slots" / "slot-0"]
        assert not os.get_inheritable(int(fd_path.name))
    finally:
        taken.release()


def test_the_node_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.BOOT_SLOTS_ENV, str(tmp_path / "slots"))
    auto = BootSlots.for_node(None)
    assert auto is not None and auto.slots == host_cpus()
    assert auto.directory == tmp_path / "slots"
    monkeypatch.delenv(paths.BOOT_SLOTS_ENV)
    default = BootSlots.for_node(2)
    assert default is not None and default.directory == Path("/run/coco-shim/boot-slots")
    monkeypatch.setenv(paths.RUN_ROOT_ENV, str(tmp_path / "run"))  # never among the pods
    moved = BootSlots.for_node(2)
    assert moved is not None and moved.directory == Path("/run/coco-shim/boot-slots")
    four = BootSlots.for_node(4)
    assert four is not None and four.slots == 4
    assert BootSlots.for_node(0) is None  # no limit
    with pytest.raises(ValueError, match="at least 1"):
        BootSlots(Path("/nonexistent"), -1)


async def test_the_boot_clock_stops_inside_and_keeps_what_was_left() -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(0.2) as deadline:
        before = deadline.when()
        assert before is not None
        with BootClock(deadline).stopped():
            assert deadline.when() is None
            await asyncio.sleep(0.3)  # longer than the deadline: not charged
        after = deadline.when()
        assert after is not None and 0.25 <= after - before <= 1.0
        assert after > loop.time()
    with BootClock(None).stopped():  # no deadline: nothing to stop
        pass


def test_the_slot_directory_is_made_when_missing_and_made_again_if_removed(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "boot-slots"
    slots = BootSlots(directory, 1)
    held = slots.try_take("p1")
    assert held is not None
    assert directory.stat().st_mode & 0o777 == 0o700
    held.release()
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()
    again = slots.try_take("p2")
    assert again is not None and again.index == 0
    assert (directory / "slot-0").read_text().split()[1] == "p2"
    again.release()


PRIORITY_PROBE = """
import json, os, threading
from shim.pod.admission import Priority
stop = threading.Event()
worker = threading.Thread(target=stop.wait)
worker.start()
def nices():
    return sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")})
before = nices()
priority = Priority()
priority.lower()
low = nices()
child = os.fork()
if child == 0:
    os._exit(os.getpriority(os.PRIO_PROCESS, 0))
child_nice = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
priority.restore()
priority.restore()
stop.set()
worker.join()
print(json.dumps({"before": before, "low": low, "child": child_nice, "back": nices(),
                  "root": os.geteuid() == 0}))
"""


def test_priority_lowers_every_thread_and_children_and_gives_it_back() -> None:
    """Linux's nice is per thread: every thread of the daemon goes to 19 (and what it spawns
    meanwhile inherits it), then back, for a process that may raise it again."""
    out = subprocess.run([sys.executable, "-c", PRIORITY_PROBE], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             sys.path)}).stdout
    seen = json.loads(out)
    assert seen["back"] == seen["before"] and len(seen["before"]) == 1
    if seen["root"] and seen["before"][0] < 19:
        assert (seen["low"], seen["child"]) == ([19], 19)
    else:  # may not raise it back (or already there): never lowered
        assert seen["low"] == seen["before"]
