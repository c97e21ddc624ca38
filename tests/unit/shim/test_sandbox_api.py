"""The sandbox API (CRI ``sandboxer = "shim"``): the pod VM lives from StartSandbox to
StopSandbox, containers created in between share it, Shutdown waits for the pod."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from protocols.api.containerd.runtime.sandbox.v1 import sandbox_pb2 as pb
from protocols.api.cri import api_pb2 as cri
from shim.core import errors
from shim.daemon.sandbox_service import NOT_READY, READY, SandboxService, pod_spec
from shim.pod.pod import PodState
from shim.pod.vm import PodConfig
from shim.task.process import CreateTask
from tests.unit.shim.conftest import STAMP, Harness, make_harness


def config(h: Harness, sandbox_id: str = "pod1") -> PodConfig:
    return PodConfig(sandbox_id=sandbox_id, namespace="default", bundle=h.root / sandbox_id,
                     spec={"annotations": {"io.kubernetes.cri.sandbox-id": sandbox_id}})


async def test_pod_vm_lives_from_start_to_stop(h: Harness) -> None:
    await h.pod.create_sandbox(config(h))
    assert h.state() is PodState.CREATED  # nothing boots before StartSandbox
    started = await h.pod.start_sandbox("pod1")
    assert (started.pid, started.created_at, started.state) == (4242, STAMP, PodState.READY)
    assert [c.sandbox_id for c in h.booter.configs] == ["pod1"]

    # A container of the pod reuses the VM; its delete does not end the pod.
    await h.tasks.create(CreateTask(id="c1", bundle=str(h.bundle(
        "c1", {"io.kubernetes.cri.sandbox-id": "pod1"}))))
    assert len(h.booter.configs) == 1
    await h.tasks.delete("c1")
    assert ("RemoveContainer", "c1", "") in h.agent.calls
    assert not await h.tasks.shutdown(now=False)  # the pod is still running

    waiter = asyncio.create_task(h.pod.wait_sandbox("pod1"))
    await asyncio.sleep(0)
    assert not waiter.done()
    await h.pod.stop_sandbox("pod1")
    stopped = await waiter
    assert (stopped.exited_at, stopped.state, stopped.exit_status) == (
        STAMP, PodState.STOPPED, 0)
    assert h.vm.stopped
    await h.pod.stop_sandbox("pod1")  # idempotent
    assert await h.tasks.shutdown(now=False)


async def test_a_dead_vm_ends_the_wait(h: Harness) -> None:
    """WaitSandbox returns when the VM dies, not only at StopSandbox."""
    await h.pod.create_sandbox(config(h))
    await h.pod.start_sandbox("pod1")
    waiter = asyncio.create_task(h.pod.wait_sandbox("pod1"))
    h.vm.die()
    status = await asyncio.wait_for(waiter, 2)
    assert (status.state, status.exit_status, status.exited_at) == (
        PodState.EXITED, 137, STAMP)


async def test_misuse(h: Harness) -> None:
    with pytest.raises(errors.NotFound):
        await h.pod.start_sandbox("nope")
    await h.pod.create_sandbox(config(h))
    with pytest.raises(errors.AlreadyExists):
        await h.pod.create_sandbox(config(h, "pod2"))
    with pytest.raises(errors.NotFound):
        h.pod.status("pod2")
    await h.pod.start_sandbox("pod1")
    with pytest.raises(errors.FailedPrecondition, match="cannot start in state ready"):
        await h.pod.start_sandbox("pod1")


async def test_a_failed_start_can_be_retried(h: Harness) -> None:
    await h.pod.create_sandbox(config(h))
    h.booter.failure = errors.Unavailable("no QEMU")
    with pytest.raises(errors.Unavailable):
        await h.pod.start_sandbox("pod1")
    assert h.state() is PodState.CREATED
    h.booter.failure = None
    await h.pod.start_sandbox("pod1")
    assert h.state() is PodState.READY


async def test_service_edge(h: Harness, tmp_path: Path) -> None:
    service = SandboxService(h.pod, "default")
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
    assert h.pod.shutdown_requested.is_set()
    spec = h.booter.configs[0].spec
    assert spec["hostname"] == "web"
    assert spec["annotations"] == {"a": "b", "io.kubernetes.cri.sandbox-id": "pod1"}


async def test_undecodable_pod_config_is_invalid_argument(h: Harness) -> None:
    service = SandboxService(h.pod, "default")
    with pytest.raises(errors.InvalidArgument, match="PodSandboxConfig"):
        await service.CreateSandbox(pb.CreateSandboxRequest(
            sandbox_id="pod1", options=any_pb2.Any(type_url="runtime.v1.PodSandboxConfig",
                                                   value=b"\x0a\xff")), None)
    assert h.state() is PodState.EMPTY


def test_pod_spec_without_cri_options() -> None:
    spec = pod_spec(pb.CreateSandboxRequest(sandbox_id="p", annotations={"x": "y"}))
    assert spec == {"annotations": {"x": "y", "io.kubernetes.cri.sandbox-id": "p"}}
    spec = pod_spec(pb.CreateSandboxRequest(sandbox_id="p", netns_path="/n"))
    assert spec["linux"] == {"namespaces": [{"type": "network", "path": "/n"}]}


def test_pod_spec_carries_the_pods_sysctls() -> None:
    config = cri.PodSandboxConfig(linux=cri.LinuxPodSandboxConfig(
        sysctls={"kernel.shm_rmid_forced": "1"}))
    options = any_pb2.Any(type_url="type.googleapis.com/runtime.v1.PodSandboxConfig",
                          value=config.SerializeToString())
    spec = pod_spec(pb.CreateSandboxRequest(sandbox_id="p", options=options, netns_path="/n"))
    assert spec["linux"] == {"sysctl": {"kernel.shm_rmid_forced": "1"},
                             "namespaces": [{"type": "network", "path": "/n"}]}


async def test_a_sandbox_api_pods_containers_carry_its_sysctls(h: Harness) -> None:
    """No pause container applies the pod's sysctls: each container of the pod carries them
    (its own values win, network ones stay out)."""
    pod = dataclasses.replace(config(h), spec={**config(h).spec, "linux": {"sysctl": {
        "kernel.shm_rmid_forced": "1", "kernel.msgmax": "9000", "net.ipv4.ip_forward": "1"}}})
    await h.pod.create_sandbox(pod)
    await h.pod.start_sandbox("pod1")
    bundle = h.bundle("c1", {"io.kubernetes.cri.sandbox-id": "pod1"})
    doc = json.loads((bundle / "config.json").read_text())
    doc["linux"] = {"sysctl": {"kernel.msgmax": "8192"}}
    (bundle / "config.json").write_text(json.dumps(doc))
    await h.tasks.create(CreateTask(id="c1", bundle=str(bundle)))
    assert dict(h.agent.containers["c1"].Linux.Sysctl) == {
        "kernel.shm_rmid_forced": "1", "kernel.msgmax": "8192"}
    await h.pod.stop_sandbox("pod1")


async def test_sandbox_metrics_report_the_vm_process_footprint(tmp_path: Path) -> None:
    import os

    from protocols.api.containerd.cgroups.v2 import metrics_pb2 as v2
    from tests.unit.shim.fakes import FakeBooter

    # The fake VM's "hypervisor" is this test process.
    h = make_harness(tmp_path, booter=FakeBooter(pid=os.getpid()))
    service = SandboxService(h.pod, "default")
    await h.pod.create_sandbox(config(h))
    with pytest.raises(errors.FailedPrecondition):  # no VM before StartSandbox
        await service.SandboxMetrics(pb.SandboxMetricsRequest(sandbox_id="pod1"), None)
    await h.pod.start_sandbox("pod1")
    reply = await service.SandboxMetrics(pb.SandboxMetricsRequest(sandbox_id="pod1"), None)
    assert reply.metrics.id == "pod1" and reply.metrics.timestamp.seconds > 0
    assert reply.metrics.data.type_url == "io.containerd.cgroups.v2.Metrics"
    data = v2.Metrics.FromString(reply.metrics.data.value)
    assert data.memory.usage > 1 << 20 and data.cpu.usage_usec > 0 and data.pids.current >= 1
    await h.aclose()
