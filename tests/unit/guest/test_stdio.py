"""Bounded output buffers and the stdin writer, over real pipes."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import tempfile

import pytest

from guest.agent.stdio import DEFAULT_LIMIT, READ_CHUNK, InputPipe, OutputBuffer, grow_pipe


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


def test_grow_pipe_gives_room_for_a_whole_reply_and_tolerates_what_is_no_pipe() -> None:
    r, w = os.pipe()
    try:
        grow_pipe(r)
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) >= DEFAULT_LIMIT
    finally:
        os.close(r)
        os.close(w)
    with tempfile.TemporaryFile() as regular:
        grow_pipe(regular.fileno())  # EBADF from the kernel: kept as it is, no error


async def test_one_wakeup_drains_the_pipe_in_order() -> None:
    """A grown pipe holding several READ_CHUNKs is read out at one wakeup: the next read
    returns all of it (one ReadStdout reply, not one per 64 KiB), every byte in order."""
    r, w = os.pipe()
    grow_pipe(r)
    payload = os.urandom(5 * READ_CHUNK + 123)
    assert os.write(w, payload) == len(payload)  # fits: the pipe holds 1 MiB
    os.close(w)
    buffer = OutputBuffer(r)
    first = await buffer.read(DEFAULT_LIMIT)
    assert len(first) == len(payload)
    rest = b""
    while chunk := await buffer.read(DEFAULT_LIMIT):
        rest += chunk
    assert hashlib.sha256(first + rest).digest() == hashlib.sha256(payload).digest()
    assert buffer.at_eof


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
