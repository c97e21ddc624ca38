"""Bytes that are not the request's message are INVALID_ARGUMENT on both transports (grpcio's
own deserializer failure would be UNKNOWN), and nothing is created."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, empty_pb2, wrappers_pb2

from protocols.api.containerd.task.v3 import shim_pb2 as task_v3
from protocols.status import Code
from protocols.ttrpc import Client, TtrpcError
from shim.daemon.grpc_server import serve_grpc
from shim.daemon.sandbox_service import SandboxService
from shim.daemon.ttrpc_server import serve_ttrpc
from tests.unit.shim.conftest import make_harness
from tests.unit.shim.helpers import short_listener

GARBAGE = b"\x0a\xff"  # field 1, length 255, then nothing: not a message
# Field 1 (every task request's string id) holding bytes that are not UTF-8.
NOT_UTF8 = wrappers_pb2.BytesValue(value=b"\xff\xfe")


@pytest.mark.parametrize("method", ["Create", "State", "Kill"])
async def test_grpc(tmp_path: Path, method: str) -> None:
    h = make_harness(tmp_path)
    with short_listener() as (path, listener):
        server = await serve_grpc(h.tasks, SandboxService(h.pod, "default"), listener)
        try:
            async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
                call = channel.unary_unary(f"/containerd.task.v3.Task/{method}",
                                           request_serializer=lambda raw: raw,
                                           response_deserializer=lambda raw: raw)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(GARBAGE)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            details = caught.value.details() or ""
            assert f"{method}: request is not a containerd.task.v3." in details
            assert not h.booter.configs
        finally:
            await server.stop(0)
            await h.aclose()


async def test_ttrpc(tmp_path: Path) -> None:
    h = make_harness(tmp_path)
    with short_listener() as (path, listener):
        server = await serve_ttrpc(h.tasks, SandboxService(h.pod, "default"), listener)
        client = await Client.connect_unix(path)
        try:
            with pytest.raises(TtrpcError) as caught:
                await client.call("containerd.task.v3.Task", "Create", NOT_UTF8,
                                  task_v3.CreateTaskResponse)
            assert caught.value.code is Code.INVALID_ARGUMENT
            assert not h.booter.configs
        finally:
            await client.close()
            await server.close()
            await h.aclose()


# Found by `make fuzz`'s structured run: json.loads recurses once per nesting level, so an exec
# spec or resources of a few thousand `[` left the edge as a RecursionError (status UNKNOWN).
@pytest.mark.parametrize("method", ["Exec", "Update"])
async def test_deeply_nested_json_is_invalid_argument(tmp_path: Path, method: str) -> None:
    h = make_harness(tmp_path)
    with short_listener() as (path, listener):
        server = await serve_ttrpc(h.tasks, SandboxService(h.pod, "default"), listener)
        client = await Client.connect_unix(path)
        nested = any_pb2.Any(type_url="x", value=b"[" * 50000 + b"]" * 50000)
        request = (task_v3.ExecProcessRequest(id="c", exec_id="e", spec=nested) if method == "Exec"
                   else task_v3.UpdateTaskRequest(id="c", resources=nested))
        try:
            with pytest.raises(TtrpcError) as caught:
                await client.call("containerd.task.v3.Task", method, request, empty_pb2.Empty)
            assert caught.value.code is Code.INVALID_ARGUMENT
            assert "nested too deeply" in caught.value.message
        finally:
            await client.close()
            await server.close()
            await h.aclose()
