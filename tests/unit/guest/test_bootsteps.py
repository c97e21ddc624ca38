"""wait_for_step: init's boot steps as the agent sees them (done, failed, or never ending)."""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest

from guest.agent.bootsteps import (
    MAX_REPORT,
    STEP_BOUNDS,
    BootStepFailed,
    overran_step,
    read_failure,
    wait_for_step,
)


async def test_returns_once_the_marker_exists(tmp_path: Path) -> None:
    done = tmp_path / "done"
    waiting = asyncio.ensure_future(wait_for_step(done, 5, failed=tmp_path / "failed"))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    done.touch()
    await asyncio.wait_for(waiting, 1)


async def test_a_failure_report_ends_the_wait_at_once_with_its_words(tmp_path: Path) -> None:
    failed = tmp_path / "failed"
    waiting = asyncio.ensure_future(wait_for_step(tmp_path / "done", 60, failed=failed))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    failed.write_text('step "drivers" exited with status 1\nmodprobe: module x not found\n\n')
    with pytest.raises(BootStepFailed) as info:
        await asyncio.wait_for(waiting, 1)
    assert time.monotonic() - started < 0.5
    assert str(info.value) == ("init's boot step failed: step \"drivers\" exited with status 1; "
                               "modprobe: module x not found")


async def test_a_step_that_never_ends_is_named_at_the_bound(tmp_path: Path) -> None:
    step = tmp_path / "step"
    step.write_text("mounts\n")
    with pytest.raises(BootStepFailed, match=r"did not finish within 0.2 s \(.*done missing; "
                                             r"step running: mounts\)"):
        await wait_for_step(tmp_path / "done", 0.2, failed=tmp_path / "failed", step=step)


async def test_without_a_step_file_the_step_is_unknown(tmp_path: Path) -> None:
    with pytest.raises(BootStepFailed, match=r"step running: unknown"):
        await wait_for_step(tmp_path / "done", 0.05)


def test_a_report_is_bounded_and_never_empty(tmp_path: Path) -> None:
    report = tmp_path / "failed"
    assert read_failure(report) is None and read_failure(None) is None
    report.write_text("")
    assert read_failure(report) == f"(the failure report {report} is empty)"
    report.write_text("x" * (10 * MAX_REPORT))
    text = read_failure(report)
    assert text is not None and len(text) == MAX_REPORT + 1 and text.endswith("…")


async def test_a_step_that_hangs_is_named_at_its_own_bound(tmp_path: Path) -> None:
    """A hung step writes no failure report: the step's own bound (from when init announced
    it) names it long before the wait's overall bound."""
    step = tmp_path / "step"
    step.write_text("drivers\n")
    started = time.monotonic()
    with pytest.raises(BootStepFailed) as info:
        await wait_for_step(tmp_path / "done", 60, failed=tmp_path / "failed", step=step,
                            bounds={"drivers": 0.2})
    assert time.monotonic() - started < 1
    assert re.fullmatch(r"init's boot step hung: step \"drivers\" did not finish within its "
                        r"bound of 0.2 s \(running for 0\.\d s\)", str(info.value)), info.value


async def test_a_finished_step_is_not_bounded(tmp_path: Path) -> None:
    """Init writes "NAME done" when a step ends well: the gap before the next step is not
    that step running."""
    step = tmp_path / "step"
    step.write_text("modules done\n")
    os.utime(step, (time.time() - 100, time.time() - 100))
    done = tmp_path / "done"
    waiting = asyncio.ensure_future(wait_for_step(done, 5, step=step,
                                                  bounds={"modules": 0.1}))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    done.touch()
    await asyncio.wait_for(waiting, 1)


def test_the_bound_counts_from_the_announcement(tmp_path: Path) -> None:
    step = tmp_path / "step"
    step.write_text("mounts\n")
    announced = step.stat().st_mtime
    assert overran_step(step, {"mounts": 10}, now=announced + 9.9) is None
    assert overran_step(step, {"mounts": 10}, now=announced + 10.5) == (
        'step "mounts" did not finish within its bound of 10 s (running for 10.5 s)')
    assert overran_step(step, {}, now=announced + 1000) is None  # a step with no bound
    assert overran_step(tmp_path / "missing", {"mounts": 10}) is None
    # announced before the agent began waiting: the wait is what is bounded
    assert overran_step(step, {"mounts": 10}, now=announced + 10.5,
                        waited_since=announced - 5) is not None
    assert overran_step(step, {"mounts": 10}, now=announced + 30,
                        waited_since=announced + 25) is None
    assert overran_step(step, {"mounts": 10}, now=announced + 36,
                        waited_since=announced + 25) == (
        'step "mounts" did not finish within its bound of 10 s (running for 36.0 s, '
        '11.0 s of them while the agent waited for it)')


async def test_a_step_starved_before_the_agent_waits_is_not_charged(tmp_path: Path) -> None:
    """A step announced long ago (starved at nice 19 while the agent started up) gets its
    whole bound once the agent waits for it, and is then named at that bound."""
    step = tmp_path / "step"
    step.write_text("drivers\n")
    os.utime(step, (time.time() - 100, time.time() - 100))
    started = time.monotonic()
    with pytest.raises(BootStepFailed) as info:
        await wait_for_step(tmp_path / "done", 60, step=step, bounds={"drivers": 0.3})
    assert 0.3 <= time.monotonic() - started < 1.5
    assert re.fullmatch(r"init's boot step hung: step \"drivers\" did not finish within its "
                        r"bound of 0.3 s \(running for 10\d\.\d s, 0\.\d s of them while the "
                        r"agent waited for it\)", str(info.value)), info.value


def test_every_step_of_init_has_a_bound_below_the_shim_s_first_call() -> None:
    """The AgentService waits for the drivers step; the shim's first call after
    Check (SetPolicy/UpdateInterface: 30 s) must see the guest's answer, not its own bound."""
    from shim.core.timeouts import AGENT_RPC

    init = Path(__file__).parents[3] / "packaging" / "guest-image" / "init"
    steps = re.findall(r"^\s+step (\w+) \w+", init.read_text(), re.MULTILINE)
    assert steps == ["modules", "drivers"]
    assert set(STEP_BOUNDS) == set(steps)
    first_call = min(AGENT_RPC[m] or 0 for m in ("SetPolicy", "UpdateInterface", "CreateSandbox"))
    assert all(STEP_BOUNDS[s] < first_call for s in steps[1:])
