"""A ttrpc service whose implementation is still being built: its RPCs wait for it.

The agent listens (and answers Health.Check) before it has imported the container machinery
(:mod:`guest.agent.service`, the sandbox, networking, image pull: ≈ 0.5 s of a TCG boot). Its
AgentService is registered as a :class:`PendingService`; the real one is built in the
background, and every RPC that arrives before it is ready waits for it, then runs exactly as
it would have (the policy is settled before listening and is the real service's: nothing
reaches a handler unchecked). An RPC the real implementation lacks answers UNIMPLEMENTED, as
the server answers methods missing on an implementation. If the build fails, every waiting
and later RPC answers at once naming the cause: FAILED_PRECONDITION ``guest failed to start:
<cause>`` when one of init's boot steps failed (:class:`guest.agent.bootsteps.BootStepFailed`:
the guest is broken, a retry cannot help), UNAVAILABLE ``the agent failed to start: <cause>``
otherwise (the agent's owner sees the failure too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

from guest.agent.bootsteps import BootStepFailed
from protocols.ttrpc import Code, RequestContext, TtrpcError

Method = Callable[[Message, RequestContext], Awaitable[Message]]


class PendingService:
    """Stands for the implementation of ``descriptor`` until :meth:`resolve` gives it."""

    def __init__(self, descriptor: ServiceDescriptor) -> None:
        self._ready: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        for method in descriptor.methods:
            setattr(self, method.name, self._forward(method.name))

    @property
    def ready(self) -> bool:
        return self._ready.done() and self._ready.exception() is None

    @property
    def failed(self) -> bool:
        return self._ready.done() and self._ready.exception() is not None

    def resolve(self, impl: object) -> None:
        self._ready.set_result(impl)

    def fail(self, error: BaseException) -> None:
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved here: no "never retrieved" warning

    async def implementation(self) -> object:
        try:
            return await asyncio.shield(self._ready)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            raise failure_status(err) from err

    def _forward(self, name: str) -> Method:
        async def forward(request: Message, ctx: RequestContext) -> Any:
            impl = await self.implementation()
            handler = getattr(impl, name, None)
            if handler is None:
                raise TtrpcError(Code.UNIMPLEMENTED, f"method {name}")
            return await handler(request, ctx)

        forward.__name__ = forward.__qualname__ = name
        return forward


def failure_status(error: BaseException) -> TtrpcError:
    """What every AgentService call answers once the implementation cannot come."""
    if isinstance(error, BootStepFailed):
        return TtrpcError(Code.FAILED_PRECONDITION, f"guest failed to start: {error}")
    return TtrpcError(Code.UNAVAILABLE, f"the agent failed to start: {error}")
