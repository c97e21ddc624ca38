"""``start``'s fast path: hand the whole ``start`` to the node's template process.

The template (:mod:`shim.template`) holds the daemon's modules imported; it forks one
process per request that runs ``start`` exactly as this process would (same argv, environment,
working directory, umask, cgroup, stdin bytes, stdout and stderr), and that forks the pod's
daemon instead of spawning a new interpreter. This module is what ``start`` imports before it
knows whether a template answers, so it imports only built-in modules (``_socket``, ``os``,
``sys``, ``_sha256``): ≈ 1 ms, against ≈ 24 ms for ``start``'s own imports.

One template per (containerd address, code identity): the socket's name is a digest of both,
so a template never serves another containerd's pods nor another checkout's (or interpreter's)
code. When no template answers, :func:`via_template` hands the stdin it read back and
``start`` runs in this process as before; the direct path then launches a template
(:func:`ensure_template`) for the next ``start`` if the ``[shim]`` table keeps ``template``
on. Whatever goes wrong with the template, ``start`` falls back to the direct path and the
reason goes to the template's log (``<template dir>/<digest>.log``): containerd reads
``start``'s stdout and stderr combined, so nothing may be printed there.
"""

from __future__ import annotations

import _socket
import os
import sys

MAGIC = b"COCO-TEMPLATE/1\n"
# How long ``start`` waits for the template's answer (its own ``start`` work and two forks: no
# daemon is waited for, both transports serve the socket ``start`` bound): past it, the
# template is taken for hung and ``start`` runs itself.
REPLY_TIMEOUT = 30.0
DEFAULT_TEMPLATE_DIR = "/run/coco-shim/templates"
TEMPLATE_DIR_ENV = "COCO_SHIM_TEMPLATE_DIR"
# Environment read at import time (by modules the template imports once for every daemon it
# forks): part of the template's identity, so a change gets its own template.
IMPORT_TIME_ENV = ("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION",)
DIGEST_CHARS = 24  # 96 bits: a socket path under a test's temporary directory must fit 107 bytes
FIELDS = 5  # argv, environment, /proc/self/cgroup, umask, stdin
MAX_REQUEST = 64 << 20  # runtime options are at most a few MiB
LOG_LIMIT = 1 << 20


class TemplatePaths:
    """The socket a template serves, the lock it holds while it lives and its log."""

    __slots__ = ("digest", "lock", "log", "socket")

    def __init__(self, directory: str, digest: str) -> None:
        self.digest = digest
        self.socket = f"{directory}/{digest}.sock"
        self.lock = f"{directory}/{digest}.lock"
        self.log = f"{directory}/{digest}.log"


def code_identity() -> str:
    """What the template's code is: this interpreter, its module path (which holds the
    package root) and the environment read at import time."""
    parts = [sys.executable, *sys.path, *(f"{name}={os.environ.get(name, '')}"
                                         for name in IMPORT_TIME_ENV)]
    return "\0".join(parts)


def template_paths(address: str, identity: str | None = None,
                   environ: os._Environ[str] | dict[str, str] | None = None) -> TemplatePaths:
    """The template for containerd at ``address`` running this code."""
    from _sha256 import sha256  # type: ignore[import-not-found]  # built in: no OpenSSL

    env = os.environ if environ is None else environ
    directory = env.get(TEMPLATE_DIR_ENV) or DEFAULT_TEMPLATE_DIR
    key = f"{address}\0{code_identity() if identity is None else identity}"
    return TemplatePaths(directory, sha256(key.encode()).hexdigest()[:DIGEST_CHARS])


def containerd_address(args: list[str]) -> str:
    """The ``-address`` flag's value (Go flag syntax: ``-address x``, ``--address=x``)."""
    for i, arg in enumerate(args):
        name, eq, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or name != "address":
            continue
        if eq:
            return value
        return args[i + 1] if i + 1 < len(args) else ""
    return ""


# --- the request: length-prefixed fields ------------------------------------------------------


def encode_request(argv: list[bytes], environ: list[bytes], cgroup: bytes, umask: int,
                   stdin: bytes) -> bytes:
    """``MAGIC``, the body's length (8 bytes), then each field as length (8 bytes) + bytes."""
    fields = [b"\0".join(argv), b"\0".join(environ), cgroup, b"%d" % umask, stdin]
    body = b"".join(len(f).to_bytes(8, "big") + f for f in fields)
    return MAGIC + len(body).to_bytes(8, "big") + body


class Request:
    """A decoded request (see :func:`encode_request`)."""

    __slots__ = ("argv", "cgroup", "environ", "stdin", "umask")

    def __init__(self, argv: list[str], environ: dict[str, str], cgroup: str, umask: int,
                 stdin: bytes) -> None:
        self.argv = argv
        self.environ = environ
        self.cgroup = cgroup
        self.umask = umask
        self.stdin = stdin


class BadRequest(ValueError):
    """Bytes that are not a whole, well-formed request."""


def request_length(head: bytes) -> int:
    """The whole request's length from its first ``len(MAGIC) + 8`` bytes."""
    if len(head) < len(MAGIC) + 8 or not head.startswith(MAGIC):
        raise BadRequest("not a template request")
    body = int.from_bytes(head[len(MAGIC):len(MAGIC) + 8], "big")
    if body > MAX_REQUEST:
        raise BadRequest(f"request of {body} bytes, more than {MAX_REQUEST}")
    return len(MAGIC) + 8 + body


def decode_request(data: bytes) -> Request:
    if len(data) != request_length(data):
        raise BadRequest("truncated or overlong request")
    fields: list[bytes] = []
    at = len(MAGIC) + 8
    while at < len(data):
        if at + 8 > len(data):
            raise BadRequest("truncated field length")
        size = int.from_bytes(data[at:at + 8], "big")
        at += 8
        if at + size > len(data):
            raise BadRequest("field runs past the request")
        fields.append(data[at:at + size])
        at += size
    if len(fields) != FIELDS:
        raise BadRequest(f"{len(fields)} fields, not {FIELDS}")
    argv_b, env_b, cgroup_b, umask_b, stdin = fields
    environ: dict[str, str] = {}
    for entry in env_b.split(b"\0") if env_b else []:
        name, eq, value = entry.partition(b"=")
        if not eq or not name:
            raise BadRequest(f"environment entry without a name: {entry[:40]!r}")
        environ[os.fsdecode(name)] = os.fsdecode(value)
    if not umask_b.isdigit() or int(umask_b) > 0o777:
        raise BadRequest(f"bad umask {umask_b[:8]!r}")
    argv = [os.fsdecode(a) for a in argv_b.split(b"\0")] if argv_b else []
    if not argv:
        raise BadRequest("empty argv")
    return Request(argv, environ, cgroup_b.decode(errors="replace"), int(umask_b), stdin)


# --- the client -------------------------------------------------------------------------------


def log_line(paths: TemplatePaths, message: str) -> None:
    """Append one line to the template's log (best effort: a log is never worth a failure)."""
    try:
        fd = os.open(paths.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.write(fd, f"start pid {os.getpid()}: {message}\n".encode(errors="replace"))
    except OSError:
        pass
    finally:
        os.close(fd)


def read_stdin() -> bytes:
    """What containerd wrote to ``start``'s stdin (nothing when it is a terminal or closed)."""
    try:
        if os.isatty(0):
            return b""
    except OSError:
        return b""
    chunks = []
    while True:
        try:
            chunk = os.read(0, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class Reply:
    """The template's answer: ``start``'s exit status and the daemon it forked (0: none), or
    (``status`` None) why it did not run ``start``."""

    __slots__ = ("pid", "reason", "status")

    def __init__(self, status: int | None, pid: int = 0, reason: str = "") -> None:
        self.status = status
        self.pid = pid
        self.reason = reason


def parse_reply(reply: bytes) -> Reply:
    """``ok <status> <daemon pid>`` or ``fallback <reason>``."""
    word, _, rest = reply.decode(errors="replace").strip().partition(" ")
    numbers = rest.split()
    if word == "ok" and len(numbers) == 2 and all(n.lstrip("-").isdigit() for n in numbers):
        return Reply(int(numbers[0]), int(numbers[1]))
    if word == "fallback":
        return Reply(None, reason=rest or "the template declined")
    return Reply(None, reason=f"the template ended without an answer ({reply[:80]!r})")


def build_request(args: list[str], stdin: bytes) -> bytes:
    """This process as ``start``: its argv, environment, cgroups, umask and ``stdin``."""
    with open("/proc/self/cgroup", "rb") as f:
        cgroup = f.read()
    umask = os.umask(0o022)
    os.umask(umask)
    argv = [os.fsencode(sys.argv[0] if sys.argv else "containerd-shim-coco-v2"),
            *(os.fsencode(a) for a in args)]
    return encode_request(argv, [k + b"=" + v for k, v in os.environb.items()], cgroup, umask,
                          stdin)


def ask(paths: TemplatePaths, request: bytes) -> Reply:
    """Send ``request`` with this process's working directory, stdout and stderr."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    cwd = -1
    try:
        sock.settimeout(REPLY_TIMEOUT)
        try:
            sock.connect(paths.socket)
        except OSError as err:
            return Reply(None, reason=f"no template at {paths.socket}: {err.strerror or err}")
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fds = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in (cwd, 1, 2))
        try:
            sent = sock.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
            if sent < len(request):
                sock.sendall(request[sent:])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the template answered without reading (it declined): its answer says why
        os.close(cwd)
        cwd = -1
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    except OSError as err:
        return Reply(None, reason=f"the template at {paths.socket} failed: {err}")
    finally:
        if cwd >= 0:
            os.close(cwd)
        sock.close()
    return parse_reply(reply)


def via_template(args: list[str]) -> int | bytes:
    """Run ``start`` in the template: its exit status, or (not served) the stdin bytes read,
    for ``start`` to run here."""
    stdin = read_stdin()
    paths = template_paths(containerd_address(args))
    try:
        request = build_request(args, stdin)
    except OSError as err:
        log_line(paths, f"running start itself: {err}")
        return stdin
    reply = ask(paths, request)
    if reply.status is not None:
        return reply.status
    if not reply.reason.startswith("no template"):  # a node's first start is no news
        log_line(paths, f"running start itself: {reply.reason}")
    return stdin


def template_locked(paths: TemplatePaths) -> bool:
    """True while a template (starting or serving) holds the lock of ``paths``."""
    import fcntl

    try:
        fd = os.open(paths.lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def ensure_template(address: str) -> int | None:
    """Launch the template for ``address`` and this code unless one serves or is starting;
    its pid, or None. Best effort: ``start`` already did its work without it."""
    from shim.core.interpreter import module_path

    paths = template_paths(address)
    if template_locked(paths):  # (never a probe connection: the template would fork for it)
        return None
    if len(os.fsencode(paths.socket)) > 107:
        log_line(paths, f"no template: socket path {paths.socket} is too long")
        return None
    try:
        os.makedirs(os.path.dirname(paths.socket), mode=0o700, exist_ok=True)
        return os.posix_spawn(sys.executable, template_argv(paths, module_path(), os.getppid()),
                              os.environ, setsid=True, file_actions=[
                                  (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDWR, 0),
                                  (os.POSIX_SPAWN_DUP2, 0, 1),
                                  (os.POSIX_SPAWN_DUP2, 0, 2)])
    except OSError as err:
        log_line(paths, f"cannot launch a template: {err}")
        return None


TEMPLATE_ENTRY = "shim.template.server"


def template_argv(paths: TemplatePaths, module_path: list[str], containerd_pid: int) -> list[str]:
    """``python -I -S -c <entry> <socket> <lock> <log> <containerd pid>``: the template's
    command line (the interpreter flags and module path of the daemon's)."""
    from shim.core.interpreter import FLAGS

    code = (f"import gc, sys\ngc.disable()\nsys.path[:] = {list(module_path)!r}\n"
            f"from {TEMPLATE_ENTRY} import main\nsys.exit(main(sys.argv[1:]))\n")
    return [sys.executable, *FLAGS, "-c", code, paths.socket, paths.lock, paths.log,
            str(containerd_pid)]
