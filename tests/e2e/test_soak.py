"""The short form of ``make soak`` in ``make test``: 20 create/start/exec/delete cycles of a pod
through containerd 2.1.9 (ctr, a netns per pod), and nothing of them grows or stays behind
(tests/soak/soak.py defines the counters and what a leak is)."""

from __future__ import annotations

import pytest

from tests.soak.soak import Sample, soak, soak_run

pytestmark = pytest.mark.e2e
SHORT_CYCLES = 20


def test_pod_cycles_leak_nothing() -> None:
    def report(sample: Sample) -> None:  # shown with -s: the per-cycle counters
        print(f"soak: {sample}")

    samples: list[Sample] = []
    with soak_run("2.1.9") as run:
        found = soak(run, SHORT_CYCLES, samples, report)
    assert len(samples) == SHORT_CYCLES
    assert not found, "\n".join(found)
