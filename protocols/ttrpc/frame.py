"""ttrpc framing: a 10-byte big-endian header, then at most 4 MiB of data.

    uint32 length (data only) | uint32 stream_id | uint8 type | uint8 flags | data

The decoder is sans-IO: the connection code feeds it whatever the socket returned and gets
whole frames back. It never allocates from a claimed length: an oversized frame is skipped as
its bytes arrive and reported once they are gone, the way containerd/ttrpc's channel.recv
discards it and answers ResourceExhausted on that stream.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

HEADER_LENGTH = 10
MAX_DATA_LENGTH = 4 << 20

_HEADER = struct.Struct(">IIBB")


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flag(enum.IntFlag):
    """Request: REMOTE_CLOSED/REMOTE_OPEN (0 = unary). Data: REMOTE_CLOSED/NO_DATA."""

    REMOTE_CLOSED = 0x1
    REMOTE_OPEN = 0x2
    NO_DATA = 0x4


class Frame(NamedTuple):
    stream_id: int
    type: int  # a FrameType value, or an unknown type a newer peer sent
    flags: int
    data: bytes


class OversizedFrame(NamedTuple):
    """A frame whose claimed length exceeded the limit; its data was read and dropped."""

    stream_id: int
    type: int
    flags: int
    length: int

    def error_message(self, limit: int = MAX_DATA_LENGTH) -> str:
        # Same wording as containerd/ttrpc (channel.go, errors.go).
        return f"message length {self.length} exceed maximum message size of {limit}"


def encode_header(length: int, stream_id: int, frame_type: int, flags: int) -> bytes:
    return _HEADER.pack(length, stream_id, frame_type, flags)


def encode_frame(stream_id: int, frame_type: int, flags: int, data: bytes) -> bytes:
    """Header and data as one buffer, so a single write can never interleave with another."""
    if len(data) > MAX_DATA_LENGTH:
        raise ValueError(f"frame data of {len(data)} bytes exceeds {MAX_DATA_LENGTH}")
    return _HEADER.pack(len(data), stream_id, frame_type, flags) + data


class FrameDecoder:
    """Incremental decoder. After every feed() at most one partial frame stays buffered."""

    __slots__ = ("_buffer", "_discarding", "_max_length", "_skip")

    def __init__(self, max_length: int = MAX_DATA_LENGTH) -> None:
        self._max_length = max_length
        self._buffer = bytearray()
        self._skip = 0  # bytes of an oversized frame still to drop
        self._discarding: OversizedFrame | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for a partial frame (always < HEADER_LENGTH + max_length after feed)."""
        return len(self._buffer)

    @property
    def skipping(self) -> int:
        """Bytes of an oversized frame still to be discarded."""
        return self._skip

    @property
    def discarding(self) -> OversizedFrame | None:
        """The oversized frame whose data is being skipped (reported once it is skipped)."""
        return self._discarding

    @property
    def at_boundary(self) -> bool:
        """True when the stream could end here without cutting a frame."""
        return not self._buffer and not self._skip

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame | OversizedFrame]:
        events: list[Frame | OversizedFrame] = []
        view = memoryview(data)
        if self._skip:
            dropped = min(self._skip, len(view))
            self._skip -= dropped
            view = view[dropped:]
            if self._skip:
                return events
            assert self._discarding is not None
            events.append(self._discarding)
            self._discarding = None

        buffer = self._buffer
        buffer += view
        size = len(buffer)
        limit = self._max_length
        with memoryview(buffer) as whole:  # slices of it copy once (bytes(buffer[a:b]): twice)
            pos = self._frames(buffer, whole, size, limit, events)
        del buffer[:pos]
        return events

    def _frames(self, buffer: bytearray, whole: memoryview, size: int, limit: int,
                events: list[Frame | OversizedFrame]) -> int:
        """Decode the whole frames in ``buffer``; the offset where the rest begins."""
        pos = 0
        while size - pos >= HEADER_LENGTH:
            length, stream_id, frame_type, flags = _HEADER.unpack_from(buffer, pos)
            start = pos + HEADER_LENGTH
            if length > limit:
                oversized = OversizedFrame(stream_id, frame_type, flags, length)
                available = size - start
                if available < length:
                    self._skip = length - available
                    self._discarding = oversized
                    pos = size
                    break
                events.append(oversized)
                pos = start + length
                continue
            end = start + length
            if end > size:
                break
            with whole[start:end] as data:
                events.append(Frame(stream_id, frame_type, flags, bytes(data)))
            pos = end
        return pos
