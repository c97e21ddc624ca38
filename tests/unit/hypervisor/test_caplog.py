"""Capped logs: what a guest can make the host write stops at the cap (Fix 7)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from hypervisor.caplog import CappedLog


async def _until(done: Callable[[], bool]) -> None:
    for _ in range(500):
        if done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the log did not take everything within 5 s")


async def test_a_child_flooding_its_pipe_is_capped(tmp_path: Path) -> None:
    log = CappedLog(tmp_path / "qemu.stderr.log", limit=4096)
    write_end = log.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", "yes flood | head -c 1000000", stdout=write_end, stderr=write_end)
    finally:
        os.close(write_end)
    assert await proc.wait() == 0
    await _until(lambda: log.written + log.dropped == 1_000_000)
    log.close()  # idempotent after the end of file closed it
    text = (tmp_path / "qemu.stderr.log").read_bytes()
    assert text.startswith(b"flood\nflood\n")
    assert len(text) < 4096 + 100
    assert text.endswith(b"[coco-shim: log capped at 4096 bytes, 995904 more dropped]\n")
    assert oct((tmp_path / "qemu.stderr.log").stat().st_mode & 0o777) == "0o600"


async def test_a_fifo_never_blocks_its_writer_past_the_cap(tmp_path: Path) -> None:
    log = CappedLog(tmp_path / "console.log", limit=100)
    log.fifo(tmp_path / "console.pipe")
    writer = os.open(tmp_path / "console.pipe", os.O_WRONLY | os.O_NONBLOCK)
    try:
        for _ in range(64):  # 4 MiB: far beyond the pipe buffer, read and dropped as it comes
            data = memoryview(b"x" * 65536)
            while data:
                try:
                    data = data[os.write(writer, data):]
                except BlockingIOError:
                    await asyncio.sleep(0.001)
    finally:
        os.close(writer)
    await _until(lambda: log.written + log.dropped == 64 * 65536)
    log.close()
    assert (tmp_path / "console.log").read_bytes().startswith(b"x" * 100 + b"\n[coco-shim")


async def test_close_keeps_what_the_writer_left_in_the_fifo(tmp_path: Path) -> None:
    """The guest's last console line (written just before QEMU exits) is not lost when the
    launcher closes the log before the loop got to it."""
    log = CappedLog(tmp_path / "console.log")
    log.fifo(tmp_path / "console.pipe")
    writer = os.open(tmp_path / "console.pipe", os.O_WRONLY | os.O_NONBLOCK)
    os.write(writer, b"COCO-GUEST-READY\n")
    os.close(writer)
    log.close()  # no loop iteration in between
    assert (tmp_path / "console.log").read_bytes() == b"COCO-GUEST-READY\n"
