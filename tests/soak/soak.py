"""``make soak``: N create/start/exec/delete cycles of a pod through a real containerd, looking
for anything that grows.

    python -m tests.soak.soak [--cycles 200] [--containerd 2.1.9|1.7.24] [--csv FILE]

Driven with ``ctr`` (not CRI): ``ctr run -d`` is containerd's Create + Start of a pod's first
container — the same task API calls the CRI plugin makes for a pod, minus the CRI plugin's own
sandbox bookkeeping and CNI, which are containerd's code, not ours; each cycle still boots one
VM, wires the pod's netns (``--with-ns network:<netns>``: a veth that the shim mirrors to a tap),
runs an exec and deletes everything. One cycle:

1. ``ctr run -d --with-ns network:<netns> … sleep 600`` (shim start, VM boot, Create, Start);
2. ``ctr task exec … echo`` (exec, stdio), then the shim daemon's RSS is sampled;
3. ``ctr task rm -f`` and ``ctr container rm`` (Kill, Delete, Shutdown: VM power-off);
4. once the pod's shim daemon, QEMU and vhost-device-vsock have exited (bounded wait), the
   host-side counters are sampled: processes on the host and those of this run (containerd's
   and every process naming this run's directory), containerd's open fds, taps and ingress
   qdiscs in the pod netns, mounts under this run's directory, directories under the shim's run,
   socket and state roots and containerd's task state, and the shim daemon's RSS from step 2.

A leak is steady growth, not noise: after a warm-up (``max(2, N // 10)`` cycles), each series is
cut in thirds, and a counter leaks when every sample of the last third is above every sample of
the first third (by more than a tolerance for RSS). Counters of this run only are judged; the
host's process count is shown but not judged (other work on the machine moves it). After the last
cycle, anything of the run still there (process, mount, pod dir, tap) is a leak too. The last
line is ``soak: <N> cycles, <L> leaks``; exit status 1 on any leak or failed cycle.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests import envinfo
from tests.e2e.conftest import RUNTIME, shim_env
from tests.support.containerd import (
    Containerd,
    coco_processes,
    is_shim_template,
    private_containerd,
    shim_daemons,
)
from tests.support.guest import dev_profile_text
from tests.support.guest import guest_image as build_guest_image
from tests.support.images import BUSYBOX_REF, busybox_oci_archive
from tests.support.netns import VethPair, veth_pair

SETTLE_TIMEOUT = 30.0  # a deleted pod's shim, QEMU and helper exit within this
RSS_TOLERANCE_MIB = 2.0  # a fresh daemon per cycle: RSS differences below this are noise


def _is_template(pid: int) -> bool:
    try:
        return is_shim_template(Path(f"/proc/{pid}/cmdline").read_text().split("\0"))
    except OSError:
        return False


JUDGED = ("run_processes", "containerd_fds", "taps", "ingress_qdiscs", "mounts", "dirs",
          "shim_rss_mib")


@dataclass
class Sample:
    cycle: int
    seconds: float
    run_s: float  # ctr run -d: shim start, VM boot, Create, Start
    exec_s: float
    delete_s: float  # ctr task rm -f, ctr container rm
    settle_s: float  # until the pod's shim, QEMU and helper have exited
    boot_s: float  # of run_s, from the shim's log: boot start → agent answered (TCG boot)
    sandbox_s: float  # of run_s, from the shim's log: boot start → sandbox created
    host_processes: int
    run_processes: int
    containerd_fds: int
    taps: int
    ingress_qdiscs: int
    mounts: int
    dirs: int
    shim_rss_mib: float


@dataclass
class SoakRun:
    """A private containerd with the runtime registered, an image, and a pod netns."""

    cd: Containerd
    base: Path
    pair: VethPair
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    log_offset: int = 0
    boot_seconds: tuple[float, float] = (-1.0, -1.0)

    def ctr(self, *args: str, timeout: float = 240) -> str:
        return self.cd.ctr(*args, timeout=timeout).stdout.decode(errors="replace")

    # -- one cycle ----------------------------------------------------------------------------

    def cycle(self, index: int) -> Sample:
        cid = f"soak-{self.tag}-{index}"
        marks = [time.monotonic()]
        self.ctr("run", "-d", "--runtime", RUNTIME, "--with-ns",
                 f"network:{self.pair.pod_path}", BUSYBOX_REF, cid, "sleep", "600")
        marks.append(time.monotonic())
        try:
            out = self.ctr("task", "exec", "--exec-id", f"x{index}", cid, "echo", f"soak {index}")
            if out.strip() != f"soak {index}":
                raise AssertionError(f"cycle {index}: exec printed {out!r}")
            rss = self.shim_rss_mib()
        finally:
            marks.append(time.monotonic())
            self.cd.ctr("task", "rm", "-f", cid, check=False)
            self.cd.ctr("container", "rm", cid, check=False)
            marks.append(time.monotonic())
        self.settle()
        marks.append(time.monotonic())
        self.boot_seconds = self.logged_seconds(cid)
        run_s, exec_s, delete_s, settle_s = (round(b - a, 2) for a, b in itertools.pairwise(marks))
        return self.sample(index, marks[-1] - marks[0], (run_s, exec_s, delete_s, settle_s), rss)

    def logged_seconds(self, cid: str) -> tuple[float, float]:
        """What the shim logged of the pod's boot (containerd's log carries the shim's): seconds
        until the agent answered and until the sandbox was created (-1: not logged)."""
        found = {"agent answered": -1.0, "sandbox created": -1.0}
        with self.cd.log_path.open(errors="replace") as log:
            log.seek(self.log_offset)
            for line in log:
                for what in found:
                    if (match := re.search(rf"pod {re.escape(cid)}: {what} after ([0-9.]+) s",
                                           line)):
                        found[what] = float(match.group(1))
            self.log_offset = log.tell()
        return found["agent answered"], found["sandbox created"]

    def shim_rss_mib(self) -> float:
        daemons = shim_daemons(self.base / "run")
        if len(daemons) != 1:
            raise AssertionError(f"expected one shim daemon, found {len(daemons)}")
        return daemons[0].memory_info().rss / (1 << 20)

    def settle(self) -> None:
        """Wait (bounded) until only containerd is left of this run's processes."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while len(self.run_processes()) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)

    # -- counters -----------------------------------------------------------------------------

    def run_processes(self) -> list[int]:
        """containerd and this run's shim processes, but the node's template (one for the
        whole run, gone with containerd: the e2e fixture checks that)."""
        return sorted({pid for pid in coco_processes(self.base) if not _is_template(pid)}
                      | {self.cd.process.pid})

    def sample(self, index: int, seconds: float, phases: tuple[float, float, float, float],
               rss: float) -> Sample:
        links = self.pair.pod_links()
        return Sample(
            cycle=index, seconds=round(seconds, 2), run_s=phases[0], exec_s=phases[1],
            delete_s=phases[2], settle_s=phases[3], boot_s=self.boot_seconds[0],
            sandbox_s=self.boot_seconds[1], host_processes=len(psutil.pids()),
            run_processes=len(self.run_processes()),
            containerd_fds=len(os.listdir(f"/proc/{self.cd.process.pid}/fd")),
            taps=sum(name.startswith("tap") for name in links),
            ingress_qdiscs=len(self.pair.ingress_qdiscs()),
            mounts=self.mounts(), dirs=self.dirs(), shim_rss_mib=round(rss, 2))

    def mounts(self) -> int:
        marker = str(self.base)
        with open("/proc/self/mountinfo") as mountinfo:
            return sum(marker in line.split(" - ")[0] for line in mountinfo)

    def dirs(self) -> int:
        """Directories under the shim's run, socket and state roots and containerd's task
        state (bundles)."""
        roots = [self.base / "run", self.base / "s", self.base / "state",
                 self.cd.base / "state" / "io.containerd.runtime.v2.task"]
        return sum(len(dirnames) for root in roots if root.exists()
                   for _, dirnames, _ in os.walk(root))

    def leftovers(self) -> list[str]:
        """What is left of the run once all cycles are done (containerd still running)."""
        found = []
        extra = [pid for pid in self.run_processes() if pid != self.cd.process.pid]
        if extra:
            found.append(f"processes: {extra}")
        if (mounts := self.mounts()):
            found.append(f"{mounts} mounts under {self.base}")
        run = self.base / "run"
        if run.exists() and (pods := [p.name for p in run.iterdir()]):
            found.append(f"pod run dirs: {pods}")
        if (taps := [n for n in self.pair.pod_links() if n.startswith("tap")]):
            found.append(f"taps: {taps}")
        if (qdiscs := self.pair.ingress_qdiscs()):
            found.append(f"ingress qdiscs: {qdiscs}")
        return found


def growth(values: Sequence[float], tolerance: float = 0.0) -> bool:
    """Steady growth: every sample of the last third above every sample of the first third."""
    third = len(values) // 3
    if third == 0:
        return False
    return min(values[-third:]) > max(values[:third]) + tolerance


def leaks(samples: list[Sample], warmup: int) -> list[str]:
    judged = samples[warmup:]
    found = []
    for name in JUDGED:
        series = [float(getattr(s, name)) for s in judged]
        tolerance = RSS_TOLERANCE_MIB if name == "shim_rss_mib" else 0.0
        if growth(series, tolerance):
            third = len(series) // 3
            found.append(f"{name} grows: first third {series[:third]}, last {series[-third:]}")
    return found


def warmup_for(cycles: int) -> int:
    return max(2, cycles // 10)


@contextlib.contextmanager
def soak_run(version: str) -> Iterator[SoakRun]:
    """containerd ``version`` on private sockets, the runtime on its PATH, busybox imported, a
    pod netns; all removed afterwards (processes of the run killed if still there)."""
    env = envinfo.load()
    image = build_guest_image()
    base = Path(tempfile.mkdtemp(prefix="coco-soak-", dir="/tmp"))
    profile = base / "profile.toml"
    profile.write_text(dev_profile_text(env.kernel, image.image))
    extra_path = [Path(sys.executable).parent, env.vhost_device_vsock.parent]
    try:
        with veth_pair(subnet=147) as pair, \
                private_containerd(version, extra_path=extra_path, env=shim_env(base, profile),
                                   log_level="info") as cd:
            archive = busybox_oci_archive(base / "busybox.tar")
            cd.ctr("images", "import", "--platform", "linux/amd64", str(archive))
            yield SoakRun(cd, base, pair)
    finally:
        for pid in coco_processes(base):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        subprocess.run(["umount", "-R", "-l", str(base / "run")], capture_output=True,
                       check=False)
        kept = base / "state" / ".failed-boots"
        if kept.is_dir() and any(kept.iterdir()):  # a failed boot's console and QEMU logs
            saved = Path(tempfile.mkdtemp(prefix="coco-soak-failed-boots-", dir="/tmp"))
            shutil.copytree(kept, saved, dirs_exist_ok=True)
            print(f"soak: failed boots' console and QEMU logs kept in {saved}", flush=True)
        shutil.rmtree(base, ignore_errors=True)


def soak(run: SoakRun, cycles: int, samples: list[Sample],
         report: Callable[[Sample], None] = lambda sample: None) -> list[str]:
    """Run the cycles, appending each cycle's sample to ``samples`` as it ends (a failed cycle
    keeps those before it); returns the leaks found (growth and leftovers)."""
    for index in range(cycles):
        sample = run.cycle(index)
        samples.append(sample)
        report(sample)
    return leftover_leaks(run) + leaks(samples, warmup_for(cycles))


def leftover_leaks(run: SoakRun) -> list[str]:
    return [f"left after the last cycle: {item}" for item in run.leftovers()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--containerd", default="2.1.9", choices=["2.1.9", "1.7.24"])
    parser.add_argument("--csv", type=Path, help="write every sample here")
    args = parser.parse_args(argv)

    columns = list(Sample.__dataclass_fields__)
    print("soak: " + " ".join(columns), flush=True)

    def report(sample: Sample) -> None:
        print("soak: " + " ".join(str(getattr(sample, c)) for c in columns), flush=True)

    started = time.monotonic()
    failed = ""
    samples: list[Sample] = []
    found: list[str] = []
    with soak_run(args.containerd) as run:
        try:
            found = soak(run, args.cycles, samples, report)
        except (AssertionError, subprocess.TimeoutExpired) as err:  # a failed cycle
            failed = str(err)
            with contextlib.suppress(Exception):
                run.settle()  # what the failed cycle made must still go
            found = leftover_leaks(run)
    if args.csv:
        with args.csv.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(columns)
            writer.writerows([getattr(s, c) for c in columns] for s in samples)
    for leak in found:
        print(f"soak: LEAK {leak}")
    if failed:
        print(f"soak: cycle {len(samples)} FAILED: {failed}")
    if samples:
        seconds = [s.seconds for s in samples]
        print(f"soak: containerd {args.containerd}, {time.monotonic() - started:.0f}s in all, "
              f"cycle median {statistics.median(seconds):.1f}s (min {min(seconds):.1f}, "
              f"max {max(seconds):.1f}; of it ctr run "
              f"{statistics.median(s.run_s for s in samples):.1f}s, VM boot to agent "
              f"{statistics.median(s.boot_s for s in samples):.1f}s), "
              f"warm-up {warmup_for(args.cycles)} cycles")
    print(f"soak: {len(samples)} cycles, {len(found)} leaks")
    return 1 if found or failed or len(samples) < args.cycles else 0


if __name__ == "__main__":
    sys.exit(main())
