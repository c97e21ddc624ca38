"""The VM's processes die with the process that launched them.

QEMU and vhost-device-vsock run in sessions of their own (a signal to the owner's process
group must not reach them), so nothing ties them to their owner: an owner killed outright (a
shim daemon SIGKILLed where containerd runs no ``delete``, a benchmark or ``coco-shim vm``
interrupted) left them running, and a vhost-device-vsock whose QEMU had gone waited for a new
frontend for ever. Each is started through util-linux's ``setpriv --pdeathsig KILL``, which
sets PR_SET_PDEATHSIG and execs the real binary in the same process (same pid, same start
time: the crash record and ``delete`` see the binary itself), so the kernel SIGKILLs it the
moment its parent dies.

The parent, for the kernel, is the thread that spawned it: launch from the thread that owns
the VM for its whole life (the event loop's, in the daemon and every tool here). A parent that
dies between the fork and the ``prctl`` would leave the child without its lifeline (seen under
load, with the owner killed right after the spawn): so setpriv execs a one-line ``sh`` guard
first, which compares its parent with the owner's pid and exits 125 if it was reparented
already, else execs the binary (still the same pid).
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Sequence
from typing import Final

from hypervisor.errors import HypervisorError

SETPRIV: Final = "setpriv"


@functools.cache
def _setpriv() -> str | None:
    return shutil.which(SETPRIV)


# $0 is the owner's pid: a child whose parent is someone else already (the owner died before
# the prctl) must not start at all.
GUARD: Final = '[ "$PPID" = "$0" ] || exit 125; exec "$@"'


def die_with_parent(command: Sequence[str], error: type[HypervisorError]) -> list[str]:
    """``command`` behind ``setpriv --pdeathsig KILL --`` and the owner guard (:data:`GUARD`),
    for a child this process spawns; ``error`` if setpriv is missing."""
    setpriv = _setpriv()
    if setpriv is None:
        raise error(f"{SETPRIV} (util-linux) is not on PATH: without it the VM's processes "
                    "could outlive their owner (install util-linux)")
    return [setpriv, "--pdeathsig", "KILL", "--", "/bin/sh", "-c", GUARD, str(os.getpid()),
            *command]
