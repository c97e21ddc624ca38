"""The KBS's domain: sessions, the sample verifier, the resource policy, tokens, resources.

Policy file (TOML)::

    tees = ["sample"]                     # evidence types accepted at all

    [resources."default/secret/one"]      # <repository>/<type>/<tag>; fnmatch patterns allowed
    init_data = ["sha384:9f0e…"]          # released only to evidence whose init-data digest
                                          # (algorithm:hex over the initdata TOML) is listed

A resource the policy does not name is never released. Only the ``sample`` verifier exists:
it checks that the evidence's report data is the hash of the canonical runtime data (nonce and
the guest's key) and records the init-data digest the guest sent, as trustee's sample verifier
does (nothing in sample evidence can bind it; on SNP/TDX a verifier would compare it with
HOST_DATA / MRCONFIGID). Every resource is answered as a JWE to the key of the attested guest.
"""

from __future__ import annotations

import base64
import binascii
import enum
import fnmatch
import hashlib
import json
import logging
import secrets
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from protocols import kbs
from protocols.jose import JoseError, Jws, jwe_encrypt, jws_sign, load_public_jwk, public_jwk

log = logging.getLogger("kbs")

SESSION_SECONDS = 300  # trustee's default session timeout is 5 minutes
TOKEN_ISSUER = "coco-reference-kbs"
MAX_RESOURCE = 16 << 20


class KbsFailure(Exception):
    """An error with its trustee error name and HTTP status."""

    status = 401
    name = kbs.ERR_ATTESTATION

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class AuthFailed(KbsFailure):
    name = kbs.ERR_ATTESTATION


class TokenNotFound(KbsFailure):
    name = kbs.ERR_TOKEN_NOT_FOUND


class TokenInvalid(KbsFailure):
    name = kbs.ERR_TOKEN_VERIFIER


class PolicyDenied(KbsFailure):
    status = 403
    name = kbs.ERR_POLICY_DENY


class NotFound(KbsFailure):
    status = 404
    name = kbs.ERR_PLUGIN_INTERNAL


class BadPath(KbsFailure):
    status = 404
    name = kbs.ERR_INVALID_PATH


class ConfigError(ValueError):
    pass


# -- policy ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    tees: frozenset[str]
    resources: dict[str, frozenset[str]]  # path pattern -> allowed "alg:hex" init-data digests

    @classmethod
    def parse(cls, text: str) -> Policy:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"policy is not valid TOML: {err}") from err
        tees = doc.get("tees", [])
        if not isinstance(tees, list) or not all(t in kbs.TEES for t in tees):
            raise ConfigError(f"policy 'tees' must list TEE names from {kbs.TEES}")
        table = doc.get("resources", {})
        if not isinstance(table, dict):
            raise ConfigError("policy [resources] must be a table")
        resources: dict[str, frozenset[str]] = {}
        for path, rule in table.items():
            digests = rule.get("init_data") if isinstance(rule, dict) else None
            if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
                raise ConfigError(f"policy resources.{path!r}.init_data must be a list of "
                                  "'<algorithm>:<hex>' strings")
            for d in digests:
                alg, _, hexdigest = d.partition(":")
                if alg not in kbs.HASH_ALGORITHMS or len(hexdigest) != 2 * hashlib.new(
                        alg).digest_size:
                    raise ConfigError(f"policy resources.{path!r}: bad digest {d!r}")
            resources[path] = frozenset(d.lower() for d in digests)
        unknown = set(doc) - {"tees", "resources"}
        if unknown:
            raise ConfigError(f"policy has unknown keys: {', '.join(sorted(unknown))}")
        return cls(frozenset(tees), resources)

    def rule_for(self, path: str) -> frozenset[str] | None:
        if path in self.resources:
            return self.resources[path]
        for pattern, digests in self.resources.items():
            if fnmatch.fnmatchcase(path, pattern):
                return digests
        return None

    def check(self, path: str, claims: dict[str, Any]) -> None:
        allowed = self.rule_for(path)
        if allowed is None:
            raise PolicyDenied(f"Access denied by policy: no rule releases {path}")
        digest = claims.get("init_data")
        if digest not in allowed:
            raise PolicyDenied(
                f"Access denied by policy: {path} is released only to init-data "
                f"{', '.join(sorted(allowed)) or '(none)'}; this evidence has "
                f"{digest or 'no init-data'}"
            )


def init_data_digest(body: str) -> str:
    """``algorithm:hex`` over the exact initdata TOML bytes (the algorithm the TOML names)."""
    try:
        doc = tomllib.loads(body)
    except tomllib.TOMLDecodeError as err:
        raise AuthFailed(f"init-data is not valid TOML: {err}") from err
    algorithm = doc.get("algorithm")
    if doc.get("version") != "0.1.0" or algorithm not in kbs.HASH_ALGORITHMS:
        raise AuthFailed("init-data must have version 0.1.0 and algorithm sha256/sha384/sha512")
    return f"{algorithm}:{hashlib.new(str(algorithm), body.encode()).hexdigest()}"


# -- verifier -------------------------------------------------------------------------------


def verify_sample(evidence: Any, expected_report_data: bytes) -> dict[str, Any]:
    """trustee's sample verifier: report data must equal the runtime-data hash."""
    if not isinstance(evidence, dict) or not isinstance(evidence.get("svn"), str):
        raise AuthFailed("Deserialize Quote failed: sample evidence is {svn, report_data}")
    try:
        report_data = base64.b64decode(evidence.get("report_data", ""), validate=True)
    except (binascii.Error, ValueError) as err:
        raise AuthFailed("base64 decode report data for sample evidence failed") from err
    if report_data != expected_report_data:
        raise AuthFailed("REPORT_DATA is different from that in Sample Quote")
    return {"svn": evidence["svn"], "report_data": evidence["report_data"]}


# -- sessions -------------------------------------------------------------------------------


class SessionState(enum.Enum):
    AUTHED = "authed"
    ATTESTED = "attested"


@dataclass
class Session:
    id: str
    tee: str
    nonce: str
    hash_algorithm: str
    expires: float
    state: SessionState = SessionState.AUTHED
    token: str = ""


@dataclass
class Kbs:
    policy: Policy
    resources: Path
    signing_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    session_seconds: float = SESSION_SECONDS
    _sessions: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _session(self, session_id: str | None) -> Session:
        if not session_id:
            raise AuthFailed("RCAR handshake Attest failed: cookie not found")
        with self._lock:
            now = time.time()
            for sid in [s for s, v in self._sessions.items() if v.expires < now]:
                del self._sessions[sid]
            found = self._sessions.get(session_id)
        if found is None:
            raise AuthFailed("RCAR handshake Attest failed: session not found (expired?)")
        return found

    def auth(self, request: Any) -> Session:
        if not isinstance(request, dict):
            raise AuthFailed("RCAR handshake Auth failed: deserialize Request")
        version = request.get("version")
        if version != kbs.PROTOCOL_VERSION:
            raise AuthFailed(
                "RCAR handshake Auth failed: KBS Client Protocol Version Mismatch: expect "
                f"={kbs.PROTOCOL_VERSION} while the request is {version}")
        tee = request.get("tee")
        if tee not in kbs.TEES:
            raise AuthFailed(f"RCAR handshake Auth failed: unknown tee {tee!r}")
        extra = request.get("extra-params")
        supported = extra.get(kbs.SUPPORTED_HASH_ALGORITHMS_KEY) if isinstance(extra, dict) \
            else None
        algorithm = kbs.DEFAULT_HASH_ALGORITHM
        if isinstance(supported, list) and supported and algorithm not in supported:
            common = [a for a in kbs.HASH_ALGORITHMS if a in supported]
            if not common:
                raise AuthFailed("RCAR handshake Auth failed: no common hash algorithm")
            algorithm = common[0]
        session = Session(
            id=secrets.token_hex(16),
            tee=str(tee),
            nonce=base64.b64encode(secrets.token_bytes(32)).decode(),
            hash_algorithm=algorithm,
            expires=time.time() + self.session_seconds,
        )
        with self._lock:
            self._sessions[session.id] = session
        return session

    def attest(self, session_id: str | None, attestation: Any) -> Session:
        session = self._session(session_id)
        if session.state is SessionState.ATTESTED:
            return session  # trustee answers an attested session with its token again
        if not isinstance(attestation, dict):
            raise AuthFailed("RCAR handshake Attest failed: deserialize Attestation")
        runtime = attestation.get("runtime-data")
        evidence = attestation.get("tee-evidence")
        if not isinstance(runtime, dict) or not isinstance(evidence, dict):
            raise AuthFailed("RCAR handshake Attest failed: runtime-data and tee-evidence "
                             "are required")
        if runtime.get("nonce") != session.nonce:
            raise AuthFailed(
                "RCAR handshake Attest failed: the nonce in the handshake session is different "
                "from the client side in KBS protocol's Attestation message")
        pubkey = runtime.get("tee-pubkey")
        try:
            load_public_jwk(pubkey)
        except JoseError as err:
            raise AuthFailed(f"RCAR handshake Attest failed: tee-pubkey: {err}") from err
        additional = evidence.get("additional_evidence", "")
        if additional:
            raise AuthFailed("RCAR handshake Attest failed: additional (device) evidence is "
                             "not supported by the reference KBS")
        assert isinstance(pubkey, dict)
        expected = kbs.report_data(session.nonce, pubkey, session.hash_algorithm, "")
        if session.tee not in self.policy.tees:
            raise AuthFailed(f"RCAR handshake Attest failed: evidence type {session.tee!r} is "
                             "not accepted by this KBS's policy")
        if session.tee != "sample":
            raise AuthFailed(f"RCAR handshake Attest failed: no {session.tee} verifier in the "
                             "reference KBS (sample only)")
        claims = verify_sample(evidence.get("primary_evidence"), expected)
        init_data = attestation.get("init-data")
        digest = None
        if init_data is not None:
            if not isinstance(init_data, dict) or init_data.get("format") != "toml" or \
                    not isinstance(init_data.get("body"), str):
                raise AuthFailed("RCAR handshake Attest failed: init-data must be "
                                 "{format: toml, body: <TOML>}")
            digest = init_data_digest(init_data["body"])
        now = int(time.time())
        token_claims = {
            "iss": TOKEN_ISSUER,
            "iat": now,
            "exp": int(session.expires),
            "tee": session.tee,
            "tee-pubkey": pubkey,
            "init_data": digest,
            "evidence": claims,
        }
        session.token = jws_sign(self.signing_key, json.dumps(token_claims).encode(),
                                 {"typ": "JWT"})
        session.state = SessionState.ATTESTED
        log.info("session %s attested: tee %s, init-data %s", session.id[:8], session.tee,
                 digest or "none")
        return session

    def verify_token(self, token: str) -> dict[str, Any]:
        try:
            claims = json.loads(Jws.parse(token).verify(self.signing_key.public_key()))
        except (JoseError, ValueError) as err:
            raise TokenInvalid(f"Token Verifier error: {err}") from err
        if not isinstance(claims, dict) or claims.get("iss") != TOKEN_ISSUER:
            raise TokenInvalid("Token Verifier error: not a token of this KBS")
        if float(claims.get("exp", 0)) < time.time():
            raise TokenInvalid("Token Verifier error: the token has expired")
        return claims

    def claims_for(self, session_id: str | None, bearer: str | None) -> dict[str, Any]:
        if bearer:
            return self.verify_token(bearer)
        if session_id:
            with self._lock:
                session = self._sessions.get(session_id)
            if session is not None and session.state is SessionState.ATTESTED \
                    and session.expires >= time.time():
                return self.verify_token(session.token)
        raise TokenNotFound("Attestation Token not found")

    def resource(self, path: str, claims: dict[str, Any]) -> dict[str, str]:
        try:
            uri = kbs.ResourceUri.from_path(path)
        except kbs.ProtocolError as err:
            raise BadPath(f"Request path {path} is invalid: {err}") from err
        self.policy.check(uri.path, claims)
        file = self.resources / uri.repository / uri.type / uri.tag
        try:
            data = file.read_bytes()
        except OSError as err:
            raise NotFound(f"Plugin internal error: resource {uri.path} not found") from err
        if len(data) > MAX_RESOURCE:
            raise NotFound(f"Plugin internal error: resource {uri.path} is too large")
        key = load_public_jwk(claims.get("tee-pubkey"))
        log.info("released %s (%d bytes) to %s evidence with init-data %s", uri.path,
                 len(data), claims.get("tee"), claims.get("init_data"))
        return jwe_encrypt(key, data).to_json()

    def public_key_jwk(self) -> dict[str, str]:
        return public_jwk(self.signing_key.public_key(), alg="ES256")
