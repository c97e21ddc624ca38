"""PendingService: the AgentService pending on the server before its implementation exists."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf.empty_pb2 import Empty

from guest.agent.bootsteps import BootStepFailed
from guest.agent.health import HealthService
from guest.agent.pending import AGENT_SERVICE, PendingService
from protocols.api.kata import agent_pb2, health_pb2
from protocols.ttrpc import Client, Code, RequestContext, Server, TtrpcError

REPO = Path(__file__).resolve().parents[3]
SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]


class Impl:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def GetGuestDetails(
        self, request: agent_pb2.GuestDetailsRequest, ctx: RequestContext
    ) -> agent_pb2.GuestDetailsResponse:
        self.calls.append(ctx.method)
        return agent_pb2.GuestDetailsResponse(mem_block_size_bytes=7)


@pytest.fixture
async def socket_path() -> AsyncIterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="coco-pending-"))  # short: sun_path's 107 bytes
    yield where / "agent.sock"
    shutil.rmtree(where, ignore_errors=True)


@contextlib.asynccontextmanager
async def agent_server(path: Path) -> AsyncIterator[tuple[Server, PendingService, Client]]:
    """The agent's arrangement: Health, and the AgentService pending on a PendingService."""
    pending = PendingService()
    server = Server()
    server.register_service(health_pb2.DESCRIPTOR.services_by_name["Health"],
                            HealthService(failed=lambda: pending.failed))
    server.register_pending(AGENT_SERVICE, pending.wait)
    await server.serve_unix(path)
    try:
        async with await Client.connect_unix(path) as client:
            yield server, pending, client
    finally:
        await server.close()


async def details(client: Client) -> agent_pb2.GuestDetailsResponse:
    return await client.call(AGENT_SERVICE, "GetGuestDetails", agent_pb2.GuestDetailsRequest(),
                             agent_pb2.GuestDetailsResponse)


async def check(client: Client) -> int:
    reply = await client.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                              health_pb2.HealthCheckResponse)
    return int(reply.status)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


def test_the_pending_name_is_the_agent_services() -> None:
    assert SERVICE.full_name == AGENT_SERVICE


async def test_a_call_waits_for_the_service_then_runs_on_it(socket_path: Path) -> None:
    async with agent_server(socket_path) as (server, pending, client):
        call = asyncio.ensure_future(details(client))
        await settle()
        assert not call.done() and not pending.ready
        assert await check(client) == health_pb2.HealthCheckResponse.SERVING
        impl = Impl()
        server.register_service(SERVICE, impl)
        pending.resolve()
        assert (await call).mem_block_size_bytes == 7 and impl.calls == ["GetGuestDetails"]
        assert pending.ready and not pending.failed
        assert (await details(client)).mem_block_size_bytes == 7
        assert await check(client) == health_pb2.HealthCheckResponse.SERVING


async def test_a_method_the_implementation_lacks_is_unimplemented(socket_path: Path) -> None:
    async with agent_server(socket_path) as (server, pending, client):
        call = asyncio.ensure_future(client.call(
            AGENT_SERVICE, "ExecProcess", agent_pb2.ExecProcessRequest(), Empty))
        await settle()
        server.register_service(SERVICE, Impl())
        pending.resolve()
        with pytest.raises(TtrpcError) as info:
            await call
        assert info.value.code == Code.UNIMPLEMENTED and "ExecProcess" in info.value.message


async def test_a_failed_start_answers_unavailable_naming_the_cause(socket_path: Path) -> None:
    async with agent_server(socket_path) as (_server, pending, client):
        call = asyncio.ensure_future(details(client))
        await settle()
        pending.fail(ImportError("no module named guest.agent.sandbox"))
        pending.fail(RuntimeError("later failures change nothing"))
        for waiter in (call, details(client)):
            with pytest.raises(TtrpcError) as info:
                await waiter
            assert info.value.code == Code.UNAVAILABLE
            assert "no module named guest.agent.sandbox" in info.value.message
        assert not pending.ready
        assert await check(client) == health_pb2.HealthCheckResponse.NOT_SERVING


STEP_FAILED = BootStepFailed('init\'s boot step failed: step "drivers" exited with status 1')


async def test_a_boot_step_failing_while_calls_wait_fails_them_at_once(socket_path: Path) -> None:
    async with agent_server(socket_path) as (_server, pending, client):
        calls = [asyncio.ensure_future(details(client)) for _ in range(2)]
        await settle()
        assert not any(call.done() for call in calls)
        assert await check(client) == health_pb2.HealthCheckResponse.SERVING
        pending.fail(STEP_FAILED)
        done, _ = await asyncio.wait(calls, timeout=1)
        assert len(done) == 2
        for call in calls:
            with pytest.raises(TtrpcError) as info:
                await call
            assert info.value.code == Code.FAILED_PRECONDITION
            assert info.value.message == f"guest failed to start: {STEP_FAILED}"
        assert await check(client) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert pending.failed and not pending.ready


async def test_a_boot_step_failed_before_any_call_fails_every_call(socket_path: Path) -> None:
    async with agent_server(socket_path) as (_server, pending, client):
        pending.fail(STEP_FAILED)
        assert await check(client) == health_pb2.HealthCheckResponse.NOT_SERVING
        for method in ("CreateSandbox", "ExecProcess", "GetGuestDetails"):
            with pytest.raises(TtrpcError) as info:
                await client.call(AGENT_SERVICE, method, Empty(), Empty)
            assert info.value.code == Code.FAILED_PRECONDITION
            assert 'step "drivers" exited with status 1' in info.value.message


async def test_a_cancelled_waiter_leaves_the_others_waiting() -> None:
    pending = PendingService()
    waits = [asyncio.ensure_future(pending.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    waits[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waits[0]
    pending.resolve()
    await waits[1]
    assert pending.ready


def test_the_agent_listens_without_the_container_machinery() -> None:
    """What the agent imports before it listens: not the sandbox, networking, image pull,
    the reaper, the AgentService or its descriptors (they load in a worker thread after it
    listens)."""
    probe = (
        "import sys, guest.agent.__main__ as agent\n"
        "from guest.image_pull.config import guest_pull_config\n"
        "args = agent.parse_args(['--unix', '/nonexistent'])\n"
        "agent.prepare(args, agent.evidence_source(None))\n"
        "guest_pull_config(None, args.image_pull_config, None)\n"
        "late = {'guest.agent.service', 'guest.agent.sandbox', 'guest.agent.network',\n"
        "        'guest.agent.reaper', 'guest.agent.containers', 'guest.image_pull.puller',\n"
        "        'concurrent.futures.thread', 'protocols.initdata', 'hashlib', 'secrets',\n"
        "        'protocols.api.kata.agent_pb2', 'protocols.api.kata.oci_pb2', 'json',\n"
        "        'guest.agent.rego', 'guest.agent.policy_input', 'guest.agent.policy_explain',\n"
        "        'guest.tee.snp', 'guest.tee.tdx', 'dataclasses'}\n"
        "assert not late & set(sys.modules), late & set(sys.modules)\n"
        "agent.import_machinery()\n"
        "never = {'concurrent.futures.thread', 'protocols.initdata', 'secrets', 'hashlib',\n"
        "         'guest.agent.rego', 'guest.agent.policy_explain', 'guest.tee.snp',\n"
        "         'guest.tee.tdx'}\n"
        "assert late - never <= set(sys.modules), late - never - set(sys.modules)\n"
        "assert not never & set(sys.modules), never & set(sys.modules)  # without a pull, Rego\n"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True)


def test_the_agents_initdata_magic_is_the_formats() -> None:
    from guest.agent import initdata
    from protocols import initdata as format_

    assert initdata.MAGIC == format_.DISK_MAGIC
