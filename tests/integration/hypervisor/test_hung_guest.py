"""R6, the VM side: a real QEMU whose guest never starts an agent (it boots and idles). The
shim's dial ends at its bound with a clear error, and stopping the VM leaves nothing behind
(no QEMU, no vhost-device-vsock, no run directory)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psutil
import pytest

from hypervisor.vm import LaunchOptions, launch_vm
from shim.core.errors import Unavailable
from shim.core.timeouts import TIMEOUTS
from shim.pod.agent import AgentClient
from tests import envinfo
from tests.integration.hypervisor.conftest import none_profile

pytestmark = pytest.mark.integration
DIAL = 3.0


async def test_a_guest_that_never_answers_ends_the_dial_at_its_bound(
        env: envinfo.TestEnv, initrd_plain: Path, tmp_path: Path) -> None:
    run_root = tmp_path / "run"
    vm = await launch_vm(none_profile(env, initrd_plain, "idle", vsock="hybrid"),
                         LaunchOptions(run_root=run_root, name="hung",
                                       vhost_device_vsock=env.vhost_device_vsock))
    helpers = [p.pid for p in psutil.Process().children()
               if p.name().startswith("vhost-device")]
    exited: asyncio.Future[object] = asyncio.ensure_future(vm.wait())
    try:
        assert vm.channel is not None
        started = time.monotonic()
        # Hybrid vsock: nothing is dialed before the guest announces its agent, so a guest
        # that never starts one is named as such, at the dial's bound.
        with pytest.raises(Unavailable,
                           match=rf"the guest did not announce its agent within {DIAL:g} s"):
            await AgentClient.dial(vm.channel, DIAL, exited=exited, timeouts=TIMEOUTS)
        elapsed = time.monotonic() - started
        print(f"R6 hung guest: dial refused after {elapsed:.2f} s")
        assert DIAL <= elapsed < DIAL + 1.0
        assert not exited.done()  # QEMU is alive: hung, not dead
    finally:
        await vm.aclose()
        exited.cancel()
    for pid in (vm.pid, *helpers):
        assert pid is not None and not psutil.pid_exists(pid), f"process {pid} left behind"
    assert list(run_root.iterdir()) == []
