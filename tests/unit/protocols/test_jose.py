"""protocols.jose against jwcrypto (an independent JOSE implementation), both directions."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwe as jw_jwe
from jwcrypto import jwk as jw_jwk
from jwcrypto import jws as jw_jws

from protocols.jose import (
    JoseError,
    Jwe,
    Jws,
    b64url,
    jwe_decrypt,
    jwe_encrypt,
    jws_sign,
    load_private_jwk,
    load_public_jwk,
    private_jwk,
    public_jwk,
)


def test_public_jwk_members_and_round_trip() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = public_jwk(key.public_key())
    assert set(jwk) == {"kty", "crv", "alg", "x", "y"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("EC", "P-256", "ECDH-ES+A256KW")
    assert load_public_jwk(jwk).public_numbers() == key.public_key().public_numbers()
    assert load_private_jwk(private_jwk(key)).private_numbers() == key.private_numbers()


def test_load_public_jwk_refuses_bad_keys() -> None:
    with pytest.raises(JoseError, match="unsupported JWK"):
        load_public_jwk({"kty": "RSA"})
    with pytest.raises(JoseError, match="32 bytes"):
        load_public_jwk({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"})
    with pytest.raises(JoseError, match="not a point"):
        load_public_jwk({"kty": "EC", "crv": "P-256", "x": b64url(b"\1" * 32),
                         "y": b64url(b"\2" * 32)})


def test_our_jwe_decrypts_with_jwcrypto() -> None:
    oracle = jw_jwk.JWK.generate(kty="EC", crv="P-256")
    recipient = load_public_jwk(json.loads(oracle.export_public()))
    ours = jwe_encrypt(recipient, b"secret bytes \x00\xff")
    token = jw_jwe.JWE()
    token.deserialize(json.dumps(ours.to_json()), key=oracle)
    assert token.payload == b"secret bytes \x00\xff"
    header = json.loads(token.objects["protected"])
    assert (header["alg"], header["enc"]) == ("ECDH-ES+A256KW", "A256GCM")


def test_jwcrypto_jwe_decrypts_with_ours() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    oracle_pub = jw_jwk.JWK(**public_jwk(key.public_key()))
    token = jw_jwe.JWE(b"from jwcrypto", json.dumps({"alg": "ECDH-ES+A256KW",
                                                      "enc": "A256GCM"}))
    token.add_recipient(oracle_pub)
    flattened = json.loads(token.serialize())
    assert jwe_decrypt(key, Jwe.from_json(flattened)) == b"from jwcrypto"


def test_jwe_tampering_and_wrong_key_are_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwe = jwe_encrypt(key.public_key(), b"payload")
    tampered = Jwe(jwe.protected, jwe.encrypted_key, jwe.iv,
                   b64url(b"X" + b"payload"[1:]), jwe.tag)
    with pytest.raises(JoseError, match="fails authentication"):
        jwe_decrypt(key, tampered)
    with pytest.raises(JoseError, match="does not unwrap"):
        jwe_decrypt(ec.generate_private_key(ec.SECP256R1()), jwe)
    with pytest.raises(JoseError, match="lacks tag"):
        Jwe.from_json({k: v for k, v in jwe.to_json().items() if k != "tag"})


def test_jws_es256_both_directions() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    compact = jws_sign(key, b'{"a":1}', {"kid": "k1"})
    oracle = jw_jws.JWS()
    oracle.deserialize(compact, key=jw_jwk.JWK(**public_jwk(key.public_key(), alg="ES256")))
    assert oracle.payload == b'{"a":1}'
    theirs = jw_jws.JWS(b"hello")
    theirs.add_signature(jw_jwk.JWK(**private_jwk(key)), alg="ES256",
                         protected=json.dumps({"alg": "ES256", "kid": "x"}))
    assert Jws.parse(theirs.serialize(compact=True)).verify(key.public_key()) == b"hello"
    with pytest.raises(JoseError, match="does not verify"):
        Jws.parse(compact).verify(ec.generate_private_key(ec.SECP256R1()).public_key())
