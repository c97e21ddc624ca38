"""What the host handled during a confidential pod's life, gathered for the secret scan.

:class:`HostBytes` collects the byte sources the proof scans (docs/architecture.md lists
them):

- the shim ↔ agent channel: every byte of every connection, both directions, recorded by the
  hybrid-vsock recorder (tests/support/vsock_recorder.py);
- containerd's log, which carries the shim's own log lines (the shim logs to the bundle's log
  FIFO, containerd writes them to its log);
- containerd's events (``ctr events`` running for the whole pod's life, :func:`ctr_events`);
- snapshots, taken while the pod runs, of every regular file under the pod's run dir (the
  serial console log, QEMU's stderr, vhost-device-vsock's log, the initdata disk, the crash
  record) and the shim's state dir, and of containerd's task state (each container's
  bundle, with its ``config.json``: the pod spec the host saw) and metadata database;
- extra named byte strings, e.g. the CRI requests (pod and container configs) as sent;
- the packet capture of the pod's veth (tests/support/capture.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.secret_scan import Finding, Source, file_sources, scan


@dataclass
class HostBytes:
    workdir: Path  # snapshots go below it
    sources: list[Source] = field(default_factory=list)
    described: list[str] = field(default_factory=list)  # one line per source kind, for reports

    def add_file(self, path: Path, name: str) -> None:
        if path.is_file():
            self.sources.append(Source.file(path, name))
            self.described.append(f"{name} ({path.stat().st_size} bytes)")
        else:
            self.described.append(f"{name}: absent")

    def add_bytes(self, name: str, data: bytes) -> None:
        self.sources.append(Source.of(name, data))
        self.described.append(f"{name} ({len(data)} bytes)")

    def add_tree(self, root: Path, label: str) -> None:
        """Every regular file under ``root`` as it is at the end of the test."""
        found = list(file_sources(root, label)) if root.is_dir() else []
        self.sources.extend(found)
        self.described.append(f"{label}: {len(found)} files")

    def snapshot(self, root: Path, label: str) -> None:
        """Copy every regular file under ``root`` now (while the pod runs: its run dir is
        removed at teardown) and scan the copies later."""
        target = self.workdir / "snapshots" / label.replace("/", "_")
        count = 0
        if root.is_dir():
            for directory, _dirs, files in os.walk(root, followlinks=False):
                for name in files:
                    path = Path(directory) / name
                    try:
                        if not stat.S_ISREG(path.lstat().st_mode):
                            continue
                        dest = target / path.relative_to(root)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(path, dest, follow_symlinks=False)
                        count += 1
                    except (FileNotFoundError, PermissionError):
                        continue
        self.sources.extend(file_sources(target, label) if target.is_dir() else [])
        self.described.append(f"{label} (snapshot while the pod ran): {count} files")

    def scan(self, secret: bytes) -> list[Finding]:
        return scan(secret, self.sources)


@contextlib.contextmanager
def ctr_events(ctr: list[str], log: Path) -> Iterator[Path]:
    """``ctr events`` (``ctr`` = the ctr argv prefix with --address) into ``log`` while the
    block runs."""
    with log.open("wb") as out:
        proc = subprocess.Popen([*ctr, "events"], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
