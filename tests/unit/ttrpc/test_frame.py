"""Frame encoding and the incremental decoder, including property tests."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.api.ttrpc.ttrpc_pb2 import Request
from protocols.ttrpc.frame import (
    HEADER_LENGTH,
    MAX_DATA_LENGTH,
    Frame,
    FrameDecoder,
    FrameType,
    OversizedFrame,
    encode_frame,
    encode_header,
)


def test_header_layout_is_big_endian_length_stream_type_flags() -> None:
    assert encode_header(0x01020304, 0x0A0B0C0D, 2, 0x05) == bytes.fromhex(
        "01020304 0a0b0c0d 02 05"
    )


def test_known_request_frame_bytes() -> None:
    envelope = Request(service="s", method="m").SerializeToString()
    assert envelope == b"\x0a\x01s\x12\x01m"
    frame = encode_frame(1, FrameType.REQUEST, 0, envelope)
    assert frame == b"\x00\x00\x00\x06\x00\x00\x00\x01\x01\x00\x0a\x01s\x12\x01m"
    assert FrameDecoder().feed(frame) == [Frame(1, FrameType.REQUEST, 0, envelope)]


def test_encode_refuses_oversized_data() -> None:
    encode_frame(1, FrameType.REQUEST, 0, bytes(MAX_DATA_LENGTH))
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(1, FrameType.REQUEST, 0, bytes(MAX_DATA_LENGTH + 1))


def test_decoder_handles_split_header_and_several_frames_per_chunk() -> None:
    wire = (
        encode_frame(1, 1, 0, b"one")
        + encode_frame(3, 1, 0, b"")
        + encode_frame(5, 3, 0x5, b"three")
    )
    decoder = FrameDecoder()
    assert decoder.feed(wire[:4]) == []
    assert decoder.feed(wire[4:15]) == [Frame(1, 1, 0, b"one")]
    assert not decoder.at_boundary
    assert decoder.feed(wire[15:]) == [Frame(3, 1, 0, b""), Frame(5, 3, 0x5, b"three")]
    assert decoder.at_boundary and decoder.buffered == 0


def test_oversized_frame_is_skipped_without_buffering_it() -> None:
    decoder = FrameDecoder()
    claimed = MAX_DATA_LENGTH + 1
    assert decoder.feed(encode_header(claimed, 7, 1, 0)) == []
    chunk = bytes(1 << 20)
    for _ in range(4):
        assert decoder.feed(chunk) == []
        assert decoder.buffered == 0
    assert decoder.skipping == 1
    events = decoder.feed(b"\x00" + encode_frame(9, 1, 0, b"next"))
    assert events == [OversizedFrame(7, 1, 0, claimed), Frame(9, 1, 0, b"next")]
    assert isinstance(events[0], OversizedFrame)
    assert events[0].error_message() == (
        "message length 4194305 exceed maximum message size of 4194304"
    )


def test_huge_claimed_length_allocates_nothing() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\xff\xff\xff\xff\x00\x00\x00\x01\x01\x00" + b"x" * 100) == []
    assert decoder.buffered == 0
    assert decoder.skipping == 0xFFFFFFFF - 100


# -- properties ---------------------------------------------------------------------------------

SMALL_LIMIT = 48  # small, so random input regularly crosses the oversize path


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_arbitrary_bytes_never_crash_and_stay_bounded(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_length=SMALL_LIMIT)
    consumed = 0

    def account(events: list[Frame | OversizedFrame]) -> None:
        nonlocal consumed
        for event in events:
            if isinstance(event, Frame):
                assert len(event.data) <= SMALL_LIMIT
                consumed += HEADER_LENGTH + len(event.data)
            else:
                assert event.length > SMALL_LIMIT
                consumed += HEADER_LENGTH + event.length

    for chunk in _split(data, cuts):
        account(decoder.feed(chunk))
        # never more than one partial frame held, whatever the claimed lengths
        assert decoder.buffered < HEADER_LENGTH + SMALL_LIMIT
    # finish a frame being skipped; then every byte is either decoded or buffered
    filler = decoder.skipping
    account(decoder.feed(bytes(filler)))
    assert decoder.skipping == 0
    assert consumed + decoder.buffered == len(data) + filler


@settings(max_examples=200)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_arbitrary_bytes_with_the_real_limit_buffer_only_what_arrived(
    data: bytes, cuts: list[int]
) -> None:
    decoder = FrameDecoder()
    for chunk in _split(data, cuts):
        decoder.feed(chunk)
        assert decoder.buffered <= len(data)


frames_strategy = st.lists(
    st.one_of(
        st.builds(
            Frame,
            stream_id=st.integers(0, 0xFFFFFFFF),
            type=st.integers(0, 255),
            flags=st.integers(0, 255),
            data=st.binary(max_size=SMALL_LIMIT),
        ),
        st.builds(
            OversizedFrame,
            stream_id=st.integers(0, 0xFFFFFFFF),
            type=st.integers(0, 255),
            flags=st.integers(0, 255),
            length=st.integers(SMALL_LIMIT + 1, 4 * SMALL_LIMIT),
        ),
    ),
    max_size=12,
)


@settings(max_examples=300)
@given(frames=frames_strategy, cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_valid_frames_round_trip_through_any_chunking(
    frames: list[Frame | OversizedFrame], cuts: list[int]
) -> None:
    wire = b"".join(
        encode_header(len(f.data), f.stream_id, f.type, f.flags) + f.data
        if isinstance(f, Frame)
        else encode_header(f.length, f.stream_id, f.type, f.flags) + b"\xaa" * f.length
        for f in frames
    )
    decoder = FrameDecoder(max_length=SMALL_LIMIT)
    decoded: list[Frame | OversizedFrame] = []
    for chunk in _split(wire, cuts):
        decoded.extend(decoder.feed(chunk))
    assert decoded == frames
    assert decoder.at_boundary
