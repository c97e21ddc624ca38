"""Client and server talking over a real unix socket."""

from __future__ import annotations

import asyncio
import socket
import stat
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, wrappers_pb2
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import BytesValue, StringValue

from protocols.ttrpc import (
    MAX_DATA_LENGTH,
    Client,
    Code,
    ConnectionClosed,
    RequestContext,
    Server,
    TtrpcError,
)

from .conftest import Served
from .helpers import SERVICE, EchoService


async def test_unary_call(client: Client) -> None:
    reply = await client.call(SERVICE, "Echo", StringValue(value="hello"), StringValue)
    assert reply == StringValue(value="hello")


async def test_metadata_and_namespace_reach_the_handler(served: Served, client: Client) -> None:
    await client.call(
        SERVICE,
        "Context",
        Empty(),
        Empty,
        metadata={"containerd-namespace-ttrpc": "k8s.io", "X-Trace": ["a", "b"]},
    )
    (ctx,) = served.service.contexts
    assert (ctx.service, ctx.method) == (SERVICE, "Context")
    assert ctx.namespace == "k8s.io"
    assert ctx.metadata == {"containerd-namespace-ttrpc": ["k8s.io"], "x-trace": ["a", "b"]}
    assert ctx.deadline is None


async def test_timeout_travels_as_the_handler_deadline(served: Served, client: Client) -> None:
    before = asyncio.get_running_loop().time()
    await client.call(SERVICE, "Context", Empty(), Empty, timeout=5)
    (ctx,) = served.service.contexts
    assert ctx.namespace is None
    assert ctx.deadline is not None
    assert before + 4 < ctx.deadline <= asyncio.get_running_loop().time() + 5


async def test_pending_call_does_not_block_others(served: Served, client: Client) -> None:
    slow = asyncio.create_task(client.call(SERVICE, "Hang", Empty(), Empty))
    await served.service.hang_started.wait()
    fast = await client.call(SERVICE, "Echo", StringValue(value="fast"), StringValue, timeout=2)
    assert fast.value == "fast"
    assert not slow.done()
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow


async def test_client_timeout_raises_deadline_exceeded_and_connection_survives(
    served: Served, client: Client
) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call(SERVICE, "Hang", Empty(), Empty, timeout=0.1)
    assert info.value.code is Code.DEADLINE_EXCEEDED
    # the server got the same deadline and cancelled its handler
    await asyncio.wait_for(served.service.hang_cancelled.wait(), 2)
    reply = await client.call(SERVICE, "Echo", StringValue(value="still here"), StringValue)
    assert reply.value == "still here"
    assert not client.closed


async def test_non_positive_timeout_fails_without_sending(client: Client) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call(SERVICE, "Echo", StringValue(), StringValue, timeout=0)
    assert info.value.code is Code.DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    "code",
    [
        Code.NOT_FOUND,
        Code.ALREADY_EXISTS,
        Code.FAILED_PRECONDITION,
        Code.INVALID_ARGUMENT,
        Code.UNAVAILABLE,
        Code.DEADLINE_EXCEEDED,
    ],
)
async def test_error_codes_round_trip(client: Client, code: Code) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call(SERVICE, "Fail", StringValue(value=f"{code.name}:container x"), Empty)
    assert (info.value.code, info.value.message) == (code, "container x")
    assert str(info.value) == f"{code.name}: container x"


async def test_unexpected_exception_is_unknown_with_its_message(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call(SERVICE, "Crash", Empty(), Empty)
    assert (info.value.code, info.value.message) == (Code.UNKNOWN, "boom")
    assert "Crash raised" in caplog.text


async def test_unknown_service_and_method_are_unimplemented(client: Client) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call("nope.v1.Nope", "Echo", Empty(), Empty)
    assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "service nope.v1.Nope")
    with pytest.raises(TtrpcError) as info:
        await client.call(SERVICE, "Nope", Empty(), Empty)
    assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "method Nope")


async def test_undecodable_payload_is_invalid_argument(client: Client) -> None:
    # field 1 as bytes that are not UTF-8: StringValue refuses them
    with pytest.raises(TtrpcError) as info:
        await client.call(SERVICE, "Echo", BytesValue(value=b"\xff\xfe"), StringValue)
    assert info.value.code is Code.INVALID_ARGUMENT
    assert info.value.message.startswith(f"{SERVICE}/Echo: bad request")


async def test_oversized_request_is_refused_locally(client: Client) -> None:
    with pytest.raises(TtrpcError) as info:
        await client.call(SERVICE, "Echo", StringValue(value="x" * MAX_DATA_LENGTH), StringValue)
    assert info.value.code is Code.RESOURCE_EXHAUSTED
    assert (await client.call(SERVICE, "Echo", StringValue(value="ok"), StringValue)).value == "ok"


async def test_oversized_response_becomes_resource_exhausted(
    served: Served, client: Client
) -> None:
    served.service.big_reply = MAX_DATA_LENGTH
    with pytest.raises(TtrpcError) as info:
        await client.call(SERVICE, "Big", Empty(), StringValue)
    assert info.value.code is Code.RESOURCE_EXHAUSTED
    assert "exceed maximum message size of 4194304" in info.value.message
    served.service.big_reply = MAX_DATA_LENGTH - 16  # fits with envelope overhead
    reply = await client.call(SERVICE, "Big", Empty(), StringValue)
    assert len(reply.value) == MAX_DATA_LENGTH - 16


async def test_hundred_concurrent_calls(client: Client) -> None:
    replies = await asyncio.gather(
        *(
            client.call(SERVICE, "Sleep", StringValue(value=f"0.0{i % 10}"), StringValue)
            for i in range(100)
        )
    )
    assert [r.value for r in replies] == [f"0.0{i % 10}" for i in range(100)]


async def test_server_close_cancels_handlers_and_fails_pending_calls(
    served: Served, client: Client
) -> None:
    pending = asyncio.create_task(client.call(SERVICE, "Hang", Empty(), Empty))
    await served.service.hang_started.wait()
    await served.server.close()
    assert served.service.hang_cancelled.is_set()
    with pytest.raises(ConnectionClosed):
        await pending
    assert not served.path.exists()
    with pytest.raises(ConnectionClosed):
        await client.call(SERVICE, "Echo", StringValue(), StringValue)


async def test_client_close_fails_pending_calls(served: Served, client: Client) -> None:
    pending = asyncio.create_task(client.call(SERVICE, "Hang", Empty(), Empty))
    await served.service.hang_started.wait()
    await client.close()
    with pytest.raises(ConnectionClosed):
        await pending
    await client.close()  # idempotent
    assert client.closed
    # the server noticed the disconnect and cancelled the handler
    await asyncio.wait_for(served.service.hang_cancelled.wait(), 2)


async def test_in_flight_limit_answers_resource_exhausted(socket_dir: Path) -> None:
    server = Server(max_in_flight=2)
    hold = asyncio.Event()

    async def wait(request: Empty, ctx: RequestContext) -> Empty:
        await hold.wait()
        return Empty()

    server.register(SERVICE, "Wait", Empty, wait)
    await server.serve_unix(socket_dir / "limit.sock")
    try:
        async with await Client.connect_unix(socket_dir / "limit.sock") as client:
            waits = [
                asyncio.create_task(client.call(SERVICE, "Wait", Empty(), Empty)) for _ in range(2)
            ]
            await asyncio.sleep(0.05)
            with pytest.raises(TtrpcError) as info:
                await client.call(SERVICE, "Wait", Empty(), Empty)
            assert info.value.code is Code.RESOURCE_EXHAUSTED
            hold.set()
            await asyncio.gather(*waits)
            await client.call(SERVICE, "Wait", Empty(), Empty)  # capacity is back
    finally:
        await server.close()


async def test_serve_unix_sets_mode_and_replaces_a_stale_socket(socket_dir: Path) -> None:
    path = socket_dir / "mode.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # what a crashed predecessor leaves behind
        dead.bind(str(path))
    server = Server()
    EchoService().install(server)
    await server.serve_unix(path, mode=0o660)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        async with await Client.connect_unix(path) as client:
            assert (await client.call(SERVICE, "Echo", StringValue(), StringValue)) == StringValue()
    finally:
        await server.close()
    assert not path.exists()


async def test_close_leaves_a_successors_socket_file_alone(socket_dir: Path) -> None:
    path = socket_dir / "handover.sock"
    old, new = Server(), Server()
    await old.serve_unix(path)
    path.unlink()
    await new.serve_unix(path)
    await old.close()
    assert path.exists()
    await new.close()
    assert not path.exists()


async def test_serve_unix_refuses_to_replace_a_regular_file(socket_dir: Path) -> None:
    path = socket_dir / "file"
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        await Server().serve_unix(path)
    assert path.read_text() == "not a socket"


# -- register_service ---------------------------------------------------------------------------


def _echo_service_descriptor() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    proto = descriptor_pb2.FileDescriptorProto(
        name="test/echo.proto", package="test.v2", dependency=["google/protobuf/wrappers.proto"]
    )
    service = proto.service.add(name="Echo")
    for name in ("Say", "Shout"):
        service.method.add(
            name=name,
            input_type=".google.protobuf.StringValue",
            output_type=".google.protobuf.StringValue",
        )
    pool.Add(proto)
    return pool


class _SayOnly:
    async def Say(self, request: Message, ctx: RequestContext) -> Message:
        assert isinstance(request, Message)
        text = getattr(request, "value")  # noqa: B009 - a class built from the pool
        return StringValue(value=f"said {text}")


async def test_register_service_binds_async_methods_by_rpc_name(socket_dir: Path) -> None:
    descriptor = _echo_service_descriptor().FindServiceByName("test.v2.Echo")
    server = Server()
    server.register_service(descriptor, _SayOnly())
    await server.serve_unix(socket_dir / "svc.sock")
    try:
        async with await Client.connect_unix(socket_dir / "svc.sock") as client:
            reply = await client.call("test.v2.Echo", "Say", StringValue(value="hi"), StringValue)
            assert reply.value == "said hi"
            with pytest.raises(TtrpcError) as info:
                await client.call("test.v2.Echo", "Shout", StringValue(), StringValue)
            assert (info.value.code, info.value.message) == (Code.UNIMPLEMENTED, "method Shout")
    finally:
        await server.close()


def test_register_service_rejects_sync_methods() -> None:
    class Sync:
        def Say(self, request: Message, ctx: RequestContext) -> Message:
            return request

    descriptor = _echo_service_descriptor().FindServiceByName("test.v2.Echo")
    with pytest.raises(TypeError, match="must be an async method"):
        Server().register_service(descriptor, Sync())


def test_register_twice_is_an_error() -> None:
    server = Server()

    async def handler(request: Empty, ctx: RequestContext) -> Empty:
        return request

    server.register(SERVICE, "X", Empty, handler)
    with pytest.raises(ValueError, match="already registered"):
        server.register(SERVICE, "X", Empty, handler)


async def test_stray_cancellation_inside_a_handler_is_answered_cancelled(
    served: Served, client: Client
) -> None:
    async def awaits_cancelled_future(request: Empty, ctx: RequestContext) -> Empty:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.cancel()
        await future  # CancelledError that is not a cancellation of this handler
        return Empty()

    served.server.register(SERVICE, "Stray", Empty, awaits_cancelled_future)
    with pytest.raises(TtrpcError) as info:
        await client.call(SERVICE, "Stray", Empty(), Empty)
    assert info.value.code is Code.CANCELLED
    assert (await client.call(SERVICE, "Echo", StringValue(value="on"), StringValue)).value == "on"


# -- register_pending ---------------------------------------------------------------------------

PENDING = "test.Pending"


async def test_a_pending_services_calls_wait_then_run_on_what_is_registered(
    socket_dir: Path,
) -> None:
    server = Server()
    ready = asyncio.Event()
    server.register_pending(PENDING, ready.wait)
    EchoService().install(server)
    await server.serve_unix(socket_dir / "pending.sock")
    try:
        async with await Client.connect_unix(socket_dir / "pending.sock") as client:
            early = asyncio.create_task(
                client.call(PENDING, "Echo", StringValue(value="early"), StringValue))
            # other services are served meanwhile; an unknown one is refused at once
            assert (await client.call(SERVICE, "Echo", StringValue(value="x"), StringValue)
                    ) == StringValue(value="x")
            with pytest.raises(TtrpcError) as unknown:
                await client.call("test.Other", "Echo", StringValue(), StringValue)
            assert unknown.value.code is Code.UNIMPLEMENTED
            assert not early.done()

            async def echo(request: StringValue, ctx: RequestContext) -> StringValue:
                return StringValue(value=f"{ctx.service}/{ctx.method} {request.value}")

            server.register(PENDING, "Echo", StringValue, echo)
            ready.set()
            assert (await early).value == f"{PENDING}/Echo early"
            assert (await client.call(PENDING, "Echo", StringValue(value="late"), StringValue)
                    ).value == f"{PENDING}/Echo late"
            with pytest.raises(TtrpcError) as missing:  # still not registered once ready
                await client.call(PENDING, "Missing", StringValue(), StringValue)
            assert missing.value.code is Code.UNIMPLEMENTED
            assert missing.value.message == "method Missing"
    finally:
        await server.close()


async def test_a_pending_services_wait_failing_is_every_calls_answer(socket_dir: Path) -> None:
    server = Server()
    failed = asyncio.Event()

    async def wait() -> None:
        await failed.wait()
        raise TtrpcError(Code.FAILED_PRECONDITION, "guest failed to start: a boot step")

    server.register_pending(PENDING, wait)
    await server.serve_unix(socket_dir / "failing.sock")
    try:
        async with await Client.connect_unix(socket_dir / "failing.sock") as client:
            calls = [asyncio.create_task(client.call(PENDING, m, Empty(), Empty))
                     for m in ("A", "B")]
            await asyncio.sleep(0.02)
            assert not any(call.done() for call in calls)
            failed.set()
            for call in calls:
                with pytest.raises(TtrpcError) as info:
                    await call
                assert info.value.code is Code.FAILED_PRECONDITION
                assert info.value.message == "guest failed to start: a boot step"
    finally:
        await server.close()


async def test_a_call_waiting_for_a_pending_service_keeps_its_deadline(socket_dir: Path) -> None:
    server = Server()
    given_up = asyncio.Event()

    async def wait() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            given_up.set()
            raise

    server.register_pending(PENDING, wait)
    await server.serve_unix(socket_dir / "deadline.sock")
    try:
        async with await Client.connect_unix(socket_dir / "deadline.sock") as client:
            with pytest.raises(TtrpcError) as info:
                await client.call(PENDING, "Echo", Empty(), Empty, timeout=0.05)
            assert info.value.code is Code.DEADLINE_EXCEEDED
            # the server's deadline ended the wait (the client is still connected)
            await asyncio.wait_for(given_up.wait(), 2)
    finally:
        await server.close()
