"""The stdio relay with real FIFOs: byte-exact, ordered, back-pressured, EOF-correct."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
from pathlib import Path

import pytest

from protocols.api.kata import oci_pb2
from shim.task.stdio import CHUNK, PIPE_SIZE, ProcessIO, open_fifo
from tests.unit.shim.fakes import FakeAgent
from tests.unit.shim.helpers import Owner, make_fifos, read_to_eof, write_fifo


async def _sandbox_with(cid: str) -> FakeAgent:
    sandbox = FakeAgent()
    await sandbox.create_container(cid, oci_pb2.Spec(), [])
    return sandbox


async def test_8_mib_stream_is_copied_byte_exact_and_in_order(tmp_path: Path) -> None:
    sandbox = await _sandbox_with("c")
    process = sandbox.process("c")
    process.stdout.max_buffer = 256 * 1024  # the guest blocks when nobody reads: back-pressure
    fifos = make_fifos(tmp_path)
    payload = os.urandom(8 * 1024 * 1024)
    err_payload = b"".join(b"line %d\n" % i for i in range(20000))
    out_reader = asyncio.create_task(read_to_eof(fifos.stdout))
    err_reader = asyncio.create_task(read_to_eof(fifos.stderr))
    owner = Owner()
    io = ProcessIO(sandbox, "c", "", stdout=str(fifos.stdout), stderr=str(fifos.stderr))
    io.open()
    io.start(owner.spawn)

    async def guest() -> None:
        for offset in range(0, len(payload), 100_003):  # odd chunk size on purpose
            await process.stdout.feed(payload[offset : offset + 100_003])
        await process.stderr.feed(err_payload)
        await sandbox.finish("c")

    await asyncio.gather(guest(), io.output_done())
    out, err = await asyncio.gather(out_reader, err_reader)
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert out == payload
    assert err == err_payload
    await io.aclose()
    await owner.aclose()


async def test_output_done_waits_for_a_slow_reader(tmp_path: Path) -> None:
    sandbox = await _sandbox_with("c")
    fifos = make_fifos(tmp_path)
    owner = Owner()
    fd = os.open(fifos.stdout, os.O_RDONLY | os.O_NONBLOCK)  # containerd's reader, idle
    io = ProcessIO(sandbox, "c", "", stdout=str(fifos.stdout))
    io.open()
    io.start(owner.spawn)
    # More than the relay holds: the grown pipe (1 MiB), the chunk being written, the one
    # read ahead.
    payload = b"x" * (4 << 20)
    await sandbox.process("c").stdout.feed(payload)
    await sandbox.finish("c")
    done = asyncio.create_task(io.output_done())
    await asyncio.sleep(0.1)
    assert not done.done()  # the relay is blocked on the full pipe
    received = bytearray()
    while len(received) < len(payload):
        try:
            received += os.read(fd, 1 << 16)
        except BlockingIOError:
            await asyncio.sleep(0.001)
    await asyncio.wait_for(done, 5)
    assert bytes(received) == payload
    os.close(fd)
    await io.aclose()
    await owner.aclose()


async def test_stdin_is_relayed_then_closed_on_close_io(tmp_path: Path) -> None:
    sandbox = await _sandbox_with("c")
    sandbox.process("c").echo = True
    fifos = make_fifos(tmp_path)
    owner = Owner()
    out_reader = asyncio.create_task(read_to_eof(fifos.stdout))
    io = ProcessIO(sandbox, "c", "", stdin=str(fifos.stdin), stdout=str(fifos.stdout))
    io.open()
    io.start(owner.spawn)
    data = os.urandom(300_000)
    await write_fifo(fifos.stdin, data)
    await io.close_stdin()  # CloseIO: everything written before it still arrives
    assert sandbox.process("c").stdin_closed
    assert bytes(sandbox.process("c").stdin) == data
    await io.output_done()
    assert await out_reader == data
    await io.aclose()
    await owner.aclose()


async def test_streams_nobody_asked_for_are_drained(tmp_path: Path) -> None:
    sandbox = await _sandbox_with("c")
    owner = Owner()
    io = ProcessIO(sandbox, "c", "")
    io.open()
    io.start(owner.spawn)
    await sandbox.process("c").stdout.feed(b"ignored" * 1000)
    await sandbox.finish("c")
    await asyncio.wait_for(io.output_done(), 2)
    await io.aclose()
    await owner.aclose()


async def test_terminal_has_no_stderr_relay(tmp_path: Path) -> None:
    sandbox = await _sandbox_with("c")
    fifos = make_fifos(tmp_path)
    owner = Owner()
    io = ProcessIO(sandbox, "c", "", stdout=str(fifos.stdout), stderr=str(fifos.stderr),
                   terminal=True)
    io.open()
    io.start(owner.spawn)
    await sandbox.process("c").stdout.close()  # stderr never ends: it must not be awaited
    await asyncio.wait_for(io.output_done(), 2)
    await io.aclose()
    await owner.aclose()



async def test_close_io_before_start_is_honoured(tmp_path: Path) -> None:
    sandbox = await _sandbox_with("c")
    sandbox.process("c").echo = True
    fifos = make_fifos(tmp_path)
    owner = Owner()
    out_reader = asyncio.create_task(read_to_eof(fifos.stdout))
    io = ProcessIO(sandbox, "c", "", stdin=str(fifos.stdin), stdout=str(fifos.stdout))
    io.open()
    await write_fifo(fifos.stdin, b"short input\n")
    await io.close_stdin()  # `ctr run`: stdin hit EOF before the task was even started
    io.start(owner.spawn)
    await asyncio.wait_for(io.output_done(), 5)
    assert sandbox.process("c").stdin_closed
    assert await out_reader == b"short input\n"
    await io.aclose()
    await owner.aclose()


async def test_stdin_ends_when_containerd_closes_its_writer(tmp_path: Path) -> None:
    sandbox = await _sandbox_with("c")
    sandbox.process("c").echo = True
    fifos = make_fifos(tmp_path)
    owner = Owner()
    out_reader = asyncio.create_task(read_to_eof(fifos.stdout))
    io = ProcessIO(sandbox, "c", "", stdin=str(fifos.stdin), stdout=str(fifos.stdout))
    io.open()
    io.start(owner.spawn)
    await asyncio.sleep(0.1)  # no writer yet: that is not the end of stdin
    assert not sandbox.process("c").stdin_closed
    await write_fifo(fifos.stdin, b"piped into `ctr run`\n")  # writes, then closes
    await asyncio.wait_for(io.output_done(), 5)
    assert sandbox.process("c").stdin_closed
    assert await out_reader == b"piped into `ctr run`\n"
    await io.aclose()
    await owner.aclose()


@pytest.mark.parametrize("which", ["stdin", "stdout", "stderr"])
def test_only_fifos_are_opened_as_stdio(tmp_path: Path, which: str) -> None:
    """A regular file, a device or a symlink named as stdio is refused, never written over."""
    fifos = make_fifos(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = tmp_path / "link"
    link.symlink_to(fifos.stdout)
    for bad in (str(victim), "/dev/null", str(link)):
        paths = {"stdin": str(fifos.stdin), "stdout": str(fifos.stdout),
                 "stderr": str(fifos.stderr), which: bad}
        io = ProcessIO(FakeAgent(), "c1", "", stdin=paths["stdin"], stdout=paths["stdout"],
                       stderr=paths["stderr"])
        with pytest.raises(OSError, match="is not a FIFO"):
            io.open()
        assert io._fds == []  # what was opened before the refusal is closed again
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("uri", ["binary:///usr/bin/logger?x=1", "file:///var/log/c1.log"])
def test_log_uris_are_refused_by_name(tmp_path: Path, uri: str) -> None:
    io = ProcessIO(FakeAgent(), "c1", "", stdout=uri)
    with pytest.raises(OSError, match=r"log URIs \(binary://, file://\) are not supported"):
        io.open()
    assert not Path("/var/log/c1.log").exists()


async def test_output_fifo_pipe_is_grown_to_one_chunk(tmp_path: Path) -> None:
    """The output FIFO holds a whole agent chunk: one write per chunk, not sixteen."""
    fifos = make_fifos(tmp_path)
    fd = open_fifo(str(fifos.stdout))
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) == PIPE_SIZE == CHUNK
    finally:
        os.close(fd)


async def test_read_ahead_keeps_order_and_one_read_in_flight(tmp_path: Path) -> None:
    """The next chunk is asked for while the last one is written, never two at once, and the
    chunks reach the FIFO in the order they were read."""
    in_flight = 0
    most = 0
    chunks = [bytes([n]) * 100_000 for n in range(40)]

    class Streams:
        async def read_stdout(self, container_id: str, exec_id: str, size: int) -> bytes:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.001)
            in_flight -= 1
            return chunks.pop(0) if chunks else b""

        async def read_stderr(self, container_id: str, exec_id: str, size: int) -> bytes:
            return b""

        async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
            return len(data)

        async def close_stdin(self, container_id: str, exec_id: str) -> None:
            return None

    expected = b"".join(chunks)
    fifos = make_fifos(tmp_path)
    fd = os.open(fifos.stdout, os.O_RDONLY | os.O_NONBLOCK)
    owner = Owner()
    io = ProcessIO(Streams(), "c", "", stdout=str(fifos.stdout))
    io.open()
    io.start(owner.spawn)
    received = bytearray()
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            await asyncio.sleep(0.001)
            continue
        if not chunk:
            break
        received += chunk
    await asyncio.wait_for(io.output_done(), 5)
    assert bytes(received) == expected
    assert most == 1
    os.close(fd)
    await io.aclose()
    await owner.aclose()
