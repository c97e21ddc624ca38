from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.pod.pod import Pod, PodState
from shim.task.manager import TaskManager
from tests.unit.shim.fakes import FakeAgent, FakeBooter, FakeVm, RecordingPublisher
from tests.unit.shim.helpers import FAST, Owner

STAMP = 1_700_000_000_123_456_789


@dataclass
class Harness:
    """One pod as the daemon wires it (Pod + TaskManager), on fakes."""

    tasks: TaskManager
    pod: Pod
    agent: FakeAgent
    booter: FakeBooter
    publisher: RecordingPublisher
    owner: Owner
    root: Path

    def bundle(self, cid: str, annotations: dict[str, str] | None = None) -> Path:
        bundle = self.root / cid
        bundle.mkdir(exist_ok=True)
        (bundle / "config.json").write_text(json.dumps({
            "ociVersion": "1.1.0", "process": {"args": ["sh"]},
            "annotations": annotations or {}}))
        return bundle

    @property
    def vm(self) -> FakeVm:
        """The VM booted last."""
        return self.booter.vms[-1]

    def state(self) -> PodState:
        return self.pod.state  # a call, so the checker does not narrow across awaits

    async def aclose(self) -> None:
        await self.tasks.aclose()
        await self.pod.shutdown()
        await self.owner.aclose()


def make_harness(tmp_path: Path, agent: FakeAgent | None = None,
                 booter: FakeBooter | None = None) -> Harness:
    agent = agent if agent is not None else FakeAgent()
    booter = booter if booter is not None else FakeBooter(agent, pid=4242)
    publisher = RecordingPublisher()
    owner = Owner()
    pod = Pod(booter, spawn=owner.spawn, timeouts=FAST, clock_ns=lambda: STAMP)
    tasks = TaskManager(pod, publisher, namespace="default", spawn=owner.spawn,
                        timeouts=FAST, clock_ns=lambda: STAMP)
    return Harness(tasks, pod, agent, booter, publisher, owner, tmp_path)


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = make_harness(tmp_path)
    yield harness
    await harness.aclose()
