"""The I/O half of framing that client and server share: reading frames off a stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

from .frame import MAX_DATA_LENGTH, Frame, FrameDecoder, OversizedFrame

log = logging.getLogger(__name__)

# One read() hands the decoder up to this much; many small frames decode per wake-up.
READ_CHUNK = 256 * 1024


async def read_frames(
    reader: asyncio.StreamReader, max_length: int = MAX_DATA_LENGTH, *,
    stop_at_oversized: bool = False,
) -> AsyncGenerator[Frame | OversizedFrame, None]:
    """Yield frames until EOF. A reset, a short header or EOF mid-frame all just end the stream.
    ``stop_at_oversized``: an oversized frame is yielded as soon as its header is read and the
    stream ends there (a peer that claims 4 GiB is not waited for while it sends them)."""
    decoder = FrameDecoder(max_length)
    while True:
        try:
            chunk = await reader.read(READ_CHUNK)
        except OSError as err:  # ConnectionResetError and friends: the peer is gone
            log.debug("ttrpc: read failed, treating as end of stream: %s", err)
            return
        if not chunk:
            if not decoder.at_boundary:
                log.debug(
                    "ttrpc: connection ended mid-frame (%d bytes buffered, %d to skip)",
                    decoder.buffered,
                    decoder.skipping,
                )
            return
        for event in decoder.feed(chunk):
            yield event
        if stop_at_oversized and decoder.discarding is not None:
            yield decoder.discarding
            return
