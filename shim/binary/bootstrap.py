"""What ``start`` tells containerd: the socket path (containerd's convention), the protocol
and bootstrap version for the containerd it runs under, and the bootstrap JSON.

Cheap: no protobuf, no subprocess module (``containerd --version`` runs through posix_spawn,
once per containerd binary, cached).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import time
from pathlib import Path
from typing import Any, Final, Literal

from shim.core import paths
from shim.core.config import ConfigSource, Protocol, ShimConfig, shim_config
from shim.core.errors import InvalidArgument

# sockaddr_un.sun_path is 108 bytes; containerd keeps shim socket paths to 106.
MAX_SOCKET_PATH: Final = 106
VERSION_CACHE: Final = "containerd-versions.json"
SHIM_CONFIG_CACHE: Final = "shim-configs.json"
SHIM_CONFIG_CACHE_ENTRIES: Final = 32  # profiles (and ConfigBody variants) a node uses
ADDRESS_FILE: Final = "address"


def socket_path(address: str, namespace: str, group_id: str) -> Path:
    """containerd's convention: ``<socket dir>/<hex sha256(filepath.Join(address, ns, group))>``."""
    joined = os.path.normpath(os.path.join(address, namespace, group_id))
    path = paths.socket_dir() / paths.sha256_hex(joined.encode())
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise InvalidArgument(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes")
    return path


def can_connect(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def bootstrap_json(version: int, protocol: Protocol, path: Path | str) -> str:
    """What ``start`` prints: gRPC wants a bare absolute path, ttrpc a ``unix://`` address."""
    address = str(path) if protocol == "grpc" else f"unix://{path}"
    return json.dumps({"version": version, "address": address, "protocol": protocol},
                      separators=(",", ":"))


def write_address_file(bundle: Path, version: int, protocol: Protocol,
                       path: Path | str) -> Path:
    """Write the bundle's ``address`` file (atomically): how containerd 1.7 finds this shim
    again after its own restart.

    containerd 1.7 never records where its shims listen: on start-up its ``loadShim`` reads
    ``<bundle>/address``, which the shim writes (containerd-shim-runc-v2 does), and parses it
    like ``start``'s output. Without the file it takes the shim for dead, runs ``delete`` and
    forgets the task. containerd 2.x writes its own ``bootstrap.json`` and reads ``address`` only
    to migrate a 1.x bundle, as a plain ttrpc address. So a ttrpc shim records its plain
    ``unix://`` address (read right by both), a gRPC one the bootstrap JSON (a plain address
    means ttrpc to containerd).
    """
    text = f"unix://{path}" if protocol == "ttrpc" else bootstrap_json(version, protocol, path)
    target = bundle / ADDRESS_FILE
    staging = bundle / f".{ADDRESS_FILE}.{os.getpid()}"
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(staging, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
    return target


def protocol_for(configured: Protocol | Literal["auto"], bootstrap_version: int) -> Protocol:
    """The transport: as configured, or for "auto" gRPC on containerd 1.7, ttrpc on 2.x."""
    if configured != "auto":
        return configured
    return "grpc" if bootstrap_version == 2 else "ttrpc"


def parse_containerd_major(version_output: str) -> int | None:
    """``containerd github.com/containerd/containerd/v2 2.1.9 …`` → 2; None if unrecognised."""
    parts = version_output.split()
    if len(parts) < 3:
        return None
    major = parts[2].lstrip("v").split(".", 1)[0]
    return int(major) if major.isdigit() else None


def bootstrap_version_for(containerd_major: int | None) -> int:
    """containerd 1.x needs bootstrap version 2 (1.7.24 rejects 3); 2.x and unknown get 3."""
    return 2 if containerd_major is not None and containerd_major < 2 else 3


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
    cache_path = paths.state_root() / VERSION_CACHE
    cache = _read_cache(cache_path)
    if key in cache:
        cached: int | None = cache[key]
        return cached
    major = parse_containerd_major(_run_version(binary))
    cache[key] = major
    _write_cache(cache_path, cache)
    return major


def cached_shim_config(found: ConfigSource) -> ShimConfig:
    """:func:`shim_config` of ``found``, cached by the SHA-256 of its text.

    ``start`` needs three keys of a profile of a few KiB; importing tomllib and parsing it is
    ≈ 3 ms of every ``start`` (more on a busy node). A text seen before costs a digest and a
    small JSON read. Only valid tables are cached: a bad profile is parsed, and refused, every
    time; the newest ``SHIM_CONFIG_CACHE_ENTRIES`` texts are kept.
    """
    if not found.text:
        return shim_config(found)
    key = paths.sha256_hex(found.text.encode())
    cache_path = paths.state_root() / SHIM_CONFIG_CACHE
    cache = _read_cache(cache_path)
    entry = cache.get(key)
    if isinstance(entry, list) and len(entry) == len(ShimConfig._fields):
        protocol, version, early, template = entry
        if (protocol in ("grpc", "ttrpc", "auto") and version in ("auto", 2, 3)
                and not isinstance(version, bool) and isinstance(early, bool)
                and isinstance(template, bool)):
            return ShimConfig(protocol, version, early, template)
    config = shim_config(found)
    cache.pop(key, None)
    cache[key] = list(config)
    for stale in list(cache)[:-SHIM_CONFIG_CACHE_ENTRIES]:
        del cache[stale]
    _write_cache(cache_path, cache)
    return config


def _read_cache(path: Path) -> dict[str, Any]:
    """A node-wide JSON cache of ``start`` (under the state root); empty when it is missing or
    unreadable: a cache is only ever a shortcut."""
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text())
        if isinstance(loaded, dict):
            return loaded
    return {}


def _write_cache(path: Path, cache: dict[str, Any]) -> None:
    """Replace ``path`` with ``cache`` atomically (a temp file of this process, renamed); a
    failure costs the next ``start`` the work again, nothing else."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        tmp.rename(path)


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
    from shim.core.timeouts import TIMEOUTS  # once per containerd binary (then cached)

    deadline = time.monotonic() + TIMEOUTS.version_probe
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
