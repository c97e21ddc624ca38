"""HostBytes: snapshots copy regular files (never through a symlink), every source is scanned."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.proof import HostBytes

SECRET = os.urandom(32)


def test_snapshot_survives_the_tree_and_is_scanned(tmp_path: Path) -> None:
    run = tmp_path / "run" / "pod"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "console.log").write_bytes(b"boot\n" + SECRET.hex().encode() + b"\n")
    (run / "crash.json").write_text("{}")
    (tmp_path / "elsewhere").write_bytes(SECRET)
    (run / "link").symlink_to(tmp_path / "elsewhere")
    host = HostBytes(tmp_path / "work")
    host.snapshot(run, "pod run dir")
    for path in sorted(run.rglob("*"), reverse=True):  # teardown removes the run dir
        path.unlink() if not path.is_dir() or path.is_symlink() else path.rmdir()
    host.add_bytes("pod config", b"sealed.xyz")
    host.add_file(tmp_path / "missing.log", "qemu stderr")
    found = [(f.source, f.encoding) for f in host.scan(SECRET)]
    assert found == [("pod run dir/logs/console.log", "hex")]
    assert host.described == ["pod run dir (snapshot while the pod ran): 2 files",
                               "pod config (10 bytes)", "qemu stderr: absent"]
