"""QEMU 7.2 (bookworm, the TCG tests) and QEMU 11.1 (sid root, the validation tests) both
accept the exact ``-sandbox`` argument the shim renders (Fix 8), beside its 9p share."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from hypervisor.cmdline import NinePShare, SeccompSandbox
from tests import envinfo

pytestmark = pytest.mark.integration


def _argv(binary: str, share: Path) -> list[str]:
    return [binary, "-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
            *SeccompSandbox().to_argv(), *NinePShare("fs0", "kataShared", share).to_argv(),
            "-S", "-monitor", "stdio"]


def test_qemu_72_accepts_the_sandbox_and_the_share() -> None:
    with tempfile.TemporaryDirectory(prefix="coco-sbx-") as share:
        done = subprocess.run(_argv("qemu-system-x86_64", Path(share)), input="quit\n",
                              capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_qemu_111_accepts_the_sandbox_and_the_share() -> None:
    root = envinfo.load().qemu_sid_root
    with tempfile.TemporaryDirectory(prefix="coco-sbx-", dir=root / "tmp") as share:
        inside = Path("/") / Path(share).relative_to(root)
        done = subprocess.run(["chroot", str(root), *_argv("qemu-system-x86_64", inside)],
                              input="quit\n", capture_output=True, text=True, timeout=30,
                              check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    version = subprocess.run(["chroot", str(root), "qemu-system-x86_64", "--version"],
                             capture_output=True, text=True, check=True).stdout
    assert version.startswith("QEMU emulator version 11.1")
