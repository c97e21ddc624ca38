"""What the guest console says as it is logged: its last lines, and whether the guest failed.

The console is the one channel a guest has when its agent's never comes up (a vsock module
that does not load, a kernel panic, init dying). The launcher feeds every byte QEMU's console
chardev writes (:class:`hypervisor.caplog.CappedLog`'s ``watch``, before the log's cap) to a
:class:`ConsoleWatch`; the agent's dial waits on :attr:`ConsoleWatch.failure` beside the VM's
exit, so a guest that says it cannot start ends the dial at once with its words, and a dial
that ends otherwise names the console's last lines.

A failure is a whole line holding one of :data:`FAILURE_MARKERS` (or init's ``die``): what
the reference guest's init and agent print on the console when the guest cannot start
(``packaging/guest-image/init``, ``guest/agent/__main__.py``), and the kernel's panic.
Nothing else on the console counts; a guest that prints a marker can only fail its own boot,
which it can always do.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final

FAILURE_MARKERS: Final = (
    'coco-init: boot step "',  # a background boot step failed (its report on this line)
    "coco-agent: guest failed to start:",
    "coco-agent: guest refused to start:",
    "Kernel panic - not syncing:",
)
DYING: Final = ("coco-init: ", "; powering off")  # init's die(), before the agent answered
MAX_LINE: Final = 2048  # characters kept of one console line (the rest is dropped)
TAIL_LINES: Final = 5


class ConsoleWatch:
    """Lines of the guest console, fed as they arrive (:meth:`feed`)."""

    def __init__(self, tail_lines: int = TAIL_LINES,
                 on_line: Callable[[str], None] | None = None) -> None:
        self.failure: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.on_line = on_line  # told every non-empty line (a benchmark's trace reads marks)
        self._partial = bytearray()
        self._last: deque[str] = deque(maxlen=tail_lines)

    def feed(self, data: bytes) -> None:
        """Bytes of the console, in order (any chunking)."""
        *complete, rest = data.split(b"\n")
        for piece in complete:
            self._partial += piece[: max(MAX_LINE - len(self._partial), 0)]
            self._line(self._partial.decode(errors="replace"))
            self._partial.clear()
        self._partial += rest[: max(MAX_LINE - len(self._partial), 0)]

    def _line(self, raw: str) -> None:
        line = raw.replace("\r", "").strip()
        if not line:
            return
        self._last.append(line)
        if self.on_line is not None:
            self.on_line(line)
        if not self.failure.done() and is_failure(line):
            self.failure.set_result(line)

    def tail(self) -> str:
        """The console's last few non-empty lines, joined by " | " (empty if it said nothing)."""
        return " | ".join(self._last)


def is_failure(line: str) -> bool:
    """A console line saying the guest cannot start (init's die() counts too: once the dial
    has ended, nobody waits on it)."""
    if any(marker in line for marker in FAILURE_MARKERS):
        return True
    prefix, suffix = DYING
    return prefix in line and line.endswith(suffix)
