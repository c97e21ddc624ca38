"""trustee's KBS attestation protocol, version 0.4.0: the JSON shapes both ends agree on.

Facts (trustee ``kbs/docs/kbs_attestation_protocol.md``, ``kbs/src/attestation/backend.rs``;
guest-components ``kbs_protocol/src/client/rcar_client.rs``):

- ``POST /kbs/v0/auth`` ``{"version":"0.4.0","tee":…,"extra-params":{…}}`` → a
  ``kbs-session-id`` cookie and ``{"nonce":…,"extra-params":{…}}``. The server accepts exactly
  0.4.0. The client lists ``supported-hash-algorithms``; the challenge may name a
  ``selected-hash-algorithm`` (default SHA-384).
- ``POST /kbs/v0/attest`` ``{"init-data":{"format":"toml","body":…}, "runtime-data":{"nonce",
  "tee-pubkey"}, "tee-evidence":{"primary_evidence":…, "additional_evidence":""}}`` →
  ``{"token": <JWT>}``. Since 0.4.0 the primary evidence binds the hash of the canonical
  (RFC 8785) JSON of ``{"nonce", "tee-pubkey", "additional-evidence"}`` (additional evidence
  is ``""`` when the guest has no attested devices), which is what trustee recomputes.
- ``GET /kbs/v0/resource/<repository>/<type>/<tag>`` → a flattened JWE to the tee-pubkey.
- Errors: ``{"type": "https://github.com/confidential-containers/kbs/errors/<Name>",
  "detail": …}`` (RFC 7807 style).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import rfc8785

PROTOCOL_VERSION = "0.4.0"
PREFIX = "/kbs/v0"
SESSION_COOKIE = "kbs-session-id"
ERROR_TYPE_PREFIX = "https://github.com/confidential-containers/kbs/errors"
INIT_DATA_FORMAT = "toml"
SUPPORTED_HASH_ALGORITHMS_KEY = "supported-hash-algorithms"
SELECTED_HASH_ALGORITHM_KEY = "selected-hash-algorithm"
DEFAULT_HASH_ALGORITHM = "sha384"
HASH_ALGORITHMS = ("sha256", "sha384", "sha512")
TEES = ("sample", "snp", "tdx", "se", "sgx", "cca", "csv", "az-snp-vtpm", "az-tdx-vtpm")

# trustee's error names (kbs/src/error.rs, the strum names of its Error enum).
ERR_ATTESTATION = "AttestationError"
ERR_INVALID_PATH = "InvalidRequestPath"
ERR_PLUGIN_NOT_FOUND = "PluginNotFound"
ERR_POLICY_DENY = "PolicyDeny"
ERR_TOKEN_NOT_FOUND = "TokenNotFound"
ERR_TOKEN_VERIFIER = "TokenVerifierError"
ERR_PLUGIN_INTERNAL = "PluginInternalError"
ERR_JWE = "JweError"
ERR_SERDE = "SerdeError"


class ProtocolError(ValueError):
    """A KBS protocol message is malformed."""


def canonical_json(value: Any) -> bytes:
    """RFC 8785 (JCS) canonical JSON bytes (the rfc8785 library)."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as err:
        raise ProtocolError(f"cannot canonicalise JSON: {err}") from err


def digest(algorithm: str, data: bytes) -> bytes:
    if algorithm not in HASH_ALGORITHMS:
        raise ProtocolError(f"unsupported hash algorithm {algorithm!r}")
    return hashlib.new(algorithm, data).digest()


def runtime_data(nonce: str, tee_pubkey: dict[str, Any], additional_evidence: str = "") -> dict[
    str, Any
]:
    """The structured runtime data the primary evidence binds (0.4.0 composite evidence)."""
    return {"tee-pubkey": tee_pubkey, "nonce": nonce, "additional-evidence": additional_evidence}


def report_data(
    nonce: str,
    tee_pubkey: dict[str, Any],
    algorithm: str = DEFAULT_HASH_ALGORITHM,
    additional_evidence: str = "",
) -> bytes:
    """hash(JCS(runtime data)): what the TEE evidence's report data must carry."""
    return digest(algorithm, canonical_json(runtime_data(nonce, tee_pubkey, additional_evidence)))


def error_body(name: str, detail: str) -> dict[str, str]:
    return {"type": f"{ERROR_TYPE_PREFIX}/{name}", "detail": detail}


def error_name(body: Any) -> str | None:
    """The error's name (``PolicyDeny``…) from an RFC 7807 body, or None if it is not one."""
    if isinstance(body, dict) and isinstance(body.get("type"), str):
        return str(body["type"]).rsplit("/", 1)[-1]
    return None


_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class ResourceUri:
    """``kbs://[<host>]/<repository>/<type>/<tag>`` (guest-components ``resource_uri``)."""

    repository: str
    type: str
    tag: str
    kbs_addr: str = ""

    @property
    def path(self) -> str:
        return f"{self.repository}/{self.type}/{self.tag}"

    def __str__(self) -> str:
        return f"kbs://{self.kbs_addr}/{self.path}"

    @classmethod
    def from_path(cls, path: str) -> ResourceUri:
        parts = path.strip("/").split("/")
        if len(parts) != 3 or not all(_SEGMENT.match(p) and p not in (".", "..") for p in parts):
            raise ProtocolError(
                f"a resource path is <repository>/<type>/<tag> of [A-Za-z0-9._-], got {path!r}"
            )
        return cls(*parts)

    @classmethod
    def parse(cls, uri: str) -> ResourceUri:
        if not uri.startswith("kbs://"):
            raise ProtocolError(f"a resource URI starts with kbs://, got {uri!r}")
        host, sep, path = uri[len("kbs://"):].partition("/")
        if not sep:
            raise ProtocolError(f"resource URI {uri!r} has no path")
        found = cls.from_path(path)
        return cls(found.repository, found.type, found.tag, host)
