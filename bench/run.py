#!/usr/bin/env python3
"""`make bench`: the shim's performance figures, medians of N runs, with the commands used.

(a) `ctr run --rm … true` through containerd + our shim, against the same VM (same kernel,
    initrd, QEMU options) booted directly by hypervisor/ up to the agent's Health.Check —
    the ratio is what the shim, containerd and the container add on top of the boot; every
    round also boots the same argv with a trivial initramfs whose /init powers off (the bare
    boot, `make bench-guest`'s limit), so `ctr run` ÷ bare is measured in the same rounds;
    With the shim's boot trace ($COCO_SHIM_TRACE, shim/core/trace.py) the runs of (a) are laid
    out step by step on the host's monotonic clock, beside the direct boot's own steps, and
    `ctr`'s container create/remove alone (snapshot prepare and mounts, no task) is timed;
    `--before TREE` runs (a) alone with another checkout's shim alternating with this one's;
(b) `containerd-shim-coco-v2 start` latency (the subcommand containerd runs per container);
(c) shim daemon RSS and PSS per running pod;
(d) stdout throughput: a container writing 64 MiB, read by `ctr run`.
With ``--initrd NAME=PATH`` (repeatable): (a) alone, for this checkout's guest image and each
NAME, interleaved in every round (a guest change's before/after in one run).
Results are printed as a table, then issue 18's figures beside the issue's baseline and target
(tests/support/targets.py), and written to bench/results.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from hypervisor.config import load_profile
from hypervisor.vm import LaunchOptions, QemuVm, launch_vm
from shim.core import trace
from shim.pod.agent import AgentClient
from shim.pod.rootfs import HostShare
from tests import envinfo
from tests.e2e.conftest import shim_env
from tests.support import targets
from tests.support.containerd import (
    Containerd,
    coco_processes,
    is_shim_daemon,
    private_containerd,
    shim_daemons,
)
from tests.support.guest import build_bare_initrd, dev_profile_text, guest_image
from tests.support.images import BUSYBOX_REF, busybox_oci_archive
from tests.support.templates import template_pids

RUNTIME = "io.containerd.coco.v2"


def median(values: list[float]) -> float:
    return statistics.median(values)


Steps = list[tuple[str, float]]  # (step, seconds since the sample began), in order


async def launch_pod_vm(profile_path: Path, run_root: Path, vhost: Path,
                        steps: Steps | None = None) -> tuple[QemuVm, float]:
    """Launch the profile's VM with the devices the shim gives a pod VM (the 9p rootfs share,
    console and stderr logs kept); the VM and the monotonic time its launch began. ``steps``
    gets the launch's steps, in seconds from then."""
    profile = load_profile(profile_path)
    share = run_root / "shared"
    share.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    def on_step(name: str) -> None:
        if steps is not None:
            steps.append((f"launch: {name}", time.monotonic() - start))

    vm = await launch_vm(profile, LaunchOptions(
        run_root=run_root, name="bench", accel="tcg", vhost_device_vsock=vhost,
        log_dir=run_root / "logs", shares=HostShare(share).vm_shares(), on_step=on_step))
    return vm, start


async def direct_boot(profile_path: Path, run_root: Path, vhost: Path,
                      steps: Steps | None = None) -> float:
    """Launch the pod VM (:func:`launch_pod_vm`) and dial its agent until Check answers;
    seconds. ``steps`` gets the launch's steps and Check."""
    vm, start = await launch_pod_vm(profile_path, run_root, vhost, steps)
    try:
        assert vm.channel is not None
        agent = await AgentClient.dial(vm.channel, dial_timeout=120)
        elapsed = time.monotonic() - start
        if steps is not None:
            steps.append(("agent: Check answered", elapsed))
        await agent.close()
        return elapsed
    finally:
        await vm.aclose()


async def bare_boot(profile_path: Path, run_root: Path, vhost: Path) -> float:
    """Launch the pod VM (:func:`launch_pod_vm`; its initrd the bare one: /init powers off);
    seconds until QEMU is gone."""
    vm, start = await launch_pod_vm(profile_path, run_root, vhost)
    try:
        async with asyncio.timeout(120):
            reason = await vm.wait()
        if not reason.clean:
            raise RuntimeError(f"the bare VM did not power off cleanly: {reason}")
        return time.monotonic() - start
    finally:
        await vm.aclose()


def traced_steps(trace_file: Path, since: float, until: float) -> Steps:
    """The shim's trace marks in [since, until] (one `ctr run`), as offsets from ``since``;
    a step seen more than once is numbered (``rpc: Wait received #2``). The guest agent's own
    marks (``guest@<seconds> <step>``, see :func:`guest_steps`) are left out."""
    seen: dict[str, int] = {}
    steps: Steps = []
    for stamp, _pid, step in trace.read(trace_file) if trace_file.exists() else []:
        if not since <= stamp <= until or trace.guest_step(step) is not None:
            continue
        seen[step] = seen.get(step, 0) + 1
        steps.append((step if seen[step] == 1 else f"{step} #{seen[step]}", stamp - since))
    return steps


def guest_steps(trace_file: Path, since: float, until: float) -> Steps:
    """The guest agent's timeline of one `ctr run` (guest/agent/timeline.py, relayed from its
    console into the shim's trace), on the guest's own clock, as offsets from its first Check
    answered (the host's `agent: Check answered` is that plus the answer's way back);
    repeated steps numbered."""
    seen: dict[str, int] = {}
    marks: list[tuple[float, str]] = []
    for stamp, _pid, step in trace.read(trace_file) if trace_file.exists() else []:
        got = trace.guest_step(step)
        if got is None or not since <= stamp <= until:
            continue
        seconds, name = got
        seen[name] = seen.get(name, 0) + 1
        marks.append((seconds, name if seen[name] == 1 else f"{name} #{seen[name]}"))
    check = next((seconds for seconds, name in marks if name == "Check answered"), None)
    if check is None:
        return []
    return [(f"guest: {name}", seconds - check) for seconds, name in marks]


def timeline(samples: list[Steps]) -> Steps:
    """Per step, the median of its offsets over the samples that have it; in time order."""
    offsets: dict[str, list[float]] = {}
    for sample in samples:
        for step, offset in sample:
            offsets.setdefault(step, []).append(offset)
    return sorted(((step, median(values)) for step, values in offsets.items()),
                  key=lambda item: item[1])


def gap(run: Steps, boot: Steps) -> list[tuple[str, float]]:
    """Where `ctr run` spends what the direct boot does not, from the two timelines:
    the host before the VM runs, the boot itself (cont → Check) beside the direct one's, the
    guest's answers after Check (each RPC's span, host slivers included) and what follows the
    container's exit (Delete, Shutdown, `delete`, containerd and `ctr` cleaning up)."""
    at, direct = dict(run), dict(boot)
    cont, check = "launch: QEMU running (cont)", "agent: Check answered"
    if not {cont, check, "agent: WaitProcess answered", "ctr: returned"} <= set(at):
        return []
    spans = [
        ("host: ctr start → QEMU running, beyond the direct boot's launch",
         at[cont] - direct[cont]),
        ("boot: QEMU running → Check, beyond the direct boot's", (at[check] - at[cont])
         - (direct[check] - direct[cont])),
        ("guest: CreateSandbox", at["agent: CreateSandbox answered"] - at[check]),
        ("guest: CreateContainer", at["agent: CreateContainer answered"]
         - at["agent: CreateSandbox answered"]),
        ("host: Create answered → Start received", at["rpc: Start received"]
         - at["agent: CreateContainer answered"]),
        ("guest: StartContainer", at["agent: StartContainer answered"]
         - at["rpc: Start received"]),
        ("guest: the container runs `true`, WaitProcess answers",
         at["agent: WaitProcess answered"] - at["agent: StartContainer answered"]),
        ("host: exit → ctr returned (Delete, Shutdown, delete, snapshot removal)",
         at["ctr: returned"] - at["agent: WaitProcess answered"]),
    ]
    return spans


def print_gap(runs: list[Steps], boots: list[Steps]) -> None:
    """:func:`gap` for each round (a `ctr run` and the direct boot of the same round), then the
    median of each span over the rounds."""
    rounds = [(spans, dict(run)["ctr: returned"] - dict(boot)["agent: Check answered"])
              for run, boot in zip(runs, boots, strict=False) if (spans := gap(run, boot))]
    if not rounds:
        return
    print(f"\n(a) where ctr run's {median([total for _, total in rounds]):.3f} s beyond the "
          f"direct boot go (medians over {len(rounds)} rounds)")
    for i, (label, _) in enumerate(rounds[0][0]):
        print(f"  {median([spans[i][1] for spans, _ in rounds]):7.3f} s  {label}")


def print_guest_timeline(name: str, samples: list[Steps]) -> None:
    """The guest agent's own timeline after Check, medians over the rounds that have it (a
    tree whose agent has no ``--trace`` has none)."""
    have = [sample for sample in samples if sample]
    if have:
        print_timeline(f"(a) ctr run --rm true, {name}: the guest agent's timeline on its own "
                       f"clock, s from its Check answered (medians of {len(have)})",
                       timeline(have))


def print_timeline(title: str, steps: Steps) -> None:
    print(f"\n{title}\n  {'s from start':>12} {'+ s':>7}  step")
    previous = 0.0
    for step, offset in steps:
        print(f"  {offset:12.3f} {offset - previous:7.3f}  {step}")
        previous = offset


def settle(cd: Containerd, base: Path, timeout: float = 60) -> None:
    """Wait until the previous sample's pod is fully gone: the shim tears a pod down after
    `ctr run --rm` returns, and a QEMU still stopping would slow the next sample down. The
    node's shim template (it forks the daemons; it lives as long as containerd) stays."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        keep = {cd.process.pid, *template_pids(base / "templates")}
        if not [pid for pid in coco_processes(base) if pid not in keep]:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the previous sample's pod did not go away in {timeout:g} s")


def template_containerds(base: Path) -> set[int]:
    """The containerd pids the templates under ``base`` serve (a template's last argument)."""
    served = set()
    for pid in template_pids(base / "templates"):
        with contextlib.suppress(OSError, ValueError):
            served.add(int(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2]))
    return served


def pod_memory(cd: Containerd, base: Path) -> dict[str, Any]:
    """RSS and PSS of the shim daemon of one running pod (`sleep`), its transport, and whether
    a node template was running when the pod started (its daemon then was forked from it)."""
    settle(cd, base)
    template = cd.process.pid in template_containerds(base)
    cd.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX_REF, "mem", "sleep", "600")
    try:
        time.sleep(2)
        daemons = shim_daemons(base)
        assert len(daemons) == 1, daemons
        info = daemons[0].memory_full_info()
        argv = daemons[0].cmdline()
        protocol = argv[argv.index("-protocol") + 1] if "-protocol" in argv else "grpc"
        return {"rss_mib": info.rss / 2**20, "pss_mib": info.pss / 2**20,
                "protocol": protocol, "template": template}
    finally:
        cd.ctr("task", "kill", "-s", "SIGKILL", "mem", check=False)
        time.sleep(1)
        cd.ctr("task", "rm", "-f", "mem", check=False)
        cd.ctr("container", "rm", "mem", check=False)


def ctr_run(cd: Containerd, name: str, *command: str, steps: Steps | None = None,
            trace_file: Path | None = None, base: Path | None = None,
            guest: Steps | None = None) -> float:
    """One `ctr run --rm`; seconds until it returned. With ``steps``, the shim's trace marks
    of this run (until its pod is fully gone: the teardown may outlast `ctr`) go there, and
    ``ctr: returned`` among them; ``guest`` gets the guest agent's own timeline."""
    start = time.monotonic()
    cd.ctr("run", "--rm", "--runtime", RUNTIME, BUSYBOX_REF, name, *command, timeout=300)
    elapsed = time.monotonic() - start
    if steps is not None and trace_file is not None and base is not None:
        settle(cd, base)
        until = time.monotonic()
        steps.extend(traced_steps(trace_file, start, until))
        steps.append(("ctr: returned", elapsed))
        if guest is not None:
            guest.extend(guest_steps(trace_file, start, until))
    return elapsed


def ctr_container_only(cd: Containerd, runs: int) -> dict[str, list[float]]:
    """What `ctr` and containerd do around the task, alone: `ctr container create` (snapshot
    prepare and mounts, the container record) and `ctr container rm` (snapshot removal)."""
    create, remove = [], []
    for i in range(runs):
        t0 = time.monotonic()
        cd.ctr("container", "create", "--runtime", RUNTIME, BUSYBOX_REF, f"bare-{i}", "true")
        t1 = time.monotonic()
        cd.ctr("container", "rm", f"bare-{i}")
        create.append(t1 - t0)
        remove.append(time.monotonic() - t1)
    return {"ctr_container_create_s": create, "ctr_container_rm_s": remove}


def shim_containerd(version: str, base: Path, profile: Path, env: envinfo.TestEnv,
                    tree: Path | None = None) -> contextlib.AbstractContextManager[Containerd]:
    """A private containerd whose shims run this checkout (or ``tree``) and trace their steps
    into ``base``/trace."""
    shim_vars = {**shim_env(base, profile), trace.TRACE_ENV: str(base / "trace")}
    if tree is not None:
        shim_vars["PYTHONPATH"] = str(tree.resolve())
    return private_containerd(version, env=shim_vars, log_level="info",
                              extra_path=[Path(sys.executable).parent,
                                          env.vhost_device_vsock.parent])


def start_latency(base: Path, runs: int) -> list[float]:
    """Time `containerd-shim-coco-v2 start` against a bundle whose shim already runs (the
    grouping path containerd takes for every later container of a pod is the same process
    start-up + bootstrap print), and a cold one that spawns a daemon."""
    binary = Path(sys.executable).parent / "containerd-shim-coco-v2"
    samples = []
    for i in range(runs):
        bundle = base / f"bundle-{i}"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps({"annotations": {}}))
        env = {**os.environ, "COCO_SHIM_SOCKET_DIR": str(base / "s"),
               "COCO_SHIM_STATE_DIR": str(base / "state"), "COCO_SHIM_RUN_DIR": str(base / "r"),
               "TTRPC_ADDRESS": str(base / "none.ttrpc")}
        t0 = time.monotonic()
        out = subprocess.run([str(binary), "-namespace", "bench", "-address",
                              str(base / "none.sock"), "-id", f"b{i}", "start"],
                             cwd=bundle, env=env, capture_output=True, text=True, timeout=30,
                             input="")
        samples.append(time.monotonic() - t0)
        if out.returncode != 0:
            raise RuntimeError(f"start failed: {out.stdout} {out.stderr}")
        # Stop the daemon it spawned.
        subprocess.run([str(binary), "-namespace", "bench", "-address", str(base / "none.sock"),
                        "-id", f"b{i}", "-bundle", str(bundle), "delete"], env=env,
                       capture_output=True, timeout=30, check=False)
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if is_shim_daemon(cmd) and f"b{i}" in cmd:
                proc.kill()
    return samples


def memory_only(env: envinfo.TestEnv, first: str, runs: int, before: Path | None,
                out: Path) -> int:
    """(c) alone: one running pod's shim daemon on each containerd line, ``runs`` samples each;
    with ``before``, that checkout's daemon alternates with this one's in the same run."""
    base = Path(tempfile.mkdtemp(prefix="coco-bench-", dir="/tmp"))
    trees: dict[str, dict[str, str]] = {"now": {}}
    if before is not None:
        trees["before"] = {"PYTHONPATH": str(before.resolve())}
    versions = [first, "1.7.24" if first.startswith("2.") else "2.1.9"]
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {
        v: {t: [] for t in trees} for v in versions}
    try:
        image = guest_image()
        profile = base / "profile.toml"
        profile.write_text(dev_profile_text(env.kernel, image.image))
        busybox = busybox_oci_archive(base / "busybox.tar")
        for i in range(runs):
            for version in versions:
                order = list(trees) if i % 2 == 0 else list(reversed(trees))
                for tree in order:
                    with private_containerd(version, env={**shim_env(base, profile),
                                                          **trees[tree]},
                                            log_level="info",
                                            extra_path=[Path(sys.executable).parent,
                                                        env.vhost_device_vsock.parent]) as cd:
                        cd.ctr("images", "import", "--platform", "linux/amd64", str(busybox))
                        samples[version][tree].append(pod_memory(cd, base))
    finally:
        subprocess.run(["umount", "-R", "-l", str(base / "run")], capture_output=True,
                       check=False)
        shutil.rmtree(base, ignore_errors=True)
    out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                               "before": str(before) if before else None,
                               "daemon_memory": samples}, indent=2))
    print(f"\n(c) shim daemon of one running pod, medians of {runs}, alternating")
    for version in versions:
        for tree, got in samples[version].items():
            print(f"  {version:<8} {tree:<7} ({got[0]['protocol']:<5}) RSS "
                  f"{median([m['rss_mib'] for m in got]):5.1f} MiB  PSS "
                  f"{median([m['pss_mib'] for m in got]):5.1f} MiB")
    print(f"\nraw samples: {out}")
    return 0


def boot_before(env: envinfo.TestEnv, version: str, runs: int, before: Path,
                out: Path) -> int:
    """(a) alone, before/after in one run: per round a direct boot, then `ctr run --rm true`
    through this checkout's shim and through ``before``'s (the order alternating), each on its
    own private containerd; both laid out step by step. Each side boots its own tree's guest
    image (``before``'s built by its own builder); when the two differ, each round boots both
    directly too (``direct-before``) and each side's ratio is against its own image's boot."""
    base = Path(tempfile.mkdtemp(prefix="coco-bench-", dir="/tmp"))
    trees: dict[str, Path | None] = {"now": None, "before": before}
    samples: dict[str, list[float]] = {"direct": [], "direct-before": [], "now": [],
                                       "before": []}
    steps: dict[str, list[Steps]] = {"direct": [], "direct-before": [], "now": [],
                                     "before": []}
    guest: dict[str, list[Steps]] = {"now": [], "before": []}
    try:
        images = {"now": guest_image().image, "before": tree_guest_image(before)}
        print(f"guest images: now {images['now']}, before {images['before']}", flush=True)
        profiles = {name: base / f"profile-{name}.toml" for name in trees}
        for name in trees:
            profiles[name].write_text(dev_profile_text(env.kernel, images[name]))
        directs = {"direct": profiles["now"]}
        if images["before"] != images["now"]:
            directs["direct-before"] = profiles["before"]
        busybox = busybox_oci_archive(base / "busybox.tar")
        with contextlib.ExitStack() as stack:
            bases = {name: base / name for name in trees}
            cds = {}
            for name, tree in trees.items():
                bases[name].mkdir()
                cds[name] = stack.enter_context(
                    shim_containerd(version, bases[name], profiles[name], env, tree))
                cds[name].ctr("images", "import", "--platform", "linux/amd64", str(busybox))
            for i in range(runs):
                for name in trees:
                    settle(cds[name], bases[name])
                for direct, profile in (directs.items() if i % 2 == 0
                                        else reversed(directs.items())):
                    steps[direct].append([])
                    samples[direct].append(asyncio.run(direct_boot(
                        profile, base / "direct", env.vhost_device_vsock, steps[direct][-1])))
                for name in (list(trees) if i % 2 == 0 else list(reversed(trees))):
                    settle(cds[name], bases[name])
                    steps[name].append([])
                    guest[name].append([])
                    samples[name].append(ctr_run(cds[name], f"true-{i}", "true",
                                                 steps=steps[name][-1],
                                                 trace_file=bases[name] / "trace",
                                                 base=bases[name], guest=guest[name][-1]))
    finally:
        subprocess.run(["umount", "-R", "-l", *(str(base / n / "run") for n in trees)],
                       capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
    out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                               "before": str(before), "samples_s": samples, "steps": steps,
                               "guest_steps": guest},
                              indent=2))
    print_timeline(f"(a) the direct boot, step by step (medians of {runs})",
                   timeline(steps["direct"]))
    for name in trees:
        print_timeline(f"(a) ctr run --rm true, {name} ({trees[name] or 'this tree'}), step "
                       f"by step (medians of {runs})", timeline(steps[name]))
    for name in trees:
        print_guest_timeline(f"{name} ({trees[name] or 'this tree'})", guest[name])
    for name in trees:
        print(f"\n{name}:", end="")
        print_gap(steps[name], steps["direct-before" if name == "before" and
                                     "direct-before" in directs else "direct"])
    print(f"\n(a) before/after, {runs} rounds, containerd {version}, interleaved")
    for direct in directs:
        print(f"  {'direct boot to Check' + (', before image' if direct != 'direct' else ''):<34}"
              f" {median(samples[direct]):6.2f} s  "
              f"({' '.join(f'{v:.2f}' for v in samples[direct])})")
    for name in trees:
        got = median(samples[name])
        boot = median(samples["direct-before" if name == "before" and
                              "direct-before" in directs else "direct"])
        print(f"  {'ctr run --rm true, ' + name:<34} {got:6.2f} s  ratio {got / boot:.2f}x  "
              f"({' '.join(f'{v:.2f}' for v in samples[name])})")
    print(f"\nraw samples: {out}")
    return 0


def tree_guest_image(tree: Path) -> Path:
    """Another checkout's guest image (initramfs form), built (or found in the cache) by that
    tree's own builder."""
    done = subprocess.run(
        [sys.executable, "-c", "from tests.support.guest import guest_image; "
         "print(guest_image().image)"],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree.resolve())},
        capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building {tree}'s guest image failed: {done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def qemu_initrds(seen: set[str], stop: threading.Event) -> None:
    """The ``-initrd`` of every QEMU seen until ``stop`` (which image a pod booted)."""
    while not stop.wait(0.05):
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "-initrd" in cmd[:-1] and "qemu" in (proc.info["name"] or ""):
                seen.add(cmd[cmd.index("-initrd") + 1])


def boot_ab(env: envinfo.TestEnv, version: str, runs: int, initrds: list[str],
            out: Path) -> int:
    """(a) alone for several guest images, interleaved in the same run: every round boots
    each image directly to Check and runs ``ctr run --rm … true`` on it (the shim reads the
    profile, rewritten to point at the image, per pod; the pod's QEMU is checked to have
    booted that image)."""
    base = Path(tempfile.mkdtemp(prefix="coco-bench-", dir="/tmp"))
    images = {"this": guest_image().image}
    for item in initrds:
        name, _, given = item.partition("=")
        images[name] = Path(given).resolve()
    samples: dict[str, dict[str, list[float]]] = {n: {"boot": [], "run": []} for n in images}
    profile = base / "profile.toml"
    try:
        profile.write_text(dev_profile_text(env.kernel, images["this"]))
        with private_containerd(version, env=shim_env(base, profile), log_level="info",
                                extra_path=[Path(sys.executable).parent,
                                            env.vhost_device_vsock.parent]) as cd:
            cd.ctr("images", "import", "--platform", "linux/amd64",
                   str(busybox_oci_archive(base / "busybox.tar")))
            for i in range(runs):
                order = list(images) if i % 2 == 0 else list(reversed(images))
                for name in order:
                    path = images[name]
                    variant = base / f"profile-{name}.toml"
                    variant.write_text(dev_profile_text(env.kernel, path))
                    profile.write_text(variant.read_text())
                    settle(cd, base)
                    boot = asyncio.run(direct_boot(variant, base / "direct",
                                                   env.vhost_device_vsock))
                    settle(cd, base)
                    seen: set[str] = set()
                    stop = threading.Event()
                    watcher = threading.Thread(target=qemu_initrds, args=(seen, stop))
                    watcher.start()
                    try:
                        run = ctr_run(cd, f"ab-{name}-{i}", "true")
                    finally:
                        stop.set()
                        watcher.join()
                    if seen and seen != {str(path)}:
                        raise RuntimeError(f"the pod for {name} booted {seen}, not {path}")
                    samples[name]["boot"].append(boot)
                    samples[name]["run"].append(run)
                    print(f"round {i + 1} {name}: boot {boot:.2f} s, ctr run {run:.2f} s "
                          f"({run / boot:.2f}x)", flush=True)
    finally:
        subprocess.run(["umount", "-R", "-l", str(base / "run")], capture_output=True,
                       check=False)
        shutil.rmtree(base, ignore_errors=True)
    out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                               "containerd": version,
                               "images": {n: str(p) for n, p in images.items()},
                               "samples": samples}, indent=2))
    print(f"\n(a) {runs} rounds, containerd {version}, QEMU TCG, images interleaved (medians)")
    print(f"  {'image':<10} {'direct boot to Check':>21} {'ctr run --rm true':>18} {'ratio':>7}"
          f" {'ratio of medians':>17}")
    for name, got in samples.items():
        ratios = [r / b for r, b in zip(got["run"], got["boot"], strict=True)]
        print(f"  {name:<10} {median(got['boot']):>19.2f} s {median(got['run']):>16.2f} s "
              f"{median(ratios):>6.2f}x {median(got['run']) / median(got['boot']):>16.2f}x")
    print(f"  target: ctr run / direct boot <= 1.05x\n\nraw samples: {out}")
    return 0


def how(memory: dict[str, Any]) -> str:
    """How a measured daemon came to be (pod_memory's ``template``)."""
    return "forked from the node's template" if memory["template"] else \
        "spawned directly: no template yet"


def issue18(*, boot: float, run: float, bare: float, flood: float,
            memory: list[dict[str, Any]]) -> list[str]:
    """Issue 18's figures from (a)'s medians (direct boot, ``ctr run``, bare boot, the 64 MiB
    stdout run) and (c)'s daemons (the gRPC ones: containerd 1.x; a containerd's first pod
    spawns its daemon, later ones are forked from the node's template), then the benches
    that measure the others."""
    mib_s = 64 / max(flood - run, 0.001)
    lines = [targets.HEADER,
             targets.line("ctr_run_ratio", run / boot, f"{run / boot:.2f}x"),
             targets.line("ctr_run_ratio_bare", run / bare, f"{run / bare:.2f}x"),
             targets.line("boot_ratio", boot / bare, f"{boot / bare:.2f}x")]
    printed = ["ctr_run_ratio", "ctr_run_ratio_bare", "boot_ratio", "stdout_whole_mib_s"]
    for m in memory:
        if m["protocol"] != "ttrpc":
            lines.append(targets.line("grpc_daemon_rss_mib", m["rss_mib"],
                                      f"{m['rss_mib']:.1f} MiB", of=how(m)))
            printed.append("grpc_daemon_rss_mib")
    lines.append(targets.line("stdout_whole_mib_s", mib_s,
                              f"{mib_s:.1f} MiB/s beyond a true run"))
    return lines + targets.elsewhere(printed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--containerd", default="2.1.9")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--memory-only", action="store_true",
                        help="only (c), on both containerd lines")
    parser.add_argument("--before", type=Path, default=None, metavar="TREE",
                        help="another checkout of the shim (PYTHONPATH=TREE for the shim "
                        "containerd runs), alternating with this one: (a) alone, or with "
                        "--memory-only (c) alone")
    parser.add_argument("--initrd", action="append", default=[], metavar="NAME=PATH",
                        help="only (a), for this checkout's guest image and each of these, "
                        "interleaved in every round (before/after of a guest change)")
    args = parser.parse_args()
    env = envinfo.load()
    if args.memory_only:
        return memory_only(env, args.containerd, args.runs, args.before, args.out)
    if args.initrd:
        return boot_ab(env, args.containerd, args.runs, args.initrd, args.out)
    if args.before:
        return boot_before(env, args.containerd, args.runs, args.before, args.out)
    base = Path(tempfile.mkdtemp(prefix="coco-bench-", dir="/tmp"))
    results: dict[str, object] = {"runs": args.runs, "containerd": args.containerd,
                                  "command": " ".join([sys.executable, *sys.argv])}
    try:
        image = guest_image()
        profile = base / "profile.toml"
        profile.write_text(dev_profile_text(env.kernel, image.image))
        (base / "bare").mkdir()
        bare_profile = base / "bare.toml"
        bare_profile.write_text(dev_profile_text(env.kernel, build_bare_initrd(base / "bare")))

        shim_vars = shim_env(base, profile)
        with shim_containerd(args.containerd, base, profile, env) as cd:
            cd.ctr("images", "import", "--platform", "linux/amd64",
                   str(busybox_oci_archive(base / "busybox.tar")))
            # (a) interleaved, so that both series see the same machine (its speed drifts by
            # several percent over minutes under TCG): boot, run, boot, run, ...
            bares: list[float] = []
            boots: list[float] = []
            runs: list[float] = []
            boot_steps: list[Steps] = []
            run_steps: list[Steps] = []
            guest_run_steps: list[Steps] = []
            for i in range(args.runs):
                settle(cd, base)
                bares.append(asyncio.run(bare_boot(bare_profile, base / "bare-run",
                                                   env.vhost_device_vsock)))
                boot_steps.append([])
                boots.append(asyncio.run(direct_boot(profile, base / "direct",
                                                     env.vhost_device_vsock, boot_steps[-1])))
                settle(cd, base)
                run_steps.append([])
                guest_run_steps.append([])
                runs.append(ctr_run(cd, f"true-{i}", "true", steps=run_steps[-1],
                                    trace_file=base / "trace", base=base,
                                    guest=guest_run_steps[-1]))
            results["bare_boot_s"] = bares
            results["direct_boot_to_check_s"] = boots
            results["ctr_run_true_s"] = runs
            results["direct_boot_steps"] = boot_steps
            results["ctr_run_steps"] = run_steps
            results["ctr_run_guest_steps"] = guest_run_steps
            results.update(ctr_container_only(cd, args.runs))

            # (c) memory of one running pod's shim daemon
            memory = {args.containerd: pod_memory(cd, base)}

            # (d) 64 MiB through stdout
            size = 64 << 20
            throughput = []
            for i in range(args.runs):
                settle(cd, base)
                t0 = time.monotonic()
                out = cd.ctr("run", "--rm", "--runtime", RUNTIME, BUSYBOX_REF, f"flood-{i}",
                             "sh", "-c", f"head -c {size} /dev/zero", timeout=600)
                elapsed = time.monotonic() - t0
                assert len(out.stdout) == size, len(out.stdout)
                throughput.append(elapsed)
            results["stdout_64mib_run_s"] = throughput

        # (c) again on the other containerd line, whose default transport differs
        other = "1.7.24" if args.containerd.startswith("2.") else "2.1.9"
        with private_containerd(other, env=shim_vars, log_level="info",
                                extra_path=[Path(sys.executable).parent,
                                            env.vhost_device_vsock.parent]) as cd:
            cd.ctr("images", "import", "--platform", "linux/amd64", str(base / "busybox.tar"))
            # this containerd's first pod: `start` spawns its daemon and launches the template
            first_pod = pod_memory(cd, base)
            memory[other] = pod_memory(cd, base)  # the next, as every later one: forked
        results["daemon_memory_first_pod"] = {other: first_pod}
        results["daemon_memory"] = memory

        (base / "start").mkdir()
        results["start_latency_s"] = start_latency(base / "start", args.runs * 2)
    finally:
        subprocess.run(["umount", "-R", "-l", str(base / "run")], capture_output=True,
                       check=False)
        shutil.rmtree(base, ignore_errors=True)

    print_timeline(f"(a) the direct boot, step by step (medians of {args.runs})",
                   timeline(boot_steps))
    print_timeline(f"(a) ctr run --rm true, step by step on the shim's trace (medians of "
                   f"{args.runs}; s from ctr's start)", timeline(run_steps))
    print_guest_timeline("this tree", guest_run_steps)
    print_gap(run_steps, boot_steps)
    print(f"  ctr container create alone (snapshot prepare, mounts): "
          f"{median(results['ctr_container_create_s']):.3f} s; "  # type: ignore[arg-type]
          f"ctr container rm alone: {median(results['ctr_container_rm_s']):.3f} s")  # type: ignore[arg-type]
    boot, run = median(boots), median(runs)
    start = median(results["start_latency_s"])  # type: ignore[arg-type]
    flood = median(results["stdout_64mib_run_s"])  # type: ignore[arg-type]
    bare = median(bares)
    rows = [
        ("(a) bare boot: the same argv, /init powers off (median)", f"{bare:.2f} s"),
        ("(a) direct VM boot to agent Check OK (median)", f"{boot:.2f} s"),
        ("(a) ctr run --rm true through the shim (median)", f"{run:.2f} s"),
        ("(b) containerd-shim-coco-v2 start, its daemon running (median)",
         f"{start * 1000:.0f} ms"),
        *((f"(c) shim daemon RSS / PSS, one pod, {version} ({m['protocol']}, {how(m)})",
           f"{m['rss_mib']:.1f} / {m['pss_mib']:.1f} MiB")
          for version, m in [*memory.items(), (other, first_pod)]),
        ("(d) 64 MiB stdout, whole ctr run (median)", f"{flood:.2f} s"),
    ]
    print(f"\ncoco-shim benchmark, {args.runs} runs each, containerd {args.containerd}, QEMU TCG")
    for label, value in rows:
        print(f"  {label:<62} {value}")
    print("\n" + "\n".join(issue18(boot=boot, run=run, bare=bare, flood=flood,
                                     memory=[*memory.values(), first_pod])))
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nraw samples: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
