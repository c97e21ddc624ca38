"""The puller's phase timer: exclusive time per phase, adding up to the wall time."""

from __future__ import annotations

import time

import pytest

from guest.image_pull.timing import OTHER, PHASES, PhaseTimer


def test_nested_phases_are_charged_exclusively(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 1.0, 3.0, 6.0, 10.0, 15.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    timer = PhaseTimer()  # t=0
    outer = timer.enter("inflate")  # t=1: 1 s of other
    inner = timer.enter("network")  # t=3: 2 s of inflate
    timer.leave(inner)  # t=6: 3 s of network, back to inflate
    timer.leave(outer)  # t=10: 4 s more of inflate
    totals = timer.stop()  # t=15: 5 s more of other
    assert totals == {**dict.fromkeys(PHASES, 0.0), OTHER: 6.0, "inflate": 6.0, "network": 3.0}
    assert sum(totals.values()) == 15.0
    assert PhaseTimer.describe({"network": 3.0, OTHER: 0.5}) == "network 3.00, other 0.50"
