from __future__ import annotations

from protocols.ttrpc import Code, ConnectionClosed, TtrpcError


def test_codes_are_google_rpc_codes() -> None:
    assert [c.value for c in Code] == list(range(17))
    assert (Code.NOT_FOUND, Code.UNIMPLEMENTED, Code.UNAUTHENTICATED) == (5, 12, 16)


def test_unknown_wire_codes_read_as_unknown() -> None:
    assert Code.from_wire(9) is Code.FAILED_PRECONDITION
    assert Code.from_wire(99) is Code.UNKNOWN
    assert Code.from_wire(-1) is Code.UNKNOWN


def test_error_text() -> None:
    err = TtrpcError(Code.NOT_FOUND, "container x not found")
    assert (err.code, err.message) == (Code.NOT_FOUND, "container x not found")
    assert str(err) == "NOT_FOUND: container x not found"
    assert repr(err) == "TtrpcError(Code.NOT_FOUND, 'container x not found')"
    assert str(TtrpcError(Code.CANCELLED)) == "CANCELLED"


def test_connection_closed_is_a_connection_error() -> None:
    assert issubclass(ConnectionClosed, ConnectionError)
