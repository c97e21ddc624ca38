"""One error hierarchy for every RPC edge, host and guest: a class per google.rpc status code.

Domain code raises these; an edge reports ``err.code`` with ``str(err)``, and an error that comes
back over the wire becomes its class again through :func:`error_for`, so every code travels
through unchanged (a policy denial stays PERMISSION_DENIED, a full disk RESOURCE_EXHAUSTED).
Free of protobuf imports: the shim's ``start`` path uses it.
"""

from __future__ import annotations

from typing import ClassVar

from protocols.status import Code


class RpcError(Exception):
    """Base of every error raised on purpose; its class names its status code."""

    code: ClassVar[Code] = Code.UNKNOWN


class Unknown(RpcError):
    """No better code applies (what an untyped failure reports)."""


class Cancelled(RpcError):
    code = Code.CANCELLED


class InvalidArgument(RpcError):
    """The request is malformed (missing id, unreadable spec, bad option): names the field."""

    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(RpcError):
    """A bounded step did not finish in time."""

    code = Code.DEADLINE_EXCEEDED


class NotFound(RpcError):
    """No such container, process, sandbox or file."""

    code = Code.NOT_FOUND


class AlreadyExists(RpcError):
    """An id is already in use."""

    code = Code.ALREADY_EXISTS


class PermissionDenied(RpcError):
    """Refused on purpose (e.g. by the agent's policy)."""

    code = Code.PERMISSION_DENIED


class ResourceExhausted(RpcError):
    """Out of something (memory, disk, a size limit)."""

    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(RpcError):
    """Not allowed in the object's current state."""

    code = Code.FAILED_PRECONDITION


class Aborted(RpcError):
    code = Code.ABORTED


class OutOfRange(RpcError):
    code = Code.OUT_OF_RANGE


class Unimplemented(RpcError):
    """The operation is not supported."""

    code = Code.UNIMPLEMENTED


class Internal(RpcError):
    """Something on the serving side broke (a tool it drives failed, a mount failed)."""

    code = Code.INTERNAL


class Unavailable(RpcError):
    """The peer cannot be reached (not booted, gone, connection lost)."""

    code = Code.UNAVAILABLE


class DataLoss(RpcError):
    code = Code.DATA_LOSS


class Unauthenticated(RpcError):
    code = Code.UNAUTHENTICATED


ERRORS: dict[Code, type[RpcError]] = {
    cls.code: cls for cls in (
        Unknown, Cancelled, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated)}


def error_for(code: int, message: str) -> RpcError:
    """The typed error for a status that came over the wire (values outside google.rpc.Code
    and OK, which is no error, read as Unknown)."""
    return ERRORS.get(Code.from_wire(code), Unknown)(message)
