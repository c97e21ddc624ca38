"""Where a layer's time goes: exclusive wall time per phase of the streaming pipeline.

One layer is one worker thread pulling bytes through nested readers (socket → digest →
inflate → diff ID → tar → file writes). Each stage brackets its own work with
:meth:`PhaseTimer.enter` / :meth:`PhaseTimer.leave`; time is charged to the innermost open
phase only, so the phases add up to the layer's wall time (what no stage claims is ``other``:
tar header parsing, buffer copies, the interpreter between calls). Two clock reads per
bracket: cheap enough to stay on for every pull, whose log line then says where its time went.
"""

from __future__ import annotations

import time

OTHER = "other"
PHASES = ("network", "digest", "inflate", "diff_id", "write", OTHER)


class PhaseTimer:
    """Not thread-safe: one timer per layer, used by the one thread that streams it."""

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
