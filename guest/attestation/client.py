"""A KBS client speaking trustee's protocol 0.4.0 (the attestation agent's KBS side).

``auth`` → challenge (nonce, ``kbs-session-id`` cookie); ``attest`` with runtime data
``{nonce, tee-pubkey}`` bound into the evidence's report data and the initdata TOML as
``init-data``; then ``resource`` GETs answered with a JWE to our key. The private key is made
fresh for each attestation and never leaves this process. A 401 on a resource (session or
token expired) triggers one new attestation; every other error status is a :class:`KbsError`
built from the RFC 7807 body.

Blocking (urllib): async callers run it in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import http.cookiejar
import json
import logging
import ssl
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from guest.attestation.attesters import Attester
from guest.attestation.errors import AttestationError, KbsError, KbsUnreachable
from protocols import kbs
from protocols.jose import JoseError, Jwe, jwe_decrypt, public_jwk

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0  # seconds per HTTP request to the KBS
MAX_BODY = 16 << 20  # a resource larger than this is refused


@dataclass
class _Session:
    key: ec.EllipticCurvePrivateKey
    token: str


class KbsClient:
    def __init__(
        self,
        url: str,
        attester: Attester,
        *,
        cert_pem: str | None = None,
        initdata_toml: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.url = url.rstrip("/")
        self.attester = attester
        self.initdata_toml = initdata_toml
        self.timeout = timeout
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
            urllib.request.ProxyHandler({}),  # never a proxy from the environment
        ]
        if cert_pem:
            context = ssl.create_default_context(cadata=cert_pem)
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)
        self._session: _Session | None = None
        self._lock = threading.Lock()

    # -- HTTP -----------------------------------------------------------------------------

    def _call(self, operation: str, method: str, path: str, body: Any = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + kbs.PREFIX + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                payload: bytes = response.read(MAX_BODY + 1)
        except urllib.error.HTTPError as err:
            raw = err.read(65536)
            err.close()
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            detail = doc.get("detail") if isinstance(doc, dict) else None
            text = str(detail) if detail else raw.decode(errors="replace").strip() or err.reason
            raise KbsError(operation, err.code, kbs.error_name(doc), str(text)) from err
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise KbsUnreachable(f"KBS {operation}: cannot reach {self.url}: {reason}") from err
        if len(payload) > MAX_BODY:
            raise AttestationError(f"KBS {operation}: answer larger than {MAX_BODY} bytes")
        return payload

    def _json(self, operation: str, raw: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(raw)
        except ValueError as err:
            raise AttestationError(f"KBS {operation}: the answer is not JSON") from err
        if not isinstance(doc, dict):
            raise AttestationError(f"KBS {operation}: the answer is not a JSON object")
        return doc

    # -- protocol -------------------------------------------------------------------------

    def attest(self) -> str:
        """Run auth + attest; keep the session (cookie) and token; return the token."""
        with self._lock:
            return self._attest().token

    def _attest(self) -> _Session:
        tee = self.attester.tee.value
        request = {
            "version": kbs.PROTOCOL_VERSION,
            "tee": tee,
            "extra-params": {kbs.SUPPORTED_HASH_ALGORITHMS_KEY: list(kbs.HASH_ALGORITHMS)},
        }
        challenge = self._json("auth", self._call("auth", "POST", "/auth", request))
        nonce = challenge.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            raise AttestationError("KBS auth: the challenge has no nonce")
        extra = challenge.get("extra-params")
        algorithm = kbs.DEFAULT_HASH_ALGORITHM
        if isinstance(extra, dict) and extra.get(kbs.SELECTED_HASH_ALGORITHM_KEY):
            algorithm = str(extra[kbs.SELECTED_HASH_ALGORITHM_KEY]).lower()
        key = ec.generate_private_key(ec.SECP256R1())
        pubkey = public_jwk(key.public_key())
        try:
            report_data = kbs.report_data(nonce, pubkey, algorithm)
        except kbs.ProtocolError as err:
            raise AttestationError(f"KBS auth: {err}") from err
        attestation: dict[str, Any] = {
            "runtime-data": {"nonce": nonce, "tee-pubkey": pubkey},
            "tee-evidence": {
                "primary_evidence": self.attester.evidence(report_data),
                "additional_evidence": "",
            },
        }
        if self.initdata_toml is not None:
            attestation["init-data"] = {"format": kbs.INIT_DATA_FORMAT,
                                        "body": self.initdata_toml}
        answer = self._json("attest", self._call("attest", "POST", "/attest", attestation))
        token = answer.get("token")
        if not isinstance(token, str) or not token:
            raise AttestationError("KBS attest: the answer has no token")
        self._session = _Session(key, token)
        log.info("attested to %s as %s", self.url, tee)
        return self._session

    def resource(self, uri: kbs.ResourceUri) -> bytes:
        """The resource's plaintext (the JWE decrypted with our key)."""
        with self._lock:
            session = self._session or self._attest()
            try:
                raw = self._call("resource", "GET", f"/resource/{uri.path}")
            except KbsError as err:
                if err.status != 401:
                    raise
                log.info("KBS answered 401 for %s: attesting again", uri)
                session = self._attest()
                raw = self._call("resource", "GET", f"/resource/{uri.path}")
            try:
                return jwe_decrypt(session.key, Jwe.from_json(self._json("resource", raw)))
            except JoseError as err:
                raise AttestationError(f"KBS resource {uri}: {err}") from err
