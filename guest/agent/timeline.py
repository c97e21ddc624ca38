"""The agent's own timeline of its work after Check, for the benchmark (``--trace``).

Off by default: :func:`mark` is then one global lookup and a return. With ``--trace`` (init
passes it for the kernel command line's ``coco.agent.trace=1``, which the shim adds only when
``$COCO_SHIM_TRACE`` is set: a benchmark's run), each mark is one line on the agent's stderr,
the guest console (the host reads it with ``shim.core.trace.guest_mark``)::

    coco-agent trace <CLOCK_MONOTONIC seconds, the guest's> <step>

written with one ``write(2)`` (whole lines). The host's launcher hands every console line to
the shim, which records these in its own trace (``shim/core/trace.py``); ``bench/run.py``
lays them out on the guest's clock (machinery import, the wait on init's steps, each RPC's
parts, the OCI runtime's execs) beside the host's.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Final

PREFIX: Final = "coco-agent trace "

_enabled = False


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


def mark(step: str) -> None:
    """``step`` happened now (nothing unless enabled)."""
    if not _enabled:
        return
    with contextlib.suppress(OSError):  # an unwritable console must never fail an RPC
        os.write(2, f"{PREFIX}{time.monotonic():.6f} {step}\n".encode())

