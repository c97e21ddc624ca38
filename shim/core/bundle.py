"""The OCI bundle containerd hands the shim: its config.json, and the pod it belongs to."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from shim.core import identifiers
from shim.core.errors import InvalidArgument

SANDBOX_ID_ANNOTATION: Final = "io.kubernetes.cri.sandbox-id"
# The pod's resources as CRI annotates its sandbox (sizing reads them, the sandbox API writes them).
SANDBOX_CPU_PERIOD: Final = "io.kubernetes.cri.sandbox-cpu-period"
SANDBOX_CPU_QUOTA: Final = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_SHARES: Final = "io.kubernetes.cri.sandbox-cpu-shares"
SANDBOX_MEMORY: Final = "io.kubernetes.cri.sandbox-memory"


def read_spec(bundle: Path, *, missing_ok: bool = False) -> dict[str, object]:
    """The bundle's config.json as a JSON object. A missing file is InvalidArgument, or ``{}``
    with ``missing_ok`` (``start`` may run on a half-made bundle)."""
    path = bundle / "config.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError as err:
        if missing_ok:
            return {}
        raise InvalidArgument(f"bundle {bundle} has no config.json") from err
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise InvalidArgument(f"cannot read {path}: {err}") from err
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{path} is not a JSON object")
    return spec


def group_id(spec: Mapping[str, object], task_id: str) -> str:
    """The pod a container belongs to: its CRI sandbox id, or itself (a pod sandbox, `ctr run`)."""
    annotations = spec.get("annotations")
    if isinstance(annotations, Mapping):
        sandbox = annotations.get(SANDBOX_ID_ANNOTATION)
        if isinstance(sandbox, str) and sandbox:
            return identifiers.validate(f"annotation {SANDBOX_ID_ANNOTATION}", sandbox)
    return identifiers.validate("container id", task_id)
