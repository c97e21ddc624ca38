"""A minimal protobuf wire reader/writer for the two tiny messages on the ``start``/``delete`` path.

``start`` decodes ``google.protobuf.Any{runtimeoptions.v1.Options}`` from stdin and ``delete``
prints a ``DeleteResponse``; importing the protobuf runtime and generated modules for that would
cost more than the whole command should take, so they are handled here by hand. Only varint
(wire type 0) and length-delimited (wire type 2) fields are produced; fixed32/fixed64 are skipped
when read.
"""

from __future__ import annotations

from collections.abc import Iterator

VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2
FIXED32 = 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a varint at ``pos``; returns (value, next position)."""
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise WireError("varint longer than 10 bytes")


def iter_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value): an int for varints, bytes for length-delimited fields."""
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire_type == VARINT:
            value, pos = read_varint(data, pos)
            yield number, value
        elif wire_type == LENGTH_DELIMITED:
            length, pos = read_varint(data, pos)
            if pos + length > len(data):
                raise WireError("truncated length-delimited field")
            yield number, data[pos : pos + length]
            pos += length
        elif wire_type == FIXED64:
            pos += 8
        elif wire_type == FIXED32:
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire_type}")
    if pos != len(data):
        raise WireError("truncated fixed-width field")


def encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 negatives are ten-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_field(number: int, value: int) -> bytes:
    """A varint field, omitted when zero (proto3 default)."""
    if not value:
        return b""
    return encode_varint(number << 3 | VARINT) + encode_varint(value)


def message_field(number: int, value: bytes) -> bytes:
    """An embedded message field; present even when the message is empty."""
    return encode_varint(number << 3 | LENGTH_DELIMITED) + encode_varint(len(value)) + value


def timestamp(seconds: int, nanos: int) -> bytes:
    """google.protobuf.Timestamp{seconds=1, nanos=2}."""
    return varint_field(1, seconds) + varint_field(2, nanos)
