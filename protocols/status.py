"""The google.rpc status codes, shared by ttrpc, the shim's error table and the agent.

Kept free of protobuf imports: the shim's ``start`` path (which must stay fast) uses them too.
"""

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
