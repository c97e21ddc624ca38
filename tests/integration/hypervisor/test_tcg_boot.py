"""Boot the Debian kernel + a busybox initramfs under TCG (host QEMU 7.2) through the monitor."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from hypervisor.errors import QemuError, VmExited, VsockError
from hypervisor.vm import LaunchOptions, QemuVm, VmState, launch_vm
from hypervisor.vsock import hybrid_connect
from tests import envinfo
from tests.integration.hypervisor.conftest import none_profile

pytestmark = pytest.mark.integration


def assert_gone(vm: QemuVm, run_root: Path, *helper_pids: int | None) -> None:
    assert vm.state is VmState.EXITED
    for pid in (vm.pid, *helper_pids):
        assert pid is not None
        assert not psutil.pid_exists(pid), f"process {pid} left behind"
    assert not vm.run_dir.exists(), f"{vm.run_dir} left behind"
    assert list(run_root.iterdir()) == []


async def test_guest_poweroff_is_a_clean_exit(env: envinfo.TestEnv, initrd_plain: Path,
                                               tmp_path: Path) -> None:
    run_root, logs = tmp_path / "run", tmp_path / "logs"
    vm = await launch_vm(none_profile(env, initrd_plain, "poweroff"),
                         LaunchOptions(run_root=run_root, name="poweroff", log_dir=logs))
    try:
        assert vm.state is VmState.RUNNING
        status = await vm.execute("query-status")
        assert status["status"] == "running"
        assert oct(os.stat(vm.qmp_socket).st_mode & 0o777) == "0o600"
        async with asyncio.timeout(60):
            reason = await vm.wait()
    finally:
        await vm.aclose()
    assert (reason.kind, reason.detail, reason.clean) == ("shutdown", "guest-shutdown", True)
    assert reason.returncode == 0
    assert "COCO-GUEST-READY" in (logs / "console.log").read_text()
    assert_gone(vm, run_root)
    with pytest.raises(VmExited):
        await vm.execute("query-status")


async def test_kill_9_is_an_abnormal_exit_within_1s(env: envinfo.TestEnv, initrd_plain: Path,
                                                    tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    vm = await launch_vm(none_profile(env, initrd_plain, "idle"),
                         LaunchOptions(run_root=run_root, name="kill9"))
    try:
        assert vm.pid is not None
        os.kill(vm.pid, signal.SIGKILL)
        started = time.monotonic()
        async with asyncio.timeout(1.0):
            reason = await vm.wait()
        elapsed = time.monotonic() - started
    finally:
        await vm.aclose()
    assert (reason.kind, reason.clean, reason.returncode) == ("killed", False, -9)
    assert "SIGKILL" in reason.detail
    assert elapsed < 1.0
    assert_gone(vm, run_root)


async def test_graceful_stop_of_a_running_vm(env: envinfo.TestEnv, initrd_plain: Path,
                                             tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    vm = await launch_vm(none_profile(env, initrd_plain, "idle"),
                         LaunchOptions(run_root=run_root, name="stop"))
    async with vm:
        assert (await vm.execute("query-status"))["status"] == "running"
        started = time.monotonic()
        # busybox has no ACPI power-button handler: powerdown times out, then `quit`.
        reason = await vm.stop(powerdown_timeout=0.5)
        assert time.monotonic() - started < 5
    assert (reason.kind, reason.detail, reason.clean) == ("shutdown", "host-qmp-quit", True)
    assert await vm.stop() == reason  # idempotent
    assert_gone(vm, run_root)


async def test_hybrid_vsock_exchanges_bytes_with_guest(env: envinfo.TestEnv, initrd_vsock: Path,
                                                       tmp_path: Path) -> None:
    run_root, logs = tmp_path / "run", tmp_path / "logs"
    vm = await launch_vm(none_profile(env, initrd_vsock, "vsock", vsock="hybrid"),
                         LaunchOptions(run_root=run_root, name="vsock", log_dir=logs,
                                       vhost_device_vsock=env.vhost_device_vsock))
    helper = [p.pid for p in psutil.Process().children()
              if p.name().startswith("vhost-device")]
    assert len(helper) == 1
    async with vm:
        assert vm.channel is not None and vm.channel.hybrid_socket is not None
        assert "vhost-user-vsock-pci,id=vsock0,chardev=char-vsock0" in vm.argv
        deadline = time.monotonic() + 60
        while True:  # the guest listener comes up a few seconds into boot
            try:
                reader, writer = await hybrid_connect(vm.channel.hybrid_socket, 1024)
                break
            except (OSError, VsockError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)
        try:
            writer.write(b"ping from host\n")
            await writer.drain()
            async with asyncio.timeout(10):
                echoed = await reader.readexactly(len(b"echo:ping from host\n"))
        finally:
            writer.close()
        assert echoed == b"echo:ping from host\n"
        assert "VSOCK-LISTENING 1024" in (logs / "console.log").read_text()
        reason = await vm.stop(powerdown_timeout=0)
    assert reason.clean
    assert_gone(vm, run_root, helper[0])


async def test_failed_launch_rolls_back(env: envinfo.TestEnv, initrd_plain: Path,
                                        tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    from dataclasses import replace

    profile = replace(none_profile(env, initrd_plain, "idle", vsock="hybrid"),
                      kernel=tmp_path / "no-such-kernel")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(QemuError, match="exited with status 1 before QMP"):
        await launch_vm(profile, LaunchOptions(run_root=run_root, name="fail",
                                               vhost_device_vsock=env.vhost_device_vsock))
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before
    assert list(run_root.iterdir()) == []
