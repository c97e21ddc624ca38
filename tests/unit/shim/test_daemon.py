"""The daemon's ownership: every resource on one AsyncExitStack, background tasks guarded so a
crashed loop fails the pod (VM stopped, processes exit 137) instead of ending the TaskGroup."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
import threading
import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from shim.binary.flags import Flags
from shim.core import paths
from shim.daemon.main import BOOTER_ENV, LazyBooter, Owner, serve
from shim.pod.pod import Pod, PodState
from shim.pod.vm import PodConfig
from shim.task.manager import TaskManager
from shim.task.process import CreateTask
from tests.unit.shim.conftest import STAMP
from tests.unit.shim.fakes import FakeBooter, RecordingPublisher
from tests.unit.shim.helpers import FAST


async def test_a_crashed_loop_fails_the_pod_not_the_daemon(tmp_path: Path) -> None:
    booter = FakeBooter(pid=4242)
    publisher = RecordingPublisher()
    async with asyncio.TaskGroup() as group:
        owner = Owner(group)
        pod = Pod(booter, spawn=owner.spawn, timeouts=FAST, clock_ns=lambda: STAMP)
        owner.on_crash = pod.fail
        tasks = TaskManager(pod, publisher, namespace="default", spawn=owner.spawn,
                            timeouts=FAST, clock_ns=lambda: STAMP)
        bundle = tmp_path / "c1"
        bundle.mkdir()
        (bundle / "config.json").write_text("{}")
        await tasks.create(CreateTask(id="c1", bundle=str(bundle)))
        await tasks.start("c1")

        async def broken_loop() -> None:
            raise RuntimeError("a loop with a bug")

        owner.spawn(broken_loop())
        exit = await asyncio.wait_for(tasks.wait("c1"), 2)
        assert exit.exit_status == 137
        assert booter.vms[-1].stopped and pod.state is PodState.EXITED
        assert publisher.topics()[-1] == "/tasks/exit"
        # The TaskGroup goes on: Delete and Shutdown still work.
        await tasks.delete("c1")
        assert await tasks.shutdown(now=False)
        await tasks.aclose()
        await pod.shutdown()
        await owner.aclose()


async def test_whatever_ends_the_daemon_the_vm_is_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure in the daemon's body unwinds the exit stack: server, tasks, pod (its VM
    stopped), background tasks, event drain."""
    monkeypatch.setenv(BOOTER_ENV, "tests.unit.shim.fakes:FakeBooter")
    monkeypatch.setenv(paths.STATE_DIR_ENV, str(tmp_path / "state"))
    short = Path(tempfile.mkdtemp(prefix="cs", dir="/tmp"))
    monkeypatch.setenv("TTRPC_ADDRESS", str(short / "no-containerd.sock"))
    bundle = tmp_path / "pod"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"annotations": {}}))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(short / "task.sock"))
    listener.listen()
    flags = Flags(action="serve", namespace="default", id="pod", bundle=str(bundle),
                  socket=str(short / "task.sock"), protocol="ttrpc", group="pod",
                  listen_fd=listener.detach(), early_boot=True)
    pods: list[Pod] = []
    with pytest.raises(ExceptionGroup) as caught:  # the TaskGroup on the stack groups it
        async with AsyncExitStack() as stack:
            pod = await serve(flags, stack, {"pod"}, FAST)
            pods.append(pod)
            await asyncio.sleep(0.05)  # the early boot
            assert pod.state is PodState.READY
            raise RuntimeError("the daemon's body failed")
    assert [str(e) for e in caught.value.exceptions] == ["the daemon's body failed"]
    (pod,) = pods
    assert pod.state is PodState.STOPPED
    assert isinstance(pod._booter, LazyBooter)
    booter = await pod._booter.loaded()
    assert isinstance(booter, FakeBooter) and booter.vms[-1].stopped
    assert booter.rootfs[-1].closed
    shutil.rmtree(short)


async def test_lazy_booter_loads_once_in_a_thread_while_the_loop_runs() -> None:
    """The boot machinery loads off the event loop: the loop keeps ticking during a slow load,
    concurrent boots share the one load, and a load that fails fails every boot with its
    cause."""
    loads: list[int] = []

    def slow_load() -> FakeBooter:
        loads.append(threading.get_ident())
        time.sleep(0.2)  # a blocking import
        return FakeBooter()

    lazy = LazyBooter(slow_load)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    first, second = await asyncio.gather(lazy.loaded(), lazy.loaded())
    ticker.cancel()
    assert first is second and len(loads) == 1
    assert loads[0] != threading.get_ident()
    assert ticks >= 5  # ≈ 20 while the load slept

    def broken_load() -> FakeBooter:
        raise ModuleNotFoundError("no module named 'hypervisor'")

    broken = LazyBooter(broken_load)
    await broken.preload()  # swallowed there: the boot reports it
    with pytest.raises(ModuleNotFoundError, match="hypervisor"):
        await broken.boot(PodConfig(sandbox_id="p", namespace="default", bundle=Path("/b"),
                                    spec={}))
