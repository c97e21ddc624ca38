"""The one error hierarchy (shared with the guest), the status table, the state machines."""

from __future__ import annotations

import grpc
import pytest
from grpclib.const import Status

from protocols import errors as shared
from protocols.ttrpc import Code
from shim.core import errors
from shim.core.errors import StatusCode, status_code
from shim.core.state_machine import check
from shim.daemon.grpc_server import grpc_status
from shim.pod.pod import PodState, PodTransition
from shim.task.process import ProcessState, ProcessTransition

TABLE = [
    (errors.NotFound("x"), StatusCode.NOT_FOUND),
    (errors.AlreadyExists("x"), StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition("x"), StatusCode.FAILED_PRECONDITION),
    (errors.InvalidArgument("x"), StatusCode.INVALID_ARGUMENT),
    (errors.Unavailable("x"), StatusCode.UNAVAILABLE),
    (errors.DeadlineExceeded("x"), StatusCode.DEADLINE_EXCEEDED),
    (errors.Unimplemented("x"), StatusCode.UNIMPLEMENTED),
    (errors.PermissionDenied("x"), StatusCode.PERMISSION_DENIED),
    (errors.ResourceExhausted("x"), StatusCode.RESOURCE_EXHAUSTED),
    (errors.Internal("x"), StatusCode.INTERNAL),
    (TimeoutError(), StatusCode.DEADLINE_EXCEEDED),
    (NotImplementedError(), StatusCode.UNIMPLEMENTED),
    (errors.RpcError("x"), StatusCode.UNKNOWN),
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
        assert grpc_status(code).value == int(code)
        assert grpc_status(code).name == code.name
        assert grpc.StatusCode[code.name].value[0] == int(code)  # containerd's grpc-go numbers
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
    with pytest.raises(errors.FailedPrecondition, match="cannot boot in state stopped"):
        check(PodTransition.BOOT, PodState.STOPPED)
    with pytest.raises(errors.FailedPrecondition, match="cannot boot in state ready"):
        check(PodTransition.BOOT, PodState.READY)
    with pytest.raises(errors.FailedPrecondition, match="cannot boot in state exited"):
        check(PodTransition.BOOT, PodState.EXITED)
    with pytest.raises(errors.FailedPrecondition, match="cannot boot in state created"):
        check(PodTransition.BOOT, PodState.CREATED)  # a sandbox API pod starts instead
    assert PodTransition.BOOT_FAILED.target is PodState.EMPTY
    assert PodTransition.START_FAILED.target is PodState.CREATED
    assert PodTransition.EXIT.sources == {PodState.READY}
    assert PodTransition.EXIT.target is PodState.EXITED
    for state in PodState:
        check(PodTransition.STOP, state)  # teardown is idempotent


def test_grpc_status_names() -> None:
    assert grpc_status(StatusCode.FAILED_PRECONDITION) is Status.FAILED_PRECONDITION


@pytest.mark.parametrize("code", [c for c in StatusCode if c is not StatusCode.OK],
                         ids=lambda c: c.name)
def test_every_status_from_the_agent_reaches_containerd_with_its_own_code(
        code: StatusCode) -> None:
    """A policy denial stays PERMISSION_DENIED, a full disk RESOURCE_EXHAUSTED, ... — never a
    collapse to UNKNOWN on the way from the agent to containerd."""
    err = errors.error_for(int(code), "from the agent")
    assert str(err) == "from the agent"
    assert isinstance(err, shared.RpcError)
    assert status_code(err) is code


def test_codes_outside_the_enum_are_unknown() -> None:
    assert status_code(errors.error_for(99, "x")) is StatusCode.UNKNOWN
    assert status_code(errors.error_for(0, "x")) is StatusCode.UNKNOWN  # OK is no error


def test_the_guest_raises_the_same_classes() -> None:
    from guest.agent import errors as guest

    assert guest.PermissionDenied is errors.PermissionDenied
    assert issubclass(guest.RuntimeFailure, errors.Internal)
    assert guest.AgentError is errors.RpcError
