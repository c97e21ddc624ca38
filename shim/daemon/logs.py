"""The daemon's log: logrus text lines on the bundle's ``log`` FIFO, which containerd copies
into its own log."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from pathlib import Path
from typing import Final

LEVELS: Final = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
                 logging.ERROR: "error", logging.CRITICAL: "fatal"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogrusFormatter(logging.Formatter):
    """``time="2026-01-02T03:04:05.123456789Z" level=info msg="..." runtime=...``."""

    def __init__(self, **fields: str) -> None:
        super().__init__()
        self._fields = fields

    def format(self, record: logging.LogRecord) -> str:
        ns = int(record.created * 1e9)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000))
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        extra = "".join(f" {k}={_quote(v)}" for k, v in self._fields.items())
        level = LEVELS.get(record.levelno, "info")
        return f'time="{stamp}.{ns % 1_000_000_000:09d}Z" level={level} msg={_quote(message)}' \
               f"{extra}\n"


class FifoHandler(logging.Handler):
    """Writes records to a non-blocking fd; a full FIFO drops lines instead of stalling."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self._fd, self.format(record).encode())
        except (BlockingIOError, BrokenPipeError):
            pass
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
        super().close()


def setup_logging(bundle: Path, debug: bool, task_id: str) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        fd = os.open(bundle / "log", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.ENXIO):  # no log FIFO or nobody reading it
            raise
        root.addHandler(logging.NullHandler())
        return
    # hpack (under grpclib's h2) logs every header it encodes at debug: keep it out of
    # containerd's log when the shim runs with -debug.
    logging.getLogger("hpack").setLevel(logging.WARNING)
    handler = FifoHandler(fd)
    handler.setFormatter(LogrusFormatter(runtime="io.containerd.coco.v2", id=task_id))
    root.addHandler(handler)
