"""The logs of a pod VM that failed to boot, kept for the user after the pod is rolled back.

A failed boot (QEMU did not start, the agent never answered, CreateSandbox failed) rolls the
pod back, and its run directory with the console and QEMU logs goes with it. Before that,
:func:`keep` copies the tail of each log (at most :data:`LOG_TAIL` bytes) and the error to
``<state root>/.failed-boots/<namespace>/<sandbox id>/`` (a dot: no containerd namespace starts
with one). The folder is bounded: at most :data:`KEEP_PODS` pods are kept, the oldest go first,
and the shim's ``delete`` (which containerd runs after every shim teardown) removes those older
than :data:`RETENTION`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from shim.core import paths
from shim.core.errors import RpcError

LOG_NAMES = ("console.log", "qemu.stderr.log", "vhost-device-vsock.log")
LOG_TAIL = 256 * 1024  # bytes kept of each log: the end is where a boot stops
KEEP_PODS = 16
RETENTION = 24 * 3600.0  # seconds
ERROR_FILE = "error.txt"


def root() -> Path:
    return paths.state_root() / ".failed-boots"


def keep(namespace: str, sandbox_id: str, log_dir: Path, error: BaseException) -> Path | None:
    """Copy the tails of the pod's logs and the error; the folder, or None if no log exists."""
    logs = [log_dir / name for name in LOG_NAMES if (log_dir / name).is_file()]
    if not logs:
        return None
    base = root()
    target = base / namespace / sandbox_id
    try:
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True, mode=0o700)
        for log in logs:
            (target / log.name).write_bytes(_tail(log, LOG_TAIL))
        (target / ERROR_FILE).write_text(f"{type(error).__name__}: {error}\n")
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        return None
    prune(base, keep_pods=KEEP_PODS, retention=RETENTION)
    return target


@contextlib.contextmanager
def kept_on_failure(namespace: str, sandbox_id: str, log_dir: Path) -> Iterator[None]:
    """Around a pod's start script (inside its rollback, before the run directory goes): on
    failure keep the logs, and a typed error is re-raised naming where they are."""
    try:
        yield
    except Exception as err:
        kept = keep(namespace, sandbox_id, log_dir, err)
        if kept is not None and isinstance(err, RpcError):
            raise type(err)(f"{err} (console and QEMU logs kept in {kept})") from err
        raise


def prune(base: Path, *, keep_pods: int = KEEP_PODS, retention: float = RETENTION,
          now: float | None = None) -> None:
    """Remove kept pods older than ``retention`` seconds, then all but the newest ``keep_pods``."""
    now = time.time() if now is None else now
    kept: list[tuple[float, Path]] = []
    with contextlib.suppress(OSError):
        for namespace in base.iterdir():
            for pod in namespace.iterdir():
                with contextlib.suppress(OSError):
                    kept.append((pod.stat().st_mtime, pod))
    kept.sort(reverse=True)
    for index, (mtime, pod) in enumerate(kept):
        if index >= keep_pods or now - mtime > retention:
            shutil.rmtree(pod, ignore_errors=True)
    with contextlib.suppress(OSError):
        for namespace in base.iterdir():
            with contextlib.suppress(OSError):
                namespace.rmdir()  # only when empty


def _tail(path: Path, limit: int) -> bytes:
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        return f.read(limit)
