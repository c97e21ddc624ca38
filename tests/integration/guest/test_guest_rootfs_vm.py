"""The device form of the guest image, booted as the shim boots a pod (the profile's QEMU argv
through hypervisor.launch_vm, hybrid vsock): the tiny initramfs mounts the read-only EROFS
root image and switch_roots into it.

* development profile: the image on a read-only virtio-blk disk, ``coco.root=blk``; the agent
  answers and serves a sandbox (its DNS lands on /run, the root being read-only);
* coco-dev (confidential): the same file under dm-verity, its root hash on the kernel command
  line (measured with it on a TEE); the agent answers;
* coco-dev with a root image the host changed (one byte of a file the agent imports): the
  guest reads an I/O error, the boot fails and the VM powers off, and the console (kept by
  the host) names dm-verity's verdict; no fallback root.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from guest.image.build import BuildResult
from hypervisor.config import load_profile
from hypervisor.profile import VmInstance, build_command_line
from hypervisor.vm import LaunchOptions, QemuVm, launch_vm
from shim.core.errors import FailedPrecondition, Unavailable
from shim.core.timeouts import TIMEOUTS
from shim.pod.agent import AgentClient
from tests import envinfo
from tests.support.guest import coco_dev_profile_text, dev_profile_text

pytestmark = pytest.mark.integration

DIAL_TIMEOUT = 120.0
# The first module the agent imports (init runs guest.agent.entry): a changed byte in it stops
# the boot.
AGENT_FILE = "opt/coco-guest/guest/agent/entry.pyc"  # sourceless: the image has no .py


async def launch(profile_text: str, tmp_path: Path, name: str) -> QemuVm:
    env = envinfo.load()
    profile = tmp_path / f"{name}.toml"
    profile.write_text(profile_text)
    return await launch_vm(load_profile(profile), LaunchOptions(
        run_root=tmp_path / "run", name=name, accel="tcg",
        vhost_device_vsock=env.vhost_device_vsock, log_dir=tmp_path / f"{name}-logs"))


async def answers(vm: QemuVm, *, sandbox: bool = False) -> None:
    """The agent passes Health.Check (and, with ``sandbox``, creates a sandbox with DNS)."""
    exited: asyncio.Future[object] = asyncio.ensure_future(vm.wait())
    try:
        assert vm.channel is not None
        agent = await AgentClient.dial(vm.channel, DIAL_TIMEOUT, exited=exited,
                                       timeouts=TIMEOUTS)
        try:
            if sandbox:
                await agent.create_sandbox("rootfs", "rootfs", ["nameserver 198.18.0.53"], [])
        finally:
            await agent.close()
    finally:
        exited.cancel()


async def test_development_profile_boots_the_read_only_root_image(
        guest_image: BuildResult, tmp_path: Path) -> None:
    env = envinfo.load()
    text = dev_profile_text(env.kernel, guest_image.boot_initrd, memory_mib=512,
                            image=guest_image.rootfs)
    (tmp_path / "p.toml").write_text(text)
    argv = build_command_line(load_profile(tmp_path / "p.toml"),
                              VmInstance(run_dir=tmp_path)).to_argv()
    assert f"file={guest_image.rootfs},format=raw,readonly=on,aio=threads" in " ".join(argv)
    assert "coco.root=blk" in argv[argv.index("-append") + 1]
    vm = await launch(text, tmp_path, "rootdev")
    try:
        await answers(vm, sandbox=True)
    finally:
        await vm.aclose()


async def test_coco_dev_boots_the_root_image_under_dm_verity(
        guest_image: BuildResult, tmp_path: Path) -> None:
    env = envinfo.load()
    verity = json.loads(guest_image.verity.read_text())
    text = coco_dev_profile_text(env.kernel, guest_image.boot_initrd, image=guest_image.rootfs)
    (tmp_path / "p.toml").write_text(text)
    argv = build_command_line(load_profile(tmp_path / "p.toml"),
                              VmInstance(run_dir=tmp_path)).to_argv()
    append = argv[argv.index("-append") + 1]
    assert (f"coco.root=verity:{verity['data_blocks']}:{verity['hash_start_block']}:"
            f"{verity['root_hash']}:{verity['salt']}") in append.split()
    vm = await launch(text, tmp_path, "rootverity")
    try:
        await answers(vm)
    finally:
        await vm.aclose()


def flip_a_byte_of(image: Path, rel: str, scratch: Path) -> int:
    """Change one byte of file ``rel`` inside the EROFS image (its contents are stored
    uncompressed: found by a 64-byte run unique in the image); returns the offset."""
    out = scratch / "extracted"
    subprocess.run(["fsck.erofs", f"--extract={out}", str(image)], check=True,
                   capture_output=True)
    content = (out / rel).read_bytes()
    data = image.read_bytes()
    for start in range(len(content) // 2, len(content) - 64, 64):
        probe = content[start:start + 64]
        if len(set(probe)) > 16 and data.count(probe) == 1:
            offset = data.index(probe) + 32
            with image.open("r+b") as f:
                f.seek(offset)
                f.write(bytes([data[offset] ^ 0x01]))
            shutil.rmtree(out)
            return offset
    raise AssertionError(f"no unique run of {rel} found in {image}")


async def test_a_root_image_the_host_changed_fails_the_boot_clearly(
        guest_image: BuildResult, tmp_path: Path) -> None:
    env = envinfo.load()
    image = tmp_path / "coco-guest.erofs"
    shutil.copyfile(guest_image.rootfs, image)
    shutil.copyfile(guest_image.verity, tmp_path / "coco-guest.erofs.verity")
    flip_a_byte_of(image, AGENT_FILE, tmp_path)
    vm = await launch(coco_dev_profile_text(env.kernel, guest_image.boot_initrd, image=image),
                      tmp_path, "tampered")
    try:
        assert vm.channel is not None
        exited: asyncio.Future[object] = asyncio.ensure_future(vm.wait())
        # The console watch ends the dial on init's failure line (FailedPrecondition); if the
        # VM's exit is seen first, the dial ends on that (Unavailable). Either names the cause.
        with pytest.raises((FailedPrecondition, Unavailable)) as info:
            await AgentClient.dial(vm.channel, DIAL_TIMEOUT, exited=exited, timeouts=TIMEOUTS)
        async with asyncio.timeout(30):
            await exited  # the guest powered itself off
        console = (tmp_path / "tampered-logs/console.log").read_text(errors="replace")
        print(f"dial: {info.value}\nconsole tail:\n{console[-1500:]}")
        assert ("the guest cannot start; its console says: coco-init: agent exited"
                in str(info.value) or "the VM exited" in str(info.value)), str(info.value)
        assert "device-mapper: verity" in console and "is corrupted" in console
        assert "coco-init: agent exited with status" in console
    finally:
        await vm.aclose()
