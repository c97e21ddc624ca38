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
    # every other figure is named with the bench that measures it
    assert lines[-len(targets.elsewhere(["grpc_daemon_rss_mib"] if grpc else [])):] == \
        targets.elsewhere(["grpc_daemon_rss_mib"] if grpc else [])
    assert any("make bench-daemon" in line for line in lines)


def test_elsewhere_names_each_figure_not_printed_once_under_its_bench() -> None:
    printed = ["ctr_run_ratio", "ctr_run_ratio_bare", "boot_ratio"]
    lines = targets.elsewhere(printed)
    named = {key: [line for line in lines if targets.FIGURES[key].label in line]
             for key in targets.FIGURES}
    for key, figure in targets.FIGURES.items():
        if key in printed:
            assert named[key] == [], key
        else:
            assert len(named[key]) == 1 and f"measured by {figure.bench}:" in named[key][0], key
    # one line per bench, in the table's order
    benches = [line.split(":", 1)[0] for line in lines]
    assert len(benches) == len(set(benches))
    assert lines[0].startswith("  (measured by make bench-guest: ")
    assert targets.elsewhere(targets.FIGURES) == []
    with pytest.raises(KeyError, match="no such figures: nope"):
        targets.elsewhere(["nope"])


def test_make_bench_prints_its_ratios_and_names_the_other_benches() -> None:
    run_py = load_bench("run")
    memory = [{"protocol": "ttrpc", "rss_mib": 21.0, "template": True},
              {"protocol": "grpc", "rss_mib": 26.7, "template": True},
              {"protocol": "grpc", "rss_mib": 33.7, "template": False}]
    lines = run_py.issue18(boot=10.0, run=11.4, bare=7.0, flood=18.136, memory=memory)
    assert lines[0] == targets.HEADER
    assert lines[1] == targets.line("ctr_run_ratio", 1.14, "1.14x")
    assert lines[2] == targets.line("ctr_run_ratio_bare", 11.4 / 7.0, "1.63x")
    assert lines[3] == targets.line("boot_ratio", 10.0 / 7.0, "1.43x")
    # the gRPC daemons only, each saying how it came to be (the ttrpc one is no figure)
    assert lines[4] == targets.line("grpc_daemon_rss_mib", 26.7, "26.7 MiB",
                                    of="forked from the node's template")
    assert lines[5] == targets.line("grpc_daemon_rss_mib", 33.7, "33.7 MiB",
                                    of="spawned directly: no template yet")
    assert lines[4].endswith(" met") and lines[5].endswith(" missed")
    # 64 MiB over what the flood run took beyond a `true` run
    assert lines[6] == targets.line("stdout_whole_mib_s", 64 / (18.136 - 11.4),
                                    "9.5 MiB/s beyond a true run")
    assert lines[7:] == targets.elsewhere(["ctr_run_ratio", "ctr_run_ratio_bare", "boot_ratio",
                                           "grpc_daemon_rss_mib", "stdout_whole_mib_s"])
    assert all(line.endswith((" met", " missed")) for line in lines[1:4])
