"""Shared fixtures: the test kernel, built initramfs images and a `none` profile for TCG."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor.profile import RuntimeProfile, TeeKind
from tests import envinfo
from tests.integration.hypervisor.guest import build_initramfs

HOST_QEMU = Path("/usr/bin/qemu-system-x86_64")


@pytest.fixture(scope="session")
def env() -> envinfo.TestEnv:
    return envinfo.load()


@pytest.fixture(scope="session")
def initrd_plain(env: envinfo.TestEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(tmp_path_factory.mktemp("initrd") / "plain.cpio", env.modules_dir,
                           with_vsock=False)


@pytest.fixture(scope="session")
def initrd_vsock(env: envinfo.TestEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(tmp_path_factory.mktemp("initrd") / "vsock.cpio", env.modules_dir,
                           with_vsock=True)


@pytest.fixture(scope="session")
def initrd_blk(env: envinfo.TestEnv, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initramfs(tmp_path_factory.mktemp("initrd") / "blk.cpio", env.modules_dir,
                           with_vsock=False, with_blk=True)


def none_profile(env: envinfo.TestEnv, initrd: Path, mode: str,
                 vsock: str = "none") -> RuntimeProfile:
    return RuntimeProfile(
        name="qemu-none-test", tee=TeeKind.NONE, qemu=HOST_QEMU, kernel=env.kernel,
        initrd=initrd, kernel_params=f"console=ttyS0 panic=-1 coco.mode={mode}",
        accel="tcg", vcpus=1, memory_mib=256, vsock=vsock,
    )
