"""The agent facade over a real ttrpc connection (a scripted agent on a unix socket): one method
per RPC, bounded by the one per-RPC table (long polls unbounded), every status of the agent
mapped to its own typed error, messages truncated to a bound."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from protocols.api.kata import agent_pb2, health_pb2, oci_pb2, types_pb2
from protocols.status import Code
from protocols.ttrpc import Client, RequestContext, Server, TtrpcError
from shim.core import errors
from shim.core.timeouts import AGENT_RPC, Timeouts
from shim.pod.agent import AgentClient
from shim.pod.dial import MAX_AGENT_MESSAGE

Script = Callable[[Message], Awaitable[Message | None]]
BOUND = 0.3
TABLE = Timeouts(agent={name: None if bound is None else BOUND
                        for name, bound in AGENT_RPC.items()})


@dataclass
class ScriptedAgent:
    """grpc.AgentService and grpc.Health: records each call; a script may answer instead."""

    calls: list[str] = field(default_factory=list)
    scripts: dict[str, Script] = field(default_factory=dict)

    def register(self, server: Server) -> None:
        for descriptor in (agent_pb2.DESCRIPTOR.services_by_name["AgentService"],
                           health_pb2.DESCRIPTOR.services_by_name["Health"]):
            for method in descriptor.methods:
                server.register(descriptor.full_name, method.name,
                                GetMessageClass(method.input_type),
                                self._handler(method.name, GetMessageClass(method.output_type)))

    def _handler(self, name: str, response: type[Message]
                 ) -> Callable[[Message, RequestContext], Awaitable[Message]]:
        async def handle(request: Message, context: RequestContext) -> Message:
            self.calls.append(name)
            script = self.scripts.get(name)
            answer = await script(request) if script is not None else None
            if answer is not None:
                return answer
            if name == "Check":
                return health_pb2.HealthCheckResponse(
                    status=health_pb2.HealthCheckResponse.SERVING)
            return response()

        return handle


@dataclass
class Wire:
    agent: ScriptedAgent
    client: AgentClient
    server: Server


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    short = Path(tempfile.mkdtemp(prefix="ag", dir="/tmp"))
    server = Server()
    agent = ScriptedAgent()
    agent.register(server)
    await server.serve_unix(short / "agent.sock")
    client = AgentClient(await Client.connect_unix(short / "agent.sock"), "test", TABLE)
    yield Wire(agent, client, server)
    await client.close()
    await server.close()
    shutil.rmtree(short)


async def test_one_method_per_rpc_and_every_rpc_in_the_table(wire: Wire) -> None:
    c = wire.client
    await c.check()
    await c.create_sandbox("pod", "host", ["nameserver 198.18.0.53"], [agent_pb2.Storage()])
    await c.set_policy("package agent_policy")
    await c.update_interface(types_pb2.Interface(name="eth0"))
    await c.update_routes([types_pb2.Route(dest="198.18.0.0/24")])
    await c.add_arp_neighbors([types_pb2.ARPNeighbor(lladdr="02:00:00:00:00:09")])
    await c.create_container("c1", oci_pb2.Spec(), [])
    await c.start_container("c1")
    await c.exec_process("c1", "e1", oci_pb2.Process())
    await c.signal_process("c1", "", 15)
    assert await c.wait_process("c1", "") == 0
    assert await c.read_stdout("c1", "", 10) == b""
    assert await c.read_stderr("c1", "", 10) == b""
    assert await c.write_stdin("c1", "", b"x") == 0
    await c.close_stdin("c1", "")
    await c.tty_win_resize("c1", "", 24, 80)
    await c.pause_container("c1")
    await c.resume_container("c1")
    await c.stats_container("c1")
    await c.update_container("c1", oci_pb2.LinuxResources())
    await c.remove_container("c1")
    assert await c.get_oom_event() == ""
    await c.get_guest_details()
    await c.destroy_sandbox()
    assert sorted(wire.agent.calls) == sorted(AGENT_RPC)


async def test_a_silent_agent_hits_the_bound_of_its_rpc(wire: Wire) -> None:
    async def never(request: Message) -> Message | None:
        await asyncio.Event().wait()
        return None

    wire.agent.scripts["StartContainer"] = never
    started = asyncio.get_running_loop().time()
    with pytest.raises(errors.DeadlineExceeded, match=r"agent StartContainer: .*0\.3 ?s"):
        await wire.client.start_container("c1")
    assert asyncio.get_running_loop().time() - started < BOUND + 0.5


async def test_long_polls_are_not_bounded(wire: Wire) -> None:
    async def later(request: Message) -> Message:
        await asyncio.sleep(BOUND * 3)
        return agent_pb2.WaitProcessResponse(status=7)

    wire.agent.scripts["WaitProcess"] = later
    assert await wire.client.wait_process("c1", "") == 7


@pytest.mark.parametrize(("code", "kind"), [
    (Code.PERMISSION_DENIED, errors.PermissionDenied),
    (Code.INTERNAL, errors.Internal),
    (Code.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
    (Code.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
    (Code.NOT_FOUND, errors.NotFound),
], ids=lambda v: getattr(v, "name", ""))
async def test_an_agent_status_keeps_its_code(wire: Wire, code: Code,
                                              kind: type[errors.RpcError]) -> None:
    async def refuse(request: Message) -> Message:
        raise TtrpcError(code, "CreateContainerRequest is blocked by the agent policy")

    wire.agent.scripts["CreateContainer"] = refuse
    with pytest.raises(kind) as caught:
        await wire.client.create_container("c1", oci_pb2.Spec(), [])
    assert str(caught.value) == (
        "agent CreateContainer: CreateContainerRequest is blocked by the agent policy")
    assert errors.status_code(caught.value) is code


async def test_a_long_agent_message_is_truncated(wire: Wire) -> None:
    async def verbose(request: Message) -> Message:
        raise TtrpcError(Code.INTERNAL, "x" * (MAX_AGENT_MESSAGE + 5000))

    wire.agent.scripts["StartContainer"] = verbose
    with pytest.raises(errors.Internal) as caught:
        await wire.client.start_container("c1")
    message = str(caught.value)
    assert len(message) < MAX_AGENT_MESSAGE + 100
    assert message.endswith("… (5000 more characters)")


async def test_end_of_stream_is_empty_data_but_a_lost_agent_is_unavailable(wire: Wire) -> None:
    async def eof(request: Message) -> Message:
        raise TtrpcError(Code.INTERNAL, "EOF")  # how kata-agent says a stream is over

    wire.agent.scripts["ReadStdout"] = eof
    assert await wire.client.read_stdout("c1", "", 10) == b""

    async def hang(request: Message) -> Message | None:
        await asyncio.Event().wait()
        return None

    wire.agent.scripts["ReadStderr"] = hang
    reading = asyncio.ensure_future(wire.client.read_stderr("c1", "", 10))
    await asyncio.sleep(0.05)
    await wire.server.close()
    with pytest.raises(errors.Unavailable, match="ReadStderr: connection to test lost"):
        await reading


def test_the_table_has_no_entry_without_a_method() -> None:
    import re

    methods = {name for name in dir(AgentClient) if not name.startswith("_")}
    snake = {re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", rpc).lower()
             for rpc in AGENT_RPC}
    assert snake <= methods, snake - methods


def test_no_timeout_literal_outside_the_table() -> None:
    """Every bounded wait of shim/ comes from shim/core/timeouts.py (the agent's included)."""
    import re

    root = Path(__file__).resolve().parents[3] / "shim"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "timeouts.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(asyncio\.timeout|timeout=|limit=|sleep)\(?\s*\d", line):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == []


async def test_dial_retries_until_the_agent_answers(tmp_path: Path) -> None:
    from hypervisor.vm import AgentChannel

    short = Path(tempfile.mkdtemp(prefix="ag", dir="/tmp"))
    path = short / "vsock.sock"
    served: list[Any] = []

    async def serve_later() -> None:
        await asyncio.sleep(0.2)
        # A hybrid vsock socket: CONNECT <port> / OK <port>, then ttrpc.
        server = Server()
        ScriptedAgent().register(server)

        async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = await reader.readline()
            assert line == b"CONNECT 1024\n"
            writer.write(b"OK 1024\n")
            await writer.drain()
            await server.handle_connection(reader, writer)

        served.append(await asyncio.start_unix_server(handshake, path))

    try:
        task = asyncio.ensure_future(serve_later())
        agent = await AgentClient.dial(AgentChannel(3, path), 5.0,
                                       timeouts=Timeouts(agent_dial_retry_pause=0.01))
        await task
        await agent.close()
    finally:
        for server in served:
            server.close()
        shutil.rmtree(short)


async def test_a_guest_that_refuses_to_start_ends_the_dial_at_once() -> None:
    """Check answered FAILED_PRECONDITION ``guest refused to start: …`` is the answer, not a
    reason to retry until the dial timeout."""
    import time

    from hypervisor.vm import AgentChannel

    short = Path(tempfile.mkdtemp(prefix="ag", dir="/tmp"))
    path = short / "vsock.sock"
    agent = ScriptedAgent()
    why = "guest refused to start: initdata digest sha384:ab… does not match HOST_DATA"

    async def refuse(request: Message) -> Message | None:
        raise TtrpcError(Code.FAILED_PRECONDITION, why)

    agent.scripts["Check"] = refuse
    server = Server()
    agent.register(server)

    async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"OK 1024\n")
        await writer.drain()
        await server.handle_connection(reader, writer)

    listener = await asyncio.start_unix_server(handshake, path)
    try:
        started = time.monotonic()
        with pytest.raises(errors.FailedPrecondition) as info:
            await AgentClient.dial(AgentChannel(3, path), 30.0,
                                   timeouts=Timeouts(agent_dial_retry_pause=0.01))
        assert time.monotonic() - started < 5.0
        assert why in str(info.value)
        assert agent.calls == ["Check"]
    finally:
        listener.close()
        shutil.rmtree(short)
