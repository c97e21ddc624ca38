"""``python -m guest.attestation``: the guest components as a command (debugging, tests).

    python -m guest.attestation --initdata-dir DIR serve          # resource endpoint until killed
    python -m guest.attestation --initdata-dir DIR resource kbs:///repo/type/tag
    python -m guest.attestation --initdata-dir DIR unseal 'sealed.…'
    python -m guest.attestation --initdata-dir DIR registry-auth registry.example:5000

``resource`` and ``unseal`` write the plaintext to stdout (a terminal is refused unless
--force). Errors print one line naming the cause and exit 1 (3 when the KBS's policy refused).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from guest.attestation.components import GuestComponents
from guest.attestation.config import INITDATA_DIR
from guest.attestation.errors import AttestationError, KbsError
from guest.tee import Tee, TeeError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m guest.attestation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--initdata-dir", type=Path, default=INITDATA_DIR)
    p.add_argument("--tee", choices=[t.value for t in Tee], default=None,
                   help="platform (default: detected through configfs-tsm, else sample)")
    p.add_argument("--port", type=int, default=8006, help="endpoint port on 127.0.0.1")
    p.add_argument("--force", action="store_true", help="write secrets to a terminal too")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve")
    sub.add_parser("resource").add_argument("uri")
    sub.add_parser("unseal").add_argument("value")
    sub.add_parser("registry-auth").add_argument("registry")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="coco-attestation %(levelname)s %(name)s: %(message)s")
    tee = Tee(args.tee) if args.tee else None
    try:
        components = GuestComponents.start(
            args.initdata_dir, tee=tee, address=("127.0.0.1", args.port),
            serve=args.command == "serve")
        try:
            return _run(args, components)
        finally:
            components.close()
    except KbsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3 if err.denied else 1
    except (AttestationError, TeeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, components: GuestComponents) -> int:
    if args.command == "serve":
        if components.endpoint is None:
            raise AttestationError("no KBS is configured in the initdata: nothing to serve")
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        print(f"serving on 127.0.0.1:{components.endpoint.port}", flush=True)
        stop.wait()
        return 0
    if args.command == "registry-auth":
        auth = components.hub.registry_auth(args.registry)
        print(json.dumps(None if auth is None else {
            "username": auth.username, "password": auth.password, "ca_pems": auth.ca_pems}))
        return 0
    if sys.stdout.isatty() and not args.force:
        raise AttestationError("refusing to write a secret to a terminal (use --force)")
    data = (components.hub.resource(args.uri) if args.command == "resource"
            else components.hub.unseal(args.value))
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
