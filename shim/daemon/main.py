"""The shim daemon (``serve``): one pod's task and sandbox services until Shutdown.

Spawned by ``start`` in its own session with stdio on /dev/null; logs to the bundle's ``log``
FIFO (:mod:`shim.daemon.logs`). Every resource it holds is on one AsyncExitStack, entered in
this order and released in reverse: the TaskGroup that owns every background task, the event
forwarder (drained last), the pod (its VM stopped), the task manager (its stdio relays), the
server. So whatever ends the daemon — Shutdown, a signal, a crash — the server stops taking
calls, the relays stop, the VM is stopped and queued events get their chance to leave (the
listening socket itself stays open, accepting nothing, until then: see :func:`run`). A
background loop that raises is logged and fails the pod (its VM stops, its processes exit 137)
instead of silently ending the TaskGroup.

The pod VM comes from :class:`shim.pod.boot.VmBooter` (QEMU + guest agent); tests may name
another :class:`~shim.pod.vm.Booter` with ``COCO_SHIM_BOOTER=module:attribute`` (a class or a
zero-argument callable).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Final

from shim.binary.flags import Flags
from shim.core import interpreter, trace
from shim.core.bundle import read_spec
from shim.core.config import decode_runtime_options
from shim.core.crash_record import ShimState
from shim.core.errors import RpcError
from shim.core.timeouts import TIMEOUTS, Timeouts
from shim.daemon.events import EventForwarder, EventSender, GrpcEventSender, TtrpcEventSender
from shim.daemon.logs import setup_logging
from shim.pod.pod import Pod
from shim.pod.vm import BootClock, Booter, PodConfig, PodVm

log = logging.getLogger("shim")

BOOTER_ENV: Final = "COCO_SHIM_BOOTER"


def load_booter() -> Booter:
    target = os.environ.get(BOOTER_ENV)
    if not target:
        from shim.pod.boot import VmBooter

        return VmBooter()
    module, _, attribute = target.partition(":")
    booter: Booter = getattr(importlib.import_module(module), attribute)()
    return booter


class LazyBooter:
    """The pod's :class:`Booter`, loaded in a worker thread after the server answers.

    The boot machinery (hypervisor, qemu.qmp, the agent client and its protobuf modules) is
    ≈ 120 ms of imports; loading it before serving kept containerd's first RPC waiting that
    long. Imported in a thread, it leaves the event loop free to answer meanwhile (the GIL
    switches every few milliseconds). ``preload`` starts it as soon as the server is up; a
    boot that comes first waits for the same load.
    """

    def __init__(self, load: Callable[[], Booter] = load_booter) -> None:
        self._load = load
        self._loading: asyncio.Future[Booter] | None = None

    async def loaded(self) -> Booter:
        if self._loading is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))
        return await asyncio.shield(self._loading)  # one load, whichever caller is cancelled

    async def preload(self) -> None:
        with contextlib.suppress(Exception):  # a booter that cannot load fails the boot itself
            await self.loaded()

    async def boot(self, config: PodConfig, clock: BootClock | None = None) -> PodVm:
        booter = await self.loaded()
        return await booter.boot(config, clock)


def event_sender(flags: Flags) -> EventSender:
    """ttrpc Forward at TTRPC_ADDRESS (as the Go shims do), else gRPC Publish."""
    ttrpc_address = os.environ.get("TTRPC_ADDRESS")
    if ttrpc_address:
        return TtrpcEventSender(ttrpc_address)
    return GrpcEventSender(os.environ.get("GRPC_ADDRESS") or flags.address)


class Owner:
    """Owns the daemon's background tasks: each runs in one TaskGroup, guarded so that a crash
    is logged and handed to ``on_crash`` (the pod fails) rather than ending the group."""

    def __init__(self, group: asyncio.TaskGroup) -> None:
        self._group = group
        self._tasks: set[asyncio.Task[None]] = set()
        self.on_crash: Callable[[BaseException], Awaitable[None]] | None = None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self._group.create_task(self._guard(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except Exception as err:
            log.error("background task %s failed", coro.__qualname__, exc_info=err)
            if self.on_crash is not None:
                await self.on_crash(err)

    async def aclose(self) -> None:
        """Cancel every task still running and wait for it."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)  # their own cancellations end there; ours propagates


def read_options_fd(fd: int) -> bytes:
    """The runtime options ``start`` passed in an inherited memfd (closed here); none if -1."""
    if fd < 0:
        return b""
    with os.fdopen(fd, "rb") as f:
        return f.read()


def early_boot(pod: Pod, flags: Flags) -> None:
    """The pod's first container: boot its VM now, from start's bundle and runtime options."""
    bundle = Path(flags.bundle or os.getcwd())
    try:
        options = decode_runtime_options(read_options_fd(flags.runtime_options_fd))
        spec = read_spec(bundle)
    except (RpcError, ValueError, OSError) as err:
        log.info("no early boot: %s", err)  # Create reports it
        return
    pod.boot_early(PodConfig(sandbox_id=flags.group or flags.id, namespace=flags.namespace,
                             bundle=bundle, spec=spec, options=options))


async def _drain(forwarder: EventForwarder, forwarding: asyncio.Task[None],
                 timeouts: Timeouts) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeouts.event_drain):
            await forwarder.drain()
    forwarding.cancel()


async def serve(flags: Flags, stack: AsyncExitStack, recorded: set[str],
                timeouts: Timeouts = TIMEOUTS) -> Pod:
    """Bring the daemon's resources up on ``stack`` (see the module docstring for the order)
    and serve; the caller waits for ``pod.shutdown_requested`` and then closes the stack.
    ``recorded`` collects the ids whose crash record this daemon wrote."""
    from shim.daemon.sandbox_service import SandboxService
    from shim.task.manager import TaskManager

    group = await stack.enter_async_context(asyncio.TaskGroup())
    forwarder = EventForwarder(event_sender(flags), flags.namespace, timeouts)
    stack.push_async_callback(_drain, forwarder, group.create_task(forwarder.run()), timeouts)
    owner = Owner(group)
    stack.push_async_callback(owner.aclose)
    booter = LazyBooter()
    pod = Pod(booter, spawn=owner.spawn, timeouts=timeouts)
    owner.on_crash = pod.fail
    stack.push_async_callback(pod.shutdown)

    def record_init_pid(container_id: str, pid: int) -> None:
        recorded.add(container_id)
        ShimState.of(flags.namespace, container_id).write_init_pid(pid)

    tasks = TaskManager(pod, forwarder, namespace=flags.namespace, spawn=owner.spawn,
                        timeouts=timeouts, on_created=record_init_pid)
    stack.push_async_callback(tasks.aclose)
    if flags.early_boot:
        early_boot(pod, flags)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, pod.shutdown_requested.set)
    sandbox = SandboxService(pod, flags.namespace)
    if flags.listen_fd < 0:
        raise RuntimeError("the daemon serves the listening socket from start (-listen-fd)")
    listener = socket.socket(fileno=flags.listen_fd)
    if flags.protocol == "ttrpc":
        from shim.daemon.ttrpc_server import serve_ttrpc

        server = await serve_ttrpc(tasks, sandbox, listener)
        stack.push_async_callback(server.close)
    else:
        from shim.daemon.grpc_server import serve_grpc

        grpc_server = await serve_grpc(tasks, sandbox, listener)
        stack.push_async_callback(grpc_server.stop, timeouts.server_grace)
    owner.spawn(booter.preload())
    return pod


async def run(flags: Flags) -> int:
    recorded = {flags.id}
    # The listening socket stays open (a duplicate, accepting nothing) until the teardown below
    # is done: containerd runs `delete` the moment its connection closes, right after the
    # Shutdown reply, and a `delete` that found the socket refusing SIGKILLed this daemon in the
    # middle of stopping its VM and redid the cleanup itself, past containerd's 5 s bound for
    # it ("failed to delete dead shim ... signal: killed"). A socket that still accepts tells
    # it the daemon is alive and cleans up on its own (shim/binary/delete.py).
    held = socket.socket(fileno=os.dup(flags.listen_fd)) if flags.listen_fd >= 0 else None
    try:
        async with AsyncExitStack() as stack:
            pod = await serve(flags, stack, recorded)
            interpreter.collect_again()
            log.info("serving containerd.task on %s (%s, pid %d)", flags.socket, flags.protocol,
                     os.getpid())
            trace.mark("daemon: serving")
            await pod.shutdown_requested.wait()
            log.info("shutting down")
            trace.mark("daemon: shutting down")
            await asyncio.sleep(TIMEOUTS.shutdown_reply)  # let the Shutdown reply leave first
        # A clean exit: the pod VM is down, nothing is left for `delete` to reap.
        for container_id in recorded:
            ShimState.of(flags.namespace, container_id).remove()
        trace.mark("daemon: exit")
    finally:
        if held is not None:
            held.close()
    return 0


def main(flags: Flags) -> int:
    os.umask(0o077)
    trace.mark("daemon: main")
    bundle = Path(flags.bundle) if flags.bundle else Path.cwd()
    try:
        setup_logging(bundle, flags.debug, flags.id)
        status = asyncio.run(run(flags))
        with contextlib.suppress(FileNotFoundError):
            Path(flags.socket).unlink()
        return status
    except Exception as err:
        log.exception("shim daemon failed")
        print(f"shim daemon failed: {err}", file=sys.stderr)
        return 1
