"""A benchmark's boot trace: the daemon's steps on the host's monotonic clock.

When ``$COCO_SHIM_TRACE`` names a file, :func:`mark` appends ``<CLOCK_MONOTONIC seconds> <pid>
<step>`` to it, one short line per ``O_APPEND`` write (whole lines even from several
processes). CLOCK_MONOTONIC is one clock for every process of the host, so ``bench/run.py``
lines these steps up with its own timing of ``ctr`` and of a direct boot. Unset (every node),
a mark costs one dictionary lookup: no file, no formatting, nothing kept.
"""

from __future__ import annotations

import os
import time
from typing import Final

TRACE_ENV: Final = "COCO_SHIM_TRACE"


def mark(step: str) -> None:
    """Record that ``step`` happened now (no-op unless ``$COCO_SHIM_TRACE`` is set)."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = f"{time.monotonic():.6f} {os.getpid()} {step}\n".encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return  # a trace the benchmark cannot write is no reason to fail a pod
    try:
        os.write(fd, line)
    except OSError:
        pass
    finally:
        os.close(fd)


def read(path: str | os.PathLike[str]) -> list[tuple[float, int, str]]:
    """The marks in ``path``: (monotonic seconds, pid, step), in the file's order."""
    marks = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stamp, pid, step = line.rstrip("\n").split(" ", 2)
            marks.append((float(stamp), int(pid), step))
    return marks


# The reference agent's own timeline (guest/agent/timeline.py): asked for with this kernel
# parameter, printed on the guest console as "coco-agent trace <guest seconds> <step>".
GUEST_TRACE_PARAM: Final = "coco.agent.trace=1"
GUEST_PREFIX: Final = "coco-agent trace "
GUEST_STEP: Final = "guest@"  # the guest's marks in the host's trace: "guest@<seconds> <step>"


def enabled() -> bool:
    """Whether this process traces (``$COCO_SHIM_TRACE`` is set)."""
    return bool(os.environ.get(TRACE_ENV))


def kernel_params(params: str, *, measured: bool) -> str:
    """The pod's kernel parameters; while tracing, with the agent's timeline asked for
    (``$COCO_SHIM_TRACE`` only: a benchmark's run, never a node's), unless the command line is
    ``measured`` (a confidential profile: a parameter the shim adds would change the launch
    measurement, and s390-pv takes none at all), where the guest's timeline stays off."""
    if not enabled() or measured:
        return params
    return " ".join(p for p in (params, GUEST_TRACE_PARAM) if p)


def guest_line(line: str) -> None:
    """A guest console line: if it is one of the agent's marks, record it (host clock of its
    arrival, and the guest's own clock in the step: ``guest@<seconds> <step>``)."""
    at = line.find(GUEST_PREFIX)
    if at < 0:
        return
    stamp, _, step = line[at + len(GUEST_PREFIX):].partition(" ")
    try:
        seconds = float(stamp)
    except ValueError:
        return
    if step.strip():
        mark(f"{GUEST_STEP}{seconds:.6f} {step.strip()}")


def guest_step(step: str) -> tuple[float, str] | None:
    """(guest seconds, step) of a trace step recorded by :func:`guest_line`, else None."""
    if not step.startswith(GUEST_STEP):
        return None
    stamp, _, name = step[len(GUEST_STEP):].partition(" ")
    try:
        return float(stamp), name
    except ValueError:
        return None
