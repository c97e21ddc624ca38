"""The shim's errors: the shared hierarchy of :mod:`protocols.errors`, and the one table that
gives any exception its status code.

Domain code raises the typed errors; both transports (gRPC and ttrpc) turn them into a status
through :func:`status_code`, so containerd sees the same code whichever wire it speaks.
containerd acts on the code (NotFound after Kill means "already gone", Unimplemented after
Create means "downgrade to task v2"), so nothing may collapse to Unknown by accident.

This module imports nothing heavy: ``start`` may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from protocols.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RpcError,
    Unavailable,
    Unimplemented,
    error_for,
)
from protocols.status import Code

__all__ = [
    "AlreadyExists", "DeadlineExceeded", "FailedPrecondition", "Internal", "InvalidArgument",
    "NotFound", "PermissionDenied", "ResourceExhausted", "RpcError", "StatusCode",
    "Unavailable", "Unimplemented", "error_for", "status_code",
]

# The google.rpc / gRPC status codes, as both gRPC and ttrpc carry them.
StatusCode = Code

# Exceptions that are not RpcErrors but still have an obvious meaning.
OTHER_CODES: Final[Mapping[type[BaseException], StatusCode]] = {
    TimeoutError: StatusCode.DEADLINE_EXCEEDED,
    NotImplementedError: StatusCode.UNIMPLEMENTED,
}


def status_code(exc: BaseException) -> StatusCode:
    """The status code for ``exc``: its own for an RpcError, else the entry of its nearest
    class in OTHER_CODES, else UNKNOWN."""
    if isinstance(exc, RpcError):
        return exc.code
    for cls in type(exc).__mro__:
        code = OTHER_CODES.get(cls)
        if code is not None:
            return code
    return StatusCode.UNKNOWN
