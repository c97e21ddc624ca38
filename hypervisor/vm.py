"""One QEMU process driven over QMP: launch, supervise, stop.

``launch_vm`` is an ordered script (run dir → vsock → QEMU → QMP → cont) inside an
AsyncExitStack, so a failure at any step undoes the earlier ones. A running :class:`QemuVm`
has one owned supervisor task that turns SHUTDOWN, GUEST_PANICKED, STOP and the process exit
into one :class:`~hypervisor.errors.ExitReason`; after it the run directory, sockets and
helper processes are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from hypervisor.caplog import CappedLog
from hypervisor.choice import profile_vsock
from hypervisor.cmdline import QemuCommandLine, SerialConsole, Share, VirtioBlk, VirtioNetTap
from hypervisor.console import ConsoleWatch
from hypervisor.errors import ExitReason, QemuError, VmExited
from hypervisor.initdata import write_disk
from hypervisor.lifeline import die_with_parent
from hypervisor.monitor import QmpMonitor
from hypervisor.probe import sev_geometry
from hypervisor.profile import (
    HybridVsock,
    KernelVsock,
    RuntimeProfile,
    SevParams,
    SnpParams,
    VmInstance,
    build_command_line,
    check_invariants,
)
from hypervisor.timeouts import TIMEOUTS, Timeouts
from hypervisor.vsock import HybridVsockBackend, allocate_guest_cid
from protocols.initdata import Initdata

log = logging.getLogger(__name__)

OnSpawn = Callable[[int], None]  # told each process a launch starts, right after it exists
OnStep = Callable[[str], None]  # told each step of a launch as it completes (a boot trace)


def _no_step(step: str) -> None:
    return None


class VmState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"


@dataclass(frozen=True)
class AgentChannel:
    """How the host reaches the guest's vsock ports."""

    guest_cid: int
    hybrid_socket: Path | None  # unix socket speaking CONNECT <port>, for hybrid vsock
    # Hybrid vsock: until the guest announced that its agent listens; dial only after it
    # (see hypervisor.vsock). None: dial at will (kernel vhost-vsock).
    wait_guest_ready: Callable[[], Awaitable[None]] | None = None
    # The guest console as it arrives (None: the profile has none, e.g. a TEE): its failure
    # line ends the dial at once; its last lines name what a dial that ended otherwise saw.
    console: ConsoleWatch | None = None


class VirtualMachine(Protocol):
    """The seam a running VM's owner (the shim's pod) uses; :class:`QemuVm` is the real one,
    tests substitute fakes."""

    @property
    def pid(self) -> int | None: ...

    @property
    def channel(self) -> AgentChannel | None: ...

    async def wait(self) -> ExitReason:
        """Until the VM has exited and is cleaned up (no deadline)."""
        ...

    async def stop(self, powerdown_timeout: float | None = None) -> ExitReason:
        """Graceful, then forceful, bounded; idempotent."""
        ...

    async def aclose(self) -> None:
        """Stop without waiting for the guest."""
        ...


class QemuVm:
    """A launched QEMU. Create with :func:`launch_vm` or :meth:`spawn` + :meth:`start`."""

    def __init__(self, argv: Sequence[str], run_dir: Path, *, qmp_socket: Path,
                 stderr_log: Path, pass_fds: Sequence[int] = (),
                 cleanup: AsyncExitStack | None = None, timeouts: Timeouts = TIMEOUTS) -> None:
        self.argv = list(argv)
        self.run_dir = run_dir
        self.qmp_socket = qmp_socket
        self.stderr_log = stderr_log
        self.pass_fds = tuple(pass_fds)
        self._timeouts = timeouts
        self.monitor = QmpMonitor(name=run_dir.name, timeouts=timeouts)
        self.channel: AgentChannel | None = None
        self._cleanup = cleanup or AsyncExitStack()
        self._proc: asyncio.subprocess.Process | None = None
        self._state = VmState.CREATED
        self._exit: asyncio.Future[ExitReason] = asyncio.get_running_loop().create_future()
        self._supervisor: asyncio.Task[None] | None = None
        self._stop_requested = False
        self._reason: ExitReason | None = None

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def state(self) -> VmState:
        return self._state

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def start(self, on_spawn: OnSpawn | None = None, on_step: OnStep = _no_step) -> None:
        """Launch QEMU paused (-S), connect QMP, check prelaunch, ``cont``; ``on_spawn`` gets
        QEMU's pid as soon as it exists, ``on_step`` each step's name as it completes."""
        if self._state is not VmState.CREATED:
            raise QemuError(f"cannot start in state {self._state.value}")
        self._state = VmState.STARTING
        try:
            await self._spawn()
            on_step("QEMU spawned")
            if on_spawn is not None and self._proc is not None:
                on_spawn(self._proc.pid)
            await self._connect()
            on_step("QMP connected")
            status = await self.monitor.execute("query-status")
            paused = "-S" in self.argv
            if paused and status.get("status") not in ("prelaunch", "paused"):
                raise QemuError(f"QEMU not waiting to start: status {status}")
            self._supervisor = asyncio.create_task(self._supervise(), name=f"vm-{self.pid}")
            if paused:
                await self.monitor.execute("cont")
            on_step("QEMU running (cont)")
            self._state = VmState.RUNNING
        except BaseException:
            await self._abort()
            raise

    async def _spawn(self) -> None:
        argv = die_with_parent(self.argv, QemuError)  # dies with us (hypervisor.lifeline)
        stderr = CappedLog(self.stderr_log)  # QEMU repeats what the guest makes it say
        err = stderr.pipe()
        self._cleanup.callback(stderr.close)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err,
                pass_fds=self.pass_fds, umask=0o077, start_new_session=True,
            )
        finally:
            os.close(err)

    async def _connect(self) -> None:
        assert self._proc is not None
        try:
            async with asyncio.timeout(self._timeouts.qmp_socket_appear):
                while not self.qmp_socket.exists():
                    if self._proc.returncode is not None:
                        break
                    await asyncio.sleep(0.01)
        except TimeoutError as err:
            raise QemuError(f"QEMU did not create {self.qmp_socket} within "
                            f"{self._timeouts.qmp_socket_appear}s") from err
        if self._proc.returncode is not None or not self.qmp_socket.exists():
            await self._proc.wait()
            raise QemuError(f"QEMU exited with status {self._proc.returncode} before QMP: "
                            f"{self.stderr_tail()}")
        os.chmod(self.qmp_socket, 0o600)
        # QEMU may create the socket and then fail (e.g. kernel not loadable): say why.
        if not await self.monitor.connect_unless_exited(self.qmp_socket, self._proc):
            raise QemuError(f"QEMU exited with status {self._proc.returncode} before QMP: "
                            f"{self.stderr_tail()}")

    def stderr_tail(self, limit: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_log.read_text(errors="replace")[-limit:].strip()
        return ""

    async def _abort(self) -> None:
        """Failed start: kill QEMU, stop the supervisor, release everything."""
        self._stop_requested = True
        await self._kill_and_reap()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
        await self._release()
        self._state = VmState.EXITED
        if not self._exit.done():
            self._exit.set_result(ExitReason("process-exit", "failed to start", False,
                                             self._returncode()))

    async def _kill_and_reap(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        try:
            async with asyncio.timeout(self._timeouts.kill):
                await proc.wait()
        except TimeoutError:
            log.error("QEMU pid %s did not die within %ss of SIGKILL", proc.pid,
                      self._timeouts.kill)

    def _returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    async def _release(self) -> None:
        await self.monitor.close()
        await self._cleanup.aclose()

    # --- supervision -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        assert self._proc is not None
        proc_wait = asyncio.ensure_future(self._proc.wait())
        deadline: float | None = None
        try:
            while not proc_wait.done():
                next_event = asyncio.ensure_future(self.monitor.events.get())
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = await asyncio.wait({proc_wait, next_event}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if next_event in done:
                    deadline = self._on_event(next_event.result(), deadline)
                else:
                    next_event.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await next_event
                if not done and deadline is not None:  # grace over: QEMU must go
                    await self._kill_and_reap()
            # Events written just before the exit may still be in the socket: drain them.
            await self.monitor.wait_disconnected(0.5)
            while not self.monitor.events.empty():
                self._on_event(self.monitor.events.get_nowait(), None)
            reason = self._final_reason(self._proc.returncode)
        except Exception as err:  # a crashed supervisor tears the VM down
            log.exception("VM supervisor failed")
            await self._kill_and_reap()
            reason = ExitReason("monitor-error", repr(err), False, self._returncode())
        finally:
            if not proc_wait.done():
                proc_wait.cancel()
        self._state = VmState.STOPPING
        try:
            await self._release()
        finally:
            self._state = VmState.EXITED
            if not self._exit.done():
                self._exit.set_result(reason)

    def _on_event(self, event: dict[str, Any], deadline: float | None) -> float | None:
        name = event.get("event")
        data = event.get("data", {})
        if name == "SHUTDOWN":
            why = str(data.get("reason", "unknown"))
            # Only we hold the (0600) QMP socket, so host-qmp-quit is our own stop; a guest
            # reset or panic under -no-reboot, or a signal from elsewhere, is not clean.
            clean = why in ("guest-shutdown", "host-qmp-quit") or (
                self._stop_requested and why.startswith("host"))
            if self._reason is None or self._reason.kind == "stopped":
                self._reason = ExitReason("shutdown", why, clean)
            return time.monotonic() + self._timeouts.quit
        if name == "GUEST_PANICKED":
            self._reason = ExitReason("panic", f"{data.get('action')}: {data.get('info', {})}",
                                      False)
            return time.monotonic() + 0.2
        if name == "STOP" and not self._stop_requested and self._reason is None:
            self._reason = ExitReason("stopped", "VM stopped unexpectedly", False)
            return time.monotonic() + self._timeouts.stop_grace
        return deadline

    def _final_reason(self, rc: int | None) -> ExitReason:
        if self._reason is not None:
            return replace(self._reason, returncode=rc)
        if rc is not None and rc < 0:
            return ExitReason("killed", f"QEMU killed by {signal.Signals(-rc).name}", False, rc)
        return ExitReason("process-exit", f"QEMU exited without SHUTDOWN: "
                          f"{self.stderr_tail(300)}", rc == 0, rc)

    # --- public operations -----------------------------------------------------------------

    @property
    def exit_reason(self) -> ExitReason | None:
        return self._exit.result() if self._exit.done() else None

    async def wait(self) -> ExitReason:
        """Wait (without deadline) until the VM has exited and is cleaned up."""
        return await asyncio.shield(self._exit)

    async def execute(self, command: str, arguments: dict[str, object] | None = None,
                      bound: float | None = None) -> Any:
        """One QMP command with a per-call bound; VmExited once the VM is gone."""
        if self._exit.done():
            raise VmExited(self._exit.result())
        return await self.monitor.execute(command, arguments, bound)

    async def stop(self, powerdown_timeout: float | None = None) -> ExitReason:
        """Graceful (system_powerdown for ``powerdown_timeout``, by default the table's
        ``graceful_stop``; then quit) then forceful (SIGKILL), bounded in time.

        Idempotent; returns the exit reason once the VM is gone and cleaned up.
        """
        if powerdown_timeout is None:
            powerdown_timeout = self._timeouts.graceful_stop
        if self._exit.done():
            return self._exit.result()
        self._stop_requested = True
        if self._state is VmState.RUNNING:
            self._state = VmState.STOPPING
        steps: list[tuple[str, float, Callable[[], Awaitable[None]]]] = []
        if powerdown_timeout > 0:
            steps.append(("system_powerdown", powerdown_timeout,
                          lambda: self._quiet_execute("system_powerdown")))
        steps.append(("quit", self._timeouts.quit, lambda: self._quiet_execute("quit")))
        steps.append(("SIGKILL", self._timeouts.kill, self._send_kill))
        for name, bound, action in steps:
            try:
                async with asyncio.timeout(bound):  # the command and the exit, together
                    await action()
                    return await asyncio.shield(self._exit)
            except TimeoutError:
                log.warning("VM %s still running %ss after %s", self.run_dir.name, bound, name)
        if self._supervisor is None:  # never started properly
            await self._abort()
        return await asyncio.shield(self._exit)

    async def _quiet_execute(self, command: str) -> None:
        if not self.monitor.connected:
            return
        try:
            await self.monitor.execute(command)
        except QemuError as err:
            log.debug("%s during stop: %s", command, err)

    async def _send_kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    async def aclose(self) -> None:
        """Stop without waiting for the guest, and make sure the supervisor is gone."""
        await self.stop(powerdown_timeout=0)
        if self._supervisor is not None:
            await self._supervisor

    async def __aenter__(self) -> QemuVm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# --- launching from a profile ----------------------------------------------------------------


@dataclass(frozen=True)
class LaunchOptions:
    run_root: Path  # parent of per-VM run directories
    name: str = "coco"
    accel: str | None = None  # already-decided accelerator (profile may say "auto")
    vhost_device_vsock: Path | None = None  # binary, for hybrid vsock
    log_dir: Path | None = None  # keep console/stderr logs here (default: removed with run dir)
    extra_kernel_params: str = ""
    argv_prefix: tuple[str, ...] = ()  # e.g. ("chroot", root) for tests
    disks: tuple[VirtioBlk, ...] = ()
    nics: tuple[VirtioNetTap, ...] = ()  # their tap/vhost fds are passed to QEMU
    shares: tuple[Share, ...] = ()  # non-confidential profiles only (invariant)
    initdata: Initdata | None = None  # see hypervisor.initdata.resolve_initdata
    timeouts: Timeouts = TIMEOUTS  # every bounded wait of this VM's life
    on_spawn: OnSpawn | None = None  # each process started (backend, QEMU), as it starts
    on_step: OnStep = _no_step  # each launch step as it completes (benchmarks trace them)
    on_console_line: Callable[[str], None] | None = None  # each guest console line (a trace)


async def launch_vm(profile: RuntimeProfile, options: LaunchOptions) -> QemuVm:
    """Ordered start with rollback: check → run dir → vsock → QEMU (-S) → QMP → cont."""
    # Refuse impossible combinations before creating anything.
    check_invariants(profile, VmInstance(run_dir=options.run_root, accel=options.accel,
                                         shares=options.shares, initdata=options.initdata))
    _log_escape_hatches(profile, options)
    cbitpos: int | None = None
    reduced_phys_bits: int | None = None
    params = profile.tee_params
    if isinstance(params, SevParams | SnpParams) and (
            params.cbitpos is None or params.reduced_phys_bits is None):
        cbitpos, reduced_phys_bits = await sev_geometry(profile.qemu,
                                                        qemu_root=profile.qemu_root)
    async with AsyncExitStack() as stack:
        options.run_root.mkdir(parents=True, exist_ok=True)
        run_dir = Path(_make_run_dir(options.run_root, options.name))
        stack.callback(shutil.rmtree, run_dir, True)
        log_dir = options.log_dir or run_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        if options.initdata is not None:
            write_disk(VmInstance(run_dir=run_dir).initdata_disk, options.initdata)

        vsock: KernelVsock | HybridVsock | None = None
        channel: AgentChannel | None = None
        kernel_params = options.extra_kernel_params
        pass_fds: list[int] = [fd for nic in options.nics
                               for fd in (nic.tap_fd, nic.vhost_fd) if fd is not None]
        kind = profile_vsock(profile)
        if kind == "kernel":
            cid = allocate_guest_cid()
            stack.callback(cid.close)
            vsock = KernelVsock(cid.cid, cid.fd)
            pass_fds.append(cid.fd)
            channel = AgentChannel(cid.cid, None)
        elif kind == "hybrid":
            if options.vhost_device_vsock is None:
                raise QemuError("hybrid vsock needs the vhost-device-vsock binary")
            backend = HybridVsockBackend(options.vhost_device_vsock, run_dir,
                                         log_path=log_dir / "vhost-device-vsock.log",
                                         timeouts=options.timeouts)
            await backend.start(options.on_spawn)
            stack.push_async_callback(backend.stop)
            options.on_step("vsock backend listening")
            vsock = HybridVsock(backend.vhost_user_socket)
            channel = AgentChannel(backend.guest_cid, backend.uds_path,
                                   backend.wait_guest_ready)
            kernel_params = " ".join(p for p in (kernel_params, backend.kernel_params) if p)

        instance = VmInstance(run_dir=run_dir, name=options.name, vsock=vsock,
                              disks=options.disks, nics=options.nics, shares=options.shares,
                              extra_kernel_params=kernel_params,
                              accel=options.accel, log_dir=options.log_dir,
                              sev_cbitpos=cbitpos, sev_reduced_phys_bits=reduced_phys_bits,
                              initdata=options.initdata)
        cmdline: QemuCommandLine = build_command_line(profile, instance)
        if isinstance(cmdline.serial, SerialConsole):
            watch = ConsoleWatch(on_line=options.on_console_line)
            console = CappedLog(instance.console_log, watch=watch.feed)  # what the guest prints
            console.fifo(cmdline.serial.path)
            stack.callback(console.close)
            if channel is not None:
                channel = replace(channel, console=watch)
        vm = QemuVm(cmdline.to_argv(options.argv_prefix), run_dir,
                    qmp_socket=instance.qmp_socket, stderr_log=log_dir / "qemu.stderr.log",
                    pass_fds=pass_fds, cleanup=stack.pop_all(), timeouts=options.timeouts)
        vm.channel = channel
    options.on_step("QEMU argv ready")
    # On failure, start() releases what the stack held.
    await vm.start(options.on_spawn, options.on_step)
    return vm


def _log_escape_hatches(profile: RuntimeProfile, options: LaunchOptions) -> None:
    """Every VM launched under a TEE escape hatch says so in the log."""
    if not profile.tee.confidential:
        return
    if profile.allow_debug:
        log.warning("VM %s: runtime profile %s sets allow_debug = true: debug policy bits are "
                    "accepted for this TEE guest", options.name, profile.source)
    if profile.debug_console_bytes is not None:
        log.warning("VM %s: runtime profile %s sets debug_console_bytes = %d: the guest console "
                    "is readable by the host", options.name, profile.source,
                    profile.debug_console_bytes)
    if options.initdata is not None and profile.tee.initdata_field is None:
        log.warning("VM %s: runtime profile %s sets allow_unbound_initdata = true: initdata is "
                    "delivered but %s has no launch field to bind it", options.name,
                    profile.source, profile.tee.value)


def _make_run_dir(root: Path, name: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=f"{name}-", dir=root)  # mode 0700
