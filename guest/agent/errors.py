"""Typed errors of the agent's domain. The ttrpc edge maps them to status codes in one table
(:data:`guest.agent.service.STATUS_CODES`); domain code never picks a wire code itself."""

from __future__ import annotations

import errno


class AgentError(Exception):
    """Base of every error the agent reports to its caller."""


class NotFound(AgentError):
    pass


class AlreadyExists(AgentError):
    pass


class FailedPrecondition(AgentError):
    pass


class InvalidArgument(AgentError):
    pass


class PermissionDenied(AgentError):
    pass


class Unavailable(AgentError):
    pass


class DeadlineExceeded(AgentError):
    pass


class Unimplemented(AgentError):
    pass


class DataLoss(AgentError):
    """Content that does not match its digest (a corrupted or tampered blob)."""


class RuntimeFailure(AgentError):
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
}


def from_os_error(err: OSError, what: str) -> AgentError:
    """A typed error for an OSError, keeping its errno text; callers chain with ``from err``."""
    kind = _ERRNO_ERRORS.get(err.errno or 0, RuntimeFailure)
    return kind(f"{what}: {err.strerror or err}")
