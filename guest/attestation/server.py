"""The resource endpoint containers use, compatible with kata's api-server-rest:
``GET http://127.0.0.1:8006/cdh/resource/<repository>/<type>/<tag>`` → the plaintext bytes.

Bound to the guest's loopback only: the pod's containers share the guest's network namespace
(the VM is the pod's network boundary), so they reach it; the host cannot (its packets arrive
on the guest's virtio-net interface, never on lo). Errors: 404 for another path, 403 when the
KBS's policy refuses this guest, 502 for any other KBS or attestation failure, each with a
one-line text body naming the cause.

Served by the standard library's threaded HTTP server in one thread owned by
:class:`ResourceServer` (``start`` / ``close``).
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from guest.attestation.cdh import DataHub
from guest.attestation.errors import AttestationError, KbsError
from protocols.kbs import ProtocolError, ResourceUri

log = logging.getLogger(__name__)

ADDRESS = ("127.0.0.1", 8006)
RESOURCE_PREFIX = "/cdh/resource/"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if not path.startswith(RESOURCE_PREFIX):
            self._reply(404, f"no such endpoint: {path}\n".encode())
            return
        try:
            uri = ResourceUri.from_path(path[len(RESOURCE_PREFIX):])
        except ProtocolError as err:
            self._reply(400, f"{err}\n".encode())
            return
        try:
            data = self.server.hub.resource(uri)
        except KbsError as err:
            self._reply(403 if err.denied else 502, f"{err}\n".encode())
            return
        except AttestationError as err:
            self._reply(502, f"{err}\n".encode())
            return
        log.info("resource %s released to a container (%d bytes)", uri, len(data))
        self._reply(200, data, "application/octet-stream")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("cdh endpoint: " + format, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: DataHub) -> None:
        self.hub = hub
        super().__init__(address, _Handler)


class ResourceServer:
    def __init__(self, hub: DataHub, address: tuple[str, int] = ADDRESS) -> None:
        if address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"the resource endpoint serves loopback only, not {address[0]}")
        self._server = _Server(address, hub)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="cdh-endpoint", daemon=True
        )
        self._thread.start()
        log.info("resource endpoint on http://127.0.0.1:%d%s", self.port, RESOURCE_PREFIX)

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
