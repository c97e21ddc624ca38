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

import contextlib
import ctypes
import os
import socket
import threading
from pathlib import Path
from typing import NamedTuple

from guest.agent import mounts
from guest.agent.errors import AgentError, RuntimeFailure

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
