"""The host side of the Kata agent protocol: one typed method per RPC of ``grpc.AgentService``.

Like kata's runtime-rs agent, every call takes its bound from one per-RPC table
(``Timeouts.agent``, ``None`` for long polls) and sends it as the ttrpc deadline too; no caller
bounds an agent call again. An agent's status comes back as the same typed error
(:func:`protocols.errors.error_for`: a policy denial is PermissionDenied, a full guest disk
ResourceExhausted) with its message truncated to :data:`MAX_AGENT_MESSAGE`; a lost connection
is Unavailable. :class:`Agent` is the seam the pod and the task domain use.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol, TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from hypervisor.vm import AgentChannel
from protocols.api.kata import agent_pb2, health_pb2, oci_pb2, types_pb2
from protocols.ttrpc import Client, ConnectionClosed, OversizedMessage, TtrpcError
from shim.core import trace
from shim.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    RpcError,
    Unavailable,
    error_for,
)
from shim.core.timeouts import TIMEOUTS, Timeouts
from shim.pod.dial import (
    MAX_AGENT_MESSAGE,
    await_guest,
    bounded,
    connect,
    describe,
    exit_text,
    raise_console_failure,
    with_console_tail,
)

log = logging.getLogger(__name__)

AGENT_PORT: Final = 1024
AGENT_SERVICE: Final = "grpc.AgentService"
HEALTH_SERVICE: Final = "grpc.Health"
READ_CHUNK: Final = 1 << 20  # kata: max data chunk 1 MiB

R = TypeVar("R", bound=Message)


class Agent(Protocol):
    """What the pod and its tasks ask of the guest agent: method ↔ RPC."""

    async def create_sandbox(self, sandbox_id: str, hostname: str, dns: Sequence[str],
                             storages: Sequence[agent_pb2.Storage]) -> None: ...

    async def destroy_sandbox(self) -> None: ...

    async def set_policy(self, policy: str) -> None: ...

    async def update_interface(self, interface: types_pb2.Interface) -> None: ...

    async def update_routes(self, routes: Sequence[types_pb2.Route]) -> None: ...

    async def add_arp_neighbors(self, neighbors: Sequence[types_pb2.ARPNeighbor]) -> None: ...

    async def create_container(self, container_id: str, spec: oci_pb2.Spec,
                               storages: Sequence[agent_pb2.Storage], *,
                               sandbox_pidns: bool = False) -> None:
        """``sandbox_pidns``: the container joins the pod's PID namespace in the guest."""

    async def start_container(self, container_id: str) -> None: ...

    async def exec_process(self, container_id: str, exec_id: str,
                           process: oci_pb2.Process) -> None: ...

    async def signal_process(self, container_id: str, exec_id: str, signal: int) -> None: ...

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        """Until the process exits (long poll); its exit status."""

    async def read_stdout(self, container_id: str, exec_id: str, size: int) -> bytes:
        """Up to ``size`` bytes, waiting for some (long poll); b"" at the end of the stream."""

    async def read_stderr(self, container_id: str, exec_id: str, size: int) -> bytes: ...

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        """How many bytes the agent took (maybe fewer than given)."""

    async def close_stdin(self, container_id: str, exec_id: str) -> None: ...

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int,
                             columns: int) -> None: ...

    async def pause_container(self, container_id: str) -> None: ...

    async def resume_container(self, container_id: str) -> None: ...

    async def stats_container(self, container_id: str) -> agent_pb2.StatsContainerResponse: ...

    async def update_container(self, container_id: str,
                               resources: oci_pb2.LinuxResources) -> None: ...

    async def remove_container(self, container_id: str) -> None: ...

    async def get_oom_event(self) -> str:
        """Until a container of the pod hits its memory limit (long poll); its id."""

    async def close(self) -> None:
        """Drop the connection: every pending call fails with Unavailable."""


class AgentClient:
    """:class:`Agent` over one ttrpc connection (vsock or hybrid vsock)."""

    def __init__(self, client: Client, name: str, timeouts: Timeouts = TIMEOUTS) -> None:
        self._client = client
        self._timeouts = timeouts
        self.name = name

    @classmethod
    async def dial(cls, channel: AgentChannel, dial_timeout: float, *,
                   exited: asyncio.Future[object] | None = None,
                   timeouts: Timeouts = TIMEOUTS, port: int = AGENT_PORT) -> AgentClient:
        """Connect and pass Health.Check, retrying until ``dial_timeout`` (the guest boots
        meanwhile). On hybrid vsock the guest's announcement (``channel.wait_guest_ready``) is
        awaited before the first attempt: dialing earlier can stall vhost-device-vsock for good
        (see hypervisor.vsock). Each attempt has its own bounds (connect + handshake, then
        Check); ``exited`` (the VM's exit) ends the wait early with the reason. The error names
        what the last attempt saw. A guest that refuses to start (bad initdata, a digest
        that does not match its evidence) answers Check with FAILED_PRECONDITION ``guest
        refused to start: <why>``: that ends the dial at once as FailedPrecondition with the
        guest's words. A guest that cannot start (a boot step failed) answers Check NOT_SERVING:
        the dial asks it why once (:meth:`why_not_serving`) and ends as FailedPrecondition."""
        hybrid = channel.hybrid_socket
        name = f"hvsock:{hybrid}:{port}" if hybrid else f"vsock:{channel.guest_cid}:{port}"
        deadline = time.monotonic() + dial_timeout
        check_bound = timeouts.agent["Check"] or dial_timeout
        console = channel.console
        if channel.wait_guest_ready is not None:
            await await_guest(channel.wait_guest_ready(), name, deadline, dial_timeout, exited,
                               console)
            trace.mark("dial: guest announced its agent")
        attempts = 0
        last = ""  # what the last attempt that ran its course saw
        while True:
            raise_console_failure(name, console)
            if exited is not None and exited.done():
                raise Unavailable(f"agent at {name}: {exit_text(exited)} before the agent "
                                  "answered" + (f" (last attempt: {last})" if last else "")
                                  + with_console_tail(console))
            if deadline - time.monotonic() <= 0:
                raise Unavailable(f"agent at {name} did not answer within {dial_timeout:g} s "
                                  f"({attempts} attempts; last attempt: {last or 'none'})"
                                  + with_console_tail(console))
            attempts += 1
            try:
                client = await bounded(connect(channel, port), timeouts.agent_dial_attempt,
                                        deadline, f"no reply to CONNECT {port}" if hybrid
                                        else "not connected")
            except (OSError, TimeoutError) as err:
                last = describe(err, last)
                await asyncio.sleep(timeouts.agent_dial_retry_pause)
                continue
            agent = cls(client, name, timeouts)
            try:
                await bounded(agent.check(), check_bound, deadline, "Health.Check not answered")
                return agent
            except FailedPrecondition as err:
                await client.close()
                raise FailedPrecondition(f"agent at {name}: {err}") from err
            except AgentNotServing as err:
                try:
                    why = await agent.why_not_serving()
                finally:
                    await client.close()
                if why is not None:
                    raise FailedPrecondition(f"{err}: {why}") from err
                last = describe(err, last)
            except (OSError, TimeoutError, RpcError) as err:
                last = describe(err, last)
                await client.close()
            except BaseException:
                await client.close()
                raise
            await asyncio.sleep(timeouts.agent_dial_retry_pause)

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, method: str, request: Message, response: type[R],
                    service: str = AGENT_SERVICE) -> R:
        """One RPC under its bound from the table (which travels as the ttrpc deadline)."""
        bound = self._timeouts.agent[method]
        started = time.monotonic()
        try:
            reply = await self._client.call(service, method, request, response, timeout=bound)
        except OversizedMessage as err:
            # The guest claimed a frame of up to 4 GiB: the connection would skip it for ever
            # (a black hole for every long poll). An agent that does this is lost.
            await self._client.close()
            raise Unavailable(f"agent {method}: {err.message}: connection to {self.name} "
                              "dropped") from err
        except TtrpcError as err:
            message = err.message
            if len(message) > MAX_AGENT_MESSAGE:
                message = (f"{message[:MAX_AGENT_MESSAGE]}… ({len(message) - MAX_AGENT_MESSAGE}"
                           " more characters)")
            raise error_for(int(err.code), f"agent {method}: {message}") from err
        except ConnectionClosed as err:
            raise Unavailable(f"agent {method}: connection to {self.name} lost") from err
        except TimeoutError as err:
            raise DeadlineExceeded(f"agent {method}: no answer from the pod VM in {bound} s"
                                   ) from err
        if log.isEnabledFor(logging.DEBUG):
            log.debug("agent %s: %.3f s", method, time.monotonic() - started)
        if method not in ("ReadStdout", "ReadStderr", "WriteStdin"):  # not the streams
            trace.mark(f"agent: {method} answered")
        return reply

    async def _empty(self, method: str, request: Message) -> None:
        await self._call(method, request, Empty)

    # --- health and sandbox ---------------------------------------------------------------

    async def check(self) -> None:
        reply = await self._call("Check", health_pb2.CheckRequest(),
                                 health_pb2.HealthCheckResponse, HEALTH_SERVICE)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            statuses = health_pb2.HealthCheckResponse.ServingStatus
            status = (statuses.Name(reply.status) if reply.status in statuses.values()
                      else str(reply.status))
            raise AgentNotServing(f"agent at {self.name} is not serving (status {status})")

    async def why_not_serving(self) -> str | None:
        """Why it cannot serve: its answer to one harmless call (None: no error came back)."""
        try:
            await self.get_guest_details()
        except RpcError as err:
            return str(err) if isinstance(err.__cause__, TtrpcError) else None
        return None

    async def get_guest_details(self) -> agent_pb2.GuestDetailsResponse:
        return await self._call("GetGuestDetails", agent_pb2.GuestDetailsRequest(),
                                agent_pb2.GuestDetailsResponse)

    async def create_sandbox(self, sandbox_id: str, hostname: str, dns: Sequence[str],
                             storages: Sequence[agent_pb2.Storage]) -> None:
        await self._empty("CreateSandbox", agent_pb2.CreateSandboxRequest(
            hostname=hostname, dns=list(dns), sandbox_id=sandbox_id, storages=list(storages)))

    async def destroy_sandbox(self) -> None:
        await self._empty("DestroySandbox", agent_pb2.DestroySandboxRequest())

    async def set_policy(self, policy: str) -> None:
        await self._empty("SetPolicy", agent_pb2.SetPolicyRequest(policy=policy))

    async def update_interface(self, interface: types_pb2.Interface) -> None:
        await self._call("UpdateInterface", agent_pb2.UpdateInterfaceRequest(
            interface=interface), types_pb2.Interface)

    async def update_routes(self, routes: Sequence[types_pb2.Route]) -> None:
        await self._call("UpdateRoutes", agent_pb2.UpdateRoutesRequest(
            routes=agent_pb2.Routes(Routes=list(routes))), agent_pb2.Routes)

    async def add_arp_neighbors(self, neighbors: Sequence[types_pb2.ARPNeighbor]) -> None:
        await self._empty("AddARPNeighbors", agent_pb2.AddARPNeighborsRequest(
            neighbors=agent_pb2.ARPNeighbors(ARPNeighbors=list(neighbors))))

    # --- containers and processes ---------------------------------------------------------

    async def create_container(self, container_id: str, spec: oci_pb2.Spec,
                               storages: Sequence[agent_pb2.Storage], *,
                               sandbox_pidns: bool = False) -> None:
        await self._empty("CreateContainer", agent_pb2.CreateContainerRequest(
            container_id=container_id, exec_id=container_id, OCI=spec,
            storages=list(storages), sandbox_pidns=sandbox_pidns))

    async def start_container(self, container_id: str) -> None:
        await self._empty("StartContainer",
                          agent_pb2.StartContainerRequest(container_id=container_id))

    async def exec_process(self, container_id: str, exec_id: str,
                           process: oci_pb2.Process) -> None:
        await self._empty("ExecProcess", agent_pb2.ExecProcessRequest(
            container_id=container_id, exec_id=exec_id, process=process))

    async def signal_process(self, container_id: str, exec_id: str, signal: int) -> None:
        await self._empty("SignalProcess", agent_pb2.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal))

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        reply = await self._call("WaitProcess", agent_pb2.WaitProcessRequest(
            container_id=container_id, exec_id=exec_id), agent_pb2.WaitProcessResponse)
        return int(reply.status)

    async def read_stdout(self, container_id: str, exec_id: str, size: int) -> bytes:
        return await self._read("ReadStdout", container_id, exec_id, size)

    async def read_stderr(self, container_id: str, exec_id: str, size: int) -> bytes:
        return await self._read("ReadStderr", container_id, exec_id, size)

    async def _read(self, method: str, container_id: str, exec_id: str, size: int) -> bytes:
        """kata-agent reports the end of a stream as an error, our reference agent as empty
        data: both mean the stream is over. A lost connection is not: Unavailable."""
        request = agent_pb2.ReadStreamRequest(container_id=container_id, exec_id=exec_id,
                                              len=min(size, READ_CHUNK))
        try:
            reply = await self._call(method, request, agent_pb2.ReadStreamResponse)
        except Unavailable:
            raise
        except RpcError as err:
            log.debug("%s %s/%s ended: %s", method, container_id, exec_id or "init", err)
            return b""
        return reply.data

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        reply = await self._call("WriteStdin", agent_pb2.WriteStreamRequest(
            container_id=container_id, exec_id=exec_id, data=data[:READ_CHUNK]),
            agent_pb2.WriteStreamResponse)
        return int(reply.len)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        await self._empty("CloseStdin", agent_pb2.CloseStdinRequest(
            container_id=container_id, exec_id=exec_id))

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int,
                             columns: int) -> None:
        await self._empty("TtyWinResize", agent_pb2.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, row=rows, column=columns))

    async def pause_container(self, container_id: str) -> None:
        await self._empty("PauseContainer",
                          agent_pb2.PauseContainerRequest(container_id=container_id))

    async def resume_container(self, container_id: str) -> None:
        await self._empty("ResumeContainer",
                          agent_pb2.ResumeContainerRequest(container_id=container_id))

    async def stats_container(self, container_id: str) -> agent_pb2.StatsContainerResponse:
        return await self._call("StatsContainer", agent_pb2.StatsContainerRequest(
            container_id=container_id), agent_pb2.StatsContainerResponse)

    async def update_container(self, container_id: str,
                               resources: oci_pb2.LinuxResources) -> None:
        await self._empty("UpdateContainer", agent_pb2.UpdateContainerRequest(
            container_id=container_id, resources=resources))

    async def remove_container(self, container_id: str) -> None:
        await self._empty("RemoveContainer",
                          agent_pb2.RemoveContainerRequest(container_id=container_id))

    async def get_oom_event(self) -> str:
        reply = await self._call("GetOOMEvent", agent_pb2.GetOOMEventRequest(),
                                 agent_pb2.OOMEvent)
        return reply.container_id


class AgentNotServing(Unavailable):
    """The agent answered Health.Check, with a status other than SERVING."""


async def dial_agent(channel: AgentChannel, dial_timeout: float,
                     exited: asyncio.Future[object], timeouts: Timeouts) -> Agent:
    """The pod's agent, dialled (the boot script's default :data:`Dial`)."""
    return await AgentClient.dial(channel, dial_timeout, exited=exited, timeouts=timeouts)


Dial = Callable[[AgentChannel, float, "asyncio.Future[object]", Timeouts], Awaitable[Agent]]
