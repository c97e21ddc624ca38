"""Kernel module selection against the real guest kernel (cross-checked with modinfo)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from guest.image.kmod import ModuleError, ModuleTree, canonical, modinfo, read_module
from tests import envinfo

RECIPE = Path(__file__).resolve().parents[3] / "packaging/guest-image/modules.txt"


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
