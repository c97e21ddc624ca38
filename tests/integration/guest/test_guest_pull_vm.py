"""Guest pull inside the real VM: the reference guest image (QEMU TCG) pulls from real registries.

The VM's virtio-net sits on a tap in the pod end of a veth pair, wired to the veth with tc
mirred redirects both ways (the shim's tcfilter model); the registries run in the peer
namespace (tests/support/registry.py). The guest's image-pull configuration (the test CA, the
plain-HTTP registry marked insecure) is an extra initramfs appended to the image's, the way a
deployment customises /etc/coco/image-pull.toml. Nothing of the container's rootfs comes from
the host: no 9p or virtio-fs device exists in this VM.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guest.image.build import BuildResult
from guest.image.cpio import write_initramfs
from protocols.api.kata import agent_pb2, types_pb2
from protocols.ttrpc import Client, TtrpcError
from tests import envinfo
from tests.integration.guest.support import AgentClient, spec
from tests.integration.guest.vm import AGENT_PORT, GuestVM
from tests.support import oci
from tests.support.netns import sh
from tests.support.registry import RegistryEnv, registry_env

pytestmark = pytest.mark.integration

SUBNET = 79
BOOT_TIMEOUT = 120.0
TAP = "tap0_eth0"


@dataclass
class PullVM:
    vm: GuestVM
    registries: RegistryEnv
    mac: str
    refs: dict[str, str]


def wire_tap(netns: str, tap: str) -> str:
    """A tap in the pod netns joined to its eth0 by tc mirred (both ways); eth0's MAC."""
    mac = json.loads(sh("ip", "-n", netns, "-j", "link", "show", "dev", "eth0"))[0]["address"]
    sh("ip", "-n", netns, "tuntap", "add", tap, "mode", "tap")
    sh("ip", "-n", netns, "link", "set", tap, "up")
    for source, target in (("eth0", tap), (tap, "eth0")):
        sh("tc", "-n", netns, "qdisc", "add", "dev", source, "ingress")
        sh("tc", "-n", netns, "filter", "add", "dev", source, "parent", "ffff:", "protocol",
           "all", "u32", "match", "u8", "0", "0", "action", "mirred", "egress", "redirect",
           "dev", target)
    return str(mac)


@pytest.fixture(scope="module")
def pull_vm(guest_image: BuildResult) -> Iterator[PullVM]:
    env = envinfo.load()
    files = Path(tempfile.mkdtemp(prefix="coco-guest-pull-vm-"))
    try:
        with registry_env(subnet=SUBNET) as registries:
            refs = {
                "layered": registries.push([oci.layered()], registries.secure, "layered"),
                "named": registries.push([oci.named_user()], registries.plain, "app"),
            }
            mac = wire_tap(registries.pair.pod, TAP)
            extra = files / "extra"
            (extra / "etc/coco").mkdir(parents=True)
            (extra / "etc/coco/image-pull.toml").write_text(
                registries.guest_pull_toml(Path("/run/coco-agent/images"), timeout=300))
            write_initramfs(extra, files / "extra.cpio.gz", mtime=0)
            initrd = files / "guest+config.initrd"
            with initrd.open("wb") as out:
                for part in (guest_image.image, files / "extra.cpio.gz"):
                    out.write(part.read_bytes())
            vm = GuestVM(kernel=env.kernel, initrd=initrd,
                         vhost_device_vsock=env.vhost_device_vsock, nic_mac=mac, tap=TAP,
                         netns=registries.pair.pod, memory_mib=768)
            try:
                vm.start()
                yield PullVM(vm, registries, mac, refs)
            finally:
                print(vm.logs())
                vm.stop()
    finally:
        shutil.rmtree(files, ignore_errors=True)


@pytest.fixture
async def agent(pull_vm: PullVM) -> AsyncIterator[AgentClient]:
    deadline = time.monotonic() + BOOT_TIMEOUT
    # Dial only once the guest announced its agent: a CONNECT while the guest starts its
    # vsock device can stall vhost-device-vsock for good (hypervisor/vsock.py).
    await asyncio.to_thread(pull_vm.vm.wait_agent_ready, BOOT_TIMEOUT)
    while True:
        try:
            client = await Client.connect_hybrid_vsock(pull_vm.vm.vsock_uds, AGENT_PORT,
                                                       timeout=5)
            break
        except (OSError, TtrpcError, TimeoutError):
            assert pull_vm.vm.qemu is not None and pull_vm.vm.qemu.poll() is None, "VM gone"
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    try:
        yield AgentClient(client)
    finally:
        await client.close()


def pull_request(cid: str, image: str, args: list[str] | None) -> agent_pb2.CreateContainerRequest:
    mount_point = f"/run/kata-containers/{cid}/rootfs"
    metadata = {"io.kubernetes.cri.image-name": image,
                "io.kubernetes.cri.container-type": "container"}
    storage = agent_pb2.Storage(
        driver="image_guest_pull",
        driver_options=["image_guest_pull=" + json.dumps({"metadata": metadata})],
        source=image, fstype="overlay", mount_point=mount_point)
    oci_spec = spec(mount_point, args or ["placeholder"])
    if args is None:
        del oci_spec.Process.Args[:]
    del oci_spec.Process.Env[:]
    return agent_pb2.CreateContainerRequest(container_id=cid, storages=[storage], OCI=oci_spec)


async def run(agent: AgentClient, cid: str, image: str, args: list[str] | None) -> bytes:
    await agent.call("CreateContainer", pull_request(cid, image, args), timeout=300)
    await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
    output, status = await asyncio.gather(agent.read_all(cid), agent.wait(cid))
    assert status == 0, output
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid))
    return output


async def test_the_guest_pulls_over_its_own_network(agent: AgentClient, pull_vm: PullVM) -> None:
    pod_ip = pull_vm.registries.pair.pod_ip
    interface = types_pb2.Interface(
        name="eth0", hwAddr=pull_vm.mac, mtu=1500,
        IPAddresses=[types_pb2.IPAddress(family=types_pb2.v4, address=pod_ip, mask="24")])
    await agent.call("UpdateInterface", agent_pb2.UpdateInterfaceRequest(interface=interface),
                     types_pb2.Interface)
    await agent.call("CreateSandbox",
                     agent_pb2.CreateSandboxRequest(hostname="pull-pod", sandbox_id="s"))
    secure, plain = pull_vm.registries.secure, pull_vm.registries.plain
    started = time.monotonic()
    output = await run(agent, "layers", pull_vm.refs["layered"],
                       ["sh", "-c", "ls /data; ls -A /opq"])
    print(f"3-layer image (gzip, zstd, tar; TLS + bearer token) pulled and run in the TCG "
          f"guest in {time.monotonic() - started:.2f} s")
    assert output == b"keep\nnew\n"  # whiteout and opaque dir honoured by the guest's overlay
    assert {a.remote for a in secure.blob_fetches()} == {pod_ip}  # only the guest fetched
    assert {a.blob for a in secure.blob_fetches()} >= {x.digest for x in oci.layered().layers}
    output = await run(agent, "named", pull_vm.refs["named"], None)  # plain HTTP, insecure
    assert output == b"uid=1234(app) gid=2345(appgrp) groups=2345(appgrp),3456(extra)\n"
    assert {a.remote for a in plain.blob_fetches()} == {pod_ip}
    argv = " ".join(pull_vm.vm.qemu_argv())
    assert "9p" not in argv and "virtiofs" not in argv and "vhost-user-fs" not in argv
