"""The task domain: containers and processes of one pod, driven through a ``PodSandbox``.

No protobuf and no RPC context here (STYLE habit 1): the service edge translates requests into
these calls. Two explicit state machines: ``PodState`` for the shim's pod VM and
``ProcessState`` for every process (a container's init process is the task). Misuse raises
``FailedPrecondition("cannot <verb> in state <state>")``.

Event order is kept here because only the domain knows it: create → start → exit → delete,
exec-added → exec-started → exit, and a container's exit after the exits of all its execs. The
exit of a process is reported (Wait returns, ``/tasks/exit`` is published) only once its output
has been fully copied to containerd's FIFOs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import signal as signals
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from shim.binary.contract import RuntimeOptions, group_id
from shim.core.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ShimError,
    Unavailable,
    Unimplemented,
)
from shim.core.timeouts import TIMEOUTS, Timeouts
from shim.daemon import events
from shim.daemon.events import Stdio as Stdio  # the task domain's stdio, re-exported
from shim.pod.sandbox import (
    ContainerConfig,
    ContainerStats,
    ExecConfig,
    Mount,
    PodSandbox,
    SandboxConfig,
    SandboxFactory,
)
from shim.task.stdio import ProcessIO

log = logging.getLogger(__name__)

T = TypeVar("T")
Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]
UNKNOWN_EXIT_STATUS = 255  # the agent or the VM went away before the process's exit was known


# --- state machines ---------------------------------------------------------------------------


class ProcessState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


class ProcessTransition(enum.Enum):
    """Named transitions: (verb, states it may start from, state it leads to)."""

    START = ("start", frozenset({ProcessState.CREATED}), ProcessState.RUNNING)
    PAUSE = ("pause", frozenset({ProcessState.RUNNING}), ProcessState.PAUSED)
    RESUME = ("resume", frozenset({ProcessState.PAUSED}), ProcessState.RUNNING)
    EXIT = ("exit", frozenset({ProcessState.CREATED, ProcessState.RUNNING,
                               ProcessState.PAUSED}), ProcessState.STOPPED)
    DELETE = ("delete", frozenset({ProcessState.CREATED, ProcessState.STOPPED}),
              ProcessState.DELETED)

    def __init__(self, verb: str, sources: frozenset[ProcessState],
                 target: ProcessState) -> None:
        self.verb = verb
        self.sources = sources
        self.target = target


class PodState(enum.Enum):
    EMPTY = "empty"  # no VM yet: the first Create boots it
    BOOTING = "booting"
    READY = "ready"
    SHUT_DOWN = "shut down"


class PodTransition(enum.Enum):
    BOOT = ("boot", frozenset({PodState.EMPTY}), PodState.BOOTING)
    BOOTED = ("finish booting", frozenset({PodState.BOOTING}), PodState.READY)
    BOOT_FAILED = ("fail booting", frozenset({PodState.BOOTING}), PodState.EMPTY)
    DISCARD = ("discard an early boot", frozenset({PodState.READY}), PodState.EMPTY)
    SHUT_DOWN = ("shut down", frozenset({PodState.EMPTY, PodState.BOOTING, PodState.READY,
                                         PodState.SHUT_DOWN}), PodState.SHUT_DOWN)

    def __init__(self, verb: str, sources: frozenset[PodState], target: PodState) -> None:
        self.verb = verb
        self.sources = sources
        self.target = target


def check(transition: ProcessTransition | PodTransition,
          state: ProcessState | PodState) -> None:
    if state not in transition.sources:
        raise FailedPrecondition(f"cannot {transition.verb} in state {state.value}")


@dataclass
class EarlyBoot:
    """A pod VM booting before containerd's Create arrives (see ``TaskManager.boot_early``)."""

    sandbox_id: str
    bundle: Path
    options: RuntimeOptions
    task: asyncio.Task[None] | None = None
    error: Exception | None = None


@dataclass
class PodRecord:
    """A pod made through the sandbox API: its VM lives from StartSandbox to StopSandbox."""

    sandbox_id: str
    bundle: Path
    spec: dict[str, object]  # what the pod VM is made from: annotations, hostname
    options: RuntimeOptions = field(default_factory=RuntimeOptions)
    pid: int = 0
    created_at: int = 0  # ns; 0 until started
    exited_at: int = 0
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def live(self) -> bool:
        return not self.exited.is_set()

    @property
    def ready(self) -> bool:
        return bool(self.created_at) and self.live


# --- processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessStatus:
    """What State reports."""

    id: str
    exec_id: str
    bundle: str
    pid: int
    state: ProcessState
    stdio: Stdio
    exit_status: int
    exited_at: int  # ns since the epoch, 0 while running


@dataclass(frozen=True)
class Exit:
    pid: int
    exit_status: int
    exited_at: int  # ns since the epoch, 0 if the process never ran


class Process:
    """One process in the guest: a container's init (exec_id "") or an exec."""

    def __init__(self, container_id: str, exec_id: str, stdio: Stdio, io: ProcessIO,
                 exec_spec: Mapping[str, object] | None = None) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.io = io
        self.exec_spec = exec_spec
        self.state = ProcessState.CREATED
        self.pid = 0
        self.exit_status = 0
        self.exited_at = 0
        self.exited = asyncio.Event()  # Wait
        self.exit_published = asyncio.Event()  # the container's own exit waits for its execs'

    @property
    def name(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    def apply(self, transition: ProcessTransition) -> None:
        check(transition, self.state)
        self.state = transition.target


@dataclass
class Container:
    id: str
    bundle: Path
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class CreateTask:
    id: str
    bundle: str
    rootfs: Sequence[Mount] = ()
    stdio: Stdio = field(default_factory=Stdio)
    checkpoint: str = ""
    options: RuntimeOptions = field(default_factory=RuntimeOptions)


@dataclass(frozen=True)
class ExecTask:
    container_id: str
    exec_id: str
    spec: Mapping[str, object]
    stdio: Stdio = field(default_factory=Stdio)


# --- the manager ------------------------------------------------------------------------------


class TaskManager:
    """All containers of one pod. Background loops are spawned through ``spawn`` (the owner's
    TaskGroup), so they are cancelled and awaited with it."""

    def __init__(self, factory: SandboxFactory, publisher: events.Publisher, *, namespace: str,
                 spawn: Spawn, timeouts: Timeouts = TIMEOUTS,
                 on_created: Callable[[str, int], None] | None = None,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._factory = factory
        self._publisher = publisher
        self._namespace = namespace
        self._spawn = spawn
        self._timeouts = timeouts
        self._on_created = on_created
        self._clock_ns = clock_ns
        self._sandbox: PodSandbox | None = None
        self._pod_record: PodRecord | None = None
        self._pod_state = PodState.EMPTY
        self._pod_lock = asyncio.Lock()
        self._containers: dict[str, Container] = {}
        self._early: EarlyBoot | None = None
        self._pod_id = ""  # the sandbox id of the pod VM, once booted
        self.shutdown_requested = asyncio.Event()

    @property
    def pod_state(self) -> PodState:
        return self._pod_state

    def _pod(self, transition: PodTransition) -> None:
        check(transition, self._pod_state)
        self._pod_state = transition.target

    # -- lookups --

    def _container(self, container_id: str) -> Container:
        if not container_id:
            raise InvalidArgument("container id must not be empty")
        container = self._containers.get(container_id)
        if container is None:
            raise NotFound(f"container {container_id} not found")
        return container

    def _process(self, container_id: str, exec_id: str) -> Process:
        container = self._container(container_id)
        if not exec_id:
            return container.init
        process = container.execs.get(exec_id)
        if process is None:
            raise NotFound(f"exec {exec_id} of container {container_id} not found")
        return process

    def _ready_sandbox(self) -> PodSandbox:
        if self._sandbox is None or self._pod_state is not PodState.READY:
            raise Unavailable(f"pod VM is not running (state {self._pod_state.value})")
        return self._sandbox

    async def _agent(self, what: str, timeout: float | None,  # noqa: ASYNC109
                     call: Coroutine[Any, Any, T]) -> T:
        """One agent call under its timeout from the table."""
        try:
            async with asyncio.timeout(timeout):
                return await call
        except TimeoutError as err:
            raise DeadlineExceeded(f"{what}: no answer from the pod VM in {timeout} s") from err

    # -- RPCs --

    async def create(self, request: CreateTask) -> int:
        if not request.id:
            raise InvalidArgument("container id must not be empty")
        if request.checkpoint:
            raise Unimplemented("restoring from a checkpoint is not supported in a pod VM")
        if request.id in self._containers:
            raise AlreadyExists(f"container {request.id} already exists")
        bundle = Path(request.bundle)
        spec = without_network_sysctls(_read_spec(bundle))
        sandbox_id = _sandbox_id(spec, request.id)
        await self._adopt_early_boot(sandbox_id, bundle, request.options)
        sandbox = await self._ensure_sandbox(sandbox_id, bundle, spec, request.options)
        io = ProcessIO(sandbox, request.id, "", stdin=request.stdio.stdin,
                       stdout=request.stdio.stdout, stderr=request.stdio.stderr,
                       terminal=request.stdio.terminal, timeouts=self._timeouts)
        init = Process(request.id, "", request.stdio, io)
        container = Container(request.id, bundle, init)
        self._containers[request.id] = container  # reserve the id while the agent works
        try:
            io.open()
            await self._agent("CreateContainer", self._timeouts.create_container,
                              sandbox.create_container(ContainerConfig(
                                  container_id=request.id, bundle=bundle, spec=spec,
                                  rootfs=tuple(request.rootfs),
                                  terminal=request.stdio.terminal,
                                  stdin=bool(request.stdio.stdin),
                                  stdout=bool(request.stdio.stdout),
                                  stderr=bool(request.stdio.stderr))))
        except OSError as err:
            del self._containers[request.id]
            io.close_fds()
            raise InvalidArgument(f"container {request.id}: cannot open stdio: {err}") from err
        except BaseException:
            del self._containers[request.id]
            io.close_fds()
            raise
        init.pid = sandbox.pid
        if self._on_created is not None:
            self._on_created(request.id, init.pid)
        await self._publisher.publish(events.TaskCreate(
            container_id=request.id, bundle=request.bundle, pid=init.pid,
            io=request.stdio))
        return init.pid

    async def _ensure_sandbox(self, sandbox_id: str, bundle: Path, spec: Mapping[str, object],
                              options: RuntimeOptions) -> PodSandbox:
        async with self._pod_lock:
            if self._pod_state is PodState.READY and self._sandbox is not None:
                return self._sandbox
            self._pod(PodTransition.BOOT)
            try:
                config = SandboxConfig(sandbox_id=sandbox_id, namespace=self._namespace,
                                       bundle=bundle, spec=spec, options=options)
                async with asyncio.timeout(self._timeouts.create_sandbox):
                    self._sandbox = await self._factory.create_sandbox(config)
                self._pod_id = sandbox_id
            except TimeoutError as err:
                self._pod(PodTransition.BOOT_FAILED)
                raise DeadlineExceeded(
                    f"pod VM did not boot in {self._timeouts.create_sandbox} s") from err
            except BaseException:
                self._pod(PodTransition.BOOT_FAILED)
                raise
            self._pod(PodTransition.BOOTED)
            self._spawn(self._watch_oom(self._sandbox))
            return self._sandbox

    # -- early boot --

    def boot_early(self, sandbox_id: str, bundle: Path, options: RuntimeOptions) -> None:
        """Start booting the pod VM now, from the bundle ``start`` was given, instead of when
        containerd's Create arrives: the daemon's own start-up and containerd's round trips then
        overlap the boot, which is most of a Create.

        The first Create adopts it when it names the same pod and runtime options (a boot
        failure is then that Create's error); otherwise the VM is discarded and Create boots
        its own. A sandbox API CreateSandbox (whose VM must wait for CNI) or teardown cancels
        it. Nothing here raises: a bundle that cannot be read is left for Create to report.
        """
        try:
            spec = without_network_sysctls(_read_spec(bundle))
        except ShimError as err:
            log.info("no early boot: %s", err)
            return
        early = EarlyBoot(sandbox_id, bundle, options)

        async def boot() -> None:
            try:
                await self._ensure_sandbox(sandbox_id, bundle, spec, options)
            except Exception as err:  # reported by the Create that adopts it
                early.error = err
                log.info("early boot of pod %s failed: %s", sandbox_id, err)

        early.task = self._spawn(boot())
        self._early = early

    async def _adopt_early_boot(self, sandbox_id: str, bundle: Path,
                                options: RuntimeOptions) -> None:
        early, self._early = self._early, None
        if early is None or early.task is None:
            return
        if (early.sandbox_id, early.bundle, early.options) != (sandbox_id, bundle, options):
            log.info("early boot of pod %s (bundle %s) does not match Create: discarded",
                     early.sandbox_id, early.bundle)
            await self._discard_early_boot(early)
            return
        await asyncio.wait({early.task})  # the boot goes on if this Create is cancelled
        if early.error is not None:
            raise early.error

    async def _cancel_early_boot(self) -> None:
        early, self._early = self._early, None
        if early is not None:
            await self._discard_early_boot(early)

    async def _discard_early_boot(self, early: EarlyBoot) -> None:
        """Cancel a boot in progress (its start script undoes itself) or stop a booted VM."""
        assert early.task is not None
        early.task.cancel()
        await asyncio.wait({early.task})
        async with self._pod_lock:
            if self._pod_state is not PodState.READY or self._sandbox is None:
                return
            sandbox, self._sandbox = self._sandbox, None
            self._pod(PodTransition.DISCARD)
        try:
            async with asyncio.timeout(self._timeouts.shutdown_sandbox):
                await sandbox.shutdown()
        except Exception as err:  # delete reaps what is left
            log.error("discarded pod VM shutdown failed: %s", err)

    async def _watch_oom(self, sandbox: PodSandbox) -> None:
        """GetOOMEvent long poll → /tasks/oom, for the life of the pod VM."""
        while True:
            try:
                container_id = await sandbox.get_oom_event()
            except ShimError as err:  # agent gone or too old: OOM events stop, tasks go on
                log.warning("OOM events stopped: %s", err)
                return
            if container_id in self._containers:
                await self._publisher.publish(events.TaskOOM(container_id=container_id))

    async def start(self, container_id: str, exec_id: str = "") -> int:
        container = self._container(container_id)
        sandbox = self._ready_sandbox()
        async with container.lock:
            process = self._process(container_id, exec_id)
            check(ProcessTransition.START, process.state)
            if exec_id:
                if container.init.state is not ProcessState.RUNNING:
                    raise FailedPrecondition(
                        f"cannot start exec in container state {container.init.state.value}")
                assert process.exec_spec is not None
                await self._agent("ExecProcess", self._timeouts.exec_process,
                                  sandbox.exec_process(ExecConfig(
                                      container_id=container_id, exec_id=exec_id,
                                      process=process.exec_spec,
                                      terminal=process.stdio.terminal,
                                      stdin=bool(process.stdio.stdin))))
                process.pid = sandbox.pid
            else:
                await self._agent("StartContainer", self._timeouts.start_container,
                                  sandbox.start_container(container_id))
            process.apply(ProcessTransition.START)
            process.io.start(self._spawn)
            if exec_id:
                await self._publisher.publish(events.TaskExecStarted(
                    container_id=container_id, exec_id=exec_id, pid=process.pid))
            else:
                await self._publisher.publish(events.TaskStart(container_id=container_id,
                                                               pid=process.pid))
            self._spawn(self._reap(container, process))
            return process.pid

    async def _reap(self, container: Container, process: Process) -> None:
        """Wait for the exit, let the output drain, then report it (Wait + /tasks/exit)."""
        sandbox = self._ready_sandbox()
        try:
            status = await sandbox.wait_process(process.container_id, process.exec_id)
        except ShimError as err:
            log.error("%s: WaitProcess failed, reporting exit %d: %s", process.name,
                      UNKNOWN_EXIT_STATUS, err)
            status = UNKNOWN_EXIT_STATUS
        await process.io.output_done()
        if process is container.init:
            await self._await_execs(container, sandbox)
        process.exit_status = status
        process.exited_at = self._clock_ns()
        process.apply(ProcessTransition.EXIT)
        process.exited.set()
        try:
            await self._publisher.publish(events.TaskExit(
                container_id=process.container_id, id=process.exec_id or process.container_id,
                pid=process.pid, exit_status=status, exited_at=process.exited_at))
        finally:
            process.exit_published.set()

    async def _await_execs(self, container: Container, sandbox: PodSandbox) -> None:
        """The init process died: its execs die with the container; report their exits first."""
        live = [p for p in container.execs.values()
                if p.state in (ProcessState.RUNNING, ProcessState.PAUSED)]
        for process in live:
            with contextlib.suppress(ShimError, TimeoutError):
                async with asyncio.timeout(self._timeouts.signal_process):
                    await sandbox.signal_process(container.id, process.exec_id, signals.SIGKILL)
        if live:
            try:
                async with asyncio.timeout(self._timeouts.execs_after_init):
                    for process in live:
                        await process.exit_published.wait()
            except TimeoutError:
                log.error("%s: execs did not exit after the container did", container.id)

    async def state(self, container_id: str, exec_id: str = "") -> ProcessStatus:
        container = self._container(container_id)
        process = self._process(container_id, exec_id)
        return ProcessStatus(id=container_id, exec_id=exec_id, bundle=str(container.bundle),
                             pid=process.pid, state=process.state, stdio=process.stdio,
                             exit_status=process.exit_status, exited_at=process.exited_at)

    async def wait(self, container_id: str, exec_id: str = "") -> Exit:
        """Until the process has exited and its output was copied. No timeout (long poll)."""
        process = self._process(container_id, exec_id)
        await process.exited.wait()  # containerd calls Wait before Start: that is fine
        if process.exited_at == 0:
            raise NotFound(f"process {process.name} was deleted before it ran")
        return Exit(process.pid, process.exit_status, process.exited_at)

    async def kill(self, container_id: str, exec_id: str, signal: int, all: bool) -> None:
        container = self._container(container_id)
        process = self._process(container_id, exec_id)
        if process.state in (ProcessState.STOPPED, ProcessState.DELETED):
            raise NotFound(f"process {process.name} already finished")
        if exec_id and process.state is ProcessState.CREATED:
            raise FailedPrecondition(f"cannot kill exec {process.name} in state created")
        sandbox = self._ready_sandbox()
        targets = [process]
        if all and not exec_id:
            targets += [p for p in container.execs.values()
                        if p.state in (ProcessState.RUNNING, ProcessState.PAUSED)]
        for target in targets:
            await self._agent("SignalProcess", self._timeouts.signal_process,
                              sandbox.signal_process(container_id, target.exec_id, signal))

    async def delete(self, container_id: str, exec_id: str = "") -> Exit:
        container = self._container(container_id)
        async with container.lock:
            process = self._process(container_id, exec_id)
            check(ProcessTransition.DELETE, process.state)
            if not exec_id:
                live = [p.exec_id for p in container.execs.values()
                        if p.state in (ProcessState.RUNNING, ProcessState.PAUSED)]
                if live:
                    raise FailedPrecondition(
                        f"cannot delete container {container_id} with running execs {live}")
                sandbox = self._ready_sandbox()
                if self._pod_ends_with(container_id):
                    await sandbox.release_container(container_id)
                else:
                    await self._agent("RemoveContainer", self._timeouts.remove_container,
                                      sandbox.remove_container(container_id))
            never_ran = process.state is ProcessState.CREATED
            process.apply(ProcessTransition.DELETE)
            if never_ran:
                process.exited.set()  # release Wait callers: there will be no exit
            await process.io.aclose()
            if exec_id:
                del container.execs[exec_id]
            else:
                for child in container.execs.values():
                    await child.io.aclose()
                del self._containers[container_id]
                await self._publisher.publish(events.TaskDelete(
                    container_id=container_id, pid=process.pid,
                    exit_status=process.exit_status, exited_at=process.exited_at,
                    id=container_id))
            return Exit(process.pid, process.exit_status, process.exited_at)

    def _pod_ends_with(self, container_id: str) -> bool:
        """A lone `ctr run` container, or a CRI pod's sandbox container deleted last: the pod
        is that container, and containerd's Shutdown follows its Delete. RemoveContainer in the
        guest would be wasted work (≈0.1 s under TCG) just before DestroySandbox."""
        return (self._pod_record is None and container_id == self._pod_id
                and list(self._containers) == [container_id])

    async def exec(self, request: ExecTask) -> None:
        container = self._container(request.container_id)
        if not request.exec_id:
            raise InvalidArgument("exec id must not be empty")
        async with container.lock:
            if container.init.state is not ProcessState.RUNNING:
                raise FailedPrecondition(
                    f"cannot exec in container state {container.init.state.value}")
            if request.exec_id in container.execs:
                raise AlreadyExists(f"exec {request.exec_id} already exists")
            sandbox = self._ready_sandbox()
            io = ProcessIO(sandbox, request.container_id, request.exec_id,
                           stdin=request.stdio.stdin, stdout=request.stdio.stdout,
                           stderr=request.stdio.stderr, terminal=request.stdio.terminal,
                           timeouts=self._timeouts)
            try:
                io.open()
            except OSError as err:
                raise InvalidArgument(f"exec {request.exec_id}: cannot open stdio: {err}") from err
            container.execs[request.exec_id] = Process(request.container_id, request.exec_id,
                                                       request.stdio, io, request.spec)
            await self._publisher.publish(events.TaskExecAdded(
                container_id=request.container_id, exec_id=request.exec_id))

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        process = self._process(container_id, exec_id)
        if process.state not in (ProcessState.RUNNING, ProcessState.PAUSED):
            raise FailedPrecondition(f"cannot resize pty in state {process.state.value}")
        if not process.stdio.terminal:
            raise FailedPrecondition(f"process {process.name} has no terminal")
        sandbox = self._ready_sandbox()
        await self._agent("TtyWinResize", self._timeouts.tty_win_resize,
                          sandbox.tty_win_resize(container_id, exec_id, height, width))

    async def close_io(self, container_id: str, exec_id: str, stdin: bool) -> None:
        process = self._process(container_id, exec_id)
        if stdin:
            await process.io.close_stdin()

    async def pids(self, container_id: str) -> list[int]:
        """Kata semantics: the guest's pids mean nothing on the host; the VM stands for them."""
        container = self._container(container_id)
        return [container.init.pid] if container.init.pid else []

    async def pause(self, container_id: str) -> None:
        container = self._container(container_id)
        async with container.lock:
            check(ProcessTransition.PAUSE, container.init.state)
            sandbox = self._ready_sandbox()
            await self._agent("PauseContainer", self._timeouts.pause_resume,
                              sandbox.pause_container(container_id))
            container.init.apply(ProcessTransition.PAUSE)
            await self._publisher.publish(events.TaskPaused(container_id=container_id))

    async def resume(self, container_id: str) -> None:
        container = self._container(container_id)
        async with container.lock:
            check(ProcessTransition.RESUME, container.init.state)
            sandbox = self._ready_sandbox()
            await self._agent("ResumeContainer", self._timeouts.pause_resume,
                              sandbox.resume_container(container_id))
            container.init.apply(ProcessTransition.RESUME)
            await self._publisher.publish(events.TaskResumed(container_id=container_id))

    async def update(self, container_id: str, resources: Mapping[str, object]) -> None:
        container = self._container(container_id)
        if container.init.state in (ProcessState.STOPPED, ProcessState.DELETED):
            raise FailedPrecondition(f"cannot update in state {container.init.state.value}")
        sandbox = self._ready_sandbox()
        await self._agent("UpdateContainer", self._timeouts.update_container,
                          sandbox.update_container(container_id, resources))

    async def stats(self, container_id: str) -> ContainerStats:
        container = self._container(container_id)
        if container.init.state in (ProcessState.STOPPED, ProcessState.DELETED):
            raise FailedPrecondition(f"cannot read stats in state {container.init.state.value}")
        sandbox = self._ready_sandbox()
        return await self._agent("StatsContainer", self._timeouts.stats_container,
                                 sandbox.stats_container(container_id))

    async def connect(self, container_id: str) -> tuple[int, int]:
        """(shim pid, task pid); an unknown id is not an error (task pid 0), as in the Go shim."""
        container = self._containers.get(container_id)
        return os.getpid(), container.init.pid if container is not None else 0

    async def shutdown(self, now: bool) -> bool:
        """Shutdown: honoured only once the pod has no containers left and no pod-level
        sandbox is running (or ``now``)."""
        pod_live = self._pod_record is not None and self._pod_record.live
        if (self._containers or pod_live) and not now:
            return False
        self.shutdown_requested.set()
        return True

    # -- pod-level sandbox (containerd.runtime.sandbox.v1, CRI ``sandboxer = "shim"``) --

    async def create_pod(self, pod: PodRecord) -> None:
        """CreateSandbox: remember the pod; its VM boots at StartSandbox (after CNI ran)."""
        if self._pod_record is not None:
            raise AlreadyExists(f"sandbox {self._pod_record.sandbox_id} already exists")
        await self._cancel_early_boot()  # this pod's VM boots at StartSandbox, after CNI
        self._pod_record = pod

    def _pod_of(self, sandbox_id: str) -> PodRecord:
        if self._pod_record is None or self._pod_record.sandbox_id != sandbox_id:
            raise NotFound(f"sandbox {sandbox_id} not found")
        return self._pod_record

    async def start_pod(self, sandbox_id: str) -> PodRecord:
        """StartSandbox: boot the pod VM; containers created later share it."""
        pod = self._pod_of(sandbox_id)
        if pod.created_at:
            raise FailedPrecondition(f"sandbox {sandbox_id} already started")
        sandbox = await self._ensure_sandbox(sandbox_id, pod.bundle, pod.spec, pod.options)
        pod.pid, pod.created_at = sandbox.pid, self._clock_ns()
        return pod

    async def stop_pod(self, sandbox_id: str) -> None:
        """StopSandbox: stop the pod VM (every process in it is gone). Idempotent."""
        pod = self._pod_of(sandbox_id)
        async with self._pod_lock:
            sandbox, self._sandbox = self._sandbox, None
            self._pod(PodTransition.SHUT_DOWN)
        if sandbox is not None:
            try:
                async with asyncio.timeout(self._timeouts.shutdown_sandbox):
                    await sandbox.shutdown()
            except Exception as err:  # the pod is stopped either way; delete reaps the rest
                log.error("pod VM shutdown failed: %s", err)
        if not pod.exited_at:
            pod.exited_at = self._clock_ns()
        pod.exited.set()

    async def wait_pod(self, sandbox_id: str) -> PodRecord:
        """WaitSandbox: until the pod is stopped (long poll, no timeout)."""
        pod = self._pod_of(sandbox_id)
        await pod.exited.wait()
        return pod

    def pod_status(self, sandbox_id: str) -> PodRecord:
        return self._pod_of(sandbox_id)

    async def shutdown_pod(self, sandbox_id: str) -> None:
        """ShutdownSandbox: stop the VM if still running, then this daemon."""
        await self.stop_pod(sandbox_id)
        self.shutdown_requested.set()

    async def aclose(self) -> None:
        """Teardown: stop every relay and the pod VM. Idempotent."""
        await self._cancel_early_boot()
        for container in list(self._containers.values()):
            for process in [container.init, *container.execs.values()]:
                await process.io.aclose()
        self._containers.clear()
        async with self._pod_lock:
            sandbox, self._sandbox = self._sandbox, None
            self._pod(PodTransition.SHUT_DOWN)
        if sandbox is not None:
            try:
                async with asyncio.timeout(self._timeouts.shutdown_sandbox):
                    await sandbox.shutdown()
            except Exception as err:  # teardown goes on; delete reaps what is left
                log.error("pod VM shutdown failed: %s", err)


def _read_spec(bundle: Path) -> dict[str, object]:
    try:
        spec = json.loads((bundle / "config.json").read_text())
    except FileNotFoundError as err:
        raise InvalidArgument(f"bundle {bundle} has no config.json") from err
    except (OSError, ValueError) as err:
        raise InvalidArgument(f"cannot read {bundle / 'config.json'}: {err}") from err
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{bundle / 'config.json'} is not a JSON object")
    return spec


def without_network_sysctls(spec: dict[str, object]) -> dict[str, object]:
    """``spec`` minus its ``net.*`` sysctls.

    In a pod VM every container shares the guest's network (the VM is the pod's network
    boundary), so the network namespace entry is dropped on the way to the guest, and runc there
    refuses network sysctls outside a network namespace of their own. CRI adds
    ``net.ipv4.ip_unprivileged_port_start`` and ``net.ipv4.ping_group_range`` to every pod.
    """
    linux = spec.get("linux")
    if not isinstance(linux, dict) or not isinstance(linux.get("sysctl"), dict):
        return spec
    sysctl: dict[str, object] = linux["sysctl"]
    dropped = sorted(key for key in sysctl if key.startswith("net."))
    if not dropped:
        return spec
    log.info("network sysctls dropped (the pod VM's network is shared): %s", ", ".join(dropped))
    kept = {key: value for key, value in sysctl.items() if not key.startswith("net.")}
    return {**spec, "linux": {**linux, "sysctl": kept}}


def _sandbox_id(spec: Mapping[str, object], container_id: str) -> str:
    return group_id(dict(spec), container_id)
