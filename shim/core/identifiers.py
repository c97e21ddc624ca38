"""containerd's identifier rules, checked at every edge where an id enters the shim.

Container, exec and sandbox ids and the namespace become host paths (state records, pod run
directories, sockets), so an id such as ``../..`` must never get that far. The rules are
containerd's ``pkg/identifiers``: 1 to 76 characters, letters and digits in runs joined by
single ``.``, ``_`` or ``-`` (so no leading/trailing separator, no ``..``, no ``/``).

Pure and cheap to import: ``start`` and ``delete`` use it.
"""

from __future__ import annotations

import re
from typing import Final

from shim.core.errors import InvalidArgument

MAX_LENGTH: Final = 76
_IDENTIFIER: Final = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")


def validate(kind: str, value: str) -> str:
    """``value`` if it is a valid containerd identifier, else InvalidArgument naming it."""
    if not value:
        raise InvalidArgument(f"{kind} must not be empty")
    if len(value) > MAX_LENGTH:
        raise InvalidArgument(f"{kind} {value[:MAX_LENGTH]!r}... is longer than {MAX_LENGTH} "
                              f"characters")
    if not _IDENTIFIER.fullmatch(value):
        raise InvalidArgument(f"{kind} {value!r} must match {_IDENTIFIER.pattern} "
                              f"(containerd's identifier rules)")
    return value
