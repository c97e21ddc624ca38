"""wait_for_step: init's boot steps as the agent sees them (done, failed, or never ending)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from guest.agent.bootsteps import MAX_REPORT, BootStepFailed, read_failure, wait_for_step


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
