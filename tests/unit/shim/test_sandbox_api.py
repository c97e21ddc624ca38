"""The sandbox API (CRI ``sandboxer = "shim"``): the pod VM lives from StartSandbox to
StopSandbox, containers created in between share it, Shutdown waits for the pod."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from protocols.api.containerd.runtime.sandbox.v1 import sandbox_pb2 as pb
from protocols.api.cri import api_pb2 as cri
from shim.core import errors
from shim.daemon.sandbox_service import NOT_READY, READY, SandboxService, pod_spec
from shim.task.manager import CreateTask, PodRecord, PodState
from tests.unit.shim.conftest import Pod

STAMP = 1_700_000_000_123_456_789


def record(pod: Pod, sandbox_id: str = "pod1") -> PodRecord:
    return PodRecord(sandbox_id=sandbox_id, bundle=pod.root / sandbox_id,
                     spec={"annotations": {"io.kubernetes.cri.sandbox-id": sandbox_id}})


def pod_state(pod: Pod) -> PodState:
    return pod.tasks.pod_state


async def test_pod_vm_lives_from_start_to_stop(pod: Pod) -> None:
    await pod.tasks.create_pod(record(pod))
    assert pod_state(pod) is PodState.EMPTY  # nothing boots before StartSandbox
    started = await pod.tasks.start_pod("pod1")
    assert (started.pid, started.created_at, started.ready) == (4242, STAMP, True)
    assert pod_state(pod) is PodState.READY
    assert [c.sandbox_id for c in pod.factory.configs] == ["pod1"]

    # A container of the pod reuses the VM; its delete does not end the pod.
    await pod.tasks.create(CreateTask(id="c1", bundle=str(pod.bundle(
        "c1", {"io.kubernetes.cri.sandbox-id": "pod1"}))))
    assert len(pod.factory.configs) == 1
    await pod.tasks.delete("c1")
    assert not await pod.tasks.shutdown(now=False)  # the pod is still running

    waiter = asyncio.create_task(pod.tasks.wait_pod("pod1"))
    await asyncio.sleep(0)
    assert not waiter.done()
    await pod.tasks.stop_pod("pod1")
    stopped = await waiter
    assert (stopped.exited_at, stopped.ready) == (STAMP, False)
    assert pod.sandbox.shut_down
    await pod.tasks.stop_pod("pod1")  # idempotent
    assert await pod.tasks.shutdown(now=False)


async def test_misuse(pod: Pod) -> None:
    with pytest.raises(errors.NotFound):
        await pod.tasks.start_pod("nope")
    await pod.tasks.create_pod(record(pod))
    with pytest.raises(errors.AlreadyExists):
        await pod.tasks.create_pod(record(pod, "pod2"))
    with pytest.raises(errors.NotFound):
        pod.tasks.pod_status("pod2")
    await pod.tasks.start_pod("pod1")
    with pytest.raises(errors.FailedPrecondition):
        await pod.tasks.start_pod("pod1")


async def test_service_edge(pod: Pod, tmp_path: Path) -> None:
    service = SandboxService(pod.tasks)
    config = cri.PodSandboxConfig(hostname="web", annotations={"a": "b"})
    await service.CreateSandbox(pb.CreateSandboxRequest(
        sandbox_id="pod1", bundle_path=str(tmp_path), netns_path="/var/run/netns/cni-1",
        options=any_pb2.Any(type_url="runtime.v1.PodSandboxConfig",
                            value=config.SerializeToString())), None)
    status = await service.SandboxStatus(pb.SandboxStatusRequest(sandbox_id="pod1"), None)
    assert status.state == NOT_READY
    started = await service.StartSandbox(pb.StartSandboxRequest(sandbox_id="pod1"), None)
    assert started.pid == 4242 and started.created_at.ToNanoseconds() == STAMP
    status = await service.SandboxStatus(pb.SandboxStatusRequest(sandbox_id="pod1"), None)
    assert (status.sandbox_id, status.state, status.pid) == ("pod1", READY, 4242)
    platform = await service.Platform(pb.PlatformRequest(sandbox_id="pod1"), None)
    assert platform.platform.os == "linux"
    await service.PingSandbox(pb.PingRequest(sandbox_id="pod1"), None)
    await service.ShutdownSandbox(pb.ShutdownSandboxRequest(sandbox_id="pod1"), None)
    waited = await service.WaitSandbox(pb.WaitSandboxRequest(sandbox_id="pod1"), None)
    assert waited.exited_at.ToNanoseconds() == STAMP
    assert pod.tasks.shutdown_requested.is_set()
    spec = pod.factory.configs[0].spec
    assert spec["hostname"] == "web"
    assert spec["annotations"] == {"a": "b", "io.kubernetes.cri.sandbox-id": "pod1"}


def test_pod_spec_without_cri_options() -> None:
    spec = pod_spec(pb.CreateSandboxRequest(sandbox_id="p", annotations={"x": "y"}))
    assert spec == {"annotations": {"x": "y", "io.kubernetes.cri.sandbox-id": "p"}}
    spec = pod_spec(pb.CreateSandboxRequest(sandbox_id="p", netns_path="/n"))
    assert spec["linux"] == {"namespaces": [{"type": "network", "path": "/n"}]}


async def test_sandbox_metrics_report_the_vm_process_footprint(pod: Pod) -> None:
    import os

    from protocols.api.containerd.cgroups.v2 import metrics_pb2 as v2

    service = SandboxService(pod.tasks)
    await pod.tasks.create_pod(record(pod))
    with pytest.raises(errors.FailedPrecondition):  # no VM before StartSandbox
        await service.SandboxMetrics(pb.SandboxMetricsRequest(sandbox_id="pod1"), None)
    await pod.tasks.start_pod("pod1")
    # The fake sandbox's "VM" pid is 4242; stand this test process in for it.
    pod.tasks.pod_status("pod1").pid = os.getpid()
    reply = await service.SandboxMetrics(pb.SandboxMetricsRequest(sandbox_id="pod1"), None)
    assert reply.metrics.id == "pod1" and reply.metrics.timestamp.seconds > 0
    assert reply.metrics.data.type_url == "io.containerd.cgroups.v2.Metrics"
    data = v2.Metrics.FromString(reply.metrics.data.value)
    assert data.memory.usage > 1 << 20 and data.cpu.usage_usec > 0 and data.pids.current >= 1
