"""Intel TDX quote (Intel TDX DCAP Quote Generation Library spec, quote format v4 and v5).

A v4 quote is a 48-byte header, the 584-byte TD report body, then the signature data. A v5
quote puts a body descriptor (u16 type, u32 size) after the header; type 2 is the TDX 1.0
body (584 bytes), type 3 the TDX 1.5 body (648 bytes: the 1.0 body + TEE_TCB_SVN2 + MRSERVICETD).

Header: version u16, attestation key type u16, TEE type u32 (0x81 = TDX), QE SVN u16, PCE SVN
u16, QE vendor id 16, user data 20.

TD report body offsets (from its start):

=======  ====  ==================
offset   size  field
=======  ====  ==================
0        16    TEE_TCB_SVN
16       48    MRSEAM
64       48    MRSIGNERSEAM
112      8     SEAMATTRIBUTES
120      8     TDATTRIBUTES
128      8     XFAM
136      48    MRTD
184      48    MRCONFIGID (set by the host at launch: the initdata digest)
232      48    MROWNER
280      48    MROWNERCONFIG
328      4*48  RTMR0..RTMR3
520      64    REPORTDATA
=======  ====  ==================

trustee's TDX verifier reads ``{"cc_eventlog": <base64 or null>, "quote": <base64>}``.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

HEADER_SIZE = 48
BODY_10_SIZE = 584
BODY_15_SIZE = 648
TEE_TYPE_TDX = 0x81
MRCONFIGID_SIZE = 48
_MRTD = 136
_MRCONFIGID = 184
_RTMR0 = 328
_REPORT_DATA = 520


class TdxQuoteError(ValueError):
    pass


@dataclass(frozen=True)
class TdxQuote:
    raw: bytes
    version: int
    body_offset: int

    @classmethod
    def parse(cls, data: bytes) -> TdxQuote:
        if len(data) < HEADER_SIZE + BODY_10_SIZE:
            raise TdxQuoteError(f"a TDX quote is at least {HEADER_SIZE + BODY_10_SIZE} bytes, "
                                f"got {len(data)}")
        version, _key_type, tee_type = struct.unpack_from("<HHI", data, 0)
        if tee_type != TEE_TYPE_TDX:
            raise TdxQuoteError(f"not a TDX quote (TEE type {tee_type:#x}, expected 0x81)")
        if version == 4:
            offset = HEADER_SIZE
        elif version == 5:
            body_type, body_size = struct.unpack_from("<HI", data, HEADER_SIZE)
            expected = {2: BODY_10_SIZE, 3: BODY_15_SIZE}.get(body_type)
            if expected is None or body_size != expected:
                raise TdxQuoteError(f"unsupported v5 quote body type {body_type} "
                                    f"(size {body_size})")
            offset = HEADER_SIZE + 6
            if len(data) < offset + body_size:
                raise TdxQuoteError("the TDX quote is shorter than its body")
        else:
            raise TdxQuoteError(f"unsupported TDX quote version {version}")
        return cls(bytes(data), version, offset)

    def _field(self, offset: int, size: int) -> bytes:
        start = self.body_offset + offset
        return self.raw[start:start + size]

    @property
    def mrtd(self) -> bytes:
        return self._field(_MRTD, 48)

    @property
    def mrconfigid(self) -> bytes:
        return self._field(_MRCONFIGID, MRCONFIGID_SIZE)

    def rtmr(self, index: int) -> bytes:
        if not 0 <= index <= 3:
            raise IndexError(f"RTMR index {index}")
        return self._field(_RTMR0 + 48 * index, 48)

    @property
    def report_data(self) -> bytes:
        return self._field(_REPORT_DATA, 64)

    def evidence(self, cc_eventlog: bytes | None = None) -> dict[str, Any]:
        return {
            "cc_eventlog": base64.b64encode(cc_eventlog).decode() if cc_eventlog else None,
            "quote": base64.b64encode(self.raw).decode(),
        }
