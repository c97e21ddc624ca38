"""Errors of the guest's attestation agent and data hub, each naming its cause."""

from __future__ import annotations


class AttestationError(RuntimeError):
    """Base of every error raised by guest.attestation."""


class ConfigError(AttestationError):
    """aa.toml / cdh.toml is missing something or holds a bad value."""


class KbsUnreachable(AttestationError):
    """The KBS could not be reached (connection, TLS, timeout)."""


class KbsError(AttestationError):
    """The KBS answered with an error status (an RFC 7807 body when it is trustee's)."""

    def __init__(self, operation: str, status: int, name: str | None, detail: str) -> None:
        self.operation = operation
        self.status = status
        self.name = name
        self.detail = detail
        kind = f" {name}" if name else ""
        super().__init__(f"KBS {operation} failed: HTTP {status}{kind}: {detail}")

    @property
    def denied(self) -> bool:
        """The KBS's policy refused this guest (403, or trustee's PolicyDeny name)."""
        return self.status == 403 or self.name == "PolicyDeny"


class EvidenceError(AttestationError):
    """The TEE evidence could not be produced."""


class SealedSecretError(AttestationError):
    """A sealed secret is malformed, fails verification, or cannot be unsealed."""
