"""Two threads per layer: one fetches and verifies the blob, the other unpacks it.

A layer used to be one thread pulling bytes through nested readers (socket → blob digest →
inflate → diff ID → tar → writes), every stage waiting for the others. Here the stream is cut
after the blob digest: a *fetch* thread receives and hashes the blob and hands its chunks
through a :class:`Channel` (bounded: at most ``depth`` chunks in flight, so the agent's memory
stays bounded whatever the speeds) to the *unpack* side, which inflates, hashes the tar (diff
ID) and writes the files. hashlib, zlib and file writes release the GIL on large buffers, so
with a second CPU the two sides overlap; with one, the cost is a queue hand-off per MiB.

Verification is unchanged: :meth:`Channel.read` gives the reader its end of stream only once
the writer has verified the blob's size and digest (:meth:`Channel.finish`), and a writer's
error (a digest mismatch, the registry failing, the pull cancelled) is raised in the reader.
A reader that gives up (:meth:`Channel.close_reader`) unblocks the writer, whose later
:meth:`Channel.put` raises :class:`ReaderGone`.

Each side has its own :class:`~.timing.PhaseTimer`: time blocked on the other side is charged
to its ``wait`` phase (the fetch side waiting for room: unpacking is the bottleneck; the unpack
side waiting for data: the network or the blob digest is).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from guest.image_pull.timing import PhaseTimer


class ReaderGone(Exception):
    """The reading side stopped (it failed or was cancelled): the writer should stop too."""


class Channel:
    """A bounded, ordered hand-off of byte chunks from one writer thread to one reader thread;
    the reader's end is file-like (:meth:`read`)."""

    def __init__(
        self,
        depth: int,
        writer_timer: PhaseTimer | None = None,
        reader_timer: PhaseTimer | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError(f"channel depth must be at least 1, got {depth}")
        self.depth = depth
        self._chunks: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._finished = False
        self._error: BaseException | None = None
        self._reader_gone = False
        self._current = b""
        self._offset = 0
        self._writer_timer = writer_timer if writer_timer is not None else PhaseTimer()
        self._reader_timer = reader_timer if reader_timer is not None else PhaseTimer()

    # -- writer side -------------------------------------------------------------------------

    def put(self, chunk: bytes) -> None:
        """Queue a chunk, blocking while ``depth`` are queued; ReaderGone if the reader left."""
        if not chunk:
            return
        with self._changed:
            if len(self._chunks) >= self.depth and not self._reader_gone:
                previous = self._writer_timer.enter("wait")
                try:
                    self._changed.wait_for(
                        lambda: len(self._chunks) < self.depth or self._reader_gone
                    )
                finally:
                    self._writer_timer.leave(previous)
            if self._reader_gone:
                raise ReaderGone("the unpacking side stopped")
            if self._finished:
                raise RuntimeError("put() after finish()")
            self._chunks.append(chunk)
            self._changed.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        """The writer is done: the reader gets end of stream after the queued chunks, or
        ``error`` (raised in the reader as soon as it reads, queued chunks dropped)."""
        with self._changed:
            if self._finished:
                return
            self._finished = True
            self._error = error
            if error is not None:
                self._chunks.clear()
            self._changed.notify_all()

    # -- reader side -------------------------------------------------------------------------

    def read(self, size: int = -1, /) -> bytes:
        """Up to ``size`` bytes (the rest of the current chunk at most; any size when
        negative); b"" only once the writer finished without error."""
        if self._offset >= len(self._current):
            self._current, self._offset = self._next_chunk(), 0
        end = len(self._current) if size is None or size < 0 else self._offset + size
        out = self._current[self._offset : end]
        self._offset += len(out)
        if self._offset >= len(self._current):
            self._current, self._offset = b"", 0  # let the chunk go
        return out

    def _next_chunk(self) -> bytes:
        with self._changed:
            if not self._chunks and not self._finished:
                previous = self._reader_timer.enter("wait")
                try:
                    self._changed.wait_for(lambda: bool(self._chunks) or self._finished)
                finally:
                    self._reader_timer.leave(previous)
            if self._error is not None:
                raise self._error
            if not self._chunks:
                return b""
            chunk = self._chunks.popleft()
            self._changed.notify_all()
            return chunk

    def drain(self) -> None:
        """Read to the end (dropping the data): returns once the writer verified its stream,
        raises its error otherwise."""
        while self.read():
            pass

    def close_reader(self) -> None:
        """The reader stops: queued chunks are dropped and the writer's next put() raises
        ReaderGone (a blocked one wakes up)."""
        with self._changed:
            self._reader_gone = True
            self._chunks.clear()
            self._current, self._offset = b"", 0
            self._changed.notify_all()

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._chunks)


class Fetcher:
    """The fetch side's thread: ``produce`` writes into the channel (put) and returns when its
    stream is complete and verified; any error it raises is handed to the reader through
    :meth:`Channel.finish`. Owned by the caller: :meth:`join` it (after ``abort`` when the
    reader gave up, so a transfer blocked in the network ends)."""

    def __init__(self, channel: Channel, produce: Callable[[Channel], None], name: str) -> None:
        self.channel = channel
        self._produce = produce
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._produce(self.channel)
        except ReaderGone:
            self.channel.finish()
        except BaseException as err:  # handed over to the reader, which raises it
            self.error = err
            self.channel.finish(err)
        else:
            self.channel.finish()

    def join(self, timeout: float | None = None) -> bool:
        """True once the thread has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
