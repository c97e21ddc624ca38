"""ConsoleWatch: the guest console's last lines, and the first line saying the guest failed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hypervisor.caplog import CappedLog
from hypervisor.console import MAX_LINE, ConsoleWatch, is_failure


@pytest.mark.parametrize("line", [
    'coco-init: boot step "modules" exited with status 1; modprobe: x',
    "coco-agent: guest failed to start: init's boot step hung: step \"drivers\" did not ...",
    "coco-agent: guest refused to start: initdata on /dev/vda: bad",
    "[    2.5] Kernel panic - not syncing: VFS: Unable to mount root fs",
    "coco-init: mounting the API filesystems failed; powering off",
])
def test_what_counts_as_a_failure(line: str) -> None:
    assert is_failure(line)


@pytest.mark.parametrize("line", [
    "[    1.0] coco-init: stage 2",  # a milestone echoed by a verbose console
    "coco-agent: ready (uptime 3.1 s)",
    "[    0.0] Linux version 6.12 ... powering off soon",
    "some workload said: coco-init: boot stepping",
])
def test_what_does_not(line: str) -> None:
    assert not is_failure(line)


async def test_lines_split_across_chunks_are_whole_and_the_first_failure_wins() -> None:
    watch = ConsoleWatch()
    for chunk in (b"boot\r\ncoco-init: boot st", b'ep "drivers" exited with status 1; e',
                  b"rr\n", b"coco-agent: guest failed to start: later\n"):
        watch.feed(chunk)
    assert watch.failure.done()
    assert watch.failure.result() == 'coco-init: boot step "drivers" exited with status 1; err'
    assert watch.tail() == ("boot | coco-init: boot step \"drivers\" exited with status 1; err"
                            " | coco-agent: guest failed to start: later")


async def test_a_line_without_end_is_capped() -> None:
    watch = ConsoleWatch()
    for _ in range(100):
        watch.feed(b"x" * 1000)
    watch.feed(b"\n")
    assert watch.tail() == "x" * MAX_LINE


async def test_caplog_feeds_every_byte_even_past_its_cap(tmp_path: Path) -> None:
    watch = ConsoleWatch()
    log = CappedLog(tmp_path / "console.log", limit=10, watch=watch.feed)
    write_end = log.pipe()
    try:
        import os

        os.write(write_end, b"0123456789 beyond the cap\n")
        os.write(write_end, b"Kernel panic - not syncing: x\n")
    finally:
        os.close(write_end)
    async with asyncio.timeout(5):
        await watch.failure
    log.close()
    assert watch.tail() == "0123456789 beyond the cap | Kernel panic - not syncing: x"
    assert (tmp_path / "console.log").read_bytes().startswith(b"0123456789\n[coco-shim: log")
