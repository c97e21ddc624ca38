"""gRPC (grpc.aio) transport for ``TaskService`` and ``SandboxService``: imported by the daemon
only when it serves gRPC (containerd 1.7's default here, or ``[shim] protocol = "grpc"``).

The handlers are registered from the services' descriptors with a deserializer that lets an
undecodable request reach the handler as such, so it is answered INVALID_ARGUMENT like on
ttrpc (grpcio's own deserializer failure would be UNKNOWN).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from protocols.api.containerd.runtime.sandbox.v1 import sandbox_pb2
from protocols.api.containerd.task.v3 import shim_pb2 as task_v3
from shim.core.errors import InvalidArgument, StatusCode, status_code
from shim.daemon import sandbox_service
from shim.daemon.sandbox_service import SandboxService
from shim.daemon.task_service import METHODS, TaskService
from shim.daemon.ttrpc_server import EdgeAdapter, Handler
from shim.task.manager import TaskManager


def grpc_status(code: StatusCode) -> grpc.StatusCode:
    return grpc.StatusCode[code.name]


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not its message."""

    type_name: str
    error: DecodeError


def _decoder(cls: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def decode(data: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(data)
        except DecodeError as err:
            return Undecodable(cls.DESCRIPTOR.full_name, err)

    return decode


class GrpcTaskServicer(EdgeAdapter):
    """grpc.aio servicer: errors aborted with their table code."""

    def _wrap(self, method: str, handler: Handler) -> Handler:
        async def decoded(request: Any, context: Any) -> Any:
            if isinstance(request, Undecodable):
                raise InvalidArgument(f"{method}: request is not a {request.type_name}: "
                                      f"{request.error}")
            return await handler(request, context)

        return super()._wrap(method, decoded)

    async def fail(self, err: Exception, context: Any) -> None:
        await context.abort(grpc_status(status_code(err)), str(err) or type(err).__name__)


def _service(service: ServiceDescriptor, servicer: Any,
             methods: Sequence[str]) -> grpc.GenericRpcHandler:
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=_decoder(GetMessageClass(
                service.methods_by_name[name].input_type)),
            response_serializer=lambda message: message.SerializeToString())
        for name in methods}
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


async def serve_grpc(tasks: TaskManager, sandbox: SandboxService,
                     path: Path) -> grpc.aio.Server:
    """Serve task v3 (and the sandbox API) over gRPC at ``path``.

    gRPC binds its own socket, so it binds a sibling path and renames it over ``path`` (atomic:
    a client connecting to ``path`` meets either the old listener or this one, never nothing).
    """
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((
        _service(task_v3.DESCRIPTOR.services_by_name["Task"],
                 GrpcTaskServicer(TaskService(tasks, task_v3)), METHODS),
        _service(sandbox_pb2.DESCRIPTOR.services_by_name["Sandbox"],
                 GrpcTaskServicer(sandbox, sandbox_service.METHODS), sandbox_service.METHODS),
    ))
    staging = path.with_name(f".{path.name}.grpc")
    staging.unlink(missing_ok=True)
    server.add_insecure_port(f"unix:{staging}")
    await server.start()
    os.chmod(staging, 0o600)
    os.rename(staging, path)
    return server
