"""grpc.Health: what the host's dial needs first, importable without the rest of the agent.

The agent listens with only this and :mod:`guest.agent.pending` loaded, so the host's first
Check does not wait for the container machinery (:mod:`guest.agent.service` and below).

Check answers SERVING while the AgentService is coming or ready, NOT_SERVING once it cannot
come (a boot step or the machinery's build failed; the agent is shutting down): the host's
dial must not take such a guest for healthy. The reason travels with every AgentService call
(:class:`guest.agent.pending.PendingService`), which the host makes when told NOT_SERVING.
"""

from __future__ import annotations

from collections.abc import Callable

from protocols.api.kata import health_pb2
from protocols.ttrpc import RequestContext

AGENT_VERSION = "0.1.0"
GRPC_API_VERSION = "0.0.1"


class HealthService:
    def __init__(self, on_check: Callable[[], None] | None = None,
                 failed: Callable[[], bool] | None = None) -> None:
        self._on_check = on_check  # told of every Check answered (the boot log's first one)
        self._failed = failed  # whether the AgentService can no longer come

    async def Check(
        self, request: health_pb2.CheckRequest, ctx: RequestContext
    ) -> health_pb2.HealthCheckResponse:
        if self._on_check is not None:
            self._on_check()
        status = health_pb2.HealthCheckResponse.SERVING
        if self._failed is not None and self._failed():
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def Version(
        self, request: health_pb2.CheckRequest, ctx: RequestContext
    ) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(
            grpc_version=GRPC_API_VERSION, agent_version=AGENT_VERSION
        )
