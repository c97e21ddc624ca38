"""The pod's shared IPC and UTS namespaces inside the guest.

Containers of a pod share the pod's IPC and UTS namespaces, as on runc (where they join the
pause container's) and as in Kata (whose agent makes them at sandbox creation): System V and
POSIX IPC objects, the IPC-scoped sysctls (``kernel.shm*``, ``kernel.msg*``, ``kernel.sem``,
``fs.mqueue.*``) and the hostname are the pod's. The host's namespace paths mean nothing in the
guest (the shim clears them), so the agent makes one IPC and one UTS namespace per pod and
every container whose spec asks for an IPC or UTS namespace joins them (the OCI runtime opens
the paths given here). A container whose spec names no such namespace stays in the guest's.

The namespaces are made by a short-lived thread: ``unshare(2)`` of IPC and UTS acts on the
calling thread only, and bind mounts of ``/proc/thread-self/ns/{ipc,uts}`` keep them alive
after the thread ends. The agent's own threads never run in them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from guest.agent import mounts
from guest.agent.errors import AgentError, FailedPrecondition, RuntimeFailure
from guest.agent.reaper import Reaper

CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
KINDS: dict[str, int] = {"ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}


class PodNamespaces(NamedTuple):
    """Files (nsfs bind mounts) naming the pod's namespaces, by OCI namespace type."""

    paths: dict[str, Path]

    def path(self, kind: str) -> Path | None:
        return self.paths.get(kind)

    def release(self) -> None:
        """Unmount and remove the files (and their directory once empty): the namespaces die
        with their last member."""
        for path in self.paths.values():
            with contextlib.suppress(AgentError):
                mounts.umount(str(path))
            with contextlib.suppress(OSError):
                path.unlink()
        for directory in {path.parent for path in self.paths.values()}:
            with contextlib.suppress(OSError):
                directory.rmdir()


def _unshare_and_pin(flags: int, targets: dict[str, Path], hostname: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")
    if hostname:
        socket.sethostname(hostname)  # this thread's UTS namespace: the pod's
    for kind, target in targets.items():
        mounts.mount(f"/proc/thread-self/ns/{kind}", str(target), "", mounts.MS_BIND)


def create_pod_namespaces(directory: Path, hostname: str = "") -> PodNamespaces:
    """Make the pod's IPC and UTS namespaces, pinned as files under ``directory``; the UTS
    namespace gets ``hostname`` (a new one otherwise keeps the guest's)."""
    directory.mkdir(parents=True, exist_ok=True)
    targets = {kind: directory / kind for kind in KINDS}
    flags = 0
    for kind, flag in KINDS.items():
        targets[kind].touch(exist_ok=True)
        flags |= flag
    failure: list[Exception] = []

    def work() -> None:
        try:
            _unshare_and_pin(flags, targets, hostname)
        except Exception as err:  # reported to the caller, below
            failure.append(err)

    # A thread of its own that ends right after: a pooled thread would keep running agent
    # work inside the pod's namespaces.
    thread = threading.Thread(target=work, name="pod-namespaces")
    thread.start()
    thread.join()
    made = PodNamespaces(dict(targets))
    if failure:
        made.release()
        raise RuntimeFailure(f"cannot make the pod's IPC/UTS namespaces: {failure[0]}")
    return made


# -- the pod's PID namespace, when no container of the pod makes it ------------------------
#
# Under CRI's podsandbox mode the pause container is the pod's first container, so it is the
# init of the PID namespace the others join (sandbox_pidns). With containerd's sandbox API
# there is no pause container: the first workload container would be that init, and its exit
# would kill every other container of the pod. The agent then starts the guest image's pause
# program itself as the namespace's init (Kata's agent makes the sandbox's PID namespace
# itself too). It runs as nobody (no capabilities; a container's root cannot reach the guest's
# root through /proc/1/root without CAP_SYS_PTRACE), with no input and output, and reaps the
# namespace's orphans; it dies with the sandbox, and with it whatever is left in the namespace.

CLONE_NEWPID = 0x20000000
NOBODY = 65534
PID_INIT_STOP_S = 5.0  # a SIGKILLed process exits at once; bounded all the same


class PidNamespace(NamedTuple):
    """The pod's PID namespace and its init (the pause program), a child of the agent."""

    path: Path  # /proc/<init>/ns/pid, what containers join
    program: str
    init: subprocess.Popen[bytes]  # returncode is set by the reaper, never by Popen
    exited: asyncio.Future[int]

    def check_alive(self) -> None:
        if self.exited.done():
            raise FailedPrecondition(
                f"the pod's PID namespace is gone: its init ({self.program}) exited with "
                f"{self.exited.result()}")

    async def stop(self) -> None:
        """SIGKILL the init (the kernel then kills every process left in the namespace) and
        wait for its exit."""
        if not self.exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exited), PID_INIT_STOP_S)


def start_pid_namespace(reaper: Reaper, argv: Sequence[str]) -> PidNamespace:
    """Start ``argv`` as the init (PID 1) of a new PID namespace.

    A short-lived thread unshares its PID namespace for children and starts the program: only
    that thread's children are born in the new namespace (the agent's other threads and its
    later children are not). The program's exit reaches the agent's reaper."""
    program = Path(argv[0])
    if not program.is_file() or not os.access(program, os.X_OK):
        raise FailedPrecondition(f"cannot make the pod's PID namespace: its init {program} is "
                                 "missing from the guest image or not executable")
    started: list[subprocess.Popen[bytes]] = []
    failure: list[Exception] = []

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(ctypes.c_int(CLONE_NEWPID)) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWPID): {os.strerror(err)}")
            started.append(subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, cwd="/", env={}, close_fds=True,
                user=NOBODY, group=NOBODY, extra_groups=[]))
        except Exception as err:  # reported to the caller, below
            failure.append(err)

    # While the loop's thread waits here, no SIGCHLD is handled: the exit future below is
    # registered before the reaper can see the init exit (or it finds it unclaimed).
    thread = threading.Thread(target=work, name="pod-pid-namespace")
    thread.start()
    thread.join()
    if failure:
        raise RuntimeFailure(f"cannot make the pod's PID namespace: {failure[0]}")
    init = started[0]
    exited = reaper.wait(init.pid)
    exited.add_done_callback(lambda f: setattr(init, "returncode", f.result()))
    return PidNamespace(Path(f"/proc/{init.pid}/ns/pid"), str(program), init, exited)
