"""The ttrpc edge: grpc.Health and grpc.AgentService handlers.

Each handler checks the policy (:mod:`guest.agent.policy`), translates the request into plain
values, calls one domain method and translates the result back. As in kata, ReadStdout and
ReadStderr read first and check after: a denied read returns :data:`REDACTED` instead of the
data (an empty answer would read as end of stream). Typed domain errors (:mod:`protocols.errors`)
carry their status code; :func:`status_code` is the only place that reads it. RPCs without a
handler here answer UNIMPLEMENTED (the ttrpc server does that for methods missing on the
implementation).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from guest.agent import oci, timeline
from guest.agent.errors import (
    AgentError,
    InvalidArgument,
    RuntimeFailure,
    from_os_error,
)
from guest.agent.health import AGENT_VERSION
from guest.agent.network import Address, Interface, Neighbor, Network, Route
from guest.agent.policy import AllowAll, Policy, RegoPolicy
from guest.agent.policy_input import rule_name
from guest.agent.sandbox import FileCopy, Sandbox
from guest.agent.storage import DRIVERS, StorageSpec
from protocols.api.kata import agent_pb2, types_pb2
from protocols.ttrpc import Code, RequestContext, TtrpcError

log = logging.getLogger(__name__)

REDACTED = b"[output redacted by the agent policy]\n"


def status_code(error: AgentError) -> Code:
    """The status an error is reported with: its class's code (the shared hierarchy); an
    error of no particular kind is the agent's own failure, INTERNAL."""
    return Code.INTERNAL if error.code is Code.UNKNOWN else error.code


Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Edge = TypeVar("Edge", bound="AgentService")
Handler = Callable[[Edge, Req, RequestContext], Coroutine[Any, Any, Resp]]


def _blocked(rule: str, reason: str) -> TtrpcError:
    message = f"{rule} is blocked by policy: {reason}"
    log.warning("%s", message)
    return TtrpcError(Code.PERMISSION_DENIED, message)


def _typed(name: str, err: Exception) -> TtrpcError:
    if isinstance(err, AgentError):
        return TtrpcError(status_code(err), str(err))
    typed = from_os_error(err, name) if isinstance(err, OSError) else RuntimeFailure(str(err))
    return TtrpcError(status_code(typed), str(typed))


def rpc(method: Callable[[Edge, Req], Awaitable[Resp]]) -> Handler[Edge, Req, Resp]:
    """Policy check, then the method, with domain errors turned into ttrpc statuses."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: Edge, request: Req, ctx: RequestContext) -> Resp:
        timeline.mark(f"{name} begins")
        try:
            decision = self.policy.decide(request)
        except AgentError as err:
            raise _typed(name, err) from err
        if not decision.allowed:
            raise _blocked(rule_name(request), decision.reason)
        try:
            return await method(self, request)
        except (AgentError, OSError) as err:
            raise _typed(name, err) from err
        finally:
            timeline.mark(f"{name} ends")

    return handler


def read_rpc(
    method: Callable[[Edge, agent_pb2.ReadStreamRequest], Awaitable[agent_pb2.ReadStreamResponse]],
) -> Handler[Edge, agent_pb2.ReadStreamRequest, agent_pb2.ReadStreamResponse]:
    """ReadStdout/ReadStderr: read, then check; denied data comes back as :data:`REDACTED`
    (kata's behaviour: the process is never left blocked on a full pipe)."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(
        self: Edge, request: agent_pb2.ReadStreamRequest, ctx: RequestContext
    ) -> agent_pb2.ReadStreamResponse:
        try:
            reply = await method(self, request)
            decision = self.policy.decide(request)
        except (AgentError, OSError) as err:
            raise _typed(name, err) from err
        if not decision.allowed and reply.data:
            log.info("%s: output redacted (%s)", name, decision.reason)
            return agent_pb2.ReadStreamResponse(data=REDACTED)
        return reply

    return handler


def storage_spec(storage: agent_pb2.Storage) -> StorageSpec:
    return StorageSpec(
        driver=storage.driver,
        source=storage.source,
        fstype=storage.fstype,
        options=tuple(storage.options),
        mount_point=storage.mount_point,
        driver_options=tuple(storage.driver_options),
    )


def interface_from_proto(message: types_pb2.Interface) -> Interface:
    return Interface(
        device=message.device,
        name=message.name,
        addresses=tuple(
            Address(family=a.family, address=a.address, mask=a.mask) for a in message.IPAddresses
        ),
        mtu=message.mtu,
        hw_addr=message.hwAddr,
        raw_flags=message.raw_flags,
        type=message.type,
    )


def interface_to_proto(interface: Interface) -> types_pb2.Interface:
    return types_pb2.Interface(
        device=interface.device,
        name=interface.name,
        IPAddresses=[
            types_pb2.IPAddress(family=a.family, address=a.address, mask=a.mask)  # type: ignore[arg-type]
            for a in interface.addresses
        ],
        mtu=interface.mtu,
        hwAddr=interface.hw_addr,
        raw_flags=interface.raw_flags,
        type=interface.type,
    )


def route_from_proto(message: types_pb2.Route) -> Route:
    return Route(
        dest=message.dest,
        gateway=message.gateway,
        device=message.device,
        source=message.source,
        scope=message.scope,
        family=message.family,
        flags=message.flags,
        mtu=message.mtu,
    )


def routes_to_proto(routes: list[Route]) -> agent_pb2.Routes:
    return agent_pb2.Routes(
        Routes=[
            types_pb2.Route(
                dest=r.dest,
                gateway=r.gateway,
                device=r.device,
                source=r.source,
                scope=r.scope,
                family=r.family,  # type: ignore[arg-type]
                flags=r.flags,
                mtu=r.mtu,
            )
            for r in routes
        ]
    )


def _u64(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and value > 0 else 0


def stats_to_proto(
    stats: dict[str, Any], network: list[dict[str, Any]]
) -> agent_pb2.StatsContainerResponse:
    """`runc events --stats` data (or :func:`guest.agent.cgroups.stats`, same shape) as Kata's
    CgroupStats."""
    cpu = stats.get("cpu", {})
    usage = cpu.get("usage", {})
    throttling = cpu.get("throttling", {})
    memory = stats.get("memory", {})

    def memory_data(key: str) -> agent_pb2.MemoryData:
        data = memory.get(key, {})
        return agent_pb2.MemoryData(
            usage=_u64(data.get("usage")),
            max_usage=_u64(data.get("max")),
            failcnt=_u64(data.get("failcnt")),
            limit=_u64(data.get("limit")),
        )

    blkio = stats.get("blkio", {})

    def entries(key: str) -> list[agent_pb2.BlkioStatsEntry]:
        return [
            agent_pb2.BlkioStatsEntry(
                major=_u64(e.get("major")),
                minor=_u64(e.get("minor")),
                op=str(e.get("op", "")),
                value=_u64(e.get("value")),
            )
            for e in blkio.get(key) or []
        ]

    cgroup = agent_pb2.CgroupStats(
        cpu_stats=agent_pb2.CpuStats(
            cpu_usage=agent_pb2.CpuUsage(
                total_usage=_u64(usage.get("total")),
                percpu_usage=[_u64(v) for v in usage.get("percpu") or []],
                usage_in_kernelmode=_u64(usage.get("kernel")),
                usage_in_usermode=_u64(usage.get("user")),
            ),
            throttling_data=agent_pb2.ThrottlingData(
                periods=_u64(throttling.get("periods")),
                throttled_periods=_u64(throttling.get("throttledPeriods")),
                throttled_time=_u64(throttling.get("throttledTime")),
            ),
        ),
        memory_stats=agent_pb2.MemoryStats(
            cache=_u64(memory.get("cache")),
            usage=memory_data("usage"),
            swap_usage=memory_data("swap"),
            kernel_usage=memory_data("kernel"),
            use_hierarchy=bool(memory.get("use_hierarchy")),
            stats={str(k): _u64(v) for k, v in (memory.get("raw") or {}).items()},
        ),
        pids_stats=agent_pb2.PidsStats(
            current=_u64(stats.get("pids", {}).get("current")),
            limit=_u64(stats.get("pids", {}).get("limit")),
        ),
        blkio_stats=agent_pb2.BlkioStats(
            io_service_bytes_recursive=entries("ioServiceBytesRecursive"),
            io_serviced_recursive=entries("ioServicedRecursive"),
        ),
    )
    return agent_pb2.StatsContainerResponse(
        cgroup_stats=cgroup,
        network_stats=[agent_pb2.NetworkStats(**n) for n in network],
    )


def network_stats(proc_net_dev: str = "/proc/net/dev") -> list[dict[str, Any]]:
    """Per-interface counters of the guest (containers share the guest's network)."""
    out: list[dict[str, Any]] = []
    try:
        with open(proc_net_dev) as f:
            lines = f.read().splitlines()[2:]
    except OSError:
        return out
    for line in lines:
        name, _, rest = line.partition(":")
        v = [int(x) for x in rest.split()]
        if len(v) < 16 or name.strip() == "lo":
            continue
        out.append(
            {
                "name": name.strip(),
                "rx_bytes": v[0],
                "rx_packets": v[1],
                "rx_errors": v[2],
                "rx_dropped": v[3],
                "tx_bytes": v[8],
                "tx_packets": v[9],
                "tx_errors": v[10],
                "tx_dropped": v[11],
            }
        )
    return out


Empty = empty_pb2.Empty


class AgentService:
    """grpc.AgentService; method names are the RPC names (hence not snake_case)."""

    def __init__(self, sandbox: Sandbox, network: Network, policy: Policy | None = None) -> None:
        self.sandbox = sandbox
        self.network = network
        self.policy: Policy = policy or AllowAll()

    # -- sandbox -----------------------------------------------------------------------------

    @rpc
    async def GetGuestDetails(
        self, req: agent_pb2.GuestDetailsRequest
    ) -> agent_pb2.GuestDetailsResponse:
        return agent_pb2.GuestDetailsResponse(
            mem_block_size_bytes=self.sandbox.memory_block_size() if req.mem_block_size else 0,
            agent_details=agent_pb2.AgentDetails(
                version=AGENT_VERSION,
                init_daemon=os.getpid() == 1,
                device_handlers=[],
                storage_handlers=list(DRIVERS),
                supports_seccomp=True,
                extra_features=[],
            ),
            support_mem_hotplug_probe=False,
        )

    @rpc
    async def CreateSandbox(self, req: agent_pb2.CreateSandboxRequest) -> Empty:
        await self.sandbox.create_sandbox(
            req.sandbox_id, req.hostname, list(req.dns), [storage_spec(s) for s in req.storages]
        )
        return Empty()

    @rpc
    async def DestroySandbox(self, req: agent_pb2.DestroySandboxRequest) -> Empty:
        await self.sandbox.destroy_sandbox()
        # The agent exits (and the guest powers off) once this answer is on the wire: the
        # current task is the server's request task, which sends the response before ending.
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(lambda _task: self.sandbox.shutdown.set())
        else:
            self.sandbox.shutdown.set()
        return Empty()

    @rpc
    async def SetPolicy(self, req: agent_pb2.SetPolicyRequest) -> Empty:
        """Reached only when the policy in force allowed this SetPolicyRequest."""
        self.policy = RegoPolicy(req.policy, origin="SetPolicy")
        log.info("policy replaced by SetPolicy")
        return Empty()

    # -- containers --------------------------------------------------------------------------

    @rpc
    async def CreateContainer(self, req: agent_pb2.CreateContainerRequest) -> Empty:
        if not req.HasField("OCI"):
            raise InvalidArgument("CreateContainer without an OCI spec")
        await self.sandbox.create_container(
            req.container_id,
            oci.spec_to_json(req.OCI),
            [storage_spec(s) for s in req.storages],
            init_exec_id=req.exec_id,
            sandbox_pidns=req.sandbox_pidns,
        )
        return Empty()

    @rpc
    async def StartContainer(self, req: agent_pb2.StartContainerRequest) -> Empty:
        await self.sandbox.start_container(req.container_id)
        return Empty()

    @rpc
    async def RemoveContainer(self, req: agent_pb2.RemoveContainerRequest) -> Empty:
        await self.sandbox.remove_container(req.container_id, float(req.timeout) or None)
        return Empty()

    @rpc
    async def ExecProcess(self, req: agent_pb2.ExecProcessRequest) -> Empty:
        if not req.HasField("process"):
            raise InvalidArgument("ExecProcess without a process")
        await self.sandbox.exec_process(
            req.container_id, req.exec_id, oci.process_to_json(req.process)
        )
        return Empty()

    @rpc
    async def SignalProcess(self, req: agent_pb2.SignalProcessRequest) -> Empty:
        await self.sandbox.signal_process(req.container_id, req.exec_id, req.signal)
        return Empty()

    @rpc
    async def WaitProcess(self, req: agent_pb2.WaitProcessRequest) -> agent_pb2.WaitProcessResponse:
        status = await self.sandbox.wait_process(req.container_id, req.exec_id)
        return agent_pb2.WaitProcessResponse(status=status)

    @read_rpc
    async def ReadStdout(self, req: agent_pb2.ReadStreamRequest) -> agent_pb2.ReadStreamResponse:
        data = await self.sandbox.read_stream(req.container_id, req.exec_id, "stdout", req.len)
        return agent_pb2.ReadStreamResponse(data=data)

    @read_rpc
    async def ReadStderr(self, req: agent_pb2.ReadStreamRequest) -> agent_pb2.ReadStreamResponse:
        data = await self.sandbox.read_stream(req.container_id, req.exec_id, "stderr", req.len)
        return agent_pb2.ReadStreamResponse(data=data)

    @rpc
    async def WriteStdin(self, req: agent_pb2.WriteStreamRequest) -> agent_pb2.WriteStreamResponse:
        written = await self.sandbox.write_stdin(req.container_id, req.exec_id, req.data)
        return agent_pb2.WriteStreamResponse(len=written)

    @rpc
    async def CloseStdin(self, req: agent_pb2.CloseStdinRequest) -> Empty:
        self.sandbox.close_stdin(req.container_id, req.exec_id)
        return Empty()

    @rpc
    async def TtyWinResize(self, req: agent_pb2.TtyWinResizeRequest) -> Empty:
        self.sandbox.resize_tty(req.container_id, req.exec_id, req.row, req.column)
        return Empty()

    @rpc
    async def UpdateContainer(self, req: agent_pb2.UpdateContainerRequest) -> Empty:
        await self.sandbox.update_container(req.container_id, oci.resources_to_json(req.resources))
        return Empty()

    @rpc
    async def StatsContainer(
        self, req: agent_pb2.StatsContainerRequest
    ) -> agent_pb2.StatsContainerResponse:
        stats = await self.sandbox.stats_container(req.container_id)
        return stats_to_proto(stats, network_stats())

    @rpc
    async def PauseContainer(self, req: agent_pb2.PauseContainerRequest) -> Empty:
        await self.sandbox.pause_container(req.container_id)
        return Empty()

    @rpc
    async def ResumeContainer(self, req: agent_pb2.ResumeContainerRequest) -> Empty:
        await self.sandbox.resume_container(req.container_id)
        return Empty()

    @rpc
    async def GetOOMEvent(self, req: agent_pb2.GetOOMEventRequest) -> agent_pb2.OOMEvent:
        return agent_pb2.OOMEvent(container_id=await self.sandbox.next_oom_event())

    # -- files, time -------------------------------------------------------------------------

    @rpc
    async def CopyFile(self, req: agent_pb2.CopyFileRequest) -> Empty:
        self.sandbox.copy_file(
            FileCopy(
                path=req.path,
                file_size=req.file_size,
                file_mode=req.file_mode,
                dir_mode=req.dir_mode,
                uid=req.uid,
                gid=req.gid,
                offset=req.offset,
                data=req.data,
            )
        )
        return Empty()

    @rpc
    async def SetGuestDateTime(self, req: agent_pb2.SetGuestDateTimeRequest) -> Empty:
        self.sandbox.set_time(req.Sec, req.Usec)
        return Empty()

    # -- network -----------------------------------------------------------------------------

    @rpc
    async def UpdateInterface(self, req: agent_pb2.UpdateInterfaceRequest) -> types_pb2.Interface:
        updated = await self.network.update_interface(interface_from_proto(req.interface))
        return interface_to_proto(updated)

    @rpc
    async def ListInterfaces(self, req: agent_pb2.ListInterfacesRequest) -> agent_pb2.Interfaces:
        found = await self.network.list_interfaces()
        return agent_pb2.Interfaces(Interfaces=[interface_to_proto(i) for i in found])

    @rpc
    async def UpdateRoutes(self, req: agent_pb2.UpdateRoutesRequest) -> agent_pb2.Routes:
        routes = await self.network.update_routes([route_from_proto(r) for r in req.routes.Routes])
        return routes_to_proto(routes)

    @rpc
    async def ListRoutes(self, req: agent_pb2.ListRoutesRequest) -> agent_pb2.Routes:
        return routes_to_proto(await self.network.list_routes())

    @rpc
    async def AddARPNeighbors(self, req: agent_pb2.AddARPNeighborsRequest) -> Empty:
        await self.network.add_neighbors(
            [
                Neighbor(
                    address=n.toIPAddress.address,
                    device=n.device,
                    lladdr=n.lladdr,
                    state=n.state,
                    flags=n.flags,
                )
                for n in req.neighbors.ARPNeighbors
            ]
        )
        return Empty()
