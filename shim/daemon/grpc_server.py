"""gRPC (grpc.aio) transport for ``TaskService`` and ``SandboxService``: imported by the daemon
only when it serves gRPC (containerd 1.7's default here, or ``[shim] protocol = "grpc"``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc

from protocols.api.containerd.runtime.sandbox.v1 import sandbox_pb2_grpc
from protocols.api.containerd.task.v3 import shim_pb2 as task_v3
from protocols.api.containerd.task.v3 import shim_pb2_grpc as task_v3_grpc
from shim.core.errors import StatusCode, status_code
from shim.daemon import sandbox_service
from shim.daemon.sandbox_service import SandboxService
from shim.daemon.task_service import TaskService
from shim.daemon.ttrpc_server import EdgeAdapter
from shim.task.manager import TaskManager


def grpc_status(code: StatusCode) -> grpc.StatusCode:
    return grpc.StatusCode[code.name]


class GrpcTaskServicer(EdgeAdapter):
    """grpc.aio servicer: errors aborted with their table code."""

    async def fail(self, err: Exception, context: Any) -> None:
        await context.abort(grpc_status(status_code(err)), str(err) or type(err).__name__)


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
