"""Interop with the real containerd: our ttrpc client and our protos against the Go code.

A TaskExit published through containerd's own ttrpc endpoint (`<grpc address>.ttrpc`,
`containerd.services.events.ttrpc.v1.Events/Forward`) and through gRPC `Publish` must come out
of a gRPC `Subscribe` byte-for-byte: that proves framing, status handling and Any type URLs.
The gRPC `Publish` is the shim's own sender (grpclib), the one a containerd 1.7 daemon uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2

from protocols.api.containerd.events import task_pb2 as events
from protocols.api.containerd.services.events.ttrpc.v1 import events_pb2 as ttrpc_events
from protocols.api.containerd.services.events.v1 import events_pb2 as grpc_events
from protocols.api.containerd.services.events.v1 import events_pb2_grpc as grpc_events_stub
from protocols.api.containerd.types import event_pb2
from protocols.ttrpc import Client, Code, TtrpcError
from shim.daemon.events import Envelope, GrpcEventSender
from tests.support.containerd import Containerd, private_containerd

pytestmark = pytest.mark.integration
VERSIONS = ["2.1.9", "1.7.24"]
NAMESPACE = "coco-test"
TTRPC_EVENTS = "containerd.services.events.ttrpc.v1.Events"


@pytest.fixture(params=VERSIONS)
def containerd(request: pytest.FixtureRequest) -> Iterator[Containerd]:
    with private_containerd(request.param) as cd:
        yield cd


def task_exit(container_id: str) -> events.TaskExit:
    exited = timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_456_789)
    return events.TaskExit(container_id=container_id, id=container_id, pid=4242,
                           exit_status=3, exited_at=exited)


def pack(msg: events.TaskExit | events.TaskOOM) -> any_pb2.Any:
    # containerd's typeurl registry names protobuf events by their bare full name.
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


@contextlib.asynccontextmanager
async def subscription(cd: Containerd) -> AsyncIterator[asyncio.Queue[event_pb2.Envelope]]:
    """Subscribe over gRPC; yields a queue of envelopes once the subscription is live."""
    channel = grpc.aio.insecure_channel(f"unix://{cd.address}")
    stub = grpc_events_stub.EventsStub(channel)
    queue: asyncio.Queue[event_pb2.Envelope] = asyncio.Queue()
    call = stub.Subscribe(grpc_events.SubscribeRequest())

    async def pump() -> None:
        async for envelope in call:
            await queue.put(envelope)

    pumper = asyncio.create_task(pump())
    try:
        # The stream has no "ready" message: publish probes until one comes back.
        probe_id = f"probe-{uuid.uuid4().hex[:8]}"
        async with asyncio.timeout(15):
            while True:
                await publish_grpc(channel, "/tasks/oom", events.TaskOOM(container_id=probe_id))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        while True:
                            env = await queue.get()
                            if env.topic == "/tasks/oom":
                                break
                        break
        while not queue.empty():
            queue.get_nowait()
        yield queue
    finally:
        call.cancel()
        pumper.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await pumper
        await channel.close()


async def publish_grpc(channel: grpc.aio.Channel, topic: str,
                       msg: events.TaskExit | events.TaskOOM) -> None:
    stub = grpc_events_stub.EventsStub(channel)
    await stub.Publish(grpc_events.PublishRequest(topic=topic, event=pack(msg)),
                       metadata=(("containerd-namespace", NAMESPACE),), timeout=5)


async def next_exit(queue: asyncio.Queue[event_pb2.Envelope], cid: str) -> event_pb2.Envelope:
    async with asyncio.timeout(10):
        while True:
            env = await queue.get()
            if env.topic == "/tasks/exit":
                got = events.TaskExit()
                assert env.event.Unpack(got) or got.ParseFromString(env.event.value) is not None
                if got.container_id == cid:
                    return env


async def test_ttrpc_forward_reaches_subscribers(containerd: Containerd) -> None:
    cid = f"fwd-{uuid.uuid4().hex[:8]}"
    sent = task_exit(cid)
    async with subscription(containerd) as queue:
        envelope = event_pb2.Envelope(namespace=NAMESPACE, topic="/tasks/exit", event=pack(sent))
        envelope.timestamp.GetCurrentTime()
        async with await Client.connect_unix(containerd.ttrpc_address) as client:
            reply = await client.call(TTRPC_EVENTS, "Forward",
                                      ttrpc_events.ForwardRequest(envelope=envelope),
                                      empty_pb2.Empty, timeout=5)
        assert reply == empty_pb2.Empty()
        got = await next_exit(queue, cid)
    assert got.namespace == NAMESPACE
    assert got.event.type_url == "containerd.events.TaskExit"
    assert got.timestamp == envelope.timestamp
    received = events.TaskExit()
    received.ParseFromString(got.event.value)
    assert received == sent


async def test_grpc_publish_reaches_subscribers(containerd: Containerd) -> None:
    """The shim's own gRPC sender (grpclib), as a containerd 1.7 daemon publishes events."""
    cid = f"pub-{uuid.uuid4().hex[:8]}"
    sent = task_exit(cid)
    async with subscription(containerd) as queue:
        sender = GrpcEventSender(str(containerd.address))
        try:
            await sender.send(Envelope(time.time_ns(), NAMESPACE, "/tasks/exit", pack(sent)), 5)
        finally:
            await sender.aclose()
        got = await next_exit(queue, cid)
    assert got.namespace == NAMESPACE
    assert got.event.type_url == "containerd.events.TaskExit"
    received = events.TaskExit()
    received.ParseFromString(got.event.value)
    assert received == sent


async def test_ttrpc_errors_carry_go_status_codes(containerd: Containerd) -> None:
    """containerd's Go ttrpc server answers our malformed calls with real status codes."""
    async with await Client.connect_unix(containerd.ttrpc_address) as client:
        with pytest.raises(TtrpcError) as unknown:
            await client.call("containerd.services.nope.v1.Nope", "Forward", empty_pb2.Empty(),
                              empty_pb2.Empty, timeout=5)
        assert unknown.value.code == Code.UNIMPLEMENTED
        with pytest.raises(TtrpcError) as no_method:
            await client.call(TTRPC_EVENTS, "Nope", empty_pb2.Empty(), empty_pb2.Empty,
                              timeout=5)
        assert no_method.value.code == Code.UNIMPLEMENTED
        # An envelope without namespace/topic is refused by containerd's validation.
        with pytest.raises(TtrpcError) as invalid:
            await client.call(TTRPC_EVENTS, "Forward",
                              ttrpc_events.ForwardRequest(envelope=event_pb2.Envelope()),
                              empty_pb2.Empty, timeout=5)
        assert invalid.value.code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND)
        # The connection is still good after errors.
        env = event_pb2.Envelope(namespace=NAMESPACE, topic="/tasks/oom",
                                 event=pack(events.TaskOOM(container_id="x")))
        await client.call(TTRPC_EVENTS, "Forward", ttrpc_events.ForwardRequest(envelope=env),
                          empty_pb2.Empty, timeout=5)
