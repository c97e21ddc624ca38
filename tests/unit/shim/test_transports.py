"""Every task RPC through both transports (our grpclib and ttrpc servers on unix sockets; the
gRPC client is grpcio, a second implementation like containerd's grpc-go)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, empty_pb2

from protocols.api.containerd.task.v2 import shim_pb2 as task_v2
from protocols.api.containerd.task.v3 import shim_pb2 as task_v3
from protocols.api.containerd.task.v3 import shim_pb2_grpc as task_v3_grpc
from protocols.api.containerd.types.task import task_pb2 as task_types
from protocols.api.runtimeoptions.v1 import api_pb2 as runtimeoptions
from protocols.ttrpc import Client, TtrpcError
from shim.core import errors
from shim.daemon.grpc_server import serve_grpc
from shim.daemon.sandbox_service import SandboxService
from shim.daemon.ttrpc_server import serve_ttrpc
from tests.unit.shim.conftest import Harness, make_harness
from tests.unit.shim.helpers import make_fifos, read_to_eof

RESPONSES = {
    "State": "StateResponse", "Create": "CreateTaskResponse", "Start": "StartResponse",
    "Delete": "DeleteResponse", "Pids": "PidsResponse", "Wait": "WaitResponse",
    "Stats": "StatsResponse", "Connect": "ConnectResponse",
}

Call = Callable[[str, Any], Coroutine[Any, Any, Any]]


class RpcFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


@pytest.fixture(params=["grpc-v3", "ttrpc-v3", "ttrpc-v2"])
async def wire(request: pytest.FixtureRequest,
               tmp_path: Path) -> AsyncIterator[tuple[Harness, ModuleType, Call]]:
    pod = make_harness(tmp_path)
    sandbox = SandboxService(pod.pod, "default")
    short = Path(tempfile.mkdtemp(prefix="cs", dir="/tmp"))
    path = short / "task.sock"
    pb = task_v2 if request.param == "ttrpc-v2" else task_v3
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    if request.param.startswith("grpc"):
        server: Any = await serve_grpc(pod.tasks, sandbox, listener)
        channel = grpc.aio.insecure_channel(f"unix:{path}")
        stub = task_v3_grpc.TaskStub(channel)

        async def call(method: str, req: Any) -> Any:
            try:
                return await getattr(stub, method)(req, metadata=(("containerd-namespace",
                                                                    "default"),))
            except grpc.aio.AioRpcError as err:
                raise RpcFailed(err.code().value[0], err.details() or "") from err

        yield pod, pb, call
        await channel.close()
        await server.stop(0)
    else:
        server = await serve_ttrpc(pod.tasks, sandbox, listener)
        client = await Client.connect_unix(path)
        service = f"{pb.DESCRIPTOR.package}.Task"

        async def call(method: str, req: Any) -> Any:
            response = getattr(pb, RESPONSES[method]) if method in RESPONSES else empty_pb2.Empty
            try:
                return await client.call(service, method, req, response,
                                         metadata={"containerd-namespace-ttrpc": "default"})
            except TtrpcError as err:
                raise RpcFailed(int(err.code), err.message) from err

        yield pod, pb, call
        await client.close()
        await server.close()
    await pod.aclose()
    shutil.rmtree(short)


async def expect(code: grpc.StatusCode, call: Awaitable[Any]) -> str:
    with pytest.raises(RpcFailed) as caught:
        await call
    assert caught.value.code == code.value[0], caught.value.message
    return caught.value.message


async def test_every_rpc(wire: tuple[Harness, ModuleType, Call], tmp_path: Path) -> None:
    pod, pb, call = wire
    connected = await call("Connect", pb.ConnectRequest(id="c1"))
    assert (connected.shim_pid, connected.task_pid) == (os.getpid(), 0)
    assert connected.version.startswith("coco-shim ")

    fifos = make_fifos(tmp_path)
    out = asyncio.create_task(read_to_eof(fifos.stdout))
    options = runtimeoptions.Options(config_path="/etc/coco/qemu-snp.toml")
    created = await call("Create", pb.CreateTaskRequest(
        id="c1", bundle=str(pod.bundle("c1")), stdout=str(fifos.stdout),
        stdin=str(fifos.stdin),
        options=any_pb2.Any(type_url="runtimeoptions.v1.Options",
                            value=options.SerializeToString())))
    assert created.pid == 4242
    assert pod.booter.configs[0].options.config_path == "/etc/coco/qemu-snp.toml"
    await expect(grpc.StatusCode.ALREADY_EXISTS, call("Create", pb.CreateTaskRequest(
        id="c1", bundle=str(pod.bundle("c1")))))
    state = await call("State", pb.StateRequest(id="c1"))
    assert (state.status, state.pid, state.stdout, state.bundle) == (
        task_types.CREATED, 4242, str(fifos.stdout), str(pod.root / "c1"))
    wait = asyncio.create_task(call("Wait", pb.WaitRequest(id="c1")))
    assert (await call("Start", pb.StartRequest(id="c1"))).pid == 4242
    message = await expect(grpc.StatusCode.FAILED_PRECONDITION,
                           call("Start", pb.StartRequest(id="c1")))
    assert message == "cannot start in state running"
    await expect(grpc.StatusCode.NOT_FOUND, call("State", pb.StateRequest(id="nope")))
    await expect(grpc.StatusCode.UNIMPLEMENTED,
                 call("Checkpoint", pb.CheckpointTaskRequest(id="c1")))

    spec = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                       value=json.dumps({"args": ["ls"], "terminal": True}).encode())
    await call("Exec", pb.ExecProcessRequest(id="c1", exec_id="e1", terminal=True, spec=spec))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, call("Exec", pb.ExecProcessRequest(
        id="c1", exec_id="e2", spec=any_pb2.Any(type_url="x", value=b"{not json"))))
    assert (await call("Start", pb.StartRequest(id="c1", exec_id="e1"))).pid == 4242
    exec_state = await call("State", pb.StateRequest(id="c1", exec_id="e1"))
    assert (exec_state.status, exec_state.exec_id, exec_state.terminal) == (
        task_types.RUNNING, "e1", True)
    await call("ResizePty", pb.ResizePtyRequest(id="c1", exec_id="e1", width=120, height=40))
    assert pod.agent.process("c1", "e1").resizes == [(40, 120)]
    await call("CloseIO", pb.CloseIORequest(id="c1", exec_id="e1", stdin=True))
    await call("Kill", pb.KillRequest(id="c1", exec_id="e1", signal=15))
    exec_exit = await call("Wait", pb.WaitRequest(id="c1", exec_id="e1"))
    assert exec_exit.exit_status == 143
    assert exec_exit.exited_at.ToNanoseconds() == 1_700_000_000_123_456_789
    await call("Delete", pb.DeleteRequest(id="c1", exec_id="e1"))

    pids = await call("Pids", pb.PidsRequest(id="c1"))
    assert [p.pid for p in pids.processes] == [4242]
    await call("Pause", pb.PauseRequest(id="c1"))
    assert (await call("State", pb.StateRequest(id="c1"))).status == task_types.PAUSED
    await call("Resume", pb.ResumeRequest(id="c1"))
    resources = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/"
                            "LinuxResources", value=b'{"memory": {"limit": 1048576}}')
    await call("Update", pb.UpdateTaskRequest(id="c1", resources=resources))
    [(cid, converted)] = pod.agent.updates
    assert (cid, converted.Memory.Limit) == ("c1", 1048576)
    stats = await call("Stats", pb.StatsRequest(id="c1"))
    assert stats.stats.type_url == "io.containerd.cgroups.v2.Metrics"
    connected = await call("Connect", pb.ConnectRequest(id="c1"))
    assert connected.task_pid == 4242

    await pod.agent.process("c1").stdout.feed(b"hello from the guest\n")
    await call("Kill", pb.KillRequest(id="c1", signal=9, all=True))
    exited = await wait
    assert exited.exit_status == 137
    assert exited.exited_at.ToNanoseconds() == 1_700_000_000_123_456_789
    assert await out == b"hello from the guest\n"
    await expect(grpc.StatusCode.NOT_FOUND, call("Kill", pb.KillRequest(id="c1", signal=9)))
    deleted = await call("Delete", pb.DeleteRequest(id="c1"))
    assert (deleted.pid, deleted.exit_status) == (4242, 137)
    assert deleted.exited_at.ToNanoseconds() == 1_700_000_000_123_456_789
    await call("Shutdown", pb.ShutdownRequest(id="c1"))
    assert pod.pod.shutdown_requested.is_set()
    assert pod.publisher.topics() == [
        "/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started",
        "/tasks/exit", "/tasks/paused", "/tasks/resumed", "/tasks/exit", "/tasks/delete"]


async def test_wait_is_served_concurrently_with_other_calls(
        wire: tuple[Harness, ModuleType, Call]) -> None:
    pod, pb, call = wire
    await call("Create", pb.CreateTaskRequest(id="c1", bundle=str(pod.bundle("c1"))))
    await call("Start", pb.StartRequest(id="c1"))
    waits = [asyncio.create_task(call("Wait", pb.WaitRequest(id="c1"))) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert (await call("State", pb.StateRequest(id="c1"))).status == task_types.RUNNING
    assert not any(w.done() for w in waits)
    await call("Kill", pb.KillRequest(id="c1", signal=15))
    assert [w.exit_status for w in await asyncio.gather(*waits)] == [143, 143, 143]


async def test_malformed_requests_are_invalid_argument(
        wire: tuple[Harness, ModuleType, Call]) -> None:
    """Bad input at the edge names the field and is INVALID_ARGUMENT, never UNKNOWN."""
    pod, pb, call = wire
    bad_options = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=b"\x12\xff")
    message = await expect(grpc.StatusCode.INVALID_ARGUMENT, call("Create", pb.CreateTaskRequest(
        id="c1", bundle=str(pod.bundle("c1")), options=bad_options)))
    assert "runtimeoptions.v1.Options" in message
    odd = pod.bundle("odd")
    (odd / "config.json").write_text(json.dumps({"linux": {"namespaces": ["network"]}}))
    message = await expect(grpc.StatusCode.INVALID_ARGUMENT, call("Create", pb.CreateTaskRequest(
        id="odd", bundle=str(odd))))
    assert "linux.namespaces[0]" in message
    huge = pod.bundle("huge")
    (huge / "config.json").write_text(json.dumps({"process": {"user": {"uid": 1 << 40}}}))
    message = await expect(grpc.StatusCode.INVALID_ARGUMENT, call("Create", pb.CreateTaskRequest(
        id="huge", bundle=str(huge))))
    assert "process.user.uid" in message and "out of range" in message
    with pytest.raises(RpcFailed):  # none of them left a container behind
        await call("State", pb.StateRequest(id="odd"))


async def test_an_agent_status_reaches_containerd_with_its_code(
        wire: tuple[Harness, ModuleType, Call]) -> None:
    """A policy denial in the guest is PERMISSION_DENIED at containerd, with its message."""
    pod, pb, call = wire
    await call("Create", pb.CreateTaskRequest(id="c1", bundle=str(pod.bundle("c1"))))

    async def denied(container_id: str) -> None:
        raise errors.PermissionDenied("agent StartContainer: StartContainerRequest is blocked "
                                      "by the agent policy")

    pod.agent.start_container = denied  # type: ignore[method-assign]
    message = await expect(grpc.StatusCode.PERMISSION_DENIED,
                           call("Start", pb.StartRequest(id="c1")))
    assert "blocked by the agent policy" in message


def test_connect_reports_the_installed_version() -> None:
    from importlib.metadata import version

    from shim.daemon.task_service import shim_version

    assert shim_version() == f"coco-shim {version('coco-shim')}"
