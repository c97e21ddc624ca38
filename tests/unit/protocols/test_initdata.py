"""protocols.initdata: decoding with bounds, validation, digest fitting, the exact disk bytes.

Expected digests below were computed with ``openssl dgst`` and the fitted values with
``head -c`` + ``base64`` (independently of this code) over the documents in ``DOCS``.
"""

from __future__ import annotations

import base64
import gzip
import struct
import zlib

import pytest

from protocols import initdata
from protocols.initdata import (
    Initdata,
    InitdataAlgorithmError,
    InitdataDataError,
    InitdataDiskError,
    InitdataEncodingError,
    InitdataError,
    InitdataSizeError,
    InitdataTomlError,
    InitdataVersionError,
)


def _kbs(alg: str) -> bytes:
    return (f'version = "0.1.0"\nalgorithm = "{alg}"\n\n[data]\n"aa.toml" = \'\'\'\n'
            '[token_configs.kbs]\nurl = "http://198.18.0.1:8080"\n\'\'\'\n').encode()


def _policy(alg: str) -> bytes:
    return (f'algorithm = "{alg}"\nversion = "0.1.0"\n\n[data]\n"policy.rego" = """\n'
            'package agent_policy\ndefault ExecProcessRequest := false\n"""\n'
            '"cdh.toml" = "socket = \'unix:///run/confidential-containers/cdh.sock\'"\n'
            ).encode()


DOCS = {f"{alg}-{kind}": fn(alg) for alg in ("sha256", "sha384", "sha512")
        for kind, fn in (("kbs", _kbs), ("policy", _policy))}

# name -> (hex digest, SNP host-data base64 (32 bytes), TDX mrconfigid base64 (48 bytes))
EXPECTED = {
    "sha256-kbs": (
        "b6ab90a49ced7e66093a97d74dc33f3e30d66b031d51750bad57730f4de3a5b3",
        "tquQpJztfmYJOpfXTcM/PjDWawMdUXULrVdzD03jpbM=",
        "tquQpJztfmYJOpfXTcM/PjDWawMdUXULrVdzD03jpbMAAAAAAAAAAAAAAAAAAAAA"),
    "sha256-policy": (
        "833ea4a273b4a28ebbbc95fc980a3777846eab858a1c211756261144d71e69d1",
        "gz6konO0oo67vJX8mAo3d4Ruq4WKHCEXViYRRNceadE=",
        "gz6konO0oo67vJX8mAo3d4Ruq4WKHCEXViYRRNceadEAAAAAAAAAAAAAAAAAAAAA"),
    "sha384-kbs": (
        "0d57c95055b2cbaa0155e35209ea98b92d97f4f7b5bbb95a14ea1f826f4c5443"
        "8702bff37e677171d73f115f4ec5cec0",
        "DVfJUFWyy6oBVeNSCeqYuS2X9Pe1u7laFOofgm9MVEM=",
        "DVfJUFWyy6oBVeNSCeqYuS2X9Pe1u7laFOofgm9MVEOHAr/zfmdxcdc/EV9Oxc7A"),
    "sha384-policy": (
        "189a8cd55b4e0ac741c28b6d8ac92595a4df2b808da24679f47f9b5406459b54"
        "00857a2534af533a5988bf7201e4e018",
        "GJqM1VtOCsdBwottiskllaTfK4CNokZ59H+bVAZFm1Q=",
        "GJqM1VtOCsdBwottiskllaTfK4CNokZ59H+bVAZFm1QAhXolNK9TOlmIv3IB5OAY"),
    "sha512-kbs": (
        "69dd90e1f342a1dd9080c6acb06c3ef24bfae0c518a4423fc6eec5ed98ffe148"
        "de2591bff17576fafc6b7b1af2ebf6547859af830d97890d47af029fb032142c",
        "ad2Q4fNCod2QgMassGw+8kv64MUYpEI/xu7F7Zj/4Ug=",
        "ad2Q4fNCod2QgMassGw+8kv64MUYpEI/xu7F7Zj/4UjeJZG/8XV2+vxrexry6/ZU"),
    "sha512-policy": (
        "39359fcb7ebf81267ad8ac16cff29a79867d68c4fbc2c2425d1ac9d9180f08fc"
        "f482e5452d779f0e08dbe34d00cdb2f2de96523ea49ad89dcd066c4fff816e0a",
        "OTWfy36/gSZ62KwWz/KaeYZ9aMT7wsJCXRrJ2RgPCPw=",
        "OTWfy36/gSZ62KwWz/KaeYZ9aMT7wsJCXRrJ2RgPCPz0guVFLXefDgjb400AzbLy"),
}


def annotation_of(toml: bytes) -> str:
    return base64.b64encode(gzip.compress(toml, mtime=0)).decode()


@pytest.mark.parametrize("name", sorted(DOCS))
def test_digest_and_fitted_fields(name: str) -> None:
    doc = initdata.decode_annotation(annotation_of(DOCS[name]))
    digest, snp, tdx = EXPECTED[name]
    assert doc.toml == DOCS[name]
    assert doc.algorithm == name.split("-")[0] and doc.version == "0.1.0"
    assert doc.digest().hex() == digest
    assert base64.b64encode(doc.fitted(initdata.SNP_HOST_DATA_BYTES)).decode() == snp
    assert base64.b64encode(doc.fitted(initdata.TDX_MRCONFIGID_BYTES)).decode() == tdx


def test_every_algorithm_and_both_directions_of_fitting_are_covered() -> None:
    lengths = {len(bytes.fromhex(d)) for d, _, _ in EXPECTED.values()}
    assert lengths == {32, 48, 64}  # 32 < 48 (TDX pads), 48/64 > 32 (SNP truncates)


def test_data_is_read_only_and_exact() -> None:
    doc = initdata.from_toml(DOCS["sha384-policy"])
    assert dict(doc.data) == {
        "policy.rego": "package agent_policy\ndefault ExecProcessRequest := false\n",
        "cdh.toml": "socket = 'unix:///run/confidential-containers/cdh.sock'"}
    with pytest.raises(TypeError):
        doc.data["x"] = "y"  # type: ignore[index]


def test_same_data_other_encoding_is_another_digest() -> None:
    a = initdata.from_toml(DOCS["sha256-kbs"])
    b = initdata.from_toml(DOCS["sha256-kbs"].replace(b"\n\n[data]", b"\n[data]"))
    assert dict(a.data) == dict(b.data)
    assert a.digest() != b.digest()


# gzip -n -9 of: version = "0.1.0" / algorithm = "sha384" / [data] / "aa.toml" = "x"
SMALL_GZIP = bytes.fromhex(
    "1f8b08000000000002032b4b2d2acecccf53b0555032d033d43350e24acc49cf2fca2cc9c805891567241a5b98"
    "287145a7249624c672292526ea95e4e7e62881e42a94b8005dfb58c33e000000")
SMALL_SHA384 = ("cabe8965db13a85166f1fc8ecafc9d85dc31a9718242e7e80fcab0f77457ad91"
                "9f24fb2842c2eeeeb6ca4ff906a22164")


def test_exact_disk_bytes() -> None:
    doc = initdata.from_gzip(SMALL_GZIP)
    assert doc.digest().hex() == SMALL_SHA384
    disk = doc.disk_image()
    assert len(SMALL_GZIP) == 77 and len(disk) == 512
    assert disk[:16] == b"initdata" + bytes([77, 0, 0, 0, 0, 0, 0, 0])
    assert disk[16:93] == SMALL_GZIP
    assert disk[93:] == bytes(512 - 93)
    back = initdata.parse_disk_image(disk)
    assert back.toml == doc.toml and back.gzip == SMALL_GZIP


def test_disk_pads_to_whole_sectors() -> None:
    for size in (512 - 16, 512 - 15, 1000):
        blob = b"\x01" * size
        disk = Initdata(b"", blob, "0.1.0", "sha256", {}).disk_image()
        assert len(disk) % 512 == 0 and len(disk) >= 16 + size
        assert disk[16 + size:] == bytes(len(disk) - 16 - size)
    exact = Initdata(b"", b"\x01" * (512 - 16), "0.1.0", "sha256", {}).disk_image()
    assert len(exact) == 512  # no extra sector when it fits exactly


def test_annotation_gzip_is_delivered_as_received() -> None:
    value = base64.b64encode(SMALL_GZIP).decode()
    assert initdata.decode_annotation(value).disk_image()[16:93] == SMALL_GZIP


def test_from_toml_gzip_is_reproducible() -> None:
    a = initdata.from_toml(DOCS["sha256-kbs"])
    b = initdata.from_toml(DOCS["sha256-kbs"])
    assert a.gzip == b.gzip and gzip.decompress(a.gzip) == DOCS["sha256-kbs"]


# --- every refusal names its cause ----------------------------------------------------------

GOOD = DOCS["sha256-kbs"]
TOO_BIG = b"#" * (initdata.MAX_TOML_BYTES + 1)
REFUSALS: list[tuple[str, str, type[InitdataError], str]] = [
    ("empty", "", InitdataEncodingError, "annotation value is empty"),
    ("not-base64", "not*base64!", InitdataEncodingError, "not standard base64"),
    ("urlsafe-base64", base64.urlsafe_b64encode(b"\xfb\xff" * 8).decode(),
     InitdataEncodingError, "not standard base64"),
    ("not-gzip", base64.b64encode(b"plain text, no gzip").decode(), InitdataEncodingError,
     "not a valid gzip stream"),
    ("truncated", base64.b64encode(gzip.compress(GOOD)[:-12]).decode(), InitdataEncodingError,
     "gzip stream is truncated"),
    ("trailing", base64.b64encode(gzip.compress(GOOD) + b"junk").decode(),
     InitdataEncodingError, "4 bytes follow the gzip stream"),
    ("not-utf8", annotation_of(b"version = \"\xff\"\n"), InitdataEncodingError, "not UTF-8"),
    ("bad-toml", annotation_of(b"version = \n"), InitdataTomlError, "not valid TOML"),
    ("no-version", annotation_of(b'algorithm = "sha256"\n[data]\n'), InitdataVersionError,
     "version must be '0.1.0', got missing"),
    ("wrong-version", annotation_of(GOOD.replace(b"0.1.0", b"0.2.0")), InitdataVersionError,
     "version must be '0.1.0', got '0.2.0'"),
    ("int-version", annotation_of(GOOD.replace(b'"0.1.0"', b"1")), InitdataVersionError,
     "got 1"),
    ("no-algorithm", annotation_of(b'version = "0.1.0"\n[data]\n'), InitdataAlgorithmError,
     "algorithm must be one of sha256, sha384, sha512, got missing"),
    ("md5", annotation_of(GOOD.replace(b"sha256", b"md5")), InitdataAlgorithmError,
     "got 'md5'"),
    ("upper-case", annotation_of(GOOD.replace(b"sha256", b"SHA256")), InitdataAlgorithmError,
     "got 'SHA256'"),
    ("no-data", annotation_of(b'version = "0.1.0"\nalgorithm = "sha256"\n'), InitdataDataError,
     "[data] table is missing"),
    ("data-string", annotation_of(b'version = "0.1.0"\nalgorithm = "sha256"\ndata = "x"\n'),
     InitdataDataError, "data must be a table, got str"),
    ("data-int", annotation_of(b'version = "0.1.0"\nalgorithm = "sha256"\n[data]\nn = 1\n'),
     InitdataDataError, "data.'n' must be a string, got int"),
    ("data-table", annotation_of(b'version = "0.1.0"\nalgorithm = "sha256"\n[data.sub]\n'),
     InitdataDataError, "data.'sub' must be a string, got dict"),
    ("annotation-too-long", "A" * (initdata.MAX_ANNOTATION_CHARS + 4), InitdataSizeError,
     "characters, more than"),
]


@pytest.mark.parametrize(("case", "value", "kind", "message"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_refusal_names_the_problem(case: str, value: str, kind: type[InitdataError],
                                   message: str) -> None:
    with pytest.raises(kind) as info:
        initdata.decode_annotation(value)
    assert message in str(info.value)
    assert str(info.value).startswith("initdata: ")
    assert info.value.problem in str(info.value)


def test_gzip_bomb_is_refused_without_inflating_it(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = gzip.compress(bytes(200 * 1024 * 1024), compresslevel=9, mtime=0)  # 200 MiB of zeros
    assert len(bomb) < initdata.MAX_GZIP_BYTES
    inflated: list[int] = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self, wbits: int) -> None:
            self.inner = real(wbits=wbits)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            out = self.inner.decompress(data, max_length)
            inflated.append(len(out))
            return out

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    monkeypatch.setattr(zlib, "decompressobj", Counting)
    with pytest.raises(InitdataSizeError, match="exceeds 1048576 bytes"):
        initdata.decode_annotation(base64.b64encode(bomb).decode())
    assert 0 < sum(inflated) <= initdata.MAX_TOML_BYTES + 1


def test_compressed_size_is_bounded_before_decoding() -> None:
    with pytest.raises(InitdataSizeError, match="gzip stream is 262145 bytes, more than 262144"):
        initdata.from_gzip(bytes(initdata.MAX_GZIP_BYTES + 1))


def test_oversized_toml_file_is_refused() -> None:
    with pytest.raises(InitdataSizeError, match="document is 1048577 bytes"):
        initdata.from_toml(TOO_BIG)


DISK_REFUSALS: list[tuple[str, bytes, type[InitdataError], str]] = [
    ("short", b"initdat", InitdataDiskError, "shorter than its 16-byte header"),
    ("no-magic", b"\0" * 512, InitdataDiskError, "no initdata magic"),
    ("length-beyond-image", struct.pack("<8sQ", b"initdata", 600) + bytes(496),
     InitdataDiskError, "gzip is 600 bytes but only 496 follow the header"),
    ("length-beyond-bound", struct.pack("<8sQ", b"initdata", 1 << 40) + bytes(496),
     InitdataSizeError, "more than 262144"),
    ("garbage", struct.pack("<8sQ", b"initdata", 4) + b"abcd" + bytes(492),
     InitdataEncodingError, "not a valid gzip stream"),
]


@pytest.mark.parametrize(("case", "image", "kind", "message"), DISK_REFUSALS,
                         ids=[r[0] for r in DISK_REFUSALS])
def test_disk_refusal_names_the_problem(case: str, image: bytes, kind: type[InitdataError],
                                        message: str) -> None:
    with pytest.raises(kind, match=message):
        initdata.parse_disk_image(image)


def test_fit_digest_rejects_a_nonsense_length() -> None:
    assert initdata.fit_digest(b"\1\2", 4) == b"\1\2\0\0"
    assert initdata.fit_digest(b"\1\2\3", 2) == b"\1\2"
    with pytest.raises(ValueError, match="positive"):
        initdata.fit_digest(b"x", 0)


def test_module_is_standard_library_only() -> None:
    """The guest imports it too: nothing of ours, nothing beyond the standard library."""
    import ast
    import sys
    from pathlib import Path

    tree = ast.parse(Path(initdata.__file__).read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree)
             if isinstance(node, ast.Import) for alias in node.names}
    names |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom)}
    assert names - {"__future__"} <= set(sys.stdlib_module_names), names
