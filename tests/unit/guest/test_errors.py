"""Typed domain errors carry their ttrpc status codes (the shared hierarchy)."""

from __future__ import annotations

import errno

import pytest

from guest.agent import errors
from guest.agent.service import status_code
from protocols.ttrpc import Code

EXPECTED = {
    errors.NotFound: Code.NOT_FOUND,
    errors.AlreadyExists: Code.ALREADY_EXISTS,
    errors.FailedPrecondition: Code.FAILED_PRECONDITION,
    errors.InvalidArgument: Code.INVALID_ARGUMENT,
    errors.PermissionDenied: Code.PERMISSION_DENIED,
    errors.Unavailable: Code.UNAVAILABLE,
    errors.DeadlineExceeded: Code.DEADLINE_EXCEEDED,
    errors.Unimplemented: Code.UNIMPLEMENTED,
    errors.RuntimeFailure: Code.INTERNAL,
    errors.ResourceExhausted: Code.RESOURCE_EXHAUSTED,
    errors.DataLoss: Code.DATA_LOSS,
}


def test_every_error_class_has_its_code() -> None:
    assert {cls: cls.code for cls in EXPECTED} == EXPECTED
    declared = {
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.AgentError)
    }
    assert declared - {errors.AgentError} == set(EXPECTED)


@pytest.mark.parametrize(("error", "code"), [(cls("x"), code) for cls, code in EXPECTED.items()])
def test_status_code(error: errors.AgentError, code: Code) -> None:
    assert status_code(error) == code


def test_subclass_inherits_its_parents_code() -> None:
    class MissingShare(errors.NotFound):
        pass

    assert status_code(MissingShare("share")) == Code.NOT_FOUND
    assert status_code(errors.RuntimeFailure("runc")) == Code.INTERNAL
    assert status_code(errors.AgentError("bare")) == Code.INTERNAL  # no kind: the agent's own


@pytest.mark.parametrize(
    ("number", "kind"),
    [
        (errno.ENOENT, errors.NotFound),
        (errno.EEXIST, errors.AlreadyExists),
        (errno.EBUSY, errors.FailedPrecondition),
        (errno.EPERM, errors.PermissionDenied),
        (errno.EINVAL, errors.InvalidArgument),
        (errno.ENOSPC, errors.ResourceExhausted),
        (errno.EIO, errors.RuntimeFailure),
    ],
)
def test_from_os_error(number: int, kind: type[errors.AgentError]) -> None:
    typed = errors.from_os_error(OSError(number, "text"), "mount x")
    assert type(typed) is kind
    assert str(typed) == "mount x: text"
