"""A tiny in-process registry (plain HTTP on loopback) for the puller's unit tests.

Serves ``/v2/<repo>/manifests/<ref>`` and ``/v2/<repo>/blobs/<digest>`` from dicts, records
every request, and can demand a bearer token (served by itself at ``/token``) or Basic
credentials, redirect blobs to a second server, or hang.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.oci import OCI_INDEX, OCI_MANIFEST, Image, sha256


@dataclass
class Request:
    path: str
    authorization: str | None


@dataclass
class FakeRegistry:
    manifests: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # "repo:ref" -> body
    blobs: dict[str, bytes] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    bearer: bool = False
    basic: tuple[str, str] | None = None
    redirect_blobs_to: str | None = None  # "host:port" of another FakeRegistry
    hang: threading.Event | None = None  # set: requests block until it is cleared... by stop
    # Set: each blob body stops after this many bytes until ``resume`` is set (or the server
    # stops): a transfer stalled mid-body.
    stall_blobs_after: int | None = None
    resume: threading.Event = field(default_factory=threading.Event)
    host: str = ""
    token_value: str = "test-token"

    def add_image(self, repo: str, tag: str, image: Image) -> None:
        manifest = image.manifest_bytes()
        self.blobs.update(image.blobs())
        self.manifests[f"{repo}:{tag}"] = (manifest, OCI_MANIFEST)
        self.manifests[f"{repo}:{sha256(manifest)}"] = (manifest, OCI_MANIFEST)

    def add_index(self, repo: str, tag: str, images: list[Image],
                  platforms: list[dict[str, str]]) -> None:
        entries = []
        for image, platform in zip(images, platforms, strict=True):
            manifest = image.manifest_bytes()
            self.blobs.update(image.blobs())
            self.manifests[f"{repo}:{sha256(manifest)}"] = (manifest, OCI_MANIFEST)
            entries.append({"mediaType": OCI_MANIFEST, "digest": sha256(manifest),
                            "size": len(manifest), "platform": platform})
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                            "manifests": entries}).encode()
        self.manifests[f"{repo}:{tag}"] = (index, OCI_INDEX)

    def blob_gets(self) -> list[str]:
        return [r.path.rsplit("/", 1)[1] for r in self.requests if "/blobs/" in r.path]


@contextmanager
def serve(registry: FakeRegistry) -> Iterator[FakeRegistry]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  ) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            auth = self.headers.get("Authorization")
            registry.requests.append(Request(self.path, auth))
            if registry.hang is not None:
                registry.hang.wait(30)
                return
            if self.path.startswith("/token"):
                body = json.dumps({"token": registry.token_value, "expires_in": 300}).encode()
                self.reply(200, body, {"Content-Type": "application/json"})
                return
            if registry.bearer and auth != f"Bearer {registry.token_value}":
                realm = f"http://{registry.host}/token"
                self.reply(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}', {
                    "WWW-Authenticate": f'Bearer realm="{realm}",service="fake",'
                                        f'scope="repository:x:pull"'})
                return
            if registry.basic is not None:
                expected = "Basic " + base64.b64encode(":".join(registry.basic).encode()).decode()
                if auth != expected:
                    self.reply(401, b"", {"WWW-Authenticate": 'Basic realm="fake"'})
                    return
            parts = self.path.split("/")  # "", v2, <repo...>, kind, ref
            kind, ref = parts[-2], parts[-1]
            repo = "/".join(parts[2:-2])
            if kind == "manifests" and f"{repo}:{ref}" in registry.manifests:
                body, media_type = registry.manifests[f"{repo}:{ref}"]
                self.reply(200, body, {"Content-Type": media_type,
                                       "Docker-Content-Digest": sha256(body)})
            elif kind == "blobs" and registry.redirect_blobs_to:
                self.reply(307, b"", {"Location":
                                      f"http://{registry.redirect_blobs_to}{self.path}"})
            elif kind == "blobs" and ref in registry.blobs and registry.stall_blobs_after:
                body, cut = registry.blobs[ref], registry.stall_blobs_after
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    registry.resume.wait(30)
                    self.wfile.write(body[cut:])
                except OSError:
                    pass  # the client went away
            elif kind == "blobs" and ref in registry.blobs:
                self.reply(200, registry.blobs[ref], {"Content-Type": "application/octet-stream"})
            else:
                self.reply(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}')

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    registry.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield registry
    finally:
        if registry.hang is not None:
            registry.hang.set()
        registry.resume.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
