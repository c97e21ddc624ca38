"""bench/coco_dev.py's parsing of the guest's timing: the puller's closing line, the wget
baseline's output and its /proc/uptime arithmetic (run by a real POSIX shell)."""

from __future__ import annotations

import subprocess
from types import ModuleType

import pytest

from tests.support.bench import load_bench

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("coco_dev")


def test_pull_seconds_picks_the_image_by_manifest_digest(bench: ModuleType) -> None:
    log = (f"agent: image pull: reg/busybox:1: {OTHER}, 1 layers (1 fetched) in 0.31 s\n"
           f"agent: image pull: reg/coco/large:1: {DIGEST}, 2 layers (1 fetched) in 4.27 s\n")
    assert bench.pull_seconds(log, DIGEST) == 4.27
    assert bench.pull_seconds(log, OTHER) == 0.31
    assert bench.pull_seconds("image pull: x: starting", DIGEST) is None


def test_wget_seconds_sums_the_named_fetches(bench: ModuleType) -> None:
    output = "manifest 1200 2\nconfig 900 1\nlayer 69000000 41\n"
    assert bench.wget_seconds(output, ["manifest", "config", "layer"]) == pytest.approx(0.44)
    bench.check_received(output, {"manifest": ("", 1000), "config": ("", 800),
                                  "layer": ("", 68_000_000)})


def test_wget_seconds_refuses_output_without_timing(bench: ModuleType) -> None:
    with pytest.raises(SystemExit, match="no guest timing for layer"):
        bench.wget_seconds("manifest 1200 2\nlayer 69000000\n", ["manifest", "layer"])


@pytest.mark.parametrize(("uptime", "hundredths"),
                         [("12345.67", 1234567), ("7.08", 708), ("100.00", 10000)])
def test_uptime_to_hundredths_in_the_shell(bench: ModuleType, uptime: str,
                                           hundredths: int) -> None:
    script = f'{bench.CENTISECONDS_FUNCTION}\ncs "{uptime}"; echo "$cs"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert int(out.stdout) == hundredths
