"""The guest's work after Check: its timeline (agent → console → the shim's trace → the bench),
the machinery it imports, the runtime's binary pinned read-only, the lazy guest puller."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from guest.agent import runc, timeline
from guest.agent.__main__ import LazyGuestPull
from guest.agent.errors import RuntimeFailure
from hypervisor.console import ConsoleWatch
from shim.core import trace
from tests.support.bench import load_bench

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def traced() -> Any:
    timeline.enable(True)
    yield
    timeline.enable(False)


def test_a_mark_writes_nothing_unless_enabled(capfd: pytest.CaptureFixture[str]) -> None:
    timeline.enable(False)
    timeline.mark("CreateSandbox begins")
    assert capfd.readouterr().err == ""


def test_the_guests_marks_reach_the_hosts_trace_with_the_guests_clock(
        traced: None, capfd: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = __import__("time").monotonic()
    timeline.mark("runtime create: spawned")
    timeline.mark("CreateContainer ends")
    after = __import__("time").monotonic()
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith(trace.GUEST_PREFIX) for line in lines)
    path = tmp_path / "trace"
    monkeypatch.setenv(trace.TRACE_ENV, str(path))
    watch_lines: list[str] = []

    async def feed() -> None:
        watch = ConsoleWatch(on_line=watch_lines.append)
        # as the console delivers it: a kernel line between, CRs, any chunking
        data = ("[    1.2] virtio_net: x\r\n" + "\r\n".join(lines) + "\r\n").encode()
        for i in range(0, len(data), 7):
            watch.feed(data[i:i + 7])

    asyncio.run(feed())
    for line in watch_lines:
        trace.guest_line(line)
    marks = [trace.guest_step(step) for _, _, step in trace.read(path)]
    assert [name for _, name in marks if name] == ["runtime create: spawned",  # type: ignore[misc]
                                                   "CreateContainer ends"]
    assert all(m is not None and before <= m[0] <= after for m in marks)


def test_console_lines_without_a_mark_are_not_traced(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "trace"
    monkeypatch.setenv(trace.TRACE_ENV, str(path))
    for line in ("coco-agent: ready (uptime 3.1 s)", "coco-agent trace notanumber x",
                 "coco-agent trace 1.5 "):
        trace.guest_line(line)
    assert not path.exists()
    assert trace.guest_step("agent: Check answered") is None


def test_the_shim_asks_for_the_guests_timeline_only_when_tracing(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(trace.TRACE_ENV, raising=False)
    assert trace.kernel_params("quiet", measured=False) == "quiet"
    monkeypatch.setenv(trace.TRACE_ENV, str(tmp_path / "trace"))
    assert trace.kernel_params("quiet", measured=False) == f"quiet {trace.GUEST_TRACE_PARAM}"
    assert trace.kernel_params("", measured=False) == trace.GUEST_TRACE_PARAM
    # a measured command line (every confidential profile) is never changed by tracing
    assert trace.kernel_params("quiet", measured=True) == "quiet"
    assert trace.kernel_params("", measured=True) == ""
    boot = (REPO / "shim" / "pod" / "boot.py").read_text()
    assert "extra_kernel_params=trace.kernel_params(" in boot
    assert "measured=self.profile.confidential)" in boot
    init = (REPO / "packaging" / "guest-image" / "init").read_text()
    assert f'{trace.GUEST_TRACE_PARAM}) agent_args="$agent_args --trace"; TRACE=1' in init
    assert trace.GUEST_PREFIX == timeline.PREFIX


def test_a_development_guest_imports_neither_puller_nor_netlink() -> None:
    probe = (
        "import sys, guest.agent.__main__ as agent\n"
        "agent.import_machinery(guest_pull=False)\n"
        "lazy = {'guest.image_pull.puller', 'guest.image_pull.pause', 'guest.agent.netlink'}\n"
        "assert not lazy & set(sys.modules), lazy & set(sys.modules)\n"
        "assert 'guest.agent.service' in sys.modules\n"
        "agent.import_machinery(guest_pull=True)\n"
        "assert 'guest.image_pull.puller' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True)


class FakePull:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def mount(self, container_id: str, source: str, driver_options: tuple[str, ...],
                    mount_point: str, target: str | None = None) -> Any:
        self.calls.append(("mount", container_id, source, mount_point))
        return "rootfs"

    def release(self, mount_point: str) -> None:
        self.calls.append(("release", mount_point))


def test_the_lazy_guest_pull_builds_its_handler_once_on_first_mount() -> None:
    made: list[FakePull] = []

    def make() -> FakePull:
        made.append(FakePull())
        return made[-1]

    lazy = LazyGuestPull(make)
    lazy.release("/run/kata-containers/x")  # nothing mounted: nothing built
    assert made == []
    got: list[object] = [asyncio.run(lazy.mount("c1", "busybox", (), "/m1")),
                         asyncio.run(lazy.mount("c2", "busybox", (), "/m2"))]
    assert got == ["rootfs", "rootfs"]
    lazy.release("/m1")
    assert len(made) == 1
    assert made[0].calls == [("mount", "c1", "busybox", "/m1"), ("mount", "c2", "busybox", "/m2"),
                             ("release", "/m1")]


def fake_statvfs(flag: int) -> Any:
    return lambda path: SimpleNamespace(f_flag=flag)


def test_the_runtime_is_bind_mounted_read_only(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    from guest.agent import mounts

    binary = tmp_path / "crun"
    binary.write_bytes(b"")
    binary.chmod(0o755)
    calls: list[tuple[str, str, int]] = []
    monkeypatch.setattr(mounts, "mount", lambda src, dst, fstype, flags=0, data="", **_:
                        calls.append((src, dst, flags)))
    monkeypatch.setattr(os, "statvfs", fake_statvfs(0))
    assert runc.pin_read_only(str(binary))
    path = os.path.realpath(binary)
    assert calls == [(path, path, mounts.MS_BIND),
                     (path, path, mounts.MS_REMOUNT | mounts.MS_BIND | mounts.MS_RDONLY)]


def test_a_runtime_on_a_read_only_root_is_left_alone(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    from guest.agent import mounts

    binary = tmp_path / "crun"
    binary.write_bytes(b"")
    binary.chmod(0o755)
    monkeypatch.setattr(mounts, "mount", lambda *a, **k: pytest.fail("mounted"))
    monkeypatch.setattr(os, "statvfs", fake_statvfs(os.ST_RDONLY))
    assert runc.pin_read_only(str(binary))


def test_a_runtime_that_cannot_be_pinned_still_runs(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from guest.agent import mounts

    binary = tmp_path / "crun"
    binary.write_bytes(b"")
    binary.chmod(0o755)

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeFailure("mount: permission denied")

    monkeypatch.setattr(mounts, "mount", refuse)
    monkeypatch.setattr(os, "statvfs", fake_statvfs(0))
    assert not runc.pin_read_only(str(binary))
    assert "re-executes itself instead" in caplog.text
    assert not runc.pin_read_only(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_bench("run")


def test_the_bench_lays_the_guests_marks_out_from_its_check(bench: ModuleType, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    path = tmp_path / "trace"
    monkeypatch.setenv(trace.TRACE_ENV, str(path))
    trace.mark("agent: Check answered")
    for line in ("coco-agent trace 100.500000 machinery import begins",
                 "coco-agent trace 100.600000 Check answered",
                 "coco-agent trace 101.000000 runtime create: exited",
                 "coco-agent trace 101.250000 runtime create: exited"):
        trace.guest_line(line)
    window = (0.0, float("inf"))
    assert [step for step, _ in bench.traced_steps(path, *window)] == ["agent: Check answered"]
    got = bench.guest_steps(path, *window)
    assert [step for step, _ in got] == [
        "guest: machinery import begins", "guest: Check answered",
        "guest: runtime create: exited", "guest: runtime create: exited #2"]
    assert [round(offset, 3) for _, offset in got] == [-0.1, 0.0, 0.4, 0.65]
