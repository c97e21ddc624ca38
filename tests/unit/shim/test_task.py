"""The task domain against a fake pod (agent, VM, rootfs): lifecycle, errors, event order, Wait
semantics, and what the pod's VM dying means for its processes."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from protocols.api.containerd.cgroups.v2 import metrics_pb2 as v2
from shim.core import errors
from shim.pod.admission import BootSlots
from shim.pod.pod import PodState
from shim.task import events
from shim.task.events import Stdio
from shim.task.process import CreateTask, ExecTask, ProcessState
from tests.unit.shim.conftest import Harness, make_harness
from tests.unit.shim.fakes import FakeAgent
from tests.unit.shim.helpers import make_fifos, read_to_eof, write_fifo

EXITED_AT = 1_700_000_000_123_456_789


async def create(h: Harness, cid: str = "c1", stdio: Stdio | None = None) -> int:
    return await h.tasks.create(CreateTask(id=cid, bundle=str(h.bundle(cid)),
                                           stdio=stdio or Stdio()))


async def test_lifecycle_and_event_order(h: Harness) -> None:
    assert await create(h) == 4242
    assert h.state() is PodState.READY
    assert (await h.tasks.state("c1")).state is ProcessState.CREATED
    waiter = asyncio.create_task(h.tasks.wait("c1"))
    assert await h.tasks.start("c1") == 4242
    assert (await h.tasks.state("c1")).state is ProcessState.RUNNING
    await h.agent.finish("c1", status=3)
    exit = await waiter
    assert (exit.exit_status, exit.exited_at, exit.pid) == (3, EXITED_AT, 4242)
    status = await h.tasks.state("c1")
    assert (status.state, status.exit_status, status.exited_at) == (
        ProcessState.STOPPED, 3, EXITED_AT)
    deleted = await h.tasks.delete("c1")
    assert (deleted.pid, deleted.exit_status, deleted.exited_at) == (4242, 3, EXITED_AT)
    assert h.publisher.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit",
                                      "/tasks/delete"]
    exit_event = h.publisher.events[2]
    assert exit_event == events.TaskExit("c1", "c1", 4242, 3, EXITED_AT)
    with pytest.raises(errors.NotFound):
        await h.tasks.state("c1")
    assert await h.tasks.shutdown(now=False)


async def test_first_create_boots_the_pod_once(h: Harness) -> None:
    await create(h, "sandbox")
    await h.tasks.create(CreateTask(id="app", bundle=str(h.bundle(
        "app", {"io.kubernetes.cri.sandbox-id": "sandbox"}))))
    assert [c.sandbox_id for c in h.booter.configs] == ["sandbox"]


async def test_misuse_is_a_failed_precondition(h: Harness) -> None:
    await create(h)
    with pytest.raises(errors.FailedPrecondition, match="cannot pause in state created"):
        await h.tasks.pause("c1")
    await h.tasks.start("c1")
    with pytest.raises(errors.FailedPrecondition, match="cannot start in state running"):
        await h.tasks.start("c1")
    with pytest.raises(errors.FailedPrecondition, match="cannot delete in state running"):
        await h.tasks.delete("c1")
    with pytest.raises(errors.AlreadyExists):
        await create(h)
    with pytest.raises(errors.NotFound):
        await h.tasks.start("nope")
    with pytest.raises(errors.NotFound):
        await h.tasks.state("c1", "nope")
    with pytest.raises(errors.InvalidArgument):
        await h.tasks.create(CreateTask(id="", bundle=str(h.root)))
    with pytest.raises(errors.InvalidArgument, match=r"config\.json"):
        await h.tasks.create(CreateTask(id="x", bundle=str(h.root / "missing")))
    with pytest.raises(errors.Unimplemented):
        await h.tasks.create(CreateTask(id="y", bundle=str(h.bundle("y")), checkpoint="/c"))
    await h.tasks.kill("c1", "", 9, False)
    await h.tasks.wait("c1")
    with pytest.raises(errors.NotFound, match="already finished"):
        await h.tasks.kill("c1", "", 9, False)
    assert not await h.tasks.shutdown(now=False)  # a container is still there


async def test_pause_resume(h: Harness) -> None:
    await create(h)
    await h.tasks.start("c1")
    await h.tasks.pause("c1")
    assert (await h.tasks.state("c1")).state is ProcessState.PAUSED
    assert "c1" in h.agent.paused
    with pytest.raises(errors.FailedPrecondition, match="cannot pause in state paused"):
        await h.tasks.pause("c1")
    await h.tasks.resume("c1")
    assert (await h.tasks.state("c1")).state is ProcessState.RUNNING
    assert h.publisher.topics()[-2:] == ["/tasks/paused", "/tasks/resumed"]


async def test_execs_exit_before_their_container(h: Harness) -> None:
    await create(h)
    await h.tasks.start("c1")
    for eid in ("e1", "e2"):
        await h.tasks.exec(ExecTask("c1", eid, {"args": ["sleep", "1"]}))
        assert await h.tasks.start("c1", eid) == 4242
    with pytest.raises(errors.AlreadyExists):
        await h.tasks.exec(ExecTask("c1", "e1", {}))
    await h.agent.finish("c1", "e1", status=7)
    assert (await h.tasks.wait("c1", "e1")).exit_status == 7
    await h.agent.finish("c1", status=0)  # init dies: e2 is killed and reported first
    await h.tasks.wait("c1")
    topics = [(e.topic, getattr(e, "id", getattr(e, "exec_id", ""))) for e in
              h.publisher.events]
    assert topics == [
        ("/tasks/create", ""), ("/tasks/start", ""),
        ("/tasks/exec-added", "e1"), ("/tasks/exec-started", "e1"),
        ("/tasks/exec-added", "e2"), ("/tasks/exec-started", "e2"),
        ("/tasks/exit", "e1"), ("/tasks/exit", "e2"), ("/tasks/exit", "c1"),
    ]
    assert h.agent.process("c1", "e2").signals == [9]
    exit_e2 = h.publisher.events[7]
    assert isinstance(exit_e2, events.TaskExit) and exit_e2.exit_status == 137
    await h.tasks.delete("c1", "e1")
    with pytest.raises(errors.NotFound):
        await h.tasks.state("c1", "e1")


async def test_exec_needs_a_running_container(h: Harness) -> None:
    await create(h)
    with pytest.raises(errors.FailedPrecondition, match="cannot exec in container state created"):
        await h.tasks.exec(ExecTask("c1", "e1", {}))
    await h.tasks.start("c1")
    await h.tasks.exec(ExecTask("c1", "e1", {}))
    with pytest.raises(errors.FailedPrecondition, match="cannot kill exec"):
        await h.tasks.kill("c1", "e1", 15, False)
    await h.tasks.delete("c1", "e1")  # a never-started exec may be deleted


async def test_kill_all_signals_every_process(h: Harness) -> None:
    await create(h)
    await h.tasks.start("c1")
    await h.tasks.exec(ExecTask("c1", "e1", {}))
    await h.tasks.start("c1", "e1")
    await h.tasks.kill("c1", "", 10, True)
    assert h.agent.process("c1").signals == [10]
    assert h.agent.process("c1", "e1").signals == [10]


async def test_wait_returns_only_after_output_drained(h: Harness, tmp_path: Path) -> None:
    fifos = make_fifos(tmp_path)
    reader = asyncio.create_task(read_to_eof(fifos.stdout))
    await create(h, stdio=Stdio(stdout=str(fifos.stdout)))
    fd = os.open(fifos.stdout, os.O_RDONLY | os.O_NONBLOCK)  # keep the FIFO readable
    await h.tasks.start("c1")
    payload = os.urandom(4 << 20)  # more than the pipe (1 MiB) and the relay's two chunks
    process = h.agent.process("c1")
    process.stdout.max_buffer = 8 << 20
    await process.stdout.feed(payload)
    reader.cancel()  # containerd is slow: nobody drains the FIFO yet
    await h.agent.finish("c1", status=0)
    waiter = asyncio.create_task(h.tasks.wait("c1"))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    assert "/tasks/exit" not in h.publisher.topics()
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
    assert h.publisher.topics()[-1] == "/tasks/exit"


async def test_update_stats_resize_close_io_pids_connect(h: Harness) -> None:
    await create(h, stdio=Stdio(terminal=True))
    await h.tasks.start("c1")
    await h.tasks.update("c1", {"cpu": {"shares": 2}})
    [(cid, resources)] = h.agent.updates
    assert (cid, resources.CPU.Shares) == ("c1", 2)
    with pytest.raises(errors.InvalidArgument, match=r"update c1: .*cpu\.shares"):
        await h.tasks.update("c1", {"cpu": {"shares": "many"}})
    stats = await h.tasks.stats("c1")
    assert stats.type_url == "io.containerd.cgroups.v2.Metrics"
    metrics = v2.Metrics.FromString(stats.value)
    assert (metrics.cpu.usage_usec, metrics.pids.current) == (14, 1)
    await h.tasks.resize_pty("c1", "", 80, 24)
    assert h.agent.process("c1").resizes == [(24, 80)]
    await h.tasks.close_io("c1", "", True)
    assert await h.tasks.pids("c1") == [4242]
    assert await h.tasks.connect("c1") == (os.getpid(), 4242)
    assert await h.tasks.connect("unknown") == (os.getpid(), 0)


async def test_an_agent_deadline_leaves_the_process_as_it_was(tmp_path: Path) -> None:
    """The agent facade bounds StartContainer (its per-RPC table); the task stays created."""

    class Deaf(FakeAgent):
        async def start_container(self, container_id: str) -> None:
            raise errors.DeadlineExceeded("agent StartContainer: no answer from the pod VM in 1 s")

    h = make_harness(tmp_path, Deaf())
    await create(h)
    with pytest.raises(errors.DeadlineExceeded, match="StartContainer"):
        await h.tasks.start("c1")
    assert (await h.tasks.state("c1")).state is ProcessState.CREATED
    await h.tasks.delete("c1")
    await h.aclose()


async def test_failed_boot_rolls_back_the_pod_state(tmp_path: Path) -> None:
    h = make_harness(tmp_path)
    h.booter.failure = errors.Unavailable("no QEMU")
    with pytest.raises(errors.Unavailable):
        await create(h)
    assert h.state() is PodState.EMPTY
    with pytest.raises(errors.NotFound):
        await h.tasks.state("c1")
    await h.aclose()
    assert h.state() is PodState.STOPPED
    with pytest.raises(errors.FailedPrecondition, match="cannot boot in state stopped"):
        await create(h)


async def test_a_rootfs_failure_is_reported_as_such(h: Harness) -> None:
    async def fail(*args: object) -> None:
        raise errors.Internal("container c1: mounting its rootfs failed: mount: no such file")

    await create(h, "pod0")  # the pod boots; then the next container's rootfs fails
    h.booter.rootfs[-1].add = fail  # type: ignore[method-assign, assignment]
    with pytest.raises(errors.Internal, match="mounting its rootfs failed"):
        await create(h, "c1")
    with pytest.raises(errors.NotFound):
        await h.tasks.state("c1")


async def test_teardown_cancels_relays_and_stops_the_vm(h: Harness, tmp_path: Path) -> None:
    fifos = make_fifos(tmp_path)
    await create(h, stdio=Stdio(stdin=str(fifos.stdin), stdout=str(fifos.stdout)))
    await h.tasks.start("c1")
    waiter = asyncio.create_task(h.tasks.wait("c1"))
    await h.aclose()
    assert h.vm.stopped and ("DestroySandbox", "", "") in h.agent.calls
    assert h.booter.rootfs[-1].closed
    waiter.cancel()


async def test_oom_events_are_published_for_known_containers(h: Harness) -> None:
    await create(h)
    h.agent.oom_events.put_nowait("unknown")
    h.agent.oom_events.put_nowait("c1")
    for _ in range(100):
        if "/tasks/oom" in h.publisher.topics():
            break
        await asyncio.sleep(0.01)
    assert h.publisher.events[-1] == events.TaskOOM("c1")
    assert h.publisher.topics().count("/tasks/oom") == 1


async def test_an_oom_kill_answered_before_the_exit_is_published_before_it(h: Harness) -> None:
    """The agent queues an OOM kill before it answers the killed process's WaitProcess (both
    on one connection, in that order). /tasks/oom must then reach containerd before
    /tasks/exit: CRI deletes the task on its exit, and the container is OOMKilled only if the
    OOM event found it."""
    await create(h)
    await h.tasks.start("c1")
    await asyncio.sleep(0)  # the reaper is waiting for the exit
    h.agent.oom_events.put_nowait("c1")  # both answers arrive in the same loop step
    await h.agent.finish("c1", status=137)
    await h.tasks.wait("c1")
    topics = h.publisher.topics()
    assert topics[-2:] == ["/tasks/oom", "/tasks/exit"], topics


async def test_a_container_joining_the_pods_pid_namespace_asks_for_sandbox_pidns(
        h: Harness) -> None:
    """CRI shareProcessNamespace: every container's spec names the pod's PID namespace path;
    in the guest that is the pod's PID namespace (sandbox_pidns), the path itself stays out."""
    bundle = h.bundle("c1")
    doc = json.loads((bundle / "config.json").read_text())
    doc["linux"] = {"namespaces": [{"type": "pid", "path": "/proc/77/ns/pid"}]}
    (bundle / "config.json").write_text(json.dumps(doc))
    await h.tasks.create(CreateTask(id="c1", bundle=str(bundle), stdio=Stdio()))
    await create(h, "c2")
    assert h.agent.sandbox_pidns == {"c1": True, "c2": False}
    assert [(ns.Type, ns.Path) for ns in h.agent.containers["c1"].Linux.Namespaces] == [
        ("pid", "")]


async def test_wait_on_a_task_deleted_before_start_is_released(h: Harness) -> None:
    await create(h)
    waiter = asyncio.create_task(h.tasks.wait("c1"))
    await asyncio.sleep(0)
    await h.tasks.delete("c1")
    with pytest.raises(errors.NotFound, match="deleted before it ran"):
        await waiter


async def test_slow_boot_is_shared_by_concurrent_creates(h: Harness) -> None:
    h.booter.delay = 0.2
    await asyncio.gather(create(h, "a"), create(h, "b"))
    assert len(h.booter.configs) == 1
    assert h.publisher.topics() == ["/tasks/create", "/tasks/create"]


async def test_concurrent_creates_of_one_id_exactly_one_wins(h: Harness) -> None:
    """The id is reserved before the boot is awaited (runc's ReserveProcess): the second
    Create of the same id is AlreadyExists at once, however long the first one takes."""
    h.booter.delay = 0.2
    results = await asyncio.gather(create(h, "c1"), create(h, "c1"), return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["AlreadyExists", "int"]
    assert [c for c in h.agent.calls if c[0] == "CreateContainer"] == [
        ("CreateContainer", "c1", "")]
    assert h.publisher.topics() == ["/tasks/create"]
    assert len(h.booter.configs) == 1


async def test_a_failed_create_releases_its_id(h: Harness) -> None:
    with pytest.raises(errors.InvalidArgument):
        await h.tasks.create(CreateTask(id="c1", bundle=str(h.root / "missing")))
    assert await create(h, "c1") == 4242  # the id is free again


async def test_cancelled_boot_rolls_back_and_propagates(h: Harness) -> None:
    h.booter.delay = 10
    creating = asyncio.create_task(create(h))
    await asyncio.sleep(0.05)
    assert h.state() is PodState.BOOTING
    creating.cancel()
    with pytest.raises(asyncio.CancelledError):
        await creating
    assert h.state() is PodState.EMPTY
    with pytest.raises(errors.NotFound):
        await h.tasks.state("c1")
    h.booter.delay = 0
    await create(h)  # the next Create boots again


async def test_the_pods_last_container_skips_the_guest_remove(h: Harness) -> None:
    """RemoveContainer runs in the guest unless the pod ends with the container: a lone
    container (its id is the pod's) deleted last is taken down by DestroySandbox instead."""
    await create(h, "pod1")
    await h.tasks.create(CreateTask(id="app", bundle=str(h.bundle(
        "app", {"io.kubernetes.cri.sandbox-id": "pod1"}))))
    for cid in ("app", "pod1"):
        await h.tasks.start(cid)
        await h.agent.finish(cid)
        await h.tasks.wait(cid)
    await h.tasks.delete("app")  # another container of the pod: removed in the guest
    await h.tasks.delete("pod1")  # the pod's own, last: only its host side is released
    assert [cid for name, cid, _ in h.agent.calls if name == "RemoveContainer"] == ["app"]
    assert h.booter.rootfs[-1].removed == ["app", "pod1"]
    assert await h.tasks.shutdown(now=False)


async def test_the_pods_own_container_is_removed_while_others_remain(h: Harness) -> None:
    await create(h, "pod1")
    await h.tasks.create(CreateTask(id="app", bundle=str(h.bundle(
        "app", {"io.kubernetes.cri.sandbox-id": "pod1"}))))
    await h.tasks.delete("pod1")  # never started; the app container still runs
    assert ("RemoveContainer", "pod1", "") in h.agent.calls


async def test_vm_death_reports_every_process_killed_then_tears_down(h: Harness) -> None:
    """The VM watcher drives the pod to EXITED: every started process exits 137 with its
    event, and only then is the host side torn down; containerd's Deletes still work."""
    await create(h)
    await h.tasks.start("c1")
    await h.tasks.exec(ExecTask("c1", "e1", {"args": ["sleep", "1"]}))
    await h.tasks.start("c1", "e1")
    rootfs = h.booter.rootfs[-1]
    torn_down_at: list[list[str]] = []
    rootfs.on_close = lambda: torn_down_at.append(h.publisher.topics())
    h.vm.die()
    assert (await h.tasks.wait("c1")).exit_status == 137
    assert (await h.tasks.wait("c1", "e1")).exit_status == 137
    for _ in range(100):
        if rootfs.closed:
            break
        await asyncio.sleep(0.01)
    assert h.state() is PodState.EXITED and h.agent.closed
    # Both exits were published before the teardown began.
    assert torn_down_at == [h.publisher.topics()]
    assert h.publisher.topics()[-2:] == ["/tasks/exit", "/tasks/exit"]
    with pytest.raises(errors.FailedPrecondition, match="cannot boot in state exited"):
        await create(h, "c2")  # a dead pod's shim takes no new containers
    await h.tasks.delete("c1", "e1")
    await h.tasks.delete("c1")
    assert ("DestroySandbox", "", "") not in h.agent.calls  # the VM was gone
    assert await h.tasks.shutdown(now=False)


@pytest.mark.parametrize("bad", ["../..", "a/b", "-x", "x" * 77, "a..b", "with space"])
async def test_ids_outside_containerds_rules_are_refused_before_any_path(
        h: Harness, bad: str) -> None:
    """A container, exec or sandbox id becomes a host path: refused, naming it, and the pod is
    never booted for it."""
    with pytest.raises(errors.InvalidArgument, match="container id"):
        await h.tasks.create(CreateTask(id=bad, bundle=str(h.bundle("ok"))))
    with pytest.raises(errors.InvalidArgument, match=r"io\.kubernetes\.cri\.sandbox-id"):
        await h.tasks.create(CreateTask(id="app", bundle=str(h.bundle(
            "app", {"io.kubernetes.cri.sandbox-id": bad}))))
    assert h.booter.configs == []
    await create(h)
    await h.tasks.start("c1")
    with pytest.raises(errors.InvalidArgument, match="exec id"):
        await h.tasks.exec(ExecTask(container_id="c1", exec_id=bad, spec={"args": ["true"]}))
    assert h.publisher.topics() == ["/tasks/create", "/tasks/start"]


async def test_an_oom_flood_is_one_event_per_container_per_interval(h: Harness) -> None:
    """A guest reports OOM as often as it likes; containerd gets one per container per
    ``oom_event_interval``."""
    await create(h)
    await create(h, "c2")
    for _ in range(1000):
        h.agent.oom_events.put_nowait("c1")
    h.agent.oom_events.put_nowait("c2")
    for _ in range(500):
        if h.agent.oom_events.empty() and h.publisher.topics().count("/tasks/oom") >= 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # nothing more comes of the flood
    assert [e for e in h.publisher.events if isinstance(e, events.TaskOOM)] == [
        events.TaskOOM("c1"), events.TaskOOM("c2")]
    await asyncio.sleep(0.35)  # FAST.oom_event_interval later, the next one passes
    h.agent.oom_events.put_nowait("c1")
    for _ in range(500):
        if h.publisher.topics().count("/tasks/oom") == 3:
            break
        await asyncio.sleep(0.01)
    assert h.publisher.topics().count("/tasks/oom") == 3


class EndlessOutputAgent(FakeAgent):
    """A hostile guest: stdout never ends, even after the process exited."""

    async def read_stdout(self, container_id: str, exec_id: str, size: int) -> bytes:
        await asyncio.sleep(0)
        return b"y" * 4096


async def test_output_that_never_ends_cannot_hold_back_the_exit(tmp_path: Path) -> None:
    h = make_harness(tmp_path, EndlessOutputAgent())
    try:
        await create(h)
        await h.tasks.start("c1")
        waiter = asyncio.create_task(h.tasks.wait("c1"))
        h.agent.process("c1").exit.set_result(0)
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(3):
            exit = await waiter
        assert exit.exit_status == 0
        assert asyncio.get_running_loop().time() - started < 0.3 + 1.0  # FAST.output_drain
        assert "/tasks/exit" in h.publisher.topics()
        await h.tasks.delete("c1")
    finally:
        await h.aclose()


class StuckStdinAgent(FakeAgent):
    """A hostile guest: WriteStdin never answers (it blocks for back-pressure forever)."""

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        await asyncio.Future()
        raise AssertionError("unreachable")


async def test_close_io_cannot_hang_behind_a_stuck_write_stdin(tmp_path: Path) -> None:
    h = make_harness(tmp_path, StuckStdinAgent())
    fifos = make_fifos(tmp_path)
    try:
        await create(h, stdio=Stdio(stdin=str(fifos.stdin)))
        await h.tasks.start("c1")
        await write_fifo(fifos.stdin, b"hello\n")
        async with asyncio.timeout(0.3 + 1.5):  # FAST.stdin_flush, then CloseStdin
            await h.tasks.close_io("c1", "", stdin=True)
        assert ("CloseStdin", "c1", "") in h.agent.calls
        await h.agent.finish("c1")
        await h.tasks.wait("c1")
        await h.tasks.delete("c1")
    finally:
        await h.aclose()


async def test_a_dropped_agent_connection_fails_the_pod_with_137(h: Harness) -> None:
    """The agent's connection drops (vhost-device-vsock died, the guest hung up) while the VM
    still runs: the VM is stopped and every process reported killed — not exit 255 with the
    workloads still running."""
    await create(h)
    await h.tasks.start("c1")
    await h.tasks.exec(ExecTask("c1", "e1", {"args": ["sleep", "1"]}))
    await h.tasks.start("c1", "e1")
    await h.agent.close()  # the connection is gone; the VM is not
    async with asyncio.timeout(2):
        assert (await h.tasks.wait("c1")).exit_status == 137
        assert (await h.tasks.wait("c1", "e1")).exit_status == 137
    assert h.vm.stopped
    for _ in range(100):
        if h.state() is PodState.EXITED and h.booter.rootfs[-1].closed:
            break
        await asyncio.sleep(0.01)
    assert h.state() is PodState.EXITED and h.booter.rootfs[-1].closed
    exits = [e for e in h.publisher.events if isinstance(e, events.TaskExit)]
    assert sorted(e.exit_status for e in exits) == [137, 137]
    await h.tasks.delete("c1", "e1")
    await h.tasks.delete("c1")


class DeafToSigkillAgent(FakeAgent):
    """A hostile or hung guest: SignalProcess gets no answer within its bound."""

    async def signal_process(self, container_id: str, exec_id: str, signal: int) -> None:
        raise errors.DeadlineExceeded("agent SignalProcess: no answer from the pod VM in 10 s")


async def test_an_unanswered_sigkill_stops_the_vm_and_the_task_is_deletable(
        tmp_path: Path) -> None:
    h = make_harness(tmp_path, DeafToSigkillAgent())
    try:
        await create(h)
        await h.tasks.start("c1")
        with pytest.raises(errors.DeadlineExceeded):  # any other signal: the error as it is
            await h.tasks.kill("c1", "", 15, False)
        assert not h.vm.stopped
        async with asyncio.timeout(2):
            await h.tasks.kill("c1", "", 9, False)
            assert (await h.tasks.wait("c1")).exit_status == 137
        assert h.vm.stopped
        await h.tasks.delete("c1")
        assert h.publisher.topics()[-2:] == ["/tasks/exit", "/tasks/delete"]
    finally:
        await h.aclose()


async def test_the_pods_first_container_start_gives_its_boot_slot_back(
        tmp_path: Path) -> None:
    """The boot slot the pod's boot holds goes back at its first container's start (the pod
    is usable); a refused start gives it back too."""
    for refused in (False, True):
        agent = FakeAgent()
        h = make_harness(tmp_path / f"refused-{refused}", agent)
        h.root.mkdir()
        slots = BootSlots(tmp_path / f"slots-{refused}", 1)
        h.booter.slots = slots
        try:
            await create(h, "sandbox")
            assert slots.try_take() is None  # held by the booted pod
            if refused:
                agent.start_container = refuse  # type: ignore[method-assign]
                with pytest.raises(errors.RpcError):
                    await h.tasks.start("sandbox")
            else:
                await h.tasks.start("sandbox")
            free = slots.try_take()
            assert free is not None
            free.release()
        finally:
            await h.aclose()


async def refuse(container_id: str) -> None:
    raise errors.RpcError(f"agent StartContainer {container_id}: refused")
