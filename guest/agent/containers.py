"""Containers and their processes: explicit state machines over runc.

A container is created from an OCI runtime spec (a dict, already translated from grpc.Spec by
the edge) with runc in its own bundle directory; its init process and every exec'd process is
a :class:`Process` with its own stdio and exit future. Misuse raises FailedPrecondition naming
the action and the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import fcntl
import itertools
import json
import logging
import os
import re
import shutil
import signal
import struct
import termios
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from guest.agent import cgroups, timeline
from guest.agent.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RuntimeFailure,
)
from guest.agent.reaper import Reaper
from guest.agent.runc import Runc, Stdio
from guest.agent.stdio import InputPipe, OutputBuffer, grow_pipe

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CGROUP_PARENT = "/coco"
KILL_GRACE = 10.0  # RemoveContainer without a timeout waits this long after SIGKILL
EXEC_WAIT = 5.0  # StartContainer waits at most this long for the workload's exec
# A signal the container's init would drop (see Process.deliver) waits at most this long after
# the start for the workload to install its handler.
SIGNAL_HOLD = 2.0
_console_numbers = itertools.count()  # console sockets: unique names, short whatever the ids


class SecretUnsealer(Protocol):
    """Unseals ``sealed.`` env values and mounted files in the guest (guest.attestation's
    DataHub); plaintext files go beneath ``secrets_dir``, inside the bundle."""

    def unseal_spec(self, spec: dict[str, Any], secrets_dir: Path) -> dict[str, Any]: ...


def validate_id(kind: str, value: str) -> str:
    if not ID_PATTERN.match(value):
        raise InvalidArgument(f"invalid {kind} id {value!r}")
    return value


class ContainerState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class ProcessState(enum.Enum):
    RUNNING = "running"
    EXITED = "exited"


# action -> states it is allowed in
CONTAINER_ACTIONS: dict[str, frozenset[ContainerState]] = {
    "start": frozenset({ContainerState.CREATED}),
    "exec": frozenset({ContainerState.RUNNING}),
    "pause": frozenset({ContainerState.RUNNING}),
    "resume": frozenset({ContainerState.PAUSED}),
    "update": frozenset({ContainerState.CREATED, ContainerState.RUNNING, ContainerState.PAUSED}),
    "stats": frozenset({ContainerState.CREATED, ContainerState.RUNNING, ContainerState.PAUSED}),
}


OCI_VERSION_CEILING = (1, 1, 0)


def oci_version(version: str) -> str:
    """``version``, or 1.1.0 when it is newer than that, empty or unparsable."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if match is None:
        return ".".join(map(str, OCI_VERSION_CEILING))
    parsed = tuple(int(part) for part in match.groups())
    return version if parsed <= OCI_VERSION_CEILING else ".".join(map(str, OCI_VERSION_CEILING))


def prepare_spec(
    spec: dict[str, Any],
    container_id: str,
    rootfs: Path,
    cgroup_parent: str = CGROUP_PARENT,
    pod_namespaces: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """The spec the OCI runtime (crun, runc) gets inside the guest.

    The container shares the guest's network (the VM is the pod's network boundary), so a
    network namespace entry is dropped; namespace paths name host files: a namespace of a type
    in ``pod_namespaces`` (the pod's IPC and UTS namespaces, and its PID namespace when the
    container shares it) joins the pod's, the others are new; hooks
    would run host binaries and are dropped; AppArmor/SELinux labels are dropped (no LSM in the
    guest); cgroup-v1-only kernel memory limits are dropped; the cgroup is /coco/<id>.
    ``ociVersion`` says at most 1.1.0: crun 1.8 refuses newer versions outright ("unknown
    version specified", a prefix check), although nothing the agent passes on needs them.
    """
    joined = pod_namespaces or {}
    out = copy.deepcopy(spec)
    out.pop("hooks", None)
    out["ociVersion"] = oci_version(str(out.get("ociVersion") or ""))
    out["root"] = {**out.get("root", {}), "path": str(rootfs)}
    process = out.setdefault("process", {})
    for lsm in ("apparmorProfile", "selinuxLabel"):  # the guest runs no LSM; runc would refuse
        process.pop(lsm, None)
    process.setdefault("cwd", "/")
    process.setdefault("user", {"uid": 0, "gid": 0})
    if not process.get("args"):
        raise InvalidArgument("the spec's process has no args")
    linux = out.setdefault("linux", {})
    namespaces: list[dict[str, str]] = []
    for ns in linux.get("namespaces", []):
        kind = ns.get("type")
        if kind == "network":
            continue
        shared = joined.get(kind)
        namespaces.append({"type": kind, "path": str(shared)} if shared else {"type": kind})
    linux["namespaces"] = namespaces
    linux["cgroupsPath"] = f"{cgroup_parent}/{container_id}"
    linux.pop("mountLabel", None)
    resources = linux.get("resources")
    if isinstance(resources, dict):
        if isinstance(resources.get("cpu"), dict):
            resources["cpu"].pop("cpus", None)  # host CPU numbers mean nothing in the guest
        if isinstance(resources.get("memory"), dict):
            for key in ("kernel", "kernelTCP"):  # cgroup v1 only
                resources["memory"].pop(key, None)
    return out


def read_pid(pid_file: Path) -> int:
    return int(pid_file.read_text().strip())


def read_exe(pid: int) -> str | None:
    """What ``/proc/<pid>/exe`` names (None once the process is gone or a zombie)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


async def wait_for_exec(
    process: Process,
    before: str,
    exe_of: Callable[[int], str | None] = read_exe,
    limit: float = EXEC_WAIT,
) -> bool:
    """Until ``process`` runs another executable than ``before`` (it exec'd), or it exited.

    Polls ``/proc/<pid>/exe``, from 1 ms up to 10 ms apart: the exec follows ``runc start``
    within milliseconds. False if it did not happen within ``limit`` (the start stands).
    """
    pause = 0.001
    deadline = asyncio.get_running_loop().time() + limit
    while not process.exited.done():
        now = exe_of(process.pid)
        if now is None or now != before:
            return True
        if asyncio.get_running_loop().time() > deadline:
            log.warning("%s: no exec within %.1f s of start", process.name, limit)
            return False
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.01)
    return True


def would_drop(status: str, signum: int) -> bool:
    """Whether the kernel drops ``signum`` sent to the process whose /proc status this is.

    The init process of a PID namespace receives, from the agent's ancestor namespace, only the
    signals it handles (and SIGKILL, SIGSTOP): one with the default disposition is discarded.
    """
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    ns_pids = fields.get("NSpid", "").split()
    if signum in (signal.SIGKILL, signal.SIGSTOP) or not ns_pids or ns_pids[-1] != "1":
        return False
    bit = 1 << (signum - 1)
    caught = int(fields.get("SigCgt", "0").strip() or "0", 16)
    ignored = int(fields.get("SigIgn", "0").strip() or "0", 16)
    return not (caught | ignored) & bit


def read_status(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return f.read()
    except OSError:
        return None


def write_bundle(bundle: Path, rootfs: Path, config: dict[str, Any]) -> None:
    if not rootfs.is_dir():
        raise NotFound(f"rootfs {rootfs} does not exist")
    bundle.mkdir(parents=True, exist_ok=False)
    (bundle / "config.json").write_text(json.dumps(config))


def _set_winsize(fd: int, rows: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


@dataclass
class Process:
    """One process of a container (exec_id "" is the init process)."""

    container_id: str
    exec_id: str
    pid: int
    terminal: bool
    exited: asyncio.Future[int]
    stdout: OutputBuffer
    stderr: OutputBuffer | None
    stdin: InputPipe | None
    console_fd: int | None = None
    hold_signals_until: float = 0.0  # loop time; see deliver
    status_of: Callable[[int], str | None] = read_status

    @property
    def state(self) -> ProcessState:
        return ProcessState.EXITED if self.exited.done() else ProcessState.RUNNING

    @property
    def name(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    def signal(self, signum: int) -> None:
        if self.exited.done():
            raise NotFound(f"process {self.name} already finished")
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError as err:
            raise NotFound(f"process {self.name} already finished") from err

    async def deliver(self, signum: int) -> None:
        """Send ``signum``; right after the start, hold one the workload would drop.

        A container's init is the init of its PID namespace: a signal it has no handler for is
        discarded. A workload that handles SIGTERM installs its handler a moment after the
        exec, so a StopContainer sent right after StartContainer would be lost and the stop
        would wait for its whole grace period. For :data:`SIGNAL_HOLD` seconds after the start,
        such a signal waits (polling ``/proc/<pid>/status``) until a handler appears, then goes;
        after that it is sent (and dropped) at once, as runc does.
        """
        loop = asyncio.get_running_loop()
        pause = 0.002
        while not self.exited.done() and loop.time() < self.hold_signals_until:
            status = self.status_of(self.pid)
            if status is None or not would_drop(status, signum):
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.02)
        self.signal(signum)

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)

    async def read(self, stream: str, size: int) -> bytes:
        buffer = self.stdout if stream == "stdout" else self.stderr
        if buffer is None:  # a terminal has no separate stderr
            return b""
        return await buffer.read(size)

    async def write_stdin(self, data: bytes) -> int:
        if self.stdin is None or self.stdin.closed:
            raise FailedPrecondition(f"stdin of {self.name} is closed")
        try:
            return await self.stdin.write(data)
        except BrokenPipeError as err:
            raise FailedPrecondition(f"stdin of {self.name}: the process closed it") from err

    def close_stdin(self) -> None:
        if self.stdin is not None:
            self.stdin.close()

    def resize(self, rows: int, columns: int) -> None:
        if self.console_fd is None:
            raise FailedPrecondition(f"process {self.name} has no terminal")
        try:
            _set_winsize(self.console_fd, rows, columns)
        except OSError as err:
            raise RuntimeFailure(f"resize terminal of {self.name}: {err}") from err

    def close(self) -> None:
        self.close_stdin()
        self.stdout.close()
        if self.stderr is not None:
            self.stderr.close()
        if self.console_fd is not None:
            os.close(self.console_fd)
            self.console_fd = None


async def start_process(
    *,
    container_id: str,
    exec_id: str,
    terminal: bool,
    reaper: Reaper,
    launch: Callable[[Stdio | None, Path | None], Any],
    pid_file: Path,
    console_socket: Path,
) -> Process:
    """Create the stdio, run launch (runc create/exec), and wrap the process it leaves."""
    pipes: list[int] = []
    try:
        if terminal:
            master = await launch(None, console_socket)
            if master is None:
                raise RuntimeFailure("runc returned no terminal")
            pid = read_pid(pid_file)
            exited = reaper.wait(pid)
            return Process(
                container_id=container_id,
                exec_id=exec_id,
                pid=pid,
                terminal=True,
                exited=exited,
                stdout=OutputBuffer(master),
                stderr=None,
                stdin=InputPipe(os.dup(master), terminal=True),
                console_fd=os.dup(master),
            )
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pipes = [in_r, in_w, out_r, out_w, err_r, err_w]
        for fd in (in_w, out_r, err_r):
            os.set_inheritable(fd, False)
        for fd in (out_r, err_r):
            grow_pipe(fd)
        try:
            await launch(Stdio(in_r, out_w, err_w), None)
        finally:
            for fd in (in_r, out_w, err_w):  # the child's ends: only the process keeps them
                os.close(fd)
                pipes.remove(fd)
        pid = read_pid(pid_file)
        process = Process(
            container_id=container_id,
            exec_id=exec_id,
            pid=pid,
            terminal=False,
            exited=reaper.wait(pid),
            stdout=OutputBuffer(out_r),
            stderr=OutputBuffer(err_r),
            stdin=InputPipe(in_w),
        )
        pipes.clear()
        return process
    finally:
        for fd in pipes:
            os.close(fd)


@dataclass
class Container:
    id: str
    bundle: Path
    runc: Runc
    reaper: Reaper
    storages: list[str]
    init: Process | None = None
    state: ContainerState = ContainerState.CREATED
    execs: dict[str, Process] = field(default_factory=dict)
    oom_kills_seen: int = 0
    init_exec_id: str = ""
    cgroup_parent: str = CGROUP_PARENT
    sockets: Path | None = None  # where console sockets go (None: beside the process's files)
    exe_of: Callable[[int], str | None] = read_exe  # how the exec after start is seen
    on_exit: Callable[[Container], None] | None = None  # any process of the container exited

    def require(self, action: str) -> None:
        allowed = CONTAINER_ACTIONS[action]
        if self.state not in allowed:
            raise FailedPrecondition(
                f"cannot {action} container {self.id} in state {self.state.value}"
            )

    def _on_init_exit(self, future: asyncio.Future[int]) -> None:
        timeline.mark("container init exited")
        self.state = ContainerState.STOPPED
        log.info("container %s exited with %s", self.id, future.result())
        self._on_process_exit(future)

    def _on_process_exit(self, _future: asyncio.Future[int]) -> None:
        # Runs before any WaitProcess caller resumes (the first done callback of the exit):
        # an OOM kill behind this exit is queued before the exit is answered.
        if self.on_exit is not None:
            self.on_exit(self)

    def console_socket(self, exec_id: str, fallback: Path) -> Path:
        """Where runc sends a terminal's pty master: a short name under ``sockets``.

        Paths built from ids do not fit a unix socket (108 bytes): CRI ids are 64 characters,
        so ``<bundles>/<container id>/execs/<exec id>/console.sock`` is over 150.
        """
        if self.sockets is None:
            return fallback
        return self.sockets / f"{os.getpid()}-{next(_console_numbers)}.sock"

    @classmethod
    async def create(
        cls,
        container_id: str,
        spec: dict[str, Any],
        *,
        bundle: Path,
        rootfs: Path,
        storages: list[str],
        runc: Runc,
        reaper: Reaper,
        cgroup_parent: str = CGROUP_PARENT,
        secrets: SecretUnsealer | None = None,
        pod_namespaces: Mapping[str, Path] | None = None,
        sockets: Path | None = None,
        on_exit: Callable[[Container], None] | None = None,
    ) -> Container:
        config = prepare_spec(spec, container_id, rootfs, cgroup_parent, pod_namespaces)
        write_bundle(bundle, rootfs, config)
        timeline.mark("bundle written")
        if secrets is not None:  # sealed values are opened here, in the guest, before start
            try:
                unsealed = await asyncio.to_thread(secrets.unseal_spec, config, bundle / "sealed")
            except Exception as err:  # the data hub's errors name the cause; the code says why
                raise FailedPrecondition(f"container {container_id}: {err}") from err
            if unsealed is not config:
                (bundle / "config.json").write_text(json.dumps(unsealed))
                config = unsealed
        container = cls(
            container_id,
            bundle,
            runc,
            reaper,
            storages,
            cgroup_parent=cgroup_parent,
            sockets=sockets,
            on_exit=on_exit,
        )
        terminal = bool(config["process"].get("terminal"))

        async def launch(stdio: Stdio | None, console: Path | None) -> int | None:
            return await runc.create(
                container_id,
                bundle,
                bundle / "init.pid",
                stdio=stdio,
                console_socket=console,
            )

        container.init = await start_process(
            container_id=container_id,
            exec_id="",
            terminal=terminal,
            reaper=reaper,
            launch=launch,
            pid_file=bundle / "init.pid",
            console_socket=container.console_socket("", bundle / "console.sock"),
        )
        container.init.exited.add_done_callback(container._on_init_exit)
        return container

    def process(self, exec_id: str) -> Process:
        # Kata's runtime names the init process by the exec id it created the container with
        # (usually the container id); an empty exec id means the init process as well.
        if not exec_id or exec_id in (self.init_exec_id, self.id):
            assert self.init is not None
            return self.init
        found = self.execs.get(exec_id)
        if found is None:
            raise NotFound(f"process {exec_id} not found in container {self.id}")
        return found

    async def start(self) -> None:
        """``runc start``, then wait until the init process has exec'd the workload.

        ``runc start`` returns once the runtime's init was told to go on, before it exec's the
        workload; a signal sent in between reaches the runtime's code (PID 1 of its namespace,
        no handlers) and is dropped. StopContainer right after StartContainer would then wait
        for its whole timeout. Answering only after the exec closes that window (the workload
        may still need a moment to install its own handlers).
        """
        self.require("start")
        assert self.init is not None
        before = self.exe_of(self.init.pid)
        await self.runc.start(self.id)
        if not self.init.exited.done():
            self.state = ContainerState.RUNNING
            started = asyncio.get_running_loop().time()
            if before is not None:
                await wait_for_exec(self.init, before, self.exe_of)
                timeline.mark("workload exec seen")
            now = asyncio.get_running_loop().time()
            log.info("container %s: exec seen %.1f ms after start", self.id, 1000 * (now - started))
            self.init.hold_signals_until = now + SIGNAL_HOLD

    async def exec(self, exec_id: str, process: dict[str, Any]) -> Process:
        validate_id("exec", exec_id)
        self.require("exec")
        if exec_id in self.execs or exec_id in (self.init_exec_id, self.id):
            raise AlreadyExists(f"exec {exec_id} already exists in container {self.id}")
        if not process.get("args"):
            raise InvalidArgument("the exec process has no args")
        process = {"cwd": "/", "user": {"uid": 0, "gid": 0}, **process}
        workdir = self.bundle / "execs" / exec_id
        workdir.mkdir(parents=True)
        (workdir / "process.json").write_text(json.dumps(process))

        async def launch(stdio: Stdio | None, console: Path | None) -> int | None:
            return await self.runc.exec(
                self.id,
                workdir / "process.json",
                workdir / "pid",
                workdir / "runc.log",
                stdio=stdio,
                console_socket=console,
            )

        try:
            started = await start_process(
                container_id=self.id,
                exec_id=exec_id,
                terminal=bool(process.get("terminal")),
                reaper=self.reaper,
                launch=launch,
                pid_file=workdir / "pid",
                console_socket=self.console_socket(exec_id, workdir / "console.sock"),
            )
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        started.exited.add_done_callback(self._on_process_exit)
        self.execs[exec_id] = started
        return started

    async def pause(self) -> None:
        self.require("pause")
        await self.runc.pause(self.id)
        self.state = ContainerState.PAUSED

    async def resume(self) -> None:
        self.require("resume")
        await self.runc.resume(self.id)
        self.state = ContainerState.RUNNING

    async def update(self, resources: dict[str, Any]) -> None:
        self.require("update")
        await self.runc.update(self.id, resources, self.bundle / "update.json")

    def cgroup(self, cgroup_root: Path = cgroups.CGROUP_ROOT) -> Path:
        """The container's cgroup directory: its cgroupsPath under ``cgroup_root``."""
        return cgroup_root / self.cgroup_parent.lstrip("/") / self.id

    async def stats(self, cgroup_root: Path = cgroups.CGROUP_ROOT) -> dict[str, Any]:
        """Read from the cgroup v2 files (any runtime), else ``runc events --stats``."""
        self.require("stats")
        if cgroups.is_cgroup2(cgroup_root):
            return cgroups.stats(self.cgroup(cgroup_root))
        return await self.runc.stats(self.id)

    def oom_kills(self, cgroup_root: Path = cgroups.CGROUP_ROOT) -> int:
        return cgroups.flat_keyed(self.cgroup(cgroup_root) / "memory.events").get("oom_kill", 0)

    async def destroy(self, timeout: float | None) -> None:  # noqa: ASYNC109 - the RPC's own field
        """Kill whatever still runs, delete it from runc, close stdio, remove the bundle."""
        assert self.init is not None
        if not self.init.exited.done():
            if self.state is ContainerState.PAUSED:
                with contextlib.suppress(Exception):
                    await self.runc.resume(self.id)
            with contextlib.suppress(NotFound):
                self.init.signal(signal.SIGKILL)
            try:
                async with asyncio.timeout(timeout or KILL_GRACE):
                    await self.init.wait()
            except TimeoutError:
                log.warning("container %s did not die after SIGKILL", self.id)
        for process in [self.init, *self.execs.values()]:
            if not process.exited.done():
                with contextlib.suppress(NotFound):
                    process.signal(signal.SIGKILL)
        with contextlib.suppress(NotFound):
            await self.runc.delete(self.id, force=True)
        for process in [self.init, *self.execs.values()]:
            process.close()
        shutil.rmtree(self.bundle, ignore_errors=True)
        self.state = ContainerState.STOPPED
