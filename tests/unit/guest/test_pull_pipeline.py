"""The fetch → unpack pipeline of a layer: order, backpressure, errors on either side,
cancellation; and the puller on it (every blob still verified, nothing half-written kept)."""

from __future__ import annotations

import asyncio
import errno
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guest.agent.errors import DataLoss, DeadlineExceeded, ResourceExhausted
from guest.image_pull import puller as puller_module
from guest.image_pull import unpack as unpack_module
from guest.image_pull.pipeline import Channel, Fetcher, ReaderGone
from guest.image_pull.puller import ImagePuller, Platform
from guest.image_pull.timing import PhaseTimer
from tests.support import oci
from tests.unit.guest.fake_registry import FakeRegistry, serve
from tests.unit.guest.test_image_puller import config

AMD64 = Platform("linux", "amd64")
WAIT = 5.0  # bound on every wait for another thread in these tests


def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def pull_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pull-")]


# -- the channel -----------------------------------------------------------------------------


def test_chunks_arrive_in_order_whatever_the_read_sizes() -> None:
    chunks = [bytes([i]) * (i * 37 + 1) for i in range(40)]
    channel = Channel(3)

    def produce(ch: Channel) -> None:
        for chunk in chunks:
            ch.put(chunk)

    fetcher = Fetcher(channel, produce, "pull-order")
    fetcher.start()
    got = bytearray()
    sizes = iter([1, 5, 4096, -1, 7] * 100)
    while piece := channel.read(next(sizes)):
        got += piece
    assert bytes(got) == b"".join(chunks)
    assert channel.read() == b"" and fetcher.join(WAIT) and fetcher.error is None


def test_a_full_channel_blocks_the_writer_and_charges_its_wait() -> None:
    timer = PhaseTimer()
    channel = Channel(2, writer_timer=timer)
    written: list[int] = []

    def produce(ch: Channel) -> None:
        for i in range(5):
            ch.put(b"x" * 10)
            written.append(i)

    fetcher = Fetcher(channel, produce, "pull-backpressure")
    fetcher.start()
    until(lambda: len(written) == 2)
    time.sleep(0.05)  # the writer had the time to run ahead: it must not have
    assert len(written) == 2 and channel.queued == 2
    assert channel.read() == b"x" * 10  # room for one more
    until(lambda: len(written) == 3)
    assert channel.queued == 2
    channel.drain()
    assert fetcher.join(WAIT) and written == [0, 1, 2, 3, 4]
    assert timer.stop()["wait"] > 0.04


def test_a_writer_error_reaches_the_reader_before_queued_data() -> None:
    channel = Channel(4)

    def produce(ch: Channel) -> None:
        ch.put(b"unverified")
        raise DataLoss("layer sha256:ab: content has digest sha256:cd")

    fetcher = Fetcher(channel, produce, "pull-error")
    fetcher.start()
    assert fetcher.join(WAIT)
    with pytest.raises(DataLoss, match="sha256:cd") as info:
        channel.read()
    assert info.value is fetcher.error
    with pytest.raises(DataLoss):  # and again: no end of stream ever follows an error
        channel.drain()


def test_the_reader_leaving_stops_a_blocked_writer() -> None:
    channel = Channel(1)
    outcome: list[str] = []

    def produce(ch: Channel) -> None:
        try:
            while True:
                ch.put(b"y")
        except ReaderGone:
            outcome.append("stopped")
            raise

    fetcher = Fetcher(channel, produce, "pull-reader-gone")
    fetcher.start()
    until(lambda: channel.queued == 1)
    channel.close_reader()
    assert fetcher.join(WAIT) and outcome == ["stopped"] and fetcher.error is None
    assert channel.queued == 0


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Channel(0)


# -- the puller on the pipeline ---------------------------------------------------------------


def big_image(size: int = 6 << 20) -> oci.Image:
    """One gzip layer of several pipeline chunks (incompressible)."""
    data = random.Random(7).randbytes(size)
    layer = oci.Layer.gzip(oci.TarBuilder().file("big.bin", data).bytes(), level=1)
    return oci.Image((layer,), {"Cmd": ["sh"]})


@pytest.fixture
def log_lines(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level("INFO", logger="guest.image_pull.puller")
    yield caplog


async def test_a_layer_of_many_chunks_is_unpacked_whole_and_timed_per_side(
    tmp_path: Path, log_lines: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(puller_module, "PIPELINE_DEPTH", 1)  # the tightest channel
    image = big_image()
    with serve(FakeRegistry()) as registry:
        registry.add_image("big", "1", image)
        pulled = await ImagePuller(config(tmp_path, registry.host), AMD64).pull(
            f"{registry.host}/big:1")
    assert (pulled.layers[0] / "big.bin").read_bytes() == random.Random(7).randbytes(6 << 20)
    line = next(r.getMessage() for r in log_lines.records if "entries" in r.getMessage())
    match = re.search(r"\(fetch: network [0-9.]+, digest [0-9.]+, wait [0-9.]+, other [0-9.]+; "
                      r"unpack: inflate [0-9.]+, diff_id [0-9.]+, write [0-9.]+, wait [0-9.]+, "
                      r"other [0-9.]+\)$", line)
    assert match, line
    assert pull_threads() == []


async def test_a_corrupt_big_blob_fails_naming_it_and_leaves_nothing(tmp_path: Path) -> None:
    image = big_image()
    digest = image.layers[0].digest
    with serve(FakeRegistry()) as registry:
        registry.add_image("big", "1", image)
        blob = bytearray(registry.blobs[digest])
        blob[-100] ^= 0x01  # late in the stream: most of the layer is unpacked by then
        registry.blobs[digest] = bytes(blob)
        puller = ImagePuller(config(tmp_path, registry.host), AMD64)
        with pytest.raises(DataLoss) as info:
            await puller.pull(f"{registry.host}/big:1")
    assert digest in str(info.value) and "big:1" in str(info.value)
    assert "content has digest" in str(info.value)  # the cause, not the gzip symptom
    assert puller.store.layers() == [] and puller.store.staging_entries() == []
    assert pull_threads() == []


async def test_an_unpack_failure_stops_a_fetch_stalled_in_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills while the registry is stalled mid-blob: the pull fails at once (not
    after the 60 s socket timeout) with the cause, and no thread or staging is left."""

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(unpack_module, "_write_all", full)
    with serve(FakeRegistry(stall_blobs_after=5 << 19)) as registry:
        registry.add_image("big", "1", big_image())
        puller = ImagePuller(config(tmp_path, registry.host), AMD64)
        started = time.monotonic()
        with pytest.raises(ResourceExhausted, match="No space left"):
            await puller.pull(f"{registry.host}/big:1")
        assert time.monotonic() - started < WAIT
        assert pull_threads() == []
    assert puller.store.layers() == [] and puller.store.staging_entries() == []


async def test_cancelling_a_pull_stalled_mid_blob_ends_both_sides(tmp_path: Path) -> None:
    with serve(FakeRegistry(stall_blobs_after=5 << 19)) as registry:
        registry.add_image("big", "1", big_image())
        puller = ImagePuller(config(tmp_path, registry.host), AMD64)
        task = asyncio.create_task(puller.pull(f"{registry.host}/big:1"))
        deadline = time.monotonic() + WAIT
        while not list((puller.store.root / "staging").glob("*/fs/big.bin")):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the unpack side now waits for data, the fetch side for
        # the network
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 2
        assert pull_threads() == []
    assert puller.store.layers() == [] and puller.store.staging_entries() == []


async def test_a_pull_deadline_ends_a_stalled_blob_transfer(tmp_path: Path) -> None:
    with serve(FakeRegistry(stall_blobs_after=5 << 19)) as registry:
        registry.add_image("big", "1", big_image())
        puller = ImagePuller(config(tmp_path, registry.host, timeout=1.0), AMD64)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"within 1 s"):
            await puller.pull(f"{registry.host}/big:1")
        assert time.monotonic() - started < 3
        assert pull_threads() == []
    assert puller.store.staging_entries() == []
