"""bench/targets.py (issue 18's table) and the benches' printing of its rows, fed with recorded
samples (bench/*-results.json) or figures recorded in the README."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.bench import BENCH, load_bench

# Issue 18's table, row by row: its baselines verbatim, the targets it sets.
ISSUE_ROWS = {
    "bare_boot": ("5.70 s (7 samples)", "the limit"),
    "direct_boot_ratio": ("11.51 s → 2.02×", "≤ 1.3×"),  # noqa: RUF001
    "ctr_run_ratio": ("13.04 s → 2.29×", "≤ 1.4×"),  # noqa: RUF001
    "run_vs_direct": ("1.10–1.13×", "≤ 1.05×"),  # noqa: RUF001
    "start_ratio": ("76 ms vs 11.8 ms → 6.7×", "≤ 2.5×"),  # noqa: RUF001
    "first_rpc": ("303 ms (runc 19 ms)", "≤ 100 ms"),
    "daemon_pss": ("20.0 MiB (USS 19.2)", "≤ 12 MiB"),
    "daemon_rss_grpc": ("44.2 MiB", "≤ 30 MiB"),
    "qemu_kvm_host": ("422 MiB", "≤ 120 MiB (see 3)"),
    "relay": ("6.9 MiB/s (whole `ctr run`)", "≥ 200 MB/s (see 4)"),
    "stdout_whole": ("6.9 MiB/s", "relay never the bottleneck (see 4)"),
    "burst": ("10/10 in 83–103 s = 1.09–1.36×", "≤ 1× (see 5)"),  # noqa: RUF001
    "never_answered": ("1 of 74 pods", "0"),
}


@pytest.fixture(scope="module")
def targets() -> ModuleType:
    return load_bench("targets")


def recorded(name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((BENCH / name).read_text())
    return data


def test_the_table_holds_every_row_of_the_issue_once(targets: ModuleType) -> None:
    assert {t.id: (t.baseline, t.target) for t in targets.TABLE} == ISSUE_ROWS
    assert len(targets.BY_ID) == len(targets.TABLE)
    for t in targets.TABLE:
        script = t.bench.removeprefix("make ")
        assert script.startswith(("bench", "bench/")), t.bench


def test_every_bench_named_by_the_table_exists(targets: ModuleType) -> None:
    makefile = (Path(BENCH).parent / "Makefile").read_text()
    for t in targets.TABLE:
        for bench in t.bench.split(" (")[0].split(" + "):
            if bench.startswith("make "):
                assert f"\n{bench.removeprefix('make ')}:" in makefile, t.bench
            else:
                assert (Path(BENCH).parent / bench).is_file(), t.bench


@pytest.mark.parametrize(("id", "now", "expected"), [
    ("run_vs_direct", 1.05, "met"), ("run_vs_direct", 1.051, "missed"),
    ("direct_boot_ratio", 1.3, "met"), ("direct_boot_ratio", 2.02, "missed"),
    ("ctr_run_ratio", 1.39, "met"), ("ctr_run_ratio", 2.29, "missed"),
    ("start_ratio", 2.5, "met"), ("start_ratio", 6.7, "missed"),
    ("first_rpc", 99.9, "met"), ("first_rpc", 303, "missed"),
    ("daemon_pss", 12.0, "met"), ("daemon_pss", 20.0, "missed"),
    ("daemon_rss_grpc", 30.0, "met"), ("daemon_rss_grpc", 44.2, "missed"),
    ("qemu_kvm_host", 120, "met"), ("qemu_kvm_host", 422, "missed"),
    ("relay", 200, "met"), ("relay", 199.9, "missed"),
    ("burst", 1.0, "met"), ("burst", 1.09, "missed"),
    ("never_answered", 0, "met"), ("never_answered", 1, "missed"),
    ("bare_boot", 5.7, "-"), ("stdout_whole", 6.9, "-"),
])
def test_verdicts(targets: ModuleType, id: str, now: float, expected: str) -> None:
    assert targets.verdict(targets.BY_ID[id], now) == expected


def test_figure_prints_label_now_baseline_target_verdict(targets: ModuleType) -> None:
    assert targets.figure("first_rpc", 42.04) == (
        "daemon's first RPC after `start` | 42.0 ms | 303 ms (runc 19 ms) | ≤ 100 ms | met")
    assert targets.figure("run_vs_direct", 1.3) == (
        "`ctr run` ÷ direct boot to Check | 1.30× | 1.10–1.13× | ≤ 1.05× | missed")  # noqa: RUF001
    assert targets.figure("relay", 250, "x").split(" | ")[1:] == [
        "x", "6.9 MiB/s (whole `ctr run`)", "≥ 200 MB/s (see 4)", "met"]
    assert targets.measured_elsewhere("burst").split(" | ")[1] == "measured by make bench-burst"


def test_daemon_bench_prints_its_rows_from_recorded_samples(targets: ModuleType) -> None:
    daemon = load_bench("daemon")
    data = recorded("daemon-results.json")
    start: dict[str, list[float]] = data["start_ms"]  # type: ignore[assignment]
    first: dict[str, list[float]] = data["first_rpc_ms"]  # type: ignore[assignment]
    grpc: dict[str, float] = data["grpc_daemon_memory_mib"]  # type: ignore[assignment]
    start_ms = statistics.median(start["template"])
    runc_ms = statistics.median(start["runc"])
    first_ms = statistics.median(first["template"])
    pss: float = data["template_pss_per_daemon_mib"]  # type: ignore[assignment]
    lines = daemon.issue18(start_ms, runc_ms, first_ms, pss, grpc["rss_mib"])
    assert lines[0] == targets.HEADER
    by_label = {line.split(" | ")[0]: line.split(" | ") for line in lines[1:]}
    assert [by_label[targets.BY_ID[id].label] for id in (
        "start_ratio", "first_rpc", "daemon_pss", "daemon_rss_grpc")] == [
        ["`start` ÷ runc shim's `start`",
         f"{start_ms:.1f} ms vs {runc_ms:.1f} ms → {start_ms / runc_ms:.2f}×",  # noqa: RUF001
         "76 ms vs 11.8 ms → 6.7×", "≤ 2.5×",  # noqa: RUF001
         "met" if start_ms / runc_ms <= 2.5 else "missed"],
        ["daemon's first RPC after `start`", f"{first_ms:.1f} ms", "303 ms (runc 19 ms)",
         "≤ 100 ms", "met" if first_ms <= 100 else "missed"],
        ["shim daemon PSS per pod with 10 pods", f"{pss:.1f} MiB", "20.0 MiB (USS 19.2)",
         "≤ 12 MiB", "met" if pss <= 12 else "missed"],
        ["shim daemon RSS on containerd 1.7 (gRPC)", f"{grpc['rss_mib']:.1f} MiB", "44.2 MiB",
         "≤ 30 MiB", "met" if grpc["rss_mib"] <= 30 else "missed"]]


def test_relay_row_from_recorded_samples(targets: ModuleType) -> None:
    data = recorded("relay-results.json")
    relay_s: list[float] = data["relay_s"]  # type: ignore[assignment]
    size: int = data["size"]  # type: ignore[assignment]
    mb_s = size / statistics.median(relay_s) / 1e6
    line = targets.figure("relay", mb_s)
    assert line.split(" | ")[1:] == [f"{mb_s:.1f} MB/s", "6.9 MiB/s (whole `ctr run`)",
                                     "≥ 200 MB/s (see 4)", "met" if mb_s >= 200 else "missed"]


def test_boot_loop_row_from_recorded_samples(targets: ModuleType) -> None:
    boots: list[dict[str, object]] = recorded("boot-loop-results.json")["boots"]  # type: ignore[assignment]
    failed = sum(1 for b in boots if not b["ok"])
    line = targets.figure("never_answered", failed, f"{failed} of {len(boots)} boots")
    assert line.split(" | ")[1:] == [f"{failed} of {len(boots)} boots", "1 of 74 pods", "0",
                                     "met" if failed == 0 else "missed"]


def test_make_bench_summary_prints_its_rows_and_refers_to_the_others(
        targets: ModuleType) -> None:
    run = load_bench("run")
    # README's (a) and (c) figures: 12.58 s ÷ 9.52 s; 33.8 / 24.3 MiB on containerd 1.7.24.
    lines = run.summary(9.52, 12.58, 0.055, 22.0, {
        "2.1.9": {"protocol": "ttrpc", "rss_mib": 31.4, "pss_mib": 24.5},
        "1.7.24": {"protocol": "grpc", "rss_mib": 33.8, "pss_mib": 24.3}})
    rows = lines[lines.index(targets.HEADER) + 1:]
    assert {row.split(" | ")[0] for row in rows} == {t.label for t in targets.TABLE}
    by_label = {row.split(" | ")[0]: row.split(" | ") for row in rows}
    assert by_label[targets.BY_ID["run_vs_direct"].label][1:] == [
        "12.58 s ÷ 9.52 s = 1.32×", "1.10–1.13×", "≤ 1.05×", "missed"]  # noqa: RUF001
    assert by_label[targets.BY_ID["daemon_rss_grpc"].label][-1] == "missed"
    assert by_label[targets.BY_ID["start_ratio"].label][1] == "measured by make bench-daemon"
    assert not any("target <= 60 ms" in line or "target RSS <= 40 MiB" in line
                   for line in lines)
    assert sum("issue 5:" in line for line in lines) == 3


def test_guest_bench_prints_its_rows_from_recorded_samples(targets: ModuleType) -> None:
    guest = load_bench("guest")
    data = recorded("guest-results.json")
    raw: dict[str, list[dict[str, object]]] = data["series"]  # type: ignore[assignment]
    series = {name: [guest.Boot(**boot) for boot in boots] for name, boots in raw.items()}
    bare = statistics.median(b.seconds for b in series["bare"])
    agent = statistics.median(b.seconds for b in series["agent"])
    kvm = [b.memory["kvm_host_rss"] for b in series["agent"] if b.memory]
    lines = guest.issue18(series)
    assert lines[0] == targets.HEADER
    assert lines[1].split(" | ")[1:] == [f"{bare:.2f} s", "5.70 s (7 samples)", "the limit", "-"]
    assert lines[2].split(" | ")[1:] == [
        f"{agent:.2f} s ÷ {bare:.2f} s = {agent / bare:.2f}×",  # noqa: RUF001
        "11.51 s → 2.02×", "≤ 1.3×", "met" if agent / bare <= 1.3 else "missed"]  # noqa: RUF001
    assert kvm, "the recorded run read QEMU's memory"
    assert lines[3].split(" | ")[1:] == [
        f"{statistics.median(kvm):.1f} MiB", "422 MiB", "≤ 120 MiB (see 3)",
        "met" if statistics.median(kvm) <= 120 else "missed"]
    assert "measured by make bench-guest + make bench" in lines[4]


def test_burst_bench_prints_its_row_from_recorded_samples(targets: ModuleType) -> None:
    burst = load_bench("burst")
    data = recorded("burst-results.json")
    raw: list[dict[str, object]] = data["runs"]  # type: ignore[assignment]
    runs = [burst.Run(**r) for r in raw]
    cpus: int = data["cpus"]  # type: ignore[assignment]
    lone = statistics.median(r.ready[0] for r in runs if r.kind == "burst" and r.pods == 1)
    bursts = [r for r in runs if r.kind == "burst" and r.pods > 1]
    lines = burst.issue18(runs, cpus)
    assert lines[0] == targets.HEADER
    assert len(lines) == 1 + len(bursts) > 1
    for run, line in zip(bursts, lines[1:], strict=True):
        ratio = run.ready[-1] / (-(-run.pods // cpus) * lone)
        assert line.split(" | ")[1] == (
            f"{run.label()}: {len(run.failures)}/{run.pods} failed, last ready "
            f"{run.ready[-1]:.1f} s = {ratio:.2f}× the ideal")  # noqa: RUF001
        assert line.endswith("met" if ratio <= 1 and not run.failures else "missed")


def test_a_burst_with_a_failed_pod_misses(targets: ModuleType) -> None:
    burst = load_bench("burst")
    runs = [burst.Run("burst", 1, True, ready=[10.0]),
            burst.Run("burst", 4, True, ready=[10.0, 10.0, 19.0], failures=["timeout"])]
    [_, line] = burst.issue18(runs, 2)
    assert line.split(" | ")[1:] == [
        "4 at once, slots on: 1/4 failed, last ready 19.0 s = 0.95× the ideal",  # noqa: RUF001
        "10/10 in 83–103 s = 1.09–1.36×", "≤ 1× (see 5)", "missed"]  # noqa: RUF001


def test_stdout_bench_prints_its_row_from_recorded_samples(targets: ModuleType) -> None:
    stdout_path = load_bench("stdout_path")
    data = recorded("stdout-path-results.json")
    samples: dict[str, list[float]] = data["samples"]  # type: ignore[assignment]
    mib: int = data["mib"]  # type: ignore[assignment]
    beyond = mib / statistics.median(samples["ctr run minus a true run"])
    stream = mib / statistics.median(samples["ctr run, first byte to EOF"])
    assert stdout_path.issue18(samples, mib) == [targets.HEADER, " | ".join([
        "64 MiB through stdout, whole `ctr run`",
        f"{beyond:.1f} MiB/s beyond a `true` run ({stream:.1f} MiB/s first byte to EOF)",
        "6.9 MiB/s", "relay never the bottleneck (see 4)", "-"])]


@pytest.mark.parametrize(("containerd", "grpc"), [("1.7.24", True), ("2.1.9", False)])
def test_cri_bench_prints_the_grpc_row_only_on_containerd_1(
        targets: ModuleType, containerd: str, grpc: bool) -> None:
    cri = load_bench("cri")
    # The README's running-pod daemon RSS on containerd 1.7.24 (make bench (c)): 33.8 MiB.
    lines = cri.issue_rows(containerd, 33.8)
    assert lines[0] == targets.HEADER
    rows = {line.split(" | ")[0]: line.split(" | ")[1:] for line in lines[1:]}
    assert set(rows) == {t.label for t in targets.TABLE} and len(lines) == 1 + len(rows)
    rss = rows[targets.BY_ID["daemon_rss_grpc"].label]
    if grpc:
        assert rss == [f"33.8 MiB (a running CRI pod, containerd {containerd})", "44.2 MiB",
                       "≤ 30 MiB", "missed"]
    else:
        assert rss[0] == "measured by make bench-daemon"
    assert all(row[0].startswith("measured by ") for label, row in rows.items()
               if label != targets.BY_ID["daemon_rss_grpc"].label)
