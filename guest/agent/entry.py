"""The agent's entry in the VM (init's command line): asyncio without ``ssl``, then the agent.

asyncio imports ``ssl`` if it can (for TLS transports), and with it ``_ssl``, libssl and
libcrypto, whose loading and relocation is a good part of asyncio's import time under TCG,
before the agent can listen. The agent never gives asyncio a TLS transport: its TLS (registry
pulls, the KBS) runs on http.client in worker threads. So asyncio is imported while ``import
ssl`` fails (``sys.modules["ssl"] = None``: asyncio then runs without TLS transports), and
``ssl`` is importable again right after, for the code that loads it later.

Only the guest's init uses this: on a host (tests, tools), importing the agent leaves asyncio
as it is.
"""

from __future__ import annotations

import sys


def import_asyncio_without_ssl() -> None:
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return  # too late, or nothing to gain
    sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` raises ImportError
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]


def main() -> int:
    import_asyncio_without_ssl()
    from guest.agent.__main__ import main as agent_main

    return agent_main()
