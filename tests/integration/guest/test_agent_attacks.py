"""The host attacks the reference agent (a real process on a unix socket, in its own UTS,
network and mount namespaces): each attempt is refused and nothing lands outside its root.

The agent runs as on a confidential guest (``--confidential``, or given initdata) except where a
test shows that a protection holds whatever the policy: then it runs with the development
default, which allows every request.
"""

from __future__ import annotations

import asyncio
import gzip
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from protocols.api.kata import agent_pb2
from protocols.ttrpc import Client, Code, TtrpcError
from tests.integration.guest.agentproc import AgentProcess
from tests.integration.guest.conftest import remove_cgroup_parent
from tests.integration.guest.support import AgentClient, process, spec

pytestmark = pytest.mark.integration

Start = Callable[..., Coroutine[Any, Any, tuple[AgentProcess, AgentClient]]]

INITDATA_POLICY = """package agent_policy

import future.keywords.if

default ExecProcessRequest := false
default SetPolicyRequest := false
default CreateContainerRequest := true
default StartContainerRequest := true
default RemoveContainerRequest := true
default WaitProcessRequest := true
default SignalProcessRequest := true
"""


def initdata_disk(path: Path, document: str) -> Path:
    stream = gzip.compress(document.encode(), mtime=0)
    raw = b"initdata" + struct.pack("<Q", len(stream)) + stream
    path.write_bytes(raw + b"\0" * (-len(raw) % 512))
    return path


def initdata_toml(policy: str, version: str = "0.1.0") -> str:
    header = f'version = "{version}"\nalgorithm = "sha256"\n\n[data]\n'
    return header + f'"policy.rego" = """\n{policy}"""\n'


@pytest.fixture
async def start_agent(workdir: Path) -> AsyncIterator[Start]:
    started: list[tuple[AgentProcess, Client]] = []

    async def start(*extra: str, ready: str = "coco-agent: ready") -> tuple[AgentProcess, Any]:
        agent_process = AgentProcess(workdir / "agent")
        agent_process.workdir.mkdir(exist_ok=True)
        agent_process.start(*extra, ready=ready)
        client = await Client.connect_unix(agent_process.socket, timeout=10)
        started.append((agent_process, client))
        return agent_process, AgentClient(client)

    try:
        yield start
    finally:
        for agent_process, client in started:
            await client.close()
            agent_process.stop()
            print(agent_process.output()[-3000:])
            remove_cgroup_parent(agent_process.cgroup_parent)


async def refused(code: Code, agent: AgentClient, method: str, request: Any) -> str:
    with pytest.raises(TtrpcError) as info:
        await agent.call(method, request)
    assert info.value.code == code, info.value
    return info.value.message


def mounts_of(agent_process: AgentProcess) -> str:
    assert agent_process.proc is not None
    return Path(f"/proc/{agent_process.proc.pid}/mountinfo").read_text()


async def test_copy_file_through_a_planted_symlink(start_agent: Start, workdir: Path) -> None:
    outside = workdir / "host-chosen-target"
    outside.mkdir()
    shared = workdir / "agent/shared"
    shared.mkdir(parents=True)
    (shared / "planted").symlink_to(outside)
    # Whatever the policy: the development default allows CopyFile, the agent still refuses.
    _, agent = await start_agent()
    message = await refused(
        Code.PERMISSION_DENIED,
        agent,
        "CopyFile",
        agent_pb2.CopyFileRequest(
            path=str(shared / "planted/evil"), file_mode=0o100644, dir_mode=0o755, data=b"owned"
        ),
    )
    assert message == f"CopyFile target: {shared}/planted is a symlink: refusing to follow it"
    assert list(outside.iterdir()) == []
    await agent.call(
        "CopyFile",
        agent_pb2.CopyFileRequest(path=str(shared / "fine"), file_mode=0o100644, data=b"ok"),
    )
    assert (shared / "fine").read_bytes() == b"ok"


async def test_a_9p_storage_over_the_agents_directory(start_agent: Start, workdir: Path) -> None:
    agent_process, agent = await start_agent()
    # The agent answers Check before its AgentService (and the sandbox that makes the state
    # dir) is built; an AgentService call returns once they are.
    await agent.call("GetGuestDetails", agent_pb2.GuestDetailsRequest())
    state = workdir / "agent/state"
    before = sorted(p.name for p in state.iterdir())
    shared = workdir / "agent/shared"
    (shared / "planted").symlink_to(state)
    cases = {
        str(state): "must be beneath",
        f"{shared}/../state": "must be beneath",
        f"{shared}/planted": "is a symlink",
        f"{shared}/planted/containers": "is a symlink",
    }
    for mount_point, reason in cases.items():
        nine_p = agent_pb2.Storage(
            driver="9p", source="share", fstype="9p", mount_point=mount_point
        )
        message = await refused(
            Code.PERMISSION_DENIED,
            agent,
            "CreateSandbox",
            agent_pb2.CreateSandboxRequest(sandbox_id="s", storages=[nine_p]),
        )
        assert reason in message, message
    assert sorted(p.name for p in state.iterdir()) == before
    assert f" {state}" not in mounts_of(agent_process).replace(f" {state}/", "")


async def test_the_confidential_default_refuses_host_storages_exec_and_copy(
    start_agent: Start, rootfs: Path, workdir: Path
) -> None:
    _, agent = await start_agent("--confidential")
    shared = workdir / "agent/shared"
    for driver in ("9p", "virtio-fs", "bind", "blk"):
        host_storage = agent_pb2.Storage(
            driver=driver, source="share", mount_point=f"{shared}/sandbox"
        )
        message = await refused(
            Code.PERMISSION_DENIED,
            agent,
            "CreateContainer",
            agent_pb2.CreateContainerRequest(
                container_id="c0", storages=[host_storage], OCI=spec(str(rootfs), ["true"])
            ),
        )
        assert message.startswith("CreateContainerRequest is blocked by policy"), message
        assert "storage.driver in policy_data.guest_storage_drivers" in message
    assert not (shared / "sandbox").exists()
    message = await refused(
        Code.PERMISSION_DENIED,
        agent,
        "CopyFile",
        agent_pb2.CopyFileRequest(path=f"{shared}/x", file_mode=0o100644, data=b"x"),
    )
    assert "rule CopyFileRequest: its default `default CopyFileRequest := false`" in message
    assert not (shared / "x").exists()
    # A container from the guest's own storage kinds runs; exec into it is refused.
    await agent.call(
        "CreateContainer",
        agent_pb2.CreateContainerRequest(
            container_id="c1", OCI=spec(str(rootfs), ["sleep", "300"])
        ),
    )
    await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id="c1"))
    message = await refused(
        Code.PERMISSION_DENIED,
        agent,
        "ExecProcess",
        agent_pb2.ExecProcessRequest(
            container_id="c1", exec_id="e", process=process(["cat", "/etc/shadow"])
        ),
    )
    assert message == (
        "ExecProcessRequest is blocked by policy: rule ExecProcessRequest: its default "
        "`default ExecProcessRequest := false` (confidential.rego:18) holds"
    )
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="c1"))
    message = await refused(
        Code.PERMISSION_DENIED,
        agent,
        "SetPolicy",
        agent_pb2.SetPolicyRequest(policy="package agent_policy\ndefault X := true\n"),
    )
    assert message.startswith("SetPolicyRequest is blocked by policy")


async def test_set_policy_after_an_initdata_policy(
    start_agent: Start, rootfs: Path, workdir: Path
) -> None:
    disk = initdata_disk(workdir / "initdata.img", initdata_toml(INITDATA_POLICY))
    _, agent = await start_agent("--initdata", str(disk))
    written = workdir / "agent/initdata"
    assert (written / "policy.rego").read_text() == INITDATA_POLICY
    assert (written / "initdata.toml").read_text() == initdata_toml(INITDATA_POLICY)
    permissive = "package agent_policy\ndefault ExecProcessRequest := true\n"
    message = await refused(
        Code.PERMISSION_DENIED, agent, "SetPolicy", agent_pb2.SetPolicyRequest(policy=permissive)
    )
    assert message == (
        "SetPolicyRequest is blocked by policy: rule SetPolicyRequest: its default "
        "`default SetPolicyRequest := false` (policy.rego:6) holds"
    )
    await agent.call(
        "CreateContainer",
        agent_pb2.CreateContainerRequest(
            container_id="c1", OCI=spec(str(rootfs), ["sleep", "300"])
        ),
    )
    await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id="c1"))
    await refused(  # still the initdata policy
        Code.PERMISSION_DENIED,
        agent,
        "ExecProcess",
        agent_pb2.ExecProcessRequest(container_id="c1", exec_id="e", process=process(["id"])),
    )
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id="c1"))


async def test_bad_initdata_refuses_to_start_and_says_why(
    start_agent: Start, workdir: Path
) -> None:
    disk = initdata_disk(workdir / "bad.img", initdata_toml(INITDATA_POLICY, version="9.9"))
    agent_process, agent = await start_agent(
        "--initdata", str(disk), "--refuse-for", "5", ready="coco-agent: refusing"
    )
    with pytest.raises(TtrpcError) as info:
        await agent.check()
    assert info.value.code == Code.FAILED_PRECONDITION
    assert info.value.message == (
        f"guest refused to start: initdata on {disk}: version must be '0.1.0', got '9.9'"
    )
    # The agent API is not served at all.
    await refused(Code.UNIMPLEMENTED, agent, "CreateSandbox", agent_pb2.CreateSandboxRequest())
    assert f"coco-agent: guest refused to start: initdata on {disk}" in agent_process.output()
    assert agent_process.proc is not None
    assert await asyncio.to_thread(agent_process.proc.wait, 30) == 2
    assert not (workdir / "agent/initdata").exists()
