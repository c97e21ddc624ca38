"""``python -m kbs``: run the reference KBS until SIGTERM/SIGINT.

Prints ``kbs: listening on http(s)://HOST:PORT`` on stdout once it accepts connections.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from kbs.core import ConfigError, Kbs, Policy
from kbs.server import KbsHttpServer


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kbs", description=__doc__)
    p.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    p.add_argument("--resources", type=Path, required=True,
                   help="directory of <repository>/<type>/<tag> files")
    p.add_argument("--policy", type=Path, required=True, help="resource policy (TOML)")
    p.add_argument("--tls-cert", type=Path, default=None, help="serve HTTPS with this PEM")
    p.add_argument("--tls-key", type=Path, default=None)
    p.add_argument("--debug", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="kbs %(levelname)s: %(message)s")
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit():
        print(f"kbs: --listen wants HOST:PORT, got {args.listen!r}", file=sys.stderr)
        return 2
    if not args.resources.is_dir():
        print(f"kbs: --resources {args.resources} is not a directory", file=sys.stderr)
        return 2
    if (args.tls_cert is None) != (args.tls_key is None):
        print("kbs: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        policy = Policy.parse(args.policy.read_text())
    except (OSError, ConfigError) as err:
        print(f"kbs: policy {args.policy}: {err}", file=sys.stderr)
        return 2
    try:
        server = KbsHttpServer((host.strip("[]"), int(port)), Kbs(policy, args.resources),
                               tls_cert=args.tls_cert, tls_key=args.tls_key)
    except OSError as err:
        print(f"kbs: cannot listen on {args.listen}: {err}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    thread = server.serve_in_thread()
    scheme = "https" if args.tls_cert else "http"
    print(f"kbs: listening on {scheme}://{host}:{server.server_address[1]}", flush=True)
    stop.wait()
    server.shutdown()
    thread.join()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
