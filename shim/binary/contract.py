"""The containerd shim v2 binary contract: flags, runtime options, paths, bootstrap output.

Everything here is pure and cheap to import: ``containerd-shim-coco-v2 start`` runs once per
container and must not pay for grpc, pyroute2 or generated protobuf modules
(STYLE habit 10). The side effects of ``start`` and ``delete`` live in ``shim.binary.manager``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from shim.core import wire

SANDBOX_ID_ANNOTATION: Final = "io.kubernetes.cri.sandbox-id"
RUNTIME_OPTIONS_TYPE: Final = "runtimeoptions.v1.Options"
DEFAULT_SOCKET_DIR: Final = "/run/containerd/s"
DEFAULT_STATE_DIR: Final = "/run/coco-shim"
# Environment overrides, for tests and for hosts with an unusual layout.
SOCKET_DIR_ENV: Final = "COCO_SHIM_SOCKET_DIR"
STATE_DIR_ENV: Final = "COCO_SHIM_STATE_DIR"
# sockaddr_un.sun_path is 108 bytes; containerd keeps shim socket paths to 106.
MAX_SOCKET_PATH: Final = 106

Protocol = Literal["grpc", "ttrpc"]
ACTIONS: Final = ("start", "delete", "serve")

USAGE: Final = """\
usage: containerd-shim-coco-v2 [flags] start|delete

containerd runtime shim v2 that runs every pod in a confidential VM.

actions:
  start    create the pod's shim socket, spawn the shim daemon, print the bootstrap address
  delete   clean up what a dead shim left for -id; print a DeleteResponse (protobuf) on stdout
  serve    (internal) the shim daemon, spawned by start

flags (Go style, one or two dashes, `-flag value` or `-flag=value`):
  -namespace string       namespace that owns the shim
  -address string         containerd's gRPC socket
  -publish-binary string  containerd binary (used to tell containerd 1.7 from 2.x)
  -id string              id of the task
  -bundle string          path to the bundle if not the working directory
  -socket string          socket path to serve (serve only)
  -debug                  enable debug output in logs
  -v                      show the shim version and exit
  -h, -help               show this help
"""


class UsageError(ValueError):
    """The command line cannot be parsed (exit status 2, like Go's flag package)."""


@dataclass(frozen=True)
class Flags:
    """The parsed command line (containerd's shim flags plus our internal daemon flags)."""

    action: str = ""
    namespace: str = ""
    address: str = ""
    publish_binary: str = ""
    id: str = ""
    bundle: str = ""
    socket: str = ""
    debug: bool = False
    version: bool = False
    help: bool = False
    # serve only: the listening socket inherited from start, and the readiness pipe.
    listen_fd: int = -1
    ready_fd: int = -1
    protocol: Protocol = "grpc"
    bootstrap_version: int = 3
    group: str = ""
    # serve only: boot the pod VM at once (from the bundle and ``start``'s runtime options,
    # hex-encoded) instead of when containerd's Create arrives.
    early_boot: bool = False
    runtime_options: str = ""


_STRING_FLAGS: Final = {
    "namespace": "namespace",
    "address": "address",
    "publish-binary": "publish_binary",
    "id": "id",
    "bundle": "bundle",
    "socket": "socket",
    "group": "group",
    "protocol": "protocol",
    "runtime-options": "runtime_options",
}
_INT_FLAGS: Final = {"listen-fd": "listen_fd", "ready-fd": "ready_fd",
                     "bootstrap-version": "bootstrap_version"}
_BOOL_FLAGS: Final = {"debug": "debug", "v": "version", "version": "version", "h": "help",
                      "help": "help", "early-boot": "early_boot"}


def parse_flags(argv: list[str]) -> Flags:
    """Parse like Go's ``flag`` package: flags first, then the action (first positional)."""
    values: dict[str, object] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        name = arg.lstrip("-")
        if arg.startswith("---") or not name:
            raise UsageError(f"bad flag syntax: {arg}")
        inline: str | None = None
        if "=" in name:
            name, inline = name.split("=", 1)
        if name in _BOOL_FLAGS:
            values[_BOOL_FLAGS[name]] = inline is None or inline.lower() in ("1", "t", "true")
        elif name in _STRING_FLAGS or name in _INT_FLAGS:
            if inline is None:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                inline = argv[i]
            if name in _INT_FLAGS:
                try:
                    values[_INT_FLAGS[name]] = int(inline)
                except ValueError as err:
                    raise UsageError(f"invalid value {inline!r} for flag -{name}") from err
            else:
                values[_STRING_FLAGS[name]] = inline
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    rest = argv[i:]
    if rest:
        values["action"] = rest[0]
    if values.get("protocol", "grpc") not in ("grpc", "ttrpc"):
        raise UsageError(f"invalid value {values['protocol']!r} for flag -protocol")
    if values.get("bootstrap_version", 3) not in (2, 3):
        raise UsageError(f"invalid value {values['bootstrap_version']!r} for -bootstrap-version")
    return Flags(**values)  # type: ignore[arg-type]


def to_argv(flags: Flags) -> list[str]:
    """The command line that parses back to ``flags`` (used to spawn the daemon)."""
    argv: list[str] = []
    for name, attr in _STRING_FLAGS.items():
        value = getattr(flags, attr)
        if value and not (attr == "protocol" and value == "grpc"):
            argv += [f"-{name}", str(value)]
    for name, attr in _INT_FLAGS.items():
        value = getattr(flags, attr)
        if value != Flags.__dataclass_fields__[attr].default:
            argv += [f"-{name}", str(value)]
    if flags.debug:
        argv.append("-debug")
    if flags.early_boot:
        argv.append("-early-boot")
    if flags.action:
        argv.append(flags.action)
    return argv


# --- runtime options (stdin of `start`, CreateTaskRequest.options) ---------------------------


@dataclass(frozen=True)
class RuntimeOptions:
    """``runtimeoptions.v1.Options``: what CRI sends for a runtime with an ``options`` table."""

    type_url: str = ""
    config_path: str = ""
    config_body: bytes = b""


def decode_runtime_options(data: bytes) -> RuntimeOptions:
    """Decode ``google.protobuf.Any{type_url=1, value=2}`` holding runtimeoptions.v1.Options.

    Empty input (containerd sends nothing when the runtime has no options) gives the defaults.
    An Any of another type is ignored: its options are not ours to interpret.
    """
    if not data:
        return RuntimeOptions()
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
    return RuntimeOptions(**fields)  # type: ignore[arg-type]


# --- the [shim] table of the runtime profile --------------------------------------------------


@dataclass(frozen=True)
class ShimConfig:
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
    """

    protocol: Protocol | Literal["auto"] = "auto"
    bootstrap_version: int | Literal["auto"] = "auto"
    early_boot: bool = True
    extra: dict[str, object] = field(default_factory=dict)


def load_shim_config(options: RuntimeOptions) -> ShimConfig:
    """The [shim] table from config_body, else from the file at config_path, else defaults."""
    text = options.config_body.decode()
    if not text and options.config_path:
        try:
            text = Path(options.config_path).read_text()
        except OSError as err:
            raise UsageError(f"cannot read runtime config {options.config_path}: {err}") from err
    if not text:
        return ShimConfig()
    import tomllib  # only when there is a profile to read

    try:
        table = tomllib.loads(text).get("shim", {})
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"runtime config is not valid TOML: {err}") from err
    protocol = table.get("protocol", "auto")
    if protocol not in ("grpc", "ttrpc", "auto"):
        raise UsageError(
            f"[shim] protocol must be \"grpc\", \"ttrpc\" or \"auto\", not {protocol!r}")
    version = table.get("bootstrap_version", "auto")
    if version not in ("auto", 2, 3):
        raise UsageError(f"[shim] bootstrap_version must be 2, 3 or \"auto\", not {version!r}")
    early_boot = table.get("early_boot", True)
    if not isinstance(early_boot, bool):
        raise UsageError(f"[shim] early_boot must be true or false, not {early_boot!r}")
    unknown = sorted(set(table) - {"protocol", "bootstrap_version", "early_boot"})
    if unknown:
        raise UsageError(f"[shim] unknown key {unknown[0]!r} (known: protocol, "
                         "bootstrap_version, early_boot)")
    return ShimConfig(protocol=protocol, bootstrap_version=version, early_boot=early_boot)


# --- paths --------------------------------------------------------------------------------------


def socket_dir() -> Path:
    return Path(os.environ.get(SOCKET_DIR_ENV) or DEFAULT_SOCKET_DIR)


def state_root() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def state_dir(namespace: str, task_id: str) -> Path:
    """Per-shim state: what ``delete`` needs to clean up after a dead daemon."""
    return state_root() / namespace / task_id


def socket_path(address: str, namespace: str, group_id: str) -> Path:
    """containerd's convention: ``<socket dir>/<hex sha256(filepath.Join(address, ns, group))>``."""
    joined = os.path.normpath(os.path.join(address, namespace, group_id))
    path = socket_dir() / hashlib.sha256(joined.encode()).hexdigest()
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UsageError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes")
    return path


def read_bundle_spec(bundle: Path) -> dict[str, object]:
    """The bundle's OCI config.json ({} when absent: ``delete`` may run on a half-made bundle)."""
    try:
        spec = json.loads((bundle / "config.json").read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {bundle / 'config.json'}: {err}") from err
    return spec if isinstance(spec, dict) else {}


def group_id(spec: dict[str, object], task_id: str) -> str:
    """The pod a container belongs to: its CRI sandbox id, or itself (a pod sandbox, `ctr run`)."""
    annotations = spec.get("annotations")
    if isinstance(annotations, dict):
        sandbox = annotations.get(SANDBOX_ID_ANNOTATION)
        if isinstance(sandbox, str) and sandbox:
            return sandbox
    return task_id


# --- bootstrap ---------------------------------------------------------------------------------


def bootstrap_json(version: int, protocol: Protocol, path: Path | str) -> str:
    """What ``start`` prints: gRPC wants a bare absolute path, ttrpc a ``unix://`` address."""
    address = str(path) if protocol == "grpc" else f"unix://{path}"
    return json.dumps({"version": version, "address": address, "protocol": protocol},
                      separators=(",", ":"))


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
