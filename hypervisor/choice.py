"""What a profile's ``"auto"`` accelerator and vsock stand for on this host: the rules, decided
here only (pure). ``launch_vm`` and ``probe.assess`` apply them; ``probe.resolve_accelerator``
feeds the accelerator rule a real KVM probe boot, cached per QEMU binary and host boot.
"""

from __future__ import annotations

from hypervisor.profile import RuntimeProfile
from hypervisor.vsock import kernel_vsock_available


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
