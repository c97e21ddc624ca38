"""Container state machine, with a fake runc (the real one is driven by the integration tests)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from guest.agent.containers import (
    CONTAINER_ACTIONS,
    Container,
    ContainerState,
    validate_id,
)
from guest.agent.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RuntimeFailure,
)
from guest.agent.reaper import Reaper
from guest.agent.runc import Runc, error_for, last_log_error


class FakeRunc(Runc):
    def __init__(self) -> None:
        super().__init__(Reaper(), root=Path("/nonexistent"))
        self.calls: list[str] = []

    async def start(self, container_id: str) -> None:
        self.calls.append("start")

    async def pause(self, container_id: str) -> None:
        self.calls.append("pause")

    async def resume(self, container_id: str) -> None:
        self.calls.append("resume")

    async def update(self, container_id: str, resources: dict[str, Any], scratch: Path) -> None:
        self.calls.append("update")

    async def stats(self, container_id: str) -> dict[str, Any]:
        self.calls.append("events --stats")
        return {"pids": {"current": 7}}


def container() -> Container:
    runc = FakeRunc()
    c = Container("c1", Path("/nonexistent"), runc, runc._reaper, [])
    c.exe_of = lambda pid: None  # no /proc entry: start does not wait for an exec
    return c


def state_of(c: Container) -> ContainerState:
    return c.state  # a call, so the checker does not narrow the state across awaits


class FakeInit:
    pid = 4242
    name = "c1"

    def __init__(self) -> None:
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()


async def test_lifecycle_transitions() -> None:
    c = container()
    c.init = FakeInit()  # type: ignore[assignment]
    assert c.state is ContainerState.CREATED
    await c.start()
    assert state_of(c) is ContainerState.RUNNING
    with pytest.raises(FailedPrecondition, match="cannot start container c1 in state running"):
        await c.start()
    await c.pause()
    assert state_of(c) is ContainerState.PAUSED
    with pytest.raises(FailedPrecondition, match="cannot exec container c1 in state paused"):
        await c.exec("e1", {"args": ["true"]})
    await c.resume()
    assert state_of(c) is ContainerState.RUNNING
    with pytest.raises(FailedPrecondition):
        await c.resume()


def test_allowed_states_table() -> None:
    assert CONTAINER_ACTIONS["start"] == {ContainerState.CREATED}
    assert CONTAINER_ACTIONS["exec"] == {ContainerState.RUNNING}
    for allowed in CONTAINER_ACTIONS.values():
        assert ContainerState.STOPPED not in allowed


@pytest.mark.parametrize("state", list(ContainerState))
def test_require_names_action_and_state(state: ContainerState) -> None:
    c = container()
    c.state = state
    for action, allowed in CONTAINER_ACTIONS.items():
        if state in allowed:
            c.require(action)
        else:
            with pytest.raises(
                FailedPrecondition, match=f"cannot {action} .* in state {state.value}"
            ):
                c.require(action)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-lead", "x" * 200, "sp ace"])
def test_invalid_ids(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_id("container", bad)


def test_runc_messages_become_typed_errors(tmp_path: Path) -> None:
    assert isinstance(error_for("start", 'container "x" does not exist'), NotFound)
    assert isinstance(
        error_for("create", "container with id exists: x already exists"), AlreadyExists
    )
    assert isinstance(
        error_for("start", "cannot start a container that has stopped"), FailedPrecondition
    )
    assert isinstance(error_for("create", "something odd"), RuntimeFailure)
    log = tmp_path / "runc.log"
    log.write_text(
        '{"level":"info","msg":"x"}\n'
        '{"level":"error","msg":"exec: \\"nope\\": executable file not found"}\n'
        "not json\n"
    )
    assert last_log_error(log) == 'exec: "nope": executable file not found'
    assert last_log_error(tmp_path / "missing") == ""


async def test_stats_read_the_cgroup2_files_else_ask_the_runtime(tmp_path: Path) -> None:
    c = container()
    c.init = FakeInit()  # type: ignore[assignment]
    runc = c.runc
    assert isinstance(runc, FakeRunc)
    # Not a cgroup2 mount (v1 or hybrid host): the runtime's `events --stats`.
    assert (await c.stats(cgroup_root=tmp_path))["pids"]["current"] == 7
    assert runc.calls == ["events --stats"]
    # A cgroup2 mount: the container's own cgroup files, whatever the runtime.
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    leaf = tmp_path / c.cgroup_parent.lstrip("/") / c.id
    leaf.mkdir(parents=True)
    (leaf / "pids.current").write_text("3\n")
    assert (await c.stats(cgroup_root=tmp_path))["pids"]["current"] == 3
    assert runc.calls == ["events --stats"]


def test_oom_kills_come_from_memory_events(tmp_path: Path) -> None:
    c = container()
    assert c.oom_kills(cgroup_root=tmp_path) == 0  # no cgroup (yet): no kills
    c.cgroup(tmp_path).mkdir(parents=True)
    (c.cgroup(tmp_path) / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\n")
    assert c.oom_kills(cgroup_root=tmp_path) == 2


class CapturingRunc(FakeRunc):
    """runc create reads the bundle's config.json (what the OCI runtime would run), then stops."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, Any] = {}

    async def create(self, container_id: str, bundle: Path, pid_file: Path, **_: Any) -> None:
        import json

        self.seen = json.loads((bundle / "config.json").read_text())
        raise RuntimeFailure("stopped by the test after create")


class FakeUnsealer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.dirs: list[Path] = []

    def unseal_spec(self, spec: dict[str, Any], secrets_dir: Path) -> dict[str, Any]:
        self.dirs.append(secrets_dir)
        if self.fail:
            raise ValueError("sealed secret refused: the JWS signature does not verify")
        env = [e.replace("sealed.x", "opened") for e in spec["process"]["env"]]
        return {**spec, "process": {**spec["process"], "env": env}}


async def test_sealed_values_are_unsealed_before_the_runtime_sees_the_spec(
    tmp_path: Path,
) -> None:
    runc = CapturingRunc()
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    spec = {"process": {"args": ["true"], "env": ["A=sealed.x"]}}
    unsealer = FakeUnsealer()
    with pytest.raises(RuntimeFailure, match="stopped by the test"):
        await Container.create("c1", spec, bundle=tmp_path / "b", rootfs=rootfs, storages=[],
                               runc=runc, reaper=runc._reaper, secrets=unsealer)
    assert runc.seen["process"]["env"] == ["A=opened"]
    assert unsealer.dirs == [tmp_path / "b" / "sealed"]  # plaintext files live in the bundle


async def test_an_unsealing_failure_names_the_container(tmp_path: Path) -> None:
    runc = CapturingRunc()
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    spec = {"process": {"args": ["true"], "env": ["A=sealed.x"]}}
    with pytest.raises(FailedPrecondition, match="container c1: sealed secret refused"):
        await Container.create("c1", spec, bundle=tmp_path / "b", rootfs=rootfs, storages=[],
                               runc=runc, reaper=runc._reaper, secrets=FakeUnsealer(fail=True))
    assert runc.seen == {}  # the runtime never ran
