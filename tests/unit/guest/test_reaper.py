"""The SIGCHLD reaper: real children, real exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator

import pytest

from guest.agent.reaper import Reaper, exit_code


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    r = Reaper()
    r.install(subreaper=False)  # the test process must not adopt orphans
    try:
        yield r
    finally:
        r.close()


async def test_exit_codes(reaper: Reaper) -> None:
    assert (await reaper.run(["true"])).code == 0
    assert (await reaper.run(["sh", "-c", "exit 3"])).code == 3
    done = await reaper.run(["sh", "-c", "echo out; echo err >&2"])
    assert (done.stdout, done.stderr) == (b"out\n", b"err\n")


async def test_output_beyond_the_pipe_buffers_is_read_whole_on_the_loop(reaper: Reaper) -> None:
    # 1 MiB on each stream at once: a reader that took one after the other would deadlock
    script = "head -c 1048576 /dev/zero; head -c 1048576 /dev/zero | tr '\\0' e >&2"
    done = await reaper.run(["sh", "-c", script])
    assert done.code == 0
    assert done.stdout == bytes(1 << 20) and done.stderr == b"e" * (1 << 20)
    # read by the event loop itself: no executor thread was started for it
    assert asyncio.get_running_loop()._default_executor is None  # type: ignore[attr-defined]


async def test_signal_gives_128_plus_signal(reaper: Reaper) -> None:
    spawned = reaper.spawn(["sleep", "30"])
    os.kill(spawned.proc.pid, signal.SIGTERM)
    assert await spawned.exited == 143
    assert spawned.proc.returncode == 143


async def test_input_is_fed(reaper: Reaper) -> None:
    done = await reaper.run(["cat"], input=b"data")
    assert done.stdout == b"data"


async def test_exit_before_anyone_asked_is_kept(reaper: Reaper) -> None:
    spawned = reaper.spawn(["true"])
    await spawned.exited
    # A pid nobody registered (as for a container pid read from runc's pid file later).
    orphan = subprocess.Popen(["sh", "-c", "exit 7"])  # noqa: ASYNC220 - not via the reaper
    await asyncio.sleep(0.3)
    assert await reaper.wait(orphan.pid) == 7
    orphan.returncode = 7  # reaped by the reaper; Popen must not wait for it


def test_exit_code_of_status() -> None:
    assert exit_code(0) == 0
    assert exit_code(3 << 8) == 3
    assert exit_code(signal.SIGKILL) == 137
