"""Dialing: unix errors, hybrid vsock CONNECT handshake, AF_VSOCK as far as this host allows."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf.wrappers_pb2 import StringValue

from protocols.ttrpc import Client, Server

from .helpers import SERVICE, EchoService

SILENT = b""  # the front says nothing and waits for the caller to give up


class HybridFront:
    """What Firecracker / Cloud Hypervisor put in front of a guest's vsock: a unix socket that
    reads `CONNECT <port>\\n`, answers, and on `OK ...\\n` splices the stream to the guest port
    (here: straight into Server.handle_connection). Any other answer is followed by a hang-up."""

    def __init__(self, guest: Server, answer: bytes) -> None:
        self.guest = guest
        self.answer = answer
        self.requests: list[bytes] = []

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests.append(await reader.readline())
        if self.answer == SILENT:
            await reader.read()  # until the caller hangs up
        else:
            writer.write(self.answer)
            await writer.drain()
            if self.answer.startswith(b"OK ") and self.answer.endswith(b"\n"):
                await self.guest.handle_connection(reader, writer)
                return
        writer.close()


@pytest.fixture
async def guest() -> AsyncIterator[Server]:
    server = Server()
    EchoService().install(server)
    yield server
    await server.close()


async def _start_front(path: Path, front: HybridFront) -> asyncio.Server:
    return await asyncio.start_unix_server(front.on_connect, path=str(path))


async def test_hybrid_vsock_speaks_ttrpc_after_ok(socket_dir: Path, guest: Server) -> None:
    path = socket_dir / "hv.sock"
    front = HybridFront(guest, b"OK 1024\n")
    listener = await _start_front(path, front)
    try:
        async with await Client.connect_hybrid_vsock(path, 1024, timeout=5) as client:
            reply = await client.call(SERVICE, "Echo", StringValue(value="via hvsock"), StringValue)
            assert reply.value == "via hvsock"
        assert front.requests == [b"CONNECT 1024\n"]
    finally:
        await guest.close()  # ends handle_connection inside the front's callback
        listener.close()
        await listener.wait_closed()


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"ERR no listener\n", "CONNECT refused: b'ERR no listener\\n'"),
        (b"OK", "connection closed during CONNECT handshake (got b'OK')"),
        (b"\n", "CONNECT refused: b'\\n'"),
    ],
)
async def test_hybrid_vsock_refusal_is_a_clear_connection_error(
    socket_dir: Path, guest: Server, answer: bytes, expected: str
) -> None:
    path = socket_dir / "hv.sock"
    listener = await _start_front(path, HybridFront(guest, answer))
    try:
        with pytest.raises(ConnectionError) as info:
            await Client.connect_hybrid_vsock(path, 1024, timeout=5)
        assert str(info.value) == f"hvsock:{path}:1024: {expected}"
    finally:
        listener.close()
        await listener.wait_closed()


async def test_hybrid_vsock_silence_times_out(socket_dir: Path, guest: Server) -> None:
    path = socket_dir / "hv.sock"
    listener = await _start_front(path, HybridFront(guest, SILENT))
    try:
        with pytest.raises(TimeoutError, match=f"hvsock:{path}:1024: not connected within 0.1s"):
            await Client.connect_hybrid_vsock(path, 1024, timeout=0.1)
    finally:
        listener.close()
        await listener.wait_closed()


async def test_unix_dial_failure_names_the_path(socket_dir: Path) -> None:
    path = socket_dir / "missing.sock"
    with pytest.raises(ConnectionError) as info:
        await Client.connect_unix(path, timeout=1)
    assert info.value.errno == errno.ENOENT
    assert f"unix:{path}" in str(info.value)

    with socket.socket(socket.AF_UNIX) as bound_not_listening:
        bound_not_listening.bind(str(path))
        with pytest.raises(ConnectionRefusedError, match=f"unix:{path}"):
            await Client.connect_unix(path, timeout=1)


@pytest.mark.skipif(not hasattr(socket, "AF_VSOCK"), reason="no AF_VSOCK in this Python")
async def test_vsock_dial_failure_is_clear() -> None:
    # No guest has CID 0xFFFFFFF0 here; depending on the host the kernel answers ENODEV,
    # ECONNRESET or ETIMEDOUT, or the dial outlives our timeout. All name the address.
    with pytest.raises((ConnectionError, TimeoutError)) as info:
        await Client.connect_vsock(0xFFFFFFF0, 1024, timeout=0.5)
    assert "vsock:4294967280:1024" in str(info.value)


@pytest.mark.skipif(not hasattr(socket, "AF_VSOCK"), reason="no AF_VSOCK in this Python")
async def test_serve_vsock_listens_until_close() -> None:
    server = Server()
    try:
        await server.serve_vsock(port=0x7FFF_0000 + 1024)
    except OSError as err:  # no vsock transport on this host
        pytest.skip(f"cannot bind AF_VSOCK here: {err}")
    await server.close()
