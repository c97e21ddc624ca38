"""The agent's dial, step by step: each attempt's own bounds, what it saw, and the guest's
other channels (its announcement, its console, the VM's exit) that end the wait early.

:meth:`shim.pod.agent.AgentClient.dial` runs the attempts; this module says how long each step
may take and how each outcome reads in the error, so that the error names what the last
attempt saw (issue 18: a dial attempt that hung rather than being refused).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Coroutine
from typing import Any, Final, TypeVar

from hypervisor.console import ConsoleWatch
from hypervisor.vm import AgentChannel
from protocols.ttrpc import Client
from shim.core.errors import FailedPrecondition, RpcError, Unavailable

MAX_AGENT_MESSAGE: Final = 1024  # characters of an agent's error message passed on

T = TypeVar("T")


class _AttemptTimeout(TimeoutError):
    """One bounded step of a dial attempt ran out of time (the message says which)."""

    def __init__(self, message: str, cut: bool) -> None:
        super().__init__(message)
        self.cut = cut  # by the dial's deadline, before the step's own bound


async def bounded(step: Coroutine[Any, Any, T], bound: float, deadline: float,
                   what: str) -> T:
    """``step`` within its own ``bound``, or what is left until ``deadline`` if less."""
    left = deadline - time.monotonic()
    try:
        async with asyncio.timeout(max(min(bound, left), 0.0)):
            return await step
    except TimeoutError as err:
        if isinstance(err, _AttemptTimeout):
            raise
        if left < bound:
            raise _AttemptTimeout(f"{what} when the dial timeout ran out", True) from err
        raise _AttemptTimeout(f"{what} within {bound:g} s", False) from err


async def connect(channel: AgentChannel, port: int) -> Client:
    if channel.hybrid_socket is not None:
        return await Client.connect_hybrid_vsock(channel.hybrid_socket, port)
    return await Client.connect_vsock(channel.guest_cid, port)


def describe(err: BaseException, before: str) -> str:
    """What an attempt saw, never empty (a bare TimeoutError or EOF has no message); an
    attempt cut short by the dial's deadline says less than the one before it."""
    if isinstance(err, _AttemptTimeout) and err.cut and before:
        return f"{before}; one more attempt was cut short by the dial timeout"
    text = str(err) or type(err).__name__
    return text if isinstance(err, RpcError | _AttemptTimeout) else f"{type(err).__name__}: {text}"


def exit_text(exited: asyncio.Future[object]) -> str:
    return "the VM exited" + ("" if exited.cancelled() else f" ({exited.result()})")


def raise_console_failure(name: str, console: ConsoleWatch | None) -> None:
    """The guest said on its console that it cannot start: that ends the dial, in its words."""
    if console is not None and console.failure.done():
        raise FailedPrecondition(f"agent at {name}: the guest cannot start; its console says: "
                                 f"{console.failure.result()[:MAX_AGENT_MESSAGE]}")


def with_console_tail(console: ConsoleWatch | None) -> str:
    tail = console.tail()[-MAX_AGENT_MESSAGE:] if console is not None else ""
    return f"; the console's last lines: {tail}" if tail else ""


async def await_guest(ready: Awaitable[None], name: str, deadline: float, dial_timeout: float,
                       exited: asyncio.Future[object] | None,
                       console: ConsoleWatch | None = None) -> None:
    """Wait for the guest's announcement, bounded by the dial deadline, the VM's exit and the
    guest saying on its console that it cannot start."""
    announced = asyncio.ensure_future(ready)
    waiters: set[asyncio.Future[Any]] = {announced}
    if exited is not None:
        waiters.add(exited)
    waiters |= {console.failure} if console is not None else set()
    try:
        await asyncio.wait(waiters, timeout=max(deadline - time.monotonic(), 0.0),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not announced.done():
            announced.cancel()
            await asyncio.wait([announced])
    if announced.done() and not announced.cancelled():
        announced.result()  # the backend's own failure, if any, surfaces here
        return
    raise_console_failure(name, console)
    if exited is not None and exited.done():
        raise Unavailable(f"agent at {name}: {exit_text(exited)} before the guest announced "
                          "its agent" + with_console_tail(console))
    raise Unavailable(f"agent at {name}: the guest did not announce its agent within "
                      f"{dial_timeout:g} s (hybrid vsock: the guest connects to the host's "
                      "ready port once its agent listens; nothing was dialed before that)"
                      + with_console_tail(console))
