"""End-to-end fixtures: real containerd (2.1.9 and 1.7.24) → our shim → QEMU (TCG) → guest
agent → runc in the guest. Nothing here is faked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guest.image.build import BuildResult
from shim.binary.bootstrap import can_connect
from shim.core.crash_record import process_start_time
from shim.core.paths import pod_key
from tests import envinfo
from tests.support.containerd import Containerd, coco_processes, private_containerd
from tests.support.guest import dev_profile_text
from tests.support.guest import guest_image as build_guest_image
from tests.support.images import BUSYBOX_REF, busybox_oci_archive
from tests.support.templates import template_pids

RUNTIME = "io.containerd.coco.v2"
VERSIONS = ["2.1.9", "1.7.24"]
SHIM_EXIT_GRACE = 30.0


@pytest.fixture(scope="session")
def guest_image() -> BuildResult:
    return build_guest_image()


@dataclass
class CocoContainerd:
    """A private containerd whose PATH finds containerd-shim-coco-v2 (from the venv)."""

    cd: Containerd
    base: Path
    profile: Path

    def ctr(self, *args: str, timeout: float = 240, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return self.cd.ctr(*args, timeout=timeout, check=check, input=input)

    def run(self, name: str, *command: str, flags: tuple[str, ...] = (),
            check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess[bytes]:
        return self.ctr("run", "--runtime", RUNTIME, *flags, BUSYBOX_REF, name, *command,
                        check=check, timeout=timeout)

    @property
    def run_dir(self) -> Path:
        return self.base / "run"

    def pod_dir(self, pod: str, namespace: str = "default") -> Path:
        """Where the shim keeps pod ``pod``'s VM (run dir, sockets, shares)."""
        return self.run_dir / pod_key(namespace, pod)

    @property
    def socket_dir(self) -> Path:
        return self.base / "s"


REPO = Path(__file__).resolve().parents[2]


TEMPLATE_EXIT_GRACE = 2.0


def shim_env(base: Path, profile: Path) -> dict[str, str]:
    # PYTHONPATH: the shim containerd starts runs this checkout's code, whichever checkout the
    # venv's editable install points at.
    return {"COCO_SHIM_CONFIG": str(profile), "COCO_SHIM_RUN_DIR": str(base / "run"),
            "COCO_SHIM_SOCKET_DIR": str(base / "s"), "COCO_SHIM_STATE_DIR": str(base / "state"),
            "COCO_SHIM_TEMPLATE_DIR": str(base / "templates"), "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module", params=VERSIONS)
def coco(request: pytest.FixtureRequest, guest_image: BuildResult) -> Iterator[CocoContainerd]:
    env = envinfo.load()
    base = Path(tempfile.mkdtemp(prefix="coco-e2e-", dir="/tmp"))
    profile = base / "profile.toml"
    profile.write_text(dev_profile_text(env.kernel, guest_image.image,
                                    enable_annotations=(
                                        "io.katacontainers.config.hypervisor.kernel_params",)))
    extra_path = [Path(sys.executable).parent, env.vhost_device_vsock.parent]
    try:
        with private_containerd(request.param, extra_path=extra_path,
                                env=shim_env(base, profile)) as cd:
            archive = busybox_oci_archive(base / "busybox.tar")
            cd.ctr("images", "import", "--platform", "linux/amd64", str(archive))
            yield CocoContainerd(cd, base, profile)
            templates = template_pids(base / "templates")  # start's fast path served pods
        # A template exits the moment its containerd does (it watches it with a pidfd).
        deadline = time.monotonic() + TEMPLATE_EXIT_GRACE
        while (alive := [p for p in templates if process_start_time(p) is not None]) and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive, f"templates outlived their containerd: {describe(alive)}"
        # containerd is stopped now. Shims finish their Shutdown (VM power-off) on their own
        # after the last Delete; whatever still carries this base after that is a leak.
        deadline = time.monotonic() + SHIM_EXIT_GRACE
        while (leftovers := coco_processes(base)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not leftovers, f"processes left behind: {describe(leftovers)}"
        assert host_leftovers(base) == []
    finally:
        remove_node(base)


def remove_node(base: Path) -> None:
    """Whatever a test node left under ``base``: its processes killed, its mounts detached, the
    directory removed (a fixture's last word, after its own leak checks)."""
    for pid in coco_processes(base):
        os.kill(pid, 9)
    subprocess.run(["umount", "-R", "-l", str(base / "run")], capture_output=True,
                   check=False)
    shutil.rmtree(base, ignore_errors=True)


def host_leftovers(base: Path, pod_dir: Path | None = None,
                   state_dir: Path | None = None) -> list[str]:
    """What the shims left on the host under ``base`` (or of one pod): pod run directories,
    state records, sockets nobody serves, mounts."""
    found: list[str] = []
    run_dir = base / "run"
    if pod_dir is not None:
        found += [f"pod dir {pod_dir}"] if pod_dir.exists() else []
    elif run_dir.exists():
        found += [f"pod dir {p}" for p in run_dir.iterdir() if p.is_dir()]
    state = base / "state"
    if state_dir is not None:
        found += [f"state {state_dir}"] if state_dir.exists() else []
    elif state.exists():
        found += [f"state {p}" for p in state.glob("*/*")]
    sockets = base / "s"
    if sockets.exists():
        found += [f"socket {p}" for p in sockets.iterdir() if p.is_socket()
                  and not can_connect(p)]
    prefix = str(pod_dir or run_dir)
    with open("/proc/self/mountinfo") as info:
        found += [f"mount {line.split()[4]}" for line in info
                  if line.split()[4] == prefix or line.split()[4].startswith(prefix + "/")]
    return found


def describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes()
                       .replace(b"\0", b" ").decode(errors="replace")[:200])
        except OSError:
            out.append(f"{pid}: (gone)")
    return out


def pod_boots(cd: Containerd, pod_id: str) -> int:
    """How many times the shim launched a QEMU for the pod (its log, through containerd's)."""
    return sum(f"pod {pod_id}: QEMU " in line
               for line in cd.log_path.read_text(errors="replace").splitlines())
