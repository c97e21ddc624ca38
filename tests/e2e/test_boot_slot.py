"""The node-wide boot slot on a real pod (containerd 2.1.9 → shim → QEMU → agent): a pod holds
its slot through the agent's Check, CreateSandbox and CreateContainer until its first
container starts, and a boot that fails after QEMU's launch gives it back.

Its own containerd: the node's slots are a private directory with one slot (``[runtime]
boot_slots = 1``), so no other test's boot (or another engineer's) shares them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest.image.build import BuildResult
from shim.core.paths import BOOT_SLOTS_ENV
from tests import envinfo
from tests.e2e.conftest import RUNTIME, CocoContainerd, remove_node, shim_env
from tests.support.containerd import private_containerd
from tests.support.guest import dev_profile_text
from tests.support.images import BUSYBOX_REF, busybox_oci_archive

pytestmark = pytest.mark.e2e
KERNEL_PARAMS = "io.katacontainers.config.hypervisor.kernel_params"


@pytest.fixture(scope="module")
def node(guest_image: BuildResult) -> Iterator[CocoContainerd]:
    env = envinfo.load()
    base = Path(tempfile.mkdtemp(prefix="coco-e2e-slot-", dir="/tmp"))
    profile = base / "profile.toml"
    profile.write_text(dev_profile_text(env.kernel, guest_image.image,
                                        enable_annotations=(KERNEL_PARAMS,))
                       + "boot_slots = 1\n")
    try:
        with private_containerd("2.1.9", extra_path=[Path(sys.executable).parent,
                                                     env.vhost_device_vsock.parent],
                                env={**shim_env(base, profile),
                                     BOOT_SLOTS_ENV: str(base / "slots")}) as cd:
            cd.ctr("images", "import", "--platform", "linux/amd64",
                   str(busybox_oci_archive(base / "busybox.tar")))
            yield CocoContainerd(cd, base, profile)
    finally:
        remove_node(base)


def slot(node: CocoContainerd) -> tuple[bool, str]:
    """(whether the one slot is held now, what its holder wrote in it)."""
    path = node.base / "slots" / "slot-0"
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            assert err.errno in (errno.EWOULDBLOCK, errno.EAGAIN), err
            held = True
        else:
            held = False
        return held, path.read_text()
    finally:
        os.close(fd)


def shim_lines(node: CocoContainerd, pod: str) -> list[str]:
    """The shim's log lines about pod ``pod`` (containerd's log carries them)."""
    return [line for line in node.cd.log_path.read_text(errors="replace").splitlines()
            if f"pod {pod}" in line]


def index_of(lines: list[str], text: str) -> int:
    found = [n for n, line in enumerate(lines) if text in line]
    assert found, f"no line with {text!r} in {lines}"
    return found[0]


def test_a_pod_holds_its_slot_across_create_sandbox_until_its_first_start(
        node: CocoContainerd) -> None:
    cid = f"slot-{uuid.uuid4().hex[:6]}"
    try:
        node.run(cid, "sleep", "600", flags=("-d",))
        lines = shim_lines(node, cid)
        answered = index_of(lines, "agent answered after")
        created = index_of(lines, "sandbox created after")
        given_back = index_of(lines, "given back after")
        assert answered < created < given_back, lines
        assert "boot slot 0 given back" in lines[given_back]
        assert "(first container started)" in lines[given_back], lines[given_back]
        held, holder = slot(node)
        assert not held and f"pod {cid}" in holder, (held, holder)  # it was its slot
    finally:
        node.ctr("task", "rm", "-f", cid, check=False)
        node.ctr("container", "rm", cid, check=False)


def test_a_boot_failing_after_the_launch_gives_its_slot_back(node: CocoContainerd) -> None:
    """The guest kernel finds no init (it panics, QEMU exits): the dial fails after QEMU's
    launch, with the slot held; the boot's undo gives it back, and the next pod boots."""
    cid = f"slotfail-{uuid.uuid4().hex[:6]}"
    out = node.ctr("run", "--rm", "--runtime", RUNTIME, "--annotation",
                   f"{KERNEL_PARAMS}=rdinit=/coco-no-such-init", BUSYBOX_REF, cid, "true",
                   check=False)
    assert out.returncode != 0, out
    lines = shim_lines(node, cid)
    given_back = index_of(lines, "given back after")
    assert index_of(lines, "running (tcg)") < given_back, lines  # QEMU had been launched
    assert "(boot undone)" in lines[given_back], lines
    held, holder = slot(node)
    assert not held and f"pod {cid}" in holder, (held, holder)
    node.ctr("container", "rm", cid, check=False)
    again = f"slotnext-{uuid.uuid4().hex[:6]}"
    assert node.run(again, "echo", "up", flags=("--rm",)).stdout.strip() == b"up"
