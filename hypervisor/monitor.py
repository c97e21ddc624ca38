"""QMP monitor on top of qemu.qmp, with per-call timeouts and bounded event memory.

qemu.qmp keeps every event in each ``EventListener._history`` and the default ``qmp.events``
listener (which cannot be removed) grows without bound in a long-lived process. The client
below bypasses listeners entirely: events go to a bounded ring (for diagnostics) and to one
bounded queue read by the VM supervisor.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError
from qemu.qmp.message import Message
from qemu.qmp.protocol import Runstate

from hypervisor.errors import QemuError
from hypervisor.timeouts import TIMEOUTS, Timeouts

log = logging.getLogger(__name__)

EVENT_RING = 64  # recent events kept for diagnostics
EVENT_QUEUE = 256  # pending events for the supervisor; beyond that, non-terminal ones drop
TERMINAL_EVENTS = frozenset({"SHUTDOWN", "GUEST_PANICKED", "STOP"})


class _BoundedQMPClient(QMPClient):
    def __init__(self, name: str, monitor: QmpMonitor) -> None:
        super().__init__(name)
        self._monitor = monitor

    async def _event_dispatch(self, msg: Message) -> None:
        # Deliberately not calling super(): no listener (and no unbounded _history) is fed.
        self._monitor._on_event(dict(msg))


class QmpMonitor:
    """One QMP connection to one QEMU."""

    def __init__(self, name: str = "qemu", timeouts: Timeouts = TIMEOUTS) -> None:
        self._client = _BoundedQMPClient(name, self)
        self._timeouts = timeouts
        self.recent_events: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=EVENT_RING)
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=EVENT_QUEUE)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.recent_events.append(event)
        try:
            self.events.put_nowait(event)
        except asyncio.QueueFull:
            if event.get("event") in TERMINAL_EVENTS:
                # Make room: a terminal event must never be lost.
                with contextlib.suppress(asyncio.QueueEmpty):
                    self.events.get_nowait()
                self.events.put_nowait(event)
            else:
                log.debug("QMP event dropped (queue full): %s", event.get("event"))

    async def connect(self, path: Path, bound: float | None = None) -> None:
        bound = self._timeouts.qmp_connect if bound is None else bound
        try:
            async with asyncio.timeout(bound):
                while True:
                    try:
                        await self._client.connect(str(path))
                        return
                    except ConnectError as err:
                        # The socket file exists between bind() and listen(): retry.
                        if not isinstance(err.exc, ConnectionRefusedError):
                            raise
                    await asyncio.sleep(0.02)
        except (QMPError, OSError, TimeoutError) as err:
            raise QemuError(f"cannot connect to QMP at {path}: {err!r}") from err

    async def connect_unless_exited(self, path: Path, process: asyncio.subprocess.Process,
                                    bound: float | None = None) -> bool:
        """Connect, but give up as soon as ``process`` exits; False if it did."""
        connecting = asyncio.ensure_future(self.connect(path, bound))
        exiting = asyncio.ensure_future(process.wait())
        try:
            await asyncio.wait({connecting, exiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (connecting, exiting):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
            return True
        if process.returncode is None:
            # A failed session (EOF) usually means QEMU is dying: give it a moment to go.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeouts.quit):
                    await process.wait()
        if process.returncode is not None:
            return False
        connecting.result()  # a live QEMU we cannot talk to: re-raise the connection error
        return True

    @property
    def connected(self) -> bool:
        return bool(self._client.runstate == Runstate.RUNNING)

    async def execute(self, command: str, arguments: dict[str, object] | None = None,
                      bound: float | None = None) -> Any:
        """Run one QMP command (bounded by ``bound``, else the table's ``qmp_command``);
        QemuError on refusal, disconnect or timeout."""
        bound = self._timeouts.qmp_command if bound is None else bound
        try:
            async with asyncio.timeout(bound):
                return await self._client.execute(command, arguments)
        except ExecuteError as err:
            raise QemuError(f"QMP {command} failed: {err.error_class}: {err}") from err
        except TimeoutError as err:
            raise QemuError(f"QMP {command} did not answer within {bound}s") from err
        except (QMPError, OSError, EOFError) as err:
            raise QemuError(f"QMP {command}: connection lost: {err!r}") from err

    async def wait_disconnected(self, bound: float) -> None:
        """Wait until the server hung up (the reader saw EOF), bounded."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound):
                while self._client.runstate == Runstate.RUNNING:
                    await self._client.runstate_changed()

    async def close(self) -> None:
        """Disconnect; a dead peer is not an error here. Idempotent."""
        try:
            await self._client.disconnect()
        except Exception as err:  # the connection is going away either way
            log.debug("QMP disconnect: %r", err)
