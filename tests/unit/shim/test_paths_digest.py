"""``paths.sha256_hex``: the built-in SHA-256 that ``start`` uses gives hashlib's digest."""

from __future__ import annotations

import hashlib

from shim.core import paths


def test_sha256_hex_matches_hashlib() -> None:
    for data in (b"", b"/run/containerd/containerd.sock/default/pod", bytes(range(256)) * 9):
        assert paths.sha256_hex(data) == hashlib.sha256(data).hexdigest()
