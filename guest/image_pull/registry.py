"""An OCI distribution (Docker registry v2) client on http.client and ssl, for worker threads.

- HTTPS verified against the configured roots (the CA bundle plus ``extra_root_certificates``);
  plain HTTP only for a registry the configuration marks ``insecure``.
- Auth: anonymous first; on ``401`` with a ``Bearer`` challenge, a token from the realm (with
  Basic credentials when the configuration has some for that registry), cached per scope until
  it expires; a ``Basic`` challenge is answered only with configured credentials.
- Redirects (blob storage): followed up to :data:`MAX_REDIRECTS`; the Authorization header is
  never sent to another host, and HTTPS never downgrades to HTTP unless that host is insecure.
- Responses stream: callers read blobs in chunks. A :class:`CancelToken` aborts a transfer from
  another thread by shutting its socket down, so a timeout never waits on a blocked read.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from guest.agent.errors import (
    AgentError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from guest.image_pull.config import PullConfig
from guest.image_pull.digest import Digest, verify_bytes
from guest.image_pull.mediatypes import MANIFEST_TYPES
from guest.image_pull.reference import ImageReference

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_MANIFEST_BYTES = 4 << 20
MAX_TOKEN_BYTES = 1 << 20
SOCKET_TIMEOUT = 60.0  # per connect/read; the whole pull has its own deadline
USER_AGENT = "coco-guest-image-pull/0.1"


_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class Cancelled(DeadlineExceeded):
    """The owner gave up on the pull (its deadline passed, or it was cancelled)."""


class CancelToken:
    """Shared between the event loop (cancel) and the worker threads (check, track)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.reason = "the pull was cancelled"

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason)

    def cancel(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
            self._event.set()
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def track(self, sock: socket.socket | None) -> None:
        """cancel() shuts ``sock`` down (ending any blocked read) until untrack(); Cancelled
        if that already happened."""
        if sock is None:
            return
        with self._lock:
            self._sockets.add(sock)
        try:
            self.check()
        except Cancelled:
            self.untrack(sock)
            raise

    def untrack(self, sock: socket.socket | None) -> None:
        if sock is not None:
            with self._lock:
                self._sockets.discard(sock)

    @contextlib.contextmanager
    def tracking(self, sock: socket.socket | None) -> Iterator[None]:
        self.track(sock)
        try:
            yield
        finally:
            self.untrack(sock)


@dataclass
class BlobStream:
    """An open response body; read() in chunks, then close()."""

    response: http.client.HTTPResponse
    connection: http.client.HTTPConnection
    token: CancelToken
    length: int | None

    def read(self, size: int = -1, /) -> bytes:
        self.token.check()
        try:
            return self.response.read(size if size >= 0 else None)
        except (OSError, http.client.HTTPException) as err:
            self.token.check()
            raise Unavailable(f"reading from the registry failed: {err}") from err

    def close(self) -> None:
        self.token.untrack(self.connection.sock)
        self.response.close()
        self.connection.close()

    def abort(self) -> None:
        """From another thread: end a read blocked on this transfer (it fails; close() is
        still the reading thread's)."""
        sock = self.connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@dataclass
class _Token:
    value: str
    expires: float


@dataclass
class RegistryClient:
    config: PullConfig
    token: CancelToken = field(default_factory=CancelToken)
    _tokens: dict[tuple[str, str], _Token] = field(default_factory=dict)
    _tokens_lock: threading.Lock = field(default_factory=threading.Lock)
    _context: ssl.SSLContext | None = None

    # -- public ------------------------------------------------------------------------------

    def fetch_manifest(self, ref: ImageReference, reference: str) -> tuple[bytes, str, Digest]:
        """(body, media type, digest) of a manifest or index; verified when ``reference`` is a
        digest, and against the registry's Docker-Content-Digest header when it sends one."""
        url = self._url(ref, f"manifests/{reference}")
        with self._open(ref, url, accept=", ".join(MANIFEST_TYPES), what=f"manifest of {ref}") as (
            response,
            _,
        ):
            body = response.read(MAX_MANIFEST_BYTES + 1)
            if len(body) > MAX_MANIFEST_BYTES:
                raise InvalidArgument(f"manifest of {ref} is larger than {MAX_MANIFEST_BYTES}")
            media_type = (response.getheader("Content-Type") or "").split(";")[0].strip()
            header_digest = response.getheader("Docker-Content-Digest")
        if reference.startswith(("sha256:", "sha512:")):
            digest = Digest.parse(reference)
            verify_bytes(body, digest, f"manifest {digest} of {ref}")
        else:
            digest = Digest.of(body)
            if header_digest and header_digest.startswith("sha256:"):
                verify_bytes(body, Digest.parse(header_digest), f"manifest of {ref}")
        try:
            document = json.loads(body)
        except ValueError as err:
            raise InvalidArgument(f"manifest of {ref} is not JSON: {err}") from err
        if isinstance(document, dict) and document.get("mediaType"):
            media_type = str(document["mediaType"])
        return body, media_type, digest

    def open_blob(self, ref: ImageReference, digest: Digest) -> BlobStream:
        """A streaming response for a blob; the caller verifies what it reads."""
        url = self._url(ref, f"blobs/{digest}")
        response, connection = self._request(ref, url, accept="*/*", what=f"blob {digest}")
        try:
            # Tracked while the body streams: cancel() ends a transfer stalled mid-body too.
            self.token.track(connection.sock)
        except Cancelled:
            response.close()
            connection.close()
            raise
        length = response.getheader("Content-Length")
        return BlobStream(
            response, connection, self.token, int(length) if length and length.isdigit() else None
        )

    # -- plumbing ----------------------------------------------------------------------------

    def _url(self, ref: ImageReference, path: str) -> str:
        scheme = "http" if self.config.is_insecure(ref.registry) else "https"
        return f"{scheme}://{ref.endpoint}/v2/{ref.repository}/{path}"

    def ssl_context(self) -> ssl.SSLContext:
        if self._context is None:
            # PROTOCOL_TLS_CLIENT verifies certificates and host names; only the configured
            # roots are loaded (no implicit system paths).
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            bundle = self.config.ca_bundle
            if bundle is not None and Path(bundle).exists():
                context.load_verify_locations(cafile=str(bundle))
            for pem in self.config.extra_root_certificates:
                context.load_verify_locations(cadata=pem)
            self._context = context
        return self._context

    @contextlib.contextmanager
    def _open(
        self, ref: ImageReference, url: str, *, accept: str, what: str
    ) -> Iterator[tuple[http.client.HTTPResponse, http.client.HTTPConnection]]:
        response, connection = self._request(ref, url, accept=accept, what=what)
        try:
            yield response, connection
        finally:
            response.close()
            connection.close()

    def _request(
        self, ref: ImageReference, url: str, *, accept: str, what: str
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        scope = f"repository:{ref.repository}:pull"
        registry_host = urllib.parse.urlsplit(url).netloc
        authorization = self._cached_token(registry_host, scope)
        challenged = False
        for _ in range(MAX_REDIRECTS + 1):
            host = urllib.parse.urlsplit(url).netloc
            headers = {"Accept": accept, "User-Agent": USER_AGENT}
            if authorization and host == registry_host:
                headers["Authorization"] = authorization
            response, connection = self._send("GET", url, headers, what=what)
            status = response.status
            if status == 401 and not challenged and host == registry_host:
                challenge = response.getheader("WWW-Authenticate") or ""
                _discard(response, connection)
                authorization = self._authorize(ref, registry_host, challenge, scope)
                challenged = True
                continue
            if status in (301, 302, 303, 307, 308):
                location = response.getheader("Location") or ""
                _discard(response, connection)
                target = urllib.parse.urljoin(url, location)
                self._check_redirect(url, target, what)
                url = target
                continue
            if 200 <= status < 300:
                return response, connection
            detail = _error_detail(response)
            connection.close()
            if status == 404:
                raise NotFound(f"{what} of {ref}: not found in registry {ref.registry}{detail}")
            if status in (401, 403):
                raise PermissionDenied(
                    f"{what} of {ref}: registry {ref.registry} refused access ({status}){detail}"
                )
            raise Unavailable(f"{what} of {ref}: registry {ref.registry} answered {status}{detail}")
        raise Unavailable(f"{what} of {ref}: more than {MAX_REDIRECTS} redirects")

    def _check_redirect(self, source: str, target: str, what: str) -> None:
        parts = urllib.parse.urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise Unavailable(f"{what}: redirect to an unusable location {target!r}")
        if parts.scheme == "http" and not self.config.is_insecure(parts.netloc):
            raise PermissionDenied(
                f"{what}: redirect from {source} to plain HTTP {parts.netloc}, "
                "which the configuration does not mark insecure"
            )

    def _send(
        self, method: str, url: str, headers: dict[str, str], *, what: str
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        self.token.check()
        parts = urllib.parse.urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        timeout = min(SOCKET_TIMEOUT, self.config.timeout)
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(
                parts.netloc, timeout=timeout, context=self.ssl_context()
            )
        else:
            connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
        try:
            connection.timeout = min(self.config.connect_timeout, timeout)
            try:
                connection.connect()
            except TimeoutError as err:
                connection.close()
                self.token.check()
                raise Unavailable(
                    f"{what}: registry {parts.netloc} unreachable: no connection within "
                    f"{connection.timeout:g} s"
                ) from err
            if connection.sock is not None:
                connection.sock.settimeout(timeout)
            with self.token.tracking(connection.sock):
                connection.request(method, path, headers=headers)
                response = connection.getresponse()
        except AgentError:
            connection.close()
            raise
        except ssl.SSLCertVerificationError as err:
            connection.close()
            raise PermissionDenied(
                f"{what}: TLS verification of {parts.netloc} failed: {err.verify_message}"
            ) from err
        except TimeoutError as err:
            connection.close()
            self.token.check()
            raise Unavailable(
                f"{what}: {parts.netloc} did not answer within {timeout:g} s"
            ) from err
        except (OSError, http.client.HTTPException) as err:
            connection.close()
            self.token.check()
            reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
            raise Unavailable(f"{what}: registry {parts.netloc} unreachable: {reason}") from err
        return response, connection

    def _cached_token(self, host: str, scope: str) -> str | None:
        with self._tokens_lock:
            token = self._tokens.get((host, scope))
            if token is not None and token.expires > time.monotonic():
                return token.value
        return None

    def _authorize(self, ref: ImageReference, host: str, challenge: str, scope: str) -> str:
        kind, _, params_text = challenge.partition(" ")
        params = dict(_CHALLENGE.findall(params_text))
        credentials = self.config.credentials.get(ref.registry) or self.config.credentials.get(host)
        if kind.lower() == "basic":
            if credentials is None:
                raise PermissionDenied(
                    f"registry {ref.registry} wants Basic credentials and none are configured"
                )
            return _basic(*credentials)
        if kind.lower() != "bearer" or "realm" not in params:
            raise PermissionDenied(
                f"registry {ref.registry} refused anonymous access with no usable challenge"
                f" ({challenge!r})"
            )
        query = {"scope": params.get("scope", scope)}
        if "service" in params:
            query["service"] = params["service"]
        realm = params["realm"]
        realm_parts = urllib.parse.urlsplit(realm)
        if realm_parts.scheme == "http" and not self.config.is_insecure(realm_parts.netloc):
            raise PermissionDenied(
                f"registry {ref.registry}: token realm {realm} is plain HTTP "
                "and not marked insecure"
            )
        if realm_parts.scheme not in ("http", "https"):
            raise PermissionDenied(f"registry {ref.registry}: unusable token realm {realm!r}")
        sep = "&" if realm_parts.query else "?"
        url = f"{realm}{sep}{urllib.parse.urlencode(query)}"
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if credentials is not None:
            headers["Authorization"] = _basic(*credentials)
        response, connection = self._send("GET", url, headers, what=f"token for {ref}")
        try:
            body = response.read(MAX_TOKEN_BYTES)
            if response.status != 200:
                raise PermissionDenied(
                    f"token service {realm_parts.netloc} refused {query['scope']} "
                    f"({response.status})"
                )
        finally:
            response.close()
            connection.close()
        try:
            document = json.loads(body)
            value = document.get("token") or document.get("access_token")
            lifetime = float(document.get("expires_in") or 60)
        except (ValueError, AttributeError) as err:
            raise PermissionDenied(f"token service {realm_parts.netloc}: bad answer") from err
        if not isinstance(value, str) or not value:
            raise PermissionDenied(f"token service {realm_parts.netloc} returned no token")
        authorization = f"Bearer {value}"
        with self._tokens_lock:
            expires = time.monotonic() + max(lifetime - 5, 1)
            self._tokens[(host, scope)] = _Token(authorization, expires)
        log.info("image pull: token for %s from %s", scope, realm_parts.netloc)
        return authorization


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _discard(response: http.client.HTTPResponse, connection: http.client.HTTPConnection) -> None:
    with contextlib.suppress(OSError, http.client.HTTPException):
        response.read(65536)
    response.close()
    connection.close()


def _error_detail(response: http.client.HTTPResponse) -> str:
    """The registry's own error message (``{"errors": [{"code", "message"}]}``), if any."""
    try:
        document = json.loads(response.read(65536))
        first = document["errors"][0]
        return f": {first.get('code', '')} {first.get('message', '')}".rstrip()
    except (OSError, ValueError, KeyError, IndexError, TypeError, http.client.HTTPException):
        return ""
    finally:
        response.close()
