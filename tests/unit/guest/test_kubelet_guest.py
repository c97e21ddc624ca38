"""Guest pieces the kubelet relies on: pod namespaces in the spec, console socket paths that
fit, the exec wait after start, OOM kills queued before the exit is answered, inotify."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from guest.agent import inotify
from guest.agent.containers import Container, Process, prepare_spec, wait_for_exec, would_drop
from guest.agent.errors import NotFound
from guest.agent.reaper import Reaper
from guest.agent.runc import Runc
from guest.agent.sandbox import AgentPaths, Sandbox
from guest.agent.stdio import OutputBuffer

CRI_ID = "0123456789abcdef" * 4  # CRI container and exec ids are 64 hex characters
UNIX_PATH_MAX = 108


def base_spec() -> dict[str, Any]:
    return {
        "process": {"args": ["sh"]},
        "linux": {
            "namespaces": [
                {"type": "pid", "path": "/proc/7/ns/pid"},
                {"type": "ipc", "path": "/proc/7/ns/ipc"},
                {"type": "uts", "path": "/proc/7/ns/uts"},
                {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
            ],
            "sysctl": {"kernel.shm_rmid_forced": "1"},
        },
    }


def test_spec_joins_the_pod_namespaces_and_drops_host_paths() -> None:
    joined = {"ipc": Path("/run/coco-agent/ns/ipc"), "uts": Path("/run/coco-agent/ns/uts")}
    out = prepare_spec(base_spec(), "c1", Path("/rootfs"), pod_namespaces=joined)
    assert out["linux"]["namespaces"] == [
        {"type": "pid"},  # not shared: a new one (host paths mean nothing in the guest)
        {"type": "ipc", "path": "/run/coco-agent/ns/ipc"},
        {"type": "uts", "path": "/run/coco-agent/ns/uts"},
        {"type": "mount"},
    ]
    assert out["linux"]["sysctl"] == {"kernel.shm_rmid_forced": "1"}  # applied where joined
    shared_pid = prepare_spec(
        base_spec(), "c1", Path("/rootfs"), pod_namespaces={"pid": Path("/proc/42/ns/pid")}
    )
    assert shared_pid["linux"]["namespaces"][0] == {"type": "pid", "path": "/proc/42/ns/pid"}
    assert {"type": "ipc"} in shared_pid["linux"]["namespaces"]


def container(tmp_path: Path, sockets: Path | None) -> Container:
    reaper = Reaper()
    return Container(
        CRI_ID,
        tmp_path / "containers" / CRI_ID,
        Runc(reaper, root=tmp_path / "runc"),
        reaper,
        [],
        sockets=sockets,
    )


def test_console_sockets_fit_whatever_the_ids(tmp_path: Path) -> None:
    guest = container(Path("/run/coco-agent"), Path("/run/coco-agent/sock"))
    paths = {guest.console_socket(exec_id, Path("/unused")) for exec_id in ("", CRI_ID, "e2")}
    assert len(paths) == 3  # one per process
    for path in paths:
        assert path.parent == Path("/run/coco-agent/sock")
        assert len(str(path).encode()) < UNIX_PATH_MAX
    # The old place, <bundles>/<id>/execs/<id>/console.sock, did not fit.
    old = Path("/run/coco-agent/containers") / CRI_ID / "execs" / CRI_ID / "console.sock"
    assert len(str(old).encode()) > UNIX_PATH_MAX
    # And a socket really binds there (the state dir may be anywhere).
    local = container(tmp_path, tmp_path / "sock")
    path = local.console_socket(CRI_ID, Path("/unused"))
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


class FakeProcess:
    def __init__(self) -> None:
        self.pid = 4242
        self.name = "c1"
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()


async def test_start_waits_for_the_exec() -> None:
    process = FakeProcess()
    seen = iter(["/usr/bin/crun", "/usr/bin/crun", "/usr/bin/crun", "/bin/busybox"])
    calls: list[int] = []

    def exe_of(pid: int) -> str | None:
        calls.append(pid)
        return next(seen)

    assert await wait_for_exec(process, "/usr/bin/crun", exe_of)  # type: ignore[arg-type]
    assert calls == [4242] * 4
    # Gone (a zombie has no exe) or exited: nothing to wait for.
    assert await wait_for_exec(process, "/usr/bin/crun", lambda pid: None)  # type: ignore[arg-type]
    process.exited.set_result(0)
    assert await wait_for_exec(process, "/usr/bin/crun", lambda pid: "/usr/bin/crun")  # type: ignore[arg-type]


async def test_start_gives_up_waiting_for_an_exec_that_never_comes() -> None:
    process = FakeProcess()
    never = await wait_for_exec(process, "/x", lambda pid: "/x", limit=0.05)  # type: ignore[arg-type]
    assert never is False


def sandbox(tmp_path: Path) -> Sandbox:
    return Sandbox(Reaper(), AgentPaths(tmp_path, tmp_path / "shared"), manage_system=False)


async def test_an_oom_kill_is_queued_before_the_exit_is_answered(tmp_path: Path) -> None:
    box = sandbox(tmp_path)
    c = container(tmp_path, None)
    c.on_exit = box._check_oom
    kills = iter([0, 1, 1])
    c.oom_kills = lambda *args: next(kills)  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    init_exit: asyncio.Future[int] = loop.create_future()
    exec_exit: asyncio.Future[int] = loop.create_future()
    init_exit.add_done_callback(c._on_init_exit)  # as Container.create does
    exec_exit.add_done_callback(c._on_process_exit)  # as Container.exec does
    box.containers[c.id] = c

    exec_exit.set_result(0)  # an exec ends without an OOM kill: nothing queued
    await asyncio.sleep(0)
    order: list[str] = []

    async def wait_process() -> None:  # what WaitProcess does
        await asyncio.shield(init_exit)
        order.append("exit")

    async def get_oom_event() -> None:
        order.append(f"oom {await box.next_oom_event()}")

    waiters = [asyncio.ensure_future(get_oom_event()), asyncio.ensure_future(wait_process())]
    await asyncio.sleep(0)
    init_exit.set_result(137)
    await asyncio.gather(*waiters)
    assert order == [f"oom {CRI_ID}", "exit"]
    box._check_oom(c)  # the same kill is not reported twice
    assert box._oom_events.empty()


def test_inotify_events_are_parsed() -> None:
    event = inotify._EVENT.pack(3, inotify.IN_MODIFY, 0, 0)
    named = inotify._EVENT.pack(4, inotify.IN_IGNORED, 0, 16) + b"name".ljust(16, b"\0")
    assert inotify.parse_events(event + named + event[:5]) == [
        (3, inotify.IN_MODIFY),
        (4, inotify.IN_IGNORED),
    ]


async def test_inotify_reports_modified_files(tmp_path: Path) -> None:
    changed: asyncio.Queue[str] = asyncio.Queue()
    watcher = inotify.Inotify(changed.put_nowait)
    events = tmp_path / "memory.events"
    events.write_text("oom_kill 0\n")
    try:
        watcher.watch("c1", events)
        events.write_text("oom_kill 1\n")
        assert await asyncio.wait_for(changed.get(), 5) == "c1"
        watcher.unwatch("c1")
        events.write_text("oom_kill 2\n")
        await asyncio.sleep(0.05)
        assert changed.empty()
        with pytest.raises(NotFound, match="No such file"):
            watcher.watch("c2", tmp_path / "missing")
    finally:
        watcher.close()


def status(ns_pid: str, caught: int = 0, ignored: int = 0) -> str:
    return (
        f"Name:\tsh\nNSpid:\t{ns_pid}\nSigIgn:\t{ignored:016x}\nSigCgt:\t{caught:016x}\n"
    )


TERM_BIT = 1 << (signal.SIGTERM - 1)


def test_which_signals_the_init_of_a_pid_namespace_drops() -> None:
    assert would_drop(status("812\t1"), signal.SIGTERM)  # init, default disposition
    assert not would_drop(status("812\t1", caught=TERM_BIT), signal.SIGTERM)
    assert not would_drop(status("812\t1", ignored=TERM_BIT), signal.SIGTERM)
    assert not would_drop(status("812\t1"), signal.SIGKILL)  # forced from an ancestor
    assert not would_drop(status("812\t7"), signal.SIGTERM)  # not init: the default kills it
    assert not would_drop("Name:\tsh\n", signal.SIGTERM)


async def test_a_signal_right_after_start_waits_for_the_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[int] = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: sent.append(signum))
    read_end, write_end = os.pipe()
    os.close(write_end)
    process = Process("c1", "", 4242, False, asyncio.get_running_loop().create_future(),
                      OutputBuffer(read_end), None, None)
    statuses = iter([status("9\t1"), status("9\t1"), status("9\t1", caught=TERM_BIT)])
    process.status_of = lambda pid: next(statuses)
    process.hold_signals_until = asyncio.get_running_loop().time() + 5
    await process.deliver(signal.SIGTERM)
    assert sent == [signal.SIGTERM]
    # After the hold, or once the workload proved it will not handle it: at once.
    process.status_of = lambda pid: status("9\t1")
    process.hold_signals_until = 0.0
    await process.deliver(signal.SIGTERM)
    assert sent == [signal.SIGTERM, signal.SIGTERM]
    process.close()
