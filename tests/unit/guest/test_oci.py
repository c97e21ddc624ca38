"""grpc.Spec -> OCI JSON, and the spec runc gets in the guest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from guest.agent.containers import prepare_spec
from guest.agent.errors import InvalidArgument
from guest.agent.oci import json_name, process_to_json, resources_to_json, spec_to_json
from protocols.api.kata import oci_pb2


def full_spec() -> oci_pb2.Spec:
    return oci_pb2.Spec(
        Version="1.1.0",
        Process=oci_pb2.Process(
            Terminal=True,
            ConsoleSize=oci_pb2.Box(Height=24, Width=80),
            User=oci_pb2.User(UID=1000, GID=1000, AdditionalGids=[10]),
            Args=["sh"],
            Env=["PATH=/bin"],
            Cwd="/work",
            Capabilities=oci_pb2.LinuxCapabilities(Bounding=["CAP_KILL"]),
            Rlimits=[oci_pb2.POSIXRlimit(Type="RLIMIT_NOFILE", Hard=1024, Soft=1024)],
            NoNewPrivileges=True,
            OOMScoreAdj=100,
        ),
        Root=oci_pb2.Root(Path="rootfs", Readonly=True),
        Hostname="pod",
        Mounts=[oci_pb2.Mount(destination="/proc", source="proc", type="proc")],
        Hooks=oci_pb2.Hooks(Prestart=[oci_pb2.Hook(Path="/usr/bin/host-only")]),
        Annotations={"io.kubernetes.cri.container-type": "container"},
        Linux=oci_pb2.Linux(
            UIDMappings=[oci_pb2.LinuxIDMapping(HostID=100000, ContainerID=0, Size=65536)],
            Sysctl={"net.ipv4.ip_forward": "1"},
            Resources=oci_pb2.LinuxResources(
                Memory=oci_pb2.LinuxMemory(Limit=1 << 30, DisableOOMKiller=True),
                CPU=oci_pb2.LinuxCPU(Quota=50000, Period=100000, Cpus="0-3"),
                Pids=oci_pb2.LinuxPids(Limit=64),
                HugepageLimits=[oci_pb2.LinuxHugepageLimit(Pagesize="2MB", Limit=0)],
            ),
            CgroupsPath="kubepods-besteffort.slice:cri:abc",
            Namespaces=[
                oci_pb2.LinuxNamespace(Type="pid"),
                oci_pb2.LinuxNamespace(Type="network", Path="/var/run/netns/host-ns"),
                oci_pb2.LinuxNamespace(Type="ipc", Path="/proc/1/ns/ipc"),
            ],
            Seccomp=oci_pb2.LinuxSeccomp(
                DefaultAction="SCMP_ACT_ERRNO",
                Syscalls=[
                    oci_pb2.LinuxSyscall(Names=["read"], Action="SCMP_ACT_ALLOW", errnoret=1)
                ],
            ),
            MaskedPaths=["/proc/kcore"],
        ),
    )


def test_spec_to_json_uses_runtime_spec_names() -> None:
    doc = spec_to_json(full_spec())
    assert doc["ociVersion"] == "1.1.0"
    assert "hooks" not in doc and "Hooks" not in doc
    process = doc["process"]
    assert process["consoleSize"] == {"height": 24, "width": 80}
    assert process["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [10]}
    assert process["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    assert process["oomScoreAdj"] == 100 and process["noNewPrivileges"] is True
    assert doc["root"] == {"path": "rootfs", "readonly": True}
    assert doc["annotations"] == {"io.kubernetes.cri.container-type": "container"}
    linux = doc["linux"]
    assert linux["uidMappings"] == [{"hostID": 100000, "size": 65536}]  # zero ContainerID unset
    assert linux["sysctl"] == {"net.ipv4.ip_forward": "1"}
    resources = linux["resources"]
    assert resources["memory"] == {"limit": 1 << 30, "disableOOMKiller": True}
    assert resources["cpu"] == {"quota": 50000, "period": 100000, "cpus": "0-3"}
    assert resources["hugepageLimits"] == [{"pageSize": "2MB"}]
    assert linux["seccomp"]["syscalls"] == [
        {"names": ["read"], "action": "SCMP_ACT_ALLOW", "errnoRet": 1}
    ]


def test_prepare_spec_keeps_host_facts_out() -> None:
    prepared = prepare_spec(spec_to_json(full_spec()), "c1", Path("/run/c1/rootfs"))
    linux = prepared["linux"]
    assert linux["namespaces"] == [{"type": "pid"}, {"type": "ipc"}]  # no netns, no host paths
    assert linux["cgroupsPath"] == "/coco/c1"
    assert "cpus" not in linux["resources"]["cpu"]
    assert prepared["root"] == {"path": "/run/c1/rootfs", "readonly": True}


def test_prepare_spec_drops_what_the_guest_cannot_apply() -> None:
    spec: dict[str, Any] = {
        "process": {
            "args": ["sh"],
            "apparmorProfile": "cri-containerd.apparmor.d",
            "selinuxLabel": "x",
        },
        "linux": {
            "mountLabel": "y",
            "resources": {"memory": {"limit": 5, "kernel": 1, "kernelTCP": 2}},
        },
    }
    prepared = prepare_spec(spec, "c", Path("/r"))
    assert set(prepared["process"]) == {"args", "cwd", "user"}
    assert "mountLabel" not in prepared["linux"]
    assert prepared["linux"]["resources"]["memory"] == {"limit": 5}
    assert spec["process"]["apparmorProfile"]  # the caller's document is not modified


def test_prepare_spec_defaults_and_refusals() -> None:
    prepared = prepare_spec({"process": {"args": ["true"]}}, "c", Path("/r"))
    assert prepared["process"]["cwd"] == "/"
    assert prepared["ociVersion"] == "1.1.0"
    with pytest.raises(InvalidArgument):
        prepare_spec({"process": {}}, "c", Path("/r"))


def test_process_and_resources() -> None:
    assert process_to_json(oci_pb2.Process(Args=["cat"], Terminal=False)) == {"args": ["cat"]}
    assert resources_to_json(oci_pb2.LinuxResources(Pids=oci_pb2.LinuxPids(Limit=5))) == {
        "pids": {"limit": 5}
    }


@pytest.mark.parametrize(
    ("go", "json"),
    [
        ("Version", "ociVersion"),
        ("GIDMappings", "gidMappings"),
        ("HostID", "hostID"),
        ("KernelTCP", "kernelTCP"),
        ("ClassID", "classID"),
    ],
)
def test_json_name(go: str, json: str) -> None:
    assert json_name(go) == json


@pytest.mark.parametrize(
    ("given", "written"),
    [
        ("1.0.2", "1.0.2"),
        ("1.1.0", "1.1.0"),
        ("1.1.0-rc.1", "1.1.0-rc.1"),
        ("1.2.1", "1.1.0"),  # containerd 2.x: crun 1.8 would refuse it
        ("2.0.0", "1.1.0"),
        ("", "1.1.0"),
        ("banana", "1.1.0"),
    ],
)
def test_oci_version_capped_at_what_crun_accepts(given: str, written: str) -> None:
    prepared = prepare_spec({"ociVersion": given, "process": {"args": ["true"]}}, "c", Path("/r"))
    assert prepared["ociVersion"] == written
