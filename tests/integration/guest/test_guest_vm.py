"""The reference guest in a real VM: QEMU (TCG) + vhost-device-vsock, agent over hybrid vsock.

One VM serves the whole module (tests run in file order and share its state); the container
rootfs is a host directory with static busybox shared over 9p. The last test destroys the
sandbox and checks that the VM powers itself off.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from guest.image.build import BuildResult
from protocols.api.kata import agent_pb2, health_pb2, oci_pb2, types_pb2
from protocols.ttrpc import Client, Code, TtrpcError
from tests import envinfo
from tests.integration.guest.support import AgentClient, make_busybox_rootfs, process, spec
from tests.integration.guest.vm import AGENT_PORT, Disk, GuestVM, Share9p, running_vm

pytestmark = pytest.mark.integration

SHARE_TAG = "ctrshare"
DISK_SLOT = 0x1E  # PCI slot of the virtio-blk disk on the root bus
NIC_MAC = "02:00:00:00:00:10"
BOOT_TIMEOUT = 120.0


def make_disk(folder: Path) -> Path:
    """An ext4 image holding rootfs/ with busybox and a marker file."""
    content = folder / "disk-content"
    make_busybox_rootfs(content / "rootfs")
    (content / "rootfs/from-disk").write_text("read from the virtio-blk disk\n")
    image = folder / "disk.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(content), str(image), "32M"],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(content)
    return image


@pytest.fixture(scope="module")
def vm(guest_image: BuildResult) -> Iterator[GuestVM]:
    env = envinfo.load()
    files = Path(tempfile.mkdtemp(prefix="coco-guest-vm-files-"))
    share = files / "share"
    make_busybox_rootfs(share / "rootfs")
    guest = GuestVM(
        kernel=env.kernel,
        initrd=guest_image.image,
        vhost_device_vsock=env.vhost_device_vsock,
        shares=(Share9p(SHARE_TAG, share),),
        disks=(Disk(make_disk(files), DISK_SLOT),),
        nic_mac=NIC_MAC,
        balloon=True,
    )
    try:
        guest.start()
        yield guest
    finally:
        print(guest.logs())
        guest.stop()
        shutil.rmtree(files, ignore_errors=True)


@pytest.fixture
async def agent(vm: GuestVM) -> AsyncIterator[AgentClient]:
    deadline = time.monotonic() + BOOT_TIMEOUT
    await asyncio.to_thread(vm.wait_agent_ready, BOOT_TIMEOUT)
    while True:
        try:
            client = await Client.connect_hybrid_vsock(vm.vsock_uds, AGENT_PORT, timeout=5)
            break
        except (OSError, TtrpcError, TimeoutError):
            assert vm.qemu is not None and vm.qemu.poll() is None, "the VM is gone"
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    try:
        yield AgentClient(client)
    finally:
        await client.close()


def share_storage(cid: str) -> tuple[agent_pb2.Storage, str]:
    """The 9p share a container uses, and its rootfs path in the guest.

    A virtio-9p channel can be mounted only once at a time, so, as with Kata, every container
    names the same mount point; the agent mounts it once and counts its users.
    """
    mount_point = "/run/kata-containers/shared/containers"
    storage = agent_pb2.Storage(
        driver="9p",
        source=SHARE_TAG,
        fstype="9p",
        options=["trans=virtio", "version=9p2000.L"],
        mount_point=mount_point,
    )
    return storage, f"{mount_point}/rootfs" if cid else mount_point


async def create(agent: AgentClient, cid: str, args: list[str]) -> None:
    storage, rootfs = share_storage(cid)
    await agent.call(
        "CreateContainer",
        agent_pb2.CreateContainerRequest(
            container_id=cid, storages=[storage], OCI=spec(rootfs, args)
        ),
    )


async def start(agent: AgentClient, cid: str) -> None:
    await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))


async def expect_code(code: Code, agent: AgentClient, method: str, request: object) -> None:
    with pytest.raises(TtrpcError) as info:
        await agent.call(method, request)  # type: ignore[arg-type]
    assert info.value.code == code, info.value


async def test_check_and_create_sandbox(agent: AgentClient) -> None:
    assert await agent.check() == health_pb2.HealthCheckResponse.SERVING
    details = await agent.call(
        "GetGuestDetails",
        agent_pb2.GuestDetailsRequest(mem_block_size=True),
        agent_pb2.GuestDetailsResponse,
    )
    assert isinstance(details, agent_pb2.GuestDetailsResponse)
    assert details.mem_block_size_bytes > 0
    await agent.call(
        "SetGuestDateTime",
        agent_pb2.SetGuestDateTimeRequest(Sec=int(time.time()), Usec=0),
    )
    await agent.call(
        "CreateSandbox",
        agent_pb2.CreateSandboxRequest(
            hostname="coco-pod", sandbox_id="sandbox-1", storages=[share_storage("")[0]]
        ),
    )


@pytest.mark.parametrize("status", [0, 3])
async def test_container_output_and_exit_code(agent: AgentClient, status: int) -> None:
    cid = f"exit{status}"
    await create(agent, cid, ["sh", "-c", f"echo hello from $(hostname); exit {status}"])
    await start(agent, cid)
    output, code = await asyncio.gather(agent.read_all(cid), agent.wait(cid))
    assert output == b"hello from coco-test\n"
    assert code == status
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid))


async def test_exec_stdin_round_trip_and_sigterm(agent: AgentClient) -> None:
    await create(agent, "sleeper", ["sleep", "600"])
    await start(agent, "sleeper")
    await agent.call(
        "ExecProcess",
        agent_pb2.ExecProcessRequest(
            container_id="sleeper", exec_id="cat", process=process(["cat"])
        ),
    )
    await agent.call(
        "WriteStdin",
        agent_pb2.WriteStreamRequest(container_id="sleeper", exec_id="cat", data=b"round trip\n"),
    )
    await agent.call(
        "CloseStdin", agent_pb2.CloseStdinRequest(container_id="sleeper", exec_id="cat")
    )
    assert await agent.read_all("sleeper", "cat") == b"round trip\n"
    assert await agent.wait("sleeper", "cat") == 0

    await agent.call(
        "ExecProcess",
        agent_pb2.ExecProcessRequest(
            container_id="sleeper", exec_id="sleep", process=process(["sleep", "600"])
        ),
    )
    await agent.call(
        "SignalProcess",
        agent_pb2.SignalProcessRequest(
            container_id="sleeper", exec_id="sleep", signal=signal.SIGTERM
        ),
    )
    assert await agent.wait("sleeper", "sleep") == 143


async def test_bad_input_keeps_the_agent_serving(agent: AgentClient) -> None:
    storage, _ = share_storage("nofs")
    await expect_code(
        Code.NOT_FOUND,
        agent,
        "CreateContainer",
        agent_pb2.CreateContainerRequest(
            container_id="nofs",
            storages=[storage],
            OCI=spec("/run/kata-containers/no/such/rootfs", ["true"]),
        ),
    )
    await expect_code(
        Code.NOT_FOUND,
        agent,
        "StartContainer",
        agent_pb2.StartContainerRequest(container_id="unknown"),
    )
    await expect_code(
        Code.FAILED_PRECONDITION,
        agent,
        "StartContainer",
        agent_pb2.StartContainerRequest(container_id="sleeper"),
    )
    await create(agent, "quick", ["true"])
    await start(agent, "quick")
    assert await agent.wait("quick") == 0
    await expect_code(
        Code.FAILED_PRECONDITION,
        agent,
        "ExecProcess",
        agent_pb2.ExecProcessRequest(container_id="quick", exec_id="e", process=process(["true"])),
    )
    bad_tag = agent_pb2.Storage(
        driver="9p", source="no-such-tag", fstype="9p", mount_point="/run/kata-containers/x"
    )
    await expect_code(
        Code.NOT_FOUND,
        agent,
        "CreateContainer",
        agent_pb2.CreateContainerRequest(
            container_id="badtag", storages=[bad_tag], OCI=spec("/run/kata-containers/x", ["true"])
        ),
    )
    assert await agent.check() == health_pb2.HealthCheckResponse.SERVING
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="quick"))


async def test_block_device_storage_by_pci_path(agent: AgentClient) -> None:
    mount_point = "/run/kata-containers/sandbox/disk0"
    storage = agent_pb2.Storage(
        driver="blk",
        source=f"{DISK_SLOT:02x}",  # Kata's PCI path of a device on the root bus
        fstype="ext4",
        options=["rw"],
        mount_point=mount_point,
    )
    await agent.call(
        "CreateContainer",
        agent_pb2.CreateContainerRequest(
            container_id="blk",
            storages=[storage],
            OCI=spec(f"{mount_point}/rootfs", ["cat", "/from-disk"]),
        ),
    )
    await start(agent, "blk")
    output, code = await asyncio.gather(agent.read_all("blk"), agent.wait("blk"))
    assert (output, code) == (b"read from the virtio-blk disk\n", 0)
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="blk"))


async def test_oom_kill_is_reported(agent: AgentClient) -> None:
    storage, rootfs = share_storage("oom")
    # The string doubles until the 24 MiB limit is hit.
    oci = spec(rootfs, ["sh", "-c", "a=xxxxxxxx; while :; do a=$a$a; done; echo survived"])
    oci.Linux.Resources.Memory.Limit = 24 << 20
    oci.Linux.Resources.Memory.Swap = 24 << 20
    await agent.call(
        "CreateContainer",
        agent_pb2.CreateContainerRequest(container_id="oom", storages=[storage], OCI=oci),
    )
    event = asyncio.ensure_future(
        agent.call("GetOOMEvent", agent_pb2.GetOOMEventRequest(), agent_pb2.OOMEvent, timeout=90)
    )
    await start(agent, "oom")
    reply = await asyncio.wait_for(event, 60)
    assert isinstance(reply, agent_pb2.OOMEvent) and reply.container_id == "oom"
    assert await agent.wait("oom") == 128 + signal.SIGKILL
    assert b"survived" not in await agent.read_all("oom")
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="oom"))


async def test_sigterm_right_after_start_reaches_the_workload(agent: AgentClient) -> None:
    """The workload is the init of its PID namespace: a SIGTERM before its handler exists
    would be dropped. StartContainer answers after the exec, and a signal it would drop waits
    (briefly) for the handler, so a stop right after the start ends it gracefully."""
    await create(agent, "trapper", ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"])
    await start(agent, "trapper")
    await agent.call(
        "SignalProcess",
        agent_pb2.SignalProcessRequest(container_id="trapper", signal=signal.SIGTERM),
    )
    assert await asyncio.wait_for(agent.wait("trapper"), 10) == 0
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="trapper"))


async def test_kernel_modules_load_on_demand(agent: AgentClient) -> None:
    """Not loaded at boot, loaded when a container first needs them: the kernel runs the
    guest's modprobe, which finds "bridge" in modules.dep and "rtnl-link-veth" (what
    `ip link add type veth` asks for) in modules.alias; both go away with their links."""
    storage, rootfs = share_storage("netadmin")
    script = (
        "grep -qw -e ^bridge -e ^veth /proc/modules && echo loaded-at-boot;"
        " brctl addbr br-coco && ip link add vc0 type veth peer name vc1"
        " && ip -o link show br-coco && ip -o link show vc0"
        " && ip link del vc0 && brctl delbr br-coco && echo done"
    )
    oci = spec(rootfs, ["sh", "-c", script])
    caps = ["CAP_NET_ADMIN"]
    oci.Process.Capabilities.CopyFrom(
        oci_pb2.LinuxCapabilities(Bounding=caps, Effective=caps, Permitted=caps)
    )
    await agent.call(
        "CreateContainer",
        agent_pb2.CreateContainerRequest(container_id="netadmin", storages=[storage], OCI=oci),
    )
    await start(agent, "netadmin")
    output, code = await asyncio.gather(agent.read_all("netadmin"), agent.wait("netadmin"))
    assert code == 0, output
    assert b"loaded-at-boot" not in output
    assert b": br-coco: " in output and b": vc0@" in output and output.endswith(b"done\n")
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="netadmin"))


async def test_free_page_reporting_is_active(agent: AgentClient) -> None:
    """The guest loads virtio_balloon for the balloon device (by its modalias, after Check)
    and negotiates free page reporting: feature bit 5, VIRTIO_BALLOON_F_REPORTING (the
    features file is a string of 0/1, index = bit). Its kernel has CONFIG_PAGE_REPORTING."""
    storage, rootfs = share_storage("balloon")
    drivers = "/sys/bus/virtio/drivers/virtio_balloon"
    script = (  # the drivers after Check load in the background: a bounded wait (10 s)
        f"i=0; while [ ! -e {drivers} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done;"
        f" grep -qw ^virtio_balloon /proc/modules && echo module-loaded;"
        f" for d in {drivers}/virtio*; do cat $d/features; done")
    await agent.call(
        "CreateContainer",
        agent_pb2.CreateContainerRequest(container_id="balloon", storages=[storage],
                                         OCI=spec(rootfs, ["sh", "-c", script])),
    )
    await start(agent, "balloon")
    output, code = await asyncio.gather(agent.read_all("balloon"), agent.wait("balloon"))
    assert code == 0, output
    lines = output.decode().split()
    assert lines[0] == "module-loaded", output
    (features,) = lines[1:]
    assert features[5] == "1", f"free page reporting not negotiated: {features}"
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="balloon"))


async def test_stats_pause_resume_on_cgroup2(agent: AgentClient) -> None:
    await agent.call("PauseContainer", agent_pb2.PauseContainerRequest(container_id="sleeper"))
    await agent.call("ResumeContainer", agent_pb2.ResumeContainerRequest(container_id="sleeper"))
    stats = await agent.call(
        "StatsContainer",
        agent_pb2.StatsContainerRequest(container_id="sleeper"),
        agent_pb2.StatsContainerResponse,
    )
    assert isinstance(stats, agent_pb2.StatsContainerResponse)
    assert stats.cgroup_stats.pids_stats.current >= 1
    assert stats.cgroup_stats.memory_stats.usage.usage > 0
    assert stats.cgroup_stats.cpu_stats.cpu_usage.total_usage > 0


async def test_network_rpcs_with_a_virtio_nic(agent: AgentClient) -> None:
    interface = types_pb2.Interface(
        name="eth0",
        hwAddr=NIC_MAC,
        mtu=1400,
        IPAddresses=[types_pb2.IPAddress(family=types_pb2.v4, address="198.18.0.2", mask="24")],
    )
    updated = await agent.call(
        "UpdateInterface",
        agent_pb2.UpdateInterfaceRequest(interface=interface),
        types_pb2.Interface,
    )
    assert isinstance(updated, types_pb2.Interface)
    assert (updated.name, updated.mtu, updated.hwAddr) == ("eth0", 1400, NIC_MAC)
    v4 = [(a.address, a.mask) for a in updated.IPAddresses if a.family == types_pb2.v4]
    assert v4 == [("198.18.0.2", "24")]  # plus the kernel's IPv6 link-local address
    routes = agent_pb2.Routes(
        Routes=[
            types_pb2.Route(dest="198.18.0.0/24", device="eth0", scope=253),
            types_pb2.Route(dest="", gateway="198.18.0.1", device="eth0"),
        ]
    )
    result = await agent.call(
        "UpdateRoutes", agent_pb2.UpdateRoutesRequest(routes=routes), agent_pb2.Routes
    )
    assert isinstance(result, agent_pb2.Routes)
    assert {(r.dest, r.gateway, r.device) for r in result.Routes} >= {
        ("198.18.0.0/24", "", "eth0"),
        ("", "198.18.0.1", "eth0"),
    }
    await agent.call(
        "AddARPNeighbors",
        agent_pb2.AddARPNeighborsRequest(
            neighbors=agent_pb2.ARPNeighbors(
                ARPNeighbors=[
                    types_pb2.ARPNeighbor(
                        toIPAddress=types_pb2.IPAddress(address="198.18.0.1"),
                        device="eth0",
                        lladdr="02:00:00:00:00:01",
                    )
                ]
            )
        ),
    )
    await create(agent, "arpview", ["cat", "/proc/net/arp"])
    await start(agent, "arpview")
    arp_table, _ = await asyncio.gather(agent.read_all("arpview"), agent.wait("arpview"))
    assert b"198.18.0.1" in arp_table and b"02:00:00:00:00:01" in arp_table
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="arpview"))
    listed = await agent.call(
        "ListInterfaces", agent_pb2.ListInterfacesRequest(), agent_pb2.Interfaces
    )
    assert isinstance(listed, agent_pb2.Interfaces)
    by_name = {i.name: i for i in listed.Interfaces}
    assert by_name["eth0"].raw_flags & 0x1  # IFF_UP
    assert by_name["lo"].IPAddresses[0].address == "127.0.0.1"
    # The container shares the guest's network: it sees the address.
    await create(agent, "netview", ["sh", "-c", "cat /proc/net/fib_trie | grep -c 198.18.0.2"])
    await start(agent, "netview")
    output, code = await asyncio.gather(agent.read_all("netview"), agent.wait("netview"))
    assert code == 0 and int(output) >= 1
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="netview"))


async def test_destroy_sandbox_powers_the_vm_off(agent: AgentClient, vm: GuestVM) -> None:
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="sleeper"))
    await agent.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
    assert await asyncio.to_thread(vm.wait_exit, 60) == 0
    assert "agent exited with status 0; powering off" in vm.console_log.read_text()


def test_vm_powers_off_when_the_agent_dies(guest_image: BuildResult) -> None:
    """A broken agent command line makes the agent exit at once: init must power off."""
    env = envinfo.load()
    guest = GuestVM(
        kernel=env.kernel,
        initrd=guest_image.image,
        vhost_device_vsock=env.vhost_device_vsock,
        append="coco.agent.port=not-a-port",
    )
    with running_vm(guest):
        assert guest.wait_exit(BOOT_TIMEOUT) == 0
        assert "agent exited with status 2; powering off" in guest.console_log.read_text()
