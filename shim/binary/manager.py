"""The ``start`` and ``delete`` actions of the shim binary (containerd's "shim manager").

``start`` runs once per container and sits on containerd's critical path: it only touches the
bundle, a unix socket and ``posix_spawn``. It never imports grpc, pyroute2 or generated protobuf
modules (a unit test checks ``sys.modules``).

State kept for ``delete`` (``<state root>/<namespace>/<id>/``, see ``contract.state_dir``):
``shim.json`` (daemon pid + start time, socket, group), ``init.pid``, ``pids`` (helper processes
such as QEMU: ``<pid> <start time>`` per line) and ``mounts`` (one path per line). The daemon
appends to ``pids``/``mounts`` through ``ShimState`` as it creates things; ``delete`` undoes
whatever is still there when the daemon is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import select
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from shim.binary import contract
from shim.binary.contract import Flags, UsageError
from shim.core import wire

SIGKILL_EXIT_STATUS: Final = 128 + signal.SIGKILL  # what containerd-shim-runc-v2 delete reports
READY_TIMEOUT: Final = 20.0  # gRPC daemon: from spawn to serving on the bootstrap path
VERSION_PROBE_TIMEOUT: Final = 5.0
KILL_WAIT: Final = 5.0  # delete: how long SIGKILLed processes get to disappear
VERSION_CACHE: Final = "containerd-versions.json"


class StartError(RuntimeError):
    """``start`` could not bring up the shim (printed for containerd, exit status 1)."""


# --- process identity ---------------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: tells a live process from a recycled pid. None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    state, start_time = fields[0], int(fields[19])
    return None if state in ("Z", "X") else start_time


def kill_if_same(pid: int, start_time: int) -> bool:
    """SIGKILL ``pid`` only if it is still the process we recorded; True if a signal was sent."""
    if pid <= 1 or process_start_time(pid) != start_time:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


@dataclass
class ShimState:
    """The per-shim state directory (written by start and the daemon, read by delete)."""

    path: Path

    @classmethod
    def of(cls, namespace: str, task_id: str) -> ShimState:
        return cls(contract.state_dir(namespace, task_id))

    def write_shim(self, pid: int, sock: Path, group: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        record = {"pid": pid, "start_time": process_start_time(pid), "socket": str(sock),
                  "group": group}
        tmp = self.path / "shim.json.tmp"
        tmp.write_text(json.dumps(record))
        tmp.rename(self.path / "shim.json")

    def read_shim(self) -> dict[str, object]:
        try:
            record = json.loads((self.path / "shim.json").read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def write_init_pid(self, pid: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.path / "init.pid").write_text(str(pid))

    def read_init_pid(self) -> int:
        try:
            return int((self.path / "init.pid").read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def add_pid(self, pid: int) -> None:
        """Record a helper process (QEMU, virtiofsd, vhost-device-vsock) for delete to reap."""
        start = process_start_time(pid)
        if start is None:
            return
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with (self.path / "pids").open("a") as f:
            f.write(f"{pid} {start}\n")

    def add_mount(self, target: Path) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with (self.path / "mounts").open("a") as f:
            f.write(f"{target}\n")

    def add_dir(self, path: Path) -> None:
        """Record a run directory (the pod VM's) for delete to remove after the unmounts."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with (self.path / "dirs").open("a") as f:
            f.write(f"{path}\n")

    def dirs(self) -> list[Path]:
        with contextlib.suppress(OSError):
            return [Path(p) for p in (self.path / "dirs").read_text().splitlines() if p]
        return []

    def pids(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        with contextlib.suppress(OSError):
            for line in (self.path / "pids").read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                    out.append((int(parts[0]), int(parts[1])))
        return out

    def add_network(self, record: str) -> None:
        """Record the pod's wired network (PodNetwork JSON) for delete to unwire."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path / "network.json.tmp"
        tmp.write_text(record)
        tmp.rename(self.path / "network.json")

    def clear_network(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / "network.json").unlink()

    def network(self) -> str | None:
        with contextlib.suppress(OSError):
            return (self.path / "network.json").read_text()
        return None

    def mounts(self) -> list[Path]:
        with contextlib.suppress(OSError):
            return [Path(p) for p in (self.path / "mounts").read_text().splitlines() if p]
        return []

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# --- start --------------------------------------------------------------------------------------


def containerd_major(binary: str) -> int | None:
    """containerd's major version from ``<binary> --version``, cached by path, size and mtime.

    Measured here: ``containerd --version`` takes ~10 ms (both 1.7.24 and 2.1.9); the cache makes
    every later ``start`` a stat and a small JSON read.
    """
    if not binary:
        return None
    try:
        st = os.stat(binary)
    except OSError:
        return None
    key = f"{binary}:{st.st_size}:{st.st_mtime_ns}"
    cache_path = contract.state_root() / VERSION_CACHE
    cache: dict[str, int | None] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(cache_path.read_text())
        if isinstance(loaded, dict):
            cache = loaded
    if key in cache:
        return cache[key]
    major = contract.parse_containerd_major(_run_version(binary))
    cache[key] = major
    with contextlib.suppress(OSError):
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f"{VERSION_CACHE}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        tmp.rename(cache_path)
    return major


def _run_version(binary: str) -> str:
    """Output of ``<binary> --version`` ("" on failure), without importing subprocess."""
    read_end, write_end = os.pipe()
    try:
        pid = os.posix_spawn(binary, [binary, "--version"], os.environ, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, write_end, 1),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
        ])
    except OSError:
        os.close(read_end)
        return ""
    finally:
        os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + VERSION_PROBE_TIMEOUT
    try:
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([read_end], [], [], left)
            if not ready:
                break
            chunk = os.read(read_end, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return b"".join(chunks).decode(errors="replace")


def _can_connect(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def _listen(path: Path) -> socket.socket:
    """Bind and listen on ``path`` with mode 0600 from the first instant (umask, not chmod)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(128)
    return sock


def start(flags: Flags, stdin: bytes) -> str:
    """Bring up (or find) the pod's shim and return the bootstrap line for containerd."""
    if not flags.namespace or not flags.id:
        raise UsageError("start needs -namespace and -id")
    bundle = Path(flags.bundle) if flags.bundle else Path.cwd()
    options = contract.decode_runtime_options(stdin)
    config = contract.load_shim_config(options)
    if config.bootstrap_version == "auto":
        version = contract.bootstrap_version_for(containerd_major(flags.publish_binary))
    else:
        version = config.bootstrap_version
    protocol = contract.protocol_for(config.protocol, version)
    spec = contract.read_bundle_spec(bundle)
    group = contract.group_id(spec, flags.id)
    path = contract.socket_path(flags.address, flags.namespace, group)
    bootstrap = contract.bootstrap_json(version, protocol, path)

    for _ in range(3):  # a concurrent start for the same pod may win the bind
        if _can_connect(path):
            return bootstrap  # the pod's shim is already running: share it
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale socket of a dead shim
        try:
            listener = _listen(path)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                continue
            raise StartError(f"cannot listen on {path}: {err}") from err
        break
    else:
        raise StartError(f"socket {path} is in use but does not accept connections")

    with listener:
        # The pod's first container (its id is the pod's) may boot the VM at once.
        early = config.early_boot and bool(spec) and group == flags.id
        serve = replace(flags, action="serve", bundle=str(bundle), socket=str(path),
                        protocol=protocol, bootstrap_version=version, group=group,
                        listen_fd=listener.fileno(), early_boot=early,
                        runtime_options=stdin.hex() if early else "")
        try:
            _spawn_daemon(serve, listener, ShimState.of(flags.namespace, flags.id))
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
    return bootstrap


def _spawn_daemon(serve: Flags, listener: socket.socket, state: ShimState) -> None:
    """Spawn the daemon in its own session, stdio on /dev/null, holding the listening socket.

    gRPC cannot serve an inherited fd, so a gRPC daemon binds a fresh socket and renames it over
    the bootstrap path; ``start`` waits for its readiness line so that containerd never meets a
    socket nobody will accept on. A ttrpc daemon serves the inherited socket: no wait.
    """
    wait_ready = serve.protocol == "grpc"
    read_end = write_end = -1
    if wait_ready:
        read_end, write_end = os.pipe()
        os.set_inheritable(write_end, True)
        serve = replace(serve, ready_fd=write_end)
    os.set_inheritable(listener.fileno(), True)
    argv = [sys.executable, "-m", "shim", *contract.to_argv(serve)]
    try:
        pid = os.posix_spawn(sys.executable, argv, os.environ, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ])
    finally:
        if write_end >= 0:
            os.close(write_end)
    state.write_shim(pid, Path(serve.socket), serve.group)
    if not wait_ready:
        return
    try:
        message = _read_ready(read_end)
    finally:
        os.close(read_end)
    if message != "ready":
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        state.remove()
        raise StartError(f"shim daemon failed to start: {message or 'exited without a word'}")


def _read_ready(fd: int) -> str:
    chunks: list[bytes] = []
    deadline = time.monotonic() + READY_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return f"not ready after {READY_TIMEOUT:.0f} s"
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
        if b"\n" in chunk:
            break
    return b"".join(chunks).decode(errors="replace").strip()


# --- delete -------------------------------------------------------------------------------------


def delete(flags: Flags) -> bytes:
    """Clean up whatever a dead shim left for ``-id``; return a serialised DeleteResponse.

    "Dead" means its socket no longer accepts connections (gone, or unreachable after a failed
    reload): then the daemon (if still there), the recorded helper processes (QEMU …) are
    SIGKILLed, recorded mounts detached, socket and state removed. A daemon that still serves is
    left alone, like containerd-shim-runc-v2's delete never kills its shim.
    The answer is runc-v2's: pid of the recorded init process, exit status 137 (128 + SIGKILL),
    exited_at now.
    """
    if not flags.namespace or not flags.id:
        raise UsageError("delete needs -namespace and -id")
    state = ShimState.of(flags.namespace, flags.id)
    init_pid = state.read_init_pid()
    record = state.read_shim()
    pid, start_time = record.get("pid"), record.get("start_time")
    sock = record.get("socket")
    if isinstance(sock, str) and sock and _can_connect(Path(sock)):
        # The daemon still serves: it owns the pod VM and cleans up on Shutdown. (containerd
        # 2.1.9 runs delete right after connecting to a gRPC shim, believing it gone.)
        return _delete_response(init_pid)
    killed: list[tuple[int, int]] = []
    if isinstance(pid, int) and isinstance(start_time, int) and kill_if_same(pid, start_time):
        killed.append((pid, start_time))
    for helper, helper_start in state.pids():
        if kill_if_same(helper, helper_start):
            killed.append((helper, helper_start))
    _wait_gone(killed, KILL_WAIT)
    network = state.network()
    if network is not None:  # QEMU is gone (and its taps): the veths' redirects remain
        from shim.core.errors import ShimError
        from shim.network.helper import teardown_recorded

        try:
            teardown_recorded(network)
        except (ShimError, OSError, ValueError) as err:
            print(f"delete: pod network: {err}", file=sys.stderr)
    for target in reversed(state.mounts()):
        _unmount(target)
    for directory in state.dirs():
        # The pod's rootfs shares are mounted inside its run directory: detach them first, so
        # rmtree never descends into a container's filesystem.
        for target in mounts_under(directory):
            _unmount(target)
        shutil.rmtree(directory, ignore_errors=True)
    if isinstance(sock, str) and sock:
        with contextlib.suppress(OSError):
            os.unlink(sock)
    state.remove()
    return _delete_response(init_pid)


def _delete_response(init_pid: int) -> bytes:
    now = time.time_ns()
    return (wire.varint_field(1, init_pid)
            + wire.varint_field(2, SIGKILL_EXIT_STATUS)
            + wire.message_field(3, wire.timestamp(now // 1_000_000_000, now % 1_000_000_000)))


def _wait_gone(processes: list[tuple[int, int]], timeout: float) -> None:
    """Until every killed process is gone (or a zombie), so its sockets and mounts are free."""
    deadline = time.monotonic() + timeout
    while any(process_start_time(pid) == start for pid, start in processes):
        if time.monotonic() > deadline:
            print("delete: processes survived SIGKILL: "
                  + ", ".join(str(pid) for pid, _ in processes), file=sys.stderr)
            return
        time.sleep(0.01)


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below ``directory``, deepest first (from /proc/self/mountinfo)."""
    prefix = os.fsencode(directory.resolve())
    found: list[bytes] = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", "rb") as info:
        for line in info:
            fields = line.split()
            if len(fields) > 4:
                # mountinfo escapes space, tab, newline and backslash as octal (\040 …).
                point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), fields[4])
                if point == prefix or point.startswith(prefix + b"/"):
                    found.append(point)
    return [Path(os.fsdecode(p)) for p in sorted(found, key=len, reverse=True)]


def _unmount(target: Path) -> None:
    """Lazy unmount (MNT_DETACH); a path that is not mounted is fine."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)  # libc is already mapped into the interpreter
    if libc.umount2(os.fsencode(target), 2) != 0:  # 2 = MNT_DETACH
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            print(f"delete: umount {target}: {os.strerror(err)}", file=sys.stderr)
