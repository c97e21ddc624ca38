"""Kernel module selection against the real guest kernel (cross-checked with modinfo)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from guest.image.kmod import (
    ModuleError,
    ModuleTree,
    canonical,
    modinfo,
    modules_alias,
    modules_dep,
    read_module,
)
from tests import envinfo

RECIPE = Path(__file__).resolve().parents[3] / "packaging/guest-image/modules.txt"
ON_DEMAND = RECIPE.with_name("modules-on-demand.txt")


@pytest.fixture(scope="module")
def tree() -> ModuleTree:
    return ModuleTree(envinfo.load().modules_dir)


def wanted() -> list[str]:
    return [
        line.strip()
        for line in RECIPE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_every_module_comes_after_its_dependencies(tree: ModuleTree) -> None:
    order = tree.load_order(wanted())
    position = {m.name: i for i, m in enumerate(order)}
    assert len(position) == len(order)  # no duplicates
    for module in order:
        for dep in module.depends:
            assert dep in tree.builtin or position[dep] < position[module.name], (module.name, dep)
    for name in wanted():
        assert canonical(name) in position or canonical(name) in tree.builtin


def test_known_chain_is_in_order(tree: ModuleTree) -> None:
    names = [m.name for m in tree.load_order(["vmw_vsock_virtio_transport"])]
    for before, after in [
        ("virtio_ring", "virtio"),
        ("virtio", "vmw_vsock_virtio_transport_common"),
        ("vsock", "vmw_vsock_virtio_transport_common"),
        ("vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"),
    ]:
        assert names.index(before) < names.index(after)


def test_dependencies_match_modinfo(tree: ModuleTree) -> None:
    kver = envinfo.load().kernel_version
    for module in tree.load_order(wanted()):
        result = subprocess.run(
            ["modinfo", "-F", "depends", str(module.path)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        from_tool = {canonical(d) for d in result.stdout.strip().split(",") if d}
        assert set(module.depends) == from_tool, (module.name, kver)


def test_modinfo_parser_reads_name(tree: ModuleTree) -> None:
    module = tree.module("dm-verity")
    info = modinfo(read_module(module.path))
    assert info["name"] == ["dm_verity"]
    assert module.name == "dm_verity"


def test_unknown_module_is_an_error(tree: ModuleTree) -> None:
    with pytest.raises(ModuleError, match="not found"):
        tree.load_order(["no_such_module_anywhere"])


def test_not_elf() -> None:
    with pytest.raises(ModuleError):
        modinfo(b"not an elf at all")


def on_demand() -> list[str]:
    return [
        line.strip()
        for line in ON_DEMAND.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_modules_dep_lists_every_dependency_the_one_to_load_first_last(tree: ModuleTree) -> None:
    order = tree.load_order([*wanted(), *on_demand()])
    lines = dict(line.split(":", 1) for line in modules_dep(order, tree.builtin, "c/").splitlines())
    assert len(lines) == len(order)
    deps = lines["c/xt_MASQUERADE.ko"].split()
    # transitive: x_tables and nf_nat directly, nf_conntrack and libcrc32c through nf_nat
    assert {"c/x_tables.ko", "c/nf_nat.ko", "c/nf_conntrack.ko", "c/libcrc32c.ko"} <= set(deps)
    position = {f"c/{m.name}.ko": i for i, m in enumerate(order)}
    assert [position[d] for d in deps] == sorted((position[d] for d in deps), reverse=True)
    assert lines["c/bridge.ko"].split() == ["c/stp.ko", "c/llc.ko"]


def test_modules_alias_resolves_what_the_kernel_requests(tree: ModuleTree) -> None:
    order = tree.load_order(on_demand())
    aliases = {
        line.split()[1]: line.split()[2] for line in modules_alias(order).splitlines()
    }
    # what `ip link add type veth`, nft's nat chains and the socket family of
    # iptables-legacy make the kernel ask for
    assert aliases["rtnl-link-veth"] == "veth"
    assert aliases["rtnl-link-bridge"] == "bridge"
    assert aliases["nft-chain-2-nat"] == "nft_chain_nat"
    assert aliases["ipt_MASQUERADE"] == "xt_MASQUERADE"


def test_on_demand_modules_exist_and_common_ones_are_among_them(tree: ModuleTree) -> None:
    names = {m.name for m in tree.load_order(on_demand())}
    assert {"bridge", "veth", "tun", "nf_tables", "ip_tables", "br_netfilter"} <= names
