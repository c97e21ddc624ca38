"""The shim's stdio relay alone, against a loopback agent: the reference guest agent on the host
on a unix socket (as tests/integration/guest runs it, with the host's runc), a container that
``cat``s a file of random bytes, the shim's own :class:`shim.pod.agent.AgentClient` and
:class:`shim.task.stdio.ProcessIO` writing to a FIFO made the way containerd makes them, and a
separate reader process (containerd's side) that counts and hashes what arrives.

Used by ``make bench-relay`` (bench/relay.py) and by the byte-exactness test
(tests/integration/shim/test_relay_loopback.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.api.kata import agent_pb2
from protocols.ttrpc import Client
from shim.pod.agent import AgentClient as ShimAgent
from shim.task.stdio import CHUNK, ProcessIO
from tests.integration.guest.agentproc import AgentProcess
from tests.integration.guest.conftest import remove_cgroup_parent
from tests.integration.guest.support import AgentClient as TestAgent
from tests.integration.guest.support import make_busybox_rootfs, spec

# containerd's side of a stdout FIFO: read to end of file, count, hash; one JSON line.
READER = (
    "import hashlib, json, os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
    "h = hashlib.sha256(); n = 0; first = None\n"
    "while chunk := os.read(fd, 1 << 20):\n"
    "    first = first or time.monotonic(); n += len(chunk); h.update(chunk)\n"
    "print(json.dumps({'bytes': n, 'sha256': h.hexdigest(), 'first': first,\n"
    "                  'last': time.monotonic()}))\n"
)


@dataclass
class Payload:
    path: Path  # inside the container: /payload
    size: int
    sha256: str


@dataclass
class RelayRun:
    size: int
    seconds: float  # StartContainer → the reader saw end of file
    received: int
    sha256_ok: bool

    @property
    def mib_s(self) -> float:
        return self.size / self.seconds / 2**20

    @property
    def mb_s(self) -> float:
        return self.size / self.seconds / 1e6


class LoopbackAgent:
    """A running loopback agent with a busybox rootfs holding one random payload."""

    def __init__(self, workdir: Path, process: AgentProcess, rootfs: Path) -> None:
        self.workdir = workdir
        self.process = process
        self.rootfs = rootfs
        self.serial = 0

    def payload(self, size: int) -> Payload:
        """A file of ``size`` random bytes in the rootfs (kept: the page cache serves it)."""
        path = self.rootfs / "payload"
        digest = hashlib.sha256()
        with path.open("wb") as out:
            left = size
            while left:
                block = os.urandom(min(left, 1 << 20))
                digest.update(block)
                out.write(block)
                left -= len(block)
        return Payload(path, size, digest.hexdigest())

    @contextlib.asynccontextmanager
    async def clients(self) -> AsyncIterator[tuple[ShimAgent, TestAgent]]:
        """The shim's agent client (what the relay uses) and the tests' typed one (set-up)."""
        client = await Client.connect_unix(self.process.socket, timeout=10)
        try:
            yield ShimAgent(client, f"unix:{self.process.socket}"), TestAgent(client)
        finally:
            await client.close()

    async def _container(self, agent: TestAgent, args: list[str]) -> str:
        self.serial += 1
        cid = f"relay{self.serial}"
        await agent.call("CreateContainer", agent_pb2.CreateContainerRequest(
            container_id=cid, OCI=spec(str(self.rootfs), args)))
        return cid

    async def relay(self, payload: Payload) -> RelayRun:
        """One container's stdout through ProcessIO into a FIFO; timed to the reader's EOF."""
        fifo = Path(tempfile.mkdtemp(prefix="coco-relay-", dir=self.workdir)) / "stdout"
        os.mkfifo(fifo, 0o600)
        async with self.clients() as (shim_agent, agent):
            cid = await self._container(agent, ["cat", "/payload"])
            io = ProcessIO(shim_agent, cid, "", stdout=str(fifo))
            io.open()
            reader = await asyncio.create_subprocess_exec(
                sys.executable, "-c", READER, str(fifo), stdout=subprocess.PIPE)
            tasks: list[asyncio.Task[None]] = []
            try:
                t0 = time.monotonic()
                await agent.call("StartContainer",
                                 agent_pb2.StartContainerRequest(container_id=cid))
                io.start(lambda coro: _keep(tasks, coro))
                out, _ = await reader.communicate()
                elapsed = time.monotonic() - t0
                await io.output_done()
                status = await agent.wait(cid)
            finally:
                await io.aclose()
                if reader.returncode is None:
                    reader.kill()
                    await reader.wait()
            await agent.call("RemoveContainer",
                             agent_pb2.RemoveContainerRequest(container_id=cid))
        got = json.loads(out)
        if status != 0:
            raise RuntimeError(f"cat exited {status}")
        return RelayRun(payload.size, elapsed, got["bytes"], got["sha256"] == payload.sha256)

    async def agent_only(self, payload: Payload, size: int = CHUNK) -> float:
        """The same stream read by ReadStdout calls and dropped (no FIFO): seconds."""
        async with self.clients() as (shim_agent, agent):
            cid = await self._container(agent, ["cat", "/payload"])
            t0 = time.monotonic()
            await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
            total = 0
            while data := await shim_agent.read_stdout(cid, "", size):
                total += len(data)
            elapsed = time.monotonic() - t0
            await agent.wait(cid)
            await agent.call("RemoveContainer",
                             agent_pb2.RemoveContainerRequest(container_id=cid))
        if total != payload.size:
            raise RuntimeError(f"read {total} of {payload.size} bytes")
        return elapsed


def _keep(tasks: list[asyncio.Task[None]],
          coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    task = asyncio.ensure_future(coro)
    tasks.append(task)
    return task


@contextlib.asynccontextmanager
async def loopback_agent() -> AsyncIterator[LoopbackAgent]:
    """Start the agent (own UTS/net/mount namespaces, runc) with a busybox rootfs."""
    workdir = Path(tempfile.mkdtemp(prefix="coco-relay-"))
    process = AgentProcess(workdir / "agent")
    process.workdir.mkdir()
    try:
        rootfs = make_busybox_rootfs(process.workdir / "shared/busybox/rootfs")
        process.start()
        loopback = LoopbackAgent(workdir, process, rootfs)
        async with loopback.clients() as (_, agent):
            await agent.call("CreateSandbox", agent_pb2.CreateSandboxRequest(
                hostname="relay", sandbox_id=f"relay-{os.getpid()}"))
        yield loopback
    finally:
        process.stop()
        remove_cgroup_parent(process.cgroup_parent)
        shutil.rmtree(workdir, ignore_errors=True)
