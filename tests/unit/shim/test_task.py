"""The task domain against a fake pod sandbox: lifecycle, errors, event order, Wait semantics."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from shim.core import errors
from shim.daemon import events
from shim.task.manager import CreateTask, ExecTask, PodState, ProcessState, Stdio
from tests.unit.shim.conftest import Pod, make_pod
from tests.unit.shim.fakes import HangingSandbox
from tests.unit.shim.helpers import make_fifos, read_to_eof

EXITED_AT = 1_700_000_000_123_456_789


async def create(pod: Pod, cid: str = "c1", stdio: Stdio | None = None) -> int:
    return await pod.tasks.create(CreateTask(id=cid, bundle=str(pod.bundle(cid)),
                                             stdio=stdio or Stdio()))


async def test_lifecycle_and_event_order(pod: Pod) -> None:
    assert await create(pod) == 4242
    assert pod.tasks.pod_state is PodState.READY
    assert (await pod.tasks.state("c1")).state is ProcessState.CREATED
    waiter = asyncio.create_task(pod.tasks.wait("c1"))
    assert await pod.tasks.start("c1") == 4242
    assert (await pod.tasks.state("c1")).state is ProcessState.RUNNING
    await pod.sandbox.finish("c1", status=3)
    exit = await waiter
    assert (exit.exit_status, exit.exited_at, exit.pid) == (3, EXITED_AT, 4242)
    status = await pod.tasks.state("c1")
    assert (status.state, status.exit_status, status.exited_at) == (
        ProcessState.STOPPED, 3, EXITED_AT)
    deleted = await pod.tasks.delete("c1")
    assert (deleted.pid, deleted.exit_status, deleted.exited_at) == (4242, 3, EXITED_AT)
    assert pod.publisher.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit",
                                      "/tasks/delete"]
    exit_event = pod.publisher.events[2]
    assert exit_event == events.TaskExit("c1", "c1", 4242, 3, EXITED_AT)
    with pytest.raises(errors.NotFound):
        await pod.tasks.state("c1")
    assert await pod.tasks.shutdown(now=False)


async def test_first_create_boots_the_pod_once(pod: Pod) -> None:
    await create(pod, "sandbox")
    await pod.tasks.create(CreateTask(id="app", bundle=str(pod.bundle(
        "app", {"io.kubernetes.cri.sandbox-id": "sandbox"}))))
    assert [c.sandbox_id for c in pod.factory.configs] == ["sandbox"]


async def test_misuse_is_a_failed_precondition(pod: Pod) -> None:
    await create(pod)
    with pytest.raises(errors.FailedPrecondition, match="cannot pause in state created"):
        await pod.tasks.pause("c1")
    await pod.tasks.start("c1")
    with pytest.raises(errors.FailedPrecondition, match="cannot start in state running"):
        await pod.tasks.start("c1")
    with pytest.raises(errors.FailedPrecondition, match="cannot delete in state running"):
        await pod.tasks.delete("c1")
    with pytest.raises(errors.AlreadyExists):
        await create(pod)
    with pytest.raises(errors.NotFound):
        await pod.tasks.start("nope")
    with pytest.raises(errors.NotFound):
        await pod.tasks.state("c1", "nope")
    with pytest.raises(errors.InvalidArgument):
        await pod.tasks.create(CreateTask(id="", bundle=str(pod.root)))
    with pytest.raises(errors.InvalidArgument, match=r"config\.json"):
        await pod.tasks.create(CreateTask(id="x", bundle=str(pod.root / "missing")))
    with pytest.raises(errors.Unimplemented):
        await pod.tasks.create(CreateTask(id="y", bundle=str(pod.bundle("y")), checkpoint="/c"))
    await pod.tasks.kill("c1", "", 9, False)
    await pod.tasks.wait("c1")
    with pytest.raises(errors.NotFound, match="already finished"):
        await pod.tasks.kill("c1", "", 9, False)
    assert not await pod.tasks.shutdown(now=False)  # a container is still there


async def test_pause_resume(pod: Pod) -> None:
    await create(pod)
    await pod.tasks.start("c1")
    await pod.tasks.pause("c1")
    assert (await pod.tasks.state("c1")).state is ProcessState.PAUSED
    assert "c1" in pod.sandbox.paused
    with pytest.raises(errors.FailedPrecondition, match="cannot pause in state paused"):
        await pod.tasks.pause("c1")
    await pod.tasks.resume("c1")
    assert (await pod.tasks.state("c1")).state is ProcessState.RUNNING
    assert pod.publisher.topics()[-2:] == ["/tasks/paused", "/tasks/resumed"]


async def test_execs_exit_before_their_container(pod: Pod) -> None:
    await create(pod)
    await pod.tasks.start("c1")
    for eid in ("e1", "e2"):
        await pod.tasks.exec(ExecTask("c1", eid, {"args": ["sleep", "1"]}))
        assert await pod.tasks.start("c1", eid) == 4242
    with pytest.raises(errors.AlreadyExists):
        await pod.tasks.exec(ExecTask("c1", "e1", {}))
    await pod.sandbox.finish("c1", "e1", status=7)
    assert (await pod.tasks.wait("c1", "e1")).exit_status == 7
    await pod.sandbox.finish("c1", status=0)  # init dies: e2 is killed and reported first
    await pod.tasks.wait("c1")
    topics = [(e.topic, getattr(e, "id", getattr(e, "exec_id", ""))) for e in
              pod.publisher.events]
    assert topics == [
        ("/tasks/create", ""), ("/tasks/start", ""),
        ("/tasks/exec-added", "e1"), ("/tasks/exec-started", "e1"),
        ("/tasks/exec-added", "e2"), ("/tasks/exec-started", "e2"),
        ("/tasks/exit", "e1"), ("/tasks/exit", "e2"), ("/tasks/exit", "c1"),
    ]
    assert pod.sandbox.process("c1", "e2").signals == [9]
    exit_e2 = pod.publisher.events[7]
    assert isinstance(exit_e2, events.TaskExit) and exit_e2.exit_status == 137
    await pod.tasks.delete("c1", "e1")
    with pytest.raises(errors.NotFound):
        await pod.tasks.state("c1", "e1")


async def test_exec_needs_a_running_container(pod: Pod) -> None:
    await create(pod)
    with pytest.raises(errors.FailedPrecondition, match="cannot exec in container state created"):
        await pod.tasks.exec(ExecTask("c1", "e1", {}))
    await pod.tasks.start("c1")
    await pod.tasks.exec(ExecTask("c1", "e1", {}))
    with pytest.raises(errors.FailedPrecondition, match="cannot kill exec"):
        await pod.tasks.kill("c1", "e1", 15, False)
    await pod.tasks.delete("c1", "e1")  # a never-started exec may be deleted


async def test_kill_all_signals_every_process(pod: Pod) -> None:
    await create(pod)
    await pod.tasks.start("c1")
    await pod.tasks.exec(ExecTask("c1", "e1", {}))
    await pod.tasks.start("c1", "e1")
    await pod.tasks.kill("c1", "", 10, True)
    assert pod.sandbox.process("c1").signals == [10]
    assert pod.sandbox.process("c1", "e1").signals == [10]


async def test_wait_returns_only_after_output_drained(pod: Pod, tmp_path: Path) -> None:
    fifos = make_fifos(tmp_path)
    reader = asyncio.create_task(read_to_eof(fifos.stdout))
    await create(pod, stdio=Stdio(stdout=str(fifos.stdout)))
    fd = os.open(fifos.stdout, os.O_RDONLY | os.O_NONBLOCK)  # keep the FIFO readable
    await pod.tasks.start("c1")
    payload = os.urandom(1 << 20)
    process = pod.sandbox.process("c1")
    process.stdout.max_buffer = 8 << 20
    await process.stdout.feed(payload)
    reader.cancel()  # containerd is slow: nobody drains the FIFO yet
    await pod.sandbox.finish("c1", status=0)
    waiter = asyncio.create_task(pod.tasks.wait("c1"))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    assert "/tasks/exit" not in pod.publisher.topics()
    received = bytearray()
    while not waiter.done() or len(received) < len(payload):
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            await asyncio.sleep(0.001)
            continue
        if not chunk:
            break
        received += chunk
    await waiter
    os.close(fd)
    assert bytes(received) == payload
    assert pod.publisher.topics()[-1] == "/tasks/exit"


async def test_update_stats_resize_close_io_pids_connect(pod: Pod) -> None:
    await create(pod, stdio=Stdio(terminal=True))
    await pod.tasks.start("c1")
    await pod.tasks.update("c1", {"cpu": {"shares": 2}})
    assert pod.sandbox.updates == [("c1", {"cpu": {"shares": 2}})]
    stats = await pod.tasks.stats("c1")
    assert (stats.type_url, stats.value) == ("io.containerd.cgroups.v2.Metrics", b"c1")
    await pod.tasks.resize_pty("c1", "", 80, 24)
    assert pod.sandbox.process("c1").resizes == [(24, 80)]
    await pod.tasks.close_io("c1", "", True)
    assert await pod.tasks.pids("c1") == [4242]
    assert await pod.tasks.connect("c1") == (os.getpid(), 4242)
    assert await pod.tasks.connect("unknown") == (os.getpid(), 0)


async def test_hanging_agent_hits_the_timeout_table(tmp_path: Path) -> None:
    pod = make_pod(tmp_path, HangingSandbox(pid=1))
    await create(pod)
    with pytest.raises(errors.DeadlineExceeded, match="StartContainer"):
        await pod.tasks.start("c1")
    assert (await pod.tasks.state("c1")).state is ProcessState.CREATED
    await pod.tasks.delete("c1")
    await pod.tasks.aclose()
    await pod.owner.aclose()


async def test_failed_boot_rolls_back_the_pod_state(tmp_path: Path) -> None:
    pod = make_pod(tmp_path)

    class Broken:
        async def create_sandbox(self, config: object) -> object:
            raise errors.Unavailable("no QEMU")

    pod.tasks._factory = Broken()  # type: ignore[assignment]
    with pytest.raises(errors.Unavailable):
        await create(pod)
    assert pod.tasks.pod_state is PodState.EMPTY
    with pytest.raises(errors.NotFound):
        await pod.tasks.state("c1")
    await pod.tasks.aclose()
    assert pod.tasks.pod_state.value == "shut down"
    with pytest.raises(errors.FailedPrecondition, match="cannot boot in state shut down"):
        await create(pod)
    await pod.owner.aclose()


async def test_teardown_cancels_relays_and_stops_the_vm(pod: Pod, tmp_path: Path) -> None:
    fifos = make_fifos(tmp_path)
    await create(pod, stdio=Stdio(stdin=str(fifos.stdin), stdout=str(fifos.stdout)))
    await pod.tasks.start("c1")
    waiter = asyncio.create_task(pod.tasks.wait("c1"))
    await pod.tasks.aclose()
    assert pod.sandbox.shut_down
    await pod.owner.aclose()
    waiter.cancel()


async def test_oom_events_are_published_for_known_containers(pod: Pod) -> None:
    await create(pod)
    pod.sandbox.oom_events.put_nowait("unknown")
    pod.sandbox.oom_events.put_nowait("c1")
    for _ in range(100):
        if "/tasks/oom" in pod.publisher.topics():
            break
        await asyncio.sleep(0.01)
    assert pod.publisher.events[-1] == events.TaskOOM("c1")
    assert pod.publisher.topics().count("/tasks/oom") == 1


async def test_wait_on_a_task_deleted_before_start_is_released(pod: Pod) -> None:
    await create(pod)
    waiter = asyncio.create_task(pod.tasks.wait("c1"))
    await asyncio.sleep(0)
    await pod.tasks.delete("c1")
    with pytest.raises(errors.NotFound, match="deleted before it ran"):
        await waiter


async def test_slow_boot_is_shared_by_concurrent_creates(tmp_path: Path) -> None:
    pod = make_pod(tmp_path)
    pod.factory.delay = 0.2
    await asyncio.gather(create(pod, "a"), create(pod, "b"))
    assert len(pod.factory.configs) == 1
    assert pod.publisher.topics() == ["/tasks/create", "/tasks/create"]
    await pod.tasks.aclose()
    await pod.owner.aclose()


async def test_cancelled_boot_rolls_back_and_propagates(tmp_path: Path) -> None:
    pod = make_pod(tmp_path)
    pod.factory.delay = 10
    creating = asyncio.create_task(create(pod))
    await asyncio.sleep(0.05)
    assert pod.tasks.pod_state is PodState.BOOTING
    creating.cancel()
    with pytest.raises(asyncio.CancelledError):
        await creating
    assert pod.tasks.pod_state.value == "empty"
    with pytest.raises(errors.NotFound):
        await pod.tasks.state("c1")
    pod.factory.delay = 0
    await create(pod)  # the next Create boots again
    await pod.tasks.aclose()
    await pod.owner.aclose()


async def test_the_pods_last_container_skips_the_guest_remove(pod: Pod) -> None:
    """RemoveContainer runs in the guest unless the pod ends with the container: a lone
    container (its id is the pod's) deleted last is taken down by DestroySandbox instead."""
    await create(pod, "pod1")
    await pod.tasks.create(CreateTask(id="app", bundle=str(pod.bundle(
        "app", {"io.kubernetes.cri.sandbox-id": "pod1"}))))
    for cid in ("app", "pod1"):
        await pod.tasks.start(cid)
        await pod.sandbox.finish(cid)
        await pod.tasks.wait(cid)
    await pod.tasks.delete("app")  # another container of the pod: removed in the guest
    await pod.tasks.delete("pod1")  # the pod's own, last: only its host side is released
    removals = [(name, cid) for name, cid, _ in pod.sandbox.calls
                if name in ("RemoveContainer", "release")]
    assert removals == [("RemoveContainer", "app"), ("release", "pod1")]
    assert await pod.tasks.shutdown(now=False)


async def test_the_pods_own_container_is_removed_while_others_remain(pod: Pod) -> None:
    await create(pod, "pod1")
    await pod.tasks.create(CreateTask(id="app", bundle=str(pod.bundle(
        "app", {"io.kubernetes.cri.sandbox-id": "pod1"}))))
    await pod.tasks.delete("pod1")  # never started; the app container still runs
    assert ("RemoveContainer", "pod1", "") in pod.sandbox.calls
