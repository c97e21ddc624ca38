"""R6: a hostile agent on a real unix socket, speaking raw frames. Whatever it does (never
answers, answers garbage or on another stream, claims a 4 GiB frame, streams output forever,
hangs up mid-call), each call ends within its bound with a clear error, the host's memory
stays bounded, and nothing is left behind (no task, no fd)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import struct
import tempfile
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from protocols.api.kata import agent_pb2
from protocols.api.ttrpc.ttrpc_pb2 import Response
from protocols.ttrpc import Client
from protocols.ttrpc.connection import read_frames
from protocols.ttrpc.frame import Frame, FrameType, encode_frame
from shim.core import errors
from shim.core.timeouts import AGENT_RPC, Timeouts
from shim.pod.agent import AgentClient

BOUND = 0.3
TABLE = Timeouts(agent={name: None if bound is None else BOUND
                        for name, bound in AGENT_RPC.items()})
NO_ANSWER = r"agent StartContainer: .*no response within 0\.3"
Behaviour = Callable[[Frame, asyncio.StreamWriter], Awaitable[None]]


def response(stream_id: int, payload: bytes) -> bytes:
    return encode_frame(stream_id, FrameType.RESPONSE, 0,
                        Response(payload=payload).SerializeToString())


class HostileAgent:
    """A raw ttrpc peer: each request frame goes to ``behaviour``."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.requests = 0
        self._dir = Path(tempfile.mkdtemp(prefix="hostile", dir="/tmp"))
        self.path = self._dir / "agent.sock"
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> HostileAgent:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            async for frame in read_frames(reader):
                assert isinstance(frame, Frame)
                self.requests += 1
                await self.behaviour(frame, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        shutil.rmtree(self._dir)


def open_fds() -> dict[int, str]:
    """This process's open fds and what each is (a socket's inode, a file's path)."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd, gone by now
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


Baseline = tuple[dict[int, str], set[asyncio.Task[object]]]


@pytest.fixture
async def baseline() -> AsyncIterator[Baseline]:
    gc.collect()  # earlier tests' unreachable loops and channels hold fds until collected
    fds, tasks = open_fds(), asyncio.all_tasks()
    yield fds, tasks


async def client_of(agent: HostileAgent) -> AgentClient:
    return AgentClient(await Client.connect_unix(agent.path), "hostile", TABLE)


async def assert_nothing_left(fds: dict[int, str], tasks: set[asyncio.Task[object]]) -> None:
    await asyncio.sleep(0)  # let cancelled receivers finish
    left = {t for t in asyncio.all_tasks() - tasks if t is not asyncio.current_task()}
    await asyncio.wait(left, timeout=1) if left else None
    assert {t for t in asyncio.all_tasks() - tasks if not t.done()
            and t is not asyncio.current_task()} == set()
    # What this test opened and left open; an fd of an earlier test's that closed meanwhile
    # (a collected loop, a finished helper) is no leak of this one.
    assert {fd: what for fd, what in open_fds().items() if fds.get(fd) != what} == {}


async def timed(call: Awaitable[object]) -> float:
    started = asyncio.get_running_loop().time()
    try:
        await call
    finally:
        elapsed = asyncio.get_running_loop().time() - started
    return elapsed


async def silent(frame: Frame, writer: asyncio.StreamWriter) -> None:
    return None


async def test_an_agent_that_never_answers_hits_the_bound(
        baseline: Baseline) -> None:
    async with HostileAgent(silent) as agent:
        client = await client_of(agent)
        started = asyncio.get_running_loop().time()
        with pytest.raises(errors.DeadlineExceeded, match=NO_ANSWER):
            await client.start_container("c1")
        assert asyncio.get_running_loop().time() - started < BOUND + 0.5
        await client.close()
    await assert_nothing_left(*baseline)


async def garbage(frame: Frame, writer: asyncio.StreamWriter) -> None:
    writer.write(encode_frame(frame.stream_id, FrameType.RESPONSE, 0, b"\xff\xfe garbage \x00"))
    await writer.drain()


async def test_garbage_answers_are_a_clear_error(
        baseline: Baseline) -> None:
    async with HostileAgent(garbage) as agent:
        client = await client_of(agent)
        with pytest.raises(errors.Internal, match=r"agent StartContainer: .*bad response"):
            await client.start_container("c1")
        await client.close()
    await assert_nothing_left(*baseline)


async def other_stream(frame: Frame, writer: asyncio.StreamWriter) -> None:
    writer.write(response(frame.stream_id + 2, b""))  # a stream the host never opened
    writer.write(response(0, b""))
    await writer.drain()


async def test_answers_on_another_stream_are_ignored_and_the_call_ends_at_its_bound(
        baseline: Baseline) -> None:
    async with HostileAgent(other_stream) as agent:
        client = await client_of(agent)
        with pytest.raises(errors.DeadlineExceeded, match=NO_ANSWER):
            await client.start_container("c1")
        await client.close()
    await assert_nothing_left(*baseline)


async def huge_header(frame: Frame, writer: asyncio.StreamWriter) -> None:
    writer.write(struct.pack(">IIBB", 0xFFFFFFFF, frame.stream_id, FrameType.RESPONSE, 0))
    writer.write(b"\0" * 65536)  # and some of the promised 4 GiB
    await writer.drain()


async def test_a_4_gib_frame_header_drops_the_connection_without_allocating(
        baseline: Baseline) -> None:
    tracemalloc.start()
    try:
        async with HostileAgent(huge_header) as agent:
            client = await client_of(agent)
            with pytest.raises(errors.Unavailable, match=r"agent WaitProcess: .*4294967295"):
                await client.wait_process("c1", "")  # a long poll: no bound would save it
            # The connection is unusable (4 GiB still to skip): it is gone, not a black hole.
            with pytest.raises(errors.Unavailable):
                await client.start_container("c1")
            await client.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    await assert_nothing_left(*baseline)


async def endless_stdout(frame: Frame, writer: asyncio.StreamWriter) -> None:
    data = agent_pb2.ReadStreamResponse(data=b"y" * (1 << 20)).SerializeToString()
    writer.write(response(frame.stream_id, data))
    await writer.drain()


async def test_endless_stdout_keeps_memory_bounded(
        baseline: Baseline) -> None:
    async with HostileAgent(endless_stdout) as agent:
        client = await client_of(agent)
        tracemalloc.start()
        try:
            total = 0
            for _ in range(64):  # 64 MiB through the relay's read side
                total += len(await client.read_stdout("c1", "", 1 << 20))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert total == 64 << 20
        assert peak < 24 << 20  # a few chunks in flight, never the stream
        await client.close()
    await assert_nothing_left(*baseline)


async def hang_up(frame: Frame, writer: asyncio.StreamWriter) -> None:
    writer.write(struct.pack(">IIBB", 100, frame.stream_id, FrameType.RESPONSE, 0) + b"half")
    await writer.drain()
    writer.close()
    raise ConnectionError("hung up")


async def test_an_agent_that_hangs_up_mid_call_is_unavailable_at_once(
        baseline: Baseline) -> None:
    async with HostileAgent(hang_up) as agent:
        client = await client_of(agent)
        with pytest.raises(errors.Unavailable, match="agent WaitProcess: connection to hostile "
                                                     "lost"):
            await client.wait_process("c1", "")  # a long poll: it must not wait forever
        await client.close()
    await assert_nothing_left(*baseline)
