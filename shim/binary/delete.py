"""``containerd-shim-coco-v2 delete``: clean up what a dead shim left for ``-id``.

Reads the crash record (:mod:`shim.core.crash_record`) and undoes it: SIGKILL the daemon and
the recorded helpers (QEMU, vhost-device-vsock), unwire the pod network, unmount and remove the
recorded directories through :mod:`shim.pod.mounts` (the daemon's own unmount path), remove
the socket and the record. Answers with a hand-made DeleteResponse (no protobuf runtime).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Final

from shim.binary.bootstrap import can_connect
from shim.binary.flags import Flags, UsageError
from shim.core import identifiers, wire
from shim.core.crash_record import ShimState, kill_if_same, process_start_time
from shim.core.timeouts import TIMEOUTS

SIGKILL_EXIT_STATUS: Final = 128 + signal.SIGKILL  # what containerd-shim-runc-v2 delete reports


def delete(flags: Flags) -> bytes:
    """Clean up whatever a dead shim left for ``-id``; return a serialised DeleteResponse.

    "Dead" means its socket no longer accepts connections (gone, or unreachable after a failed
    reload): then the daemon (if still there), the recorded helper processes (QEMU …) and any
    process naming a recorded directory on its command line are SIGKILLed, the pod network
    unwired, the recorded directories unmounted and removed, the pod's host cgroups the shim
    made emptied and removed, socket and state removed. A
    daemon that still serves is left alone, like containerd-shim-runc-v2's delete never kills
    its shim: after Shutdown the daemon holds its socket until its teardown is done (containerd
    runs this the moment the connection closes), so an ordinary removal ends here at once. A
    daemon found alive with its socket closed is killed, and said so on stderr (containerd
    logs it as "warnings while cleaning up dead shim").
    The answer is runc-v2's: pid of the recorded init process, exit status 137 (128 + SIGKILL),
    exited_at now.
    """
    if not flags.namespace or not flags.id:
        raise UsageError("delete needs -namespace and -id")
    identifiers.validate("namespace", flags.namespace)
    identifiers.validate("id", flags.id)
    state = ShimState.of(flags.namespace, flags.id)
    init_pid = state.read_init_pid()
    record = state.read_shim()
    pid, start_time = record.get("pid"), record.get("start_time")
    sock = record.get("socket")
    if isinstance(sock, str) and sock and can_connect(Path(sock)):
        # The daemon still serves: it owns the pod VM and cleans up on Shutdown. (containerd
        # 2.1.9 runs delete right after connecting to a gRPC shim, believing it gone.)
        return _delete_response(init_pid)
    killed: list[tuple[int, int]] = []
    if isinstance(pid, int) and isinstance(start_time, int) and kill_if_same(pid, start_time):
        killed.append((pid, start_time))
        # containerd logs this as "warnings while cleaning up dead shim": a daemon that was
        # alive with its socket closed (hung, or killed in its teardown) is worth a line.
        print(f"delete: the shim daemon (pid {pid}) was alive with its socket closed: killed",
              file=sys.stderr)
    # The daemon is gone now: nothing new can start. Its helpers are on the record; one that
    # spawned in the instant before the daemon could record it names the pod's (recorded) run
    # directory on its command line.
    for helper, helper_start in [*state.pids(), *_processes_naming(state.dirs())]:
        if kill_if_same(helper, helper_start):
            killed.append((helper, helper_start))
    _wait_gone(killed, TIMEOUTS.kill_wait)
    network = state.network()
    if network is not None:  # QEMU is gone (and its taps): the veths' redirects remain
        from shim.core.errors import RpcError
        from shim.network.helper import teardown_recorded

        try:
            teardown_recorded(network)
        except (RpcError, OSError, ValueError) as err:
            print(f"delete: pod network: {err}", file=sys.stderr)
    from shim.pod.mounts import remove_tree

    for directory in state.dirs():
        # The pod's rootfs shares are mounted inside its run directory: remove_tree detaches
        # them first, so the removal never descends into a container's filesystem.
        try:
            remove_tree(directory)
        except OSError as err:
            print(f"delete: {directory}: {err}", file=sys.stderr)
    if cgroups := state.cgroups():
        from shim.core.cgroup import remove_made

        for problem in remove_made(cgroups, TIMEOUTS.cgroup_empty):
            print(f"delete: cgroup {problem}", file=sys.stderr)
    if isinstance(sock, str) and sock:
        with contextlib.suppress(OSError):
            os.unlink(sock)
    state.remove()
    from shim.core import failed_boot

    failed_boot.prune(failed_boot.root())
    return _delete_response(init_pid)


def _delete_response(init_pid: int) -> bytes:
    now = time.time_ns()
    return (wire.varint_field(1, init_pid)
            + wire.varint_field(2, SIGKILL_EXIT_STATUS)
            + wire.message_field(3, wire.timestamp(now // 1_000_000_000, now % 1_000_000_000)))


def _processes_naming(directories: list[Path]) -> list[tuple[int, int]]:
    """(pid, start time) of each process whose command line names a path below one of
    ``directories`` (QEMU and vhost-device-vsock name their sockets there)."""
    markers = [os.fsencode(directory) + b"/" for directory in directories]
    found: list[tuple[int, int]] = []
    if not markers:
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if any(marker in cmdline for marker in markers):
            start = process_start_time(int(entry.name))
            if start is not None:
                found.append((int(entry.name), start))
    return found


def _wait_gone(processes: list[tuple[int, int]], timeout: float) -> None:
    """Until every killed process is gone (or a zombie), so its sockets and mounts are free."""
    deadline = time.monotonic() + timeout
    while any(process_start_time(pid) == start for pid, start in processes):
        if time.monotonic() > deadline:
            print("delete: processes survived SIGKILL: "
                  + ", ".join(str(pid) for pid, _ in processes), file=sys.stderr)
            return
        time.sleep(TIMEOUTS.kill_poll)
