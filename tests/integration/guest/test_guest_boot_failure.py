"""A guest whose boot step fails, booted as the shim boots a pod (the development profile's
QEMU argv, hybrid vsock): within seconds of the guest's announcement, not at the dial's 120 s
bound, the shim has an error naming the failing step and its cause, and the console log
(which the shim keeps after a failed boot: shim/core/failed_boot.py) says the same.

"modules" fails before the agent listens: its Check answers NOT_SERVING and the dial ends
with the cause. "drivers" fails while the agent answers its first Check or soon after: the
dial ends so, or the shim's next call (waiting for the AgentService) fails with the cause.
The failure is real: ``coco.test.fail_step=NAME`` makes init's step NAME also load a module
the image does not have (see packaging/guest-image/init). Init prints the failure on the
console too, which the shim watches (hypervisor/console.py): the dial may end on that line
first, with the same words.

``NAME:hang`` makes the step never end: the agent names it at the step's own bound
(guest/agent/bootsteps.py STEP_BOUNDS), not the shim's per-call DeadlineExceeded.
``modules:before`` fails the modules step before it loads anything: the agent's vsock channel
never comes up, the guest never announces, and only the console can say why; the dial ends on
it, not at its 120 s bound.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psutil
import pytest

from guest.agent.bootsteps import STEP_BOUNDS
from guest.image.build import BuildResult
from hypervisor.config import load_profile
from hypervisor.vm import AgentChannel, LaunchOptions, launch_vm
from shim.core.errors import FailedPrecondition
from shim.core.timeouts import TIMEOUTS
from shim.pod.agent import AgentClient
from tests import envinfo
from tests.support.guest import dev_profile_text

pytestmark = pytest.mark.integration

DIAL_TIMEOUT = 120.0  # the profile's: the dial must end long before it
WITHIN = 10.0  # seconds from the guest's announcement to the shim's error, at most


async def shims_error(channel: AgentChannel, exited: asyncio.Future[object]
                      ) -> tuple[FailedPrecondition, bool]:
    """The error a failed boot gives the shim, and whether the dial itself failed with it;
    else the dial succeeded and the shim's next call (CreateSandbox, waiting for the
    AgentService) must fail with it."""
    try:
        agent = await AgentClient.dial(channel, DIAL_TIMEOUT, exited=exited, timeouts=TIMEOUTS)
    except FailedPrecondition as err:
        return err, True
    try:
        with pytest.raises(FailedPrecondition) as info:
            await agent.create_sandbox("bootfail", "bootfail", [], [])
        return info.value, False
    finally:
        await agent.close()


@pytest.mark.parametrize("step", ["modules", "drivers"])
async def test_a_failed_boot_step_reaches_the_shim_within_seconds(
        guest_image: BuildResult, tmp_path: Path, step: str) -> None:
    env = envinfo.load()
    profile = tmp_path / "profile.toml"
    profile.write_text(dev_profile_text(env.kernel, guest_image.image, memory_mib=512))
    run_root, logs = tmp_path / "run", tmp_path / "logs"
    vm = await launch_vm(load_profile(profile), LaunchOptions(
        run_root=run_root, name="bootfail", accel="tcg",
        vhost_device_vsock=env.vhost_device_vsock, log_dir=logs,
        extra_kernel_params=f"coco.test.fail_step={step}"))
    exited: asyncio.Future[object] = asyncio.ensure_future(vm.wait())
    try:
        assert vm.channel is not None and vm.channel.wait_guest_ready is not None
        async with asyncio.timeout(DIAL_TIMEOUT):
            await vm.channel.wait_guest_ready()  # the agent listens: the dial starts here
        announced = time.monotonic()
        # The step fails while the agent answers its first Check, or before (the dial fails:
        # Check said NOT_SERVING, or the console), or after (the shim's next call fails).
        error, at_dial = await shims_error(vm.channel, exited)
        if at_dial:
            assert ("is not serving (status NOT_SERVING)" in str(error)
                    or "the guest cannot start; its console says: " in str(error)), error
        else:
            assert step != "modules", "the agent served after its modules step failed"
        elapsed = time.monotonic() - announced
        print(f"failed boot step {step}: the shim had the error {elapsed:.2f} s after the guest "
              "announced")
        message = str(error)
        assert f'step "{step}" exited with status 1' in message
        assert "coco-test-missing-module" in message  # modprobe's own words, from its stderr
        assert elapsed < WITHIN
        assert not exited.done()  # the guest said why; the VM did not have to die first
    finally:
        pid = vm.pid
        await vm.aclose()
        exited.cancel()
    assert pid is not None and not psutil.pid_exists(pid)
    console = (logs / "console.log").read_text(errors="replace")
    assert f'coco-init: boot step "{step}" exited with status 1' in console
    assert "coco-agent: guest failed to start: init's boot step failed" in console


BOOT_TO_INIT = 30.0  # seconds from QEMU's start to init's steps, at most (TCG, shared host)


@pytest.mark.parametrize("fault, words", [
    ("drivers:hang", 'guest failed to start: init\'s boot step hung: step "drivers" did not '
                     f'finish within its bound of {STEP_BOUNDS["drivers"]:g} s'),
    ("modules:before", 'coco-init: boot step "modules" exited with status 1; modprobe: module '
                       "coco-test-missing-module not found"),
])
async def test_a_hung_step_or_a_missing_channel_is_named_at_its_bound(
        guest_image: BuildResult, tmp_path: Path, fault: str, words: str) -> None:
    """The pod's error names the step that hung (within seconds of the step's bound, not as a
    DeadlineExceeded of the shim's call), or, when the agent's vsock channel never comes up,
    what the console said (not the dial's 120 s "did not answer")."""
    env = envinfo.load()
    profile = tmp_path / "profile.toml"
    profile.write_text(dev_profile_text(env.kernel, guest_image.image, memory_mib=512))
    logs = tmp_path / "logs"
    bound = STEP_BOUNDS[fault.partition(":")[0]] if fault.endswith(":hang") else 0.0
    launched = time.monotonic()
    vm = await launch_vm(load_profile(profile), LaunchOptions(
        run_root=tmp_path / "run", name="bootfail", accel="tcg",
        vhost_device_vsock=env.vhost_device_vsock, log_dir=logs,
        extra_kernel_params=f"coco.test.fail_step={fault}"))
    exited: asyncio.Future[object] = asyncio.ensure_future(vm.wait())
    try:
        assert vm.channel is not None
        error, at_dial = await shims_error(vm.channel, exited)
        if not at_dial:  # the agent listens; the AgentService waits for the hung step
            assert fault == "drivers:hang", "the agent answered without its vsock modules"
        elapsed = time.monotonic() - launched
        print(f"{fault}: the shim had the error {elapsed:.1f} s after QEMU started: {error}")
        assert words in str(error)
        assert elapsed < bound + BOOT_TO_INIT
    finally:
        pid = vm.pid
        await vm.aclose()
        exited.cancel()
    assert pid is not None and not psutil.pid_exists(pid)
    console = (logs / "console.log").read_text(errors="replace")
    assert words.removeprefix("guest failed to start: ") in console
