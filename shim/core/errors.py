"""Typed errors of the shim and the one table that maps them to status codes.

Domain code raises these; both transports (gRPC and ttrpc) turn them into a status through
``status_code`` so that containerd sees the same code whichever wire it speaks. containerd acts
on the code (NotFound after Kill means "already gone", Unimplemented after Create means "downgrade
to task v2"), so nothing may collapse to Unknown by accident.

This module imports nothing heavy: ``start`` may use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from protocols.status import Code

# The google.rpc / gRPC status codes, as both gRPC and ttrpc carry them.
StatusCode = Code


class ShimError(Exception):
    """Base class of every error the shim raises on purpose."""


class NotFound(ShimError):
    """No such container, exec process or sandbox (or the process already finished)."""


class AlreadyExists(ShimError):
    """A container or exec id is already in use."""


class FailedPrecondition(ShimError):
    """The operation is not allowed in the object's current state."""


class InvalidArgument(ShimError):
    """The request is malformed (missing id, unreadable spec, bad option)."""


class Unavailable(ShimError):
    """The pod VM or its agent cannot be reached (not booted, gone, connection lost)."""


class DeadlineExceeded(ShimError):
    """A bounded step did not finish in time."""


class Unimplemented(ShimError):
    """The shim does not support this operation (e.g. Checkpoint)."""


STATUS_CODES: Final[Mapping[type[BaseException], StatusCode]] = {
    NotFound: StatusCode.NOT_FOUND,
    AlreadyExists: StatusCode.ALREADY_EXISTS,
    FailedPrecondition: StatusCode.FAILED_PRECONDITION,
    InvalidArgument: StatusCode.INVALID_ARGUMENT,
    Unavailable: StatusCode.UNAVAILABLE,
    DeadlineExceeded: StatusCode.DEADLINE_EXCEEDED,
    Unimplemented: StatusCode.UNIMPLEMENTED,
    # Non-shim exceptions that still have an obvious meaning.
    TimeoutError: StatusCode.DEADLINE_EXCEEDED,
    NotImplementedError: StatusCode.UNIMPLEMENTED,
}


def status_code(exc: BaseException) -> StatusCode:
    """The status code for ``exc``: the entry of its nearest class in STATUS_CODES, else UNKNOWN."""
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return StatusCode.UNKNOWN


def from_status_code(code: int, message: str) -> ShimError:
    """The reverse of STATUS_CODES, for errors that come back from the guest agent: the typed
    error for ``code``, or a plain :class:`ShimError` (UNKNOWN) when none is typed."""
    for cls, mapped in STATUS_CODES.items():
        if mapped == code and issubclass(cls, ShimError):
            return cls(message)
    return ShimError(message)
