"""The shim's template processes a test started (shim.template): find and stop them."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from shim.core.crash_record import process_start_time
from tests.support.containerd import is_shim_template


def template_pids(directory: Path) -> list[int]:
    """Live templates serving a socket in ``directory`` (their command line names it: found
    even before they took their lock)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_text().split("\0")
        except OSError:
            continue
        if is_shim_template(cmdline) and len(cmdline) > 4 and \
                os.path.dirname(cmdline[4]) == str(directory) and \
                process_start_time(int(entry.name)) is not None:
            pids.append(int(entry.name))
    return pids


def stop_templates(directory: Path, timeout: float = 10.0) -> None:
    """SIGTERM every template of ``directory`` and wait until each is gone."""
    pids = template_pids(directory)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while process_start_time(pid) is not None:
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.01)
