"""Content digests and a reader that verifies a stream against its descriptor.

Every byte fetched from a registry passes through :class:`VerifyingReader`: it refuses to read
past the descriptor's size and, at the end, compares the size and the digest. Nothing read from
it may be used before :meth:`VerifyingReader.verify` has passed (the unpacker writes into a
staging directory that is discarded on a mismatch).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Protocol

from guest.agent.errors import DataLoss, InvalidArgument
from guest.image_pull.timing import PhaseTimer

ALGORITHMS = {"sha256": 64, "sha512": 128}
# hashlib is imported with the first digest: it loads OpenSSL's libcrypto (2.5 of the 21 ms the
# agent's machinery imports take on the host), and the agent imports this module before its
# AgentService serves; a guest that never pulls never needs it.
_DIGEST = re.compile(r"^(sha256|sha512):([0-9a-f]+)$")


class Digest(NamedTuple):
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _DIGEST.match(text)
        if match is None or len(match.group(2)) != ALGORITHMS[match.group(1)]:
            raise InvalidArgument(f"unsupported or malformed digest {text!r}")
        return cls(match.group(1), match.group(2))

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        import hashlib

        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> Any:
        import hashlib

        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def verify_bytes(data: bytes, expected: Digest, what: str) -> None:
    actual = Digest.of(data, expected.algorithm)
    if actual != expected:
        raise DataLoss(f"{what}: content has digest {actual}, expected {expected}")


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class VerifyingReader:
    """A file-like view of ``raw`` limited to ``size`` bytes, hashing what passes through."""

    def __init__(
        self, raw: Readable, expected: Digest, size: int, what: str, timer: PhaseTimer | None = None
    ) -> None:
        self.raw = raw
        self.expected = expected
        self.size = size
        self.what = what
        self.seen = 0
        self._hash = expected.hasher()
        self.timer = timer if timer is not None else PhaseTimer()  # unread when not given

    def read(self, size: int = -1, /) -> bytes:
        left = self.size - self.seen
        if left <= 0:
            return b""
        want = left if size is None or size < 0 else min(size, left)
        chunk = self.raw.read(want)
        self.seen += len(chunk)
        previous = self.timer.enter("digest")
        self._hash.update(chunk)
        self.timer.leave(previous)
        return chunk

    def drain(self, chunk_size: int = 1 << 20) -> None:
        """Read what the consumer left (trailing tar padding, a gzip trailer)."""
        while self.read(chunk_size):
            pass

    def verify(self) -> None:
        """DataLoss when the stream was short, long or its digest differs."""
        if self.seen != self.size:
            raise DataLoss(f"{self.what}: got {self.seen} bytes, the descriptor says {self.size}")
        extra = self.raw.read(1)
        if extra:
            raise DataLoss(f"{self.what}: longer than the {self.size} bytes its descriptor says")
        actual = Digest(self.expected.algorithm, self._hash.hexdigest())
        if actual != self.expected:
            raise DataLoss(f"{self.what}: content has digest {actual}, expected {self.expected}")
