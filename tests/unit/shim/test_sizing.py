"""Static sizing (shim/pod/sizing.py) and the pod cgroup's path rules (shim/core/cgroup.py):
pure, no VM."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from hypervisor.config import parse_profile
from hypervisor.errors import ConfigError
from hypervisor.profile import RuntimeProfile, TeeKind, confidential_conflicts
from protocols.api.containerd.runtime.sandbox.v1 import sandbox_pb2 as pb
from protocols.api.cri import api_pb2 as cri
from shim.core import cgroup
from shim.core.bundle import (
    SANDBOX_CPU_PERIOD,
    SANDBOX_CPU_QUOTA,
    SANDBOX_CPU_SHARES,
    SANDBOX_MEMORY,
)
from shim.core.errors import InvalidArgument
from shim.daemon.sandbox_service import POD_CONFIG_TYPE, pod_spec
from shim.pod.sizing import (
    DEFAULT_MEMORY_ANNOTATION,
    DEFAULT_VCPUS_ANNOTATION,
    HostSize,
    PodLimits,
    pod_limits,
    size_vm,
    update_limits,
)

HOST = HostSize(cpus=8, memory_mib=16384)
MIB = 1 << 20


def profile(**kw: object) -> RuntimeProfile:
    fields: dict[str, object] = {"name": "t", "tee": TeeKind.NONE, "qemu": Path("/q"),
                                 "kernel": None, "vcpus": 1, "memory_mib": 256,
                                 "source": "t.toml"}
    fields.update(kw)
    return RuntimeProfile(**fields)  # type: ignore[arg-type]


def limits(quota: int = 0, period: int = 100000, memory: int = 0) -> dict[str, str]:
    return {SANDBOX_CPU_QUOTA: str(quota), SANDBOX_CPU_PERIOD: str(period),
            SANDBOX_CPU_SHARES: "1024", SANDBOX_MEMORY: str(memory)}


@pytest.mark.parametrize(("quota", "period", "memory", "expected"), [
    (200000, 100000, 768 * MIB, PodLimits(2, 768)),
    (150000, 100000, 768 * MIB + 1, PodLimits(2, 769)),  # both rounded up
    (50000, 100000, 1, PodLimits(1, 1)),
    (0, 100000, 0, PodLimits(0, 0)),  # "no limit" as containerd writes it
    (-1, 100000, -1, PodLimits(0, 0)),
    (100000, 0, 0, PodLimits(0, 0)),
])
def test_limits_round_up_like_kata(quota: int, period: int, memory: int,
                                   expected: PodLimits) -> None:
    assert pod_limits(limits(quota, period, memory)) == expected


def test_no_annotations_no_limits() -> None:
    assert pod_limits({}) == PodLimits()


@pytest.mark.parametrize("key", [SANDBOX_CPU_QUOTA, SANDBOX_CPU_PERIOD, SANDBOX_CPU_SHARES,
                                 SANDBOX_MEMORY])
def test_a_malformed_annotation_is_named(key: str) -> None:
    with pytest.raises(InvalidArgument, match=f"annotation {key}: not an integer"):
        pod_limits({**limits(), key: "2Gi"})


def test_base_plus_limits() -> None:
    size = size_vm(profile(), limits(200000, 100000, 768 * MIB), HOST)
    assert (size.vcpus, size.memory_mib) == (3, 1024)
    assert size.workload_memory_mib == 768


def test_without_limits_the_profile_default() -> None:
    size = size_vm(profile(vcpus=2, memory_mib=512), {}, HOST)
    assert (size.vcpus, size.memory_mib, size.workload_memory_mib) == (2, 512, 512)


def test_static_sizing_off_ignores_limits() -> None:
    size = size_vm(profile(static_sizing=False), limits(200000, 100000, 768 * MIB), HOST)
    assert (size.vcpus, size.memory_mib) == (1, 256)


def test_vcpus_are_cut_to_the_maximum_memory_is_refused() -> None:
    size = size_vm(profile(sandbox_max_vcpus=2), limits(800000, 100000), HOST)
    assert size.vcpus == 2
    assert size_vm(profile(), limits(64 * 100000), HOST).vcpus == HOST.cpus
    with pytest.raises(InvalidArgument, match=r"1280 MiB \(base 256 \+ pod limit 1024\) "
                                              r"exceeds the maximum 1024 MiB"):
        size_vm(profile(sandbox_max_memory_mib=1024), limits(memory=1024 * MIB), HOST)
    with pytest.raises(InvalidArgument, match="exceeds the maximum 16384 MiB"):
        size_vm(profile(), limits(memory=16384 * MIB), HOST)


def test_default_size_annotations_only_where_allowed() -> None:
    asked = {DEFAULT_VCPUS_ANNOTATION: "2", DEFAULT_MEMORY_ANNOTATION: "384"}
    ignored = size_vm(profile(), asked, HOST)  # not on the allow-list: the profile's base
    assert (ignored.vcpus, ignored.memory_mib) == (1, 256)
    allowed = profile(enable_annotations=(DEFAULT_VCPUS_ANNOTATION, DEFAULT_MEMORY_ANNOTATION))
    size = size_vm(allowed, {**asked, **limits(100000, 100000, 128 * MIB)}, HOST)
    assert (size.base_vcpus, size.base_memory_mib, size.vcpus, size.memory_mib) == (
        2, 384, 3, 512)
    with pytest.raises(InvalidArgument, match="default_memory: must be >= 64"):
        size_vm(allowed, {DEFAULT_MEMORY_ANNOTATION: "8"}, HOST)
    with pytest.raises(InvalidArgument, match="default_vcpus: must be >= 1"):
        size_vm(allowed, {DEFAULT_VCPUS_ANNOTATION: "0"}, HOST)
    with pytest.raises(InvalidArgument, match="default_vcpus: not an integer"):
        size_vm(allowed, {DEFAULT_VCPUS_ANNOTATION: "two"}, HOST)


def test_update_limits_from_runtime_spec_resources() -> None:
    assert update_limits({"cpu": {"quota": 250000, "period": 100000},
                          "memory": {"limit": 100 * MIB + 1}}) == (3, 101)
    assert update_limits({"cpu": {"shares": 2}, "memory": {}}) == (0, 0)
    assert update_limits({}) == (0, 0)


def test_confidential_profiles_refuse_the_size_annotations() -> None:
    both = (DEFAULT_VCPUS_ANNOTATION, DEFAULT_MEMORY_ANNOTATION)
    for confidential in (profile(tee=TeeKind.SNP, vsock="kernel", enable_annotations=both),
                         profile(confidential_without_tee=True, enable_annotations=both,
                                 kernel_params="coco.agent.confidential=1")):
        found = [c.message for c in confidential_conflicts(confidential)
                 if c.key == "runtime.enable_annotations"]
        assert len(found) == 2 and all("would let a pod choose its own VM size" in m
                                       for m in found)
    assert confidential_conflicts(profile(enable_annotations=both)) == []


def test_profile_keys() -> None:
    text = ('[hypervisor]\ntee = "none"\nqemu_path = "/q"\n[runtime]\n'
            "static_sandbox_resource_mgmt = false\nsandbox_max_vcpus = 4\n"
            "sandbox_max_memory_mib = 4096\n")
    parsed = parse_profile(text, "p.toml", check_files=False)
    assert (parsed.static_sizing, parsed.sandbox_max_vcpus,
            parsed.sandbox_max_memory_mib) == (False, 4, 4096)
    with pytest.raises(ConfigError, match="sandbox_max_vcpus"):
        parse_profile(text.replace("= 4\n", "= 0\n"), "p.toml", check_files=False)


# --- cgroupsPath -------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "expected"), [
    ("/kubepods/burstable/pod1234/abc", "kubepods/burstable/pod1234/abc"),
    ("kubepods/pod1/abc", "kubepods/pod1/abc"),
    ("kubepods-burstable-pod12_34.slice:cri-containerd:abc",
     "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice/"
     "cri-containerd-abc.scope"),
    ("kubepods-pod1.slice:cri-containerd:abc",
     "kubepods.slice/kubepods-pod1.slice/cri-containerd-abc.scope"),
    ("system.slice:docker:abc", "system.slice/docker-abc.scope"),
    ("-.slice:prefix:abc", "prefix-abc.scope"),
    (":cri-containerd:abc", "cri-containerd-abc.scope"),
    ("machine.slice::abc", "machine.slice/abc.scope"),
])
def test_cgroups_path_of_both_drivers(path: str, expected: str) -> None:
    assert cgroup.relative_path(path) == PurePosixPath(expected)


@pytest.mark.parametrize(("path", "problem"), [
    ("", "empty"), ("/", "root cgroup"), ("/kubepods/../etc", "'..'"),
    ("a.slice:b", "slice:prefix:name"), ("kubepods.slice:p:", "bad unit"),
    ("kube/pods.slice:p:x", "not a systemd slice"), ("kubepods--x.slice:p:x", "empty component"),
    ("kubepods:p:x", "not a systemd slice"),
])
def test_bad_cgroups_paths(path: str, problem: str) -> None:
    with pytest.raises(cgroup.CgroupError, match=problem):
        cgroup.relative_path(path)


def test_sandbox_cgroups_path_like_containerd() -> None:
    assert cgroup.sandbox_cgroups_path("/kubepods/burstable/pod1", "abc") == (
        "/kubepods/burstable/pod1/abc")
    assert cgroup.sandbox_cgroups_path(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice", "abc") == (
        "kubepods-burstable-pod1.slice:cri-containerd:abc")


def test_unified_mount_from_mountinfo(tmp_path: Path) -> None:
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(
        "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
        "31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n"
        "32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    assert cgroup.unified_mount(hybrid) == Path("/sys/fs/cgroup/unified")
    v1 = tmp_path / "v1"
    v1.write_text("32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    assert cgroup.unified_mount(v1) is None
    assert cgroup.unified_mount(tmp_path / "missing") is None


def test_made_cgroups_are_removed_deepest_first(tmp_path: Path) -> None:
    made = cgroup.PodCgroup.create(tmp_path, PurePosixPath("a/b/c"))
    assert made.made == [tmp_path / "a", tmp_path / "a/b", tmp_path / "a/b/c"]
    assert made.remove(0) == [] and not (tmp_path / "a").exists()
    (tmp_path / "kubelet").mkdir()
    mine = cgroup.PodCgroup.create(tmp_path, PurePosixPath("kubelet/pod"))
    assert mine.made == [tmp_path / "kubelet/pod"]
    mine.remove(0)
    assert (tmp_path / "kubelet").is_dir()


# --- the sandbox API passes the pod config itself ------------------------------------------------

def test_sandbox_api_pod_spec_carries_limits_and_cgroup() -> None:
    config = cri.PodSandboxConfig(linux=cri.LinuxPodSandboxConfig(
        cgroup_parent="/kubepods/burstable/pod1",
        resources=cri.LinuxContainerResources(cpu_period=100000, cpu_quota=200000,
                                              cpu_shares=2048,
                                              memory_limit_in_bytes=768 * MIB),
        overhead=cri.LinuxContainerResources(memory_limit_in_bytes=160 * MIB)))
    request = pb.CreateSandboxRequest(sandbox_id="p1", netns_path="/n")
    request.options.Pack(config)
    assert request.options.type_url.endswith(POD_CONFIG_TYPE)
    spec = pod_spec(request)
    annotations = spec["annotations"]
    assert isinstance(annotations, dict)
    assert pod_limits(annotations) == PodLimits(2, 768)
    assert spec["linux"] == {"cgroupsPath": "/kubepods/burstable/pod1/p1",
                             "namespaces": [{"type": "network", "path": "/n"}]}
    bare = pb.CreateSandboxRequest(sandbox_id="p2")
    bare.options.Pack(cri.PodSandboxConfig())
    assert "linux" not in pod_spec(bare)
    assert pod_limits(pod_spec(bare)["annotations"]) == PodLimits()  # type: ignore[arg-type]
