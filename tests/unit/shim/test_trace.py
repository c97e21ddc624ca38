"""The benchmark's boot trace: nothing without $COCO_SHIM_TRACE, whole lines with it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from shim.core import trace


def test_mark_does_nothing_unless_the_trace_is_asked_for(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(trace.TRACE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    trace.mark("boot: begin")
    assert list(tmp_path.iterdir()) == []


def test_marks_are_lines_on_the_monotonic_clock(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "trace"
    monkeypatch.setenv(trace.TRACE_ENV, str(path))
    before = time.monotonic()
    trace.mark("rpc: Create received")
    trace.mark("agent: Check answered")
    after = time.monotonic()
    marks = trace.read(path)
    assert [step for _, _, step in marks] == ["rpc: Create received", "agent: Check answered"]
    assert all(before <= stamp <= after and pid == os.getpid() for stamp, pid, _ in marks)
    assert marks[0][0] <= marks[1][0]
    assert path.stat().st_mode & 0o777 == 0o600


def test_an_unwritable_trace_never_fails_the_caller(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(trace.TRACE_ENV, str(tmp_path / "missing" / "trace"))
    trace.mark("boot: begin")  # no exception: a pod does not fail over a benchmark's file
