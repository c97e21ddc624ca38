"""Node-wide boot admission across real processes: several boot scripts (each its own
process, as each pod has its own daemon) contend for the slots under one run root; at most N
hold one at a time, every one gets its turn, and a holder killed mid-boot frees its slot
without anyone cleaning up. The burst figures on real VMs are not part of `make test`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BOOT = """\
import asyncio, json, sys, time
from pathlib import Path
from shim.pod.admission import BootSlots

async def main() -> None:
    slots = BootSlots(Path(sys.argv[1]), int(sys.argv[2]), poll=0.01)
    held = await slots.wait(sys.argv[3])
    try:
        entered = time.time()
        print("in", flush=True)
        await asyncio.sleep(float(sys.argv[4]))  # the CPU-bound part of a boot
        out = time.time()
    finally:
        held.release()
    print(json.dumps({"slot": held.index, "in": entered, "out": out}), flush=True)

asyncio.run(main())
"""


def boot(directory: Path, slots: int, name: str, hold: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", BOOT, str(directory), str(slots), name,
                             str(hold)], stdout=subprocess.PIPE, text=True)


def test_boot_scripts_in_separate_processes_share_the_slots(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "boot-slots"
    doomed = boot(directory, 2, "doomed", 60)  # takes a slot and never gives it back...
    try:
        run_burst(directory, doomed)
    finally:
        doomed.kill()
        doomed.wait()


def run_burst(directory: Path, doomed: subprocess.Popen[str]) -> None:
    assert doomed.stdout is not None and doomed.stdout.readline() == "in\n"
    boots = [boot(directory, 2, f"pod{n}", 0.3) for n in range(5)]
    time.sleep(1.2)
    doomed.send_signal(signal.SIGKILL)  # ...until its daemon is killed mid-boot
    doomed.wait()
    killed = time.time()
    spans = []
    for process in boots:
        out, _ = process.communicate(timeout=30)
        assert process.returncode == 0
        spans.append(json.loads(out.splitlines()[-1]))
    assert most_at_once(spans) <= 2
    # While the doomed one held its slot, only one pod at a time could boot.
    before = [{"in": s["in"], "out": min(s["out"], killed)} for s in spans if s["in"] < killed]
    assert before, "no pod got the free slot in 1.2 s"
    assert most_at_once(before) == 1
    assert max(s["out"] for s in spans) - killed < 10


def most_at_once(spans: list[dict[str, float]]) -> int:
    steps = sorted([(s["out"], -1) for s in spans] + [(s["in"], 1) for s in spans])
    holding = most = 0
    for _, step in steps:  # at equal times a leaving pod is counted out first
        holding += step
        most = max(most, holding)
    return most
