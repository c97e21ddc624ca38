"""Pods sized and accounted the way Kubernetes expects, end to end through CRI (containerd
2.1.9 and 1.7.24 in podsandbox mode, 2.1.9 with the sandbox API): the pod's limits size the
VM (QEMU's -smp/-m, the guest's CPUs and MemTotal), the shim daemon, QEMU and
vhost-device-vsock live in the pod's cgroup (cgroup v2, cgroupfs driver: this machine's PID 1
is not systemd, so containerd cannot use the systemd driver here; its cgroupsPath form is
unit-tested in tests/unit/shim/test_sizing.py), a container's own limit applies inside the
guest, an update beyond the boot size is refused naming the limit, and removing the pod removes
the cgroup the shim made and nothing else (the kubelet's pod-level parent stays).

One pod with limits and one without per containerd, sharing the CRI fixture of test_cri.
"""
# ruff: noqa: F811 (crictd is test_cri's fixture, imported to share its containerds)

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import grpc
import pytest

from protocols.api.cri import api_pb2 as cri
from shim.core.cgroup import unified_mount
from tests.e2e.conftest import SHIM_EXIT_GRACE
from tests.e2e.test_cri import SLEEPER, CriContainerd, crictd  # noqa: F401 (the fixture)
from tests.support.containerd import coco_processes
from tests.support.cri import CRI_NAMESPACE, container_config, pod_config
from tests.support.images import BUSYBOX_REF

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

MIB = 1 << 20
BASE_VCPUS, BASE_MEMORY_MIB = 1, 1024  # tests/support/guest.py dev_profile_text
# 1 + ceil(200000 / 100000), cut to the host's CPUs (the default sandbox_max_vcpus).
SIZED_VCPUS = min(BASE_VCPUS + 2, os.cpu_count() or 1)
LIMITS = cri.LinuxContainerResources(cpu_period=100000, cpu_quota=200000, cpu_shares=2048,
                                     memory_limit_in_bytes=768 * MIB)
CONTAINER_LIMIT_MIB = 256


def argv_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"{pid}: no cgroup v2 line")


def helpers(crictd: CriContainerd, name: bytes) -> list[int]:
    found = []
    for pid in coco_processes(crictd.base):
        try:
            if name in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]:
                found.append(pid)
        except OSError:
            continue
    return found


def guest_size(crictd: CriContainerd, cid: str) -> tuple[int, int]:
    """(CPUs, MemTotal in KiB) as the guest kernel sees them."""
    cpus = crictd.client.exec_sync(cid, ["grep", "-c", "^processor", "/proc/cpuinfo"])
    meminfo = crictd.client.exec_sync(cid, ["grep", "MemTotal", "/proc/meminfo"])
    assert cpus.exit_code == 0 and meminfo.exit_code == 0, (cpus, meminfo)
    return int(cpus.stdout), int(meminfo.stdout.split()[1])


def assert_memtotal_near(memtotal_kib: int, memory_mib: int) -> None:
    # MemTotal is the RAM QEMU gave minus what the guest kernel reserves for itself.
    assert 0.85 * memory_mib * 1024 <= memtotal_kib <= memory_mib * 1024, (memtotal_kib,
                                                                          memory_mib)


def guest_memory_limit(crictd: CriContainerd, cid: str) -> int:
    """The container's memory limit as its guest cgroup has it (memory.max, read by the agent
    for StatsContainer, through `ctr task metrics`)."""
    out = crictd.cd.ctr("task", "metrics", "--format", "json", cid, namespace=CRI_NAMESPACE)
    memory = json.loads(out.stdout)["memory"]
    return int(memory.get("usage_limit", memory.get("usageLimit", 0)))


def wait_gone(crictd: CriContainerd, path: Path) -> None:
    deadline = time.monotonic() + SHIM_EXIT_GRACE
    while (path.exists() or crictd.qemus()) and time.monotonic() < deadline:
        time.sleep(0.2)


def test_pods_are_sized_and_accounted(crictd: CriContainerd) -> None:
    root = unified_mount()
    assert root is not None, "no cgroup v2 hierarchy on this host"
    client, log_dir = crictd.client, crictd.base / "sizing-logs"
    log_dir.mkdir()
    uid = uuid.uuid4().hex
    # What the kubelet makes before RunPodSandbox (cgroupfs driver): the pod-level cgroup.
    kubelet_dir = root / f"coco-sizing-{os.getpid()}-{uid[:6]}"
    pod_parent = kubelet_dir / f"pod{uid}"
    pod_parent.mkdir(parents=True)
    try:
        config = pod_config("sized", uid, log_dir, resources=LIMITS,
                            cgroup_parent=f"/{pod_parent.relative_to(root)}",
                            overhead=cri.LinuxContainerResources(
                                memory_limit_in_bytes=160 * MIB))
        pod_id = client.run_pod(config)
        pod_cgroup = pod_parent / pod_id
        try:
            (qemu,) = crictd.qemus()
            argv = argv_of(qemu)
            assert argv[argv.index("-smp") + 1] == str(SIZED_VCPUS)
            assert argv[argv.index("-m") + 1] == f"{BASE_MEMORY_MIB + 768}M"
            # The pod's cgroup holds QEMU, vhost-device-vsock and the shim daemon.
            expected = f"/{pod_cgroup.relative_to(root)}"
            (vsock,) = helpers(crictd, b"vhost-device-vsock")
            assert cgroup_of(qemu) == expected and cgroup_of(vsock) == expected
            procs = {int(p) for p in (pod_cgroup / "cgroup.procs").read_text().split()}
            assert {qemu, vsock} < procs, procs

            cid = client.create_container(pod_id, container_config(
                "worker", BUSYBOX_REF, SLEEPER, memory_limit=CONTAINER_LIMIT_MIB * MIB),
                config)
            client.start_container(cid)
            cpus, memtotal = guest_size(crictd, cid)
            assert cpus == SIZED_VCPUS
            assert_memtotal_near(memtotal, BASE_MEMORY_MIB + 768)
            # The container's own limit is its cgroup's in the guest.
            assert guest_memory_limit(crictd, cid) == CONTAINER_LIMIT_MIB * MIB

            # An update within the boot size reaches the guest; beyond it is refused, naming
            # the limit.
            client.update_container_resources(cid, cri.LinuxContainerResources(
                memory_limit_in_bytes=512 * MIB))
            assert guest_memory_limit(crictd, cid) == 512 * MIB
            with pytest.raises(grpc.RpcError) as refused:
                client.update_container_resources(cid, cri.LinuxContainerResources(
                    memory_limit_in_bytes=2048 * MIB))
            assert ("memory limit 2048 MiB exceeds the 768 MiB the pod VM was sized for at "
                    "boot") in str(refused.value.details()), refused.value
            with pytest.raises(grpc.RpcError) as refused:
                client.update_container_resources(cid, cri.LinuxContainerResources(
                    cpu_period=100000, cpu_quota=400000))
            assert f"CPU limit 4 vCPUs exceeds the pod VM's {SIZED_VCPUS} vCPUs" in str(
                refused.value.details()), refused.value
            client.stop_container(cid, timeout=5)
            client.remove_container(cid)
        finally:
            client.stop_pod(pod_id)
            client.remove_pod(pod_id)
        wait_gone(crictd, pod_cgroup)
        assert not pod_cgroup.exists()  # the shim's own cgroup is gone…
        assert pod_parent.is_dir()  # …and the kubelet's is not

        # No limits: the profile's size, and no cgroup asked for, none made.
        plain = pod_config("plain", uuid.uuid4().hex, log_dir)
        plain_id = client.run_pod(plain)
        try:
            (qemu,) = crictd.qemus()
            argv = argv_of(qemu)
            assert argv[argv.index("-smp") + 1] == str(BASE_VCPUS)
            assert argv[argv.index("-m") + 1] == f"{BASE_MEMORY_MIB}M"
            cid = client.create_container(plain_id, container_config(
                "idle", BUSYBOX_REF, SLEEPER), plain)
            client.start_container(cid)
            cpus, memtotal = guest_size(crictd, cid)
            assert cpus == BASE_VCPUS
            assert_memtotal_near(memtotal, BASE_MEMORY_MIB)
            client.stop_container(cid, timeout=5)
            client.remove_container(cid)
        finally:
            client.stop_pod(plain_id)
            client.remove_pod(plain_id)
        wait_gone(crictd, pod_cgroup)
        assert crictd.qemus() == []
    finally:
        remove_tree_of_cgroups(kubelet_dir)
        shutil.rmtree(log_dir, ignore_errors=True)


def remove_tree_of_cgroups(top: Path) -> None:
    """The test's kubelet-side cgroups, once the shim (tearing down after StopPodSandbox
    returned) has left them."""
    deadline = time.monotonic() + SHIM_EXIT_GRACE
    while top.exists():
        try:
            for directory in sorted((p for p in top.rglob("*") if p.is_dir()),
                                    key=lambda p: len(p.parts), reverse=True):
                directory.rmdir()
            top.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
