"""A test service and a raw frame-level peer for poking the server with malformed input."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.empty_pb2 import Empty
from google.protobuf.wrappers_pb2 import StringValue

from protocols.api.google.rpc.status_pb2 import Status
from protocols.api.ttrpc.ttrpc_pb2 import KeyValue, Request, Response
from protocols.ttrpc import Code, RequestContext, Server, TtrpcError
from protocols.ttrpc.frame import Frame, FrameDecoder, FrameType, OversizedFrame, encode_frame

SERVICE = "test.v1.Echo"


@dataclass
class EchoService:
    """Handlers with observable behaviour: fast, failing, hanging, crashing."""

    contexts: list[RequestContext] = field(default_factory=list)
    hang_started: asyncio.Event = field(default_factory=asyncio.Event)
    hang_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    big_reply: int = 0

    def install(self, server: Server) -> None:
        server.register(SERVICE, "Echo", StringValue, self.echo)
        server.register(SERVICE, "Context", Empty, self.context)
        server.register(SERVICE, "Fail", StringValue, self.fail)
        server.register(SERVICE, "Crash", Empty, self.crash)
        server.register(SERVICE, "Hang", Empty, self.hang)
        server.register(SERVICE, "Sleep", StringValue, self.sleep)
        server.register(SERVICE, "Big", Empty, self.big)

    async def echo(self, request: StringValue, ctx: RequestContext) -> StringValue:
        return StringValue(value=request.value)

    async def context(self, request: Empty, ctx: RequestContext) -> Empty:
        self.contexts.append(ctx)
        return Empty()

    async def fail(self, request: StringValue, ctx: RequestContext) -> Empty:
        code, _, message = request.value.partition(":")
        raise TtrpcError(Code[code], message)

    async def crash(self, request: Empty, ctx: RequestContext) -> Empty:
        raise RuntimeError("boom")

    async def hang(self, request: Empty, ctx: RequestContext) -> Empty:
        self.hang_started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.hang_cancelled.set()
            raise
        raise AssertionError("unreachable")

    async def sleep(self, request: StringValue, ctx: RequestContext) -> StringValue:
        await asyncio.sleep(float(request.value))
        return StringValue(value=request.value)

    async def big(self, request: Empty, ctx: RequestContext) -> StringValue:
        return StringValue(value="x" * self.big_reply)


class RawPeer:
    """A client that writes frames by hand and reads whatever the server answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._decoder = FrameDecoder()
        self._frames: list[Frame | OversizedFrame] = []

    @classmethod
    async def open(cls, path: Path) -> RawPeer:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_request(
        self,
        stream_id: int,
        method: str,
        payload: bytes = b"",
        *,
        service: str = SERVICE,
        timeout_nano: int = 0,
        metadata: dict[str, str] | None = None,
    ) -> None:
        request = Request(
            service=service,
            method=method,
            payload=payload,
            timeout_nano=timeout_nano,
            metadata=[KeyValue(key=k, value=v) for k, v in (metadata or {}).items()],
        )
        await self.send_bytes(
            encode_frame(stream_id, FrameType.REQUEST, 0, request.SerializeToString())
        )

    async def read_frame(self, seconds: float = 5.0) -> Frame:
        async with asyncio.timeout(seconds):
            while not self._frames:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise EOFError("server closed the connection")
                self._frames.extend(self._decoder.feed(chunk))
        frame = self._frames.pop(0)
        assert isinstance(frame, Frame)
        return frame

    async def read_status(self, stream_id: int, seconds: float = 5.0) -> Status:
        frame = await self.read_frame(seconds)
        assert (frame.stream_id, frame.type, frame.flags) == (stream_id, FrameType.RESPONSE, 0)
        return Response.FromString(frame.data).status

    async def closed_by_server(self, seconds: float = 5.0) -> bool:
        """True once the server has closed its end; answers sent before that are skipped."""
        async with asyncio.timeout(seconds):
            while await self.reader.read(65536):
                pass
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
