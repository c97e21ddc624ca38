"""Boot milestones in the kernel log, so that init's steps and the agent's share one clock.

Written to ``/dev/kmsg`` at the info level (below ``quiet``'s console level: nothing reaches
the serial console, which costs time under TCG); ``dmesg`` in the guest reads them back with
the kernel's own timestamps (the boot timeline of ``make bench-guest``).
"""

from __future__ import annotations

import os
from pathlib import Path

KMSG = Path("/dev/kmsg")
INFO = 6  # KERN_INFO


class BootLog:
    """Marks ``coco-agent: <text>`` in the kernel log; a no-op without a log (tests)."""

    def __init__(self, path: Path | None = KMSG) -> None:
        self.path = path
        self._once: set[str] = set()

    def mark(self, text: str) -> None:
        if self.path is None:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.write(fd, f"<{INFO}>coco-agent: {text}\n".encode())
        except OSError:
            pass
        finally:
            os.close(fd)

    def mark_once(self, text: str) -> None:
        if text not in self._once:
            self._once.add(text)
            self.mark(text)
