"""Issue 18's figures as data: each figure's baseline as the issue measured it, its target, and
whether a measured value meets it; and the one line every bench prints such a figure with.

    figure                                         now          baseline         target     verdict

The benches (`make bench`, `bench-guest`, `bench-cri`, `bench-daemon`, `bench-relay`,
`bench-stdout`, `bench-burst`, `bench/boot_loop.py`) print each figure they measure through
:func:`line`, so a figure, its baseline and its target are read side by side, and the README's
Performance table takes its rows from here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, NamedTuple


class Figure(NamedTuple):
    label: str
    baseline: str  # issue 18's, as measured before its work began
    target: str
    limit: float | None  # the target as a number in the unit the bench measures; None: no limit
    higher_is_better: bool  # ≥ limit meets it (throughput); else ≤ limit does
    bench: str  # the command that measures it (elsewhere() names it)


FIGURES: Final[dict[str, Figure]] = {
    "bare_boot": Figure(
        "bare boot: the pod's QEMU argv, /init powers off", "5.70 s", "the limit",
        None, False, "make bench-guest"),
    "boot_ratio": Figure(
        "direct boot to agent Check ÷ bare boot", "11.51 s: 2.02x", "≤ 1.3x",
        1.3, False, "make bench-guest"),
    "ctr_run_ratio_bare": Figure(
        "`ctr run --rm … true` ÷ bare boot", "13.04 s: 2.29x", "≤ 1.4x",
        1.4, False, "make bench"),
    "ctr_run_ratio": Figure(
        "`ctr run --rm … true` ÷ direct boot to Check", "1.10-1.13x", "≤ 1.05x",
        1.05, False, "make bench"),
    "start_ratio": Figure(
        "`start` ÷ containerd-shim-runc-v2 `start`", "76 vs 11.8 ms: 6.7x", "≤ 2.5x",
        2.5, False, "make bench-daemon"),
    "first_rpc_ms": Figure(
        "new daemon's first RPC after `start`", "303 ms (runc 19)", "≤ 100 ms",
        100.0, False, "make bench-daemon"),
    "daemon_pss_per_pod_mib": Figure(
        "shim daemon PSS per pod, 10 pods", "20.0 MiB (runc 5.6)", "≤ 12 MiB",
        12.0, False, "make bench-daemon"),
    "grpc_daemon_rss_mib": Figure(
        "shim daemon RSS on containerd 1.7 (gRPC)", "44.2 MiB", "≤ 30 MiB",
        30.0, False, "make bench-daemon / make bench"),
    "qemu_idle_kvm_host_mib": Figure(
        "QEMU, idle busybox pod, 512 MiB guest, on a KVM host", "422 MiB (PSS, all)",
        "≤ 120 MiB", 120.0, False, "make bench-guest"),
    "relay_mb_s": Figure(
        "one container's stdout through the relay alone", "(whole path 6.9 MiB/s)",
        "≥ 200 MB/s", 200.0, True, "make bench-relay"),
    "stdout_whole_mib_s": Figure(
        "64 MiB through stdout, whole `ctr run`", "6.9 MiB/s",
        "the relay never the bottleneck", None, True, "make bench / make bench-stdout"),
    "burst_failed": Figure(
        "pods of a burst that failed to start", "10 at once: 0/10", "0",
        0.0, False, "make bench-burst"),
    "burst_last_ideal": Figure(
        "a burst's last pod ÷ the CPU-bound ideal", "10 at once: 1.09-1.36x", "bounded by it",
        None, False, "make bench-burst"),
    "burst_first_lone": Figure(
        "a burst's first pod ÷ a lone pod's start", "10 at once: ≈ 100 s, all at the end",
        "close to a lone pod", None, False, "make bench-burst"),
    "boots_unanswered": Figure(
        "boots whose agent never answered", "1 of 74", "0",
        0.0, False, "python bench/boot_loop.py --boots 200"),
}


def verdict(key: str, value: float) -> str:
    """"met" or "missed" against the figure's limit; "" for a figure without one."""
    figure = FIGURES[key]
    if figure.limit is None:
        return ""
    if figure.higher_is_better:
        return "met" if value >= figure.limit else "missed"
    return "met" if value <= figure.limit else "missed"


HEADER: Final = "issue 18's figures: now, issue 18's baseline, target, verdict"


def line(key: str, value: float, shown: str, *, of: str = "") -> str:
    """The figure ``key`` as measured (``value`` in its target's unit, ``shown`` as printed),
    next to issue 18's baseline and target and the verdict; ``of`` names what was measured
    when a bench measures the figure for several (a series, a containerd line)."""
    figure = FIGURES[key]
    label = f"{figure.label} ({of})" if of else figure.label
    return (f"  {label:<56} {shown:<26} baseline {figure.baseline:<24} "
            f"target {figure.target:<10} {verdict(key, value)}").rstrip()


def elsewhere(printed: Iterable[str]) -> list[str]:
    """For a bench that printed the figures ``printed`` (keys), one line per other bench naming
    the figures only that bench measures, in FIGURES' order."""
    done = set(printed)
    unknown = done - FIGURES.keys()
    if unknown:
        raise KeyError(f"no such figures: {', '.join(sorted(unknown))}")
    by_bench: dict[str, list[str]] = {}
    for key, figure in FIGURES.items():
        if key not in done:
            by_bench.setdefault(figure.bench, []).append(figure.label)
    return [f"  (measured by {bench}: {'; '.join(labels)})" for bench, labels in by_bench.items()]
