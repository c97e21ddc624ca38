"""The task service edge: protobuf request in, one domain call, protobuf response out.

Transport-agnostic: the same ``TaskService`` object serves gRPC (``shim.daemon.grpc_server``)
and ttrpc (``shim.daemon.ttrpc_server``), and task v2 and v3 (the messages are identical; only
the generated module differs, passed as ``pb``).
Errors are raised as ``shim.core.errors`` types and turned into status codes by the transport,
from the one table in ``shim.core.errors``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import DecodeError

from protocols.api.containerd.types.task import task_pb2 as task_types
from protocols.api.runtimeoptions.v1 import api_pb2 as runtimeoptions
from shim.core.config import RUNTIME_OPTIONS_TYPE, RuntimeOptions
from shim.core.errors import InvalidArgument, Unimplemented
from shim.pod.mounts import Mount
from shim.task.events import Stdio
from shim.task.manager import TaskManager
from shim.task.process import CreateTask, ExecTask, ProcessState

log = logging.getLogger(__name__)

STATUS: dict[ProcessState, int] = {
    ProcessState.CREATED: task_types.CREATED,
    ProcessState.RUNNING: task_types.RUNNING,
    ProcessState.PAUSED: task_types.PAUSED,
    ProcessState.STOPPED: task_types.STOPPED,
    ProcessState.DELETED: task_types.STOPPED,
}

# The RPCs of containerd.task.v2/v3.Task, in the order of the .proto.
METHODS = ("State", "Create", "Start", "Delete", "Pids", "Pause", "Resume", "Checkpoint", "Kill",
           "Exec", "ResizePty", "CloseIO", "Update", "Wait", "Stats", "Connect", "Shutdown")
DISTRIBUTION = "coco-shim"
DIST_INFO = "coco_shim-*.dist-info"


@functools.cache
def shim_version() -> str:
    """What Connect reports: the installed distribution's version, read from its METADATA
    ("Version:" header; importlib.metadata would load the email parser, ~1.5 MiB of the
    daemon's memory, for this one line)."""
    for entry in sys.path:
        for metadata in sorted(Path(entry or ".").glob(f"{DIST_INFO}/METADATA")):
            with contextlib.suppress(OSError):
                for line in metadata.read_text().splitlines():
                    if not line:  # the headers end at the first blank line
                        break
                    if line.startswith("Version:"):
                        return f"{DISTRIBUTION} {line.partition(':')[2].strip()}"
    return f"{DISTRIBUTION} (not installed)"


def _timestamp(ns: int) -> timestamp_pb2.Timestamp | None:
    if not ns:
        return None
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _json_any(value: any_pb2.Any, what: str) -> dict[str, object]:
    if not value.value:
        return {}
    try:
        decoded = json.loads(value.value)
    except ValueError as err:
        raise InvalidArgument(f"{what} is not JSON ({value.type_url}): {err}") from err
    except RecursionError as err:  # json recurses once per level of arrays/objects
        raise InvalidArgument(f"{what}: arrays or objects nested too deeply") from err
    if not isinstance(decoded, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return decoded


def runtime_options(value: any_pb2.Any) -> RuntimeOptions:
    """CreateTaskRequest.options / CreateSandboxRequest.options: ours, or the defaults."""
    if value.type_url.rsplit("/", 1)[-1] != RUNTIME_OPTIONS_TYPE:
        return RuntimeOptions()
    try:
        options = runtimeoptions.Options.FromString(value.value)
    except DecodeError as err:
        raise InvalidArgument(f"options: not a {RUNTIME_OPTIONS_TYPE}: {err}") from err
    return RuntimeOptions(options.type_url, options.config_path, options.config_body)


class TaskService:
    """containerd.task.v{2,3}.Task over ``TaskManager``. ``context`` is the transport's and is
    never passed on."""

    def __init__(self, tasks: TaskManager, pb: ModuleType) -> None:
        self._tasks = tasks
        self._pb = pb

    async def Create(self, request: Any, context: object) -> Any:
        # When containerd's connection really carried a request: from here on containerd 1.7
        # watches the connection and runs `delete` if this daemon dies.
        log.debug("container %s: Create received", request.id)
        pid = await self._tasks.create(CreateTask(
            id=request.id, bundle=request.bundle,
            rootfs=tuple(Mount(m.type, m.source, m.target, tuple(m.options))
                         for m in request.rootfs),
            stdio=Stdio(request.stdin, request.stdout, request.stderr, request.terminal),
            checkpoint=request.checkpoint,
            options=runtime_options(request.options)))
        return self._pb.CreateTaskResponse(pid=pid)

    async def Start(self, request: Any, context: object) -> Any:
        pid = await self._tasks.start(request.id, request.exec_id)
        return self._pb.StartResponse(pid=pid)

    async def State(self, request: Any, context: object) -> Any:
        status = await self._tasks.state(request.id, request.exec_id)
        return self._pb.StateResponse(
            id=status.id, bundle=status.bundle, pid=status.pid, status=STATUS[status.state],
            stdin=status.stdio.stdin, stdout=status.stdio.stdout, stderr=status.stdio.stderr,
            terminal=status.stdio.terminal, exit_status=status.exit_status,
            exited_at=_timestamp(status.exited_at), exec_id=status.exec_id)

    async def Wait(self, request: Any, context: object) -> Any:
        exit = await self._tasks.wait(request.id, request.exec_id)
        return self._pb.WaitResponse(exit_status=exit.exit_status,
                                     exited_at=_timestamp(exit.exited_at))

    async def Kill(self, request: Any, context: object) -> empty_pb2.Empty:
        await self._tasks.kill(request.id, request.exec_id, request.signal, request.all)
        return empty_pb2.Empty()

    async def Delete(self, request: Any, context: object) -> Any:
        exit = await self._tasks.delete(request.id, request.exec_id)
        return self._pb.DeleteResponse(pid=exit.pid, exit_status=exit.exit_status,
                                       exited_at=_timestamp(exit.exited_at))

    async def Exec(self, request: Any, context: object) -> empty_pb2.Empty:
        await self._tasks.exec(ExecTask(
            container_id=request.id, exec_id=request.exec_id,
            spec=_json_any(request.spec, "exec process spec"),
            stdio=Stdio(request.stdin, request.stdout, request.stderr, request.terminal)))
        return empty_pb2.Empty()

    async def ResizePty(self, request: Any, context: object) -> empty_pb2.Empty:
        await self._tasks.resize_pty(request.id, request.exec_id, request.width, request.height)
        return empty_pb2.Empty()

    async def CloseIO(self, request: Any, context: object) -> empty_pb2.Empty:
        await self._tasks.close_io(request.id, request.exec_id, request.stdin)
        return empty_pb2.Empty()

    async def Pids(self, request: Any, context: object) -> Any:
        pids = await self._tasks.pids(request.id)
        return self._pb.PidsResponse(processes=[task_types.ProcessInfo(pid=p) for p in pids])

    async def Pause(self, request: Any, context: object) -> empty_pb2.Empty:
        await self._tasks.pause(request.id)
        return empty_pb2.Empty()

    async def Resume(self, request: Any, context: object) -> empty_pb2.Empty:
        await self._tasks.resume(request.id)
        return empty_pb2.Empty()

    async def Update(self, request: Any, context: object) -> empty_pb2.Empty:
        resources: Mapping[str, object] = _json_any(request.resources, "resources")
        await self._tasks.update(request.id, resources)
        return empty_pb2.Empty()

    async def Stats(self, request: Any, context: object) -> Any:
        stats = await self._tasks.stats(request.id)
        return self._pb.StatsResponse(stats=any_pb2.Any(type_url=stats.type_url,
                                                        value=stats.value))

    async def Connect(self, request: Any, context: object) -> Any:
        shim_pid, task_pid = await self._tasks.connect(request.id)
        return self._pb.ConnectResponse(shim_pid=shim_pid, task_pid=task_pid,
                                        version=shim_version())

    async def Shutdown(self, request: Any, context: object) -> empty_pb2.Empty:
        await self._tasks.shutdown(request.now)
        return empty_pb2.Empty()

    async def Checkpoint(self, request: Any, context: object) -> empty_pb2.Empty:
        raise Unimplemented("checkpoint is not supported for tasks in a confidential VM")
