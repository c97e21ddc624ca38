"""OCI config.json → the guest's grpc.Spec, in one place: host-only parts cleared (CRI puts
network sysctls in every pod's spec; a pod VM shares one network, so they go), every odd
shape InvalidArgument naming the field."""

from __future__ import annotations

import pytest

from shim.core.errors import InvalidArgument
from shim.pod.guest_spec import (
    for_guest,
    joins_pod_pid_namespace,
    process,
    spec_mounts,
    with_pod_sysctls,
    without_network_sysctls,
)


def test_network_sysctls_are_dropped_others_kept() -> None:
    spec: dict[str, object] = {"linux": {"sysctl": {
        "net.ipv4.ip_unprivileged_port_start": "0", "net.ipv4.ping_group_range": "0 2147483647",
        "kernel.shm_rmid_forced": "1"}, "namespaces": [{"type": "network", "path": "/x"}]}}
    out = without_network_sysctls(spec)
    assert out == {"linux": {"sysctl": {"kernel.shm_rmid_forced": "1"},
                             "namespaces": [{"type": "network", "path": "/x"}]}}
    # The input is not modified (it is the bundle's config.json as read).
    assert "net.ipv4.ping_group_range" in spec["linux"]["sysctl"]  # type: ignore[index]


def test_specs_without_network_sysctls_are_returned_as_they_are() -> None:
    specs: list[dict[str, object]] = [
        {}, {"linux": {}}, {"linux": {"sysctl": {"kernel.msgmax": "8192"}}},
        {"linux": {"sysctl": None}}]
    for spec in specs:
        assert without_network_sysctls(spec) is spec


HOST_SPEC: dict[str, object] = {
    "ociVersion": "1.1.0",
    "process": {"args": ["sh"], "user": {"uid": 0, "gid": 0}},
    "root": {"path": "/host/rootfs", "readonly": True},
    "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
    "mounts": [{"destination": "/etc/hosts", "source": "/host/hosts", "type": "bind"}],
    "linux": {
        "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"},
                       {"type": "mount", "path": "/proc/1/ns/mnt"}],
        "devices": [{"path": "/dev/kvm", "type": "c", "major": 10, "minor": 232}],
        "resources": {"devices": [{"allow": False, "access": "rwm"}],
                      "cpu": {"shares": 2, "cpus": "0-3", "mems": "0"}},
        "sysctl": {"net.ipv4.ping_group_range": "0 1", "kernel.msgmax": "8192"},
    },
}


def test_the_guest_spec_drops_what_only_the_host_has() -> None:
    mounts = [{"destination": "/etc/hosts", "source": "/run/guest/hosts", "type": "bind"}]
    spec = for_guest(HOST_SPEC, "/run/guest/c1/rootfs", mounts)
    assert (spec.Root.Path, spec.Root.Readonly) == ("/run/guest/c1/rootfs", True)
    assert not spec.HasField("Hooks")
    assert [m.source for m in spec.Mounts] == ["/run/guest/hosts"]
    assert [(n.Type, n.Path) for n in spec.Linux.Namespaces] == [("pid", ""), ("mount", "")]
    assert not spec.Linux.Devices and not spec.Linux.Resources.Devices
    assert (spec.Linux.Resources.CPU.Shares, spec.Linux.Resources.CPU.Cpus) == (2, "")
    assert dict(spec.Linux.Sysctl) == {"kernel.msgmax": "8192"}
    assert HOST_SPEC["hooks"]  # the host's spec is left as it was


@pytest.mark.parametrize(("patch", "field"), [
    ({"linux": {"namespaces": ["network"]}}, r"linux\.namespaces\[0\]"),
    ({"linux": {"namespaces": {"type": "pid"}}}, r"linux\.namespaces must be a list"),
    ({"linux": "yes"}, r"linux must be an object"),
    ({"root": ["/"]}, r"root must be an object"),
    ({"process": {"user": {"uid": 1 << 40}}}, r"process\.user\.uid: .* out of range"),
    ({"process": {"consoleSize": {"height": -1}}}, r"consoleSize\.height: .* out of range"),
    ({"process": {"args": "sh"}}, r"process\.args: expected a list"),
    ({"linux": {"resources": {"cpu": []}}}, r"linux\.resources\.cpu must be an object"),
])
def test_odd_shapes_name_the_field(patch: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"config.json: .*{field}"):
        for_guest({**HOST_SPEC, **patch}, "/r", [])


def test_mounts_must_be_a_list_of_objects() -> None:
    with pytest.raises(InvalidArgument, match="mounts must be a list"):
        spec_mounts({"mounts": {"a": 1}})
    with pytest.raises(InvalidArgument, match=r"mounts\[1\] must be an object"):
        spec_mounts({"mounts": [{}, "x"]})


def test_an_exec_process_of_the_wrong_shape_names_the_exec() -> None:
    assert list(process({"args": ["ls"]}, "exec e1").Args) == ["ls"]
    with pytest.raises(InvalidArgument, match=r"exec e1: .*terminal"):
        process({"terminal": "yes"}, "exec e1")


def test_a_pod_without_pause_container_gives_its_sysctls_to_its_containers() -> None:
    pod = {"linux": {"sysctl": {"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100",
                                "net.ipv4.ping_group_range": "0 1"}}}
    spec: dict[str, object] = {"linux": {"sysctl": {"fs.mqueue.msg_max": "50"}},
                               "process": {"args": ["sh"]}}
    out = with_pod_sysctls(spec, pod)
    # The container's own value wins; the network one stays out (the VM's network is shared).
    assert out["linux"] == {"sysctl": {"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "50"}}
    assert out["process"] == {"args": ["sh"]}
    assert spec["linux"] == {"sysctl": {"fs.mqueue.msg_max": "50"}}  # input untouched
    assert with_pod_sysctls(spec, {}) is spec
    assert with_pod_sysctls({}, pod)["linux"] == {"sysctl": {
        "kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100"}}


def test_a_pid_namespace_path_means_the_pods_pid_namespace() -> None:
    shared = {"linux": {"namespaces": [{"type": "pid", "path": "/proc/12/ns/pid"},
                                       {"type": "ipc", "path": "/proc/12/ns/ipc"}]}}
    own = {"linux": {"namespaces": [{"type": "pid"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}]}}
    assert joins_pod_pid_namespace(shared)
    assert not joins_pod_pid_namespace(own)
    assert not joins_pod_pid_namespace({})
    request = for_guest(shared, "/rootfs", [])  # the host path itself never reaches the guest
    assert [(ns.Type, ns.Path) for ns in request.Linux.Namespaces] == [("pid", ""), ("ipc", "")]
