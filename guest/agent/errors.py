"""Typed errors of the agent's domain: the shared hierarchy of :mod:`protocols.errors` (the
host maps the same classes back from the wire). Each class carries its status code; the ttrpc
edge reports ``err.code`` (:func:`guest.agent.service.status_code`), domain code never picks a
wire code itself."""

from __future__ import annotations

import errno

from protocols import errors as shared
from protocols.errors import (
    AlreadyExists,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RpcError,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "AgentError", "AlreadyExists", "DataLoss", "DeadlineExceeded", "FailedPrecondition",
    "InvalidArgument", "NotFound", "PermissionDenied", "ResourceExhausted", "RuntimeFailure",
    "Unavailable", "Unimplemented", "from_os_error",
]

AgentError = RpcError  # the agent's name for the base of every error it reports


class RuntimeFailure(shared.Internal):
    """A tool the agent drives (runc, ip, mount) failed for a reason not covered above."""


_ERRNO_ERRORS: dict[int, type[AgentError]] = {
    errno.ENOENT: NotFound,
    errno.ENODEV: InvalidArgument,
    errno.ENXIO: NotFound,
    errno.EEXIST: AlreadyExists,
    errno.EINVAL: InvalidArgument,
    errno.ENOTDIR: InvalidArgument,
    errno.EPERM: PermissionDenied,
    errno.EACCES: PermissionDenied,
    errno.EBUSY: FailedPrecondition,
    errno.ESRCH: NotFound,
    errno.ETIMEDOUT: DeadlineExceeded,
    errno.ENOSPC: ResourceExhausted,
    errno.ENOMEM: ResourceExhausted,
}


def from_os_error(err: OSError, what: str) -> AgentError:
    """A typed error for an OSError, keeping its errno text; callers chain with ``from err``."""
    kind = _ERRNO_ERRORS.get(err.errno or 0, RuntimeFailure)
    return kind(f"{what}: {err.strerror or err}")
