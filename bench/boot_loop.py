#!/usr/bin/env python3
"""Boot the pod VM N times in a row and count the boots whose agent never answered.

    heavy $COCO_CACHE/venv/bin/python bench/boot_loop.py --boots 200

Each boot is what the shim does for a pod, minus containerd: the development profile's exact
QEMU argv (hypervisor.launch_vm, the 9p rootfs share, hybrid vsock), then the shim's own dial
(shim.pod.agent.AgentClient.dial: the guest's ready announcement, per-attempt bounds) up to
Health.Check, then DestroySandbox (the agent answers Check before its AgentService is built, so
this is the first call that needs it) and the VM's stop. A boot fails when the dial or the
DestroySandbox raises (each bounded by 120 s) or the VM does not go away; its console, QEMU
and vhost-device-vsock logs are copied to --keep.
``--hammer N`` adds N extra hybrid-vsock dialers that CONNECT without pause from QEMU's start
until the agent answers, ignoring the announcement (the old behaviour, to show the trap).
The summary line: boots, failures, wall time, the boot-to-Check and boot-to-AgentService medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypervisor.config import load_profile
from hypervisor.vm import LaunchOptions, QemuVm, launch_vm
from shim.pod.agent import AgentClient
from shim.pod.rootfs import HostShare
from tests import envinfo
from tests.support import targets
from tests.support.guest import dev_profile_text, guest_image

DIAL_TIMEOUT = 120.0


async def _hammer(vm: QemuVm, stop: asyncio.Event, outcomes: dict[str, int]) -> None:
    """CONNECT 1024 over and over, each bounded, until told to stop."""
    assert vm.channel is not None and vm.channel.hybrid_socket is not None
    while not stop.is_set():
        try:
            async with asyncio.timeout(2):
                reader, writer = await asyncio.open_unix_connection(vm.channel.hybrid_socket)
                try:
                    writer.write(b"CONNECT 1024\n")
                    await writer.drain()
                    line = await reader.readline()
                finally:
                    writer.transport.abort()
            kind = "ok" if line.startswith(b"OK") else "refused"
        except TimeoutError:
            kind = "stalled"
        except OSError:
            kind = "refused"
        outcomes[kind] = outcomes.get(kind, 0) + 1
        await asyncio.sleep(0.001)


async def one_boot(profile_path: Path, run_root: Path, vhost: Path,
                   hammer: int) -> tuple[float, float, dict[str, int]]:
    """Seconds from launch to Check OK and to the first AgentService answer; raises if the
    agent never answers either."""
    profile = load_profile(profile_path)
    share = run_root / "shared"
    share.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    vm = await launch_vm(profile, LaunchOptions(
        run_root=run_root, name="loop", accel="tcg", vhost_device_vsock=vhost,
        log_dir=run_root / "logs", shares=HostShare(share).vm_shares()))
    outcomes: dict[str, int] = {}
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        for _ in range(hammer):
            group.create_task(_hammer(vm, stop, outcomes))
        try:
            assert vm.channel is not None
            exited: asyncio.Future[object] = asyncio.ensure_future(vm.wait())
            try:
                agent = await AgentClient.dial(vm.channel, DIAL_TIMEOUT, exited=exited)
            finally:
                exited.cancel()
            seconds = time.monotonic() - started
            stop.set()
            try:
                # The agent answers Check before its AgentService is built: the boot counts as
                # answered only once an AgentService call (the one the shim ends with) is.
                async with asyncio.timeout(DIAL_TIMEOUT):
                    await agent.destroy_sandbox()
                served = time.monotonic() - started
            finally:
                await agent.close()
        finally:
            stop.set()
            await vm.stop()
    return seconds, served, outcomes


def _leaf(err: Exception) -> Exception:
    """The first real error inside (nested) exception groups (the hammer's TaskGroup)."""
    while isinstance(err, ExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return err


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boots", type=int, default=200)
    parser.add_argument("--hammer", type=int, default=0)
    parser.add_argument("--memory-mib", type=int, default=512)
    parser.add_argument("--keep", type=Path, default=Path("/tmp/coco-boot-loop-failures"))
    parser.add_argument("--out", type=Path, default=None, help="JSON with every boot")
    args = parser.parse_args()
    env = envinfo.load()
    image = guest_image()
    base = Path(tempfile.mkdtemp(prefix="coco-loop-", dir="/tmp"))
    profile = base / "profile.toml"
    profile.write_text(dev_profile_text(env.kernel, image.image, memory_mib=args.memory_mib))
    records: list[dict[str, object]] = []
    began = time.monotonic()
    try:
        for index in range(args.boots):
            run_root = base / f"boot-{index}"
            try:
                seconds, to_service, outcomes = await one_boot(
                    profile, run_root, env.vhost_device_vsock, args.hammer)
                records.append({"boot": index, "ok": True, "seconds": seconds,
                                "service_seconds": to_service, "hammer": outcomes})
                print(f"boot {index + 1}/{args.boots}: Check OK after {seconds:.2f} s, "
                      f"AgentService after {to_service:.2f} s"
                      + (f" {outcomes}" if outcomes else ""), flush=True)
            except Exception as err:  # a failed boot is the figure: record it, go on
                err = _leaf(err)
                kept = args.keep / f"boot-{index}"
                kept.mkdir(parents=True, exist_ok=True)
                for log in (run_root / "logs").glob("*.log"):
                    shutil.copy(log, kept / log.name)
                records.append({"boot": index, "ok": False, "error": str(err)})
                print(f"boot {index + 1}/{args.boots}: FAILED: {err} (logs: {kept})",
                      flush=True)
            finally:
                shutil.rmtree(run_root, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    wall = time.monotonic() - began
    failed = [r for r in records if not r["ok"]]
    times = [float(r["seconds"]) for r in records if r["ok"]]  # type: ignore[arg-type]
    served = [float(r["service_seconds"]) for r in records if r["ok"]]  # type: ignore[arg-type]
    print(f"\n{len(records)} boots, {len(failed)} failed, wall time {wall:.0f} s"
          + (f", boot to Check median {statistics.median(times):.2f} s "
             f"(min {min(times):.2f}, max {max(times):.2f}), to AgentService median "
             f"{statistics.median(served):.2f} s (max {max(served):.2f})" if times else ""))
    print(targets.line("boots_unanswered", len(failed), f"{len(failed)} of {len(records)}"))
    if args.out is not None:
        args.out.write_text(json.dumps({"boots": records, "wall_s": wall,
                                        "command": " ".join(sys.argv)}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
