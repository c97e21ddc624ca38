"""Kernel module selection: find modules by name and order them dependencies first.

The Debian kernel package ships no modules.dep (depmod runs at install time), so dependencies
are read from each module's own ``.modinfo`` ELF section (what ``modinfo -F depends`` prints).
"""

from __future__ import annotations

import lzma
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MODULE_SUFFIXES = (".ko.xz", ".ko")


class ModuleError(Exception):
    """A requested module is missing or its dependencies cannot be resolved."""


def canonical(name: str) -> str:
    """Module names treat '-' and '_' as the same character."""
    return name.replace("-", "_")


@dataclass(frozen=True)
class KernelModule:
    name: str  # canonical name
    path: Path  # the file in the kernel tree (.ko or .ko.xz)
    depends: tuple[str, ...]  # canonical names
    aliases: tuple[str, ...] = ()  # what request_module() and modaliases ask for (modinfo)

    def load_bytes(self) -> bytes:
        """The uncompressed object, as insmod wants it."""
        return read_module(self.path)


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """Parse the NUL-separated key=value strings of an ELF64 object's .modinfo section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ModuleError("not an ELF64 object")
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        (name_off,) = struct.unpack_from("<I", elf, base)
        offset, size = struct.unpack_from("<QQ", elf, base + 0x18)
        return name_off, offset, size

    _, strtab_off, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for index in range(shnum):
        name_off, offset, size = section(index)
        end = elf.index(b"\0", strtab_off + name_off)
        if elf[strtab_off + name_off : end] != b".modinfo":
            continue
        for entry in elf[offset : offset + size].split(b"\0"):
            key, sep, value = entry.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
        return info
    raise ModuleError("no .modinfo section")


class ModuleTree:
    """The modules of one kernel: ``<modules_dir>/kernel/**.ko[.xz]`` plus modules.builtin."""

    def __init__(self, modules_dir: Path) -> None:
        self.modules_dir = modules_dir
        self._files: dict[str, Path] = {}
        for path in sorted((modules_dir / "kernel").rglob("*.ko*")):
            for suffix in MODULE_SUFFIXES:
                if path.name.endswith(suffix):
                    self._files.setdefault(canonical(path.name[: -len(suffix)]), path)
        builtin = modules_dir / "modules.builtin"
        self.builtin: frozenset[str] = frozenset(
            canonical(Path(line.strip()).name.removesuffix(".ko"))
            for line in (builtin.read_text().splitlines() if builtin.exists() else [])
            if line.strip()
        )
        self._cache: dict[str, KernelModule] = {}

    def module(self, name: str) -> KernelModule:
        key = canonical(name)
        if key not in self._cache:
            path = self._files.get(key)
            if path is None:
                raise ModuleError(f"kernel module {name!r} not found under {self.modules_dir}")
            info = modinfo(read_module(path))
            deps = info.get("depends", [""])[0]
            self._cache[key] = KernelModule(
                name=key,
                path=path,
                depends=tuple(canonical(d) for d in deps.split(",") if d),
                aliases=tuple(info.get("alias", [])),
            )
        return self._cache[key]

    def load_order(self, wanted: Iterable[str]) -> list[KernelModule]:
        """Every wanted module and its dependencies, each after all of its dependencies.

        Built-in modules need no loading and are left out. Order is deterministic: a
        depth-first walk over the wanted list in the given order, dependencies sorted by name.
        """
        order: list[KernelModule] = []
        done: set[str] = set()
        visiting: list[str] = []

        def visit(name: str) -> None:
            key = canonical(name)
            if key in done or key in self.builtin:
                return
            if key in visiting:
                cycle = " -> ".join([*visiting[visiting.index(key) :], key])
                raise ModuleError(f"module dependency cycle: {cycle}")
            visiting.append(key)
            module = self.module(key)
            for dep in sorted(module.depends):
                visit(dep)
            visiting.pop()
            done.add(key)
            order.append(module)

        for name in wanted:
            visit(name)
        return order


def modules_dep(order: list[KernelModule], builtin: frozenset[str], prefix: str) -> str:
    """A modules.dep (depmod's format) for ``order`` (dependencies first, as load_order):
    each line lists every module the module needs, transitively, the one to load first last
    (busybox modprobe loads a module's whole list and expects it complete)."""
    position = {m.name: i for i, m in enumerate(order)}
    by_name = {m.name: m for m in order}
    lines = []
    for module in order:
        needed: set[str] = set()
        stack = [d for d in module.depends if d not in builtin]
        while stack:
            dep = stack.pop()
            if dep not in needed:
                needed.add(dep)
                stack.extend(d for d in by_name[dep].depends if d not in builtin)
        deps = sorted(needed, key=lambda name: position[name], reverse=True)
        lines.append(f"{prefix}{module.name}.ko:" + "".join(f" {prefix}{d}.ko" for d in deps))
    return "".join(f"{line}\n" for line in lines)


def modules_alias(order: list[KernelModule]) -> str:
    """A modules.alias: ``alias <pattern> <module>`` for every alias of every module."""
    return "".join(f"alias {alias} {m.name}\n" for m in order for alias in m.aliases)
