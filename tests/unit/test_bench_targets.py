"""Issue 18's figures as data (tests/support/targets.py) and the benches printing them beside
the issue's baseline and target, fed with recorded results (bench/*-results.json)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import targets
from tests.support.bench import BENCH, load_bench


def test_every_limited_figure_is_met_at_its_limit_and_missed_beyond_it() -> None:
    for key, figure in targets.FIGURES.items():
        if figure.limit is None:
            assert targets.verdict(key, 1e9) == targets.verdict(key, -1e9) == ""
            continue
        step = 0.001 if figure.higher_is_better else -0.001
        assert targets.verdict(key, figure.limit) == "met", key
        assert targets.verdict(key, figure.limit + step) == "met", key
        assert targets.verdict(key, figure.limit - step) == "missed", key


def test_the_table_holds_issue_18_s_targets() -> None:
    f = targets.FIGURES
    assert (f["boot_ratio"].limit, f["ctr_run_ratio_bare"].limit, f["ctr_run_ratio"].limit) == (
        1.3, 1.4, 1.05)
    assert (f["start_ratio"].limit, f["first_rpc_ms"].limit) == (2.5, 100.0)
    assert (f["daemon_pss_per_pod_mib"].limit, f["grpc_daemon_rss_mib"].limit) == (12.0, 30.0)
    assert f["qemu_idle_kvm_host_mib"].limit == 120.0
    assert f["relay_mb_s"].limit == 200.0 and f["relay_mb_s"].higher_is_better
    assert f["boots_unanswered"].limit == f["burst_failed"].limit == 0.0


def test_a_line_shows_now_baseline_target_and_verdict() -> None:
    line = targets.line("boot_ratio", 1.41, "1.41x", of="agent")
    assert re.fullmatch(r"  direct boot to agent Check ÷ bare boot \(agent\) +1\.41x +"
                        r"baseline 11\.51 s: 2\.02x +target ≤ 1\.3x +missed", line), line
    assert targets.line("relay_mb_s", 258.0, "258.0 MB/s").endswith(" met")
    assert not targets.line("bare_boot", 5.7, "5.70 s").endswith(("met", "missed"))


def test_every_figure_names_a_bench_that_prints_it() -> None:
    """Each key is printed by some bench script, through targets.line."""
    sources = "\n".join(p.read_text() for p in BENCH.glob("*.py"))
    for key in targets.FIGURES:
        assert f'targets.line("{key}"' in sources, key


def test_burst_prints_its_figures_from_a_recorded_run(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # burst.py imports its sibling cri.py
    burst = load_bench("burst")
    saved = json.loads((BENCH / "burst-results.json").read_text())
    runs = [burst.Run(**r) for r in saved["runs"]]
    burst.report(runs, saved["containerd"], saved["cpus"])
    out = capsys.readouterr().out
    assert targets.HEADER in out
    sixteen = next(r for r in runs if r.kind == "burst" and r.pods == 16)
    ideal = burst.t1(runs)
    first = sixteen.ready[0] / ideal
    assert re.search(r"pods of a burst that failed to start \(16 at once, slots on\) +0/16 +"
                     r"baseline .* met", out), out
    assert f"{first:.2f}x" in out


def test_relay_and_boot_loop_import_the_table() -> None:
    """The scripts that print a figure without a unit-testable report function at least load
    (their imports, the table's keys they use), in a fresh interpreter as `python bench/X.py`."""
    for script in ("relay", "boot_loop", "run", "guest", "daemon", "cri"):
        done = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--help"],
                              capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).parents[2])
        assert done.returncode == 0, (script, done.stderr)


@pytest.mark.parametrize(("containerd", "grpc"), [("1.7.24", True), ("2.1.9", False)])
def test_cri_prints_the_grpc_daemon_rss_only_on_containerd_1(containerd: str, grpc: bool) -> None:
    cri = load_bench("cri")
    # make bench (c)'s running-pod daemon RSS on containerd 1.7.24 (docs/performance.md).
    lines = cri.issue18(containerd, 33.8)
    assert lines[0] == targets.HEADER
    printed = [line for line in lines if "baseline 44.2 MiB" in line]
    if grpc:
        assert printed == [targets.line(
            "grpc_daemon_rss_mib", 33.8, "33.8 MiB",
            of=f"a running CRI pod, containerd {containerd}")]
        assert printed[0].endswith(" missed")
    else:
        assert printed == []
        assert "--containerd 1.7.24" in lines[1]
    assert "make bench-daemon" in lines[-1]
