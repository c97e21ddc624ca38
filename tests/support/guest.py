"""The reference guest image and a development runtime profile pointing at it."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

from guest.image.__main__ import default_mirror
from guest.image.build import BuildResult, Recipe, build
from guest.image.cpio import DeviceNode, write_initramfs
from tests import envinfo

REPO = Path(__file__).resolve().parents[2]


def guest_recipe() -> Recipe:
    env = envinfo.load()
    spec = importlib.util.find_spec("google.protobuf")
    assert spec is not None and spec.origin is not None
    return Recipe(recipe_dir=REPO / "packaging/guest-image", repo=REPO,
                  modules_dir=env.modules_dir,
                  site_packages=Path(spec.origin).resolve().parents[2],
                  mirror=default_mirror())


def guest_image() -> BuildResult:
    """Build the image (or take it from the cache, keyed by its inputs)."""
    return build(guest_recipe(), envinfo.load().cache)


# An idle guest that sleeps, as the shipped profiles' kernel_params (firmware-configs/).
IDLE_PARAMS = "tsc=reliable nowatchdog sysctl.vm.compaction_proactiveness=0"


def image_line(image: Path | None) -> str:
    """The profile's root image line (the device form), or nothing (the initramfs form)."""
    return "" if image is None else f'image = "{image}"\n'


def device_form(image: BuildResult) -> tuple[Path, Path]:
    """(initrd, image) of the device form: the tiny initramfs and the EROFS root image."""
    return image.boot_initrd, image.rootfs


def dev_profile_text(kernel: Path, initrd: Path, *,
                     enable_annotations: tuple[str, ...] = (), memory_mib: int = 1024,
                     free_page_reporting: bool = True, image: Path | None = None) -> str:
    """firmware-configs/qemu-none.toml pinned to this machine: TCG, hybrid vsock (the tests
    give the guest 1 GiB; the benchmarks use the profile's 512 MiB). With ``image``, the
    device form: ``initrd`` is the tiny initramfs that mounts it."""
    allowed = ", ".join(f'"{a}"' for a in enable_annotations)
    return f"""# development profile pointed at the reference guest image (TCG, hybrid vsock)
[hypervisor]
tee = "none"
qemu_path = "/usr/bin/qemu-system-x86_64"
kernel = "{kernel}"
initrd = "{initrd}"
{image_line(image)}kernel_params = "console=ttyS0 panic=-1 quiet {IDLE_PARAMS}"
accelerator = "tcg"
vcpus = 1
memory_mib = {memory_mib}
vsock = "hybrid"
free_page_reporting = {"true" if free_page_reporting else "false"}

[runtime]
dial_timeout = 120
enable_annotations = [{allowed}]
"""


def coco_dev_profile_text(kernel: Path, initrd: Path, *, kernel_params: str = "",
                          dial_timeout: float = 120, image: Path | None = None) -> str:
    """firmware-configs/qemu-coco-dev.toml pinned to this machine (TCG, hybrid vsock): the
    confidential code path without a TEE. ``kernel_params`` are added to the profile's own
    (a pod cannot add any on a confidential profile)."""
    params = " ".join(p for p in (f"console=ttyS0 panic=-1 quiet {IDLE_PARAMS} "
                                  "coco.agent.confidential=1",
                                  kernel_params) if p)
    return f"""# coco-dev profile pointed at the reference guest image (TCG, hybrid vsock)
[hypervisor]
tee = "none"
qemu_path = "/usr/bin/qemu-system-x86_64"
kernel = "{kernel}"
initrd = "{initrd}"
{image_line(image)}kernel_params = "{params}"
accelerator = "tcg"
vcpus = 1
memory_mib = 1024
vsock = "hybrid"

[runtime]
confidential = true
dial_timeout = {dial_timeout}
enable_annotations = [
    "io.katacontainers.config.hypervisor.cc_init_data",
    "io.katacontainers.config.agent.policy",
]
"""


# The bare boot's /init: the limit a guest's boot is measured against (make bench-guest,
# make bench).
POWEROFF_INIT = r"""
#include <sys/reboot.h>
#include <unistd.h>
int main(void) { reboot(RB_POWER_OFF); return 1; }
"""


def build_bare_initrd(folder: Path) -> Path:
    """An initramfs holding only a static /init that powers the VM off."""
    source = folder / "poweroff.c"
    source.write_text(POWEROFF_INIT)
    tree = folder / "bare-tree"
    tree.mkdir()
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(tree / "init"), str(source)],
                   check=True, capture_output=True)
    out = folder / "bare.initrd"
    write_initramfs(tree, out, mtime=0,
                    devices=(DeviceNode("dev/console", 0o020600, 5, 1),))
    return out
