"""The sandbox API edge (``containerd.runtime.sandbox.v1.Sandbox``): CRI with
``sandboxer = "shim"`` makes the pod through it, so the pod VM exists at pod level (from
StartSandbox to StopSandbox) instead of booting with the first container.

Served on the same socket and connection as the task service
(``shim.daemon.ttrpc_server``). Each handler
translates the request and makes one ``TaskManager`` call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, timestamp_pb2

from protocols.api.containerd.runtime.sandbox.v1 import sandbox_pb2 as pb
from protocols.api.containerd.types import metrics_pb2 as metric_pb2
from protocols.api.containerd.types import platform_pb2
from shim.binary.contract import SANDBOX_ID_ANNOTATION
from shim.core.errors import FailedPrecondition
from shim.daemon.task_service import runtime_options
from shim.pod import metrics
from shim.task.manager import PodRecord, TaskManager

METHODS = ("CreateSandbox", "StartSandbox", "Platform", "StopSandbox", "WaitSandbox",
           "SandboxStatus", "PingSandbox", "ShutdownSandbox", "SandboxMetrics")
POD_CONFIG_TYPE = "runtime.v1.PodSandboxConfig"  # what CRI puts in CreateSandbox.options
READY, NOT_READY = "SANDBOX_READY", "SANDBOX_NOTREADY"  # CRI's sandbox state strings
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "s390x": "s390x", "ppc64le": "ppc64le"}


def _timestamp(ns: int) -> timestamp_pb2.Timestamp | None:
    if not ns:
        return None
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def pod_spec(request: pb.CreateSandboxRequest) -> dict[str, object]:
    """The pod's VM is made from what a pause container's spec would carry: annotations (CRI
    sends the pod's in its PodSandboxConfig, the request's own map is empty), hostname and the
    network namespace CNI set up."""
    annotations = dict(request.annotations)
    spec: dict[str, object] = {}
    if request.options.type_url.rsplit("/", 1)[-1] == POD_CONFIG_TYPE:
        from protocols.api.cri import api_pb2 as cri  # only CRI's CreateSandbox carries one

        config = cri.PodSandboxConfig.FromString(request.options.value)
        annotations.update(config.annotations)
        if config.hostname:
            spec["hostname"] = config.hostname
    annotations[SANDBOX_ID_ANNOTATION] = request.sandbox_id
    spec["annotations"] = annotations
    if request.netns_path:
        spec["linux"] = {"namespaces": [{"type": "network", "path": request.netns_path}]}
    return spec


class SandboxService:
    def __init__(self, tasks: TaskManager) -> None:
        self._tasks = tasks

    async def CreateSandbox(self, request: Any, context: object) -> Any:
        await self._tasks.create_pod(PodRecord(
            sandbox_id=request.sandbox_id, bundle=Path(request.bundle_path),
            spec=pod_spec(request), options=runtime_options(request.options)))
        return pb.CreateSandboxResponse()

    async def StartSandbox(self, request: Any, context: object) -> Any:
        pod = await self._tasks.start_pod(request.sandbox_id)
        return pb.StartSandboxResponse(pid=pod.pid, created_at=_timestamp(pod.created_at))

    async def Platform(self, request: Any, context: object) -> Any:
        machine = os.uname().machine
        return pb.PlatformResponse(platform=platform_pb2.Platform(
            os="linux", architecture=_ARCH.get(machine, machine)))

    async def StopSandbox(self, request: Any, context: object) -> Any:
        await self._tasks.stop_pod(request.sandbox_id)
        return pb.StopSandboxResponse()

    async def WaitSandbox(self, request: Any, context: object) -> Any:
        pod = await self._tasks.wait_pod(request.sandbox_id)
        return pb.WaitSandboxResponse(exit_status=0, exited_at=_timestamp(pod.exited_at))

    async def SandboxStatus(self, request: Any, context: object) -> Any:
        pod = self._tasks.pod_status(request.sandbox_id)
        return pb.SandboxStatusResponse(
            sandbox_id=pod.sandbox_id, pid=pod.pid, state=READY if pod.ready else NOT_READY,
            created_at=_timestamp(pod.created_at), exited_at=_timestamp(pod.exited_at))

    async def PingSandbox(self, request: Any, context: object) -> Any:
        self._tasks.pod_status(request.sandbox_id)
        return pb.PingResponse()

    async def ShutdownSandbox(self, request: Any, context: object) -> Any:
        await self._tasks.shutdown_pod(request.sandbox_id)
        return pb.ShutdownSandboxResponse()

    async def SandboxMetrics(self, request: Any, context: object) -> Any:
        """The pod VM's host footprint (hypervisor + helpers) as cgroup v2 Metrics."""
        pod = self._tasks.pod_status(request.sandbox_id)
        if not pod.ready or not pod.pid:
            raise FailedPrecondition(f"pod {request.sandbox_id}: VM is not running")
        import psutil  # a daemon that is never asked for metrics does not load it

        try:
            data = metrics.vm_host_metrics(pod.pid)
        except psutil.NoSuchProcess as err:
            raise FailedPrecondition(f"pod {request.sandbox_id}: VM process is gone") from err
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        return pb.SandboxMetricsResponse(metrics=metric_pb2.Metric(
            timestamp=now, id=request.sandbox_id,
            data=any_pb2.Any(type_url=metrics.TYPE_URL, value=data.SerializeToString())))
