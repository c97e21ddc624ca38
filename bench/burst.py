#!/usr/bin/env python3
"""`make bench-burst`: many pods started at once through containerd's CRI plugin.

Per-pod ready times (RunPodSandbox + CreateContainer + StartContainer of a busybox sleeper,
what the kubelet waits for; handler `coco`, podsandbox mode, CNI bridge in 198.18.202.0/24)
for bursts of 1, 10 and 16 pods started at once (one thread per pod, released together), with
the node-wide boot slots on (the shipped default: one per host CPU) and off (`[runtime]
boot_slots = 0`), against 16 pods started one after the other. Each run's pods stay up until
the run ends, then are all removed before the next; the runs alternate slots on and off.

The CPU-bound ideal: a lone pod's start on an empty node (T1, the bursts of one) keeps one
CPU busy, so with C CPUs the k-th pod of a burst can be ready at best at ceil(k / C) x T1.
The bench's daemons use their own boot-slot directory (the node's is shared with every other
pod on the machine). `--boot-slots 2,1` runs each burst once per slot count; `--before TREE`
runs each on a second node whose daemons run another checkout's shim, the order alternating
(before/after in one run); `--trace DIR` keeps the shims' boot trace of each run.
Needs `make env`; leaves nothing running; raw samples in `bench/burst-results.json`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from cri import CriNode, cri_node, start_pod

from shim.core import paths, trace
from tests.support import targets
from tests.support.containerd import shim_daemons

RESULTS = Path(__file__).resolve().parent / "burst-results.json"
WAITED = re.compile(r"boot slot \d+ of \d+ after waiting ([0-9.]+) s")
PREPARED = re.compile(r"pre-boot work ([0-9.]+) s, then ([0-9.]+) s more for a boot slot")


@dataclass
class Run:
    kind: str  # "burst" | "sequential"
    pods: int
    slots: bool
    ready: list[float] = field(default_factory=list)  # seconds from the run's start, sorted
    own: list[float] = field(default_factory=list)  # each pod's own start duration
    failures: list[str] = field(default_factory=list)
    slot_waits: list[float] = field(default_factory=list)  # from the shims' log lines
    # Each boot's own work before its launch (profile to network wired), and how much longer
    # it then waited for a slot (the shims' log lines; the wait starts with the boot).
    pre_boot: list[float] = field(default_factory=list)
    slot_after: list[float] = field(default_factory=list)
    min_available_gib: float = 0.0
    removal_errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    slot_count: int | None = None  # the slots on: how many (None: one per host CPU)
    tree: str = ""  # with --before: "before" (that checkout's shim) or "now" (this one's)

    def ideal_last(self, ideal: float, cpus: int) -> float:
        """When the last pod of this burst is ready at best: ceil(pods / cpus) x T1."""
        return math.ceil(self.pods / cpus) * ideal

    def row(self, ideal: float, cpus: int) -> str:
        if not self.ready:
            return f"{self.label():<24} no pod ready   failures {len(self.failures)}"
        first, median, last = self.ready[0], statistics.median(self.ready), self.ready[-1]
        line = (f"{self.label():<24} {first:7.1f} {median:8.1f} {last:7.1f}   "
                f"{len(self.failures):2d}/{self.pods:<2d}")
        if self.kind == "burst" and ideal:
            ideal_median = math.ceil((self.pods + 1) / 2 / cpus) * ideal
            ideal_last = self.ideal_last(ideal, cpus)
            line += (f"   {ideal:5.1f} {ideal_median:6.1f} {ideal_last:6.1f}   "
                     f"{first / ideal:5.2f}x {median / ideal_median:5.2f}x "
                     f"{last / ideal_last:5.2f}x")
        if self.slot_waits:
            line += f"   waits ≤ {max(self.slot_waits):.1f} s ({len(self.slot_waits)} pods)"
        if self.pre_boot:
            line += (f"   pre-boot work {min(self.pre_boot):.1f}/"
                     f"{statistics.median(self.pre_boot):.1f}/{max(self.pre_boot):.1f} s")
        return line

    def label(self) -> str:
        mode = "slots off" if not self.slots else (
            "slots on" if self.slot_count is None else f"{self.slot_count} slots")
        tree = f", {self.tree}" if self.tree else ""
        return (f"{self.pods} {'in a row' if self.kind == 'sequential' else 'at once'}, "
                f"{mode}{tree}")


def set_slots(node: CriNode, base_text: str, on: bool, count: int | None = None) -> None:
    """Every pod's daemon reads the profile when its pod boots. ``count``: that many slots
    (None: the node's default, one per CPU)."""
    setting = 0 if not on else count
    node.profile.write_text(base_text if setting is None else base_text.replace(
        "[runtime]\n", f"[runtime]\nboot_slots = {setting}\n", 1))


def burst(node: CriNode, run: Run, tag: str) -> None:
    release = threading.Barrier(run.pods + 1)

    def one(i: int) -> float:
        release.wait()
        start_pod(node, f"{tag}-{i}")
        trace.mark(f"bench: pod {tag}-{i} ready")
        return time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(run.pods) as pool:
        futures = [pool.submit(one, i) for i in range(run.pods)]
        release.wait()
        t0 = time.monotonic()
        trace.mark(f"bench: burst of {run.pods} released")
        for future in concurrent.futures.as_completed(futures):
            try:
                run.ready.append(future.result() - t0)
            except Exception as err:  # reported in the table: a burst's failure is a figure
                run.failures.append(f"{type(err).__name__}: {err}"[:300])
    run.ready.sort()


def sequential(node: CriNode, run: Run, tag: str) -> None:
    t0 = time.monotonic()
    for i in range(run.pods):
        start = time.monotonic()
        try:
            start_pod(node, f"{tag}-{i}")
        except Exception as err:
            run.failures.append(f"{type(err).__name__}: {err}"[:300])
            continue
        now = time.monotonic()
        run.own.append(now - start)
        run.ready.append(now - t0)


def remove_all(node: CriNode) -> list[str]:
    """Every pod of the node, stopped and removed (in parallel); then no daemon is left. A
    removal that fails is tried once more, pod-level only (RemovePodSandbox removes what is
    left of its containers), and reported: the removal's errors, as text."""
    client = node.client

    def remove(pod_id: str) -> str:
        try:
            for container in client.list_containers(pod_id):
                client.stop_container(container.id, timeout=5)
                client.remove_container(container.id)
            client.stop_pod(pod_id)
            client.remove_pod(pod_id)
        except Exception as err:  # the bench goes on: the error is a figure
            first = f"pod {pod_id[:12]}: {type(err).__name__}: {err}"[:400]
            try:
                client.stop_pod(pod_id)
                client.remove_pod(pod_id)
            except Exception as again:
                return f"{first}; again: {type(again).__name__}: {again}"[:800]
            return f"{first} (removed on the second try)"
        return ""

    pods = [pod.id for pod in client.list_pods()]
    errors: list[str] = []
    if pods:
        with concurrent.futures.ThreadPoolExecutor(len(pods)) as pool:
            errors = [e for e in pool.map(remove, pods) if e]
    deadline = time.monotonic() + 60
    while shim_daemons(node.base) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = shim_daemons(node.base)
    if left:
        raise RuntimeError(f"shim daemons left after removing every pod: {left}; {errors}")
    return errors


def measure(node: CriNode, run: Run, tag: str) -> None:
    log = node.containerd.log_path
    offset = log.stat().st_size
    lowest = [psutil.virtual_memory().available]
    done = threading.Event()

    def watch_memory() -> None:
        while not done.wait(0.5):
            lowest[0] = min(lowest[0], psutil.virtual_memory().available)

    watcher = threading.Thread(target=watch_memory)
    watcher.start()
    started = time.monotonic()
    try:
        (burst if run.kind == "burst" else sequential)(node, run, tag)
    finally:
        run.wall = time.monotonic() - started
        done.set()
        watcher.join()
    run.min_available_gib = lowest[0] / 2**30
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    run.slot_waits = [float(m) for m in WAITED.findall(text)]
    prepared = PREPARED.findall(text)
    run.pre_boot = sorted(float(work) for work, _ in prepared)
    run.slot_after = sorted(float(more) for _, more in prepared)
    print(f"  {run.label()}: {len(run.ready)} ready, {len(run.failures)} failed, "
          f"wall {run.wall:.1f} s, lowest available memory {run.min_available_gib:.1f} GiB",
          flush=True)
    for failure in run.failures:
        print(f"    failed: {failure}", flush=True)
    run.removal_errors = remove_all(node)
    with log.open("rb") as f:  # what the shims said while their pods went
        f.seek(offset)
        errors = [line for line in f.read().decode(errors="replace").splitlines()
                  if "level=error" in line or "Traceback" in line]
    for error in [*run.removal_errors, *errors[-20:]] if run.removal_errors else []:
        print(f"    removal: {error[:600]}", flush=True)


def t1(runs: list[Run]) -> float:
    """A lone pod's start: the bursts of one (median), else the first of the sequential."""
    lone = [r.ready[0] for r in runs if r.kind == "burst" and r.pods == 1 and r.ready]
    if lone:
        return statistics.median(lone)
    own = [r.own[0] for r in runs if r.kind == "sequential" and r.own]
    return own[0] if own else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containerd", default="2.1.9")
    parser.add_argument("--bursts", default="1,10,16", help="burst sizes (comma separated)")
    parser.add_argument("--sequential", type=int, default=16, help="pods started in a row")
    parser.add_argument("--slots", choices=("both", "on", "off"), default="both",
                        help="the bursts with the node's boot slots on, off, or both")
    parser.add_argument("--boot-slots", default="", metavar="N[,M…]",
                        help="with the slots on: N of them (default: one per host CPU); "
                             "several counts: each burst once per count, side by side")
    parser.add_argument("--trace", type=Path, metavar="DIR",
                        help="the shims' boot trace ($COCO_SHIM_TRACE) of each run into "
                             "DIR/<run>.trace (one clock for every daemon)")
    parser.add_argument("--before", type=Path, metavar="TREE",
                        help="another checkout's shim on a second node: every run of the "
                             "plan once on each, the order alternating (before/after)")
    parser.add_argument("--report", type=Path, help="print the table of a results file again")
    args = parser.parse_args()
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        report([Run(**r) for r in saved["runs"]], saved["containerd"], saved["cpus"])
        return 0
    sizes = [int(n) for n in args.bursts.split(",") if n]
    cpus = os.cpu_count() or 1
    current: Path | None = None
    if args.trace is not None:  # containerd, and so every daemon it spawns, inherits it
        args.trace.mkdir(parents=True, exist_ok=True)
        current = args.trace / "current.trace"
        os.environ[trace.TRACE_ENV] = str(current)
    # The bench's own boot slots: the node's (/run/coco-shim/boot-slots) are shared with
    # every other pod of the machine, whose boots would hold them.
    slots_dir = Path(tempfile.mkdtemp(prefix="coco-bburst-slots-", dir="/tmp"))
    os.environ[paths.BOOT_SLOTS_ENV] = str(slots_dir)
    try:
        runs = bench(args, sizes, current)
    finally:
        shutil.rmtree(slots_dir, ignore_errors=True)
    RESULTS.write_text(json.dumps({"containerd": args.containerd, "cpus": cpus,
                                   "runs": [asdict(r) for r in runs]}, indent=1) + "\n")
    report(runs, args.containerd, cpus)
    return 1 if any(r.failures for r in runs) else 0


def bench(args: argparse.Namespace, sizes: list[int], current: Path | None) -> list[Run]:
    runs: list[Run] = []
    trees: dict[str, Path | None] = {"": None} if args.before is None else {
        "now": None, "before": args.before}
    with contextlib.ExitStack() as stack:
        nodes = {name: stack.enter_context(cri_node(
            args.containerd, subnet=f"198.18.{202 + i}.0/24", prefix="coco-bburst-", tree=tree))
            for i, (name, tree) in enumerate(trees.items())}
        base_text = next(iter(nodes.values())).profile.read_text()
        plan = [Run("sequential", args.sequential, True)] if args.sequential else []
        modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.slots]
        counts: list[int | None] = [int(n) for n in args.boot_slots.split(",") if n] or [None]
        for size in sizes:
            for on in modes:
                plan += [Run("burst", size, True, slot_count=c) for c in counts] if on else [
                    Run("burst", size, False)]
        n = 0
        for i, planned in enumerate(plan):
            order = list(trees) if i % 2 == 0 else list(reversed(trees))
            for name in order:
                run = Run(planned.kind, planned.pods, planned.slots,  # its own lists
                          slot_count=planned.slot_count, tree=name)
                node = nodes[name]
                set_slots(node, base_text, run.slots, run.slot_count)
                measure(node, run, f"b{n}")
                runs.append(run)
                if args.trace is not None and current is not None and current.exists():
                    current.rename(args.trace / f"b{n}-{run.label().replace(' ', '-')}.trace")
                n += 1
    return runs


def report(runs: list[Run], containerd: str, cpus: int) -> None:
    ideal = t1(runs)
    print(f"\nPods started through CRI (RunPodSandbox + CreateContainer + StartContainer), "
          f"containerd {containerd}, QEMU TCG, {cpus} CPUs; seconds from the run's start")
    if ideal:
        print(f"T1 (a lone pod on an empty node) = {ideal:.2f} s; ideal: the k-th pod of a "
              f"burst ready at ceil(k/{cpus}) x T1")
    for run in runs:
        if run.own:
            print(f"{run.label()}: each start {statistics.median(run.own):.2f} s median, "
                  f"{min(run.own):.2f}-{max(run.own):.2f} s (the earlier pods stay up)")
    print(f"{'run':<24} {'first':>7} {'median':>8} {'last':>7}   failed"
          f"   {'ideal first, median, last':>25}   {'÷ ideal (first, median, last)':>20}")
    for run in runs:
        print(run.row(ideal, cpus))
    print_figures(runs, ideal, cpus)


def print_figures(runs: list[Run], ideal: float, cpus: int) -> None:
    """Issue 18's figures for each burst of more than one pod with the slots on (the shipped
    default): pods failed, the last pod ÷ the ideal, the first pod ÷ a lone pod (T1)."""
    bursts = [r for r in runs if r.kind == "burst" and r.pods > 1 and r.slots]
    if not bursts:
        return
    print(f"\n{targets.HEADER}")
    for run in bursts:
        failed = len(run.failures)
        print(targets.line("burst_failed", failed, f"{failed}/{run.pods}", of=run.label()))
        if run.ready and ideal:
            last = run.ready[-1] / run.ideal_last(ideal, cpus)
            first = run.ready[0] / ideal
            print(targets.line("burst_last_ideal", last, f"{last:.2f}x", of=run.label()))
            print(targets.line("burst_first_lone", first, f"{first:.2f}x", of=run.label()))


if __name__ == "__main__":
    sys.exit(main())
