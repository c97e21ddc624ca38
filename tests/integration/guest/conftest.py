"""Fixtures for the guest tests: the built image, a busybox rootfs, a running agent."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from guest.image.build import BuildResult, build
from protocols.ttrpc import Client
from tests import envinfo
from tests.integration.guest.agentproc import AgentProcess
from tests.integration.guest.support import AgentClient, make_busybox_rootfs
from tests.support.guest import guest_recipe

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def guest_image() -> BuildResult:
    """The reference guest image (built once, then taken from the cache)."""
    return build(guest_recipe(), envinfo.load().cache)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="coco-guest-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def rootfs(workdir: Path) -> Path:
    """Beneath the agent's shared root (--shared-root): container roots may lie nowhere else."""
    return make_busybox_rootfs(workdir / "agent/shared/busybox/rootfs")


@pytest.fixture
async def agent_process(workdir: Path) -> AsyncIterator[AgentProcess]:
    # runc: this host's cgroups are v1 + v2 hybrid, which crun refuses (the guest runs crun
    # on a pure cgroup2 hierarchy: tests/integration/guest/test_guest_vm.py).
    process = AgentProcess(workdir / "agent")
    process.workdir.mkdir(exist_ok=True)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        print(process.output()[-4000:])
        remove_cgroup_parent(process.cgroup_parent)


def remove_cgroup_parent(name: str) -> None:
    """The OCI runtime leaves the (empty) parent cgroup the agent places containers under."""
    leaf = name.strip("/")
    for parent in [*Path("/sys/fs/cgroup").glob(leaf), *Path("/sys/fs/cgroup").glob(f"*/{leaf}")]:
        if parent.is_dir():
            with contextlib.suppress(OSError):
                parent.rmdir()


@pytest.fixture
async def agent(agent_process: AgentProcess) -> AsyncIterator[AgentClient]:
    client = await Client.connect_unix(agent_process.socket, timeout=10)
    try:
        yield AgentClient(client)
    finally:
        await client.close()
