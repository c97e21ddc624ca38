"""The two transports for ``TaskService`` (and the sandbox API's ``SandboxService`` on the same
socket): gRPC (grpc.aio) and ttrpc, one error table for both.

containerd 2.x with a version-3 bootstrap and containerd 1.7 with version 2 + "grpc" call
``containerd.task.v3.Task`` over gRPC; ttrpc serves both ``containerd.task.v2.Task`` and
``containerd.task.v3.Task`` on one socket.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from protocols.api.containerd.runtime.sandbox.v1 import sandbox_pb2, sandbox_pb2_grpc
from protocols.api.containerd.task.v2 import shim_pb2 as task_v2
from protocols.api.containerd.task.v3 import shim_pb2 as task_v3
from protocols.api.containerd.task.v3 import shim_pb2_grpc as task_v3_grpc
from protocols.ttrpc import Code, Server, TtrpcError
from shim import sandbox_service
from shim.errors import ShimError, StatusCode, status_code
from shim.sandbox_service import SandboxService
from shim.service import METHODS, TaskService
from shim.task import TaskManager

log = logging.getLogger(__name__)

Handler = Callable[[Any, Any], Awaitable[Any]]


def _log_unexpected(method: str, err: Exception) -> None:
    if not isinstance(err, ShimError):
        log.error("%s failed unexpectedly", method, exc_info=err)


class GrpcTaskServicer:
    """grpc.aio servicer: every RPC of a service edge (TaskService by default), errors aborted
    with their table code."""

    def __init__(self, service: Any, methods: Sequence[str] = METHODS) -> None:
        for method in methods:
            setattr(self, method, self._wrap(method, getattr(service, method)))

    @staticmethod
    def _wrap(method: str, handler: Handler) -> Handler:
        async def call(request: Any, context: Any) -> Any:
            try:
                return await handler(request, context)
            except Exception as err:
                _log_unexpected(method, err)
                code = status_code(err)
                await context.abort(grpc.StatusCode[code.name], str(err) or type(err).__name__)
                raise AssertionError("context.abort returned") from err

        call.__name__ = method
        return call


class TtrpcTaskService:
    """ttrpc handlers: every RPC of a service edge (TaskService by default), errors raised as
    TtrpcError(table code)."""

    def __init__(self, service: Any, methods: Sequence[str] = METHODS) -> None:
        for method in methods:
            setattr(self, method, self._wrap(method, getattr(service, method)))

    @staticmethod
    def _wrap(method: str, handler: Handler) -> Handler:
        async def call(request: Any, context: Any) -> Any:
            try:
                return await handler(request, context)
            except TtrpcError:
                raise
            except Exception as err:
                _log_unexpected(method, err)
                code = status_code(err)
                raise TtrpcError(Code(int(code)), str(err) or type(err).__name__) from err

        call.__name__ = method
        return call


def grpc_status(code: StatusCode) -> grpc.StatusCode:
    return grpc.StatusCode[code.name]


async def serve_grpc(tasks: TaskManager, path: Path) -> grpc.aio.Server:
    """Serve task v3 over gRPC at ``path``.

    gRPC binds its own socket, so it binds a sibling path and renames it over ``path`` (atomic:
    a client connecting to ``path`` meets either the old listener or this one, never nothing).
    """
    server = grpc.aio.server()
    task_v3_grpc.add_TaskServicer_to_server(
        GrpcTaskServicer(TaskService(tasks, task_v3)), server)
    sandbox_pb2_grpc.add_SandboxServicer_to_server(
        GrpcTaskServicer(SandboxService(tasks), sandbox_service.METHODS), server)
    staging = path.with_name(f".{path.name}.grpc")
    staging.unlink(missing_ok=True)
    server.add_insecure_port(f"unix:{staging}")
    await server.start()
    os.chmod(staging, 0o600)
    os.rename(staging, path)
    return server


async def serve_ttrpc(tasks: TaskManager, sock: socket.socket) -> Server:
    """Serve task v2 and v3 over ttrpc on an already listening socket."""
    server = Server()
    for pb in (task_v2, task_v3):
        server.register_service(pb.DESCRIPTOR.services_by_name["Task"],
                                TtrpcTaskService(TaskService(tasks, pb)))
    server.register_service(sandbox_pb2.DESCRIPTOR.services_by_name["Sandbox"],
                            TtrpcTaskService(SandboxService(tasks), sandbox_service.METHODS))
    await server.serve_socket(sock)
    return server
