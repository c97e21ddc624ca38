"""Fakes behind the shim's seams: a scriptable pod sandbox (plus slow and hanging ones), its
factory, and a recording event publisher. Also loadable by a real daemon through
COCO_SHIM_SANDBOX_FACTORY=tests.unit.shim.fakes:FakeSandboxFactory."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from shim.core.errors import NotFound
from shim.daemon import events
from shim.pod.sandbox import (
    ContainerConfig,
    ContainerStats,
    ExecConfig,
    PodSandbox,
    SandboxConfig,
)


class Stream:
    """One output stream of a fake guest process: bytes in, EOF when the process ends."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False
        self.changed = asyncio.Condition()
        self.max_buffer = 1 << 20

    async def feed(self, data: bytes) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: len(self.buffer) < self.max_buffer)
            self.buffer += data
            self.changed.notify_all()

    async def close(self) -> None:
        async with self.changed:
            self.eof = True
            self.changed.notify_all()

    async def read(self, size: int) -> bytes:
        async with self.changed:
            await self.changed.wait_for(lambda: bool(self.buffer) or self.eof)
            data = bytes(self.buffer[:size])
            del self.buffer[:size]
            self.changed.notify_all()
            return data


@dataclass
class FakeProcess:
    container_id: str
    exec_id: str
    echo: bool = False  # stdin is copied to stdout, stdin close ends the process (like `cat`)
    started: bool = False
    stdout: Stream = field(default_factory=Stream)
    stderr: Stream = field(default_factory=Stream)
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: bool = False
    exit: asyncio.Future[int] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    signals: list[int] = field(default_factory=list)
    resizes: list[tuple[int, int]] = field(default_factory=list)


class FakeSandbox:
    """A pod VM whose guest processes are driven by the test (``finish``) or by signals."""

    def __init__(self, pid: int | None = None) -> None:
        self._pid = os.getpid() if pid is None else pid
        self.processes: dict[tuple[str, str], FakeProcess] = {}
        self.containers: dict[str, ContainerConfig] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.paused: set[str] = set()
        self.updates: list[tuple[str, Mapping[str, object]]] = []
        self.shut_down = False
        self.echo = False
        self.oom_events: asyncio.Queue[str] = asyncio.Queue()

    @property
    def pid(self) -> int:
        return self._pid

    def process(self, container_id: str, exec_id: str = "") -> FakeProcess:
        found = self.processes.get((container_id, exec_id))
        if found is None:
            raise NotFound(f"fake: no process {container_id}/{exec_id}")
        return found

    async def finish(self, container_id: str, exec_id: str = "", status: int = 0) -> None:
        process = self.process(container_id, exec_id)
        await process.stdout.close()
        await process.stderr.close()
        if not process.exit.done():
            process.exit.set_result(status)

    # -- PodSandbox --

    async def create_container(self, config: ContainerConfig) -> None:
        self.calls.append(("CreateContainer", config.container_id, ""))
        self.containers[config.container_id] = config
        self.processes[(config.container_id, "")] = FakeProcess(config.container_id, "",
                                                                echo=self.echo)

    async def start_container(self, container_id: str) -> None:
        self.calls.append(("StartContainer", container_id, ""))
        self.process(container_id).started = True

    async def exec_process(self, config: ExecConfig) -> None:
        self.calls.append(("ExecProcess", config.container_id, config.exec_id))
        self.processes[(config.container_id, config.exec_id)] = FakeProcess(
            config.container_id, config.exec_id, echo=self.echo, started=True)

    async def signal_process(self, container_id: str, exec_id: str, signal: int) -> None:
        self.calls.append(("SignalProcess", container_id, exec_id))
        process = self.process(container_id, exec_id)
        process.signals.append(signal)
        if signal in (9, 15):
            await self.finish(container_id, exec_id, 128 + signal)

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        return await asyncio.shield(self.process(container_id, exec_id).exit)

    async def read_stdout(self, container_id: str, exec_id: str, size: int) -> bytes:
        return await self.process(container_id, exec_id).stdout.read(size)

    async def read_stderr(self, container_id: str, exec_id: str, size: int) -> bytes:
        return await self.process(container_id, exec_id).stderr.read(size)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        process = self.process(container_id, exec_id)
        taken = data[: 64 * 1024]  # a short write now and then, like a real pipe
        process.stdin += taken
        if process.echo:
            await process.stdout.feed(taken)
        return len(taken)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        self.calls.append(("CloseStdin", container_id, exec_id))
        process = self.process(container_id, exec_id)
        process.stdin_closed = True
        if process.echo:
            await self.finish(container_id, exec_id, 0)

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int,
                             columns: int) -> None:
        self.process(container_id, exec_id).resizes.append((rows, columns))

    async def pause_container(self, container_id: str) -> None:
        self.paused.add(container_id)

    async def resume_container(self, container_id: str) -> None:
        self.paused.discard(container_id)

    async def stats_container(self, container_id: str) -> ContainerStats:
        return ContainerStats("io.containerd.cgroups.v2.Metrics", container_id.encode())

    async def update_container(self, container_id: str,
                               resources: Mapping[str, object]) -> None:
        self.updates.append((container_id, resources))

    async def remove_container(self, container_id: str) -> None:
        self.calls.append(("RemoveContainer", container_id, ""))
        self.containers.pop(container_id, None)

    async def release_container(self, container_id: str) -> None:
        self.calls.append(("release", container_id, ""))
        self.containers.pop(container_id, None)

    async def get_oom_event(self) -> str:
        return await self.oom_events.get()

    async def shutdown(self) -> None:
        self.shut_down = True


class HangingSandbox(FakeSandbox):
    """An agent that accepts the connection but never answers StartContainer or Pause."""

    async def start_container(self, container_id: str) -> None:
        await asyncio.Event().wait()

    async def pause_container(self, container_id: str) -> None:
        await asyncio.Event().wait()


class FakeSandboxFactory:
    def __init__(self, sandbox: FakeSandbox | None = None, delay: float = 0.0) -> None:
        self.sandbox = sandbox
        self.delay = delay
        self.configs: list[SandboxConfig] = []

    async def create_sandbox(self, config: SandboxConfig) -> PodSandbox:
        self.configs.append(config)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.sandbox is None:
            self.sandbox = FakeSandbox()
            # In a real daemon (interop runs): processes behave like `cat`.
            self.sandbox.echo = os.environ.get("COCO_FAKE_ECHO") == "1"
        return self.sandbox


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[events.Event] = []

    async def publish(self, event: events.Event) -> None:
        self.events.append(event)

    def topics(self) -> list[str]:
        return [e.topic for e in self.events]


def assert_sandbox(sandbox: PodSandbox) -> PodSandbox:
    """Type check: the fakes satisfy the seam."""
    return sandbox
