"""Typed errors raised by the hypervisor package.

The shim maps these onto containerd status codes in one table; here they only say what went
wrong, in terms an operator can act on.
"""

from __future__ import annotations

from dataclasses import dataclass


class HypervisorError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(HypervisorError):
    """A runtime profile (TOML) is malformed: unknown key, wrong type, missing file."""

    def __init__(self, source: str, key: str, message: str, value: object = None) -> None:
        self.source = source
        self.key = key
        self.value = value
        shown = "" if value is None else f" (value {value!r})"
        super().__init__(f"{source}: {key}: {message}{shown}")


class InvariantError(HypervisorError):
    """A combination of options that would produce an impossible or silently wrong VM."""

    def __init__(self, profile: str, conflict: str) -> None:
        self.profile = profile
        self.conflict = conflict
        super().__init__(f"TEE profile {profile!r}: {conflict}")


class QemuError(HypervisorError):
    """QEMU failed to start, refused a QMP command, or did not answer in time."""


class ProbeError(HypervisorError):
    """A host or QEMU capability could not be determined."""


class VsockError(HypervisorError):
    """A vsock device could not be set up (CID allocation, vhost-user backend)."""


@dataclass(frozen=True)
class ExitReason:
    """Why a VM stopped; ``clean`` is true only for an orderly guest or host shutdown."""

    kind: str  # "shutdown", "panic", "stopped", "killed", "process-exit"
    detail: str
    clean: bool
    returncode: int | None = None

    def __str__(self) -> str:
        code = "" if self.returncode is None else f", exit status {self.returncode}"
        return f"{self.kind}: {self.detail}{code}"


class VmExited(HypervisorError):
    """Raised when an operation needs a running VM but the VM has exited."""

    def __init__(self, reason: ExitReason) -> None:
        self.reason = reason
        super().__init__(f"VM exited ({reason})")
