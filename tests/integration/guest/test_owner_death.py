"""A VM's helper processes die with their owner, at every point of a launch (issue 18 item 6's
hygiene: an interrupted run left vhost-device-vsock processes whose QEMU was gone).

The owner is a real process launching the development profile's VM (``hypervisor.launch_vm``,
hybrid vsock) as the shim daemon and the benchmarks do. It is SIGKILLed right after
vhost-device-vsock spawned, right after QEMU spawned (before QMP), and once the VM runs (also
with a host share, where QEMU runs unprivileged behind setpriv): no
``delete`` runs here (the bench, ``coco-shim vm``, or a shim containerd never deletes), yet
neither QEMU nor vhost-device-vsock may outlive it. And QEMU SIGKILLed under a living owner:
the owner's teardown leaves no process, socket or directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from guest.image.build import BuildResult
from tests import envinfo
from tests.support.guest import dev_profile_text

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
GONE_WITHIN = 5.0  # seconds for the kernel to deliver the owner's death and reap

OWNER = r"""
import asyncio, json, os, signal, sys
from pathlib import Path
from hypervisor.cmdline import NinePShare
from hypervisor.config import load_profile
from hypervisor.vm import LaunchOptions, launch_vm

profile, run_root, vsock_binary, die_at = sys.argv[1:5]
spawned = []

def on_spawn(pid):
    spawned.append(pid)
    print(json.dumps({"spawned": pid}), flush=True)
    if (die_at, len(spawned)) in (("vsock", 1), ("qemu", 2)):  # the backend, then QEMU
        os.kill(os.getpid(), signal.SIGKILL)

async def main():
    # a share: QEMU runs unprivileged (setpriv changes its uid, which clears a parent-death
    # signal set before it)
    shares = (NinePShare("fs0", "kataShared", Path(profile).parent),) if die_at == "shared" else ()
    vm = await launch_vm(load_profile(Path(profile)), LaunchOptions(
        run_root=Path(run_root), name="owner", accel="tcg", shares=shares,
        vhost_device_vsock=Path(vsock_binary), on_spawn=on_spawn))
    print(json.dumps({"running": vm.pid, "run_dir": str(vm.run_dir)}), flush=True)
    if die_at in ("running", "shared"):
        os.kill(os.getpid(), signal.SIGKILL)
    print(json.dumps({"exited": str(await vm.wait())}), flush=True)
    await vm.aclose()
    print(json.dumps({"closed": True}), flush=True)

asyncio.run(main())
"""


def _start_owner(tmp_path: Path, guest_image: BuildResult, die_at: str) -> subprocess.Popen[str]:
    env = envinfo.load()
    profile = tmp_path / "profile.toml"
    profile.write_text(dev_profile_text(env.kernel, guest_image.image, memory_mib=512))
    return subprocess.Popen(
        [sys.executable, "-c", OWNER, str(profile), str(tmp_path / "run"),
         str(env.vhost_device_vsock), die_at],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})


def _alive(processes: list[psutil.Process]) -> list[str]:
    found = []
    for process in processes:
        try:  # is_running() compares the start time too: a reused pid is not ours
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            continue
    return found


def _ours(pid: int, tmp_path: Path) -> psutil.Process | None:
    """The helper the owner just spawned, if it still exists (its command line names our run
    directory, under ``tmp_path``: never another's process on a reused pid). A helper goes
    through three execve (setpriv, the guard's sh, the program) and reads an empty command line
    in the middle of each (a third of such chains when polled right after the spawn): empty is
    asked again, not taken for another's process (a helper was missed so in 1 of 4 runs of the
    integration tests)."""
    deadline = time.monotonic() + GONE_WITHIN
    try:
        process = psutil.Process(pid)
        while not (cmdline := process.cmdline()) and time.monotonic() < deadline:
            time.sleep(0.001)
        return process if str(tmp_path) in " ".join(cmdline) else None
    except psutil.Error:
        return None


def _wait_gone(processes: list[psutil.Process], within: float = GONE_WITHIN) -> None:
    deadline = time.monotonic() + within
    while _alive(processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _alive(processes)
    for process in processes:  # never leave ours to the next test (psutil checks it is ours)
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    assert not left, f"outlived their owner: {left}"


@pytest.mark.parametrize("die_at", ["vsock", "qemu", "running", "shared"])
def test_helpers_die_with_their_owner(guest_image: BuildResult, tmp_path: Path,
                                      die_at: str) -> None:
    owner = _start_owner(tmp_path, guest_image, die_at)
    assert owner.stdout is not None
    spawned: list[int] = []
    helpers: list[psutil.Process] = []
    try:
        for line in owner.stdout:
            event = json.loads(line)
            if "spawned" in event:
                spawned.append(event["spawned"])
                helpers += filter(None, [_ours(event["spawned"], tmp_path)])
        assert owner.wait(30) == -signal.SIGKILL
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert len(spawned) == {"vsock": 1, "qemu": 2, "running": 2, "shared": 2}[die_at], spawned
    _wait_gone(helpers)


def test_a_killed_qemu_leaves_nothing_under_a_living_owner(guest_image: BuildResult,
                                                           tmp_path: Path) -> None:
    owner = _start_owner(tmp_path, guest_image, "never")
    assert owner.stdout is not None
    helpers: list[psutil.Process] = []
    try:
        for line in owner.stdout:
            event = json.loads(line)
            if "spawned" in event:
                helpers += filter(None, [_ours(event["spawned"], tmp_path)])
            if "running" in event:
                run_dir = Path(event["run_dir"])
                os.kill(event["running"], signal.SIGKILL)
            if "closed" in event:
                break
        assert owner.wait(30) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert len(helpers) == 2
    _wait_gone(helpers, 0.0)
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
    assert list((tmp_path / "run").iterdir()) == []
