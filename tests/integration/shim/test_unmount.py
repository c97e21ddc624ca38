"""vm_sandbox.unmount with real mounts: a file bind-mounted from the same filesystem (CRI's
resolv.conf, hostname, hosts) is a mount point too, though os.path.ismount() says otherwise."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from shim.binary.manager import mounts_under
from shim.pod.vm_sandbox import unmount

pytestmark = pytest.mark.integration


def test_file_bind_mount_on_the_same_filesystem_is_unmounted(tmp_path: Path) -> None:
    source = tmp_path / "resolv.conf"
    source.write_text("nameserver 198.18.0.53\n")
    target = tmp_path / "share" / "mount-0-resolv.conf"
    target.parent.mkdir()
    target.touch()
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        assert not os.path.ismount(target)  # the trap
        assert mounts_under(target) == [target.resolve()]
        asyncio.run(unmount(target))
        assert mounts_under(target) == []
        asyncio.run(unmount(target))  # idempotent
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
