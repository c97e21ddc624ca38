#!/usr/bin/env python3
"""`make bench-relay`: the shim's stdio relay alone, next to the agent alone.

A loopback agent (the reference guest agent on the host, on a unix socket, containers run by
the host's runc: tests/support/relay.py) runs ``cat`` of a file of random bytes; the shim's
AgentClient and ProcessIO relay its stdout into a FIFO made as containerd makes them, read by
a separate process that counts and hashes it. Interleaved with each relay run, the same stream
read by ReadStdout calls and dropped (no FIFO): what the agent and the ttrpc connection give.
Every run must deliver every byte in order (SHA-256). Results in bench/relay-results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import targets
from tests.support.relay import loopback_agent


async def run(size: int, runs: int) -> dict[str, object]:
    relay: list[float] = []
    agent_only: list[float] = []
    async with loopback_agent() as agent:
        payload = agent.payload(size)
        for _ in range(runs):
            result = await agent.relay(payload)
            if result.received != size or not result.sha256_ok:
                raise RuntimeError(f"relay lost or reordered bytes: {result}")
            relay.append(result.seconds)
            agent_only.append(await agent.agent_only(payload))
    return {"size": size, "relay_s": relay, "agent_only_s": agent_only}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).with_name("relay-results.json"))
    args = parser.parse_args()
    results = asyncio.run(run(args.mib << 20, args.runs))
    results["command"] = " ".join([sys.executable, *sys.argv])
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    size = args.mib << 20
    relay = size / statistics.median(results["relay_s"]) / 1e6  # type: ignore[arg-type]
    alone = size / statistics.median(results["agent_only_s"]) / 1e6  # type: ignore[arg-type]
    print(f"{args.mib} MiB of stdout, medians of {args.runs} interleaved runs, every byte "
          "checked (SHA-256)")
    print(f"  through the shim's relay into containerd's FIFO  {relay:7.1f} MB/s")
    print(f"  the agent alone (ReadStdout, data dropped)        {alone:7.1f} MB/s   "
          f"relay ÷ agent alone: {relay / alone:.2f}")
    print(f"\n{targets.HEADER}")
    print(targets.line("relay_mb_s", relay, f"{relay:.1f} MB/s"))
    print(f"raw samples: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
