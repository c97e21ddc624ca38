"""gRPC transport (grpclib: pure Python on asyncio over h2) for ``TaskService`` and
``SandboxService``: imported by the daemon only when it serves gRPC (containerd 1.7's default
here, or ``[shim] protocol = "grpc"``).

It serves the listening socket ``start`` bound and passed down, like ttrpc: no second socket, no
rename, no readiness handshake. grpcio's native core kept ~10 MiB resident in every gRPC daemon;
grpclib with h2, hpack, hyperframe and multidict add about 2 MiB.

The handlers are bound to the services' descriptors (no generated stubs). A request whose bytes
are not its message is answered INVALID_ARGUMENT like on ttrpc, and a request above
``MAX_RECEIVE_MESSAGE`` RESOURCE_EXHAUSTED, grpcio's default limit and wording.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpclib.const import Cardinality, Status
from grpclib.const import Handler as RpcHandler
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.server import Server
from grpclib.server import Stream as GrpcStream

from protocols.api.containerd.runtime.sandbox.v1 import sandbox_pb2
from protocols.api.containerd.task.v3 import shim_pb2 as task_v3
from shim.core.errors import InvalidArgument, StatusCode, status_code
from shim.daemon import sandbox_service
from shim.daemon.sandbox_service import SandboxService
from shim.daemon.task_service import METHODS, TaskService
from shim.daemon.ttrpc_server import EdgeAdapter, Handler
from shim.task.manager import TaskManager

log = logging.getLogger(__name__)

# grpcio's default receive limit (what the shim enforced before grpclib); replies are unbounded
# on our side as they were (containerd's client enforces its own receive limit).
MAX_RECEIVE_MESSAGE = 4 * 1024 * 1024
# The error text of a failed call (grpc-message, a trailer): grpcio clients refuse trailers above
# 16 KiB, and the text is percent-encoded (up to 3 bytes a character) on the way.
MAX_STATUS_MESSAGE = 4096


def grpc_status(code: StatusCode) -> Status:
    """Our table's code as grpclib's status (the same numbers: both are gRPC's codes)."""
    return Status(int(code))


class LimitedCodec(ProtoCodec):
    """The protobuf codec, refusing requests above ``MAX_RECEIVE_MESSAGE`` before decoding them
    (grpclib has no limit of its own: the check comes once the message is read, h2's flow
    control pacing the sender meanwhile)."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        if len(data) > MAX_RECEIVE_MESSAGE:
            raise GRPCError(Status.RESOURCE_EXHAUSTED, "Received message larger than max "
                            f"({len(data)} vs. {MAX_RECEIVE_MESSAGE})")
        return super().decode(data, message_type)


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not its message (or no message at all)."""

    type_name: str
    error: str


class GrpcTaskServicer(EdgeAdapter):
    """grpclib handlers: errors leave as GRPCError(table code)."""

    def _wrap(self, method: str, handler: Handler) -> Handler:
        async def decoded(request: Any, context: Any) -> Any:
            if isinstance(request, Undecodable):
                raise InvalidArgument(f"{method}: request is not a {request.type_name}: "
                                      f"{request.error}")
            return await handler(request, context)

        return super()._wrap(method, decoded)

    async def fail(self, err: Exception, context: Any) -> None:
        message = str(err) or type(err).__name__
        if len(message) > MAX_STATUS_MESSAGE:  # it travels in a header: gRPC clients cap those
            message = message[:MAX_STATUS_MESSAGE] + "... (truncated)"
        raise GRPCError(grpc_status(status_code(err)), message) from err


def _unary(request_type: type[Message], handler: Handler,
           stopping: asyncio.Event) -> Callable[[GrpcStream[Any, Any]], Awaitable[None]]:
    async def rpc(stream: GrpcStream[Any, Any]) -> None:
        try:
            request: Message | Undecodable | None = await stream.recv_message()
        except DecodeError as err:
            request = Undecodable(request_type.DESCRIPTOR.full_name, str(err))
        if request is None:
            request = Undecodable(request_type.DESCRIPTOR.full_name, "no message")
        try:
            reply = await handler(request, stream)
        except asyncio.CancelledError:
            if stopping.is_set():  # grpclib would leave the call unanswered on a live connection
                with contextlib.suppress(Exception):
                    await stream.send_trailing_metadata(status=Status.CANCELLED,
                                                        status_message="the shim is stopping")
            raise
        await stream.send_message(reply)

    return rpc


class _Service:
    """One service's RPCs in grpclib's ``__mapping__`` form, each through ``servicer``."""

    def __init__(self, service: ServiceDescriptor, servicer: GrpcTaskServicer,
                 methods: Sequence[str], stopping: asyncio.Event) -> None:
        self._mapping: dict[str, RpcHandler] = {}
        for name in methods:
            method = service.methods_by_name[name]
            request_type = GetMessageClass(method.input_type)
            self._mapping[f"/{service.full_name}/{name}"] = RpcHandler(
                _unary(request_type, getattr(servicer, name), stopping), Cardinality.UNARY_UNARY,
                request_type, GetMessageClass(method.output_type))

    def __mapping__(self) -> dict[str, RpcHandler]:
        return self._mapping


class GrpcServer:
    """The running grpclib server; ``stop`` is the daemon's teardown step."""

    def __init__(self, server: Server, stopping: asyncio.Event) -> None:
        self._server = server
        self._stopping = stopping

    async def stop(self, grace: float) -> None:
        """Stop accepting, cancel in-flight handlers (as ttrpc's close does) and wait for them
        at most ``grace`` seconds; each cancelled call is answered CANCELLED."""
        self._stopping.set()
        self._server.close()
        try:
            async with asyncio.timeout(grace):
                await self._server.wait_closed()
        except TimeoutError:
            log.warning("gRPC handlers still running %.1f s after they were cancelled", grace)


async def serve_grpc(tasks: TaskManager, sandbox: SandboxService,
                     listener: socket.socket) -> GrpcServer:
    """Serve task v3 (and the sandbox API) over gRPC on the already listening ``listener``."""
    stopping = asyncio.Event()
    server = Server([
        _Service(task_v3.DESCRIPTOR.services_by_name["Task"],
                 GrpcTaskServicer(TaskService(tasks, task_v3)), METHODS, stopping),
        _Service(sandbox_pb2.DESCRIPTOR.services_by_name["Sandbox"],
                 GrpcTaskServicer(sandbox, sandbox_service.METHODS), sandbox_service.METHODS,
                 stopping),
    ], codec=LimitedCodec())
    await server.start(sock=listener)
    return GrpcServer(server, stopping)
