"""ttrpc client: unary calls multiplexed over one connection.

One receive task per connection routes Response frames to the waiting calls by stream id.
Stream ids are allocated and their Request frames written under one lock, so they reach the
wire strictly increasing (the server rejects anything else).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from google.protobuf.message import DecodeError, Message

from protocols.api.ttrpc.ttrpc_pb2 import KeyValue, Request, Response

from .connection import READ_CHUNK, read_frames
from .errors import Code, ConnectionClosed, OversizedMessage, TtrpcError
from .frame import MAX_DATA_LENGTH, Frame, FrameType, OversizedFrame, encode_frame

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

_MAX_STREAM_ID = 0xFFFFFFFF


class Client:
    """A ttrpc connection. Build one with connect_unix/connect_vsock/connect_hybrid_vsock."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._next_stream_id = 1
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._closed: ConnectionClosed | None = None
        self._receiver = asyncio.create_task(self._receive(), name="ttrpc-client-receive")

    # -- construction -------------------------------------------------------------------------

    @classmethod
    async def connect_unix(
        cls,
        path: str | Path,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - part of the dial API, like net.DialTimeout
    ) -> Client:
        address = f"unix:{path}"
        with _dialing(address, timeout):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(
                    os.fspath(path), limit=READ_CHUNK
                )
        return cls(reader, writer)

    @classmethod
    async def connect_vsock(
        cls,
        cid: int,
        port: int,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - part of the dial API
    ) -> Client:
        address = f"vsock:{cid}:{port}"
        with contextlib.ExitStack() as undo, _dialing(address, timeout):
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            undo.callback(sock.close)
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, (cid, port))
                reader, writer = await asyncio.open_connection(sock=sock, limit=READ_CHUNK)
            undo.pop_all()
        return cls(reader, writer)

    @classmethod
    async def connect_hybrid_vsock(
        cls,
        uds_path: str | Path,
        port: int,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - covers dial and CONNECT handshake
    ) -> Client:
        """Firecracker/Cloud Hypervisor style: unix socket, `CONNECT <port>\\n`, `OK <n>\\n`."""
        address = f"hvsock:{uds_path}:{port}"
        with contextlib.ExitStack() as undo, _dialing(address, timeout):
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(
                    os.fspath(uds_path), limit=READ_CHUNK
                )
                undo.callback(writer.transport.abort)
                writer.write(f"CONNECT {port}\n".encode())
                await writer.drain()
                await _expect_connect_ok(reader, address)
            undo.pop_all()
        return cls(reader, writer)

    # -- calls --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - it also travels as timeout_nano
        metadata: Mapping[str, str | Sequence[str]] | None = None,
    ) -> M:
        """One unary RPC. timeout bounds the whole call here and travels as timeout_nano."""
        envelope = Request(service=service, method=method, payload=request.SerializeToString())
        if timeout is not None:
            if timeout <= 0:
                raise TtrpcError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: timeout {timeout}s")
            envelope.timeout_nano = max(1, round(timeout * 1e9))
        if metadata:
            envelope.metadata.extend(_key_values(metadata))
        data = envelope.SerializeToString()
        if len(data) > MAX_DATA_LENGTH:
            raise TtrpcError(
                Code.RESOURCE_EXHAUSTED,
                f"message length {len(data)} exceed maximum message size of {MAX_DATA_LENGTH}",
            )

        try:
            async with asyncio.timeout(timeout):
                frame = await self._round_trip(data)
        except TimeoutError as err:
            raise TtrpcError(
                Code.DEADLINE_EXCEEDED, f"{service}/{method}: no response within {timeout}s"
            ) from err

        try:
            response = Response.FromString(frame.data)
        except DecodeError as err:
            raise TtrpcError(Code.INTERNAL, f"{service}/{method}: bad response: {err}") from err
        if response.status.code != Code.OK:
            raise TtrpcError(Code.from_wire(response.status.code), response.status.message)
        try:
            return response_type.FromString(response.payload)
        except DecodeError as err:
            raise TtrpcError(
                Code.INTERNAL, f"{service}/{method}: bad {response_type.__name__}: {err}"
            ) from err

    async def _round_trip(self, data: bytes) -> Frame:
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        stream_id = 0
        try:
            async with self._write_lock:
                if self._closed is not None:
                    raise self._closed_error()
                stream_id = self._next_stream_id
                if stream_id > _MAX_STREAM_ID:
                    raise ConnectionClosed("ttrpc: stream ids exhausted, reconnect")
                self._next_stream_id += 2
                self._pending[stream_id] = future
                try:
                    self._writer.write(encode_frame(stream_id, FrameType.REQUEST, 0, data))
                    await self._writer.drain()
                except OSError as err:
                    raise ConnectionClosed(f"ttrpc: send failed: {err}") from err
            return await future
        finally:
            self._pending.pop(stream_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" noise after a timeout
            else:
                future.cancel()

    async def _receive(self) -> None:
        error = ConnectionClosed("ttrpc: connection closed by peer")
        try:
            # A response claiming more than the limit ends the connection: skipping up to
            # 4 GiB would leave every call on it (long polls too) waiting for ever.
            async with contextlib.aclosing(read_frames(self._reader,
                                                       stop_at_oversized=True)) as frames:
                async for event in frames:
                    self._route(event)
                    if isinstance(event, OversizedFrame):
                        error = ConnectionClosed(f"ttrpc: {event.error_message()}: "
                                                 "connection dropped")
        except Exception as err:  # a bug here must fail the calls, not strand them
            log.exception("ttrpc: client receive loop crashed")
            error = ConnectionClosed(f"ttrpc: receive loop crashed: {err!r}")
            error.__cause__ = err
        finally:
            self._shut(error)

    def _route(self, event: Frame | OversizedFrame) -> None:
        future = self._pending.get(event.stream_id)
        if future is None or future.done():
            # A call that timed out locally; its late answer has nobody to go to.
            log.debug("ttrpc: frame for inactive stream %d dropped", event.stream_id)
        elif isinstance(event, OversizedFrame):
            future.set_exception(OversizedMessage(Code.RESOURCE_EXHAUSTED, event.error_message()))
        elif event.type != FrameType.RESPONSE:
            # containerd/ttrpc: "unexpected %q message received" fails the call
            future.set_exception(
                TtrpcError(Code.INTERNAL, f"unexpected frame type {event.type} on a unary call")
            )
        else:
            future.set_result(event)

    def _shut(self, error: ConnectionClosed) -> None:
        if self._closed is None:
            self._closed = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(self._closed_error())
        # abort, not close: unsent requests are moot and a stuck peer must not stall close().
        self._writer.transport.abort()

    def _closed_error(self) -> ConnectionClosed:
        assert self._closed is not None
        error = ConnectionClosed(*self._closed.args)
        error.__cause__ = self._closed.__cause__
        return error

    # -- teardown -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Fail pending calls with ConnectionClosed, stop the receive task, close the socket."""
        self._shut(ConnectionClosed("ttrpc: client closed"))
        self._receiver.cancel()
        await asyncio.wait([self._receiver])
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _key_values(metadata: Mapping[str, str | Sequence[str]]) -> Iterator[KeyValue]:
    # Keys are lower-cased like containerd/ttrpc's MD.Set; one KeyValue per value.
    for key, values in metadata.items():
        for value in (values,) if isinstance(values, str) else values:
            yield KeyValue(key=key.lower(), value=value)


async def _expect_connect_ok(reader: asyncio.StreamReader, address: str) -> None:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as err:
        raise ConnectionError(
            f"{address}: connection closed during CONNECT handshake (got {err.partial[:80]!r})"
        ) from None
    except asyncio.LimitOverrunError:
        raise ConnectionError(f"{address}: CONNECT reply is not a line") from None
    if not line.startswith(b"OK "):
        raise ConnectionError(f"{address}: CONNECT refused: {line[:80]!r}")


@contextlib.contextmanager
def _dialing(address: str, timeout: float | None) -> Iterator[None]:
    """Name the address in dial failures; OS errors become ConnectionError (errno kept)."""
    try:
        yield
    except OSError as err:
        if err.errno is None:  # raised by asyncio.timeout or by the handshake, not the kernel
            if isinstance(err, TimeoutError):
                raise TimeoutError(f"{address}: not connected within {timeout}s") from err
            if isinstance(err, ConnectionError):
                raise
        # Keep ConnectionRefusedError, ETIMEDOUT etc. recognisable; the rest is ConnectionError.
        kind = type(err) if isinstance(err, ConnectionError | TimeoutError) else ConnectionError
        message = f"{address}: {err.strerror or err}"
        raise (kind(err.errno, message) if err.errno else kind(message)) from err
