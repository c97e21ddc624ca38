"""The pod's PID namespace init the agent starts itself (containerd's sandbox API): real
processes in a real PID namespace (the tests run as root)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from guest.agent.errors import FailedPrecondition
from guest.agent.namespaces import NOBODY, start_pid_namespace
from guest.agent.reaper import Reaper

CATATONIT = "/usr/bin/catatonit"


@pytest.fixture
async def reaper() -> AsyncIterator[Reaper]:
    r = Reaper()
    r.install(subreaper=False)
    try:
        yield r
    finally:
        r.close()


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


async def test_the_init_is_pid_1_of_a_new_namespace_and_nobody(reaper: Reaper) -> None:
    assert shutil.which("catatonit"), "catatonit: make env installs it"
    made = start_pid_namespace(reaper, [CATATONIT, "-P"])
    try:
        mine = os.readlink("/proc/self/ns/pid")
        assert os.readlink(made.path) != mine
        # the agent's own later children stay in its namespace
        assert os.readlink("/proc/self/ns/pid_for_children") == mine
        info = await asyncio.to_thread(status, made.init.pid)
        assert info["NSpid"].split() == [str(made.init.pid), "1"]
        assert info["Uid"].split()[0] == str(NOBODY) and info["CapEff"] == "0" * 16
        made.check_alive()
    finally:
        await made.stop()
    assert made.exited.result() == 137 and made.init.returncode == 137
    with pytest.raises(FailedPrecondition, match=r"PID namespace is gone: its init "
                       r"\(/usr/bin/catatonit\) exited with 137"):
        made.check_alive()
    await made.stop()  # again: nothing to do


async def test_a_missing_or_unusable_program_is_named(reaper: Reaper, tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match=f"its init {tmp_path}/pause is missing"):
        start_pid_namespace(reaper, [str(tmp_path / "pause"), "-P"])
    (tmp_path / "pause").write_text("#!/bin/sh\n")  # not executable
    with pytest.raises(FailedPrecondition, match="not executable"):
        start_pid_namespace(reaper, [str(tmp_path / "pause")])
