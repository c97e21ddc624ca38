"""The grpclib transport's own edges: the receive limit, and stopping with calls in flight.

The client is grpcio (a second gRPC implementation, like containerd's grpc-go)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from protocols.api.containerd.task.v3 import shim_pb2 as task_v3
from shim.daemon.grpc_server import (
    MAX_RECEIVE_MESSAGE,
    MAX_STATUS_MESSAGE,
    GrpcServer,
    serve_grpc,
)
from shim.daemon.sandbox_service import SandboxService
from tests.unit.shim.conftest import Harness, make_harness
from tests.unit.shim.helpers import short_listener

NAMESPACE = (("containerd-namespace", "default"),)
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Harness, GrpcServer, str]]:
    h = make_harness(tmp_path)
    with short_listener() as (path, listener):
        server = await serve_grpc(h.tasks, SandboxService(h.pod, "default"), listener)
        try:
            yield h, server, f"unix:{path}"
        finally:
            await server.stop(1.0)
            await h.aclose()


async def test_requests_above_the_receive_limit_are_resource_exhausted(
        served: tuple[Harness, GrpcServer, str]) -> None:
    h, _, address = served
    async with grpc.aio.insecure_channel(address) as channel:
        create = channel.unary_unary("/containerd.task.v3.Task/Create",
                                     request_serializer=task_v3.CreateTaskRequest.SerializeToString,
                                     response_deserializer=task_v3.CreateTaskResponse.FromString)
        big = task_v3.CreateTaskRequest(id="c1", bundle="b" * MAX_RECEIVE_MESSAGE)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await create(big, metadata=NAMESPACE)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"vs. {MAX_RECEIVE_MESSAGE})" in (caught.value.details() or "")
        assert not h.booter.configs
        # Just under the limit is an ordinary request (here: no such task).
        state = channel.unary_unary("/containerd.task.v3.Task/State",
                                    request_serializer=task_v3.StateRequest.SerializeToString,
                                    response_deserializer=task_v3.StateResponse.FromString)
        near = task_v3.StateRequest(id="x" * (MAX_RECEIVE_MESSAGE - 8))
        assert near.ByteSize() <= MAX_RECEIVE_MESSAGE
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await state(near, metadata=NAMESPACE)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        # Its error text (echoing the 4 MiB id) is cut to fit a trailer a client accepts.
        details = caught.value.details() or ""
        assert details.endswith("... (truncated)")
        assert len(details) == MAX_STATUS_MESSAGE + len("... (truncated)")


async def test_stop_cancels_a_long_poll_and_returns_within_its_grace(
        served: tuple[Harness, GrpcServer, str]) -> None:
    h, server, address = served
    async with grpc.aio.insecure_channel(address) as channel:
        def method(name: str, response: Any) -> grpc.aio.UnaryUnaryMultiCallable:
            return channel.unary_unary(f"/containerd.task.v3.Task/{name}",
                                       request_serializer=lambda m: m.SerializeToString(),
                                       response_deserializer=response.FromString)

        await method("Create", task_v3.CreateTaskResponse)(
            task_v3.CreateTaskRequest(id="c1", bundle=str(h.bundle("c1"))), metadata=NAMESPACE)
        await method("Start", task_v3.StartResponse)(task_v3.StartRequest(id="c1"),
                                                     metadata=NAMESPACE)
        wait = asyncio.ensure_future(method("Wait", task_v3.WaitResponse)(
            task_v3.WaitRequest(id="c1"), metadata=NAMESPACE))
        await asyncio.sleep(0.1)
        assert not wait.done()  # a long poll: only the task's exit ends it
        began = time.monotonic()
        await server.stop(5.0)
        assert time.monotonic() - began < 1.0  # cancelled, not waited out
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(wait, 5)
        assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE,
                                       grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def test_the_daemon_runs_without_grpcio() -> None:
    """grpcio is a dev dependency only: a gRPC daemon's modules (server, event sender, boot
    machinery) import none of it, and the runtime dependencies do not list it."""
    probe = ("import sys\n"
             "import shim.daemon.main, shim.daemon.grpc_server, shim.daemon.events, "
             "shim.pod.boot, grpclib.client\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'grpc_tools')"
             " or m.endswith('_pb2_grpc')))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True, cwd=REPO)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("grpcio")]
    assert [d for d in project["dependencies"] if d.startswith("grpclib")]
