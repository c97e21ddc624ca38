"""Init's background boot steps, as the agent sees them: done, failed, or still running.

Init loads kernel modules and device drivers, and mounts what containers need, in a background
subshell while the agent starts (``packaging/guest-image/init``). Each step announces itself
(its name in ``--boot-step``'s file) and ends in one of two ways: the next marker file exists
(``--wait-for``, ``--serve-after``), or the failure file (``--boot-failed``) does, written once
by init with the failing step, its exit status and the tail of its stderr; init's supervising
subshell also writes it if the steps end any other way (killed, crashed). The agent never
waits out its bound on a step that already failed: :func:`wait_for_step` raises
:class:`BootStepFailed` naming it as soon as the failure file exists.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

POLL = 0.02  # seconds between two looks: another process writes the files
MAX_REPORT = 900  # characters of init's failure report passed on (the shim keeps 1024)


class BootStepFailed(Exception):
    """A background boot step of init failed, or did not finish within its bound."""


def read_failure(path: Path | None) -> str | None:
    """Init's failure report, on one line, or None if there is none (yet)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(4 * MAX_REPORT)
    except FileNotFoundError:
        return None
    except OSError as err:  # it exists but cannot be read: still a failure, named as such
        return f"(the failure report {path} is unreadable: {err.strerror})"
    text = "; ".join(line.strip() for line in raw.decode(errors="replace").splitlines()
                     if line.strip())
    if len(text) > MAX_REPORT:
        text = text[:MAX_REPORT] + "…"
    return text or f"(the failure report {path} is empty)"


def current_step(path: Path | None) -> str | None:
    """The step init announced last, if it says."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read(200).decode(errors="replace").strip() or None
    except OSError:
        return None


async def wait_for_step(done: Path, seconds: float, *, failed: Path | None = None,
                        step: Path | None = None) -> None:
    """Until ``done`` exists. Raises :class:`BootStepFailed` at once when ``failed`` exists
    (with init's report), or after ``seconds`` (naming the step init announced last)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        report = read_failure(failed)
        if report is not None:
            raise BootStepFailed(f"init's boot step failed: {report}")
        if os.path.exists(done):  # noqa: ASYNC240 - another process's file, polled
            return
        if loop.time() >= deadline:
            running = current_step(step)
            raise BootStepFailed(
                f"init's boot steps did not finish within {seconds:g} s ({done} missing; "
                f"step running: {running or 'unknown'})")
        await asyncio.sleep(POLL)
