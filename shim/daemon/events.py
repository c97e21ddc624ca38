"""Task events on their way to containerd: protobuf messages, envelopes, delivery.

The domain (:mod:`shim.task.events`) publishes small dataclasses in the order things happened.
``EventForwarder`` keeps
that order: one bounded queue, one forwarder task, each event retried in place a bounded number
of times (the Go shim: 5 s per try, 5 tries) before it is dropped and logged, so a slow or absent
containerd delays events but never reorders them and never blocks the shim forever.

Two senders: ttrpc ``containerd.services.events.ttrpc.v1.Events/Forward`` at ``TTRPC_ADDRESS``
(what the Go shims use) and gRPC ``containerd.services.events.v1.Events/Publish`` at
``GRPC_ADDRESS`` (namespace in the ``containerd-namespace`` metadata).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import Message

from protocols.api.containerd.events import task_pb2
from shim.core import trace
from shim.core.timeouts import TIMEOUTS, Timeouts
from shim.task.events import (
    Event,
    Stdio,
    TaskCreate,
    TaskDelete,
    TaskExecAdded,
    TaskExecStarted,
    TaskExit,
    TaskOOM,
    TaskPaused,
    TaskResumed,
    TaskStart,
)

log = logging.getLogger(__name__)

QUEUE_SIZE = 128


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    """A Timestamp from nanoseconds since the epoch (0 → the empty Timestamp)."""
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


# --- the domain's events as containerd's ---------------------------------------------------


def _io(io: Stdio) -> task_pb2.TaskIO:
    return task_pb2.TaskIO(stdin=io.stdin, stdout=io.stdout, stderr=io.stderr,
                           terminal=io.terminal)


def to_proto(event: Event) -> Message:
    """The containerd.events message for a domain event."""
    match event:
        case TaskCreate():
            return task_pb2.TaskCreate(container_id=event.container_id, bundle=event.bundle,
                                       pid=event.pid, io=_io(event.io))
        case TaskStart():
            return task_pb2.TaskStart(container_id=event.container_id, pid=event.pid)
        case TaskExit():
            return task_pb2.TaskExit(container_id=event.container_id, id=event.id,
                                     pid=event.pid, exit_status=event.exit_status,
                                     exited_at=timestamp(event.exited_at))
        case TaskDelete():
            return task_pb2.TaskDelete(container_id=event.container_id, pid=event.pid,
                                       exit_status=event.exit_status,
                                       exited_at=timestamp(event.exited_at), id=event.id)
        case TaskExecAdded():
            return task_pb2.TaskExecAdded(container_id=event.container_id,
                                          exec_id=event.exec_id)
        case TaskExecStarted():
            return task_pb2.TaskExecStarted(container_id=event.container_id,
                                            exec_id=event.exec_id, pid=event.pid)
        case TaskPaused():
            return task_pb2.TaskPaused(container_id=event.container_id)
        case TaskResumed():
            return task_pb2.TaskResumed(container_id=event.container_id)
        case TaskOOM():
            return task_pb2.TaskOOM(container_id=event.container_id)
    raise TypeError(f"not a task event: {event!r}")


# --- the wire -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    """containerd.types.Envelope, before encoding."""

    timestamp: int  # ns
    namespace: str
    topic: str
    event: any_pb2.Any


def envelope(event: Event, namespace: str, now_ns: int | None = None) -> Envelope:
    message = to_proto(event)
    # containerd's typeurl registers events under their bare full name.
    packed = any_pb2.Any(type_url=message.DESCRIPTOR.full_name,
                         value=message.SerializeToString())
    return Envelope(time.time_ns() if now_ns is None else now_ns, namespace, event.topic, packed)


class EventSender(Protocol):
    """One delivery attempt of one envelope; raises on failure. ``aclose`` drops connections."""

    async def send(self, envelope: Envelope, timeout: float) -> None: ...  # noqa: ASYNC109

    async def aclose(self) -> None: ...


class TtrpcEventSender:
    """``Events/Forward`` over ttrpc at TTRPC_ADDRESS; reconnects after a failed attempt."""

    SERVICE = "containerd.services.events.ttrpc.v1.Events"

    def __init__(self, address: str) -> None:
        self._address = address.removeprefix("unix://")
        self._client: object | None = None

    async def send(self, envelope: Envelope, timeout: float) -> None:  # noqa: ASYNC109
        from google.protobuf import empty_pb2

        from protocols.api.containerd.services.events.ttrpc.v1 import events_pb2
        from protocols.api.containerd.types import event_pb2
        from protocols.ttrpc import Client

        request = events_pb2.ForwardRequest(envelope=event_pb2.Envelope(
            timestamp=timestamp(envelope.timestamp), namespace=envelope.namespace,
            topic=envelope.topic, event=envelope.event))
        try:
            if not isinstance(self._client, Client) or self._client.closed:
                self._client = await Client.connect_unix(self._address, timeout=timeout)
            client = self._client
            await client.call(self.SERVICE, "Forward", request, empty_pb2.Empty, timeout=timeout)
        except Exception:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        from protocols.ttrpc import Client

        client, self._client = self._client, None
        if isinstance(client, Client):
            await client.close()


class GrpcEventSender:
    """``Events/Publish`` over gRPC (grpclib) at GRPC_ADDRESS, namespace in
    ``containerd-namespace``; the channel reconnects by itself after containerd restarts."""

    METHOD = "/containerd.services.events.v1.Events/Publish"

    def __init__(self, address: str) -> None:
        self._address = address.removeprefix("unix://")
        self._channel: object | None = None

    async def send(self, envelope: Envelope, timeout: float) -> None:  # noqa: ASYNC109
        from google.protobuf import empty_pb2
        from grpclib.client import Channel, UnaryUnaryMethod

        from protocols.api.containerd.services.events.v1 import events_pb2

        if not isinstance(self._channel, Channel):
            self._channel = Channel(path=self._address)
        publish = UnaryUnaryMethod(self._channel, self.METHOD, events_pb2.PublishRequest,
                                   empty_pb2.Empty)
        await publish(events_pb2.PublishRequest(topic=envelope.topic, event=envelope.event),
                      timeout=timeout, metadata={"containerd-namespace": envelope.namespace})

    async def aclose(self) -> None:
        from grpclib.client import Channel

        channel, self._channel = self._channel, None
        if isinstance(channel, Channel):
            channel.close()


class EventForwarder:
    """The one ordered, bounded path from the domain to containerd.

    ``publish`` waits for room in the queue (back-pressure on the domain, never unbounded
    memory); ``run`` is the single forwarder loop, owned by the daemon's TaskGroup.
    """

    def __init__(self, sender: EventSender, namespace: str,
                 timeouts: Timeouts = TIMEOUTS,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._sender = sender
        self._namespace = namespace
        self._timeouts = timeouts
        self._sleep = sleep
        self._queue: asyncio.Queue[Envelope] = asyncio.Queue(QUEUE_SIZE)
        self.dropped = 0

    async def publish(self, event: Event) -> None:
        await self._queue.put(envelope(event, self._namespace))

    async def run(self) -> None:
        try:
            while True:
                item = await self._queue.get()
                try:
                    await self._deliver(item)
                finally:
                    self._queue.task_done()
        finally:
            await self._sender.aclose()

    async def drain(self) -> None:
        """Wait until every queued event was delivered or dropped (caller bounds it)."""
        await self._queue.join()

    async def _deliver(self, item: Envelope) -> None:
        attempts = self._timeouts.event_attempts
        for attempt in range(1, attempts + 1):
            try:
                await self._sender.send(item, self._timeouts.event_attempt)
                trace.mark(f"event: {item.topic} delivered")
                return
            except Exception as err:  # retried, then dropped: containerd may be restarting
                log.warning("publish %s: attempt %d/%d failed: %s", item.topic, attempt,
                            attempts, err)
            if attempt < attempts:
                await self._sleep(self._timeouts.event_retry_pause)
        self.dropped += 1
        log.error("publish %s: dropped after %d attempts", item.topic, attempts)
