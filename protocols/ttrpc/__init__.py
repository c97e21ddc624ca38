"""ttrpc (containerd/ttrpc >= 1.2 wire format) over asyncio: unary client and server.

Used towards containerd (task service, events) and towards the Kata agent (vsock or hybrid
vsock). Framing lives in frame.py, the I/O halves in client.py and server.py.
"""

from .client import Client
from .errors import Code, ConnectionClosed, OversizedMessage, TtrpcError
from .frame import MAX_DATA_LENGTH
from .server import NAMESPACE_METADATA_KEY, Handler, RequestContext, Server

__all__ = [
    "MAX_DATA_LENGTH",
    "NAMESPACE_METADATA_KEY",
    "Client",
    "Code",
    "ConnectionClosed",
    "Handler",
    "OversizedMessage",
    "RequestContext",
    "Server",
    "TtrpcError",
]
