"""The ttrpc edge: policy first, one domain call, typed errors to status codes."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any, cast

import pytest

from guest.agent.errors import FailedPrecondition, NotFound
from guest.agent.network import Network
from guest.agent.policy import Policy
from guest.agent.sandbox import Sandbox
from guest.agent.service import AgentService, HealthService
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


async def test_policy_is_checked_before_the_domain() -> None:
    sandbox = FakeSandbox()
    service = edge(
        sandbox, Policy.parse('{"default": "allow", "rules": {"StartContainer": "deny"}}')
    )
    with pytest.raises(TtrpcError) as info:
        await service.StartContainer(agent_pb2.StartContainerRequest(container_id="c"), CTX)
    assert info.value.code == Code.PERMISSION_DENIED
    assert sandbox.calls == []


async def test_set_policy_replaces_the_policy() -> None:
    service = edge(FakeSandbox())
    await service.SetPolicy(agent_pb2.SetPolicyRequest(policy='{"default": "deny"}'), CTX)
    with pytest.raises(TtrpcError) as info:
        await service.SetPolicy(agent_pb2.SetPolicyRequest(policy='{"default": "allow"}'), CTX)
    assert info.value.code == Code.PERMISSION_DENIED


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
