"""The runtime configuration: where it comes from (one fallback chain) and its ``[shim]`` table.

Every reader — ``start``, the daemon (the runtime profile of a pod VM) and ``coco-shim`` —
finds the configuration the same way: the runtime options' ``ConfigBody``, else their
``ConfigPath``, else ``$COCO_SHIM_CONFIG``, else ``/etc/coco-shim/configuration.toml``. A file
named explicitly (options or environment) must be readable; the default file may be absent,
and then the ``[shim]`` defaults apply (the daemon still needs a profile and says so).

Cheap to import (``start`` runs per container): tomllib is loaded only when there is text, and
the records are NamedTuples (``dataclasses`` would pull ``inspect`` into ``start``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal, NamedTuple

from shim.core import wire
from shim.core.errors import InvalidArgument

RUNTIME_OPTIONS_TYPE: Final = "runtimeoptions.v1.Options"
CONFIG_ENV: Final = "COCO_SHIM_CONFIG"
DEFAULT_CONFIG: Final = Path("/etc/coco-shim/configuration.toml")
BODY_SOURCE: Final = "<runtime options config_body>"
MAX_CONFIG_BYTES: Final = 1 << 20  # a profile is a few KiB; a bigger "config" is a mistake

Protocol = Literal["grpc", "ttrpc"]


# --- runtime options (stdin of `start`, CreateTaskRequest.options) ---------------------------


class RuntimeOptions(NamedTuple):
    """``runtimeoptions.v1.Options``: what CRI sends for a runtime with an ``options`` table."""

    type_url: str = ""
    config_path: str = ""
    config_body: bytes = b""


def decode_runtime_options(data: bytes) -> RuntimeOptions:
    """Decode ``google.protobuf.Any{type_url=1, value=2}`` holding runtimeoptions.v1.Options.

    Empty input (containerd sends nothing when the runtime has no options) gives the defaults.
    An Any of another type is ignored: its options are not ours to interpret. Bytes that are
    not such a message are InvalidArgument.
    """
    if not data:
        return RuntimeOptions()
    try:
        any_type = ""
        any_value = b""
        for number, value in wire.iter_fields(data):
            if number == 1 and isinstance(value, bytes):
                any_type = value.decode()
            elif number == 2 and isinstance(value, bytes):
                any_value = value
        if any_type.rsplit("/", 1)[-1] != RUNTIME_OPTIONS_TYPE:
            return RuntimeOptions()
        fields: dict[str, object] = {}
        for number, value in wire.iter_fields(any_value):
            if not isinstance(value, bytes):
                continue
            if number == 1:
                fields["type_url"] = value.decode()
            elif number == 2:
                fields["config_path"] = value.decode()
            elif number == 3:
                fields["config_body"] = value
    except (wire.WireError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"runtime options: not a {RUNTIME_OPTIONS_TYPE}: {err}") from err
    return RuntimeOptions(**fields)  # type: ignore[arg-type]


# --- the one fallback chain -------------------------------------------------------------------


class ConfigSource(NamedTuple):
    """The runtime configuration as found: its TOML text (None: no file at the default path),
    where it came from, and the directory its relative paths are relative to."""

    text: str | None
    source: str
    base_dir: Path | None = None


def config_source(options: RuntimeOptions,
                  environ: Mapping[str, str] = os.environ) -> ConfigSource:
    """Runtime options body → options path → $COCO_SHIM_CONFIG → the default file."""
    if options.config_body:
        try:
            return ConfigSource(options.config_body.decode(), BODY_SOURCE)
        except UnicodeDecodeError as err:
            raise InvalidArgument(f"runtime options config_body is not UTF-8: {err}") from err
    explicit = options.config_path or environ.get(CONFIG_ENV, "")
    path = Path(explicit) if explicit else DEFAULT_CONFIG
    try:
        text = _read_config(path)
    except FileNotFoundError as err:
        if not explicit:
            return ConfigSource(None, str(path))
        raise InvalidArgument(f"runtime config {path}: cannot read: {err.strerror}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"runtime config {path}: cannot read: {err}") from err
    return ConfigSource(text, str(path), path.parent)


def _read_config(path: Path) -> str:
    """The text of a regular file of at most MAX_CONFIG_BYTES. Opened non-blocking and checked
    before reading: a FIFO, a device (``/dev/zero``) or a directory is refused, never read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"runtime config {path}: not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise InvalidArgument(
                f"runtime config {path}: {info.st_size} bytes, more than {MAX_CONFIG_BYTES}")
        data = os.read(fd, MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:  # grew between fstat and read
        raise InvalidArgument(f"runtime config {path}: more than {MAX_CONFIG_BYTES} bytes")
    return data.decode()


# --- the [shim] table -------------------------------------------------------------------------


class ShimConfig(NamedTuple):
    """The ``[shim]`` table of a runtime profile (TOML), read by ``start``.

    ``bootstrap_version`` is 2 for containerd 1.7 (which rejects 3), 3 for containerd 2.x, or
    ``"auto"``: ask ``<publish-binary> --version`` once per binary (≈10 ms) and cache the answer
    by path, size and mtime.

    ``protocol`` picks the task API transport. ``"auto"`` is gRPC for bootstrap version 2
    (containerd 1.7) and ttrpc for version 3: containerd 2.1.9 watches a gRPC shim connection
    from the wrong initial state (a new client is IDLE, it waits for a change from READY), so it
    declares the shim disconnected right after connecting, runs ``delete`` and reports the task
    exited (measured here with ``ctr run``). ``"grpc"`` forces gRPC anyway.

    ``early_boot`` (default true) lets the daemon boot the pod VM as soon as it runs, from the
    bundle ``start`` was given, so that the boot overlaps the daemon's start-up and containerd's
    round trips; false boots it when Create (or StartSandbox) arrives.

    ``template`` (default true): ``start`` asks the node's template process (one per
    containerd and installed code, :mod:`shim.template`), which has the daemon's modules
    imported, to fork the pod's daemon, and launches it when none runs; false spawns every
    daemon as a new interpreter (and a running template declines this profile's starts).
    """

    protocol: Protocol | Literal["auto"] = "auto"
    bootstrap_version: int | Literal["auto"] = "auto"
    early_boot: bool = True
    template: bool = True


SHIM_KEYS: Final = ("protocol", "bootstrap_version", "early_boot", "template")


def shim_config(found: ConfigSource) -> ShimConfig:
    """The [shim] table of the configuration found (defaults when there is none)."""
    if not found.text:
        return ShimConfig()
    import tomllib  # only when there is a profile to read

    try:
        table = tomllib.loads(found.text).get("shim", {})
    except tomllib.TOMLDecodeError as err:
        raise InvalidArgument(f"runtime config {found.source} is not valid TOML: {err}") from err
    except RecursionError as err:  # tomllib recurses once per level of arrays/inline tables
        raise InvalidArgument(
            f"runtime config {found.source}: arrays or tables nested too deeply") from err
    if not isinstance(table, dict):
        raise InvalidArgument(f"runtime config {found.source}: [shim] must be a table")
    protocol = table.get("protocol", "auto")
    if protocol not in ("grpc", "ttrpc", "auto"):
        raise InvalidArgument(
            f"[shim] protocol must be \"grpc\", \"ttrpc\" or \"auto\", not {protocol!r}")
    version = table.get("bootstrap_version", "auto")
    if version not in ("auto", 2, 3) or isinstance(version, bool):
        raise InvalidArgument(
            f"[shim] bootstrap_version must be 2, 3 or \"auto\", not {version!r}")
    early_boot = table.get("early_boot", True)
    if not isinstance(early_boot, bool):
        raise InvalidArgument(f"[shim] early_boot must be true or false, not {early_boot!r}")
    template = table.get("template", True)
    if not isinstance(template, bool):
        raise InvalidArgument(f"[shim] template must be true or false, not {template!r}")
    unknown = sorted(set(table) - set(SHIM_KEYS))
    if unknown:
        raise InvalidArgument(f"[shim] unknown key {unknown[0]!r} (known: "
                              f"{', '.join(SHIM_KEYS)})")
    return ShimConfig(protocol=protocol, bootstrap_version=version, early_boot=early_boot,
                      template=template)
