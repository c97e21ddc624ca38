#!/usr/bin/env python3
"""`make bench`: the shim's performance figures, medians of N runs, with the commands used.

(a) `ctr run --rm … true` through containerd + our shim, against the same VM (same kernel,
    initrd, QEMU options) booted directly by hypervisor/ up to the agent's Health.Check —
    the ratio is what the shim, containerd and the container add on top of the boot;
(b) `containerd-shim-coco-v2 start` latency (the subcommand containerd runs per container);
(c) shim daemon RSS and PSS per running pod;
(d) stdout throughput: a container writing 64 MiB, read by `ctr run`.
Results are printed as a table and written to bench/results.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from hypervisor.config import load_profile
from hypervisor.vm import LaunchOptions, launch_vm
from shim.pod.agent import AgentClient
from shim.pod.rootfs import HostShare
from tests import envinfo
from tests.e2e.conftest import shim_env
from tests.support.containerd import (
    Containerd,
    coco_processes,
    is_shim_daemon,
    private_containerd,
    shim_daemons,
)
from tests.support.guest import dev_profile_text, guest_image
from tests.support.images import BUSYBOX_REF, busybox_oci_archive

RUNTIME = "io.containerd.coco.v2"


def median(values: list[float]) -> float:
    return statistics.median(values)


async def direct_boot(profile_path: Path, run_root: Path, vhost: Path) -> float:
    """Launch the profile's VM, with the devices the shim gives a pod VM (the 9p rootfs share,
    console and stderr logs kept), and dial its agent until Check answers; seconds."""
    profile = load_profile(profile_path)
    share = run_root / "shared"
    share.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    vm = await launch_vm(profile, LaunchOptions(
        run_root=run_root, name="bench", accel="tcg", vhost_device_vsock=vhost,
        log_dir=run_root / "logs", shares=HostShare(share).vm_shares()))
    try:
        assert vm.channel is not None
        agent = await AgentClient.dial(vm.channel, dial_timeout=120)
        elapsed = time.monotonic() - start
        await agent.close()
        return elapsed
    finally:
        await vm.aclose()


def settle(cd: Containerd, base: Path, timeout: float = 60) -> None:
    """Wait until the previous sample's pod is fully gone: the shim tears a pod down after
    `ctr run --rm` returns, and a QEMU still stopping would slow the next sample down."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [pid for pid in coco_processes(base) if pid != cd.process.pid]:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the previous sample's pod did not go away in {timeout:g} s")


def pod_memory(cd: Containerd, base: Path) -> dict[str, Any]:
    """RSS and PSS of the shim daemon of one running pod (`sleep`), and its transport."""
    settle(cd, base)
    cd.ctr("run", "-d", "--runtime", RUNTIME, BUSYBOX_REF, "mem", "sleep", "600")
    try:
        time.sleep(2)
        daemons = shim_daemons(base)
        assert len(daemons) == 1, daemons
        info = daemons[0].memory_full_info()
        argv = daemons[0].cmdline()
        protocol = argv[argv.index("-protocol") + 1] if "-protocol" in argv else "grpc"
        return {"rss_mib": info.rss / 2**20, "pss_mib": info.pss / 2**20,
                "protocol": protocol}
    finally:
        cd.ctr("task", "kill", "-s", "SIGKILL", "mem", check=False)
        time.sleep(1)
        cd.ctr("task", "rm", "-f", "mem", check=False)
        cd.ctr("container", "rm", "mem", check=False)


def ctr_run(cd: Containerd, name: str, *command: str) -> float:
    start = time.monotonic()
    cd.ctr("run", "--rm", "--runtime", RUNTIME, BUSYBOX_REF, name, *command, timeout=300)
    return time.monotonic() - start


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--containerd", default="2.1.9")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument("--memory-only", action="store_true",
                        help="only (c), on both containerd lines")
    parser.add_argument("--before", type=Path, default=None, metavar="TREE",
                        help="with --memory-only: also another checkout of the shim "
                        "(PYTHONPATH=TREE for the shim containerd runs), alternating")
    args = parser.parse_args()
    env = envinfo.load()
    if args.memory_only:
        return memory_only(env, args.containerd, args.runs, args.before, args.out)
    if args.before:
        parser.error("--before needs --memory-only")
    base = Path(tempfile.mkdtemp(prefix="coco-bench-", dir="/tmp"))
    results: dict[str, object] = {"runs": args.runs, "containerd": args.containerd,
                                  "command": " ".join([sys.executable, *sys.argv])}
    try:
        image = guest_image()
        profile = base / "profile.toml"
        profile.write_text(dev_profile_text(env.kernel, image.image))

        shim_vars = shim_env(base, profile)
        with private_containerd(args.containerd, env=shim_vars, log_level="info",
                                extra_path=[Path(sys.executable).parent,
                                            env.vhost_device_vsock.parent]) as cd:
            cd.ctr("images", "import", "--platform", "linux/amd64",
                   str(busybox_oci_archive(base / "busybox.tar")))
            # (a) interleaved, so that both series see the same machine (its speed drifts by
            # several percent over minutes under TCG): boot, run, boot, run, ...
            boots: list[float] = []
            runs: list[float] = []
            for i in range(args.runs):
                settle(cd, base)
                boots.append(asyncio.run(direct_boot(profile, base / "direct",
                                                     env.vhost_device_vsock)))
                settle(cd, base)
                runs.append(ctr_run(cd, f"true-{i}", "true"))
            results["direct_boot_to_check_s"] = boots
            results["ctr_run_true_s"] = runs

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
            memory[other] = pod_memory(cd, base)
        results["daemon_memory"] = memory

        (base / "start").mkdir()
        results["start_latency_s"] = start_latency(base / "start", args.runs * 2)
    finally:
        subprocess.run(["umount", "-R", "-l", str(base / "run")], capture_output=True,
                       check=False)
        shutil.rmtree(base, ignore_errors=True)

    boot, run = median(boots), median(runs)
    start = median(results["start_latency_s"])  # type: ignore[arg-type]
    flood = median(results["stdout_64mib_run_s"])  # type: ignore[arg-type]
    rows = [
        ("(a) direct VM boot to agent Check OK (median)", f"{boot:.2f} s", ""),
        ("(a) ctr run --rm true through the shim (median)", f"{run:.2f} s", ""),
        ("(a) ratio", f"{run / boot:.2f}x", "target <= 1.15x"),
        ("(b) containerd-shim-coco-v2 start (median)", f"{start * 1000:.0f} ms",
         "target <= 60 ms"),
        *((f"(c) shim daemon RSS / PSS, one pod, {version} ({m['protocol']})",
           f"{m['rss_mib']:.1f} / {m['pss_mib']:.1f} MiB", "target RSS <= 40 MiB")
          for version, m in memory.items()),
        ("(d) 64 MiB stdout, whole ctr run (median)",
         f"{flood:.2f} s ({64 / max(flood - run, 0.001):.1f} MiB/s beyond a `true` run)", ""),
    ]
    print(f"\ncoco-shim benchmark, {args.runs} runs each, containerd {args.containerd}, QEMU TCG")
    for label, value, target in rows:
        print(f"  {label:<50} {value:<40} {target}")
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nraw samples: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
