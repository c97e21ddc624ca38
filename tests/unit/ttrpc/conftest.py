from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from protocols.ttrpc import Client, Server

from .helpers import EchoService


@dataclass
class Served:
    server: Server
    service: EchoService
    path: Path


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107-byte sun_path limit; keep socket paths short.
    path = Path(tempfile.mkdtemp(prefix="ttrpc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def served(socket_dir: Path) -> AsyncIterator[Served]:
    server = Server()
    service = EchoService()
    service.install(server)
    path = socket_dir / "echo.sock"
    await server.serve_unix(path)
    yield Served(server, service, path)
    await server.close()


@pytest.fixture
async def client(served: Served) -> AsyncIterator[Client]:
    client = await Client.connect_unix(served.path, timeout=5)
    yield client
    await client.close()
