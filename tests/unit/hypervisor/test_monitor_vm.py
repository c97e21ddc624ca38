"""QMP monitor and VM supervision against a fake QEMU (fast, including hanging peers)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import psutil
import pytest

from hypervisor import vm as vm_module
from hypervisor.errors import QemuError, VmExited
from hypervisor.monitor import EVENT_QUEUE, EVENT_RING
from hypervisor.timeouts import TIMEOUTS, Timeouts
from hypervisor.vm import QemuVm, VmState

FAKE = Path(__file__).with_name("fake_qemu.py")


async def start_fake(tmp_path: Path, mode: str, *extra: str,
                     timeouts: Timeouts = TIMEOUTS) -> QemuVm:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sock = run_dir / "qmp.sock"
    argv = [sys.executable, str(FAKE), "-qmp", f"unix:{sock},server=on,wait=off",
            "--mode", mode, *extra, "-S"]
    vm = QemuVm(argv, run_dir, qmp_socket=sock, stderr_log=tmp_path / "stderr.log",
                timeouts=timeouts)
    await vm.start()
    return vm


FAST = Timeouts(graceful_stop=0.3, quit=0.3, kill=2.0, qmp_command=0.5)


async def test_guest_poweroff(tmp_path: Path) -> None:
    vm = await start_fake(tmp_path, "poweroff")
    assert vm.state is VmState.RUNNING
    reason = await asyncio.wait_for(vm.wait(), 5)
    assert (reason.kind, reason.detail, reason.clean, reason.returncode) == (
        "shutdown", "guest-shutdown", True, 0)
    assert vm.state.value == "exited"
    with pytest.raises(VmExited, match="guest-shutdown"):
        await vm.execute("query-status")


async def test_panic_is_abnormal_and_qemu_is_killed(tmp_path: Path) -> None:
    vm = await start_fake(tmp_path, "panic")
    reason = await asyncio.wait_for(vm.wait(), 5)
    assert (reason.kind, reason.clean) == ("panic", False)
    assert "pause" in reason.detail
    assert vm.pid is not None and not psutil.pid_exists(vm.pid)


async def test_unrequested_stop_ends_the_vm_after_grace(tmp_path: Path) -> None:
    vm = await start_fake(tmp_path, "stop", timeouts=Timeouts(stop_grace=0.2))
    reason = await asyncio.wait_for(vm.wait(), 5)
    assert (reason.kind, reason.clean) == ("stopped", False)
    assert reason.returncode == -9


async def test_graceful_stop_with_powerdown(tmp_path: Path) -> None:
    vm = await start_fake(tmp_path, "poweroff-on-request")
    reason = await vm.stop(powerdown_timeout=2)
    assert (reason.kind, reason.detail, reason.clean) == ("shutdown", "guest-shutdown", True)


async def test_stop_escalates_to_kill_when_qemu_ignores_everything(
        tmp_path: Path) -> None:
    vm = await start_fake(tmp_path, "deaf", timeouts=FAST)
    started = time.monotonic()
    reason = await vm.stop(powerdown_timeout=0.3)
    # powerdown (0.3) + quit (0.3) + kill: bounded
    assert time.monotonic() - started < 3
    assert (reason.kind, reason.clean, reason.returncode) == ("killed", False, -9)
    assert vm.pid is not None and not psutil.pid_exists(vm.pid)


async def test_per_call_timeout(tmp_path: Path) -> None:
    vm = await start_fake(tmp_path, "slow", timeouts=FAST)
    try:
        with pytest.raises(QemuError, match=r"did not answer within 0\.2s"):
            await vm.execute("query-status", bound=0.2)
    finally:
        await vm.aclose()
    assert vm.state is VmState.EXITED


async def test_event_memory_is_bounded(tmp_path: Path) -> None:
    vm = await start_fake(tmp_path, "flood", "--count", "5000")
    try:
        await asyncio.sleep(0.5)
        client = vm.monitor._client
        # qemu.qmp's own default listener never sees an event (its history stays empty).
        assert client.events.history == ()
        assert len(vm.monitor.recent_events) <= EVENT_RING
        assert vm.monitor.events.qsize() <= EVENT_QUEUE
    finally:
        reason = await vm.stop(powerdown_timeout=0)
    assert reason.clean


async def test_start_failure_cleans_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    vm = QemuVm(argv, run_dir, qmp_socket=run_dir / "qmp.sock",
                stderr_log=tmp_path / "stderr.log")
    with pytest.raises(QemuError, match="exited with status 3 before QMP: boom"):
        await vm.start()
    assert vm.state is VmState.EXITED
    reason = await vm.wait()
    assert not reason.clean
    with pytest.raises(QemuError, match="cannot start in state exited"):
        await vm.start()


async def test_cancelled_start_leaves_no_process(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = [sys.executable, "-c", "import time; time.sleep(30)"]  # never creates QMP
    vm = QemuVm(argv, run_dir, qmp_socket=run_dir / "qmp.sock",
                stderr_log=tmp_path / "stderr.log")
    task = asyncio.create_task(vm.start())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert vm.pid is not None and not psutil.pid_exists(vm.pid)
    assert vm.state is VmState.EXITED


async def test_launch_with_kernel_vsock_passes_the_fd_and_closes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ordered launch script with kernel vhost-vsock, QEMU replaced by the fake."""
    import os

    from hypervisor.cmdline import VirtioBlk, VirtioNetTap
    from hypervisor.profile import RuntimeProfile, TeeKind
    from hypervisor.vsock import GuestCid

    wrapper = tmp_path / "qemu"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n')
    wrapper.chmod(0o755)
    allocated: list[GuestCid] = []

    def fake_allocate() -> GuestCid:
        cid = GuestCid(1234, os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
        os.set_inheritable(cid.fd, True)
        allocated.append(cid)
        return cid

    monkeypatch.setattr(vm_module, "allocate_guest_cid", fake_allocate)
    profile = RuntimeProfile(name="k", tee=TeeKind.NONE, qemu=wrapper, kernel=None,
                             accel="tcg", vsock="kernel")
    tap_r, tap_w = os.pipe()  # stands in for a tap fd
    os.set_inheritable(tap_r, True)
    nic = VirtioNetTap("net0", tap_r, "02:00:00:00:00:01")
    disk = VirtioBlk("disk0", Path("/dev/null"))
    spawned: list[int] = []
    try:
        vm = await vm_module.launch_vm(profile, vm_module.LaunchOptions(
            run_root=tmp_path / "r", nics=(nic,), disks=(disk,), on_spawn=spawned.append))
    finally:
        os.close(tap_w)
    fd = allocated[0].fd
    try:
        assert f"tap,id=netdev-net0,fd={tap_r}" in vm.argv
        assert "virtio-blk-pci,id=disk0,drive=drive-disk0" in vm.argv
        assert vm.pid is not None
        assert await asyncio.to_thread(os.path.exists, f"/proc/{vm.pid}/fd/{tap_r}")
        os.close(tap_r)  # the caller keeps ownership of its fds
        assert f"vhost-vsock-pci,id=vsock0,guest-cid=1234,vhostfd={fd}" in vm.argv
        assert vm.channel is not None and vm.channel.console is not None  # a serial console
        assert vm.channel == vm_module.AgentChannel(1234, None, console=vm.channel.console)
        assert vm.pid is not None
        assert spawned == [vm.pid]  # told as soon as QEMU existed (a crash record's cue)
        # inherited by "QEMU"
        assert await asyncio.to_thread(os.path.exists, f"/proc/{vm.pid}/fd/{fd}")
    finally:
        reason = await vm.stop(powerdown_timeout=0)
    assert reason.clean
    assert allocated[0].fd == -1  # closed on teardown
    assert list((tmp_path / "r").iterdir()) == []
