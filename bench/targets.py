"""Issue 18's table of figures as data: each row's baseline (verbatim from the issue), its
target, the rule deciding met/missed, and the bench that measures it; and the one helper every
bench prints these rows through (``label | now | baseline | target | met/missed``).

Imported by the bench scripts as ``targets`` (``python bench/x.py`` puts bench/ first on
sys.path)."""

from __future__ import annotations

# ruff: noqa: RUF001  (the issue's own multiplication signs and dashes, verbatim)
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One row of issue 18's table. ``met`` decides on the figure ``now`` in ``unit``; None
    where the issue sets no threshold of its own (a reference, or "see N" in its text)."""

    id: str
    label: str
    baseline: str
    target: str
    unit: str
    met: Callable[[float], bool] | None
    bench: str


def at_most(limit: float) -> Callable[[float], bool]:
    return lambda now: now <= limit


def at_least(limit: float) -> Callable[[float], bool]:
    return lambda now: now >= limit


TABLE: tuple[Target, ...] = (
    Target("bare_boot", "bare boot: the pod's QEMU argv, an /init that powers off",
           "5.70 s (7 samples)", "the limit", "s", None, "make bench-guest"),
    Target("direct_boot_ratio", "direct boot to agent Check ÷ bare boot",
           "11.51 s → 2.02×", "≤ 1.3×", "x", at_most(1.3), "make bench-guest"),
    Target("ctr_run_ratio", "`ctr run --rm … true` ÷ bare boot",
           "13.04 s → 2.29×", "≤ 1.4×", "x", at_most(1.4),
           "make bench-guest + make bench (its two factors; not side by side)"),
    Target("run_vs_direct", "`ctr run` ÷ direct boot to Check",
           "1.10–1.13×", "≤ 1.05×", "x", at_most(1.05), "make bench"),
    Target("start_ratio", "`start` ÷ runc shim's `start`",
           "76 ms vs 11.8 ms → 6.7×", "≤ 2.5×", "x", at_most(2.5), "make bench-daemon"),
    Target("first_rpc", "daemon's first RPC after `start`",
           "303 ms (runc 19 ms)", "≤ 100 ms", "ms", at_most(100), "make bench-daemon"),
    Target("daemon_pss", "shim daemon PSS per pod with 10 pods",
           "20.0 MiB (USS 19.2)", "≤ 12 MiB", "MiB", at_most(12), "make bench-daemon"),
    Target("daemon_rss_grpc", "shim daemon RSS on containerd 1.7 (gRPC)",
           "44.2 MiB", "≤ 30 MiB", "MiB", at_most(30), "make bench-daemon"),
    # "see 3": the part that exists on a KVM host must be <= 120 MiB.
    Target("qemu_kvm_host", "QEMU per idle busybox pod, 512 MiB guest, on a KVM host",
           "422 MiB", "≤ 120 MiB (see 3)", "MiB", at_most(120), "make bench-guest"),
    # "see 4": the relay alone >= 200 MB/s, so it is never the bottleneck.
    Target("relay", "stdout relay alone (loopback agent, real FIFOs)",
           "6.9 MiB/s (whole `ctr run`)", "≥ 200 MB/s (see 4)", "MB/s", at_least(200),
           "make bench-relay"),
    Target("stdout_whole", "64 MiB through stdout, whole `ctr run`",
           "6.9 MiB/s", "relay never the bottleneck (see 4)", "MiB/s", None, "make bench"),
    # "see 5": a burst bounded by the CPU-bound ideal (ratio <= 1).
    Target("burst", "pods started at once ÷ the CPU-bound ideal",
           "10/10 in 83–103 s = 1.09–1.36×", "≤ 1× (see 5)", "x", at_most(1.0),
           "make bench-burst"),
    Target("never_answered", "agent never answered at boot",
           "1 of 74 pods", "0", "failed", at_most(0), "bench/boot_loop.py"),
)

BY_ID = {t.id: t for t in TABLE}

HEADER = "issue 18 figure | now | issue baseline | target | met?"


def verdict(target: Target, now: float) -> str:
    """'met', 'missed', or '-' where the row has no threshold."""
    if target.met is None:
        return "-"
    return "met" if target.met(now) else "missed"


def figure(id: str, now: float, shown: str | None = None) -> str:
    """The row ``id`` with the figure ``now`` (in the row's unit): ``label | now | baseline |
    target | met/missed``. ``shown`` replaces the default rendering of ``now`` (e.g. to give
    both sides of a ratio)."""
    row = BY_ID[id]
    text = shown if shown is not None else (
        f"{now:.2f}×" if row.unit == "x" else
        f"{now:.2f} s" if row.unit == "s" else f"{now:.1f} {row.unit}")
    return f"{row.label} | {text} | {row.baseline} | {row.target} | {verdict(row, now)}"


def measured_elsewhere(id: str) -> str:
    """A row this bench does not measure: where it is."""
    row = BY_ID[id]
    return f"{row.label} | measured by {row.bench} | {row.baseline} | {row.target} | -"
