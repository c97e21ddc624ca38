"""Status codes and exceptions shared by the ttrpc client and server."""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """google.rpc.Code, the status codes ttrpc carries in Response.status."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_wire(cls, value: int) -> Code:
        """The code for a wire value; values outside google.rpc.Code read as UNKNOWN."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class TtrpcError(Exception):
    """An RPC that ended with a non-OK status, raised by handlers and by Client.call."""

    def __init__(self, code: Code, message: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def __repr__(self) -> str:
        return f"TtrpcError(Code.{self.code.name}, {self.message!r})"


class ConnectionClosed(ConnectionError):
    """The connection ended before the call got its response."""
