"""``containerd-shim-coco-v2``: the binary containerd runs (``start``, ``delete``) and the daemon.

Only ``serve`` imports the heavy parts (grpc, protobuf, the task service); ``start`` and
``delete`` stay on the cheap modules (``shim.binary``, ``shim.core``).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from shim.binary.flags import USAGE, UsageError, parse_flags
from shim.core.errors import RpcError

if TYPE_CHECKING:
    from shim.binary.start import Launch


def main(argv: list[str] | None = None, stdin: bytes | None = None,
         launch: Launch | None = None) -> int:
    """Run one action. ``stdin``: start's runtime options when already read (the template
    path); ``launch``: how ``start`` brings up the daemon (the template forks it)."""
    if argv is None and sys.argv[-1:] == ["start"]:  # pip's console script: the template too
        from shim.binary.template_client import via_template

        served = via_template(sys.argv[1:])
        if isinstance(served, int):
            return served
        stdin = served
    args = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(args)
    except UsageError as err:
        print(f"{err}\n{USAGE}", file=sys.stderr, end="")
        return 2
    if flags.help:
        print(USAGE, end="")
        return 0
    if flags.version:
        from importlib.metadata import version

        print(f"containerd-shim-coco-v2 {version('coco-shim')}")
        return 0
    try:
        if flags.action == "start":
            from shim.binary.start import start
            from shim.core import trace

            trace.mark("start: begin")
            options = _read_stdin() if stdin is None else stdin
            print(start(flags, options, launch), flush=True)
            trace.mark("start: answered")
            return 0
        if flags.action == "delete":
            from shim.binary.delete import delete
            from shim.core import trace

            trace.mark("delete: begin")
            sys.stdout.buffer.write(delete(flags))
            sys.stdout.buffer.flush()
            trace.mark("delete: answered")
            return 0
        if flags.action == "serve":
            import shim.daemon.main as daemon

            return daemon.main(flags)
    except (UsageError, RpcError, OSError) as err:
        print(f"containerd-shim-coco-v2 {flags.action}: {err}", file=sys.stderr)
        return 1
    print(f"unknown action {flags.action!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


def _read_stdin() -> bytes:
    """The runtime options containerd writes to start's stdin (nothing when it is a terminal)."""
    if sys.stdin is None or os.isatty(0):
        return b""
    return sys.stdin.buffer.read()


if __name__ == "__main__":
    sys.exit(main())
