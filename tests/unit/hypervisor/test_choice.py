"""What "auto" means, decided in one place: the rules, and the cached probe the shim uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hypervisor.choice import accelerator_for, vsock_kind
from hypervisor.probe import resolve_accelerator
from hypervisor.profile import RuntimeProfile, TeeKind


def test_vsock_rules() -> None:
    assert vsock_kind("auto", confidential=False, kernel_vsock=True) == "kernel"
    assert vsock_kind("auto", confidential=False, kernel_vsock=False) == "hybrid"
    # Hybrid vsock needs shared guest memory: never for a confidential VM.
    assert vsock_kind("auto", confidential=True, kernel_vsock=False) == "none"
    assert vsock_kind("hybrid", confidential=False, kernel_vsock=True) == "hybrid"


def test_accelerator_rules() -> None:
    assert accelerator_for("auto", kvm_usable=True) == "kvm"
    assert accelerator_for("auto", kvm_usable=False) == "tcg"
    assert accelerator_for("tcg", kvm_usable=True) == "tcg"


def _profile(tmp_path: Path, accel: str) -> RuntimeProfile:
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\nexit 1\n")
    qemu.chmod(0o755)
    return RuntimeProfile(name="p", tee=TeeKind.NONE, qemu=qemu, kernel=None, accel=accel)


async def test_an_explicit_accelerator_is_not_probed(tmp_path: Path) -> None:
    assert await resolve_accelerator(_profile(tmp_path, "tcg"),
                                     cache=tmp_path / "c.json") == "tcg"
    assert not (tmp_path / "c.json").exists()


async def test_auto_without_a_kvm_device_is_tcg_and_cached(tmp_path: Path) -> None:
    profile = _profile(tmp_path, "auto")
    cache = tmp_path / "run" / "kvm-probe.json"
    accel = await resolve_accelerator(profile, cache=cache, kvm_device=tmp_path / "no-kvm")
    assert accel == "tcg"
    record = json.loads(cache.read_text())
    assert record["accel"] == "tcg" and record["key"].startswith(f"{profile.qemu}:")
    # The next pod reads the answer for this QEMU and this host boot.
    cache.write_text(json.dumps({**record, "accel": "kvm"}))
    assert await resolve_accelerator(profile, cache=cache) == "kvm"


@pytest.mark.parametrize("accel", ["kvm", "tcg"])
async def test_a_stale_cache_is_not_believed(tmp_path: Path, accel: str) -> None:
    profile = _profile(tmp_path, "auto")
    cache = tmp_path / "kvm-probe.json"
    cache.write_text(json.dumps({"key": "another qemu", "accel": accel}))
    assert await resolve_accelerator(profile, cache=cache,
                                     kvm_device=tmp_path / "no-kvm") == "tcg"
