"""The command line of ``containerd-shim-coco-v2``: containerd's shim flags (Go ``flag``
syntax) plus the daemon's internal ones, and the usage text.

Pure and cheap to import: ``start`` runs once per container (STYLE habit 10), so ``Flags`` is a
NamedTuple: ``dataclasses`` pulls ``inspect`` (with ``ast``, ``dis``, ``tokenize``), ≈ 8 ms of
``start``.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from shim.core.config import Protocol

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


class Flags(NamedTuple):
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
    # serve only: the listening socket inherited from start (ttrpc and gRPC serve it).
    listen_fd: int = -1
    protocol: Protocol = "grpc"
    bootstrap_version: int = 3
    group: str = ""
    # serve only: boot the pod VM at once (from the bundle and ``start``'s runtime options,
    # read from an inherited memfd: never on the argv, where /proc shows it to anyone and
    # execve refuses more than 128 KiB per argument) instead of when containerd's Create arrives.
    early_boot: bool = False
    runtime_options_fd: int = -1


_STRING_FLAGS: Final = {
    "namespace": "namespace",
    "address": "address",
    "publish-binary": "publish_binary",
    "id": "id",
    "bundle": "bundle",
    "socket": "socket",
    "group": "group",
    "protocol": "protocol",
}
_INT_FLAGS: Final = {"listen-fd": "listen_fd",
                     "bootstrap-version": "bootstrap_version",
                     "runtime-options-fd": "runtime_options_fd"}
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
        if value != Flags._field_defaults[attr]:
            argv += [f"-{name}", str(value)]
    if flags.debug:
        argv.append("-debug")
    if flags.early_boot:
        argv.append("-early-boot")
    if flags.action:
        argv.append(flags.action)
    return argv
