"""The pod: one VM's whole life, as an explicit state machine.

::

    EMPTY ──boot──▶ BOOTING ──finish booting──▶ READY ──exit (VM died)──▶ EXITED
      │  ▲             │                          │
      │  └─fail booting┘◀──discard an early boot──┘
      └─create (sandbox API)─▶ CREATED ──start──▶ BOOTING … (a failed start: CREATED again)
    any state ──stop──▶ STOPPED

The task API boots the VM at the first Create, or earlier (:meth:`Pod.boot_early`, from
``start``'s bundle), and that Create adopts or discards the early boot. The sandbox API records
the pod at CreateSandbox (CREATED) and boots it at StartSandbox, after CNI. The VM watcher
drives EXITED: every process of the pod exits 137 with its events (the :class:`PodListener`,
the task manager, reports them), then the host side is torn down. :meth:`Pod.shutdown` is the
one way down on purpose; :meth:`Pod.fail` stops the pod when one of its loops crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hypervisor.errors import QemuError
from shim.core.errors import (
    AlreadyExists,
    DeadlineExceeded,
    NotFound,
    RpcError,
    Unavailable,
)
from shim.core.state_machine import Transition, check
from shim.core.timeouts import TIMEOUTS, Timeouts
from shim.pod import guest_spec
from shim.pod.mounts import Mount
from shim.pod.vm import VM_KILLED_STATUS, BootClock, Booter, PodConfig, PodVm

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class PodState(enum.Enum):
    EMPTY = "empty"  # no VM: the first Create boots one
    CREATED = "created"  # sandbox API: recorded at CreateSandbox, boots at StartSandbox
    BOOTING = "booting"
    READY = "ready"
    EXITED = "exited"  # the VM died: its processes were reported killed, then torn down
    STOPPED = "stopped"  # stopped on purpose (StopSandbox, teardown); final


S = PodState


class PodTransition(Transition):
    target: PodState

    CREATE = ("create", {S.EMPTY}, S.CREATED)
    BOOT = ("boot", {S.EMPTY}, S.BOOTING)
    START = ("start", {S.CREATED}, S.BOOTING)
    BOOTED = ("finish booting", {S.BOOTING}, S.READY)
    BOOT_FAILED = ("fail booting", {S.BOOTING}, S.EMPTY)
    START_FAILED = ("fail starting", {S.BOOTING}, S.CREATED)
    DISCARD = ("discard an early boot", {S.READY}, S.EMPTY)
    EXIT = ("exit", {S.READY}, S.EXITED)
    STOP = ("stop", set(S), S.STOPPED)


class PodListener(Protocol):
    """Who hears about the pod's processes (the task manager)."""

    async def vm_exited(self) -> None:
        """The VM died: report every started process exited (137); return once reported."""
        ...

    async def oom(self, container_id: str) -> None:
        """A container of the pod hit its memory limit."""
        ...


@dataclass(frozen=True)
class PodStatus:
    """What the sandbox API reports."""

    sandbox_id: str
    state: PodState
    pid: int
    created_at: int  # ns since the epoch; 0 until started
    exited_at: int  # 0 while not over
    exit_status: int


@dataclass
class EarlyBoot:
    config: PodConfig
    task: asyncio.Task[None] | None = None
    error: Exception | None = None


class Pod:
    """One pod VM's life. Background loops (the early boot, the VM and OOM watchers) are
    spawned through ``spawn``, the owner's TaskGroup."""

    def __init__(self, booter: Booter, *, spawn: Spawn, timeouts: Timeouts = TIMEOUTS,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._booter = booter
        self._spawn = spawn
        self._timeouts = timeouts
        self._clock_ns = clock_ns
        self._state = PodState.EMPTY
        self._lock = asyncio.Lock()  # one boot or state change at a time
        self._config: PodConfig | None = None
        self._vm: PodVm | None = None
        self._pid = 0  # the booted VM's hypervisor, kept after it stops (for the status)
        self._early: EarlyBoot | None = None
        self._listener: PodListener | None = None
        self._over = asyncio.Event()  # EXITED or STOPPED
        self.sandbox_api = False  # made through CreateSandbox
        self.created_at = 0
        self.exited_at = 0
        self.exit_status = 0
        self.shutdown_requested = asyncio.Event()  # the daemon stops once this is set

    # --- state --------------------------------------------------------------------------------

    @property
    def state(self) -> PodState:
        return self._state

    def _apply(self, transition: PodTransition) -> None:
        check(transition, self._state)
        self._state = transition.target

    @property
    def sandbox_id(self) -> str:
        return self._config.sandbox_id if self._config is not None else ""

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def holds_the_daemon(self) -> bool:
        """A sandbox API pod keeps its shim until it is stopped, containers or not."""
        return self.sandbox_api and not self._over.is_set()

    def listen(self, listener: PodListener) -> None:
        self._listener = listener

    def ready_vm(self) -> PodVm:
        if self._vm is None or self._state is not PodState.READY:
            raise Unavailable(f"pod VM is not running (state {self._state.value})")
        return self._vm

    # --- booting ------------------------------------------------------------------------------

    async def _boot(self, config: PodConfig, start: PodTransition,
                    failed: PodTransition) -> PodVm:
        async with self._lock:
            if self._state is PodState.READY and self._vm is not None:
                return self._vm  # a concurrent Create booted it
            self._apply(start)
            self._config = config
            try:
                async with asyncio.timeout(self._timeouts.boot) as deadline:
                    vm = await self._booter.boot(config, BootClock(deadline))
            except TimeoutError as err:
                self._apply(failed)
                raise DeadlineExceeded(
                    f"pod VM did not boot in {self._timeouts.boot} s") from err
            except BaseException:
                self._apply(failed)
                raise
            self._vm, self._pid = vm, vm.pid
            self._apply(PodTransition.BOOTED)
        self._spawn(self._watch_vm(vm))
        self._spawn(self._watch_oom(vm))
        return vm

    def boot_early(self, config: PodConfig) -> None:
        """Start booting now, from the bundle ``start`` was given, instead of when Create
        arrives: the daemon's start-up and containerd's round trips then overlap the boot.

        The first Create adopts it when it names the same pod and runtime options (a boot
        failure is then that Create's error); otherwise the VM is discarded and Create boots
        its own. CreateSandbox (whose VM must wait for CNI) or shutdown cancels it.
        """
        early = EarlyBoot(config)

        async def boot() -> None:
            try:
                await self._boot(config, PodTransition.BOOT, PodTransition.BOOT_FAILED)
            except Exception as err:  # reported by the Create that adopts it
                early.error = err
                log.info("early boot of pod %s failed: %s", config.sandbox_id, err)

        early.task = self._spawn(boot())
        self._early = early

    async def ensure_booted(self, config: PodConfig) -> PodVm:
        """Create's pod: adopt the early boot (or discard it), or boot, or the running VM."""
        early, self._early = self._early, None
        if early is not None and early.task is not None:
            if early.config.same_pod(config):
                await asyncio.wait({early.task})  # the boot goes on if this Create is cancelled
                if early.error is not None:
                    raise early.error
            else:
                log.info("early boot of pod %s (bundle %s) does not match Create: discarded",
                         early.config.sandbox_id, early.config.bundle)
                await self._discard(early)
        return await self._boot(config, PodTransition.BOOT, PodTransition.BOOT_FAILED)

    async def _cancel_early_boot(self) -> None:
        early, self._early = self._early, None
        if early is not None:
            await self._discard(early)

    async def _discard(self, early: EarlyBoot) -> None:
        """Cancel a boot in progress (its script undoes itself) or stop a VM it booted."""
        assert early.task is not None
        early.task.cancel()
        await asyncio.wait({early.task})
        async with self._lock:
            if self._state is not PodState.READY or self._vm is None:
                return
            vm, self._vm, self._pid = self._vm, None, 0
            self._apply(PodTransition.DISCARD)
        await self._stop_vm(vm)

    # --- the VM's life ------------------------------------------------------------------------

    async def _watch_vm(self, vm: PodVm) -> None:
        reason = await vm.vm.wait()
        await self._vm_exited(vm, str(reason))

    async def _vm_exited(self, vm: PodVm, why: str) -> None:
        """The VM is gone without being asked: EXITED, every process reported, torn down."""
        if vm.exited.is_set():
            return  # stopped on purpose, or already handled
        vm.exited.set()
        if self._vm is not vm or self._state is not PodState.READY:
            return
        self._apply(PodTransition.EXIT)
        log.warning("pod %s: VM exited (%s); its processes are reported killed",
                    vm.sandbox_id, why)
        await vm.agent.close()  # every pending agent call fails now
        self.exit_status = VM_KILLED_STATUS
        if self._listener is not None:
            try:
                async with asyncio.timeout(self._timeouts.vm_exit_reports):
                    await self._listener.vm_exited()
            except TimeoutError:
                log.error("pod %s: processes did not report their exits in %s s",
                          vm.sandbox_id, self._timeouts.vm_exit_reports)
        try:
            await self._destroy(vm)
        finally:
            self._end()

    async def _watch_oom(self, vm: PodVm) -> None:
        """GetOOMEvent long poll → the listener; the pod's watch on the agent connection too."""
        while True:
            try:
                container_id = await vm.agent.get_oom_event()
            except Unavailable as err:
                return self.agent_lost(vm, err)
            except RpcError as err:  # an agent without OOM events: they stop, tasks go on
                return log.warning("OOM events stopped: %s", err)
            if self._listener is not None:
                await self._listener.oom(container_id)

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        """WaitProcess, or 137 once the VM is gone (long poll)."""
        vm = self._vm
        if vm is None:
            raise Unavailable(f"pod VM is not running (state {self._state.value})")
        if vm.exited.is_set():
            return VM_KILLED_STATUS
        waiting = asyncio.ensure_future(vm.agent.wait_process(container_id, exec_id))
        gone = asyncio.ensure_future(vm.exited.wait())
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            gone.cancel()
            await asyncio.wait({waiting, gone})  # a cancellation of ours still propagates
        error = None if waiting.cancelled() else waiting.exception()
        if not waiting.cancelled() and error is None:
            return waiting.result()
        if vm.exited.is_set():
            return VM_KILLED_STATUS
        assert error is not None
        if isinstance(error, Unavailable):
            # The agent is gone (QEMU/vhost-device-vsock died, the guest hung up): pod failed.
            self.agent_lost(vm, error)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeouts.vm_stop):
                    await vm.exited.wait()
            return VM_KILLED_STATUS
        raise error

    async def create_container(self, container_id: str, bundle: Path,
                               spec: dict[str, object], rootfs: tuple[Mount, ...]) -> None:
        if self.sandbox_api and self._config is not None:  # no pause container: see there
            spec = guest_spec.with_pod_sysctls(spec, self._config.spec)
        await self.ready_vm().create_container(container_id, bundle, spec, rootfs)

    async def remove_container(self, container_id: str, *, in_guest: bool) -> None:
        """RemoveContainer (while the VM runs and ``in_guest``) and the host side."""
        vm = self._vm
        if vm is not None:
            await vm.remove_container(
                container_id, in_guest=in_guest and self._state is PodState.READY)

    def agent_lost(self, vm: PodVm, error: BaseException) -> None:
        """The agent connection dropped: fail the pod in the background (reapers call this)."""
        if vm is self._vm and self._state is PodState.READY and not vm.failing:
            self._spawn(self.fail(error, forceful=True))

    async def fail(self, error: BaseException, *, forceful: bool = False) -> None:
        """A loop crashed, the agent is lost or ignores a SIGKILL: stop the VM (at once when
        ``forceful``), report every process killed, tear down. Idempotent."""
        vm = self._vm
        if vm is None or self._state is not PodState.READY or vm.failing:
            return
        vm.failing = True
        log.error("pod %s failed (%s): stopping its VM", vm.sandbox_id, error)
        with contextlib.suppress(QemuError, TimeoutError):
            async with asyncio.timeout(self._timeouts.vm_stop):
                await (vm.vm.aclose() if forceful else vm.vm.stop())
        await self._vm_exited(vm, f"the pod failed: {error}")
        await self._destroy(vm)

    # --- the way down -------------------------------------------------------------------------

    async def _stop_vm(self, vm: PodVm) -> None:
        vm.exited.set()  # processes still waiting are reported killed
        await self._destroy(vm)

    async def _destroy(self, vm: PodVm) -> None:
        try:
            async with asyncio.timeout(self._timeouts.vm_stop):
                await vm.destroy(vm_gone=self._state is PodState.EXITED)
        except Exception as err:  # teardown goes on; delete reaps what is left
            log.error("pod %s: shutdown failed: %s", vm.sandbox_id, err)

    def _end(self) -> None:
        if not self.exited_at:
            self.exited_at = self._clock_ns()
        self._over.set()

    async def shutdown(self) -> None:
        """Stop the pod for good: cancel an early boot, stop the VM (DestroySandbox, QMP, the
        host side). The one way down on purpose; idempotent."""
        await self._cancel_early_boot()
        async with self._lock:
            vm, self._vm = self._vm, None
            running = self._state is PodState.READY
            self._apply(PodTransition.STOP)
        if vm is not None and running:
            await self._stop_vm(vm)
        elif vm is not None:
            await self._destroy(vm)  # after an exit: already torn down (idempotent)
        self._end()

    # --- the sandbox API (containerd.runtime.sandbox.v1, CRI ``sandboxer = "shim"``) ---------

    def _sandbox(self, sandbox_id: str) -> PodConfig:
        if not self.sandbox_api or self._config is None or \
                self._config.sandbox_id != sandbox_id:
            raise NotFound(f"sandbox {sandbox_id} not found")
        return self._config

    async def create_sandbox(self, config: PodConfig) -> None:
        """CreateSandbox: record the pod; its VM boots at StartSandbox (after CNI ran)."""
        if self.sandbox_api:
            raise AlreadyExists(f"sandbox {self.sandbox_id} already exists")
        await self._cancel_early_boot()  # this pod's VM boots at StartSandbox, after CNI
        async with self._lock:
            self._apply(PodTransition.CREATE)
            self._config = config
            self.sandbox_api = True

    async def start_sandbox(self, sandbox_id: str) -> PodStatus:
        """StartSandbox: boot the VM; containers created later share it."""
        config = self._sandbox(sandbox_id)
        check(PodTransition.START, self._state)
        await self._boot(config, PodTransition.START, PodTransition.START_FAILED)
        self.created_at = self._clock_ns()
        return self.status(sandbox_id)

    async def stop_sandbox(self, sandbox_id: str) -> None:
        """StopSandbox: stop the VM (every process in it is gone). Idempotent."""
        self._sandbox(sandbox_id)
        await self.shutdown()

    async def wait_sandbox(self, sandbox_id: str) -> PodStatus:
        """WaitSandbox: until the pod is over (long poll, no timeout)."""
        self._sandbox(sandbox_id)
        await self._over.wait()
        return self.status(sandbox_id)

    def status(self, sandbox_id: str) -> PodStatus:
        self._sandbox(sandbox_id)
        return PodStatus(sandbox_id=sandbox_id, state=self._state, pid=self.pid,
                         created_at=self.created_at, exited_at=self.exited_at,
                         exit_status=self.exit_status)

    async def shutdown_sandbox(self, sandbox_id: str) -> None:
        """ShutdownSandbox: stop the VM if still running, then this daemon."""
        await self.stop_sandbox(sandbox_id)
        self.shutdown_requested.set()
