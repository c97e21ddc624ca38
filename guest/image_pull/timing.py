"""Where a layer's time goes: exclusive wall time per phase, per thread of the pipeline.

One layer is two threads (:mod:`.pipeline`): the fetch side pulls bytes through the socket and
the blob digest, the unpack side through inflate → diff ID → tar → file writes. Each side has
its own timer; each stage brackets its own work with :meth:`PhaseTimer.enter` /
:meth:`PhaseTimer.leave`; time is charged to the innermost open phase only, so one side's
phases add up to the layer's wall time (``wait``: blocked on the other side; what no stage
claims is ``other``: tar header parsing, buffer copies, the interpreter between calls). Two
clock reads per bracket: cheap enough to stay on for every pull, whose log line then says where
its time went.
"""

from __future__ import annotations

import time

OTHER = "other"
WAIT = "wait"
PHASES = ("network", "digest", "inflate", "diff_id", "write", WAIT, OTHER)
FETCH_PHASES = ("network", "digest", WAIT, OTHER)
UNPACK_PHASES = ("inflate", "diff_id", "write", WAIT, OTHER)


class PhaseTimer:
    """Not thread-safe: one timer per side of a layer, used by that side's thread only."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._current = OTHER
        self._since = time.perf_counter()

    def enter(self, phase: str) -> str:
        """Charge the time so far to the open phase, open ``phase``; returns the one to
        give back to :meth:`leave`."""
        now = time.perf_counter()
        previous = self._current
        self.totals[previous] += now - self._since
        self._current = phase
        self._since = now
        return previous

    def leave(self, previous: str) -> None:
        now = time.perf_counter()
        self.totals[self._current] += now - self._since
        self._current = previous
        self._since = now

    def stop(self) -> dict[str, float]:
        """Close the books (the open phase gets its time so far); the totals in seconds."""
        self.leave(self._current)
        return dict(self.totals)

    @staticmethod
    def describe(totals: dict[str, float]) -> str:
        return ", ".join(f"{name} {seconds:.2f}" for name, seconds in totals.items())


def describe_sides(*, fetch: dict[str, float], unpack: dict[str, float]) -> str:
    """One layer's two timers: ``fetch: network …, digest …, wait …, other …; unpack: …``."""
    return "; ".join(
        f"{side}: " + PhaseTimer.describe({name: totals[name] for name in phases})
        for side, totals, phases in (
            ("fetch", fetch, FETCH_PHASES),
            ("unpack", unpack, UNPACK_PHASES),
        )
    )
