"""The template's serving loop: preload, freeze, wait on the socket and containerd's pidfd,
fork one intermediate per request (see :mod:`shim.template`)."""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Iterable
from typing import Final

from shim.binary.template_client import TemplatePaths
from shim.template.child import Log, intermediate, peer_credentials

# What the daemon imports before (and right after) it serves: every pod's daemon gets them
# from the template. The transport modules are one list of their own: ttrpc (containerd 2.x)
# and gRPC (containerd 1.7: grpclib, h2, hpack, hyperframe, multidict; pure Python, no threads
# and no fork handlers, ≈ 2 MiB the daemons share).
TRANSPORT_MODULES: Final[tuple[str, ...]] = ("shim.daemon.ttrpc_server",
                                             "shim.daemon.grpc_server")
PRELOAD: Final[tuple[str, ...]] = (
    "shim.__main__",
    "shim.binary.start",
    "shim.daemon.main",
    "shim.daemon.sandbox_service",
    "shim.daemon.task_service",
    "shim.task.manager",
    "shim.pod.boot",  # the boot machinery the daemon loads in a thread once it serves
    "concurrent.futures.thread",  # asyncio.to_thread's executor (that load, its first use)
    *TRANSPORT_MODULES,
)


class Stopped(Exception):
    """SIGTERM: the template stops serving and exits (its socket removed)."""


# --- code identity ----------------------------------------------------------------------------


def code_stamp(modules: Iterable[object] | None = None) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every loaded module's file, and of the interpreter."""
    stamp: dict[str, tuple[int, int]] = {}
    files = [sys.executable]
    for module in list(sys.modules.values()) if modules is None else modules:
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            files.append(path)
    for path in files:
        try:
            st = os.stat(path)
        except OSError:
            stamp[path] = (-1, -1)
        else:
            stamp[path] = (st.st_size, st.st_mtime_ns)
    return stamp


def changed(stamp: dict[str, tuple[int, int]]) -> str | None:
    """The first file whose size or mtime differs from ``stamp``; None if none does."""
    for path, (size, mtime) in stamp.items():
        try:
            st = os.stat(path)
        except OSError:
            now = (-1, -1)
        else:
            now = (st.st_size, st.st_mtime_ns)
        if now != (size, mtime):
            return path
    return None


# --- the template -----------------------------------------------------------------------------


def preload(modules: Iterable[str] = PRELOAD) -> None:
    for name in modules:
        importlib.import_module(name)


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def listen(path: str) -> socket.socket:
    """Bind ``path`` (mode 0600 from the first instant) and listen; a stale socket file (the
    lock is ours, so nobody serves it) is replaced."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


class Template:
    """The serving loop; ``serve`` returns when containerd exits or the code changed."""

    def __init__(self, paths: TemplatePaths, containerd_pid: int, log: Log,
                 lock_fd: int, watch: int, stamp: dict[str, tuple[int, int]]) -> None:
        self.paths = paths
        self.containerd_pid = containerd_pid
        self.log = log
        self.lock_fd = lock_fd
        self.watch = watch  # pidfd of containerd
        self.stamp = stamp
        self.children: dict[int, int] = {}  # pidfd -> pid of an intermediate
        self.listener = listen(paths.socket)
        self.inode = os.stat(paths.socket).st_ino

    def serve(self) -> str:
        """Serve until containerd exits or the code changes; why it stopped."""
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self.watch, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self.watch:
                    return f"containerd (pid {self.containerd_pid}) exited"
                if fd in self.children:
                    poller.unregister(fd)
                    self._reap(fd)
                elif fd == self.listener.fileno():
                    stop = self._accept(poller)
                    if stop:
                        return stop

    def _reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        os.close(pidfd)

    def _accept(self, poller: select.poll) -> str | None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return None
        with conn:
            pid, uid, _ = peer_credentials(conn)
            if uid != os.getuid():
                self.log(f"refused pid {pid}: uid {uid}, not {os.getuid()}")
                return None
            stale = changed(self.stamp)
            if stale is not None:
                self.stop_listening()  # before the answer: that start launches a new template
                with contextlib.suppress(OSError):
                    conn.sendall(f"fallback the template's code changed ({stale})\n".encode())
                return f"code on disk changed: {stale}"
            child = os.fork()
            if child == 0:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the template's own, below
                status = 1
                try:
                    status = intermediate(conn, self.containerd_pid, self.log, self._fds())
                finally:
                    os._exit(status)
            pidfd = os.pidfd_open(child)
            self.children[pidfd] = child
            poller.register(pidfd, select.POLLIN)
        return None

    def _fds(self) -> list[int]:
        return [self.listener.fileno(), self.lock_fd, self.watch, *self.children]

    def stop_listening(self) -> None:
        if self.listener.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.paths.socket).st_ino == self.inode:
                os.unlink(self.paths.socket)
        self.listener.close()

    def close(self) -> None:
        self.stop_listening()
        for pidfd in list(self.children):
            self._reap(pidfd)  # intermediates are quick: they end with their start


def main(argv: list[str], modules: Iterable[str] = PRELOAD) -> int:
    """``<socket> <lock> <log> <containerd pid>``: serve as the template (see the module
    docstring); 0 when another template holds the lock or containerd is gone."""
    if len(argv) != 4 or not argv[3].isdigit():
        print("usage: template <socket> <lock> <log> <containerd pid>", file=sys.stderr)
        return 2
    socket_path, lock_path, log_path, pid_text = argv
    directory = os.path.dirname(socket_path)
    paths = TemplatePaths(directory, os.path.basename(socket_path).removesuffix(".sock"))
    paths.socket, paths.lock, paths.log = socket_path, lock_path, log_path
    containerd_pid = int(pid_text)
    os.umask(0o077)
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock_fd)
        return 0  # another template is starting or serving: it wins
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, b"%d\n" % os.getpid())  # who holds it (operators, tests)
    log = Log(log_path)
    try:
        watch = os.pidfd_open(containerd_pid)
    except OSError as err:
        log(f"not serving: containerd pid {containerd_pid}: {err.strerror}")
        return 0
    try:
        preload(modules)
        if (threads := thread_count()) != 1:
            log(f"not serving: {threads} threads after the imports (fork is unsafe)")
            return 1
        stamp = code_stamp()
        gc.freeze()  # what the daemons share stays untouched by collections (copy-on-write)
        template = Template(paths, containerd_pid, log, lock_fd, watch, stamp)
    except Exception as err:
        log(f"not serving: {err!r}\n{traceback.format_exc()}")
        return 1

    def stop(signum: int, _frame: object) -> None:
        raise Stopped(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)
    status = 0
    try:
        why = template.serve()
    except Stopped as stopped:
        why = str(stopped)
    except Exception as err:  # (fork refused, …): starts run themselves, the next relaunches
        why = f"failed: {err!r}\n{traceback.format_exc()}"
        status = 1
    finally:
        template.close()
    log(f"exits: {why}")
    return status
