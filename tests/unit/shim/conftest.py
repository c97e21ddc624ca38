from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shim.task.manager import TaskManager
from tests.unit.shim.fakes import FakeSandbox, FakeSandboxFactory, RecordingPublisher
from tests.unit.shim.helpers import FAST, Owner


@dataclass
class Pod:
    tasks: TaskManager
    sandbox: FakeSandbox
    factory: FakeSandboxFactory
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


def make_pod(tmp_path: Path, sandbox: FakeSandbox | None = None) -> Pod:
    sandbox = sandbox if sandbox is not None else FakeSandbox(pid=4242)
    factory = FakeSandboxFactory(sandbox)
    publisher = RecordingPublisher()
    owner = Owner()
    tasks = TaskManager(factory, publisher, namespace="default", spawn=owner.spawn,
                        timeouts=FAST, clock_ns=lambda: 1_700_000_000_123_456_789)
    return Pod(tasks, sandbox, factory, publisher, owner, tmp_path)


@pytest.fixture
async def pod(tmp_path: Path) -> AsyncIterator[Pod]:
    pod = make_pod(tmp_path)
    yield pod
    await pod.tasks.aclose()
    await pod.owner.aclose()
