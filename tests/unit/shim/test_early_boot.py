"""Early boot: the daemon boots the pod VM from ``start``'s bundle before Create arrives."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from shim.core import errors
from shim.core.config import RuntimeOptions
from shim.pod.pod import PodState
from shim.pod.vm import PodConfig
from shim.task.process import CreateTask
from tests.unit.shim.conftest import Harness, make_harness


def config(h: Harness, cid: str, options: RuntimeOptions | None = None) -> PodConfig:
    bundle = h.bundle(cid)
    return PodConfig(sandbox_id=cid, namespace="default", bundle=bundle,
                     spec=json.loads((bundle / "config.json").read_text()),
                     options=options or RuntimeOptions())


async def test_create_adopts_the_early_boot(h: Harness) -> None:
    h.booter.delay = 0.05
    h.pod.boot_early(config(h, "c1"))
    await asyncio.sleep(0.01)
    assert h.state() is PodState.BOOTING  # booting before any Create
    assert await h.tasks.create(CreateTask(id="c1", bundle=str(h.bundle("c1")))) == 4242
    assert [c.sandbox_id for c in h.booter.configs] == ["c1"]  # booted once
    assert h.state() is PodState.READY
    assert h.publisher.topics() == ["/tasks/create"]


async def test_a_failed_early_boot_is_the_create_error(h: Harness) -> None:
    h.booter.failure = errors.InvalidArgument("runtime profile: firmware /nope is missing")
    h.pod.boot_early(config(h, "c1"))
    with pytest.raises(errors.InvalidArgument, match="firmware /nope is missing"):
        await h.tasks.create(CreateTask(id="c1", bundle=str(h.bundle("c1"))))
    assert h.state() is PodState.EMPTY


async def test_a_create_for_other_options_discards_the_early_vm(h: Harness) -> None:
    h.pod.boot_early(config(h, "c1", RuntimeOptions(config_path="/etc/coco-shim/a.toml")))
    await asyncio.sleep(0.01)
    assert h.state() is PodState.READY
    first = h.vm
    h.booter.pid = 2
    pid = await h.tasks.create(CreateTask(
        id="c1", bundle=str(h.bundle("c1")),
        options=RuntimeOptions(config_path="/etc/coco-shim/b.toml")))
    assert pid == 2
    assert first.stopped and not h.vm.stopped
    assert [c.options.config_path for c in h.booter.configs] == [
        "/etc/coco-shim/a.toml", "/etc/coco-shim/b.toml"]


async def test_sandbox_api_cancels_the_early_boot(h: Harness) -> None:
    """CreateSandbox means CNI runs next: the VM must wait for StartSandbox."""
    h.booter.delay = 10
    h.pod.boot_early(config(h, "pod1"))
    await asyncio.sleep(0.01)
    assert h.state() is PodState.BOOTING
    await h.pod.create_sandbox(config(h, "pod1"))
    assert h.state() is PodState.CREATED  # the boot was cancelled and undone
    h.booter.delay = 0
    await h.pod.start_sandbox("pod1")
    assert h.state() is PodState.READY
    assert len(h.booter.configs) == 2


async def test_sandbox_api_stops_an_early_vm_that_already_booted(h: Harness) -> None:
    h.pod.boot_early(config(h, "pod1"))
    await asyncio.sleep(0.01)
    assert h.state() is PodState.READY
    await h.pod.create_sandbox(config(h, "pod1"))
    assert h.vm.stopped
    assert h.state() is PodState.CREATED


async def test_teardown_cancels_a_boot_in_progress(h: Harness) -> None:
    h.booter.delay = 10
    h.pod.boot_early(config(h, "c1"))
    await asyncio.sleep(0.01)
    async with asyncio.timeout(2):  # not the 10 s boot
        await h.aclose()
    assert h.state() is PodState.STOPPED


async def test_an_unreadable_bundle_leaves_it_to_create(tmp_path: Path) -> None:
    from shim.binary.flags import Flags
    from shim.daemon.main import early_boot

    h = make_harness(tmp_path)
    early_boot(h.pod, Flags(namespace="default", id="c1", bundle=str(tmp_path / "missing"),
                            early_boot=True))
    assert h.state() is PodState.EMPTY and not h.booter.configs
    with pytest.raises(errors.InvalidArgument, match=r"has no config\.json"):
        await h.tasks.create(CreateTask(id="c1", bundle=str(tmp_path / "missing")))
    await h.aclose()
