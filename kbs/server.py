"""The KBS's HTTP edge: trustee's paths, cookie and error bodies over the stdlib HTTP server.

Each handler parses the request, calls one :class:`kbs.core.Kbs` method and renders the
answer; every :class:`kbs.core.KbsFailure` becomes its status with the RFC 7807 body
``{"type": ".../errors/<Name>", "detail": "..."}``.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kbs.core import BadPath, Kbs, KbsFailure
from protocols import kbs as proto

log = logging.getLogger("kbs")
MAX_REQUEST = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    server: KbsHttpServer
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: Any, cookie: str | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if cookie is not None:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, err: KbsFailure) -> None:
        log.info("%s %s -> %d %s: %s", self.command, self.path, err.status, err.name,
                 err.detail)
        self._send(err.status, proto.error_body(err.name, err.detail))

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST:
            raise BadPath(f"request body of {length} bytes is too large")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def _cookie(self) -> str | None:
        try:
            jar = SimpleCookie(self.headers.get("Cookie") or "")
        except CookieError:
            return None
        morsel = jar.get(proto.SESSION_COOKIE)
        return morsel.value if morsel is not None else None

    def _route(self) -> str:
        path = self.path.split("?", 1)[0]
        if not path.startswith(proto.PREFIX + "/"):
            raise BadPath(f"Request path {path} is invalid")
        return path[len(proto.PREFIX) + 1:]

    def do_POST(self) -> None:
        kbs = self.server.kbs
        try:
            route = self._route()
            body = self._body()
            if route == "auth":
                session = kbs.auth(body)
                cookie = (f"{proto.SESSION_COOKIE}={session.id}; Path=/; "
                          f"Max-Age={int(kbs.session_seconds)}")
                extra = {proto.SELECTED_HASH_ALGORITHM_KEY: session.hash_algorithm}
                self._send(200, {"nonce": session.nonce, "extra-params": extra}, cookie)
            elif route == "attest":
                session = kbs.attest(self._cookie(), body)
                self._send(200, {"token": session.token},
                           f"{proto.SESSION_COOKIE}={session.id}; Path=/")
            else:
                raise BadPath(f"Request path {self.path} is invalid")
        except KbsFailure as err:
            self._fail(err)

    def do_GET(self) -> None:
        kbs = self.server.kbs
        try:
            route = self._route()
            head, _, rest = route.partition("/")
            if head != "resource":
                raise BadPath(f"Request path {self.path} is invalid")
            auth = self.headers.get("Authorization") or ""
            bearer = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            claims = kbs.claims_for(self._cookie(), bearer)
            self._send(200, kbs.resource(rest, claims))
        except KbsFailure as err:
            self._fail(err)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


class KbsHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], kbs: Kbs, *, tls_cert: Path | None = None,
                 tls_key: Path | None = None) -> None:
        self.kbs = kbs
        super().__init__(address, _Handler)
        if tls_cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls_cert, tls_key)
            self.socket = context.wrap_socket(self.socket, server_side=True)

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="kbs", daemon=True)
        thread.start()
        return thread
