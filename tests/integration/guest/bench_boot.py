"""Benchmark (not a test): guest image size, VM boot to agent Check under TCG, agent RSS.

    /var/cache/coco-shim/venv/bin/python -m tests.integration.guest.bench_boot [--runs 5]

Each run boots a fresh VM (QEMU TCG, 512 MiB, 2 vCPUs, vhost-device-vsock) and times from
QEMU's start to the first successful Health.Check over hybrid vsock. The agent's RSS is read
inside the guest by a container that shares the guest's PID namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from guest.image.build import build
from protocols.api.kata import agent_pb2
from protocols.ttrpc import Client
from tests import envinfo
from tests.integration.guest.support import AgentClient, make_busybox_rootfs, spec
from tests.integration.guest.vm import AGENT_PORT, GuestVM, Share9p
from tests.support.guest import guest_recipe

RSS_SCRIPT = (
    "for p in /proc/[0-9]*; do "
    "if grep -q guest.agent $p/cmdline 2>/dev/null; then grep VmRSS $p/status; fi; done"
)


BOOT_TIMEOUT = 180.0


async def connect(vm: GuestVM) -> tuple[AgentClient, float]:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        try:
            client = AgentClient(
                await Client.connect_hybrid_vsock(vm.vsock_uds, AGENT_PORT, timeout=5)
            )
            await client.check()
            return client, time.monotonic() - vm.started_at
        except Exception:
            if time.monotonic() > deadline or (vm.qemu is not None and vm.qemu.poll() is not None):
                raise
            await asyncio.sleep(0.05)


async def agent_rss_kib(agent: AgentClient) -> int:
    mount_point = "/run/kata-containers/shared/containers"
    storage = agent_pb2.Storage(
        driver="9p", source="bench", fstype="9p", options=["trans=virtio"], mount_point=mount_point
    )
    oci = spec(f"{mount_point}/rootfs", ["sh", "-c", RSS_SCRIPT])
    del oci.Linux.Namespaces[0]  # drop "pid": see the guest's processes
    await agent.call(
        "CreateContainer",
        agent_pb2.CreateContainerRequest(container_id="rss", storages=[storage], OCI=oci),
    )
    await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id="rss"))
    output = await agent.read_all("rss")
    await agent.wait("rss")
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="rss"))
    return int(output.split()[1])


async def one_boot(
    image: Path, share: Path, measure_rss: bool, append: str = ""
) -> tuple[float, int | None]:
    env = envinfo.load()
    vm = GuestVM(
        kernel=env.kernel,
        initrd=image,
        vhost_device_vsock=env.vhost_device_vsock,
        shares=(Share9p("bench", share),),
        append=append,
    )
    try:
        vm.start()
        agent, seconds = await connect(vm)
        rss = await agent_rss_kib(agent) if measure_rss else None
        await agent.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
        await agent.client.close()
        await asyncio.to_thread(vm.wait_exit, 60)
        return seconds, rss
    except Exception:
        print(vm.logs())
        raise
    finally:
        vm.stop()


async def main(runs: int, append: str = "", rss: bool = True) -> None:
    result = build(guest_recipe(), envinfo.load().cache)
    print(f"image {result.image}")
    print(
        f"image size: {result.size} bytes ({result.size / 2**20:.1f} MiB), sha256 {result.sha256}"
    )
    share = Path(tempfile.mkdtemp(prefix="coco-bench-"))
    try:
        make_busybox_rootfs(share / "rootfs")
        samples: list[float] = []
        rss_kib: int | None = None
        for run in range(runs):
            seconds, measured = await one_boot(
                result.image, share, measure_rss=rss and run == 0, append=append
            )
            rss_kib = measured if measured is not None else rss_kib
            samples.append(seconds)
            print(f"run {run + 1}: boot to Check OK {seconds:.2f} s")
        median = statistics.median(samples)
        print(
            f"boot to agent Check (QEMU TCG, 512 MiB, 2 vCPU): median {median:.2f} s"
            f" over {runs} runs (min {min(samples):.2f}, max {max(samples):.2f})"
        )
        if rss:
            print(f"agent RSS in the guest: {rss_kib} KiB")
    finally:
        shutil.rmtree(share, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--append",
        default="",
        help="kernel command line additions, e.g. coco.agent.confidential=1 (its default "
        "policy, and so the Rego engine, is loaded before the agent serves)",
    )
    parser.add_argument(
        "--no-rss",
        dest="rss",
        action="store_false",
        help="skip the RSS probe (a container on a 9p share: a confidential guest refuses it)",
    )
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.append, args.rss))
