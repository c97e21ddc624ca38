"""The server's answers to unusual frames, matching containerd/ttrpc's server.go."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import AsyncIterator

import pytest
from google.protobuf.wrappers_pb2 import StringValue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.api.google.rpc.status_pb2 import Status
from protocols.api.ttrpc.ttrpc_pb2 import Response
from protocols.ttrpc import MAX_DATA_LENGTH, Client, Code, Server
from protocols.ttrpc.frame import Frame, FrameType, encode_frame, encode_header

from .conftest import Served
from .helpers import SERVICE, EchoService, RawPeer


@pytest.fixture
async def peer(served: Served) -> AsyncIterator[RawPeer]:
    peer = await RawPeer.open(served.path)
    yield peer
    await peer.close()


async def _echo_works(served: Served) -> None:
    async with await Client.connect_unix(served.path, timeout=2) as client:
        reply = await client.call(SERVICE, "Echo", StringValue(value="ok"), StringValue, timeout=2)
        assert reply.value == "ok"


async def test_ok_response_frame_bytes(peer: RawPeer) -> None:
    await peer.send_request(1, "Echo", StringValue(value="hi").SerializeToString())
    frame = await peer.read_frame()
    # status is present even when OK (Go sends status.New(codes.OK, "").Proto())
    assert frame == Frame(1, FrameType.RESPONSE, 0, b"\x0a\x00\x12\x04\x0a\x02hi")
    assert Response.FromString(frame.data) == Response(
        status=Status(), payload=StringValue(value="hi").SerializeToString()
    )


@pytest.mark.parametrize("stream_id", [0, 2, 0xFFFFFFFE])
async def test_even_stream_id_is_invalid_argument(peer: RawPeer, stream_id: int) -> None:
    await peer.send_request(stream_id, "Echo")
    status = await peer.read_status(stream_id)
    assert (status.code, status.message) == (
        Code.INVALID_ARGUMENT,
        "StreamID must be odd for client initiated streams",
    )
    await peer.send_request(1, "Echo")  # connection kept, id space untouched
    assert (await peer.read_status(1)).code == Code.OK


async def test_reused_or_decreasing_stream_id_is_invalid_argument(peer: RawPeer) -> None:
    await peer.send_request(5, "Echo")
    assert (await peer.read_status(5)).code == Code.OK
    for stale in (5, 3):
        await peer.send_request(stale, "Echo")
        status = await peer.read_status(stale)
        assert (status.code, status.message) == (
            Code.INVALID_ARGUMENT,
            "StreamID cannot be re-used and must increment",
        )
    await peer.send_request(7, "Echo")
    assert (await peer.read_status(7)).code == Code.OK


async def test_oversized_frame_is_resource_exhausted_and_server_survives(
    served: Served, peer: RawPeer
) -> None:
    claimed = MAX_DATA_LENGTH + 1
    await peer.send_bytes(encode_header(claimed, 1, FrameType.REQUEST, 0) + bytes(claimed))
    status = await peer.read_status(1)
    assert (status.code, status.message) == (
        Code.RESOURCE_EXHAUSTED,
        "message length 4194305 exceed maximum message size of 4194304",
    )
    # As in Go the rejected frame does not consume its stream id; the connection goes on.
    await peer.send_request(1, "Echo")
    assert (await peer.read_status(1)).code == Code.OK
    await _echo_works(served)


async def test_undecodable_request_envelope_is_invalid_argument(peer: RawPeer) -> None:
    await peer.send_bytes(encode_frame(1, FrameType.REQUEST, 0, b"\xff\xff"))
    status = await peer.read_status(1)
    assert status.code == Code.INVALID_ARGUMENT
    assert status.message.startswith("unmarshal request error: ")
    await peer.send_request(3, "Echo")
    assert (await peer.read_status(3)).code == Code.OK


async def test_data_frames_never_crash_the_server(served: Served, peer: RawPeer) -> None:
    await peer.send_bytes(encode_frame(1, FrameType.DATA, 0, b"stray"))
    status = await peer.read_status(1)
    assert (status.code, status.message) == (Code.INVALID_ARGUMENT, "StreamID is no longer active")
    # data on an active unary stream is ignored; the call goes on and so do others
    await peer.send_request(3, "Hang")
    await served.service.hang_started.wait()
    await peer.send_bytes(encode_frame(3, FrameType.DATA, 0x1 | 0x4, b""))
    await peer.send_request(5, "Echo")
    assert (await peer.read_status(5)).code == Code.OK


async def test_response_and_unknown_frame_types_are_ignored(peer: RawPeer) -> None:
    await peer.send_bytes(encode_frame(1, 0x7F, 0, b"from the future"))
    await peer.send_bytes(encode_frame(1, FrameType.RESPONSE, 0, b""))
    await peer.send_request(1, "Echo")
    assert (await peer.read_status(1)).code == Code.OK


async def test_handler_outliving_timeout_nano_is_cancelled(served: Served, peer: RawPeer) -> None:
    await peer.send_request(1, "Hang", timeout_nano=50_000_000)
    status = await peer.read_status(1)
    assert (status.code, status.message) == (Code.DEADLINE_EXCEEDED, "context deadline exceeded")
    assert served.service.hang_cancelled.is_set()


async def test_client_disconnect_cancels_its_handlers(served: Served, peer: RawPeer) -> None:
    await peer.send_request(1, "Hang")
    await served.service.hang_started.wait()
    await peer.close()
    await asyncio.wait_for(served.service.hang_cancelled.wait(), 2)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x00\x00\x00", id="short-header"),
        pytest.param(encode_header(100, 1, 1, 0) + b"x" * 10, id="eof-mid-frame"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
        pytest.param(random.Random(7).randbytes(64 * 1024), id="random"),
    ],
)
async def test_garbage_then_eof_closes_connection_and_server_keeps_serving(
    served: Served, peer: RawPeer, garbage: bytes
) -> None:
    await peer.send_bytes(garbage)
    peer.writer.write_eof()
    assert await peer.closed_by_server()
    await _echo_works(served)


# -- fuzzing a live connection ------------------------------------------------------------------


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _feed_connection(chunks: list[bytes]) -> None:
    server = Server()
    EchoService().install(server)
    ours, theirs = socket.socketpair()
    server_reader, server_writer = await asyncio.open_connection(sock=theirs)
    serving = asyncio.create_task(server.handle_connection(server_reader, server_writer))
    reader, writer = await asyncio.open_connection(sock=ours)
    try:
        for chunk in chunks:
            writer.write(chunk)
        writer.write_eof()
        async with asyncio.timeout(5):
            while await reader.read(65536):  # answers, then EOF once the server hangs up
                pass
            await serving
    finally:
        writer.close()
        await server.close()


_frame_like = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda sid, kind, flags, data: encode_frame(sid, kind, flags, data),
        st.integers(0, 9),
        st.integers(0, 4),
        st.integers(0, 7),
        st.binary(max_size=40),
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(_frame_like, max_size=8))
def test_random_input_never_crashes_a_connection(chunks: list[bytes]) -> None:
    errors = _Errors()
    logger = logging.getLogger("protocols.ttrpc")
    logger.addHandler(errors)
    try:
        asyncio.run(_feed_connection(chunks))
    finally:
        logger.removeHandler(errors)
    assert [r.getMessage() for r in errors.records] == []
