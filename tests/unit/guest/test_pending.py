"""PendingService: the AgentService registered before its implementation exists."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from guest.agent.bootsteps import BootStepFailed
from guest.agent.health import HealthService
from guest.agent.pending import PendingService
from protocols.api.kata import agent_pb2, health_pb2
from protocols.ttrpc import Code, RequestContext, Server, TtrpcError

REPO = Path(__file__).resolve().parents[3]
CTX = RequestContext("grpc.AgentService", "GetGuestDetails", {}, None)
SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]


class Impl:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def GetGuestDetails(
        self, request: agent_pb2.GuestDetailsRequest, ctx: RequestContext
    ) -> agent_pb2.GuestDetailsResponse:
        self.calls.append(ctx.method)
        return agent_pb2.GuestDetailsResponse(mem_block_size_bytes=7)


async def test_a_call_waits_for_the_implementation_then_runs_on_it() -> None:
    pending = PendingService(SERVICE)
    call = asyncio.ensure_future(
        pending.GetGuestDetails(agent_pb2.GuestDetailsRequest(), CTX)  # type: ignore[attr-defined]
    )
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not call.done() and not pending.ready
    impl = Impl()
    pending.resolve(impl)
    reply = await call
    assert reply.mem_block_size_bytes == 7 and impl.calls == ["GetGuestDetails"]
    assert pending.ready


async def test_a_method_the_implementation_lacks_is_unimplemented() -> None:
    pending = PendingService(SERVICE)
    pending.resolve(Impl())
    with pytest.raises(TtrpcError) as info:
        await pending.ExecProcess(agent_pb2.ExecProcessRequest(), CTX)  # type: ignore[attr-defined]
    assert info.value.code == Code.UNIMPLEMENTED and "ExecProcess" in info.value.message


async def test_a_failed_start_answers_unavailable_naming_the_cause() -> None:
    pending = PendingService(SERVICE)
    call = asyncio.ensure_future(
        pending.GetGuestDetails(agent_pb2.GuestDetailsRequest(), CTX)  # type: ignore[attr-defined]
    )
    await asyncio.sleep(0)
    pending.fail(ImportError("no module named guest.agent.sandbox"))
    pending.fail(RuntimeError("later failures change nothing"))
    for waiter in (call, pending.GetGuestDetails(agent_pb2.GuestDetailsRequest(), CTX)):  # type: ignore[attr-defined]
        with pytest.raises(TtrpcError) as info:
            await waiter
        assert info.value.code == Code.UNAVAILABLE
        assert "no module named guest.agent.sandbox" in info.value.message
    assert not pending.ready


STEP_FAILED = BootStepFailed('init\'s boot step failed: step "drivers" exited with status 1')


async def check(health: HealthService) -> int:
    reply = await health.Check(health_pb2.CheckRequest(), CTX)
    return int(reply.status)


async def test_health_serves_while_pending_and_once_resolved() -> None:
    pending = PendingService(SERVICE)
    health = HealthService(failed=lambda: pending.failed)
    assert await check(health) == health_pb2.HealthCheckResponse.SERVING
    pending.resolve(Impl())
    assert await check(health) == health_pb2.HealthCheckResponse.SERVING
    assert pending.ready and not pending.failed


async def test_a_boot_step_failing_while_calls_wait_fails_them_at_once() -> None:
    pending = PendingService(SERVICE)
    health = HealthService(failed=lambda: pending.failed)
    calls = [asyncio.ensure_future(
        pending.GetGuestDetails(agent_pb2.GuestDetailsRequest(), CTX))  # type: ignore[attr-defined]
        for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(call.done() for call in calls)
    pending.fail(STEP_FAILED)
    done, _ = await asyncio.wait(calls, timeout=0.05)  # a few turns of the loop, no more
    assert len(done) == 2
    for call in calls:
        with pytest.raises(TtrpcError) as info:
            await call
        assert info.value.code == Code.FAILED_PRECONDITION
        assert info.value.message == f"guest failed to start: {STEP_FAILED}"
    assert await check(health) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert pending.failed and not pending.ready


async def test_a_boot_step_failed_before_any_call_fails_every_call() -> None:
    pending = PendingService(SERVICE)
    health = HealthService(failed=lambda: pending.failed)
    pending.fail(STEP_FAILED)
    assert await check(health) == health_pb2.HealthCheckResponse.NOT_SERVING
    for method in ("CreateSandbox", "ExecProcess", "GetGuestDetails"):
        with pytest.raises(TtrpcError) as info:
            await getattr(pending, method)(agent_pb2.GuestDetailsRequest(), CTX)
        assert info.value.code == Code.FAILED_PRECONDITION
        assert 'step "drivers" exited with status 1' in info.value.message


async def test_a_cancelled_waiter_leaves_the_others_waiting() -> None:
    pending = PendingService(SERVICE)
    calls = [asyncio.ensure_future(
        pending.GetGuestDetails(agent_pb2.GuestDetailsRequest(), CTX))  # type: ignore[attr-defined]
        for _ in range(2)]
    await asyncio.sleep(0)
    calls[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await calls[0]
    pending.resolve(Impl())
    assert (await calls[1]).mem_block_size_bytes == 7


async def test_the_server_registers_every_rpc_of_the_service() -> None:
    server = Server()
    server.register_service(SERVICE, PendingService(SERVICE))
    for method in SERVICE.methods:
        assert server._lookup(SERVICE.full_name, method.name)
    server.register_service(health_pb2.DESCRIPTOR.services_by_name["Health"], object())


def test_the_agent_listens_without_the_container_machinery() -> None:
    """What the agent imports before it listens: not the sandbox, networking, image pull,
    the reaper or the AgentService (they load in a worker thread after it listens)."""
    probe = (
        "import sys, guest.agent.__main__ as agent\n"
        "from guest.image_pull.config import guest_pull_config\n"
        "args = agent.parse_args(['--unix', '/nonexistent'])\n"
        "agent.prepare(args, agent.evidence_source(None))\n"
        "guest_pull_config(None, args.image_pull_config, None)\n"
        "late = {'guest.agent.service', 'guest.agent.sandbox', 'guest.agent.network',\n"
        "        'guest.agent.reaper', 'guest.agent.containers', 'guest.image_pull.puller',\n"
        "        'concurrent.futures.thread', 'protocols.initdata', 'hashlib', 'secrets'}\n"
        "assert not late & set(sys.modules), late & set(sys.modules)\n"
        "agent.import_machinery()\n"
        "assert late - {'concurrent.futures.thread', 'protocols.initdata', 'secrets',\n"
        "               'hashlib'} <= set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True)


def test_the_agents_initdata_magic_is_the_formats() -> None:
    from guest.agent import initdata
    from protocols import initdata as format_

    assert initdata.MAGIC == format_.DISK_MAGIC
