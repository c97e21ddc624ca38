"""Early boot: the daemon boots the pod VM from ``start``'s bundle before Create arrives."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shim.binary.contract import RuntimeOptions
from shim.core import errors
from shim.pod.sandbox import PodSandbox, SandboxConfig
from shim.task.manager import CreateTask, PodRecord, PodState
from tests.unit.shim.conftest import Pod, make_pod
from tests.unit.shim.fakes import FakeSandbox, FakeSandboxFactory


def pod_state(pod: Pod) -> PodState:
    return pod.tasks.pod_state  # a call, so the checker does not narrow across awaits


async def test_create_adopts_the_early_boot(pod: Pod) -> None:
    pod.factory.delay = 0.05
    bundle = pod.bundle("c1")
    pod.tasks.boot_early("c1", bundle, RuntimeOptions())
    await asyncio.sleep(0.01)
    assert pod_state(pod) is PodState.BOOTING  # booting before any Create
    assert await pod.tasks.create(CreateTask(id="c1", bundle=str(bundle))) == 4242
    assert [c.sandbox_id for c in pod.factory.configs] == ["c1"]  # booted once
    assert pod_state(pod) is PodState.READY
    assert pod.publisher.topics() == ["/tasks/create"]


async def test_a_failed_early_boot_is_the_create_error(tmp_path: Path) -> None:
    class Failing(FakeSandboxFactory):
        async def create_sandbox(self, config: SandboxConfig) -> PodSandbox:
            self.configs.append(config)
            raise errors.InvalidArgument("runtime profile: firmware /nope is missing")

    pod = make_pod(tmp_path)
    pod.tasks._factory = Failing()
    bundle = pod.bundle("c1")
    pod.tasks.boot_early("c1", bundle, RuntimeOptions())
    with pytest.raises(errors.InvalidArgument, match="firmware /nope is missing"):
        await pod.tasks.create(CreateTask(id="c1", bundle=str(bundle)))
    assert pod_state(pod) is PodState.EMPTY
    await pod.tasks.aclose()
    await pod.owner.aclose()


async def test_a_create_for_other_options_discards_the_early_vm(tmp_path: Path) -> None:
    first, second = FakeSandbox(pid=1), FakeSandbox(pid=2)
    pod = make_pod(tmp_path, first)
    bundle = pod.bundle("c1")
    pod.tasks.boot_early("c1", bundle, RuntimeOptions(config_path="/etc/coco-shim/a.toml"))
    await asyncio.sleep(0.01)
    assert pod_state(pod) is PodState.READY
    pod.factory.sandbox = second
    pid = await pod.tasks.create(CreateTask(
        id="c1", bundle=str(bundle), options=RuntimeOptions(config_path="/etc/coco-shim/b.toml")))
    assert pid == 2
    assert first.shut_down and not second.shut_down
    assert [c.options.config_path for c in pod.factory.configs] == [
        "/etc/coco-shim/a.toml", "/etc/coco-shim/b.toml"]
    await pod.tasks.aclose()
    await pod.owner.aclose()


async def test_sandbox_api_cancels_the_early_boot(pod: Pod) -> None:
    """CreateSandbox means CNI runs next: the VM must wait for StartSandbox."""
    pod.factory.delay = 10
    bundle = pod.bundle("pod1")
    pod.tasks.boot_early("pod1", bundle, RuntimeOptions())
    await asyncio.sleep(0.01)
    assert pod_state(pod) is PodState.BOOTING
    await pod.tasks.create_pod(PodRecord("pod1", bundle, {}))
    assert pod_state(pod) is PodState.EMPTY  # the boot was cancelled and undone
    pod.factory.delay = 0
    await pod.tasks.start_pod("pod1")
    assert pod_state(pod) is PodState.READY
    assert len(pod.factory.configs) == 2


async def test_sandbox_api_stops_an_early_vm_that_already_booted(pod: Pod) -> None:
    bundle = pod.bundle("pod1")
    pod.tasks.boot_early("pod1", bundle, RuntimeOptions())
    await asyncio.sleep(0.01)
    assert pod_state(pod) is PodState.READY
    await pod.tasks.create_pod(PodRecord("pod1", bundle, {}))
    assert pod.sandbox.shut_down
    assert pod_state(pod) is PodState.EMPTY


async def test_teardown_cancels_a_boot_in_progress(pod: Pod) -> None:
    pod.factory.delay = 10
    pod.tasks.boot_early("c1", pod.bundle("c1"), RuntimeOptions())
    await asyncio.sleep(0.01)
    async with asyncio.timeout(2):  # not the 10 s boot
        await pod.tasks.aclose()
    assert pod_state(pod) is PodState.SHUT_DOWN


async def test_an_unreadable_bundle_leaves_it_to_create(pod: Pod) -> None:
    pod.tasks.boot_early("c1", pod.root / "missing", RuntimeOptions())
    assert pod_state(pod) is PodState.EMPTY and not pod.factory.configs
    with pytest.raises(errors.InvalidArgument, match=r"has no config\.json"):
        await pod.tasks.create(CreateTask(id="c1", bundle=str(pod.root / "missing")))
