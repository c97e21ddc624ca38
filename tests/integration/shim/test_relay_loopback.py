"""The shim's stdio relay against a loopback agent (the reference agent on the host on a unix
socket, runc containers) into a FIFO made as containerd makes them: every byte of a container's
stdout arrives, in order. The throughput figure is `make bench-relay`'s."""

from __future__ import annotations

import pytest

from tests.support.relay import loopback_agent

pytestmark = pytest.mark.integration


async def test_relay_delivers_every_byte_in_order() -> None:
    async with loopback_agent() as agent:
        payload = agent.payload(24 << 20)  # many chunks: read-ahead and a full pipe both hit
        result = await agent.relay(payload)
    assert result.received == payload.size
    assert result.sha256_ok
