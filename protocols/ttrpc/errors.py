"""Status codes and exceptions shared by the ttrpc client and server."""

from __future__ import annotations

from protocols.status import Code

__all__ = ["Code", "ConnectionClosed", "OversizedMessage", "TtrpcError"]


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


class OversizedMessage(TtrpcError):
    """The peer's answer claimed more than the maximum message size (RESOURCE_EXHAUSTED, as
    containerd/ttrpc says); its bytes are being skipped, so a caller that does not trust the
    peer may rather drop the connection."""


class ConnectionClosed(ConnectionError):
    """The connection ended before the call got its response."""
