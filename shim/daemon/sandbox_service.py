"""The sandbox API edge (``containerd.runtime.sandbox.v1.Sandbox``): CRI with
``sandboxer = "shim"`` makes the pod through it, so the pod VM exists at pod level (from
StartSandbox to StopSandbox) instead of booting with the first container.

Served on the same socket and connection as the task service (``shim.daemon.ttrpc_server``).
Each handler translates the request and makes one :class:`~shim.pod.pod.Pod` call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import DecodeError

from protocols.api.containerd.runtime.sandbox.v1 import sandbox_pb2 as pb
from protocols.api.containerd.types import metrics_pb2 as metric_pb2
from protocols.api.containerd.types import platform_pb2
from shim.core import identifiers
from shim.core.bundle import (
    SANDBOX_CPU_PERIOD,
    SANDBOX_CPU_QUOTA,
    SANDBOX_CPU_SHARES,
    SANDBOX_ID_ANNOTATION,
    SANDBOX_MEMORY,
)
from shim.core.cgroup import sandbox_cgroups_path
from shim.core.errors import FailedPrecondition, InvalidArgument
from shim.daemon.task_service import runtime_options
from shim.pod import metrics
from shim.pod.pod import Pod, PodState, PodStatus
from shim.pod.vm import PodConfig

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
    sends the pod's in its PodSandboxConfig, the request's own map is empty), hostname, the
    pod's sysctls (given to its containers: see ``shim.task.with_pod_sysctls``), the sandbox
    resource annotations and ``linux.cgroupsPath`` containerd would derive from the config's
    ``linux.resources`` and ``cgroup_parent``, and the network namespace CNI set up."""
    annotations = dict(request.annotations)
    spec: dict[str, object] = {}
    linux: dict[str, object] = {}
    if request.options.type_url.rsplit("/", 1)[-1] == POD_CONFIG_TYPE:
        from protocols.api.cri import api_pb2 as cri  # only CRI's CreateSandbox carries one

        try:
            config = cri.PodSandboxConfig.FromString(request.options.value)
        except DecodeError as err:
            raise InvalidArgument(f"options: not a {POD_CONFIG_TYPE}: {err}") from err
        annotations.update(config.annotations)
        if config.hostname:
            spec["hostname"] = config.hostname
        if config.linux.sysctls:  # a pause container would apply them to the pod's namespaces
            linux["sysctl"] = dict(config.linux.sysctls)
        if config.linux.HasField("resources"):
            res = config.linux.resources
            annotations.update({SANDBOX_CPU_PERIOD: str(res.cpu_period),
                                SANDBOX_CPU_QUOTA: str(res.cpu_quota),
                                SANDBOX_CPU_SHARES: str(res.cpu_shares),
                                SANDBOX_MEMORY: str(res.memory_limit_in_bytes)})
        if config.linux.cgroup_parent:
            linux["cgroupsPath"] = sandbox_cgroups_path(config.linux.cgroup_parent,
                                                        request.sandbox_id)
    annotations[SANDBOX_ID_ANNOTATION] = request.sandbox_id
    spec["annotations"] = annotations
    if request.netns_path:
        linux["namespaces"] = [{"type": "network", "path": request.netns_path}]
    if linux:
        spec["linux"] = linux
    return spec


def _state(status: PodStatus) -> str:
    return READY if status.state is PodState.READY else NOT_READY


class SandboxService:
    def __init__(self, pod: Pod, namespace: str) -> None:
        self._pod = pod
        self._namespace = namespace

    async def CreateSandbox(self, request: Any, context: object) -> Any:
        identifiers.validate("sandbox id", request.sandbox_id)
        await self._pod.create_sandbox(PodConfig(
            sandbox_id=request.sandbox_id, namespace=self._namespace,
            bundle=Path(request.bundle_path), spec=pod_spec(request),
            options=runtime_options(request.options)))
        return pb.CreateSandboxResponse()

    async def StartSandbox(self, request: Any, context: object) -> Any:
        status = await self._pod.start_sandbox(request.sandbox_id)
        return pb.StartSandboxResponse(pid=status.pid, created_at=_timestamp(status.created_at))

    async def Platform(self, request: Any, context: object) -> Any:
        machine = os.uname().machine
        return pb.PlatformResponse(platform=platform_pb2.Platform(
            os="linux", architecture=_ARCH.get(machine, machine)))

    async def StopSandbox(self, request: Any, context: object) -> Any:
        await self._pod.stop_sandbox(request.sandbox_id)
        return pb.StopSandboxResponse()

    async def WaitSandbox(self, request: Any, context: object) -> Any:
        status = await self._pod.wait_sandbox(request.sandbox_id)
        return pb.WaitSandboxResponse(exit_status=status.exit_status,
                                      exited_at=_timestamp(status.exited_at))

    async def SandboxStatus(self, request: Any, context: object) -> Any:
        status = self._pod.status(request.sandbox_id)
        return pb.SandboxStatusResponse(
            sandbox_id=status.sandbox_id, pid=status.pid, state=_state(status),
            created_at=_timestamp(status.created_at), exited_at=_timestamp(status.exited_at))

    async def PingSandbox(self, request: Any, context: object) -> Any:
        self._pod.status(request.sandbox_id)
        return pb.PingResponse()

    async def ShutdownSandbox(self, request: Any, context: object) -> Any:
        await self._pod.shutdown_sandbox(request.sandbox_id)
        return pb.ShutdownSandboxResponse()

    async def SandboxMetrics(self, request: Any, context: object) -> Any:
        """The pod VM's host footprint (hypervisor + helpers) as cgroup v2 Metrics."""
        status = self._pod.status(request.sandbox_id)
        if status.state is not PodState.READY or not status.pid:
            raise FailedPrecondition(f"pod {request.sandbox_id}: VM is not running")
        import psutil  # a daemon that is never asked for metrics does not load it

        try:
            data = metrics.vm_host_metrics(status.pid)
        except psutil.NoSuchProcess as err:
            raise FailedPrecondition(f"pod {request.sandbox_id}: VM process is gone") from err
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        return pb.SandboxMetricsResponse(metrics=metric_pb2.Metric(
            timestamp=now, id=request.sandbox_id,
            data=any_pb2.Any(type_url=metrics.TYPE_URL, value=data.SerializeToString())))
