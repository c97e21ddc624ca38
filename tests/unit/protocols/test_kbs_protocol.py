"""protocols.kbs: JCS vectors (RFC 8785), report-data binding, resource URIs, error bodies."""

from __future__ import annotations

import hashlib

import pytest

from protocols import kbs


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # RFC 8785 §3.2.2/3.2.3: sorted keys (UTF-16 order), no whitespace, ES6 numbers.
        ({"b": 1, "a": "test", "c": {"d": "e"}}, b'{"a":"test","b":1,"c":{"d":"e"}}'),
        ({"numbers": [333333333.33333329, 1e30, 4.50, 2e-3, 0.000000000000000000000000001]},
         b'{"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27]}'),
        ({"\u20ac": "Euro Sign", "\r": "Carriage Return", "1": "One",
          "\U0001f600": "Emoji", "\u0080": "Control", "\u00f6": "Latin"},
         '{"\\r":"Carriage Return","1":"One","\u0080":"Control","\u00f6":"Latin",'
         '"\u20ac":"Euro Sign","\U0001f600":"Emoji"}'.encode()),
        ({"string": "\u20ac$\u000f\nA'B\"\\\\\"/"},
         b'{"string":"\xe2\x82\xac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'),
    ],
)
def test_jcs_vectors(value: object, expected: bytes) -> None:
    assert kbs.canonical_json(value) == expected


def test_trustee_runtime_data_vector() -> None:
    # trustee attestation-service parse_runtimedata_json_binding: SHA-384 of the JCS form.
    value = {"b": 1, "a": "test", "c": {"d": "e"}}
    assert kbs.digest("sha384", kbs.canonical_json(value)).hex() == (
        "e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c"
        "4597480a186427c813ca941da78870c3")


def test_report_data_binds_nonce_key_and_additional_evidence() -> None:
    jwk = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "X", "y": "Y"}
    expected = hashlib.sha384(
        b'{"additional-evidence":"","nonce":"n0nce","tee-pubkey":{"alg":"ECDH-ES+A256KW",'
        b'"crv":"P-256","kty":"EC","x":"X","y":"Y"}}').digest()
    assert kbs.report_data("n0nce", jwk) == expected
    assert len(kbs.report_data("n0nce", jwk, "sha512")) == 64
    with pytest.raises(kbs.ProtocolError, match="unsupported hash algorithm 'md5'"):
        kbs.report_data("n", jwk, "md5")


def test_resource_uri() -> None:
    uri = kbs.ResourceUri.parse("kbs:///default/secret/one")
    assert (uri.repository, uri.type, uri.tag, uri.kbs_addr) == ("default", "secret", "one", "")
    assert str(uri) == "kbs:///default/secret/one"
    assert kbs.ResourceUri.parse("kbs://198.18.0.1:8080/a/b/c").kbs_addr == "198.18.0.1:8080"
    for bad in ("http:///a/b/c", "kbs:///a/b", "kbs:///a/../c", "kbs:///a/b/c/d", "kbs://x"):
        with pytest.raises(kbs.ProtocolError):
            kbs.ResourceUri.parse(bad)


def test_error_body() -> None:
    body = kbs.error_body("PolicyDeny", "Access denied by policy")
    assert body["type"] == "https://github.com/confidential-containers/kbs/errors/PolicyDeny"
    assert kbs.error_name(body) == "PolicyDeny"
    assert kbs.error_name("nope") is None
