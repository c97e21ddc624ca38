"""The agent as a real process on a unix socket, driven by the project's ttrpc client.

Containers run with the host's runc (1.1.5) from a busybox rootfs; the agent lives in its own
UTS, network and mount namespaces so nothing it does touches the host.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from pathlib import Path

import psutil
import pytest

from guest.image.build import write_pause_bundle
from protocols.api.kata import agent_pb2, health_pb2, oci_pb2, types_pb2
from protocols.ttrpc import Client, Code, TtrpcError
from tests.integration.guest.agentproc import AgentProcess
from tests.integration.guest.conftest import remove_cgroup_parent
from tests.integration.guest.support import AgentClient, process, spec
from tests.integration.guest.support import process as process_spec

pytestmark = pytest.mark.integration


async def create(
    agent: AgentClient, cid: str, rootfs: Path, args: list[str], *, terminal: bool = False
) -> None:
    await agent.call(
        "CreateContainer",
        agent_pb2.CreateContainerRequest(
            container_id=cid, OCI=spec(str(rootfs), args, terminal=terminal)
        ),
    )


async def start(agent: AgentClient, cid: str) -> None:
    await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))


async def remove(agent: AgentClient, cid: str) -> None:
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid))


async def expect_code(code: Code, agent: AgentClient, method: str, request: object) -> str:
    with pytest.raises(TtrpcError) as info:
        await agent.call(method, request)  # type: ignore[arg-type]
    assert info.value.code == code, info.value
    return info.value.message


async def test_health_check_and_version(agent: AgentClient) -> None:
    assert await agent.check() == health_pb2.HealthCheckResponse.SERVING
    version = await agent.call(
        "Version", health_pb2.CheckRequest(), health_pb2.VersionCheckResponse
    )
    assert isinstance(version, health_pb2.VersionCheckResponse)
    assert version.agent_version and version.grpc_version


async def test_guest_details(agent: AgentClient) -> None:
    reply = await agent.call(
        "GetGuestDetails",
        agent_pb2.GuestDetailsRequest(mem_block_size=True),
        agent_pb2.GuestDetailsResponse,
    )
    assert isinstance(reply, agent_pb2.GuestDetailsResponse)
    assert "9p" in reply.agent_details.storage_handlers
    assert reply.mem_block_size_bytes > 0


async def test_unlisted_rpc_is_unimplemented(agent: AgentClient) -> None:
    await expect_code(Code.UNIMPLEMENTED, agent, "GetMetrics", agent_pb2.GetMetricsRequest())
    assert await agent.check() == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("status", [0, 3])
async def test_container_output_and_exit_code(
    agent: AgentClient, rootfs: Path, status: int
) -> None:
    await agent.call(
        "CreateSandbox", agent_pb2.CreateSandboxRequest(hostname="pod", sandbox_id="s")
    )
    await create(agent, "c1", rootfs, ["sh", "-c", f"echo out-$$; echo err >&2; exit {status}"])
    await start(agent, "c1")
    out, err, code = await asyncio.gather(
        agent.read_all("c1"), agent.read_all("c1", stream="ReadStderr"), agent.wait("c1")
    )
    assert out == b"out-1\n"  # the container's own pid namespace
    assert err == b"err\n"
    assert code == status
    await remove(agent, "c1")
    await expect_code(
        Code.NOT_FOUND, agent, "StartContainer", agent_pb2.StartContainerRequest(container_id="c1")
    )


async def test_exec_stdin_round_trip_and_sigterm(agent: AgentClient, rootfs: Path) -> None:
    await create(agent, "c1", rootfs, ["sleep", "300"])
    await start(agent, "c1")
    await agent.call(
        "ExecProcess",
        agent_pb2.ExecProcessRequest(container_id="c1", exec_id="e1", process=process(["cat"])),
    )
    written = await agent.call(
        "WriteStdin",
        agent_pb2.WriteStreamRequest(container_id="c1", exec_id="e1", data=b"ping\n"),
        agent_pb2.WriteStreamResponse,
    )
    assert isinstance(written, agent_pb2.WriteStreamResponse) and written.len == 5
    await agent.call("CloseStdin", agent_pb2.CloseStdinRequest(container_id="c1", exec_id="e1"))
    assert await agent.read_all("c1", "e1") == b"ping\n"
    assert await agent.wait("c1", "e1") == 0

    await agent.call(
        "ExecProcess",
        agent_pb2.ExecProcessRequest(
            container_id="c1", exec_id="sleeper", process=process(["sleep", "300"])
        ),
    )
    await agent.call(
        "SignalProcess",
        agent_pb2.SignalProcessRequest(container_id="c1", exec_id="sleeper", signal=signal.SIGTERM),
    )
    assert await agent.wait("c1", "sleeper") == 128 + signal.SIGTERM
    await agent.call(
        "SignalProcess", agent_pb2.SignalProcessRequest(container_id="c1", signal=signal.SIGKILL)
    )
    assert await agent.wait("c1") == 128 + signal.SIGKILL
    await remove(agent, "c1")


async def test_terminal_exec_and_resize(agent: AgentClient, rootfs: Path) -> None:
    await create(agent, "c1", rootfs, ["sleep", "300"])
    await start(agent, "c1")
    await agent.call(
        "ExecProcess",
        agent_pb2.ExecProcessRequest(
            container_id="c1",
            exec_id="tty",
            process=process(["sh", "-c", "read line; echo got-$line"], terminal=True),
        ),
    )
    await agent.call(
        "TtyWinResize",
        agent_pb2.TtyWinResizeRequest(container_id="c1", exec_id="tty", row=40, column=100),
    )
    await agent.call(
        "WriteStdin", agent_pb2.WriteStreamRequest(container_id="c1", exec_id="tty", data=b"x\n")
    )
    output = await agent.read_all("c1", "tty")
    assert b"got-x" in output
    assert await agent.wait("c1", "tty") == 0
    assert await agent.read_all("c1", "tty", stream="ReadStderr") == b""
    # A process without a terminal cannot be resized.
    await expect_code(
        Code.FAILED_PRECONDITION,
        agent,
        "TtyWinResize",
        agent_pb2.TtyWinResizeRequest(container_id="c1", row=1, column=1),
    )
    await remove(agent, "c1")


async def test_pod_namespaces_sysctls_and_a_tty_exec_with_cri_ids(
    agent: AgentClient, rootfs: Path
) -> None:
    """CRI ids are 64 hex characters: the exec's console socket must still fit a unix socket
    path. Containers share the pod's IPC and UTS namespaces (the first one's IPC sysctl is seen
    by the second) and, with sandbox_pidns, the first container's PID namespace."""
    first, second, exec_id = (uuid.uuid4().hex * 2 for _ in range(3))
    oci = spec(str(rootfs), ["sleep", "301"])
    oci.Linux.Sysctl["kernel.shm_rmid_forced"] = "1"
    await agent.call(
        "CreateContainer", agent_pb2.CreateContainerRequest(container_id=first, OCI=oci)
    )
    await start(agent, first)
    await agent.call(
        "CreateContainer",
        agent_pb2.CreateContainerRequest(
            container_id=second, OCI=spec(str(rootfs), ["sleep", "302"]), sandbox_pidns=True
        ),
    )
    await start(agent, second)
    report = (
        "cat /proc/sys/kernel/shm_rmid_forced; readlink /proc/self/ns/ipc;"
        " readlink /proc/self/ns/uts"
    )
    await agent.call(
        "ExecProcess",
        agent_pb2.ExecProcessRequest(
            container_id=first, exec_id="report", process=process(["sh", "-c", report])
        ),
    )
    in_first = await agent.read_all(first, "report")
    await agent.call(
        "ExecProcess",
        agent_pb2.ExecProcessRequest(
            container_id=second,
            exec_id=exec_id,
            process=process(
                ["sh", "-c", f"read x; {report}; tr '\\0' ' ' </proc/1/cmdline"], terminal=True
            ),
        ),
    )
    await agent.call(
        "WriteStdin",
        agent_pb2.WriteStreamRequest(container_id=second, exec_id=exec_id, data=b"go\n"),
    )
    in_second = (await agent.read_all(second, exec_id)).replace(b"\r\n", b"\n")
    assert await agent.wait(second, exec_id) == 0
    assert in_first.startswith(b"1\nipc:[") and in_second.startswith(b"go\n")
    assert in_second.removeprefix(b"go\n") == in_first + b"sleep 301 "
    for cid in (second, first):
        await remove(agent, cid)


async def test_pause_resume_stats_update(agent: AgentClient, rootfs: Path) -> None:
    await create(agent, "c1", rootfs, ["sleep", "300"])
    await start(agent, "c1")
    await agent.call("PauseContainer", agent_pb2.PauseContainerRequest(container_id="c1"))
    await expect_code(
        Code.FAILED_PRECONDITION,
        agent,
        "ExecProcess",
        agent_pb2.ExecProcessRequest(container_id="c1", exec_id="e", process=process(["true"])),
    )
    await agent.call("ResumeContainer", agent_pb2.ResumeContainerRequest(container_id="c1"))
    stats = await agent.call(
        "StatsContainer",
        agent_pb2.StatsContainerRequest(container_id="c1"),
        agent_pb2.StatsContainerResponse,
    )
    assert isinstance(stats, agent_pb2.StatsContainerResponse)
    assert stats.cgroup_stats.pids_stats.current >= 1
    await agent.call(
        "UpdateContainer",
        agent_pb2.UpdateContainerRequest(
            container_id="c1", resources=oci_pb2.LinuxResources(Pids=oci_pb2.LinuxPids(Limit=50))
        ),
    )
    await remove(agent, "c1")


async def test_bad_input_gets_status_codes(agent: AgentClient, rootfs: Path, workdir: Path) -> None:
    message = await expect_code(
        Code.NOT_FOUND,
        agent,
        "CreateContainer",
        agent_pb2.CreateContainerRequest(
            container_id="nofs", OCI=spec(str(workdir / "agent/shared/missing"), ["true"])
        ),
    )
    assert "rootfs" in message
    await expect_code(
        Code.NOT_FOUND,
        agent,
        "StartContainer",
        agent_pb2.StartContainerRequest(container_id="nope"),
    )
    await expect_code(
        Code.NOT_FOUND, agent, "WaitProcess", agent_pb2.WaitProcessRequest(container_id="nope")
    )
    await expect_code(
        Code.INVALID_ARGUMENT,
        agent,
        "CreateContainer",
        agent_pb2.CreateContainerRequest(container_id="../evil", OCI=spec(str(rootfs), ["true"])),
    )
    await expect_code(
        Code.INVALID_ARGUMENT,
        agent,
        "CreateContainer",
        agent_pb2.CreateContainerRequest(container_id="nospec"),
    )
    await create(agent, "c1", rootfs, ["true"])
    await expect_code(
        Code.ALREADY_EXISTS,
        agent,
        "CreateContainer",
        agent_pb2.CreateContainerRequest(container_id="c1", OCI=spec(str(rootfs), ["true"])),
    )
    await start(agent, "c1")
    await expect_code(
        Code.FAILED_PRECONDITION,
        agent,
        "StartContainer",
        agent_pb2.StartContainerRequest(container_id="c1"),
    )
    assert await agent.wait("c1") == 0
    await expect_code(
        Code.FAILED_PRECONDITION,
        agent,
        "ExecProcess",
        agent_pb2.ExecProcessRequest(container_id="c1", exec_id="late", process=process(["true"])),
    )
    await expect_code(
        Code.NOT_FOUND,
        agent,
        "SignalProcess",
        agent_pb2.SignalProcessRequest(container_id="c1", signal=signal.SIGTERM),
    )
    await expect_code(
        Code.NOT_FOUND,
        agent,
        "ReadStdout",
        agent_pb2.ReadStreamRequest(container_id="c1", exec_id="nope", len=10),
    )
    await remove(agent, "c1")
    # Unknown storage drivers and a 9p share that is not there are refused, nothing leaks.
    await expect_code(
        Code.INVALID_ARGUMENT,
        agent,
        "CreateContainer",
        agent_pb2.CreateContainerRequest(
            container_id="c2",
            OCI=spec(str(rootfs), ["true"]),
            storages=[
                agent_pb2.Storage(
                    driver="floppy", source="x", mount_point=str(workdir / "agent/shared/x")
                )
            ],
        ),
    )
    assert await agent.check() == health_pb2.HealthCheckResponse.SERVING


async def test_output_flood_is_bounded(
    agent: AgentClient, agent_process: AgentProcess, rootfs: Path
) -> None:
    assert agent_process.proc is not None
    status_file = Path(f"/proc/{agent_process.proc.pid}/status")

    def rss_kib() -> int:
        for line in status_file.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    await create(agent, "flood", rootfs, ["cat", "/dev/zero"])
    await start(agent, "flood")
    before = rss_kib()
    await asyncio.sleep(3)  # nobody reads: the buffer fills, then the writer blocks
    grown = rss_kib() - before
    assert grown < 16 * 1024, f"agent RSS grew by {grown} KiB while nobody read"
    chunk = await agent.call(
        "ReadStdout",
        agent_pb2.ReadStreamRequest(container_id="flood", len=4 << 20),
        agent_pb2.ReadStreamResponse,
    )
    assert isinstance(chunk, agent_pb2.ReadStreamResponse)
    assert 0 < len(chunk.data) <= 1 << 20 and set(chunk.data) == {0}
    await remove(agent, "flood")


async def test_policy_denies_an_rpc(agent: AgentClient, rootfs: Path) -> None:
    policy = (
        "package agent_policy\n"
        "default ExecProcessRequest := false\n"
        "default CreateContainerRequest := true\n"
        "default StartContainerRequest := true\n"
        "default SetPolicyRequest := true\n"
    )
    await agent.call("SetPolicy", agent_pb2.SetPolicyRequest(policy=policy))
    await create(agent, "c1", rootfs, ["sleep", "300"])
    await start(agent, "c1")
    message = await expect_code(
        Code.PERMISSION_DENIED,
        agent,
        "ExecProcess",
        agent_pb2.ExecProcessRequest(container_id="c1", exec_id="e", process=process(["true"])),
    )
    assert message.startswith("ExecProcessRequest is blocked by policy: rule ExecProcessRequest")
    await expect_code(
        Code.INVALID_ARGUMENT, agent, "SetPolicy", agent_pb2.SetPolicyRequest(policy="{nonsense")
    )
    # No rule for RemoveContainerRequest: denied, saying so.
    message = await expect_code(
        Code.PERMISSION_DENIED,
        agent,
        "RemoveContainer",
        agent_pb2.RemoveContainerRequest(container_id="c1"),
    )
    assert "the policy has no rule RemoveContainerRequest" in message
    await agent.call(
        "SetPolicy",
        agent_pb2.SetPolicyRequest(
            policy="package agent_policy\ndefault RemoveContainerRequest := true\n"
        ),
    )
    await remove(agent, "c1")


async def test_copy_file(agent: AgentClient, agent_process: AgentProcess) -> None:
    shared = agent_process.workdir / "shared"
    target = shared / "sandbox/etc/hostname"
    await agent.call(
        "CopyFile",
        agent_pb2.CopyFileRequest(
            path=str(target), file_size=4, file_mode=0o100644, dir_mode=0o755, data=b"pod\n"
        ),
    )
    assert target.read_bytes() == b"pod\n"
    await expect_code(
        Code.PERMISSION_DENIED,
        agent,
        "CopyFile",
        agent_pb2.CopyFileRequest(path="/etc/evil", file_mode=0o100644, data=b"x"),
    )


async def test_network_rpcs_in_the_agents_namespace(
    agent: AgentClient, agent_process: AgentProcess
) -> None:
    assert agent_process.proc is not None
    pid = agent_process.proc.pid
    await asyncio.to_thread(
        subprocess.run,
        ["nsenter", "-t", str(pid), "-n", "ip", "link", "add", "eth7", "address",
         "02:00:00:00:00:07", "type", "veth", "peer", "name", "peer7"],
        check=True,
    )  # fmt: skip
    iface = types_pb2.Interface(
        name="eth0",
        hwAddr="02:00:00:00:00:07",
        mtu=1400,
        IPAddresses=[types_pb2.IPAddress(family=types_pb2.v4, address="198.18.0.2", mask="24")],
    )
    updated = await agent.call(
        "UpdateInterface", agent_pb2.UpdateInterfaceRequest(interface=iface), types_pb2.Interface
    )
    assert isinstance(updated, types_pb2.Interface)
    assert updated.name == "eth0" and updated.mtu == 1400
    assert [a.address for a in updated.IPAddresses] == ["198.18.0.2"]
    routes = agent_pb2.Routes(
        Routes=[
            types_pb2.Route(dest="198.18.0.0/24", device="eth0", scope=253),
            types_pb2.Route(dest="198.19.0.0/16", gateway="198.18.0.1", device="eth0"),
        ]
    )
    result = await agent.call(
        "UpdateRoutes", agent_pb2.UpdateRoutesRequest(routes=routes), agent_pb2.Routes
    )
    assert isinstance(result, agent_pb2.Routes)
    assert {(r.dest, r.gateway) for r in result.Routes} >= {
        ("198.18.0.0/24", ""),
        ("198.19.0.0/16", "198.18.0.1"),
    }
    listed_routes = await agent.call("ListRoutes", agent_pb2.ListRoutesRequest(), agent_pb2.Routes)
    assert isinstance(listed_routes, agent_pb2.Routes)
    by_dest = {r.dest: r for r in listed_routes.Routes if r.family == types_pb2.v4}
    assert by_dest["198.18.0.0/24"].device == "eth0" and by_dest["198.18.0.0/24"].scope == 253
    assert by_dest["198.19.0.0/16"].gateway == "198.18.0.1"
    shown = await asyncio.to_thread(
        subprocess.run,
        ["nsenter", "-t", str(pid), "-n", "ip", "-4", "route", "show"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "198.19.0.0/16 via 198.18.0.1 dev eth0" in shown.stdout, shown.stdout
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
    neigh = await asyncio.to_thread(
        subprocess.run,
        ["nsenter", "-t", str(pid), "-n", "ip", "neigh", "show", "dev", "eth0"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "198.18.0.1 lladdr 02:00:00:00:00:01 PERMANENT" in neigh.stdout
    listed = await agent.call(
        "ListInterfaces", agent_pb2.ListInterfacesRequest(), agent_pb2.Interfaces
    )
    assert isinstance(listed, agent_pb2.Interfaces)
    assert "eth0" in {i.name for i in listed.Interfaces}
    await expect_code(
        Code.NOT_FOUND,
        agent,
        "UpdateInterface",
        agent_pb2.UpdateInterfaceRequest(interface=types_pb2.Interface(hwAddr="02:00:00:00:00:99")),
    )


async def test_destroy_sandbox_ends_the_agent(
    agent: AgentClient, agent_process: AgentProcess, rootfs: Path
) -> None:
    await agent.call(
        "CreateSandbox", agent_pb2.CreateSandboxRequest(hostname="pod", sandbox_id="s")
    )
    await create(agent, "left-running", rootfs, ["sleep", "300"])
    await start(agent, "left-running")
    await agent.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
    assert agent_process.proc is not None
    code = await asyncio.to_thread(agent_process.proc.wait, 30)
    assert code == 0
    assert not any((agent_process.workdir / "state/containers").iterdir())
    assert not agent_process.socket.exists()


async def test_init_process_is_also_named_by_its_exec_id(agent: AgentClient, rootfs: Path) -> None:
    """Kata's runtime creates a container with exec_id = container id and uses that id later."""
    await agent.call(
        "CreateContainer",
        agent_pb2.CreateContainerRequest(
            container_id="c1", exec_id="c1", OCI=spec(str(rootfs), ["sh", "-c", "echo init"])
        ),
    )
    await start(agent, "c1")
    assert await agent.read_all("c1", "c1") == b"init\n"
    assert await agent.wait("c1", "c1") == 0
    await expect_code(
        Code.NOT_FOUND,
        agent,
        "WaitProcess",
        agent_pb2.WaitProcessRequest(container_id="c1", exec_id="other"),
    )
    await remove(agent, "c1")


async def test_health_answers_before_the_agent_service_which_keeps_the_policy(
    workdir: Path,
) -> None:
    """--serve-after: Check answers at once; an AgentService call made before the file
    exists waits for it, then runs under the policy settled at start (one that denies
    GetGuestDetails here), as does every later call."""
    policy = workdir / "deny-details.rego"
    policy.write_text(
        "package agent_policy\n"
        "default GetGuestDetailsRequest := false\n"
        "default ListInterfacesRequest := true\n"
    )
    gate = workdir / "drivers-loaded"
    process = AgentProcess(workdir / "gated")
    process.workdir.mkdir()
    process.start("--serve-after", str(gate), "--policy", str(policy))
    client = await Client.connect_unix(process.socket, timeout=10)
    try:
        agent = AgentClient(client)
        assert await agent.check() == health_pb2.HealthCheckResponse.SERVING
        early = asyncio.ensure_future(expect_code(
            Code.PERMISSION_DENIED, agent, "GetGuestDetails", agent_pb2.GuestDetailsRequest()))
        listed = asyncio.ensure_future(
            agent.call("ListInterfaces", agent_pb2.ListInterfacesRequest(), agent_pb2.Interfaces))
        done, _ = await asyncio.wait([early, listed], timeout=0.5)
        assert not done, "an AgentService call ran before --serve-after's file existed"
        assert await agent.check() == health_pb2.HealthCheckResponse.SERVING
        gate.touch()
        assert "blocked by policy" in await early
        assert isinstance(await listed, agent_pb2.Interfaces)
        await expect_code(
            Code.PERMISSION_DENIED, agent, "GetGuestDetails", agent_pb2.GuestDetailsRequest())
    finally:
        await client.close()
        process.stop()
        remove_cgroup_parent(process.cgroup_parent)


async def test_sigterm_while_the_agent_service_is_pending_ends_the_agent(workdir: Path) -> None:
    process = AgentProcess(workdir / "pending")
    process.workdir.mkdir()
    process.start("--serve-after", str(workdir / "never"))
    try:
        assert process.stop() == 0, process.output()
        assert "shutting down (signal)" in process.output()
    finally:
        process.stop()
        remove_cgroup_parent(process.cgroup_parent)


async def test_a_failed_boot_step_fails_the_waiting_calls_at_once(workdir: Path) -> None:
    """--boot-failed: init's report of a failed step, written while the AgentService is
    pending (--serve-after never comes), ends the wait at once: the waiting call and every
    later one fail with the report, Check answers NOT_SERVING, and after --refuse-for the
    agent exits with status 3."""
    failed = workdir / "boot-failed"
    process = AgentProcess(workdir / "failing")
    process.workdir.mkdir()
    process.start("--serve-after", str(workdir / "never"), "--boot-failed", str(failed),
                  "--refuse-for", "3")
    client = await Client.connect_unix(process.socket, timeout=10)
    try:
        agent = AgentClient(client)
        assert await agent.check() == health_pb2.HealthCheckResponse.SERVING
        waiting = asyncio.ensure_future(expect_code(
            Code.FAILED_PRECONDITION, agent, "GetGuestDetails", agent_pb2.GuestDetailsRequest()))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        failed.write_text('step "drivers" exited with status 1\nmodprobe: no such module\n')
        message = await asyncio.wait_for(waiting, 2)
        assert message == ('guest failed to start: init\'s boot step failed: step "drivers" '
                           "exited with status 1; modprobe: no such module")
        assert await agent.check() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert message == await expect_code(
            Code.FAILED_PRECONDITION, agent, "ListInterfaces", agent_pb2.ListInterfacesRequest())
    finally:
        await client.close()
    assert process.proc is not None
    assert await asyncio.to_thread(process.proc.wait, 20) == 3, process.output()
    assert "coco-agent: guest failed to start: init's boot step failed" in process.output()
    process.stop()
    remove_cgroup_parent(process.cgroup_parent)


async def test_a_boot_step_that_failed_before_listening_is_served(workdir: Path) -> None:
    """A step failed before the agent could listen (--wait-for never comes): it listens
    anyway, Check answers NOT_SERVING and every AgentService call the report."""
    failed = workdir / "boot-failed"
    failed.write_text('step "modules" exited with status 1\nmodules not loaded: vsock\n')
    process = AgentProcess(workdir / "failed-early")
    process.workdir.mkdir()
    process.start("--wait-for", str(workdir / "never"), "--boot-failed", str(failed),
                  ready="serving on")
    client = await Client.connect_unix(process.socket, timeout=10)
    try:
        agent = AgentClient(client)
        assert await agent.check() == health_pb2.HealthCheckResponse.NOT_SERVING
        message = await expect_code(
            Code.FAILED_PRECONDITION, agent, "CreateSandbox", agent_pb2.CreateSandboxRequest())
        assert 'step "modules" exited with status 1; modules not loaded: vsock' in message
    finally:
        await client.close()
        assert process.stop() == 3, process.output()
        remove_cgroup_parent(process.cgroup_parent)


def pause_bundle_for_nobody(workdir: Path) -> Path:
    """The host's catatonit as a pause bundle the agent's PID namespace init (nobody) reaches."""
    workdir.chmod(0o711)
    bundle = workdir / "pause_bundle"
    write_pause_bundle(bundle, Path("/usr/bin/catatonit"))
    return bundle


def nspid(pid: int) -> list[int]:
    """The process's pid in each PID namespace it is in, outermost first."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(n) for n in line.split()[1:]]
    raise AssertionError(f"no NSpid for {pid}")


async def test_the_agent_holds_the_pods_pid_namespace_when_no_container_made_it(
    workdir: Path, rootfs: Path
) -> None:
    """containerd's sandbox API runs no pause container: the first container asking to join
    the pod's PID namespace (sandbox_pidns) finds none. The agent then starts the image's pause
    program (as nobody) as the namespace's init, so the first container's exit kills nobody
    else; the init goes with the sandbox."""
    bundle = pause_bundle_for_nobody(workdir)
    program = str(bundle / "rootfs/pause")
    process = AgentProcess(workdir / "agent")  # rootfs lies beneath its shared root
    process.workdir.mkdir(exist_ok=True)
    process.start("--pause-bundle", str(bundle))
    client = await Client.connect_unix(process.socket, timeout=10)
    try:
        agent = AgentClient(client)
        await agent.call(
            "CreateSandbox", agent_pb2.CreateSandboxRequest(hostname="pod", sandbox_id="s"))
        for cid, seconds in (("first", "301"), ("second", "302")):
            await agent.call("CreateContainer", agent_pb2.CreateContainerRequest(
                container_id=cid, OCI=spec(str(rootfs), ["sleep", seconds]),
                sandbox_pidns=True))
            await start(agent, cid)
        [init] = [p for p in psutil.process_iter(["cmdline", "uids"])
                  if p.info["cmdline"] == [program, "-P"]]
        assert init.info["uids"].real == 65534
        assert process.proc is not None and init.ppid() == process.proc.pid
        assert nspid(init.pid) == [init.pid, 1]  # PID 1 of a namespace of its own
        # In the second container: PID 1 is the pause program, the first's sleep is seen.
        await agent.call("ExecProcess", agent_pb2.ExecProcessRequest(
            container_id="second", exec_id="ps",
            process=process_spec(["sh", "-c", "tr '\\0' ' ' </proc/1/cmdline; echo;"
                                  " cat /proc/[0-9]*/cmdline | tr '\\0' ' '"])))
        seen = (await agent.read_all("second", "ps")).decode()
        assert seen.splitlines()[0] == f"{program} -P "
        assert "sleep 301" in seen and "sleep 302" in seen
        # The first container's exit leaves the second running.
        await agent.call("SignalProcess", agent_pb2.SignalProcessRequest(
            container_id="first", signal=signal.SIGKILL))
        assert await agent.wait("first") == 137
        await agent.call("ExecProcess", agent_pb2.ExecProcessRequest(
            container_id="second", exec_id="alive", process=process_spec(["true"])))
        assert await agent.wait("second", "alive") == 0
        await agent.call("DestroySandbox", agent_pb2.DestroySandboxRequest())
        assert process.proc is not None
        assert await asyncio.to_thread(process.proc.wait, 30) == 0
        assert not init.is_running()
    finally:
        await client.close()
        process.stop()
        remove_cgroup_parent(process.cgroup_parent)


async def test_a_pod_pid_namespace_without_a_pause_program_is_refused_by_name(
    agent: AgentClient, rootfs: Path
) -> None:
    """The host's agent has no /pause_bundle: the container is refused, naming what is
    missing, and nothing is left (the same id can be created without sandbox_pidns)."""
    message = await expect_code(
        Code.FAILED_PRECONDITION, agent, "CreateContainer", agent_pb2.CreateContainerRequest(
            container_id="c1", OCI=spec(str(rootfs), ["sleep", "300"]), sandbox_pidns=True))
    assert "pod's PID namespace" in message and "/pause_bundle" in message, message
    await create(agent, "c1", rootfs, ["true"])
    await remove(agent, "c1")
