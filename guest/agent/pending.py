"""The AgentService while its implementation is still being built: its calls wait for it.

The agent listens (and answers Health.Check) before it has imported the container machinery
(:mod:`guest.agent.service`, the sandbox, networking, image pull: ≈ 0.5 s of a TCG boot) and
before it has imported the AgentService's descriptors (``agent_pb2``, ``oci_pb2``: the
machinery imports them). The server holds ``grpc.AgentService`` as pending
(:meth:`protocols.ttrpc.Server.register_pending` with :meth:`PendingService.wait`); the real
service is built in the background and registered, then :meth:`PendingService.resolve` lets
every call that arrived before it run exactly as it would have (the policy is settled before
listening and is the real service's: nothing reaches a handler unchecked). A method the real
service lacks answers UNIMPLEMENTED, as the server answers methods missing on an
implementation. If the build fails, every waiting and later call answers at once naming the
cause: FAILED_PRECONDITION ``guest failed to start: <cause>`` when one of init's boot steps
failed (:class:`guest.agent.bootsteps.BootStepFailed`: the guest is broken, a retry cannot
help), UNAVAILABLE ``the agent failed to start: <cause>`` otherwise (the agent's owner sees
the failure too).
"""

from __future__ import annotations

import asyncio

from guest.agent import timeline
from guest.agent.bootsteps import BootStepFailed
from protocols.ttrpc import Code, TtrpcError

AGENT_SERVICE = "grpc.AgentService"  # agent_pb2's AgentService, by name (no descriptor needed)


class PendingService:
    """Whether the AgentService is registered (:meth:`resolve`) or cannot come (:meth:`fail`);
    :meth:`wait` is what its calls await meanwhile."""

    def __init__(self) -> None:
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def ready(self) -> bool:
        return self._ready.done() and self._ready.exception() is None

    @property
    def failed(self) -> bool:
        return self._ready.done() and self._ready.exception() is not None

    def resolve(self) -> None:
        """The service's methods are registered with the server: the waiting calls run."""
        self._ready.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved here: no "never retrieved" warning

    async def wait(self) -> None:
        if not self._ready.done():
            timeline.mark("an AgentService call waits for the machinery")
        try:
            await asyncio.shield(self._ready)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            raise failure_status(err) from err


def failure_status(error: BaseException) -> TtrpcError:
    """What every AgentService call answers once the implementation cannot come."""
    if isinstance(error, BootStepFailed):
        return TtrpcError(Code.FAILED_PRECONDITION, f"guest failed to start: {error}")
    return TtrpcError(Code.UNAVAILABLE, f"the agent failed to start: {error}")
