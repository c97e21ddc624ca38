"""A stand-in QEMU for supervisor tests: speaks QMP on ``-qmp unix:PATH,...``.

Behaviour after ``cont`` is chosen with ``--mode``:
  idle       run until quit/powerdown
  poweroff   guest powers off: SHUTDOWN{guest-shutdown}, exit 0
  panic      GUEST_PANICKED{pause} then stay paused (QEMU would not exit)
  stop       STOP (e.g. an I/O error pause) and stay
  flood      emit N RESUME events, then idle
  deaf       ignore system_powerdown and quit (must be killed)
  slow       answer query-status only after 30 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any


def _event(name: str, data: dict[str, Any] | None = None) -> bytes:
    msg = {"event": name, "data": data or {},
           "timestamp": {"seconds": 0, "microseconds": 0}}
    return (json.dumps(msg) + "\r\n").encode()


async def _messages(reader: asyncio.StreamReader) -> Any:
    """QMP clients send a JSON stream, not lines (qemu.qmp adds no newline)."""
    decoder = json.JSONDecoder()
    buf = ""
    while chunk := await reader.read(4096):
        buf += chunk.decode()
        while buf.strip():
            try:
                msg, end = decoder.raw_decode(buf.lstrip())
            except json.JSONDecodeError:
                break
            buf = buf.lstrip()[end:]
            yield msg


async def serve(path: str, mode: str, count: int) -> None:
    done = asyncio.Event()
    state = {"status": "prelaunch"}

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        greeting = {"QMP": {"version": {"qemu": {"major": 99, "minor": 0, "micro": 0},
                                        "package": ""}, "capabilities": ["oob"]}}
        writer.write((json.dumps(greeting) + "\r\n").encode())
        await writer.drain()
        async for msg in _messages(reader):
            cmd, mid = msg.get("execute"), msg.get("id")
            ret: Any = {}
            if cmd == "query-status":
                if mode == "slow" and state["status"] == "running":
                    await asyncio.sleep(30)
                ret = {"status": state["status"], "running": state["status"] == "running"}
            elif cmd == "cont":
                state["status"] = "running"
            if cmd == "quit" and mode == "deaf":
                continue
            if cmd == "system_powerdown" and mode == "deaf":
                continue
            writer.write((json.dumps({"return": ret, "id": mid}) + "\r\n").encode())
            await writer.drain()
            if cmd == "cont":
                await after_cont(writer)
            elif cmd == "quit":
                writer.write(_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}))
                await writer.drain()
                done.set()
            elif cmd == "system_powerdown" and mode != "idle":
                writer.write(_event("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}))
                await writer.drain()
                done.set()

    async def after_cont(writer: asyncio.StreamWriter) -> None:
        if mode == "poweroff":
            await asyncio.sleep(0.2)
            writer.write(_event("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}))
            await writer.drain()
            done.set()
        elif mode == "panic":
            writer.write(_event("GUEST_PANICKED", {"action": "pause"}))
            writer.write(_event("STOP"))
            await writer.drain()
        elif mode == "stop":
            writer.write(_event("STOP"))
            await writer.drain()
        elif mode == "flood":
            for _ in range(count):
                writer.write(_event("RESUME"))
            await writer.drain()

    server = await asyncio.start_unix_server(client, path)
    async with server:
        await done.wait()
        await asyncio.sleep(0.05)
    os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("-qmp", dest="qmp", required=True)
    parser.add_argument("--mode", default="idle")
    parser.add_argument("--count", type=int, default=1000)
    args, _ = parser.parse_known_args()
    path = args.qmp.removeprefix("unix:").split(",")[0]
    print(f"fake qemu mode {args.mode}", file=sys.stderr)
    asyncio.run(serve(path, args.mode, args.count))


if __name__ == "__main__":
    main()
