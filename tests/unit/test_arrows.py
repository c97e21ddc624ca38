"""The import arrows between packages and between the rooms of shim/ (imports inside functions
count too): guest and hypervisor never import shim, protocols imports nothing of ours, and the
pod/task domain never imports the start/delete binary layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("shim", "hypervisor", "protocols", "guest")

# shim's rooms, and the rooms each may import (its own always).
ROOMS: dict[str, set[str]] = {
    "core": set(),  # cheap pieces every room shares: errors, config, paths, crash record
    "network": {"core"},  # pod networking (tcfilter model, the netns helper process)
    "pod": {"core", "network"},  # the pod VM's life: boot script, agent, rootfs, guest spec
    "task": {"core", "pod"},  # containers and processes in the pod
    "daemon": {"core", "pod", "task", "binary.flags"},  # the task/sandbox API edge
    "binary": {"core", "network", "pod.mounts"},  # start and delete (the crash record undone)
    "cli": {"core"},  # coco-shim: operator commands
    "__main__": {"core", "binary", "daemon"},
    # the node's template: start (through __main__) and the daemon, forked
    "template": {"core", "binary", "daemon", "__main__"},
}
MODULE_LIMIT = 420  # lines: "no module in shim/ over ~400 lines"


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def room_of(path: Path) -> str:
    parts = path.relative_to(REPO / "shim").parts
    return parts[0] if len(parts) > 1 else path.stem


@pytest.mark.parametrize(("package", "forbidden"), [
    ("guest", ("shim", "hypervisor")),
    ("hypervisor", ("shim", "guest")),
    ("protocols", ("shim", "hypervisor", "guest")),
])
def test_package_arrows(package: str, forbidden: tuple[str, ...]) -> None:
    bad = [f"{path.relative_to(REPO)}: {name}" for path in modules(package)
           for name in imports_of(path) if name.split(".")[0] in forbidden]
    assert bad == []


def test_shim_rooms_import_only_the_rooms_below() -> None:
    bad = []
    for path in modules("shim"):
        room = room_of(path)
        if room == "__init__":
            continue
        allowed = ROOMS[room] | {room}
        for name in imports_of(path):
            if not name.startswith("shim."):
                continue
            target = name.removeprefix("shim.")
            if not any(target == a or target.startswith(f"{a}.") for a in allowed):
                bad.append(f"{path.relative_to(REPO)} ({room}) imports {name}")
    assert bad == []


def test_the_domain_never_imports_the_binary_layer() -> None:
    """The rule above, spelled out: pod, task, network and core do not know start/delete."""
    for room in ("core", "network", "pod", "task"):
        assert not any(a.startswith("binary") for a in ROOMS[room])


def test_every_shim_file_is_in_a_room() -> None:
    rooms = {room_of(path) for path in modules("shim")} - {"__init__"}
    assert rooms == set(ROOMS)


def test_no_module_in_shim_is_a_monolith() -> None:
    sizes = {str(path.relative_to(REPO)): len(path.read_text().splitlines())
             for path in modules("shim")}
    assert {name: size for name, size in sizes.items() if size > MODULE_LIMIT} == {}
