#!/usr/bin/env python3
"""`make bench-idle`: what an idle pod costs the host's CPU, process by process.

CRI pods through containerd 2.1.9 (podsandbox mode, networking on, the development profile on
the reference guest, QEMU TCG, 1 vCPU / 512 MiB), one per variant, all up at once and measured
in the same window, side by side: for ``--seconds`` (after ``--settle`` seconds, so the guest's
post-boot work is over), each process's CPU (utime + stime from /proc, per thread for QEMU),
and its wakeups (voluntary context switches); containerd and the node's own shim processes
besides. The guest's own view from an exec into each pod's container, read just before and just
after the window: interrupts and softirqs per second, processes forked per second (one read's
own cost, measured by two reads back to back, taken off).

Variants (``--variant NAME=WHAT``, repeatable; default: ``sleep-infinity`` and ``sleep-loop``):
WHAT is ``infinity`` (the container sleeps forever: ``sleep 2147483647``), ``loop`` (the
benchmarks' older sleeper: ``while :; do sleep 1; done``), optionally followed by ``:`` and
kernel parameters the pod adds to the guest's command line (kata's kernel_params annotation),
e.g. ``--variant tsc=infinity:tsc=reliable``. Leaves nothing running; raw samples in
``bench/idle-results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from cri import CriNode, cri_node

from shim.pod.profile import KERNEL_PARAMS_ANNOTATION
from tests.support.containerd import shim_daemons
from tests.support.cri import container_config, pod_config
from tests.support.images import BUSYBOX_REF

RESULTS = Path(__file__).resolve().parent / "idle-results.json"
COMMANDS = {
    "infinity": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 2147483647 & wait"],
    "loop": ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"],
}
GUEST_VIEW = "cat /proc/interrupts; echo @softirqs; cat /proc/softirqs; echo @stat; cat /proc/stat"
TICKS = 100.0  # USER_HZ: psutil's cpu_times come from /proc in these


@dataclass
class Variant:
    name: str
    command: str  # key of COMMANDS
    kernel_params: str = ""
    pod_id: str = ""
    container_id: str = ""


@dataclass
class Sample:
    """CPU seconds and voluntary context switches by process role (and QEMU thread)."""

    cpu: dict[str, float] = field(default_factory=dict)
    wakeups: dict[str, int] = field(default_factory=dict)


@dataclass
class Result:
    variant: str
    kernel_params: str
    seconds: float
    cpu_ms_per_s: dict[str, float]  # role -> CPU milliseconds per second (= per mille of a core)
    wakeups_per_s: dict[str, float]
    guest_per_s: dict[str, float]  # interrupt / softirq / "forks" -> per second


def parse_variant(text: str) -> Variant:
    name, _, what = text.partition("=")
    command, _, params = what.partition(":")
    if not name or command not in COMMANDS:
        raise SystemExit(f"--variant {text!r}: NAME=infinity|loop[:kernel params]")
    return Variant(name, command, params)


def start(node: CriNode, variant: Variant) -> None:
    annotations = {KERNEL_PARAMS_ANNOTATION: variant.kernel_params} if variant.kernel_params \
        else {}
    pod = pod_config(f"idle-{variant.name}", uuid.uuid4().hex, node.base,
                     annotations=annotations)
    variant.pod_id = node.client.run_pod(pod)
    variant.container_id = node.client.create_container(
        variant.pod_id, container_config("c", BUSYBOX_REF, COMMANDS[variant.command]), pod)
    node.client.start_container(variant.container_id)


def roles(node: CriNode, variants: list[Variant]) -> dict[str, list[psutil.Process]]:
    """The processes to measure, by role: ``<variant>/shim``, ``<variant>/qemu``,
    ``<variant>/vhost-device-vsock``, ``<variant>/<other child>``, ``containerd``."""
    found: dict[str, list[psutil.Process]] = defaultdict(list)
    found["containerd"].append(psutil.Process(node.containerd.process.pid))
    daemons = shim_daemons(node.base)
    for variant in variants:
        mine = [d for d in daemons if variant.pod_id in " ".join(d.cmdline())]
        if len(mine) != 1:
            raise RuntimeError(f"{variant.name}: {len(mine)} shim daemons for pod "
                               f"{variant.pod_id}")
        found[f"{variant.name}/shim"].append(mine[0])
        for child in mine[0].children(recursive=True):
            exe = Path(child.cmdline()[0]).name
            kind = "qemu" if exe.startswith("qemu-system") else exe
            found[f"{variant.name}/{kind}"].append(child)
    return found


def thread_name(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "?"


def thread_wakeups(pid: int, tid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def sample(found: dict[str, list[psutil.Process]]) -> Sample:
    out = Sample()
    for role, procs in found.items():
        for proc in procs:
            try:
                times = proc.cpu_times()
                out.cpu[role] = out.cpu.get(role, 0.0) + times.user + times.system
                if role.endswith("/qemu"):  # QEMU by thread: which one wakes
                    for thread in proc.threads():
                        key = f"{role}:{thread_name(proc.pid, thread.id)}"
                        out.cpu[key] = out.cpu.get(key, 0.0) + thread.user_time \
                            + thread.system_time
                        out.wakeups[key] = out.wakeups.get(key, 0) \
                            + thread_wakeups(proc.pid, thread.id)
                else:
                    out.wakeups[role] = out.wakeups.get(role, 0) \
                        + sum(thread_wakeups(proc.pid, t.id) for t in proc.threads())
            except psutil.NoSuchProcess:
                continue
    return out


def guest_counters(node: CriNode, variant: Variant) -> dict[str, int]:
    """The guest's interrupt and softirq counts (vCPU 0; summed over CPUs) and forks so far."""
    reply = node.client.exec_sync(variant.container_id, ["/bin/sh", "-c", GUEST_VIEW])
    counters: dict[str, int] = {}
    section = "irq"
    for line in reply.stdout.decode(errors="replace").splitlines():
        if line.startswith("@"):
            section = line[1:]
            continue
        words = line.split()
        if not words:
            continue
        if section == "stat":
            if words[0] == "processes":
                counters["forks"] = int(words[1])
            continue
        if not words[0].endswith(":"):
            continue
        numbers = [int(w) for w in words[1:] if w.isdigit()]
        if not numbers:
            continue
        label = words[0][:-1]
        if section == "irq":
            tail = " ".join(w for w in words[1:] if not w.isdigit())
            label = f"irq {label} {tail}".strip()[:48]
        else:
            label = f"softirq {label}"
        counters[label] = sum(numbers)
    return counters


def measure(node: CriNode, variants: list[Variant], seconds: float) -> list[Result]:
    found = roles(node, variants)
    # Two reads back to back: the second minus the first is one read's own cost in the guest
    # (the exec, its forks, the 9p lookups), taken off the window's counts.
    calibrate = {v.name: guest_counters(node, v) for v in variants}
    before_guest = {v.name: guest_counters(node, v) for v in variants}
    t0 = time.monotonic()
    first = sample(found)
    time.sleep(seconds)
    last = sample(found)
    elapsed = time.monotonic() - t0
    after_guest = {v.name: guest_counters(node, v) for v in variants}
    results = []
    for variant in variants:
        mine = [k for k in last.cpu if k.startswith(f"{variant.name}/") or k == "containerd"]
        cpu = {k: 1000 * (last.cpu[k] - first.cpu.get(k, 0.0)) / elapsed for k in mine}
        wakeups = {k: (last.wakeups[k] - first.wakeups.get(k, 0)) / elapsed
                   for k in last.wakeups if k in mine}
        c, b, a = calibrate[variant.name], before_guest[variant.name], after_guest[variant.name]
        counts = {k: a[k] - b.get(k, 0) - max(b.get(k, 0) - c.get(k, 0), 0) for k in a}
        guest = {k: max(n, 0) / elapsed for k, n in counts.items() if a[k] > b.get(k, 0)}
        results.append(Result(variant.name, variant.kernel_params, elapsed, cpu, wakeups,
                              guest))
    return results


def pod_total(result: Result) -> float:
    """The pod's own processes (shim daemon, QEMU, vhost-device-vsock, …), without containerd."""
    return sum(v for k, v in result.cpu_ms_per_s.items() if ":" not in k and k != "containerd")


def report(rounds: list[list[Result]]) -> None:
    by_variant: dict[str, list[Result]] = defaultdict(list)
    for results in rounds:
        for r in results:
            by_variant[r.variant].append(r)
    print(f"\nIdle pods, CPU per second of wall time over {rounds[0][0].seconds:.0f} s windows "
          f"(ms/s = per mille of one core), medians of {len(rounds)} round(s); "
          "wakeups = voluntary context switches per second")
    for name, results in by_variant.items():
        params = results[0].kernel_params
        print(f"\n{name}" + (f" (kernel params: {params})" if params else ""))

        def med(get: str, key: str, results: list[Result] = results) -> float:
            return float(statistics.median(getattr(r, get).get(key, 0.0) for r in results))

        keys = sorted({k for r in results for k in r.cpu_ms_per_s})
        total = statistics.median(pod_total(r) for r in results)
        print(f"  {'pod total (without containerd)':<44} {total:8.2f} ms/s")
        for key in keys:
            short = key.split("/", 1)[-1]
            indent = "    " if ":" in key else "  "
            print(f"{indent}{short:<{44 - len(indent) + 2}} {med('cpu_ms_per_s', key):8.2f} ms/s"
                  f"   {med('wakeups_per_s', key):8.1f} wakeups/s")
        guest_keys = sorted({k for r in results for k in r.guest_per_s},
                            key=lambda k: -med("guest_per_s", k))
        print("  guest, per second (one exec's own cost taken off):")
        for key in guest_keys[:12]:
            print(f"    {key:<46} {med('guest_per_s', key):8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containerd", default="2.1.9")
    parser.add_argument("--seconds", type=float, default=60.0, help="measuring window")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds between the last pod's start and the window")
    parser.add_argument("--rounds", type=int, default=1, help="windows, one after the other")
    parser.add_argument("--variant", action="append", type=parse_variant, default=[])
    parser.add_argument("--report", type=Path, help="print the tables of a results file again")
    args = parser.parse_args()
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        report([[Result(**r) for r in rnd] for rnd in saved["rounds"]])
        return 0
    variants = args.variant or [Variant("sleep-infinity", "infinity"),
                                Variant("sleep-loop", "loop")]
    if len({v.name for v in variants}) != len(variants):
        raise SystemExit("variant names must differ")
    rounds: list[list[Result]] = []
    with cri_node(args.containerd, subnet="198.18.203.0/24", prefix="coco-bidle-",
                  enable_annotations=(KERNEL_PARAMS_ANNOTATION,)) as node:
        try:
            for variant in variants:
                start(node, variant)
            time.sleep(args.settle)
            for n in range(args.rounds):
                rounds.append(measure(node, variants, args.seconds))
                print(f"  round {n + 1}: " + ", ".join(
                    f"{r.variant} {pod_total(r):.1f} ms/s" for r in rounds[-1]), flush=True)
        finally:
            for variant in variants:
                if variant.pod_id:
                    node.client.stop_pod(variant.pod_id)
                    node.client.remove_pod(variant.pod_id)
    RESULTS.write_text(json.dumps({"containerd": args.containerd,
                                   "rounds": [[asdict(r) for r in rnd] for rnd in rounds]},
                                  indent=1) + "\n")
    report(rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
