"""A Docker registry token service for tests (distribution's ``auth: token`` protocol).

``GET /token?service=…&scope=repository:<name>:<actions>`` answers ``{"token": <JWT>}``: an
ES256 JWT whose header carries the signing certificate (``x5c``), which chains to the CA the
registry is configured with (``rootcertbundle``). Anonymous callers get ``pull`` only; Basic
credentials matching ``--user`` get every action they ask for. Each request is logged as one
JSON line (remote address, scope, whether credentials were given).

Run inside the registry's network namespace:
``python -m tests.support.token_server --cert C --key K --signing-cert S --signing-key SK
--listen ADDR:PORT --issuer I --service S --user U:P --log FILE``.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import ssl
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(key: ec.EllipticCurvePrivateKey, cert_der: bytes, claims: dict[str, object]) -> str:
    header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(cert_der).decode()]}
    signing_input = (b64url(json.dumps(header).encode()) + "." +
                     b64url(json.dumps(claims).encode())).encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing_input.decode() + "." + b64url(signature)


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("cert", "key", "signing-cert", "signing-key", "log"):
        p.add_argument(f"--{name}", type=Path, required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--issuer", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--user", required=True, help="user:password granted every action")
    args = p.parse_args()
    signing_key = serialization.load_pem_private_key(args.signing_key.read_bytes(), None)
    assert isinstance(signing_key, ec.EllipticCurvePrivateKey)
    key: ec.EllipticCurvePrivateKey = signing_key
    cert_der = x509.load_pem_x509_certificate(args.signing_cert.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    expected_auth = "Basic " + base64.b64encode(args.user.encode()).decode()
    log = args.log.open("a", buffering=1)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            authenticated = self.headers.get("Authorization") == expected_auth
            if self.headers.get("Authorization") and not authenticated:
                self.send_error(401)
                return
            access = []
            for scope in query.get("scope", []):
                kind, name, actions = scope.split(":")
                wanted = actions.split(",")
                granted = wanted if authenticated else [a for a in wanted if a == "pull"]
                access.append({"type": kind, "name": name, "actions": granted})
            now = int(time.time())
            token = make_jwt(key, cert_der, {
                "iss": args.issuer, "sub": "test" if authenticated else "",
                "aud": query.get("service", [args.service])[0],
                "exp": now + 300, "nbf": now - 10, "iat": now,
                "jti": secrets.token_hex(8), "access": access,
            })
            body = json.dumps({"token": token, "expires_in": 300}).encode()
            log.write(json.dumps({"remote": self.client_address[0], "scope": query.get("scope"),
                                  "authenticated": authenticated}) + "\n")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *items: object) -> None:
            pass

    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print("token server ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
