"""The pod's sandbox (pause) container: never pulled, taken from the bundle in the guest image.

``/pause_bundle/config.json`` is an OCI config whose ``process`` replaces the spec's (as Kata
does); ``/pause_bundle/rootfs/<args[0]>`` is a small static program (the image ships Debian's
``catatonit``, run as ``-P``: it waits, reaps, and exits on SIGTERM/SIGINT). The sandbox is
recognised by its metadata (the container's annotations), as in Kata.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guest.agent.errors import FailedPrecondition, InvalidArgument

PAUSE_BUNDLE = Path("/pause_bundle")
CONTAINER_TYPE_KEYS = ("io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType")


def is_sandbox(metadata: Mapping[str, str]) -> bool:
    return any(metadata.get(key) == "sandbox" for key in CONTAINER_TYPE_KEYS)


def pause_process(bundle: Path = PAUSE_BUNDLE) -> dict[str, Any]:
    try:
        config = json.loads((bundle / "config.json").read_text())
        process = dict(config["process"])
        program = str(process["args"][0])
    except FileNotFoundError as err:
        raise FailedPrecondition(f"the guest image has no pause bundle ({bundle})") from err
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise FailedPrecondition(f"{bundle}/config.json has no usable process: {err}") from err
    if not program.startswith("/") or ".." in program.split("/"):
        raise FailedPrecondition(f"{bundle}/config.json: pause program {program!r} is not absolute")
    return process


def pause_argv(bundle: Path = PAUSE_BUNDLE) -> list[str]:
    """The pause process's argv with its program as the bundle holds it (the agent runs it
    itself, outside any container, as the init of a pod's PID namespace)."""
    args = [str(a) for a in pause_process(bundle)["args"]]
    return [str(bundle / "rootfs" / args[0].lstrip("/")), *args[1:]]


def prepare_pause_rootfs(rootfs: Path, bundle: Path = PAUSE_BUNDLE) -> dict[str, Any]:
    """Copy the pause program into ``rootfs`` (an empty directory); return the process."""
    process = pause_process(bundle)
    program = str(process["args"][0]).lstrip("/")
    source = bundle / "rootfs" / program
    target = rootfs / program
    if not source.is_file():
        raise FailedPrecondition(f"pause program {source} is missing from the guest image")
    if not rootfs.is_dir():  # (the caller opened it without following symlinks)
        raise InvalidArgument(f"pause rootfs {rootfs} is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target, follow_symlinks=False)
    os.chmod(target, 0o755)
    return process
