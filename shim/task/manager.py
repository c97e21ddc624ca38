"""The task domain: the containers and processes of one pod, run in its VM (:mod:`shim.pod`).

No protobuf and no RPC context here (STYLE habit 1): the service edge translates requests into
these calls. The pod VM's life (boot, early boot, exit, shutdown) is the :class:`Pod`'s; this
manager asks it for the running VM and hears from it when the VM dies (:meth:`vm_exited`) or a
container runs out of memory (:meth:`oom`). Agent calls are bounded by the agent facade's
per-RPC table, never here.

Event order is kept here because only the domain knows it: create → start → exit → delete,
exec-added → exec-started → exit, and a container's exit after the exits of all its execs. The
exit of a process is reported (Wait returns, ``/tasks/exit`` is published) only once its output
has been fully copied to containerd's FIFOs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal as signals
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shim.core import identifiers
from shim.core.bundle import group_id, read_spec
from shim.core.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RpcError,
    Unavailable,
    Unimplemented,
)
from shim.core.state_machine import check
from shim.core.timeouts import TIMEOUTS, Timeouts
from shim.pod import guest_spec, metrics
from shim.pod.pod import Pod
from shim.pod.vm import PodConfig
from shim.task import events
from shim.task.process import (
    Container,
    CreateTask,
    ExecTask,
    Exit,
    Process,
    ProcessState,
    ProcessStatus,
    ProcessTransition,
)
from shim.task.stdio import ProcessIO

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]
UNKNOWN_EXIT_STATUS = 255  # the agent or the VM went away before the process's exit was known


@dataclass(frozen=True)
class ContainerStats:
    """Stats' answer, encoded as the Any containerd expects (cgroup v2 Metrics)."""

    type_url: str = ""
    value: bytes = b""


class TaskManager:
    """All containers of one pod. Background loops are spawned through ``spawn`` (the owner's
    TaskGroup), so they are cancelled and awaited with it."""

    def __init__(self, pod: Pod, publisher: events.Publisher, *, namespace: str,
                 spawn: Spawn, timeouts: Timeouts = TIMEOUTS,
                 on_created: Callable[[str, int], None] | None = None,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._pod = pod
        self._publisher = publisher
        self._namespace = namespace
        self._spawn = spawn
        self._timeouts = timeouts
        self._on_created = on_created
        self._clock_ns = clock_ns
        self._containers: dict[str, Container] = {}
        self._reserved: set[str] = set()  # ids whose Create is under way
        self._last_oom: dict[str, float] = {}  # container id → monotonic time of its last OOM
        pod.listen(self)

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

    # -- create --

    async def create(self, request: CreateTask) -> int:
        identifiers.validate("container id", request.id)
        if request.checkpoint:
            raise Unimplemented("restoring from a checkpoint is not supported in a pod VM")
        if request.id in self._containers or request.id in self._reserved:
            raise AlreadyExists(f"container {request.id} already exists")
        self._reserved.add(request.id)  # before any await: a concurrent Create is refused
        try:
            return await self._create(request)
        finally:
            self._reserved.discard(request.id)

    async def _create(self, request: CreateTask) -> int:
        bundle = Path(request.bundle)
        spec = read_spec(bundle)
        vm = await self._pod.ensure_booted(PodConfig(
            sandbox_id=group_id(spec, request.id), namespace=self._namespace, bundle=bundle,
            spec=spec, options=request.options))
        stdio = request.stdio
        io = ProcessIO(vm.agent, request.id, "", stdin=stdio.stdin, stdout=stdio.stdout,
                       stderr=stdio.stderr, terminal=stdio.terminal)
        try:
            io.open()
        except OSError as err:
            raise InvalidArgument(f"container {request.id}: cannot open stdio: {err}") from err
        try:
            await self._pod.create_container(request.id, bundle, spec, tuple(request.rootfs))
        except BaseException:
            io.close_fds()
            raise
        init = Process(request.id, "", stdio, io)
        init.pid = self._pod.pid
        self._containers[request.id] = Container(request.id, bundle, init)
        if self._on_created is not None:
            self._on_created(request.id, init.pid)
        await self._publisher.publish(events.TaskCreate(
            container_id=request.id, bundle=request.bundle, pid=init.pid, io=stdio))
        return init.pid

    # -- start, and the exit of what was started --

    async def start(self, container_id: str, exec_id: str = "") -> int:
        container = self._container(container_id)
        agent = self._pod.ready_vm().agent
        async with container.lock:
            process = self._process(container_id, exec_id)
            check(ProcessTransition.START, process.state)
            if exec_id:
                if container.init.state is not ProcessState.RUNNING:
                    raise FailedPrecondition(
                        f"cannot start exec in container state {container.init.state.value}")
                assert process.exec_spec is not None
                await agent.exec_process(container_id, exec_id, guest_spec.process(
                    process.exec_spec, f"exec {exec_id}"))
                process.pid = self._pod.pid
            else:
                await self._pod.ready_vm().start_container(container_id)  # ends the boot
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
        try:
            status = await self._pod.wait_process(process.container_id, process.exec_id)
        except RpcError as err:
            log.error("%s: WaitProcess failed, reporting exit %d: %s", process.name,
                      UNKNOWN_EXIT_STATUS, err)
            status = UNKNOWN_EXIT_STATUS
        try:
            async with asyncio.timeout(self._timeouts.output_drain):
                await process.io.output_done()
        except TimeoutError:
            log.error("%s: output still streaming %.0f s after the exit: relay cancelled",
                      process.name, self._timeouts.output_drain)
            await process.io.cancel_output()
        if process is container.init:
            await self._await_execs(container)
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

    async def _await_execs(self, container: Container) -> None:
        """The init process died: its execs die with the container; report their exits first."""
        live = [p for p in container.execs.values() if p.live]
        for process in live:
            try:
                await self._pod.ready_vm().agent.signal_process(
                    container.id, process.exec_id, signals.SIGKILL)
            except RpcError as err:  # gone already, or the VM is: their exits come anyway
                log.debug("%s: SIGKILL: %s", process.name, err)
        if live:
            try:
                async with asyncio.timeout(self._timeouts.execs_after_init):
                    for process in live:
                        await process.exit_published.wait()
            except TimeoutError:
                log.error("%s: execs did not exit after the container did", container.id)

    async def vm_exited(self) -> None:
        """The pod's VM died: each started process's reaper reports it killed (the pod answers
        its WaitProcess with 137); until all of them have."""
        for container in list(self._containers.values()):
            for process in container.processes():
                if process.live:
                    await process.exit_published.wait()

    async def oom(self, container_id: str) -> None:
        """One /tasks/oom per container per ``oom_event_interval``: the guest decides how often
        it reports, and must not flood containerd's event bus."""
        if container_id not in self._containers:
            return
        now = time.monotonic()
        last = self._last_oom.get(container_id)
        if last is not None and now - last < self._timeouts.oom_event_interval:
            return
        self._last_oom[container_id] = now
        await self._publisher.publish(events.TaskOOM(container_id=container_id))

    # -- the other RPCs --

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
        agent = self._pod.ready_vm().agent
        targets = [process]
        if all and not exec_id:
            targets += [p for p in container.execs.values() if p.live]
        for target in targets:
            try:
                await agent.signal_process(container_id, target.exec_id, signal)
            except (DeadlineExceeded, Unavailable) as err:
                if signal != signals.SIGKILL:
                    raise
                # A SIGKILL the agent does not carry out: the only way left to kill the
                # process is to stop its VM. The pod fails; every process exits 137.
                log.error("%s: SIGKILL got no answer (%s): failing the pod", target.name, err)
                await self._pod.fail(err, forceful=True)
                return

    async def delete(self, container_id: str, exec_id: str = "") -> Exit:
        container = self._container(container_id)
        async with container.lock:
            process = self._process(container_id, exec_id)
            check(ProcessTransition.DELETE, process.state)
            if not exec_id:
                live = [p.exec_id for p in container.execs.values() if p.live]
                if live:
                    raise FailedPrecondition(
                        f"cannot delete container {container_id} with running execs {live}")
                await self._pod.remove_container(
                    container_id, in_guest=not self._pod_ends_with(container_id))
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
                self._last_oom.pop(container_id, None)
                await self._publisher.publish(events.TaskDelete(
                    container_id=container_id, pid=process.pid,
                    exit_status=process.exit_status, exited_at=process.exited_at, id=container_id))
            return Exit(process.pid, process.exit_status, process.exited_at)

    def _pod_ends_with(self, container_id: str) -> bool:
        """A lone `ctr run` container, or a CRI pod's sandbox container deleted last: the pod
        is that container, and containerd's Shutdown follows its Delete. RemoveContainer in the
        guest would be wasted work (≈0.1 s under TCG) just before DestroySandbox."""
        return (not self._pod.sandbox_api and container_id == self._pod.sandbox_id
                and list(self._containers) == [container_id])

    async def exec(self, request: ExecTask) -> None:
        container = self._container(request.container_id)
        identifiers.validate("exec id", request.exec_id)
        async with container.lock:
            if container.init.state is not ProcessState.RUNNING:
                raise FailedPrecondition(
                    f"cannot exec in container state {container.init.state.value}")
            if request.exec_id in container.execs:
                raise AlreadyExists(f"exec {request.exec_id} already exists")
            stdio = request.stdio
            io = ProcessIO(self._pod.ready_vm().agent, request.container_id, request.exec_id,
                           stdin=stdio.stdin, stdout=stdio.stdout, stderr=stdio.stderr,
                           terminal=stdio.terminal)
            try:
                io.open()
            except OSError as err:
                raise InvalidArgument(f"exec {request.exec_id}: cannot open stdio: {err}") from err
            container.execs[request.exec_id] = Process(request.container_id, request.exec_id,
                                                       stdio, io, request.spec)
            await self._publisher.publish(events.TaskExecAdded(
                container_id=request.container_id, exec_id=request.exec_id))

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        process = self._process(container_id, exec_id)
        if not process.live:
            raise FailedPrecondition(f"cannot resize pty in state {process.state.value}")
        if not process.stdio.terminal:
            raise FailedPrecondition(f"process {process.name} has no terminal")
        await self._pod.ready_vm().agent.tty_win_resize(container_id, exec_id, height, width)

    async def close_io(self, container_id: str, exec_id: str, stdin: bool) -> None:
        process = self._process(container_id, exec_id)
        if stdin:
            try:
                async with asyncio.timeout(self._timeouts.stdin_flush):
                    await process.io.close_stdin()
            except TimeoutError:
                log.error("%s: stdin not flushed within %.0f s: closing it anyway",
                          process.name, self._timeouts.stdin_flush)
                await process.io.abort_stdin()

    async def pids(self, container_id: str) -> list[int]:
        """Kata semantics: the guest's pids mean nothing on the host; the VM stands for them."""
        container = self._container(container_id)
        return [container.init.pid] if container.init.pid else []

    async def pause(self, container_id: str) -> None:
        container = self._container(container_id)
        async with container.lock:
            check(ProcessTransition.PAUSE, container.init.state)
            await self._pod.ready_vm().agent.pause_container(container_id)
            container.init.apply(ProcessTransition.PAUSE)
            await self._publisher.publish(events.TaskPaused(container_id=container_id))

    async def resume(self, container_id: str) -> None:
        container = self._container(container_id)
        async with container.lock:
            check(ProcessTransition.RESUME, container.init.state)
            await self._pod.ready_vm().agent.resume_container(container_id)
            container.init.apply(ProcessTransition.RESUME)
            await self._publisher.publish(events.TaskResumed(container_id=container_id))

    async def update(self, container_id: str, resources: Mapping[str, object]) -> None:
        container = self._container(container_id)
        if container.init.state in (ProcessState.STOPPED, ProcessState.DELETED):
            raise FailedPrecondition(f"cannot update in state {container.init.state.value}")
        converted = guest_spec.resources(resources, f"update {container_id}")
        vm = self._pod.ready_vm()
        from shim.pod import sizing  # hypervisor.profile: ≈ 35 ms before the first RPC
        sizing.check_update(vm.size, container_id, resources)  # no hotplug: refused beyond it
        await vm.agent.update_container(container_id, converted)

    async def stats(self, container_id: str) -> ContainerStats:
        container = self._container(container_id)
        if container.init.state in (ProcessState.STOPPED, ProcessState.DELETED):
            raise FailedPrecondition(f"cannot read stats in state {container.init.state.value}")
        reply = await self._pod.ready_vm().agent.stats_container(container_id)
        return ContainerStats(type_url=metrics.TYPE_URL,
                              value=metrics.to_cgroup2_metrics(reply).SerializeToString())

    async def connect(self, container_id: str) -> tuple[int, int]:
        """(shim pid, task pid); an unknown id is not an error (task pid 0), as in the Go shim."""
        container = self._containers.get(container_id)
        return os.getpid(), container.init.pid if container is not None else 0

    async def shutdown(self, now: bool) -> bool:
        """Shutdown: honoured only once the pod has no containers left and no sandbox API pod
        is running (or ``now``)."""
        busy = self._containers or self._reserved or self._pod.holds_the_daemon
        if busy and not now:
            return False
        self._pod.shutdown_requested.set()
        return True

    async def aclose(self) -> None:
        """Teardown of the tasks: stop every relay. (The pod's VM is the pod's to stop.)"""
        for container in list(self._containers.values()):
            for process in container.processes():
                await process.io.aclose()
        self._containers.clear()
