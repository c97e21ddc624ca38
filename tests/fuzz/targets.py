"""Fuzz targets: one function per decoder the shim exposes to bytes it does not control.

Each target takes one input (bytes), drives the real product code with it and raises
:class:`Violation` when an invariant breaks; any other exception that escapes is a crash too.
The same functions serve the coverage-guided run (``tests/fuzz/run.py``, atheris) and the short
hypothesis run in ``make test`` (``tests/unit/fuzz``).

- ``frame``: the ttrpc frame decoder, the input cut into chunks the input itself chooses;
- ``server``: a ttrpc server connection reading the input as a hostile client's byte stream;
- ``client``: a ttrpc client with three calls in flight reading the input as a hostile agent's
  answers (the host's receive path from the guest);
- ``start_stdin``: what ``containerd-shim-coco-v2 start`` does with its stdin (runtime options,
  then the ``[shim]`` table of their config body);
- ``runtime_options``: the daemon's decoder of ``CreateTaskRequest.options`` and the runtime
  profile read from its config body, checked against the hand-written decoder of ``start``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from google.protobuf import any_pb2
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError
from google.protobuf.wrappers_pb2 import StringValue

from hypervisor.errors import HypervisorError
from protocols.api.containerd.task.v3 import shim_pb2 as task_v3
from protocols.api.google.rpc.status_pb2 import Status
from protocols.api.runtimeoptions.v1 import api_pb2 as runtimeoptions
from protocols.api.ttrpc.ttrpc_pb2 import Request, Response
from protocols.status import Code
from protocols.ttrpc import Client, RequestContext, Server, TtrpcError
from protocols.ttrpc.errors import ConnectionClosed
from protocols.ttrpc.frame import (
    HEADER_LENGTH,
    MAX_DATA_LENGTH,
    Frame,
    FrameDecoder,
    FrameType,
    OversizedFrame,
    encode_frame,
)
from protocols.ttrpc.server import _Connection
from shim.core.config import (
    RUNTIME_OPTIONS_TYPE,
    ConfigSource,
    RuntimeOptions,
    config_source,
    decode_runtime_options,
    shim_config,
)
from shim.core.errors import NotFound, RpcError
from shim.daemon.task_service import TaskService
from shim.daemon.task_service import runtime_options as daemon_runtime_options
from shim.daemon.ttrpc_server import TtrpcTaskService
from shim.pod.profile import runtime_profile

ECHO = "fuzz.v1.Echo"
TASK = "containerd.task.v3.Task"
# How long one input may keep a connection busy: everything here is in memory, so a run that
# needs more than this is stuck, which is a finding.
INPUT_DEADLINE = 5.0
# A small frame limit in one decoder of the `frame` target exercises the oversized-frame path
# with short inputs; the other decoder uses the real limit.
SMALL_LIMIT = 64


class Violation(AssertionError):
    """An invariant of the code under test does not hold for this input."""


# --- frame decoder ---------------------------------------------------------------------------


def _reference_frames(data: bytes, limit: int) -> tuple[list[Frame | OversizedFrame], int]:
    """The frames in ``data`` read the simplest way (whole input, header by header), and how
    many bytes of an unfinished frame trail them."""
    events: list[Frame | OversizedFrame] = []
    pos = 0
    while len(data) - pos >= HEADER_LENGTH:
        length = int.from_bytes(data[pos:pos + 4], "big")
        stream_id = int.from_bytes(data[pos + 4:pos + 8], "big")
        frame_type, flags = data[pos + 8], data[pos + 9]
        end = pos + HEADER_LENGTH + length
        if end > len(data):
            break
        if length > limit:
            events.append(OversizedFrame(stream_id, frame_type, flags, length))
        else:
            events.append(Frame(stream_id, frame_type, flags, data[pos + HEADER_LENGTH:end]))
        pos = end
    return events, len(data) - pos


def _cuts(data: bytes) -> list[bytes]:
    """Chunks of ``data[1:]`` whose sizes the first byte seeds (1..n bytes each)."""
    if not data:
        return []
    seed, body = data[0], data[1:]
    chunks = []
    pos = 0
    step = 0
    while pos < len(body):
        size = 1 + (seed * 31 + step * 17) % (seed % 23 + 1 + step % 7)
        chunks.append(body[pos:pos + size])
        pos += size
        step += 1
    return chunks


def fuzz_frame(data: bytes) -> None:
    body = data[1:]
    for limit in (SMALL_LIMIT, MAX_DATA_LENGTH):
        decoder = FrameDecoder(max_length=limit)
        events: list[Frame | OversizedFrame] = []
        for chunk in _cuts(data):
            events.extend(decoder.feed(chunk))
            # Never more than one partial frame (header + at most `limit` bytes) held.
            if decoder.buffered >= HEADER_LENGTH + limit:
                raise Violation(f"decoder holds {decoder.buffered} bytes (limit {limit})")
        expected, trailing = _reference_frames(body, limit)
        if events != expected:
            raise Violation(f"limit {limit}: decoded {events!r}, expected {expected!r}")
        if decoder.at_boundary != (trailing == 0):
            raise Violation(f"at_boundary {decoder.at_boundary} with {trailing} bytes pending")


# --- in-memory streams -----------------------------------------------------------------------


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


class _Sink:
    """The StreamWriter half both ends use: collects what they write."""

    def __init__(self) -> None:
        self.transport = _Transport()
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        if self.transport.aborted:
            raise ConnectionResetError("written after abort")
        self.data += data

    async def drain(self) -> None:
        if self.transport.aborted:
            raise ConnectionResetError("drained after abort")

    async def wait_closed(self) -> None:
        return None


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=256 * 1024)
    reader.feed_data(data)
    return reader


async def _settle(ready: Callable[[], bool], rounds: int = 200) -> None:
    """Let the loop run until ``ready()`` (handlers are immediate; a few rounds suffice)."""
    for _ in range(rounds):
        if ready():
            return
        await asyncio.sleep(0)


_loop: asyncio.AbstractEventLoop | None = None


def _run(coro: Any) -> Any:
    """One event loop for the whole run: a loop per input would dominate the cost. Logging is
    off meanwhile: handler crashes and dropped frames are logged by design."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        return _loop.run_until_complete(coro)
    finally:
        logging.disable(before)


def _responses(output: bytes) -> list[Response]:
    """The output stream of one end as frames; each must be a decodable Response frame."""
    decoder = FrameDecoder()
    frames = decoder.feed(output)
    if not decoder.at_boundary:
        raise Violation("output ends mid-frame")
    responses = []
    for frame in frames:
        if not isinstance(frame, Frame) or frame.type != FrameType.RESPONSE or frame.flags:
            raise Violation(f"server wrote {frame!r}")
        try:
            responses.append(Response.FromString(frame.data))
        except DecodeError as err:
            raise Violation(f"server wrote an undecodable Response: {err}") from err
    return responses


# --- server request path ---------------------------------------------------------------------


class _NoTasks:
    """A TaskManager with no task: every call is NotFound, as a fresh daemon answers ids it does
    not know. The shim's own edge (TaskService behind the ttrpc adapter) translates each request
    first: runtime options, mounts, the exec spec and resources JSON."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def missing(*args: object, **kwargs: object) -> None:
            raise NotFound(f"{name}: no such task")

        return missing


class _FuzzEdge(TtrpcTaskService):
    """The shim's ttrpc task edge, recording what left it unmapped (a crash of the edge)."""

    unexpected: list[Exception] = []

    async def fail(self, err: Exception, context: Any) -> None:
        if not isinstance(err, RpcError | TtrpcError):
            self.unexpected.append(err)
        await super().fail(err, context)


async def _echo(request: StringValue, context: RequestContext) -> StringValue:
    return StringValue(value=request.value[:64])


async def _fail(request: StringValue, context: RequestContext) -> Empty:
    raise TtrpcError(Code.from_wire(len(request.value) % 20), request.value[:64])


async def _crash(request: Empty, context: RequestContext) -> Empty:
    raise RuntimeError("handler bug")


async def _deadline(request: Empty, context: RequestContext) -> Empty:
    # A handler that honours the caller's deadline: a timeout_nano in the input ends it.
    if context.deadline is not None:
        await asyncio.sleep(0)
    return Empty()


_server: Server | None = None


def _fuzz_server() -> Server:
    global _server
    if _server is None:
        _server = Server(max_in_flight=8)
        _server.register(ECHO, "Echo", StringValue, _echo)
        _server.register(ECHO, "Fail", StringValue, _fail)
        _server.register(ECHO, "Crash", Empty, _crash)
        _server.register(ECHO, "Deadline", Empty, _deadline)
        _server.register_service(task_v3.DESCRIPTOR.services_by_name["Task"],
                                 _FuzzEdge(TaskService(_NoTasks(), task_v3)))  # type: ignore[arg-type]
    return _server


async def _serve_once(data: bytes) -> bytes:
    reader, sink = _reader(data), _Sink()
    connection = _Connection(_fuzz_server(), reader, sink)  # type: ignore[arg-type]
    task = asyncio.ensure_future(connection.run())
    # Let every request be read and answered before the end of the stream cancels handlers.
    await _settle(lambda: task.done() or (not reader._buffer  # type: ignore[attr-defined]
                                             and not connection._handlers))
    reader.feed_eof()
    try:
        async with asyncio.timeout(INPUT_DEADLINE):
            await task
    except TimeoutError as err:
        raise Violation(f"connection still running {INPUT_DEADLINE}s after EOF") from err
    if not sink.transport.aborted:
        raise Violation("connection ended without closing its transport")
    return bytes(sink.data)


def fuzz_server(data: bytes) -> None:
    _FuzzEdge.unexpected.clear()
    output = _run(_serve_once(data))
    if _FuzzEdge.unexpected:
        err = _FuzzEdge.unexpected[0]
        raise Violation(f"the task edge let {err!r} through unmapped") from err
    sent, _ = _reference_frames(data, MAX_DATA_LENGTH)
    responses = _responses(output)
    # At most one answer per frame received: the output is bounded by the input.
    if len(responses) > len(sent):
        raise Violation(f"{len(responses)} responses to {len(sent)} frames")
    for response in responses:
        if response.status.code not in Code.__members__.values():
            raise Violation(f"status code {response.status.code} is not a google.rpc code")


# --- client receive path (a hostile agent) ---------------------------------------------------

_CALLS = 3


async def _receive_once(data: bytes) -> None:
    reader, sink = asyncio.StreamReader(limit=256 * 1024), _Sink()
    client = Client(reader, sink)  # type: ignore[arg-type]
    calls = [asyncio.ensure_future(client.call(ECHO, "Echo", StringValue(value=str(i)),
                                               StringValue))
             for i in range(_CALLS)]
    await _settle(lambda: len(client._pending) == _CALLS)
    reader.feed_data(data)
    reader.feed_eof()
    try:
        async with asyncio.timeout(INPUT_DEADLINE):
            results = await asyncio.gather(*calls, return_exceptions=True)
    except TimeoutError as err:
        raise Violation(f"calls still pending {INPUT_DEADLINE}s after the agent's EOF") from err
    finally:
        await client.close()
    for result in results:
        if isinstance(result, StringValue | TtrpcError | ConnectionClosed):
            continue
        raise Violation(f"a call ended with {result!r}") from (
            result if isinstance(result, BaseException) else None)
    if client._pending:
        raise Violation(f"pending calls left after close: {sorted(client._pending)}")
    if client._closed is not None and client._closed.__cause__ is not None:
        # _receive turns a bug of its own into ConnectionClosed; here that is a crash.
        raise Violation(f"receive loop crashed: {client._closed}") from client._closed.__cause__
    if not client.closed:
        raise Violation("client not closed after the agent's EOF")


def fuzz_client(data: bytes) -> None:
    _run(_receive_once(data))


# --- start's stdin and the daemon's runtime options ------------------------------------------

_NO_ENV: dict[str, str] = {}


def fuzz_start_stdin(data: bytes) -> None:
    """Exactly what ``start`` does with stdin, except that a ``config_path`` in the input is not
    opened (the fuzzer must not read the host's files): only the body path is followed."""
    try:
        options = decode_runtime_options(data)
        found = (config_source(RuntimeOptions(config_body=options.config_body), _NO_ENV)
                 if options.config_body else ConfigSource(None, "<none>"))
        shim_config(found)
    except RpcError:
        return


def _protobuf_options(data: bytes) -> RuntimeOptions | None:
    """The same bytes through the protobuf runtime (None: it refuses them)."""
    try:
        envelope = any_pb2.Any.FromString(data)
    except DecodeError:
        return None
    try:
        return daemon_runtime_options(envelope)
    except RpcError:
        return None


def fuzz_runtime_options(data: bytes) -> None:
    try:
        by_hand: RuntimeOptions | None = decode_runtime_options(data)
    except RpcError:
        by_hand = None
    by_protobuf = _protobuf_options(data)
    # start decodes by hand, the daemon with protobuf: what start accepts, the daemon must read
    # the same way.
    if by_hand is not None and by_protobuf is not None and by_hand != by_protobuf:
        raise Violation(f"start read {by_hand!r}, the daemon {by_protobuf!r}")
    if by_protobuf is not None and by_protobuf.config_body:
        try:
            runtime_profile(RuntimeOptions(config_body=by_protobuf.config_body))
        except RpcError:
            pass
        except HypervisorError as err:  # must have been mapped to InvalidArgument
            raise Violation(f"runtime profile error escaped unmapped: {err!r}") from err


def runtime_options_any(config_path: str = "", config_body: bytes = b"") -> bytes:
    """A well-formed ``Any{runtimeoptions.v1.Options}`` (for seeds and strategies)."""
    options = runtimeoptions.Options(config_path=config_path, config_body=config_body)
    return any_pb2.Any(type_url=RUNTIME_OPTIONS_TYPE,
                       value=options.SerializeToString()).SerializeToString()


def request_frame(stream_id: int, service: str, method: str, payload: bytes = b"",
                  timeout_nano: int = 0) -> bytes:
    request = Request(service=service, method=method, payload=payload, timeout_nano=timeout_nano)
    return encode_frame(stream_id, FrameType.REQUEST, 0, request.SerializeToString())


def response_frame(stream_id: int, code: int = 0, message: str = "", payload: bytes = b"",
                   frame_type: int = FrameType.RESPONSE) -> bytes:
    response = Response(status=Status(code=code, message=message), payload=payload)
    return encode_frame(stream_id, frame_type, 0, response.SerializeToString())


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frame": fuzz_frame,
    "server": fuzz_server,
    "client": fuzz_client,
    "start_stdin": fuzz_start_stdin,
    "runtime_options": fuzz_runtime_options,
}


def seeds(target: str) -> list[bytes]:
    """Well-formed inputs to start the coverage-guided search from."""
    echo = StringValue(value="hello").SerializeToString()
    if target == "frame":
        return [b"\x07" + request_frame(1, ECHO, "Echo", echo) + response_frame(3),
                b"\x01" + encode_frame(5, 3, 1, b"x" * 100)]
    if target == "server":
        create = task_v3.CreateTaskRequest(
            id="c1", bundle="/b", options=any_pb2.Any.FromString(runtime_options_any("/p")))
        return [request_frame(1, ECHO, "Echo", echo) + request_frame(3, ECHO, "Fail", echo),
                request_frame(1, TASK, "Create", create.SerializeToString())
                + request_frame(3, TASK, "State", b"\x0a\x02c1", timeout_nano=10**6),
                request_frame(1, ECHO, "Crash") + request_frame(2, ECHO, "Echo")
                + encode_frame(1, 3, 0, b""),
                request_frame(1, TASK, "Exec", task_v3.ExecProcessRequest(
                    id="c1", exec_id="e1", spec=any_pb2.Any(
                        type_url="x", value=b'{"args": [["sh"]]}')).SerializeToString())
                + request_frame(3, TASK, "Update", task_v3.UpdateTaskRequest(
                    id="c1", resources=any_pb2.Any(value=b"[{}]")).SerializeToString())]
    if target == "client":
        return [response_frame(1, payload=StringValue(value="a").SerializeToString())
                + response_frame(3, code=5, message="nope") + response_frame(5, payload=b"\xff"),
                response_frame(3) + response_frame(1, frame_type=FrameType.DATA)]
    body = b'[shim]\nprotocol = "ttrpc"\nbootstrap_version = 3\nearly_boot = false\n'
    profile = b'[hypervisor]\ntee = "none"\nkernel = "/k"\n'
    return [runtime_options_any("/etc/x.toml"), runtime_options_any(config_body=body),
            runtime_options_any(config_body=profile), b""]

