"""The host side of the Kata agent protocol: typed calls to ``grpc.AgentService`` over ttrpc.

Only this module knows the service names and message classes; the pod sandbox calls plain
methods. Connection loss becomes :class:`~shim.errors.Unavailable`; the agent's status codes
become the shim's typed errors through the one table in :mod:`shim.core.errors`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from protocols.api.kata import agent_pb2, health_pb2
from protocols.ttrpc import Client, ConnectionClosed, TtrpcError
from shim.core.errors import DeadlineExceeded, ShimError, Unavailable, from_status_code

log = logging.getLogger(__name__)

AGENT_PORT = 1024
AGENT_SERVICE = "grpc.AgentService"
HEALTH_SERVICE = "grpc.Health"
CHECK_TIMEOUT = 30.0  # kata: Check 30 s
DIAL_RETRY_PAUSE = 0.1

R = TypeVar("R", bound=Message)


class AgentClient:
    """One ttrpc connection to the guest agent."""

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self.name = name

    @classmethod
    async def dial(cls, *, hybrid_socket: Path | None, guest_cid: int,
                   dial_timeout: float, exited: asyncio.Future[object] | None = None,
                   port: int = AGENT_PORT) -> AgentClient:
        """Connect and pass Health.Check, retrying until ``dial_timeout`` (the guest boots
        meanwhile). ``exited`` (the VM's exit) ends the wait early with the reason."""
        name = f"hvsock:{hybrid_socket}:{port}" if hybrid_socket else f"vsock:{guest_cid}:{port}"
        deadline = time.monotonic() + dial_timeout
        last: BaseException | None = None
        while True:
            if exited is not None and exited.done():
                raise Unavailable(f"agent at {name}: the VM exited before the agent answered "
                                  f"({exited.result() if not exited.cancelled() else 'cancelled'})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(f"agent at {name} did not answer within {dial_timeout:g} s"
                                  + (f" (last error: {last})" if last else ""))
            try:
                async with asyncio.timeout(min(remaining, CHECK_TIMEOUT)):
                    if hybrid_socket is not None:
                        client = await Client.connect_hybrid_vsock(hybrid_socket, port)
                    else:
                        client = await Client.connect_vsock(guest_cid, port)
                    agent = cls(client, name)
                    try:
                        await agent.check()
                    except BaseException:
                        await client.close()
                        raise
                    return agent
            except (OSError, TimeoutError, ShimError) as err:
                last = err
            await asyncio.sleep(DIAL_RETRY_PAUSE)

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, service: str, method: str, request: Message, response: type[R],
                    limit: float | None = None) -> R:
        """One RPC; ``limit`` (seconds) travels as the ttrpc deadline too."""
        started = time.monotonic()
        try:
            reply = await self._client.call(service, method, request, response, timeout=limit)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("agent %s: %.3f s", method, time.monotonic() - started)
            return reply
        except TtrpcError as err:
            raise from_status_code(int(err.code), f"agent {method}: {err.message}") from err
        except ConnectionClosed as err:
            raise Unavailable(f"agent {method}: connection to {self.name} lost") from err
        except TimeoutError as err:
            raise DeadlineExceeded(f"agent {method}: no answer in {limit} s") from err

    async def call(self, method: str, request: Message, response: type[R] = Empty,  # type: ignore[assignment]
                   limit: float | None = None) -> R:
        return await self._call(AGENT_SERVICE, method, request, response, limit)

    async def check(self) -> None:
        reply = await self._call(HEALTH_SERVICE, "Check", health_pb2.CheckRequest(),
                                 health_pb2.HealthCheckResponse, CHECK_TIMEOUT)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise Unavailable(f"agent at {self.name} is not serving (status {reply.status})")

    async def read_stream(self, method: str, container_id: str, exec_id: str,
                          size: int) -> bytes:
        """ReadStdout/ReadStderr: b"" at end of stream. kata-agent reports EOF as an error;
        our reference agent answers empty data: both mean the stream is over."""
        request = agent_pb2.ReadStreamRequest(container_id=container_id, exec_id=exec_id,
                                              len=size)
        try:
            reply = await self.call(method, request, agent_pb2.ReadStreamResponse)
        except Unavailable:
            raise
        except ShimError as err:
            log.debug("%s %s/%s ended: %s", method, container_id, exec_id or "init", err)
            return b""
        return reply.data
