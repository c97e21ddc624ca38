"""Firmware selection from QEMU firmware descriptors (docs/interop/firmware.json), as libvirt.

Descriptors live in ``/etc/qemu/firmware`` and ``/usr/share/qemu/firmware`` (a file in /etc
overrides the same name in /usr/share); they are considered in file-name order and the first
one matching architecture, machine and all wanted features wins.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from hypervisor.cmdline import Bios, Firmware, Pflash
from hypervisor.errors import ConfigError

DESCRIPTOR_DIRS = (Path("etc/qemu/firmware"), Path("usr/share/qemu/firmware"))


@dataclass(frozen=True)
class FirmwareDescriptor:
    source: Path
    device: str  # "memory" or "flash"
    executable: Path
    nvram_template: Path | None
    architectures: tuple[str, ...]
    machines: tuple[str, ...]
    features: frozenset[str]

    def firmware(self) -> Firmware:
        if self.device == "memory":
            return Bios(self.executable)
        return Pflash(self.executable, None)

    def matches(self, arch: str, machine: str, features: set[str]) -> bool:
        machine_ok = any(
            fnmatch.fnmatch(machine, pat) or fnmatch.fnmatch(f"pc-{machine}-x", pat)
            for pat in self.machines
        )
        return arch in self.architectures and machine_ok and features <= self.features


def _parse(path: Path) -> FirmwareDescriptor | None:
    try:
        doc = json.loads(path.read_text())
        mapping = doc["mapping"]
        device = mapping["device"]
        if device == "memory":
            executable = Path(mapping["filename"])
            nvram = None
        elif device == "flash":
            executable = Path(mapping["executable"]["filename"])
            template = mapping.get("nvram-template")
            nvram = Path(template["filename"]) if template else None
        else:
            return None  # kernel-type firmware and future kinds are not used here
        targets = doc.get("targets", [])
        return FirmwareDescriptor(
            source=path,
            device=device,
            executable=executable,
            nvram_template=nvram,
            architectures=tuple(t["architecture"] for t in targets),
            machines=tuple(m for t in targets for m in t.get("machines", [])),
            features=frozenset(doc.get("features", [])),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a broken descriptor is skipped, as libvirt does


def descriptors(root: Path = Path("/")) -> list[FirmwareDescriptor]:
    by_name: dict[str, Path] = {}
    for folder in reversed(DESCRIPTOR_DIRS):  # /etc last so it overrides /usr/share
        d = root / folder
        if d.is_dir():
            for f in d.glob("*.json"):
                by_name[f.name] = f
    found = (_parse(by_name[name]) for name in sorted(by_name))
    return [d for d in found if d is not None]


def find_firmware(
    feature: str,
    *,
    arch: str = "x86_64",
    machine: str = "q35",
    device: str | None = None,
    root: Path = Path("/"),
    source: str = "<firmware>",
) -> FirmwareDescriptor:
    """First descriptor offering ``feature`` (e.g. ``amd-sev-snp``, ``intel-tdx``)."""
    for desc in descriptors(root):
        if desc.matches(arch, machine, {feature}) and device in (None, desc.device):
            return desc
    where = ", ".join(str(root / d) for d in DESCRIPTOR_DIRS)
    kind = "" if device is None else f" {device}-mapped"
    raise ConfigError(source, "firmware_feature",
                      f"no{kind} firmware descriptor for {arch}/{machine} offers it in {where}",
                      feature)
