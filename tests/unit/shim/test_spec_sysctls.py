"""CRI puts network sysctls in every pod's spec; a pod VM shares one network, so they go."""

from __future__ import annotations

from shim.task.manager import without_network_sysctls


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
