"""What a profile's ``"auto"`` accelerator and vsock stand for on this host: decided here only.

``vsock_kind`` and ``accelerator_for`` are the rules (pure, for ``assess`` and ``launch_vm``);
``resolve_accelerator`` applies the accelerator rule with a real KVM probe boot, cached per
QEMU binary and host boot when given a cache file (the shim boots many pods).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from hypervisor.profile import RuntimeProfile
from hypervisor.timeouts import TIMEOUTS, Timeouts
from hypervisor.vsock import kernel_vsock_available

log = logging.getLogger(__name__)

KVM_DEVICE = Path("/dev/kvm")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def vsock_kind(requested: str, *, confidential: bool, kernel_vsock: bool) -> str:
    """``kernel`` | ``hybrid`` | ``none``: ``auto`` is kernel vhost-vsock where the host has
    it, else hybrid vsock — which needs shared guest memory, so never for a confidential VM."""
    if requested != "auto":
        return requested
    if kernel_vsock:
        return "kernel"
    return "none" if confidential else "hybrid"


def profile_vsock(profile: RuntimeProfile) -> str:
    """The vsock kind ``profile`` gets on this host."""
    return vsock_kind(profile.vsock, confidential=profile.tee.confidential,
                      kernel_vsock=kernel_vsock_available())


def accelerator_for(requested: str, *, kvm_usable: bool) -> str:
    """``auto`` is KVM when it really runs a guest here, else TCG."""
    if requested != "auto":
        return requested
    return "kvm" if kvm_usable else "tcg"


async def resolve_accelerator(profile: RuntimeProfile, *, cache: Path | None = None,
                              kvm_device: Path = KVM_DEVICE,
                              timeouts: Timeouts = TIMEOUTS) -> str:
    """The accelerator ``profile`` gets here; ``auto`` costs a probe boot (≤ the table's
    ``kvm_probe_boot``) unless ``cache`` holds the answer for this QEMU and this host boot."""
    if profile.accel != "auto":
        return profile.accel
    key = _cache_key(profile) if cache is not None else ""
    cached = _cached(cache, key)
    if cached is not None:
        return cached
    from hypervisor.probe import probe_kvm  # probe uses the rules above

    usable = _exists(kvm_device) and (await probe_kvm(
        profile.qemu, qemu_root=profile.qemu_root, bound=timeouts.kvm_probe_boot)).ok
    accel = accelerator_for("auto", kvm_usable=usable)
    _remember(cache, key, accel)
    log.info("accelerator auto → %s", accel)
    return accel


def _exists(path: Path) -> bool:
    return path.exists()


def _cache_key(profile: RuntimeProfile) -> str:
    return f"{profile.qemu}:{profile.qemu.stat().st_mtime_ns}:{_boot_id()}"


def _cached(cache: Path | None, key: str) -> str | None:
    if cache is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(cache.read_text())
        if record.get("key") == key:
            return str(record["accel"])
    return None


def _remember(cache: Path | None, key: str, accel: str) -> None:
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "accel": accel}))


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""
