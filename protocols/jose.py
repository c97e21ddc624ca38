"""The JOSE pieces trustee's KBS protocol uses, composed from ``cryptography`` primitives.

- JWK: P-256 public keys as ``{"kty":"EC","crv":"P-256","alg":"ECDH-ES+A256KW","x","y"}``.
- JWE (RFC 7516 flattened JSON): ``alg`` ``ECDH-ES+A256KW`` (RFC 7518 §4.6: ECDH on P-256 →
  Concat KDF with SHA-256 → AES key wrap of a random CEK), ``enc`` ``A256GCM`` with the
  ASCII of the base64url protected header as AAD.
- JWS (RFC 7515 compact): ``ES256`` (raw ``r || s`` signature), for KBS tokens and sealed
  secrets.

Every primitive (ECDH, Concat KDF, AES-KW, AES-GCM, ECDSA) is ``cryptography``'s; this module
only assembles them the way the RFCs say. Only APIs present in Debian bookworm's
python3-cryptography 38 are used, because the reference guest runs that build. The
composition is checked against jwcrypto (an independent implementation) in both directions
by ``tests/unit/protocols/test_jose.py``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

ECDH_ES_A256KW = "ECDH-ES+A256KW"
A256GCM = "A256GCM"
ES256 = "ES256"
P256 = "P-256"
_COORD = 32  # bytes of a P-256 coordinate


class JoseError(ValueError):
    """A JOSE object is malformed, uses an unsupported algorithm, or fails to verify."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str = "value") -> bytes:
    if not isinstance(text, str):
        raise JoseError(f"{what} is not a base64url string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as err:
        raise JoseError(f"{what} is not valid base64url: {err}") from err


# -- JWK ----------------------------------------------------------------------------------------


def public_jwk(key: ec.EllipticCurvePublicKey, alg: str = ECDH_ES_A256KW) -> dict[str, str]:
    """The public JWK of a P-256 key, members as trustee's ``TeePubKey::EC`` has them."""
    if not isinstance(key.curve, ec.SECP256R1):
        raise JoseError(f"only P-256 keys are supported, not {key.curve.name}")
    numbers = key.public_numbers()
    return {
        "kty": "EC",
        "crv": P256,
        "alg": alg,
        "x": b64url(numbers.x.to_bytes(_COORD, "big")),
        "y": b64url(numbers.y.to_bytes(_COORD, "big")),
    }


def load_public_jwk(jwk: Any) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from a JWK; anything else is a JoseError naming the problem."""
    if not isinstance(jwk, dict):
        raise JoseError("the JWK is not a JSON object")
    if jwk.get("kty") != "EC" or jwk.get("crv") != P256:
        raise JoseError(f"unsupported JWK (kty {jwk.get('kty')!r}, crv {jwk.get('crv')!r})")
    x = b64url_decode(jwk.get("x", ""), "JWK x")
    y = b64url_decode(jwk.get("y", ""), "JWK y")
    if len(x) != _COORD or len(y) != _COORD:
        raise JoseError("JWK coordinates must be 32 bytes each")
    try:
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
        )
        return numbers.public_key()
    except ValueError as err:
        raise JoseError(f"the JWK is not a point on P-256: {err}") from err


def private_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    out = public_jwk(key.public_key(), alg=ES256)
    out["d"] = b64url(key.private_numbers().private_value.to_bytes(_COORD, "big"))
    return out


def load_private_jwk(jwk: Any) -> ec.EllipticCurvePrivateKey:
    public = load_public_jwk(jwk)
    d = b64url_decode(jwk.get("d", ""), "JWK d")
    try:
        return ec.EllipticCurvePrivateNumbers(
            int.from_bytes(d, "big"), public.public_numbers()
        ).private_key()
    except ValueError as err:
        raise JoseError(f"invalid private JWK: {err}") from err


# -- JWE ----------------------------------------------------------------------------------------


def _concat_kdf(shared: bytes, alg: str, apu: bytes = b"", apv: bytes = b"") -> bytes:
    """RFC 7518 §4.6.2: Concat KDF (SHA-256) with AlgorithmID, PartyUInfo, PartyVInfo, 256."""

    def field(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    otherinfo = field(alg.encode()) + field(apu) + field(apv) + struct.pack(">I", 256)
    return ConcatKDFHash(algorithm=hashes.SHA256(), length=32, otherinfo=otherinfo).derive(shared)


def _protected(header: dict[str, Any]) -> str:
    return b64url(json.dumps(header, separators=(",", ":")).encode())


@dataclass(frozen=True)
class Jwe:
    """A flattened JWE JSON serialization (trustee's ``kbs_types::Response``)."""

    protected: str
    encrypted_key: str
    iv: str
    ciphertext: str
    tag: str
    # Shared and per-recipient unprotected header members (RFC 7516 §7.2.2 "unprotected",
    # "header"); trustee puts everything in "protected", other encoders put "epk" here.
    unprotected: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> dict[str, str]:
        return {
            "protected": self.protected,
            "encrypted_key": self.encrypted_key,
            "iv": self.iv,
            "ciphertext": self.ciphertext,
            "tag": self.tag,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Jwe:
        if not isinstance(doc, dict):
            raise JoseError("the JWE is not a JSON object")
        missing = [m for m in ("protected", "encrypted_key", "iv", "ciphertext", "tag")
                   if not isinstance(doc.get(m), str)]
        if missing:
            raise JoseError(f"the JWE lacks {', '.join(missing)}")
        if doc.get("aad"):
            raise JoseError("a JWE with an extra 'aad' member is not supported")
        extra: dict[str, Any] = {}
        for member in ("unprotected", "header"):
            value = doc.get(member, {})
            if not isinstance(value, dict):
                raise JoseError(f"the JWE {member!r} member is not a JSON object")
            extra.update(value)
        return cls(doc["protected"], doc["encrypted_key"], doc["iv"], doc["ciphertext"],
                   doc["tag"], tuple(extra.items()))


def jwe_encrypt(recipient: ec.EllipticCurvePublicKey, plaintext: bytes) -> Jwe:
    """Encrypt to a P-256 public key: ECDH-ES+A256KW, A256GCM (what trustee's KBS sends)."""
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    kek = _concat_kdf(ephemeral.exchange(ec.ECDH(), recipient), ECDH_ES_A256KW)
    cek = AESGCM.generate_key(bit_length=256)
    epk = public_jwk(ephemeral.public_key())
    del epk["alg"]
    protected = _protected({"alg": ECDH_ES_A256KW, "enc": A256GCM, "epk": epk})
    iv = os.urandom(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    return Jwe(
        protected=protected,
        encrypted_key=b64url(aes_key_wrap(kek, cek)),
        iv=b64url(iv),
        ciphertext=b64url(sealed[:-16]),
        tag=b64url(sealed[-16:]),
    )


def jwe_decrypt(key: ec.EllipticCurvePrivateKey, jwe: Jwe) -> bytes:
    """Decrypt a JWE made to ``key``; any tampering or algorithm mismatch is a JoseError."""
    try:
        header = json.loads(b64url_decode(jwe.protected, "JWE protected header"))
    except json.JSONDecodeError as err:
        raise JoseError(f"the JWE protected header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise JoseError("the JWE protected header is not a JSON object")
    header = {**dict(jwe.unprotected), **header}
    if header.get("alg") != ECDH_ES_A256KW or header.get("enc") != A256GCM:
        raise JoseError(
            f"unsupported JWE algorithms alg={header.get('alg')!r} enc={header.get('enc')!r} "
            f"(expected {ECDH_ES_A256KW} / {A256GCM})"
        )
    epk = load_public_jwk(header.get("epk"))
    apu = b64url_decode(header["apu"], "apu") if "apu" in header else b""
    apv = b64url_decode(header["apv"], "apv") if "apv" in header else b""
    kek = _concat_kdf(key.exchange(ec.ECDH(), epk), ECDH_ES_A256KW, apu, apv)
    try:
        cek = aes_key_unwrap(kek, b64url_decode(jwe.encrypted_key, "encrypted_key"))
    except InvalidUnwrap as err:
        raise JoseError("the JWE content key does not unwrap with this key") from err
    iv = b64url_decode(jwe.iv, "iv")
    data = b64url_decode(jwe.ciphertext, "ciphertext") + b64url_decode(jwe.tag, "tag")
    try:
        return AESGCM(cek).decrypt(iv, data, jwe.protected.encode("ascii"))
    except (InvalidTag, ValueError) as err:
        raise JoseError("the JWE ciphertext fails authentication (tampered?)") from err


# -- JWS (compact, ES256) -----------------------------------------------------------------------


def jws_sign(key: ec.EllipticCurvePrivateKey, payload: bytes, header: dict[str, Any]) -> str:
    head = _protected({**header, "alg": ES256})
    signing_input = f"{head}.{b64url(payload)}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{b64url(r.to_bytes(_COORD, 'big') + s.to_bytes(_COORD, 'big'))}"


@dataclass(frozen=True)
class Jws:
    header: dict[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes

    @classmethod
    def parse(cls, compact: str) -> Jws:
        parts = compact.split(".")
        if len(parts) != 3:
            raise JoseError(f"a compact JWS has 3 parts, this one has {len(parts)}")
        try:
            header = json.loads(b64url_decode(parts[0], "JWS header"))
        except json.JSONDecodeError as err:
            raise JoseError(f"the JWS header is not JSON: {err}") from err
        if not isinstance(header, dict):
            raise JoseError("the JWS header is not a JSON object")
        return cls(
            header=header,
            payload=b64url_decode(parts[1], "JWS payload"),
            signing_input=f"{parts[0]}.{parts[1]}".encode(),
            signature=b64url_decode(parts[2], "JWS signature"),
        )

    def verify(self, key: ec.EllipticCurvePublicKey) -> bytes:
        """The payload if the ES256 signature verifies with ``key``, else JoseError."""
        if self.header.get("alg") != ES256:
            raise JoseError(f"JWS algorithm must be {ES256}, not {self.header.get('alg')!r}")
        if len(self.signature) != 2 * _COORD:
            raise JoseError("an ES256 signature is 64 bytes")
        der = encode_dss_signature(
            int.from_bytes(self.signature[:_COORD], "big"),
            int.from_bytes(self.signature[_COORD:], "big"),
        )
        try:
            key.verify(der, self.signing_input, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as err:
            raise JoseError("the JWS signature does not verify") from err
        return self.payload
