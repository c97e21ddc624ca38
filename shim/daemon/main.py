"""The shim daemon (``serve``): task service for one pod until Shutdown.

Spawned by ``start`` in its own session with stdio on /dev/null. It logs to the bundle's ``log``
FIFO in logrus text format (what containerd copies into its own log), publishes events through
one ``EventForwarder``, and owns every background task in one TaskGroup.

The pod VM comes from ``shim.pod.vm_sandbox.VmSandboxFactory`` (QEMU + guest agent); tests may name
another ``SandboxFactory`` with ``COCO_SHIM_SANDBOX_FACTORY=module:attribute`` (a class or a
zero-argument callable).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final

from shim.binary.contract import Flags, decode_runtime_options
from shim.binary.manager import ShimState
from shim.core.timeouts import TIMEOUTS
from shim.daemon.events import EventForwarder, EventSender, GrpcEventSender, TtrpcEventSender
from shim.pod.sandbox import SandboxFactory

log = logging.getLogger("shim")

SANDBOX_FACTORY_ENV: Final = "COCO_SHIM_SANDBOX_FACTORY"
LEVELS: Final = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
                 logging.ERROR: "error", logging.CRITICAL: "fatal"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogrusFormatter(logging.Formatter):
    """``time="2026-01-02T03:04:05.123456789Z" level=info msg="..." runtime=...``."""

    def __init__(self, **fields: str) -> None:
        super().__init__()
        self._fields = fields

    def format(self, record: logging.LogRecord) -> str:
        ns = int(record.created * 1e9)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000))
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        extra = "".join(f" {k}={_quote(v)}" for k, v in self._fields.items())
        level = LEVELS.get(record.levelno, "info")
        return f'time="{stamp}.{ns % 1_000_000_000:09d}Z" level={level} msg={_quote(message)}' \
               f"{extra}\n"


class FifoHandler(logging.Handler):
    """Writes records to a non-blocking fd; a full FIFO drops lines instead of stalling."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self._fd, self.format(record).encode())
        except (BlockingIOError, BrokenPipeError):
            pass
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        super().close()


def setup_logging(bundle: Path, debug: bool, task_id: str) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        fd = os.open(bundle / "log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.ENXIO):  # no log FIFO or nobody reading it
            raise
        root.addHandler(logging.NullHandler())
        return
    # grpc's own debug logging is one line per poller tick: keep it out of containerd's log.
    logging.getLogger("grpc").setLevel(logging.WARNING)
    handler = FifoHandler(fd)
    handler.setFormatter(LogrusFormatter(runtime="io.containerd.coco.v2", id=task_id))
    root.addHandler(handler)


def load_factory() -> SandboxFactory:
    target = os.environ.get(SANDBOX_FACTORY_ENV)
    if not target:
        from shim.pod.vm_sandbox import VmSandboxFactory

        return VmSandboxFactory()
    module, _, attribute = target.partition(":")
    factory: SandboxFactory = getattr(importlib.import_module(module), attribute)()
    return factory


def event_sender(flags: Flags) -> EventSender:
    """ttrpc Forward at TTRPC_ADDRESS (as the Go shims do), else gRPC Publish."""
    ttrpc_address = os.environ.get("TTRPC_ADDRESS")
    if ttrpc_address:
        return TtrpcEventSender(ttrpc_address)
    return GrpcEventSender(os.environ.get("GRPC_ADDRESS") or flags.address)


def _notify(fd: int, message: str) -> None:
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        os.write(fd, f"{message}\n".encode())
    with contextlib.suppress(OSError):
        os.close(fd)


async def run(flags: Flags) -> int:
    from shim.task.manager import TaskManager

    path = Path(flags.socket)
    forwarder = EventForwarder(event_sender(flags), flags.namespace)
    owned: set[asyncio.Task[None]] = set()
    ready_fd = flags.ready_fd

    async with asyncio.TaskGroup() as group:

        def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
            task = group.create_task(coro)
            owned.add(task)
            task.add_done_callback(owned.discard)
            return task

        forwarding = group.create_task(forwarder.run())
        recorded = {flags.id}

        def record_init_pid(container_id: str, pid: int) -> None:
            recorded.add(container_id)
            ShimState.of(flags.namespace, container_id).write_init_pid(pid)

        tasks = TaskManager(load_factory(), forwarder, namespace=flags.namespace, spawn=spawn,
                            on_created=record_init_pid)
        if flags.early_boot:
            tasks.boot_early(flags.group or flags.id, Path(flags.bundle or os.getcwd()),
                             decode_runtime_options(bytes.fromhex(flags.runtime_options)))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, tasks.shutdown_requested.set)
        listener = socket.socket(fileno=flags.listen_fd) if flags.listen_fd >= 0 else None
        try:
            if flags.protocol == "ttrpc":
                if listener is None:
                    raise RuntimeError("ttrpc needs the listening socket from start")
                from shim.daemon.ttrpc_server import serve_ttrpc

                server: Any = await serve_ttrpc(tasks, listener)
            else:
                from shim.daemon.grpc_server import serve_grpc

                server = await serve_grpc(tasks, path)
                if listener is not None:
                    listener.close()  # replaced by gRPC's socket before anyone learnt the path
        except Exception as err:
            _notify(ready_fd, f"cannot serve {path}: {err}")
            raise
        _notify(ready_fd, "ready")
        log.info("serving containerd.task on %s (%s, pid %d)", path, flags.protocol,
                 os.getpid())

        await tasks.shutdown_requested.wait()
        log.info("shutting down")
        await asyncio.sleep(0.05)  # let the Shutdown reply leave before the server goes
        if flags.protocol == "ttrpc":
            await server.close()
        else:
            await server.stop(TIMEOUTS.server_grace)
        await tasks.aclose()
        for task in list(owned):
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TIMEOUTS.event_drain):
                await forwarder.drain()
        forwarding.cancel()
    # A clean exit: the pod VM is down, nothing is left for `delete` to reap.
    for container_id in recorded:
        ShimState.of(flags.namespace, container_id).remove()
    return 0


def main(flags: Flags) -> int:
    os.umask(0o077)
    bundle = Path(flags.bundle) if flags.bundle else Path.cwd()
    try:
        setup_logging(bundle, flags.debug, flags.id)
        status = asyncio.run(run(flags))
        with contextlib.suppress(FileNotFoundError):
            Path(flags.socket).unlink()
        return status
    except Exception as err:
        log.exception("shim daemon failed")
        _notify(flags.ready_fd, f"shim daemon failed: {err}")
        print(f"shim daemon failed: {err}", file=sys.stderr)
        return 1
