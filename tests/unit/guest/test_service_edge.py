"""The ttrpc edge: policy first, one domain call, typed errors to status codes."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any, cast

import pytest

from guest.agent.errors import FailedPrecondition, NotFound
from guest.agent.health import HealthService
from guest.agent.network import Network
from guest.agent.policy import Policy, RegoPolicy
from guest.agent.sandbox import Sandbox
from guest.agent.service import REDACTED, AgentService
from protocols.api.kata import agent_pb2, health_pb2
from protocols.ttrpc import Code, RequestContext, TtrpcError

CTX = RequestContext("grpc.AgentService", "x", {}, None)


class FakeSandbox:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[tuple[str, Any]] = []

    async def start_container(self, container_id: str) -> None:
        self.calls.append(("start", container_id))
        if self.error is not None:
            raise self.error

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        return 42

    async def read_stream(self, container_id: str, exec_id: str, stream: str, size: int) -> bytes:
        self.calls.append(("read", stream))
        return b"" if container_id == "done" else b"secret output"


def edge(sandbox: FakeSandbox, policy: Policy | None = None) -> AgentService:
    network = Network()
    return AgentService(cast(Sandbox, sandbox), network, policy)


async def test_calls_the_domain_once() -> None:
    sandbox = FakeSandbox()
    await edge(sandbox).StartContainer(agent_pb2.StartContainerRequest(container_id="c"), CTX)
    assert sandbox.calls == [("start", "c")]
    reply = await edge(sandbox).WaitProcess(agent_pb2.WaitProcessRequest(container_id="c"), CTX)
    assert reply.status == 42


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NotFound("no c"), Code.NOT_FOUND),
        (FailedPrecondition("cannot start"), Code.FAILED_PRECONDITION),
        (OSError(errno.ENOENT, "gone"), Code.NOT_FOUND),
        (OSError(errno.EIO, "io"), Code.INTERNAL),
    ],
)
async def test_errors_become_status_codes(error: Exception, code: Code) -> None:
    with pytest.raises(TtrpcError) as info:
        await edge(FakeSandbox(error)).StartContainer(
            agent_pb2.StartContainerRequest(container_id="c"), CTX
        )
    assert info.value.code == code


REGO = "package agent_policy\n\nimport future.keywords.if\n\n"


async def test_policy_is_checked_before_the_domain() -> None:
    sandbox = FakeSandbox()
    service = edge(sandbox, RegoPolicy(REGO + "default StartContainerRequest := false\n", "t"))
    with pytest.raises(TtrpcError) as info:
        await service.StartContainer(agent_pb2.StartContainerRequest(container_id="c"), CTX)
    assert info.value.code == Code.PERMISSION_DENIED
    assert info.value.message == (
        "StartContainerRequest is blocked by policy: rule StartContainerRequest: its default "
        "`default StartContainerRequest := false` (policy.rego:5) holds"
    )
    assert sandbox.calls == []


async def test_set_policy_replaces_the_policy_only_when_the_policy_allows_it() -> None:
    service = edge(FakeSandbox())  # the development default allows everything
    await service.SetPolicy(
        agent_pb2.SetPolicyRequest(policy=REGO + "default SetPolicyRequest := false\n"), CTX
    )
    with pytest.raises(TtrpcError) as info:
        await service.SetPolicy(agent_pb2.SetPolicyRequest(policy=REGO), CTX)
    assert info.value.code == Code.PERMISSION_DENIED
    assert info.value.message.startswith("SetPolicyRequest is blocked by policy: rule SetPolicy")


async def test_set_policy_sees_the_new_text_and_rejects_bad_rego() -> None:
    gate = REGO + (
        "default SetPolicyRequest := false\n"
        'SetPolicyRequest if {\n    contains(input.policy, "# signed-off")\n}\n'
    )
    service = edge(FakeSandbox(), RegoPolicy(gate, "t"))
    with pytest.raises(TtrpcError) as info:
        await service.SetPolicy(agent_pb2.SetPolicyRequest(policy=REGO), CTX)
    assert "(request field: input.policy)" in info.value.message
    with pytest.raises(TtrpcError) as info:
        await service.SetPolicy(agent_pb2.SetPolicyRequest(policy="# signed-off\nnope"), CTX)
    assert info.value.code == Code.INVALID_ARGUMENT
    await service.SetPolicy(agent_pb2.SetPolicyRequest(policy=REGO + "# signed-off\n"), CTX)
    assert service.policy.origin == "SetPolicy"


async def test_denied_reads_are_redacted_not_refused() -> None:
    sandbox = FakeSandbox()
    service = edge(sandbox, RegoPolicy(REGO + "default ReadStreamRequest := false\n", "t"))
    reply = await service.ReadStdout(agent_pb2.ReadStreamRequest(container_id="c", len=9), CTX)
    assert reply.data == REDACTED
    reply = await service.ReadStderr(agent_pb2.ReadStreamRequest(container_id="done"), CTX)
    assert reply.data == b""  # the end of the stream stays the end of the stream
    assert sandbox.calls == [("read", "stdout"), ("read", "stderr")]
    reply = await edge(sandbox).ReadStdout(agent_pb2.ReadStreamRequest(container_id="c"), CTX)
    assert reply.data == b"secret output"


async def test_a_policy_that_fails_to_evaluate_is_an_internal_error() -> None:
    sandbox = FakeSandbox()
    service = edge(sandbox, RegoPolicy(REGO + 'StartContainerRequest := "maybe"\n', "t"))
    with pytest.raises(TtrpcError) as info:
        await service.StartContainer(agent_pb2.StartContainerRequest(container_id="c"), CTX)
    assert info.value.code == Code.INTERNAL
    assert sandbox.calls == []


async def test_health_is_never_policed() -> None:
    reply = await HealthService().Check(health_pb2.CheckRequest(), CTX)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_every_required_rpc_has_a_handler() -> None:
    required = [
        "GetGuestDetails",
        "CreateSandbox",
        "DestroySandbox",
        "CreateContainer",
        "StartContainer",
        "RemoveContainer",
        "ExecProcess",
        "SignalProcess",
        "WaitProcess",
        "ReadStdout",
        "ReadStderr",
        "WriteStdin",
        "CloseStdin",
        "TtyWinResize",
        "UpdateContainer",
        "StatsContainer",
        "PauseContainer",
        "ResumeContainer",
        "GetOOMEvent",
        "CopyFile",
        "SetGuestDateTime",
        "UpdateInterface",
        "UpdateRoutes",
        "ListInterfaces",
        "ListRoutes",
        "AddARPNeighbors",
        "SetPolicy",
    ]
    service = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
    names = {m.name for m in service.methods}
    assert set(required) <= names
    for name in names:
        assert hasattr(AgentService, name) == (name in required), name


def test_sandbox_paths(tmp_path: Path) -> None:
    from guest.agent.sandbox import AgentPaths

    paths = AgentPaths(state_dir=tmp_path, shared_root=tmp_path / "shared")
    assert paths.bundles == tmp_path / "containers"
    assert paths.runc_root == tmp_path / "runc"
