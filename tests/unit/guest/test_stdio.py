"""Bounded output buffers and the stdin writer, over real pipes."""

from __future__ import annotations

import asyncio
import os

import pytest

from guest.agent.stdio import InputPipe, OutputBuffer


async def test_reads_wait_for_data_then_eof() -> None:
    r, w = os.pipe()
    buffer = OutputBuffer(r, limit=1024)
    pending = asyncio.ensure_future(buffer.read(100))
    await asyncio.sleep(0.05)
    assert not pending.done()  # blocks until data
    os.write(w, b"hello")
    assert await pending == b"hello"
    os.close(w)
    assert await buffer.read(100) == b""
    assert buffer.at_eof


async def test_buffer_is_bounded_and_applies_backpressure() -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    buffer = OutputBuffer(r, limit=4096)
    written = 0
    for _ in range(200):  # far more than limit + the pipe's own capacity
        try:
            written += os.write(w, b"x" * 4096)
        except BlockingIOError:
            await asyncio.sleep(0.01)
    assert buffer.buffered <= 4096
    total = 0
    while total < written:
        chunk = await buffer.read(1 << 20)
        assert 0 < len(chunk) <= 4096
        total += len(chunk)
    assert total == written
    os.close(w)
    assert await buffer.read(10) == b""


async def test_read_size_zero_means_up_to_the_limit() -> None:
    r, w = os.pipe()
    buffer = OutputBuffer(r, limit=8)
    os.write(w, b"0123456789")
    await asyncio.sleep(0.05)
    assert await buffer.read(0) == b"01234567"
    assert await buffer.read(0) == b"89"
    os.close(w)
    buffer.close()


async def test_close_wakes_readers() -> None:
    r, w = os.pipe()
    buffer = OutputBuffer(r)
    pending = asyncio.ensure_future(buffer.read(10))
    await asyncio.sleep(0.01)
    buffer.close()
    assert await pending == b""
    os.close(w)


async def test_stdin_write_and_close() -> None:
    r, w = os.pipe()
    stdin = InputPipe(w)
    assert await stdin.write(b"abc") == 3
    stdin.close()
    assert stdin.closed
    assert os.read(r, 10) == b"abc"
    assert os.read(r, 10) == b""  # EOF for the process
    os.close(r)
    with pytest.raises(BrokenPipeError):
        await stdin.write(b"more")


async def test_stdin_write_larger_than_the_pipe_waits_for_the_reader() -> None:
    r, w = os.pipe()
    stdin = InputPipe(w)
    data = b"y" * (1 << 20)
    writer = asyncio.ensure_future(stdin.write(data))
    received = b""
    while len(received) < len(data):
        await asyncio.sleep(0)
        received += await asyncio.to_thread(os.read, r, 1 << 16)
    assert await writer == len(data)
    assert received == data
    stdin.close()
    os.close(r)
