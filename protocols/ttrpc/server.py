"""ttrpc server: unary handlers, every request of a connection served concurrently.

Per connection one task reads frames and spawns a handler task per request into a TaskGroup;
a write lock keeps response frames whole and StreamWriter.drain pushes back on slow readers.
Malformed input is answered the way containerd/ttrpc's server.go does (see _Connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import NamedTuple, Self, TypeVar, cast

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from protocols.api.google.rpc.status_pb2 import Status
from protocols.api.ttrpc.ttrpc_pb2 import Request, Response

from .connection import READ_CHUNK, read_frames
from .errors import Code, TtrpcError
from .frame import MAX_DATA_LENGTH, Frame, FrameType, OversizedFrame, encode_frame

log = logging.getLogger(__name__)

NAMESPACE_METADATA_KEY = "containerd-namespace-ttrpc"

# Requests one connection may have in flight; beyond it new ones are answered
# RESOURCE_EXHAUSTED at once. Refusing (not pausing the reader) keeps the calls that would
# complete the pending long polls (Kill ending a Wait) flowing. Generous, because long polls
# (Wait, ReadStdout, GetOOMEvent) legitimately stay open per process.
DEFAULT_MAX_IN_FLIGHT = 1024

Req = TypeVar("Req", bound=Message)


class RequestContext(NamedTuple):
    service: str
    method: str
    metadata: dict[str, list[str]]
    deadline: float | None  # loop.time() based; None when the caller sent no timeout

    @property
    def namespace(self) -> str | None:
        values = self.metadata.get(NAMESPACE_METADATA_KEY)
        return values[0] if values else None


Handler = Callable[[Message, RequestContext], Awaitable[Message]]


class _Method(NamedTuple):
    request_type: type[Message]
    handler: Handler


class Server:
    def __init__(self, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT) -> None:
        self._services: dict[str, dict[str, _Method]] = {}
        self._pending: dict[str, Callable[[], Awaitable[object]]] = {}
        self._max_in_flight = max_in_flight
        self._listeners: list[asyncio.Server] = []
        self._socket_files: list[tuple[Path, int, int]] = []  # path, st_dev, st_ino
        self._connections: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- registration -------------------------------------------------------------------------

    def register(
        self,
        service: str,
        method: str,
        request_type: type[Req],
        handler: Callable[[Req, RequestContext], Awaitable[Message]],
    ) -> None:
        methods = self._services.setdefault(service, {})
        if method in methods:
            raise ValueError(f"{service}/{method} is already registered")
        methods[method] = _Method(request_type, cast(Handler, handler))

    def register_service(self, descriptor: ServiceDescriptor, impl: object) -> None:
        """Register impl's async methods named like the RPCs; the others answer UNIMPLEMENTED."""
        service = descriptor.full_name
        self._services.setdefault(service, {})
        for method in descriptor.methods:
            handler = getattr(impl, method.name, None)
            if handler is None:
                continue
            if not inspect.iscoroutinefunction(handler):
                raise TypeError(f"{type(impl).__name__}.{method.name} must be an async method")
            if method.client_streaming or method.server_streaming:
                raise TypeError(f"{service}/{method.name} streams; only unary RPCs are served")
            self.register(service, method.name, GetMessageClass(method.input_type), handler)

    def register_pending(self, service: str, wait: Callable[[], Awaitable[object]]) -> None:
        """Accept calls to ``service`` (a full name: ``package.Service``) before its methods
        are registered: a call to a method not registered yet awaits ``wait()`` (within the
        call's deadline), then is served by what is registered by then (UNIMPLEMENTED if
        still nothing). A TtrpcError ``wait()`` raises is the call's answer. So a server can
        listen before it has imported a service's descriptors."""
        self._pending[service] = wait

    def _waiting_for(self, service: str, method: str) -> Callable[[], Awaitable[object]] | None:
        """The wait of a pending service whose ``method`` is not registered yet."""
        wait = self._pending.get(service)
        if wait is None or method in self._services.get(service, {}):
            return None
        return wait

    def _lookup(self, service: str, method: str) -> _Method:
        methods = self._services.get(service)
        if methods is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"service {service}")
        found = methods.get(method)
        if found is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"method {method}")
        return found

    # -- listening ----------------------------------------------------------------------------

    async def serve_unix(self, path: str | Path, *, mode: int = 0o600) -> None:
        """Bind and listen on path (a stale socket file there is replaced), then serve."""
        path = Path(path)
        _remove_stale_socket(path)
        with contextlib.ExitStack() as undo:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            undo.callback(sock.close)
            sock.bind(os.fspath(path))
            undo.callback(path.unlink, missing_ok=True)
            os.chmod(path, mode)  # before listen(): nobody can connect in between
            sock.listen(socket.SOMAXCONN)
            await self.serve_socket(sock)
            undo.pop_all()
        info = path.stat()
        self._socket_files.append((path, info.st_dev, info.st_ino))

    async def serve_vsock(self, port: int, cid: int = socket.VMADDR_CID_ANY) -> None:
        with contextlib.ExitStack() as undo:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            undo.callback(sock.close)
            sock.bind((cid, port))
            sock.listen(socket.SOMAXCONN)
            await self.serve_socket(sock)
            undo.pop_all()

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve an already listening socket until close()."""
        if self._closing:
            raise RuntimeError("ttrpc server is closed")
        sock.setblocking(False)
        listener = await asyncio.start_server(self.handle_connection, sock=sock, limit=READ_CHUNK)
        self._listeners.append(listener)

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one stream pair until the peer leaves or the server closes."""
        if self._closing:
            writer.transport.abort()
            return
        connection = _Connection(self, reader, writer)
        task = asyncio.create_task(connection.run(), name=f"ttrpc-conn-{id(connection):x}")
        self._connections.add(task)
        task.add_done_callback(self._connection_done)
        try:
            await asyncio.wait([task])  # close() cancelling task ends this call normally
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.wait([task])
            raise

    def _connection_done(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("ttrpc: connection task crashed", exc_info=error)

    # -- teardown -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop listening, cancel in-flight handlers, drop connections, remove socket files."""
        self._closing = True
        for listener in self._listeners:
            listener.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        if connections:
            await asyncio.wait(connections)
        for listener in self._listeners:
            await listener.wait_closed()
        self._listeners.clear()
        for path, device, inode in self._socket_files:
            with contextlib.suppress(FileNotFoundError):
                info = path.stat()
                if (info.st_dev, info.st_ino) == (device, inode):  # not a successor's socket
                    path.unlink()
        self._socket_files.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _Connection:
    """One client connection. Answers to malformed input follow containerd/ttrpc server.go:

    - oversized frame (after its bytes are discarded): RESOURCE_EXHAUSTED on its stream id;
    - even stream id, any frame type: INVALID_ARGUMENT, connection kept;
    - request id not above the last accepted one: INVALID_ARGUMENT, connection kept;
    - undecodable Request envelope: INVALID_ARGUMENT;
    - data frame for a stream that is not active: INVALID_ARGUMENT;
    - frame types other than request/data (response, unknown): ignored;
    - EOF, also mid-frame: the connection closes and its handlers are cancelled.
    """

    def __init__(
        self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        self._write_lock = asyncio.Lock()
        self._last_stream_id = 0
        self._handlers: dict[int, asyncio.Task[None]] = {}

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as handlers:
                try:
                    async with contextlib.aclosing(read_frames(self._reader)) as frames:
                        async for event in frames:
                            await self._dispatch(event, handlers)
                finally:
                    for task in self._handlers.values():
                        task.cancel()
        finally:
            # abort, not close: a peer that stopped reading must not hold up teardown.
            self._writer.transport.abort()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def _dispatch(self, event: Frame | OversizedFrame, handlers: asyncio.TaskGroup) -> None:
        stream_id = event.stream_id
        if isinstance(event, OversizedFrame):
            await self._send_status(stream_id, Code.RESOURCE_EXHAUSTED, event.error_message())
            return
        if stream_id % 2 != 1:
            await self._send_status(
                stream_id,
                Code.INVALID_ARGUMENT,
                "StreamID must be odd for client initiated streams",
            )
            return
        if event.type == FrameType.DATA:
            if stream_id in self._handlers:
                # Unary only: the request carried the whole message; nothing reads more data.
                log.debug("ttrpc: data frame on unary stream %d ignored", stream_id)
            else:
                await self._send_status(
                    stream_id, Code.INVALID_ARGUMENT, "StreamID is no longer active"
                )
            return
        if event.type != FrameType.REQUEST:
            log.debug("ttrpc: frame type %d on stream %d ignored", event.type, stream_id)
            return
        if stream_id <= self._last_stream_id:
            await self._send_status(
                stream_id,
                Code.INVALID_ARGUMENT,
                "StreamID cannot be re-used and must increment",
            )
            return
        self._last_stream_id = stream_id

        try:
            request = Request.FromString(event.data)
        except DecodeError as err:
            await self._send_status(
                stream_id, Code.INVALID_ARGUMENT, f"unmarshal request error: {err}"
            )
            return
        method: _Method | None = None
        if self._server._waiting_for(request.service, request.method) is None:
            try:
                method = self._server._lookup(request.service, request.method)
            except TtrpcError as err:
                await self._send_status(stream_id, err.code, err.message)
                return
        limit = self._server._max_in_flight
        if len(self._handlers) >= limit:
            await self._send_status(
                stream_id,
                Code.RESOURCE_EXHAUSTED,
                f"too many requests in flight on this connection (limit {limit})",
            )
            return
        task = handlers.create_task(
            self._serve(stream_id, request, method),
            name=f"ttrpc {request.service}/{request.method} #{stream_id}",
        )
        self._handlers[stream_id] = task
        task.add_done_callback(functools.partial(self._handler_done, stream_id))

    def _handler_done(self, stream_id: int, _task: asyncio.Task[None]) -> None:
        del self._handlers[stream_id]

    async def _serve(self, stream_id: int, request: Request, method: _Method | None) -> None:
        """Serve one request; ``method`` None: its service is pending (looked up once ready)."""
        loop = asyncio.get_running_loop()
        # Go: timeout_nano == 0 means no deadline; a negative one has already expired.
        deadline = loop.time() + request.timeout_nano / 1e9 if request.timeout_nano else None
        metadata: dict[str, list[str]] = {}
        for pair in request.metadata:
            metadata.setdefault(pair.key, []).append(pair.value)
        context = RequestContext(request.service, request.method, metadata, deadline)
        where = f"{request.service}/{request.method}"

        reply = Response(status=Status(code=Code.OK))
        scope = asyncio.timeout_at(deadline)
        try:
            async with scope:
                if method is None:
                    wait = self._server._waiting_for(request.service, request.method)
                    if wait is not None:
                        await wait()
                    method = self._server._lookup(request.service, request.method)
                try:
                    message = method.request_type.FromString(request.payload)
                except DecodeError as err:
                    raise TtrpcError(Code.INVALID_ARGUMENT,
                                     f"{where}: bad request: {err}") from err
                result = await method.handler(message, context)
            reply.payload = result.SerializeToString()
        except TtrpcError as err:
            reply = _status_response(err.code, err.message)
        except TimeoutError as err:
            if not scope.expired():
                log.error("ttrpc: %s raised", where, exc_info=err)
                reply = _status_response(Code.UNKNOWN, str(err) or "timeout")
            else:
                reply = _status_response(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is None or current.cancelling():
                raise  # the connection or the server is going away: no answer
            # The handler let through a cancellation of something it awaited, not its own.
            reply = _status_response(Code.CANCELLED, f"{where}: cancelled")
        except Exception as err:
            log.error("ttrpc: %s raised", where, exc_info=err)
            reply = _status_response(Code.UNKNOWN, str(err) or type(err).__name__)

        data = reply.SerializeToString()
        if len(data) > MAX_DATA_LENGTH:
            log.error("ttrpc: %s: response of %d bytes is too large", where, len(data))
            data = _status_response(
                Code.RESOURCE_EXHAUSTED,
                f"message length {len(data)} exceed maximum message size of {MAX_DATA_LENGTH}",
            ).SerializeToString()
        await self._send(stream_id, data)

    async def _send_status(self, stream_id: int, code: Code, message: str) -> None:
        await self._send(stream_id, _status_response(code, message).SerializeToString())

    async def _send(self, stream_id: int, data: bytes) -> None:
        frame = encode_frame(stream_id, FrameType.RESPONSE, 0, data)
        try:
            async with self._write_lock:
                self._writer.write(frame)
                await self._writer.drain()
        except OSError as err:  # the peer left; the reader sees EOF and tears down
            log.debug("ttrpc: response on stream %d not sent: %s", stream_id, err)


def _status_response(code: Code, message: str) -> Response:
    return Response(status=Status(code=code, message=message))


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    path.unlink()
