"""The one error of the measurement package."""

from __future__ import annotations

from hypervisor.errors import HypervisorError


class MeasureError(HypervisorError):
    """A launch measurement cannot be computed; the message names what is missing."""
