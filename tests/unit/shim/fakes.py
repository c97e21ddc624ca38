"""Fakes behind the shim's seams: a scriptable guest agent (processes driven by the test), a VM
that can be told to die, a rootfs strategy, a booter that puts them together, and a recording
event publisher. Also loadable by a real daemon through
COCO_SHIM_BOOTER=tests.unit.shim.fakes:FakeBooter."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypervisor.cmdline import Share
from hypervisor.errors import ExitReason
from hypervisor.vm import AgentChannel
from protocols.api.kata import agent_pb2, oci_pb2, types_pb2
from shim.core.errors import NotFound, Unavailable
from shim.pod.admission import BootSlots, SlotHold
from shim.pod.agent import Agent
from shim.pod.guest_spec import spec_mounts
from shim.pod.mounts import Mount
from shim.pod.profile import AnnotationPolicy
from shim.pod.rootfs import ContainerRootfs, RootfsStrategy
from shim.pod.vm import BootClock, PodConfig, PodVm
from shim.task import events


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


class FakeAgent:
    """A guest agent whose processes are driven by the test (``finish``) or by signals."""

    def __init__(self) -> None:
        self.processes: dict[tuple[str, str], FakeProcess] = {}
        self.containers: dict[str, oci_pb2.Spec] = {}
        self.storages: dict[str, list[agent_pb2.Storage]] = {}
        self.sandbox_pidns: dict[str, bool] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.paused: set[str] = set()
        self.updates: list[tuple[str, oci_pb2.LinuxResources]] = []
        self.sandbox: tuple[str, str, list[str], list[agent_pb2.Storage]] | None = None
        self.network: list[Any] = []
        self.policy: str | None = None
        self.echo = False
        self.closed = False
        self.oom_events: asyncio.Queue[str] = asyncio.Queue()
        self._gone = asyncio.Event()

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

    async def _pending(self, awaitable: Awaitable[Any]) -> Any:
        """A long poll that fails with Unavailable once the connection is closed."""
        waiter = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not waiter.done():
                waiter.cancel()
        if waiter.done() and not waiter.cancelled():
            return waiter.result()
        raise Unavailable("fake agent: connection lost")

    # -- Agent --

    async def create_sandbox(self, sandbox_id: str, hostname: str, dns: Sequence[str],
                             storages: Sequence[agent_pb2.Storage]) -> None:
        self.calls.append(("CreateSandbox", sandbox_id, ""))
        self.sandbox = (sandbox_id, hostname, list(dns), list(storages))

    async def destroy_sandbox(self) -> None:
        self.calls.append(("DestroySandbox", "", ""))

    async def set_policy(self, policy: str) -> None:
        self.calls.append(("SetPolicy", "", ""))
        self.policy = policy

    async def update_interface(self, interface: types_pb2.Interface) -> None:
        self.calls.append(("UpdateInterface", "", ""))
        self.network.append(interface)

    async def update_routes(self, routes: Sequence[types_pb2.Route]) -> None:
        self.calls.append(("UpdateRoutes", "", ""))
        self.network.append(list(routes))

    async def add_arp_neighbors(self, neighbors: Sequence[types_pb2.ARPNeighbor]) -> None:
        self.calls.append(("AddARPNeighbors", "", ""))
        self.network.append(list(neighbors))

    async def create_container(self, container_id: str, spec: oci_pb2.Spec,
                               storages: Sequence[agent_pb2.Storage], *,
                               sandbox_pidns: bool = False) -> None:
        self.calls.append(("CreateContainer", container_id, ""))
        self.containers[container_id] = spec
        self.sandbox_pidns[container_id] = sandbox_pidns
        self.storages[container_id] = list(storages)
        self.processes[(container_id, "")] = FakeProcess(container_id, "", echo=self.echo)

    async def start_container(self, container_id: str) -> None:
        self.calls.append(("StartContainer", container_id, ""))
        self.process(container_id).started = True

    async def exec_process(self, container_id: str, exec_id: str,
                           process: oci_pb2.Process) -> None:
        self.calls.append(("ExecProcess", container_id, exec_id))
        self.processes[(container_id, exec_id)] = FakeProcess(
            container_id, exec_id, echo=self.echo, started=True)

    async def signal_process(self, container_id: str, exec_id: str, signal: int) -> None:
        self.calls.append(("SignalProcess", container_id, exec_id))
        process = self.process(container_id, exec_id)
        process.signals.append(signal)
        if signal in (9, 15):
            await self.finish(container_id, exec_id, 128 + signal)

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        status: int = await self._pending(asyncio.shield(self.process(container_id, exec_id).exit))
        return status

    async def read_stdout(self, container_id: str, exec_id: str, size: int) -> bytes:
        data: bytes = await self._pending(self.process(container_id, exec_id).stdout.read(size))
        return data

    async def read_stderr(self, container_id: str, exec_id: str, size: int) -> bytes:
        data: bytes = await self._pending(self.process(container_id, exec_id).stderr.read(size))
        return data

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

    async def stats_container(self, container_id: str) -> agent_pb2.StatsContainerResponse:
        stats = agent_pb2.StatsContainerResponse()
        stats.cgroup_stats.cpu_stats.cpu_usage.total_usage = 7_000 * len(container_id)
        stats.cgroup_stats.pids_stats.current = 1
        return stats

    async def update_container(self, container_id: str,
                               resources: oci_pb2.LinuxResources) -> None:
        self.updates.append((container_id, resources))

    async def remove_container(self, container_id: str) -> None:
        self.calls.append(("RemoveContainer", container_id, ""))
        self.containers.pop(container_id, None)

    async def get_oom_event(self) -> str:
        oom: str = await self._pending(self.oom_events.get())
        return oom

    async def close(self) -> None:
        self.closed = True
        self._gone.set()

    def reconnect(self) -> None:
        """A new connection to the same fake guest (a later boot reuses the agent)."""
        self.closed = False
        self._gone = asyncio.Event()


class FakeVm:
    """A VM (``hypervisor.vm.VirtualMachine``) that runs until stopped or told to die."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid: int | None = os.getpid() if pid is None else pid
        self.channel: AgentChannel | None = AgentChannel(3, None)
        self.stopped = False
        self._exit: asyncio.Future[ExitReason] = asyncio.get_running_loop().create_future()

    def die(self, detail: str = "QEMU killed by SIGKILL") -> None:
        if not self._exit.done():
            self._exit.set_result(ExitReason("killed", detail, False, -9))

    async def wait(self) -> ExitReason:
        return await asyncio.shield(self._exit)

    async def stop(self, powerdown_timeout: float | None = None) -> ExitReason:
        self.stopped = True
        if not self._exit.done():
            self._exit.set_result(ExitReason("shutdown", "host-qmp-quit", True, 0))
        return self._exit.result()

    async def aclose(self) -> None:
        await self.stop(0)


class FakeRootfs:
    """A rootfs strategy that records what it was asked (nothing is mounted)."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.removed: list[str] = []
        self.closed = False
        self.on_close: Callable[[], None] | None = None  # a test's probe

    def vm_shares(self) -> tuple[Share, ...]:
        return ()

    def sandbox_storages(self) -> list[agent_pb2.Storage]:
        return [agent_pb2.Storage(driver="fake", mount_point="/run/fake")]

    async def open(self) -> None:
        pass

    async def add(self, container_id: str, bundle: Path, spec: Mapping[str, object],
                  rootfs: Sequence[Mount]) -> ContainerRootfs:
        self.added.append(container_id)
        return ContainerRootfs(root_path=f"/run/fake/{container_id}/rootfs",
                               mounts=[dict(m) for m in spec_mounts(spec)])

    async def remove(self, container_id: str) -> None:
        self.removed.append(container_id)

    async def close(self) -> None:
        if self.on_close is not None and not self.closed:
            self.on_close()
        self.closed = True


class FakeBooter:
    """Boots FakeVms with the given agent (a new one each boot when none is given)."""

    def __init__(self, agent: FakeAgent | None = None, delay: float = 0.0,
                 pid: int | None = None, enable_annotations: tuple[str, ...] = ()) -> None:
        self.agent = agent
        self.annotations = AnnotationPolicy(frozenset(enable_annotations), "fake.toml")
        self.delay = delay
        self.pid = pid
        self.configs: list[PodConfig] = []
        self.vms: list[FakeVm] = []
        self.rootfs: list[FakeRootfs] = []
        self.failure: Exception | None = None
        # Node-wide boot slots: each boot takes one and its pod holds it, as the real boot
        # script hands it over (None: no admission).
        self.slots: BootSlots | None = None

    async def boot(self, config: PodConfig, clock: BootClock | None = None) -> PodVm:
        self.configs.append(config)
        self.annotations.check(config.spec)  # before anything is made, as the boot script does
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failure is not None:
            raise self.failure
        agent = self.agent
        if agent is None:
            agent = self.agent = FakeAgent()
            # In a real daemon (interop runs): processes behave like `cat`.
            agent.echo = os.environ.get("COCO_FAKE_ECHO") == "1"
        agent.reconnect()
        vm, rootfs = FakeVm(self.pid), FakeRootfs()
        self.vms.append(vm)
        self.rootfs.append(rootfs)
        undo = AsyncExitStack()
        undo.push_async_callback(rootfs.close)
        undo.push_async_callback(vm.aclose)
        undo.push_async_callback(agent.close)
        hold = None
        if self.slots is not None:
            taken = self.slots.try_take(config.sandbox_id)
            assert taken is not None, "the fake boots only with a slot free"
            hold = SlotHold(taken, f"pod {config.sandbox_id}")
            undo.callback(hold.release, "boot undone")
        await agent.create_sandbox(config.sandbox_id, "", [], rootfs.sandbox_storages())
        return PodVm(config.sandbox_id, vm, agent, rootfs, undo, self.annotations,
                     boot_slot=hold)


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[events.Event] = []

    async def publish(self, event: events.Event) -> None:
        self.events.append(event)

    def topics(self) -> list[str]:
        return [e.topic for e in self.events]


def assert_seams(agent: FakeAgent, rootfs: FakeRootfs) -> tuple[Agent, RootfsStrategy]:
    """Type check: the fakes satisfy the seams."""
    return agent, rootfs
