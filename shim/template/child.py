"""The template's children: the intermediate that becomes ``start`` for one request, and the
daemon it forks (see :mod:`shim.template` for the life of a request)."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from shim.binary import template_client
from shim.binary.flags import Flags, parse_flags
from shim.binary.template_client import BadRequest, Request, decode_request, request_length

REQUEST_TIMEOUT: Final = 10.0  # a peer that connected sends its request at once
PR_SET_MM: Final = 35
PR_SET_MM_MAP: Final = 14


class Declined(Exception):
    """The template will not run this ``start``; the message says why (``start`` runs itself)."""


class Log:
    """The template's log: one line per event worth knowing (refusals, fallbacks, exit)."""

    def __init__(self, path: str) -> None:
        with contextlib.suppress(OSError):
            if os.stat(path).st_size > template_client.LOG_LIMIT:
                os.truncate(path, 0)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def __call__(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with contextlib.suppress(OSError):
            os.write(self.fd, f"{stamp} template pid {os.getpid()}: {message}\n".encode(
                errors="replace"))


# --- the request's side (the intermediate) ----------------------------------------------------


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connected peer (SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def parent_of(pid: int) -> int:
    """Field 4 of /proc/<pid>/stat (0 if the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2:].split()[1])


def read_request(conn: socket.socket) -> tuple[Request, list[int]]:
    """The request and the descriptors that came with it (working directory, stdout,
    stderr)."""
    head, fds, _, _ = socket.recv_fds(conn, 1 << 16, 8)
    if not head and not fds:
        raise Declined("the peer closed without a request")
    try:
        data = bytearray(head)
        if len(data) < len(template_client.MAGIC) + 8:
            data += _recv_exactly(conn, len(template_client.MAGIC) + 8 - len(data))
        total = request_length(bytes(data))
        if total > len(data):
            data += _recv_exactly(conn, total - len(data))
        request = decode_request(bytes(data))
        if len(fds) != 3:
            raise BadRequest(f"{len(fds)} descriptors, not 3")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return request, fds


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size > 0:
        chunk = conn.recv(min(size, 1 << 20))
        if not chunk:
            raise BadRequest("the peer closed before the whole request")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def cgroup_mounts() -> dict[str, tuple[str, str]]:
    """Hierarchy key (``""`` for cgroup v2, else the v1 controllers as in /proc/self/cgroup)
    → (mount point, mount root)."""
    mounts: dict[str, tuple[str, str]] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point = fields[3], fields[4].replace("\\040", " ")
        if tail[0] == "cgroup2":
            mounts.setdefault("", (point, root))
        elif tail[0] == "cgroup":
            options = tail[2].split(",")
            known = _v1_controllers()
            controllers = [o for o in options if o in known or o.startswith("name=")]
            if controllers:
                mounts.setdefault(",".join(sorted(controllers)), (point, root))
    return mounts


def _v1_controllers() -> set[str]:
    try:
        lines = Path("/proc/cgroups").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {line.split()[0] for line in lines if line.strip()}


def join_cgroups(wanted: str) -> None:
    """Move this process into the cgroups ``wanted`` names (``start``'s /proc/self/cgroup),
    each hierarchy that differs from ours; OSError if one cannot be joined."""
    ours = {line.split(":", 2)[1]: line.split(":", 2)[2]
            for line in Path("/proc/self/cgroup").read_text().splitlines() if line.count(":") >= 2}
    mounts: dict[str, tuple[str, str]] | None = None
    for line in wanted.splitlines():
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if ours.get(controllers) == path:
            continue
        if mounts is None:
            mounts = cgroup_mounts()
        key = ",".join(sorted(controllers.split(","))) if controllers else ""
        if key not in mounts:
            raise OSError(errno.ENOENT, f"no mount of cgroup hierarchy {controllers or 'v2'!r}")
        point, root = mounts[key]
        relative = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
        if relative.startswith(".."):
            raise OSError(errno.EACCES, f"cgroup {path} is outside the mount of {root}")
        procs = os.path.join(point, relative, "cgroup.procs")
        with open(procs, "w") as f:
            f.write("0")


def rename_process(argv: list[str], environ: dict[str, str]) -> str | None:
    """Make ``/proc/self/cmdline`` and ``environ`` show ``argv`` and ``environ`` (what a
    spawned daemon shows: ``ps``, psutil and the leak checks tell daemons by them). One
    ``prctl(PR_SET_MM, PR_SET_MM_MAP)`` with the process's own memory map but the argument
    and environment areas moved to a private page holding the new ones (no capability needed,
    unlike the single-field options). None, or why it failed."""
    import ctypes
    import mmap

    def block(items: Iterable[str]) -> bytes:
        return b"".join(os.fsencode(item) + b"\0" for item in items)

    args = block(argv)
    env = block(f"{k}={v}" for k, v in environ.items())
    # Private: /proc reads it like the stack it replaces (a shared mapping is not anonymous
    # memory to the kernel, and /proc/<pid>/cmdline would read empty).
    area = mmap.mmap(-1, len(args) + len(env), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.write(args + env)
    _KEEP.append(area)  # the kernel reads it whenever /proc is read: it lives as long as we do
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    stat = Path("/proc/self/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3

    def field(number: int) -> int:
        return int(fields[number - 3])

    libc = ctypes.CDLL(None, use_errno=True)
    libc.sbrk.restype = ctypes.c_void_p
    auxv = Path("/proc/self/auxv").read_bytes()
    auxv_buffer = ctypes.create_string_buffer(auxv, len(auxv))
    mm = _MmMap(field(26), field(27), field(45), field(46), field(47), libc.sbrk(0) or 0,
                field(28), base, base + len(args), base + len(args), base + len(args) + len(env),
                ctypes.addressof(auxv_buffer), len(auxv), 0xFFFFFFFF)
    if libc.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def _mm_map_type() -> type:
    import ctypes

    names = ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
             "start_stack", "arg_start", "arg_end", "env_start", "env_end", "auxv")
    return type("_MmMap", (ctypes.Structure,), {"_fields_": [
        *((name, ctypes.c_uint64) for name in names),
        ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]})


_MmMap: Final = _mm_map_type()  # struct prctl_mm_map (linux/prctl.h)
_KEEP: list[object] = []


def close_except(keep: set[int], low: int = 3) -> None:
    """Close every descriptor from ``low`` up but those in ``keep``."""
    for fd in sorted(int(name) for name in os.listdir("/proc/self/fd")):
        if fd >= low and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def fork_daemon(argv: list[str], serve: Flags) -> int:
    """``start``'s launch in the intermediate: fork the daemon (see the module docstring)."""
    keep = {fd for fd in (serve.listen_fd, serve.runtime_options_fd) if fd >= 0}
    for fd in keep:
        os.set_inheritable(fd, True)
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        close_except(keep)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        random.seed()  # (the module reseeds at fork itself; explicit, for any later change)
        sys.argv = ["-c", *argv[4:]]  # what `python -c <code> args…` sees
        why = rename_process(argv, dict(os.environ))
        flags = parse_flags(argv[4:])  # exactly as a spawned daemon parses its command line
        import shim.daemon.main as daemon

        if why is not None:
            daemon.log.debug("cannot show the daemon's command line in /proc: %s", why)
        status = daemon.main(flags)
    except BaseException:  # the daemon's own handler logs; this is the last resort
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        os._exit(status)


NAMESPACES: Final = ("mnt", "net", "pid", "ipc", "uts", "user", "cgroup", "time")


def unlike(pid: int) -> str | None:
    """What of ``start`` (``pid``) the forked daemon could not inherit from us: a namespace,
    a resource limit or the OOM score adjustment that differs (the one adjustment that may be
    written is). None: nothing."""
    for ns in NAMESPACES:
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"):
                return f"start runs in another {ns} namespace"
    if Path(f"/proc/{pid}/limits").read_text() != Path("/proc/self/limits").read_text():
        return "start has other resource limits"
    theirs = Path(f"/proc/{pid}/oom_score_adj").read_text()
    if theirs != Path("/proc/self/oom_score_adj").read_text():
        try:
            Path("/proc/self/oom_score_adj").write_text(theirs)
        except OSError as err:
            return f"cannot take start's oom_score_adj {theirs.strip()}: {err.strerror}"
    return None


def shim_config_of(stdin: bytes) -> bool:
    """Whether ``start``'s configuration keeps the template on (True when it cannot be read:
    ``start`` reports that itself, as it would without the template)."""
    from shim.binary import bootstrap
    from shim.core.config import config_source, decode_runtime_options

    try:
        return bootstrap.cached_shim_config(
            config_source(decode_runtime_options(stdin))).template
    except Exception:
        return True


def run_start(conn: socket.socket, containerd_pid: int, log: Log) -> None:
    """The intermediate: become ``start``, run it with :func:`fork_daemon`, answer."""
    conn.settimeout(REQUEST_TIMEOUT)
    request, (cwd, out, err) = read_request(conn)
    pid, _, _ = peer_credentials(conn)
    if request.argv[-1:] != ["start"]:
        raise Declined(f"not a start: {request.argv[-1:]}")
    if parent_of(pid) != containerd_pid:
        raise Declined(f"start's parent {parent_of(pid)} is not this template's containerd "
                       f"{containerd_pid}")
    if (difference := unlike(pid)) is not None:
        raise Declined(difference)
    try:
        join_cgroups(request.cgroup)
    except OSError as error:
        raise Declined(f"cannot join start's cgroups: {error}") from error
    os.environ.clear()
    os.environ.update(request.environ)
    if not shim_config_of(request.stdin):
        raise Declined("[shim] template = false")
    os.fchdir(cwd)
    os.close(cwd)
    os.umask(request.umask)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    sys.argv = request.argv
    from shim.__main__ import main

    daemons: list[int] = []

    def launch(argv: list[str], serve: Flags) -> int:
        try:
            daemons.append(fork_daemon(argv, serve))
        except OSError as error:  # start's rollback runs, then start runs itself
            raise Declined(f"cannot fork the daemon: {error}") from error
        return daemons[-1]

    status = main(request.argv[1:], stdin=request.stdin, launch=launch)
    sys.stdout.flush()
    sys.stderr.flush()
    conn.sendall(f"ok {status} {daemons[-1] if daemons else 0}\n".encode())


def spare(channel: socket.socket, containerd_pid: int, log: Log, close: Iterable[int]) -> int:
    """A spare intermediate's whole life (forked before its request, off ``start``'s path):
    wait for one connection on ``channel``, serve it as :func:`intermediate`, exit. EOF (the
    template closed its end, stopped or died) ends it at once with nothing served; it is never
    reused: the template forks the next one."""
    _close(close)
    try:
        _, fds, _, _ = socket.recv_fds(channel, 16, 1)
    except OSError:
        return 0
    finally:
        channel.close()
    if not fds:
        return 0
    return intermediate(socket.socket(fileno=fds[0]), containerd_pid, log, ())


def _close(fds: Iterable[int]) -> None:
    for fd in fds:  # the template's: above all its lock, which must die with the template
        with contextlib.suppress(OSError):
            os.close(fd)


def intermediate(conn: socket.socket, containerd_pid: int, log: Log,
                 close: Iterable[int]) -> int:
    """The forked intermediate's whole life; its exit status."""
    _close(close)
    try:
        run_start(conn, containerd_pid, log)
        return 0
    except Declined as why:
        log(f"declined: {why}")
        with contextlib.suppress(OSError):
            conn.sendall(f"fallback {why}\n".encode())
        return 0
    except BaseException as error:
        log(f"failed: {error!r}\n{traceback.format_exc()}")
        with contextlib.suppress(BaseException):
            conn.sendall(f"fallback the template failed: {error!r}\n".encode())
        return 1


