"""Init's background boot steps, as the agent sees them: done, failed, or still running.

Init loads kernel modules and device drivers in a background subshell while the agent starts
(``packaging/guest-image/init``). Each step announces itself (its name in ``--boot-step``'s
file) and ends in one of two ways: the next marker file exists
(``--wait-for``, ``--serve-after``), or the failure file (``--boot-failed``) does, written once
by init with the failing step, its exit status and the tail of its stderr; init's supervising
subshell also writes it if the steps end any other way (killed, crashed). The agent never
waits out its bound on a step that already failed: :func:`wait_for_step` raises
:class:`BootStepFailed` naming it as soon as the failure file exists.

A step that hangs (rather than dies) writes nothing: each step has its own bound
(:data:`STEP_BOUNDS`), and :func:`wait_for_step` names the step that overran it, well within the
host's per-call bounds (the shim's first AgentService call after Check waits 30 s), rather than
the wait's overall one. The bound counts from when init announced the step (the step file's
mtime) or from when the agent began waiting for it, whichever is later: the step after
"modules" runs at nice 19 beside the agent's own start-up, which takes the guest's one vCPU for
as long as it runs (seconds under TCG, many more on a loaded host), so the time it spends
starved by it is not theirs.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

POLL = 0.02  # seconds between two looks: another process writes the files
MAX_REPORT = 900  # characters of init's failure report passed on (the shim keeps 1024)

# Each of init's background steps, at most, from when it announced itself (under TCG each takes
# well under a second on an idle host, a few in a burst; 200 boots in a row beside other work
# had the AgentService serving at most 19 s after QEMU started). "modules" gates the agent's
# listening (the shim's dial waits 120 s); "drivers" gates its AgentService, whose first
# call the shim bounds to 30 s after Check: their bounds leave the guest's answer time to
# arrive first.
STEP_BOUNDS: Final[Mapping[str, float]] = MappingProxyType({
    "modules": 60.0,
    "drivers": 20.0,
})


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
    announced = _announced_step(path)
    return None if announced is None else announced[0]


def _announced_step(path: Path | None) -> tuple[str, float] | None:
    """The step init announced last and when (the file's mtime, on the guest's clock)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            name = f.read(200).decode(errors="replace").strip()
            since = os.fstat(f.fileno()).st_mtime
    except OSError:
        return None
    return (name, since) if name else None


def overran_step(path: Path | None, bounds: Mapping[str, float] = STEP_BOUNDS,
                 now: float | None = None, waited_since: float | None = None) -> str | None:
    """Why the running step failed if it has run longer than its bound, else None. The bound
    counts from the announcement or from ``waited_since`` (when the agent began waiting, on
    the same clock), whichever is later."""
    announced = _announced_step(path)
    if announced is None:
        return None
    name, since = announced
    bound = bounds.get(name)
    if bound is None:
        return None
    now = time.time() if now is None else now
    ran = now - since
    counted = now - max(since, since if waited_since is None else waited_since)
    if counted <= bound:
        return None
    of_them = "" if f"{counted:.1f}" == f"{ran:.1f}" else (
        f", {counted:.1f} s of them while the agent waited for it")
    return (f'step "{name}" did not finish within its bound of {bound:g} s (running for '
            f'{ran:.1f} s{of_them})')


async def wait_for_step(done: Path, seconds: float, *, failed: Path | None = None,
                        step: Path | None = None,
                        bounds: Mapping[str, float] = STEP_BOUNDS) -> None:
    """Until ``done`` exists. Raises :class:`BootStepFailed` at once when ``failed`` exists
    (with init's report), when the step init announced last overran its own bound
    (``bounds``, naming it), or after ``seconds`` (naming the step init announced last)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    waited_since = time.time()  # the step file's clock
    while True:
        report = read_failure(failed)
        if report is not None:
            raise BootStepFailed(f"init's boot step failed: {report}")
        if os.path.exists(done):  # noqa: ASYNC240 - another process's file, polled
            return
        overran = overran_step(step, bounds, waited_since=waited_since)
        if overran is not None:
            raise BootStepFailed(f"init's boot step hung: {overran}")
        if loop.time() >= deadline:
            running = current_step(step)
            raise BootStepFailed(
                f"init's boot steps did not finish within {seconds:g} s ({done} missing; "
                f"step running: {running or 'unknown'})")
        await asyncio.sleep(POLL)
