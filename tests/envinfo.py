"""Where scripts/setup-env.sh put the test environment (containerd, QEMU, kernel, vsock helper).

Integration tests call :func:`require` for what they need; a missing piece fails the test with
the command that installs it, rather than skipping (a skipped integration test is not a pass).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

CACHE = Path(os.environ.get("COCO_CACHE", "/var/cache/coco-shim"))


@dataclass(frozen=True)
class TestEnv:
    cache: Path
    venv: Path
    containerd2_bin: Path  # folder holding containerd, ctr, containerd-shim-runc-v2 (2.1.9)
    containerd17_bin: Path  # same for 1.7.24
    vhost_device_vsock: Path
    kernel_root: Path  # dpkg -x of linux-image-*-amd64: boot/vmlinuz-*, lib/modules/*
    qemu_sid_root: Path  # mmdebstrap root with QEMU 11.1 (run it through chroot)

    @property
    def kernel(self) -> Path:
        found = sorted((self.kernel_root / "boot").glob("vmlinuz-*"))
        if not found:
            raise FileNotFoundError(f"no vmlinuz-* under {self.kernel_root}/boot")
        return found[-1]

    @property
    def kernel_version(self) -> str:
        return self.kernel.name.removeprefix("vmlinuz-")

    @property
    def modules_dir(self) -> Path:
        return self.kernel_root / "lib" / "modules" / self.kernel_version


@cache
def load() -> TestEnv:
    env_file = CACHE / "env.sh"
    if not env_file.exists():
        raise RuntimeError(f"{env_file} missing: run `make env` (scripts/setup-env.sh) first")
    values: dict[str, str] = {}
    for line in env_file.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return TestEnv(
        cache=Path(values["COCO_CACHE"]),
        venv=Path(values["COCO_VENV"]),
        containerd2_bin=Path(values["COCO_CONTAINERD2"]),
        containerd17_bin=Path(values["COCO_CONTAINERD17"]),
        vhost_device_vsock=Path(values["COCO_VHOST_DEVICE_VSOCK"]),
        kernel_root=Path(values["COCO_KERNEL_ROOT"]),
        qemu_sid_root=Path(values["COCO_QEMU_SID_ROOT"]),
    )


def require(tool: Path, install: str) -> Path:
    """Integration tests fail (never skip) when a tool is missing, naming the fix."""
    if not tool.exists():
        raise AssertionError(f"{tool} is missing: {install} (or: make env)")
    return tool
