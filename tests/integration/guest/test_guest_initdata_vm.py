"""Initdata in a real VM (QEMU TCG, hybrid vsock): the agent finds the initdata disk by its
magic among the VM's virtio-blk disks and installs its policy before it serves; a malformed
initdata makes the guest refuse, and the reason reaches the host over vsock and the console."""

from __future__ import annotations

import asyncio
import gzip
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guest.image.build import BuildResult
from protocols.api.kata import agent_pb2, health_pb2
from protocols.ttrpc import Client, Code, TtrpcError
from tests import envinfo
from tests.integration.guest.support import AgentClient, process
from tests.integration.guest.vm import AGENT_PORT, Disk, GuestVM

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 120.0
Boot = Callable[[Path], GuestVM]
POLICY = """package agent_policy

default ExecProcessRequest := false
default SetPolicyRequest := false
default DestroySandboxRequest := true
"""


def initdata_image(path: Path, version: str = "0.1.0") -> Path:
    document = (
        f'version = "{version}"\nalgorithm = "sha384"\n\n[data]\n"policy.rego" = """\n{POLICY}"""\n'
    )
    stream = gzip.compress(document.encode(), mtime=0)
    raw = b"initdata" + struct.pack("<Q", len(stream)) + stream
    path.write_bytes(raw + b"\0" * (-len(raw) % 512))
    return path


@pytest.fixture
def boot(guest_image: BuildResult, workdir: Path) -> Iterator[Boot]:
    env = envinfo.load()
    vms: list[GuestVM] = []

    def start(initdata: Path) -> GuestVM:
        other = workdir / "other.img"
        other.write_bytes(b"\0" * (1 << 20))  # scanned first (vda), no magic
        vm = GuestVM(
            kernel=env.kernel,
            initrd=guest_image.image,
            vhost_device_vsock=env.vhost_device_vsock,
            disks=(Disk(other, 0x1D), Disk(initdata, 0x1E)),
        )
        vms.append(vm)
        vm.start()
        return vm

    try:
        yield start
    finally:
        for vm in vms:
            print(vm.logs())
            vm.stop()


async def connect(vm: GuestVM) -> AgentClient:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        try:
            client = await Client.connect_hybrid_vsock(vm.vsock_uds, AGENT_PORT, timeout=5)
            return AgentClient(client)
        except (OSError, TtrpcError, TimeoutError):
            assert vm.qemu is not None and vm.qemu.poll() is None, "the VM is gone"
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_the_initdata_policy_is_in_force_from_the_first_request(
    boot: Boot, workdir: Path
) -> None:
    vm = boot(initdata_image(workdir / "initdata.img"))
    agent = await connect(vm)
    try:
        assert await agent.check() == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(TtrpcError) as info:
            await agent.call(
                "ExecProcess",
                agent_pb2.ExecProcessRequest(container_id="c", process=process(["sh"])),
            )
        assert info.value.code == Code.PERMISSION_DENIED
        assert info.value.message == (
            "ExecProcessRequest is blocked by policy: rule ExecProcessRequest: its default "
            "`default ExecProcessRequest := false` (policy.rego:3) holds"
        )
        with pytest.raises(TtrpcError) as info:
            await agent.call(
                "SetPolicy",
                agent_pb2.SetPolicyRequest(policy="package agent_policy\ndefault X := true\n"),
            )
        assert info.value.code == Code.PERMISSION_DENIED
        await agent.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
    finally:
        await agent.client.close()
    await asyncio.to_thread(vm.wait_exit, 60)
    assert "initdata policy.rego" in vm.console_log.read_text(errors="replace")


async def test_malformed_initdata_makes_the_guest_refuse_with_the_reason(
    boot: Boot, workdir: Path
) -> None:
    vm = boot(initdata_image(workdir / "bad.img", version="0.0.9"))
    agent = await connect(vm)
    try:
        with pytest.raises(TtrpcError) as info:
            await agent.check()
    finally:
        await agent.client.close()
    assert info.value.code == Code.FAILED_PRECONDITION
    message = info.value.message
    assert message.startswith("guest refused to start: initdata on /dev/vd"), message
    assert message.endswith(": version must be '0.1.0', got '0.0.9'"), message
    console = vm.console_log.read_text(errors="replace")
    assert f"coco-agent: {message}" in console
