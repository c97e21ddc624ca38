"""The template's serving loop: preload, freeze, wait on the socket and containerd's pidfd,
hand each request to the spare intermediate forked in advance, then fork the next spare (see
:mod:`shim.template`)."""

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
from shim.template.child import Log, intermediate, peer_credentials, spare
from shim.template.codewatch import CodeWatch, Stamp, code_stamp

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


class Spare:
    """The intermediate forked in advance: it waits on its end of ``channel`` for one
    request's connection (SCM_RIGHTS), runs it and exits; EOF (the template closed its end,
    or died) ends it without a request."""

    def __init__(self, pid: int, pidfd: int, channel: socket.socket) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.channel = channel


STOP_SIGNALS: Final[tuple[signal.Signals, ...]] = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM or SIGINT ends the serving loop through the signal module's wakeup pipe: the C
    handler writes the signal's number into it, whatever Python runs at that instant, and the
    loop polls its read end. The Python handlers do nothing. One that raised would lose the
    signal when it lands during ``os.fork()``: the handler then runs inside an at-fork callback
    (logging registers one), where an exception is printed to stderr and dropped, and the
    template went on serving."""

    def __init__(self) -> None:
        self.fd, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            signal.signal(signum, _noted)

    def received(self) -> str:
        """The signals in the pipe, by name (drained)."""
        data = b""
        with contextlib.suppress(BlockingIOError):
            data = os.read(self.fd, 64)
        return ", ".join(sorted({signal.Signals(n).name for n in data})) or "a signal"

    def fds(self) -> list[int]:
        return [self.fd, self._write]


def _noted(_signum: int, _frame: object) -> None:
    """The wakeup pipe carries the signal (:class:`StopSignals`)."""


def reset_signals_in_child() -> None:
    """A forked child's first step: no wakeup pipe (its descriptors are the template's, closed
    next) and the default handlers, as a freshly started interpreter has them."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
    """The serving loop; ``serve`` returns when containerd exits, the code changed or a stop
    signal came."""

    def __init__(self, paths: TemplatePaths, containerd_pid: int, log: Log,
                 lock_fd: int, watch: int, stamp: Stamp, stop: StopSignals) -> None:
        self.paths = paths
        self.stop = stop
        self.containerd_pid = containerd_pid
        self.log = log
        self.lock_fd = lock_fd
        self.watch = watch  # pidfd of containerd
        self.code = CodeWatch(stamp)  # cheap to ask on every request (inotify)
        self.children: dict[int, int] = {}  # pidfd -> pid of an intermediate (or the spare)
        self.spare: Spare | None = None
        self.poller = select.poll()
        self.listener = listen(paths.socket)
        self.inode = os.stat(paths.socket).st_ino

    def serve(self) -> str:
        """Serve until containerd exits, the code changes or a stop signal comes; why it
        stopped."""
        poller = self.poller
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self.watch, select.POLLIN)
        poller.register(self.stop.fd, select.POLLIN)
        self._fork_spare()
        while True:
            for fd, _ in poller.poll():
                if fd == self.stop.fd:
                    return f"signal {self.stop.received()}"
                if fd == self.watch:
                    return f"containerd (pid {self.containerd_pid}) exited"
                if fd in self.children:
                    poller.unregister(fd)
                    self._reap(fd)
                elif fd == self.listener.fileno():
                    stop = self._accept()
                    if stop:
                        return stop
            if self.spare is None:  # used (or died): the next one, off this request's path
                self._fork_spare()

    def _reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        if self.spare is not None and self.spare.pidfd == pidfd:  # died unused (killed)
            self._drop_spare()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        os.close(pidfd)

    def _fork_spare(self) -> None:
        """Fork the next spare intermediate. A fork refused (EAGAIN, ENOMEM) leaves none:
        requests are forked for as they come, and the next one tries again."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            child = os.fork()
        except OSError as err:
            ours.close()
            theirs.close()
            self.log(f"no spare intermediate: {err}")
            return
        if child == 0:
            reset_signals_in_child()
            status = 1
            try:
                status = spare(theirs, self.containerd_pid, self.log,
                               [*self._fds(), ours.fileno()])
            finally:
                os._exit(status)
        theirs.close()
        self.spare = Spare(child, os.pidfd_open(child), ours)
        self.children[self.spare.pidfd] = child
        self.poller.register(self.spare.pidfd, select.POLLIN)

    def _drop_spare(self) -> None:
        """Close our end of the spare's channel (an unused spare sees EOF and exits); the
        process is reaped through its pidfd like any intermediate."""
        used, self.spare = self.spare, None
        if used is not None:
            used.channel.close()

    def _hand_to_spare(self, conn: socket.socket) -> bool:
        """Give ``conn`` to the spare (which becomes this request's intermediate); False if
        there is none or it is gone."""
        if self.spare is None:
            return False
        try:
            socket.send_fds(self.spare.channel, [b"r"], [conn.fileno()])
        except OSError as err:  # it died meanwhile: its pidfd reaps it
            self.log(f"spare intermediate {self.spare.pid} gone ({err.strerror}): forking")
            return False
        finally:
            self._drop_spare()  # used or not, never again
        return True

    def _accept(self) -> str | None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return None
        with conn:
            pid, uid, _ = peer_credentials(conn)
            if uid != os.getuid():
                self.log(f"refused pid {pid}: uid {uid}, not {os.getuid()}")
                return None
            stale = self.code.changed()
            if stale is not None:
                self.stop_listening()  # before the answer: that start launches a new template
                with contextlib.suppress(OSError):
                    conn.sendall(f"fallback the template's code changed ({stale})\n".encode())
                return f"code on disk changed: {stale}"
            if self._hand_to_spare(conn):
                return None
            child = os.fork()
            if child == 0:
                reset_signals_in_child()
                status = 1
                try:
                    status = intermediate(conn, self.containerd_pid, self.log, self._fds())
                finally:
                    os._exit(status)
            pidfd = os.pidfd_open(child)
            self.children[pidfd] = child
            self.poller.register(pidfd, select.POLLIN)
        return None

    def _fds(self) -> list[int]:
        spare_channel = [self.spare.channel.fileno()] if self.spare is not None else []
        return [self.listener.fileno(), self.lock_fd, self.watch, self.code.fd,
                *self.stop.fds(), *self.children, *spare_channel]

    def stop_listening(self) -> None:
        if self.listener.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.paths.socket).st_ino == self.inode:
                os.unlink(self.paths.socket)
        self.listener.close()

    def close(self) -> None:
        self.stop_listening()
        self._drop_spare()  # EOF: the unused spare exits at once
        for pidfd in list(self.children):
            self._reap(pidfd)  # intermediates are quick: they end with their start
        self.code.close()


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
    stop = StopSignals()  # from here on a stop signal waits for the loop (socket removed)
    try:
        preload(modules)
        if (threads := thread_count()) != 1:
            log(f"not serving: {threads} threads after the imports (fork is unsafe)")
            return 1
        stamp = code_stamp()
        gc.freeze()  # what the daemons share stays untouched by collections (copy-on-write)
        template = Template(paths, containerd_pid, log, lock_fd, watch, stamp, stop)
    except Exception as err:
        log(f"not serving: {err!r}\n{traceback.format_exc()}")
        return 1
    status = 0
    try:
        why = template.serve()
    except Exception as err:  # (fork refused, …): starts run themselves, the next relaunches
        why = f"failed: {err!r}\n{traceback.format_exc()}"
        status = 1
    finally:
        template.close()
    log(f"exits: {why}")
    return status
