"""AgentClient.dial over hybrid vsock: the guest's announcement gates the first CONNECT, each
attempt has its own bounds, and the error names what the last attempt saw."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hypervisor.console import ConsoleWatch
from hypervisor.vm import AgentChannel
from protocols.api.kata import agent_pb2, health_pb2
from protocols.ttrpc import Code, RequestContext, Server, TtrpcError
from shim.core.errors import FailedPrecondition, Unavailable
from shim.core.timeouts import AGENT_RPC, Timeouts
from shim.pod.agent import AgentClient

FAST = Timeouts(agent={**AGENT_RPC, "Check": 0.3}, agent_dial_attempt=0.2,
                agent_dial_retry_pause=0.01)


def channel(socket_dir: Path, ready: Callable[[], Awaitable[None]] | None = None
            ) -> AgentChannel:
    return AgentChannel(guest_cid=3, hybrid_socket=socket_dir / "vsock.sock",
                        wait_guest_ready=ready)


@dataclass
class Front:
    """vhost-device-vsock's unix socket: ``ok`` splices to the agent, ``refuse`` hangs up
    (no listener in the guest yet), ``stall`` reads CONNECT and never answers (the stalled
    backend the ready announcement avoids)."""

    agent: Server
    mode: str = "ok"
    connects: list[bytes] = field(default_factory=list)

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connects.append(await reader.readline())
        if self.mode == "stall":
            await reader.read()
        elif self.mode == "ok":
            writer.write(b"OK 1073741824\n")
            await writer.drain()
            await self.agent.handle_connection(reader, writer)
            return
        writer.close()


@dataclass
class Health:
    delay: float = 0.0
    status: health_pb2.HealthCheckResponse.ServingStatus = (
        health_pb2.HealthCheckResponse.SERVING)
    why: str | None = None  # what every AgentService call answers (FAILED_PRECONDITION)
    asked: int = 0

    async def check(self, request: health_pb2.CheckRequest,
                    ctx: RequestContext) -> health_pb2.HealthCheckResponse:
        await asyncio.sleep(self.delay)
        return health_pb2.HealthCheckResponse(status=self.status)

    async def details(self, request: agent_pb2.GuestDetailsRequest,
                      ctx: RequestContext) -> agent_pb2.GuestDetailsResponse:
        self.asked += 1
        if self.why is not None:
            raise TtrpcError(Code.FAILED_PRECONDITION, self.why)
        return agent_pb2.GuestDetailsResponse()


def gate(event: asyncio.Event) -> Callable[[], Awaitable[None]]:
    async def wait() -> None:
        await event.wait()

    return wait


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="coco-dial-"))  # short: unix socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
async def front(socket_dir: Path, health: Health) -> AsyncIterator[Front]:
    server = Server()
    server.register("grpc.Health", "Check", health_pb2.CheckRequest, health.check)
    server.register("grpc.AgentService", "GetGuestDetails", agent_pb2.GuestDetailsRequest,
                    health.details)
    result = Front(server)
    listener = await asyncio.start_unix_server(result.on_connect, str(socket_dir / "vsock.sock"))
    try:
        yield result
    finally:
        listener.close()
        await server.close()


async def test_no_connect_before_the_guest_announces(socket_dir: Path, front: Front) -> None:
    announced = asyncio.Event()
    dialing = asyncio.ensure_future(AgentClient.dial(
        channel(socket_dir, gate(announced)), 5, timeouts=FAST))
    await asyncio.sleep(0.2)
    assert front.connects == [] and not dialing.done()
    announced.set()
    agent = await dialing
    await agent.close()
    assert front.connects == [b"CONNECT 1024\n"]


async def test_a_stalled_connect_is_bounded_and_named(socket_dir: Path, front: Front) -> None:
    front.mode = "stall"

    async def ready() -> None:
        return None

    with pytest.raises(Unavailable) as info:
        await AgentClient.dial(channel(socket_dir, ready), 0.7, timeouts=FAST)
    message = str(info.value)
    assert "did not answer within 0.7 s" in message
    assert "last attempt: no reply to CONNECT 1024 within 0.2 s" in message
    assert 2 <= len(front.connects) <= 4  # every attempt had its own bound


async def test_a_refusal_is_named(socket_dir: Path, front: Front) -> None:
    front.mode = "refuse"
    with pytest.raises(Unavailable, match=r"last attempt: .*connection closed during CONNECT"):
        await AgentClient.dial(channel(socket_dir), 0.3, timeouts=FAST)


async def test_a_check_that_never_answers_is_bounded(socket_dir: Path, front: Front,
                                                     health: Health) -> None:
    health.delay = 10
    with pytest.raises(Unavailable, match=r"last attempt: Health.Check not answered within 0.3"):
        await AgentClient.dial(channel(socket_dir), 0.8, timeouts=FAST)


async def test_a_guest_that_never_announces(socket_dir: Path, front: Front) -> None:
    never = asyncio.Event()
    with pytest.raises(Unavailable, match=r"the guest did not announce its agent within 0\.3 s"):
        await AgentClient.dial(channel(socket_dir, gate(never)), 0.3, timeouts=FAST)
    assert front.connects == []


async def test_the_vm_exit_ends_the_wait(socket_dir: Path, front: Front) -> None:
    never = asyncio.Event()
    exited: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.1, exited.set_result, "guest-panic")
    with pytest.raises(Unavailable, match=r"the VM exited \(guest-panic\) before the guest"):
        await AgentClient.dial(channel(socket_dir, gate(never)), 5, exited=exited,
                               timeouts=FAST)


async def test_a_guest_that_cannot_start_ends_the_dial_at_once_with_its_reason(
        socket_dir: Path, front: Front, health: Health) -> None:
    health.status = health_pb2.HealthCheckResponse.NOT_SERVING
    health.why = 'guest failed to start: init\'s boot step failed: step "drivers" exited'
    started = time.monotonic()
    with pytest.raises(FailedPrecondition) as info:
        await AgentClient.dial(channel(socket_dir), 5, timeouts=FAST)
    assert time.monotonic() - started < 1.0  # not the 5 s dial timeout
    assert str(info.value) == (f"agent at hvsock:{socket_dir / 'vsock.sock'}:1024 is not serving "
                               f"(status NOT_SERVING): agent GetGuestDetails: {health.why}")
    assert health.asked == 1 and len(front.connects) == 1


async def test_not_serving_without_a_reason_is_retried_and_named(
        socket_dir: Path, front: Front, health: Health) -> None:
    health.status = health_pb2.HealthCheckResponse.NOT_SERVING  # its calls pass: no reason
    with pytest.raises(Unavailable, match=r"did not answer within 0.5 s .*last attempt: agent "
                                          r"at .* is not serving \(status NOT_SERVING\)"
                                          # the dial timeout may cut one more attempt short
                                          r"(; one more attempt was cut short by the dial "
                                          r"timeout)?\)$"):
        await AgentClient.dial(channel(socket_dir), 0.5, timeouts=FAST)
    assert health.asked >= 2


def console_channel(socket_dir: Path, console: ConsoleWatch,
                    ready: Callable[[], Awaitable[None]] | None = None) -> AgentChannel:
    return AgentChannel(guest_cid=3, hybrid_socket=socket_dir / "vsock.sock",
                        wait_guest_ready=ready, console=console)


async def test_a_failure_on_the_console_ends_the_wait_for_the_announcement(
        socket_dir: Path, front: Front) -> None:
    """The guest's vsock channel never comes up (its module did not load): the guest never
    announces, but says why on its console, and the dial ends with those words at once."""
    console = ConsoleWatch()
    dialing = asyncio.ensure_future(AgentClient.dial(
        console_channel(socket_dir, console, gate(asyncio.Event())), 60, timeouts=FAST))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    console.feed(b'[    1.2] virtio_blk virtio1: [vda] 2048 512-byte logical blocks\n'
                 b'coco-init: boot step "modules" exited with status 1; modprobe: module '
                 b'coco-test-missing-module not found in modules.dep\n')
    with pytest.raises(FailedPrecondition) as info:
        await asyncio.wait_for(dialing, 1)
    assert time.monotonic() - started < 0.5
    assert str(info.value) == (
        f"agent at hvsock:{socket_dir / 'vsock.sock'}:1024: the guest cannot start; its "
        'console says: coco-init: boot step "modules" exited with status 1; modprobe: module '
        "coco-test-missing-module not found in modules.dep")
    assert front.connects == []


async def test_a_failure_on_the_console_ends_the_attempts(
        socket_dir: Path, front: Front) -> None:
    front.mode = "refuse"
    console = ConsoleWatch()
    dialing = asyncio.ensure_future(AgentClient.dial(
        console_channel(socket_dir, console), 60, timeouts=FAST))
    await asyncio.sleep(0.2)
    assert front.connects and not dialing.done()
    console.feed(b"[    3.4] Kernel panic - not syncing: Attempted to kill init!\n")
    with pytest.raises(FailedPrecondition, match=r"its console says: .*Kernel panic - not "
                                                 r"syncing: Attempted to kill init!$"):
        await asyncio.wait_for(dialing, 1)


async def test_a_dial_that_runs_out_names_the_console_s_last_lines(
        socket_dir: Path, front: Front) -> None:
    front.mode = "refuse"
    console = ConsoleWatch()
    console.feed(b"one\r\n\ntwo\nthree\nfour\nfive\nsix\nseven (no newline yet)")
    with pytest.raises(Unavailable) as info:
        await AgentClient.dial(console_channel(socket_dir, console), 0.3, timeouts=FAST)
    # the last five whole lines: an unfinished one is not a line yet
    assert str(info.value).endswith(
        "; the console's last lines: two | three | four | five | six"), info.value


async def test_an_exit_before_the_announcement_names_the_console_s_last_lines(
        socket_dir: Path, front: Front) -> None:
    console = ConsoleWatch()
    console.feed(b"coco-init: bind mount of the root failed\n")
    exited: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    exited.set_result("status 0")
    with pytest.raises(Unavailable) as info:
        await AgentClient.dial(console_channel(socket_dir, console, gate(asyncio.Event())), 5,
                               exited=exited, timeouts=FAST)
    assert str(info.value).endswith(
        "the VM exited (status 0) before the guest announced its agent; the console's last "
        "lines: coco-init: bind mount of the root failed"), info.value
