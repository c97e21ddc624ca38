"""The proof's scanner finds a secret in every spelling at every alignment, and nothing in
random data."""

from __future__ import annotations

import base64
import os
import random
import socket
from pathlib import Path

import pytest

from tests.support.secret_scan import Source, file_sources, needles, scan

SECRET = bytes(range(200, 232))  # 32 bytes, fixed so failures reproduce


def encodings_found(data: bytes, secret: bytes = SECRET) -> set[str]:
    return {f.encoding for f in scan(secret, [Source.of("s", data)])}


@pytest.mark.parametrize("prefix", range(6))
@pytest.mark.parametrize("suffix", range(4))
@pytest.mark.parametrize("url", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_base64_at_each_alignment(prefix: int, suffix: int, url: bool, padded: bool) -> None:
    rng = random.Random(prefix * 100 + suffix)
    stream = rng.randbytes(prefix) + SECRET + rng.randbytes(suffix)
    encoded = (base64.urlsafe_b64encode if url else base64.b64encode)(stream)
    if not padded:
        encoded = encoded.rstrip(b"=")
    haystack = os.urandom(50) + b'{"value":"' + encoded + b'"}' + os.urandom(50)
    flavour = "base64url" if url else "base64"
    assert f"{flavour} align {prefix % 3}" in encodings_found(haystack)


def test_the_secret_alone_padded_and_unpadded() -> None:
    for encoded in (base64.b64encode(SECRET), base64.b64encode(SECRET).rstrip(b"="),
                    base64.urlsafe_b64encode(SECRET),
                    base64.urlsafe_b64encode(SECRET).rstrip(b"=")):
        assert encodings_found(encoded) & {"base64 align 0", "base64url align 0"}


@pytest.mark.parametrize(("encoded", "name"), [
    (SECRET, "raw"), (SECRET.hex().encode(), "hex"), (SECRET.hex().upper().encode(), "HEX")])
def test_raw_and_hex(encoded: bytes, name: str) -> None:
    found = scan(SECRET, [Source.of("log", b"x" * 7 + encoded + b"\n")])
    assert [(f.source, f.encoding, f.offset) for f in found if f.encoding == name] == \
        [("log", name, 7)]


def test_every_occurrence_is_reported() -> None:
    found = scan(SECRET, [Source.of("a", SECRET + b"--" + SECRET), Source.of("b", b"clean")])
    assert [(f.source, f.offset) for f in found if f.encoding == "raw"] == [("a", 0), ("a", 34)]


def test_no_false_positive_on_random_data() -> None:
    rng = random.Random(7)
    blob = rng.randbytes(4 << 20)
    text = base64.b64encode(rng.randbytes(1 << 20)) + rng.randbytes(1 << 20).hex().encode()
    for _ in range(20):
        assert scan(rng.randbytes(32), [Source.of("bin", blob), Source.of("text", text)]) == []


def test_a_near_miss_is_not_a_finding() -> None:
    """One bit flipped in the middle of the secret: none of its spellings match."""
    other = bytearray(SECRET)
    other[16] ^= 0x01
    data = bytes(other) + other.hex().encode() + base64.b64encode(bytes(other))
    assert scan(SECRET, [Source.of("s", data)]) == []


def test_needles_cover_each_spelling() -> None:
    names = [n.encoding for n in needles(SECRET)]
    assert names == ["raw", "hex", "HEX"] + [
        f"{kind} align {a}" for a in range(3) for kind in ("base64", "base64url")]
    assert all(len(n.data) >= 32 for n in needles(SECRET))


def test_short_secret_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        needles(b"short")


def test_file_sources_reads_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "state.json").write_bytes(b'{"k": "' + SECRET.hex().encode() + b'"}')
    (tmp_path / "clean").write_bytes(b"nothing")
    outside = tmp_path.parent / f"outside-{os.getpid()}"
    outside.write_bytes(SECRET)
    try:
        (tmp_path / "link").symlink_to(outside)
        os.mkfifo(tmp_path / "fifo")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(tmp_path / "sock"))
            sources = sorted(file_sources(tmp_path, "run"), key=lambda s: s.name)
            assert [s.name for s in sources] == ["run/clean", "run/d/state.json"]
            assert [(f.source, f.encoding) for f in scan(SECRET, sources)] == \
                [("run/d/state.json", "hex")]
    finally:
        outside.unlink()
