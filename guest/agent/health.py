"""grpc.Health: what the host's dial needs first, importable without the rest of the agent.

The agent listens with only this and :mod:`guest.agent.pending` loaded, so the host's first
Check does not wait for the container machinery (:mod:`guest.agent.service` and below).
"""

from __future__ import annotations

from collections.abc import Callable

from protocols.api.kata import health_pb2
from protocols.ttrpc import RequestContext

AGENT_VERSION = "0.1.0"
GRPC_API_VERSION = "0.0.1"


class HealthService:
    def __init__(self, on_check: Callable[[], None] | None = None) -> None:
        self._on_check = on_check  # told of every Check answered (the boot log's first one)

    async def Check(
        self, request: health_pb2.CheckRequest, ctx: RequestContext
    ) -> health_pb2.HealthCheckResponse:
        if self._on_check is not None:
            self._on_check()
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Version(
        self, request: health_pb2.CheckRequest, ctx: RequestContext
    ) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(
            grpc_version=GRPC_API_VERSION, agent_version=AGENT_VERSION
        )
