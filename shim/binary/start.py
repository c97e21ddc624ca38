"""``containerd-shim-coco-v2 start``: bring up (or find) the pod's shim, print its address.

On containerd's critical path, once per container: it only touches the configuration, the
bundle, a unix socket and ``posix_spawn``. It never imports grpc, pyroute2 or generated
protobuf modules (a unit test checks ``sys.modules``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from shim.binary import bootstrap
from shim.binary.flags import Flags, UsageError, to_argv
from shim.core import identifiers, interpreter
from shim.core.bundle import group_id, read_spec
from shim.core.config import config_source, decode_runtime_options
from shim.core.crash_record import ShimState
from shim.core.errors import Unavailable


class StartError(Unavailable):
    """``start`` could not bring up the shim (printed for containerd, exit status 1)."""


# How the daemon comes to life: (its command line, its flags) -> its pid. The default spawns a
# new interpreter; the template forks one that has the daemon's modules already imported.
Launch = Callable[[list[str], Flags], int]


def spawn_process(argv: list[str], serve: Flags) -> int:
    """A new interpreter in its own session, stdio on /dev/null, inheriting the listening
    socket (and the options memfd)."""
    return os.posix_spawn(sys.executable, argv, os.environ, setsid=True, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDWR, 0),
        (os.POSIX_SPAWN_DUP2, 0, 1),
        (os.POSIX_SPAWN_DUP2, 0, 2),
    ])


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


def start(flags: Flags, stdin: bytes, launch: Launch | None = None) -> str:
    """Bring up (or find) the pod's shim and return the bootstrap line for containerd.

    ``launch`` None: this process is ``start`` itself; it spawns the daemon and, if the
    ``[shim]`` table keeps ``template`` on, the node's template for the next ``start``."""
    if not flags.namespace or not flags.id:
        raise UsageError("start needs -namespace and -id")
    identifiers.validate("namespace", flags.namespace)
    identifiers.validate("id", flags.id)
    bundle = Path(flags.bundle) if flags.bundle else Path.cwd()
    spec = read_spec(bundle, missing_ok=True)
    group = group_id(spec, flags.id)
    # After the bundle's checks: a refused start leaves no config cache behind.
    config = bootstrap.cached_shim_config(config_source(decode_runtime_options(stdin)))
    if config.bootstrap_version == "auto":
        version = bootstrap.bootstrap_version_for(
            bootstrap.containerd_major(flags.publish_binary))
    else:
        version = config.bootstrap_version
    protocol = bootstrap.protocol_for(config.protocol, version)
    path = bootstrap.socket_path(flags.address, flags.namespace, group)
    answer = bootstrap.bootstrap_json(version, protocol, path)
    try:  # for the first container and every other one the pod's shim serves
        bootstrap.write_address_file(bundle, version, protocol, path)
    except OSError as err:
        raise StartError(f"cannot write {bundle / bootstrap.ADDRESS_FILE}: {err}") from err

    for _ in range(3):  # a concurrent start for the same pod may win the bind
        if bootstrap.can_connect(path):
            return answer  # the pod's shim is already running: share it
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
        serve = flags._replace(action="serve", bundle=str(bundle), socket=str(path),
                        protocol=protocol, bootstrap_version=version, group=group,
                        listen_fd=listener.fileno(), early_boot=early)
        options_fd = _options_memfd(stdin) if early else -1
        try:
            _spawn_daemon(serve._replace(runtime_options_fd=options_fd), listener,
                          ShimState.of(flags.namespace, flags.id), launch or spawn_process)
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        finally:
            if options_fd >= 0:
                os.close(options_fd)
    if launch is None and config.template:
        from shim.binary.template_client import ensure_template

        ensure_template(flags.address)
    return answer


def _options_memfd(options: bytes) -> int:
    """An inheritable memfd holding ``start``'s runtime options for the daemon (not its argv:
    E2BIG above 128 KiB, and world-readable in /proc/<pid>/cmdline)."""
    fd = os.memfd_create("coco-shim-runtime-options", 0)  # no MFD_CLOEXEC: the daemon inherits
    try:
        view = memoryview(options)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _spawn_daemon(serve: Flags, listener: socket.socket, state: ShimState,
                  launch: Launch) -> None:
    """Spawn the daemon in its own session, stdio on /dev/null, holding the listening socket.

    Both transports (ttrpc, and gRPC through grpclib) serve the inherited listening socket, so
    ``start`` returns at once: a connection containerd makes before the daemon accepts waits in
    the socket's backlog. There is no readiness pipe any more (grpcio could not serve an
    inherited fd, so a gRPC daemon used to bind a fresh socket and ``start`` waited for its
    readiness line); a daemon that dies before serving leaves a socket nobody accepts on, which
    containerd sees as a refused connection, as it always did on ttrpc.
    """
    os.set_inheritable(listener.fileno(), True)
    argv = interpreter.daemon_argv(to_argv(serve))
    pid = launch(argv, serve)
    state.write_shim(pid, Path(serve.socket), serve.group)
