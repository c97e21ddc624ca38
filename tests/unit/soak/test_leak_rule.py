"""What the soak calls a leak: steady growth after the warm-up, not noise."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.soak.soak import Sample, growth, leaks, leftover_leaks, soak, warmup_for

BASE = Sample(cycle=0, seconds=10.0, run_s=8.0, exec_s=0.5, delete_s=1.0, settle_s=0.5,
              boot_s=7.5, sandbox_s=8.0,
              host_processes=300, run_processes=1, containerd_fds=14, taps=0, ingress_qdiscs=0,
              mounts=0, dirs=2, shim_rss_mib=31.5)


def test_flat_and_noisy_series_are_not_leaks() -> None:
    assert not growth([14] * 18)
    assert not growth([14, 15, 14, 14, 16, 14, 14, 15, 14, 14, 14, 15, 14, 16, 14, 14, 15, 14])
    # A spike late in the run alone is not growth: the last third's minimum decides.
    assert not growth([14] * 17 + [40])
    assert not growth([31.5, 31.6, 31.4, 32.9, 31.5, 31.6], tolerance=2.0)


def test_steady_growth_is_a_leak_even_when_slow() -> None:
    assert growth(list(range(18)))
    assert growth([14 + i // 5 for i in range(18)])  # one fd every five cycles
    assert growth([31.0 + 0.5 * i for i in range(18)], tolerance=2.0)
    assert not growth([1.0, 2.0])  # too short to judge


def test_leaks_names_the_counter_and_skips_the_warm_up() -> None:
    samples = [replace(BASE, cycle=i, dirs=2 + (i >= 10), containerd_fds=14 + i)
               for i in range(20)]
    warmup = warmup_for(20)
    assert warmup == 2
    found = leaks(samples, warmup)
    assert len(found) == 2
    assert found[0].startswith("containerd_fds grows")
    assert found[1].startswith("dirs grows")
    # Growth confined to the warm-up (caches filling on the first cycles) is not a leak.
    warm = [replace(BASE, cycle=i, containerd_fds=10 + min(i, 2)) for i in range(20)]
    assert leaks(warm, warmup) == []
    # The host's process count is shown, never judged: other work moves it.
    busy = [replace(BASE, cycle=i, host_processes=300 + 10 * i) for i in range(20)]
    assert leaks(busy, warmup) == []


class FailingRun:
    """A soak run whose third cycle fails, with one leftover after it."""

    def cycle(self, index: int) -> Sample:
        assert index < 2, f"cycle {index}: ctr run exited 1"
        return replace(BASE, cycle=index)

    def leftovers(self) -> list[str]:
        return ["process 4242"]


def test_a_failed_cycle_keeps_the_samples_before_it() -> None:
    samples: list[Sample] = []
    with pytest.raises(AssertionError, match="cycle 2: ctr run exited 1"):
        soak(FailingRun(), 5, samples)  # type: ignore[arg-type]
    assert [s.cycle for s in samples] == [0, 1]
    assert leftover_leaks(FailingRun()) == [  # type: ignore[arg-type]
        "left after the last cycle: process 4242"]
