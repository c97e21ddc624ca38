"""The transports for ``TaskService`` (and the sandbox API's ``SandboxService`` on the same
socket): ttrpc here, gRPC in :mod:`shim.daemon.grpc_server`; one error table for both.

ttrpc serves both ``containerd.task.v2.Task`` and ``containerd.task.v3.Task`` on one socket.
containerd 2.x with a version-3 bootstrap and containerd 1.7 with version 2 + "grpc" call
``containerd.task.v3.Task`` over gRPC (:mod:`shim.daemon.grpc_server`, grpclib), imported only
when gRPC is served: a ttrpc daemon does not carry h2 and grpclib (≈ 2 MiB resident).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from protocols.api.containerd.runtime.sandbox.v1 import sandbox_pb2
from protocols.api.containerd.task.v2 import shim_pb2 as task_v2
from protocols.api.containerd.task.v3 import shim_pb2 as task_v3
from protocols.ttrpc import Code, Server, TtrpcError
from shim.core import trace
from shim.core.errors import RpcError, status_code
from shim.daemon import sandbox_service
from shim.daemon.sandbox_service import SandboxService
from shim.daemon.task_service import METHODS, TaskService
from shim.task.manager import TaskManager

log = logging.getLogger(__name__)

Handler = Callable[[Any, Any], Awaitable[Any]]


class EdgeAdapter:
    """Every RPC of a service edge (TaskService by default) as a transport handler; an error
    leaves through :meth:`fail` with its code from the one table in :mod:`shim.core.errors`."""

    def __init__(self, service: Any, methods: Sequence[str] = METHODS) -> None:
        for method in methods:
            setattr(self, method, self._wrap(method, getattr(service, method)))

    def _wrap(self, method: str, handler: Handler) -> Handler:
        async def call(request: Any, context: Any) -> Any:
            trace.mark(f"rpc: {method} received")
            try:
                reply = await handler(request, context)
                trace.mark(f"rpc: {method} answered")
                return reply
            except Exception as err:
                if not isinstance(err, RpcError | TtrpcError):
                    log.error("%s failed unexpectedly", method, exc_info=err)
                await self.fail(err, context)
                raise AssertionError(f"{type(self).__name__}.fail returned") from err

        call.__name__ = method
        return call

    async def fail(self, err: Exception, context: Any) -> None:
        """Report ``err`` to the caller the transport's way; never returns."""
        raise NotImplementedError


class TtrpcTaskService(EdgeAdapter):
    """ttrpc handlers: errors raised as TtrpcError(table code)."""

    async def fail(self, err: Exception, context: Any) -> None:
        if isinstance(err, TtrpcError):
            raise err
        raise TtrpcError(Code(int(status_code(err))), str(err) or type(err).__name__) from err


async def serve_ttrpc(tasks: TaskManager, sandbox: SandboxService,
                      sock: socket.socket) -> Server:
    """Serve task v2 and v3 (and the sandbox API) over ttrpc on an already listening socket."""
    server = Server()
    for pb in (task_v2, task_v3):
        server.register_service(pb.DESCRIPTOR.services_by_name["Task"],
                                TtrpcTaskService(TaskService(tasks, pb)))
    server.register_service(sandbox_pb2.DESCRIPTOR.services_by_name["Sandbox"],
                            TtrpcTaskService(sandbox, sandbox_service.METHODS))
    await server.serve_socket(sock)
    return server
