"""The one error table and the state machines."""

from __future__ import annotations

import grpc
import pytest

from protocols.ttrpc import Code
from shim.core import errors
from shim.core.errors import StatusCode, status_code
from shim.daemon.grpc_server import grpc_status
from shim.task.manager import (
    PodState,
    PodTransition,
    ProcessState,
    ProcessTransition,
    check,
)

TABLE = [
    (errors.NotFound("x"), StatusCode.NOT_FOUND),
    (errors.AlreadyExists("x"), StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition("x"), StatusCode.FAILED_PRECONDITION),
    (errors.InvalidArgument("x"), StatusCode.INVALID_ARGUMENT),
    (errors.Unavailable("x"), StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded("x"), StatusCode.DEADLINE_EXCEEDED),
    (errors.Unimplemented("x"), StatusCode.UNIMPLEMENTED),
    (TimeoutError(), StatusCode.DEADLINE_EXCEEDED),
    (NotImplementedError(), StatusCode.UNIMPLEMENTED),
    (errors.ShimError("x"), StatusCode.UNKNOWN),
    (RuntimeError("x"), StatusCode.UNKNOWN),
]


@pytest.mark.parametrize(("error", "code"), TABLE, ids=[type(e).__name__ for e, _ in TABLE])
def test_error_table(error: BaseException, code: StatusCode) -> None:
    assert status_code(error) is code


def test_subclasses_inherit_their_code() -> None:
    class Gone(errors.NotFound):
        pass

    assert status_code(Gone()) is StatusCode.NOT_FOUND


def test_codes_match_both_transports() -> None:
    for code in StatusCode:
        assert grpc_status(code).value[0] == int(code)
        assert Code(int(code)).name == code.name


def test_containerd_codes_are_the_wire_values() -> None:
    assert [int(c) for c in (StatusCode.INVALID_ARGUMENT, StatusCode.NOT_FOUND,
                             StatusCode.ALREADY_EXISTS, StatusCode.FAILED_PRECONDITION,
                             StatusCode.UNIMPLEMENTED, StatusCode.UNAVAILABLE)] == [
        3, 5, 6, 9, 12, 14]


ALLOWED = {
    ProcessTransition.START: {ProcessState.CREATED},
    ProcessTransition.PAUSE: {ProcessState.RUNNING},
    ProcessTransition.RESUME: {ProcessState.PAUSED},
    ProcessTransition.EXIT: {ProcessState.CREATED, ProcessState.RUNNING, ProcessState.PAUSED},
    ProcessTransition.DELETE: {ProcessState.CREATED, ProcessState.STOPPED},
}


@pytest.mark.parametrize("transition", list(ProcessTransition), ids=lambda t: t.verb)
def test_process_transitions(transition: ProcessTransition) -> None:
    for state in ProcessState:
        if state in ALLOWED[transition]:
            check(transition, state)
        else:
            with pytest.raises(errors.FailedPrecondition,
                               match=f"cannot {transition.verb} in state {state.value}"):
                check(transition, state)


def test_process_lifecycle_targets() -> None:
    assert ProcessTransition.START.target is ProcessState.RUNNING
    assert ProcessTransition.PAUSE.target is ProcessState.PAUSED
    assert ProcessTransition.RESUME.target is ProcessState.RUNNING
    assert ProcessTransition.EXIT.target is ProcessState.STOPPED
    assert ProcessTransition.DELETE.target is ProcessState.DELETED


def test_pod_transitions() -> None:
    check(PodTransition.BOOT, PodState.EMPTY)
    with pytest.raises(errors.FailedPrecondition, match="cannot boot in state shut down"):
        check(PodTransition.BOOT, PodState.SHUT_DOWN)
    with pytest.raises(errors.FailedPrecondition, match="cannot boot in state ready"):
        check(PodTransition.BOOT, PodState.READY)
    assert PodTransition.BOOT_FAILED.target is PodState.EMPTY
    for state in PodState:
        check(PodTransition.SHUT_DOWN, state)  # teardown is idempotent


def test_grpc_status_names() -> None:
    assert grpc_status(StatusCode.FAILED_PRECONDITION) is grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("code", list(StatusCode))
def test_from_status_code_round_trips_through_the_table(code: StatusCode) -> None:
    err = errors.from_status_code(int(code), "from the agent")
    assert str(err) == "from the agent"
    typed = {c for c in errors.STATUS_CODES.values()}
    if code in typed and code not in (StatusCode.OK,):
        assert status_code(err) == code
    else:
        assert type(err) is errors.ShimError
        assert status_code(err) == StatusCode.UNKNOWN
