"""The initdata disk as a real guest sees it: QEMU (TCG) attaches the 0600 run-dir image read-only
and the guest kernel reads the magic and the gzip length at the start of /dev/vda."""

from __future__ import annotations

import asyncio
import shutil
import stat
import time
from dataclasses import replace
from pathlib import Path

import pytest

from hypervisor.vm import LaunchOptions, launch_vm
from protocols import initdata
from tests import envinfo
from tests.integration.hypervisor.conftest import none_profile

pytestmark = pytest.mark.integration

DOC = b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\n"aa.toml" = "url = 1"\n'


def _console_line(path: Path, prefix: str, within: float) -> str:
    """The first console line starting with ``prefix``, waiting at most ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        found = next((line for line in text.splitlines() if line.startswith(prefix)), None)
        if found is not None:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {prefix!r} on the console within {within}s")


async def test_guest_reads_the_initdata_disk(env: envinfo.TestEnv, initrd_blk: Path,
                                             tmp_path: Path) -> None:
    doc = initdata.from_toml(DOC)
    run_root, logs = Path("/run") / f"coco-initdata-{tmp_path.name}", tmp_path / "logs"
    profile = replace(none_profile(env, initrd_blk, "disks"), memory_mib=256)
    try:
        vm = await launch_vm(profile, LaunchOptions(run_root=run_root, name="initdata",
                                                    log_dir=logs, initdata=doc))
        try:
            disk = vm.run_dir / "initdata.img"
            assert stat.S_IMODE(disk.stat().st_mode) == 0o600
            assert disk.read_bytes() == doc.disk_image()
            assert "readonly=on" in " ".join(vm.argv)
            line = await asyncio.to_thread(_console_line, logs / "console.log",
                                           "DISK /dev/vda", 60)
        finally:
            await vm.aclose()
        assert not vm.run_dir.exists()  # the disk went with the run directory
    finally:
        shutil.rmtree(run_root, ignore_errors=True)
    header = (b"initdata" + len(doc.gzip).to_bytes(8, "little")).hex()
    assert line == f"DISK /dev/vda {header}"
