"""Streaming zstd decompression through the image's own ``libzstd.so.1`` (ctypes).

The guest image carries libzstd (a dependency of its Debian packages) but no Python binding, so
this binds the four functions of zstd's streaming API it needs: ``ZSTD_createDCtx``,
``ZSTD_DCtx_setParameter`` (the window limit bounds the decoder's memory), ``ZSTD_decompressStream``
and ``ZSTD_freeDCtx``. Concatenated frames decode as one stream, as ``zstd -d`` does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

from guest.agent.errors import DataLoss, Unimplemented

LIBRARY = "libzstd.so.1"
D_WINDOW_LOG_MAX = 100  # ZSTD_d_windowLogMax
WINDOW_LOG_MAX = 27  # 128 MiB, zstd's own default limit: the decoder's memory bound


class _Buffer(ctypes.Structure):
    """ZSTD_inBuffer / ZSTD_outBuffer: {pointer, size, pos}."""

    _fields_ = (("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t))


_lib: Any = None


def _library(what: str) -> Any:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL(LIBRARY)
        except OSError as err:
            raise Unimplemented(f"{what} is zstd-compressed and {LIBRARY} is missing") from err
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_createDCtx.argtypes = ()
        lib.ZSTD_freeDCtx.restype = ctypes.c_size_t
        lib.ZSTD_freeDCtx.argtypes = (ctypes.c_void_p,)
        lib.ZSTD_DCtx_setParameter.restype = ctypes.c_size_t
        lib.ZSTD_DCtx_setParameter.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
        lib.ZSTD_decompressStream.restype = ctypes.c_size_t
        lib.ZSTD_decompressStream.argtypes = (
            ctypes.c_void_p,
            ctypes.POINTER(_Buffer),
            ctypes.POINTER(_Buffer),
        )
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_isError.argtypes = (ctypes.c_size_t,)
        lib.ZSTD_getErrorName.restype = ctypes.c_char_p
        lib.ZSTD_getErrorName.argtypes = (ctypes.c_size_t,)
        _lib = lib
    return _lib


class ZstdDecompressor:
    """zlib.decompressobj's shape: ``decompress(data, max_length)`` keeps the input it did not
    consume in ``unconsumed_tail``; ``frame_done`` says the last frame ended cleanly."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._lib = _library(what)
        self._ctx = self._lib.ZSTD_createDCtx()
        if not self._ctx:
            raise DataLoss(f"{what}: cannot create a zstd decoder")
        self._check(self._lib.ZSTD_DCtx_setParameter(self._ctx, D_WINDOW_LOG_MAX, WINDOW_LOG_MAX))
        self.unconsumed_tail = b""
        self.frame_done = True  # no frame started yet

    def _check(self, code: int) -> int:
        if self._lib.ZSTD_isError(code):
            name = self._lib.ZSTD_getErrorName(code).decode(errors="replace")
            raise DataLoss(f"{self.what}: corrupt zstd data: {name}")
        return code

    def decompress(self, data: bytes, max_length: int) -> bytes:
        source = ctypes.create_string_buffer(data, len(data))
        target = ctypes.create_string_buffer(max_length)
        inp = _Buffer(ctypes.cast(source, ctypes.c_void_p), len(data), 0)
        out = _Buffer(ctypes.cast(target, ctypes.c_void_p), max_length, 0)
        while out.pos < out.size:
            before = (inp.pos, out.pos)
            hint = self._check(
                self._lib.ZSTD_decompressStream(self._ctx, ctypes.byref(out), ctypes.byref(inp))
            )
            if (inp.pos, out.pos) == before:
                break  # needs more input
            self.frame_done = hint == 0  # 0: a frame ended and everything is flushed
        self.unconsumed_tail = data[inp.pos :]
        return target.raw[: out.pos]

    def close(self) -> None:
        if self._ctx:
            self._lib.ZSTD_freeDCtx(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()
