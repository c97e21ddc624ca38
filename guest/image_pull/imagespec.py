"""The pulled image's config applied to the container's OCI spec, the way containerd would.

Only where the spec leaves a value to the image (the host may not have the image at all):

- ``process.args`` empty → the image's ``Entrypoint`` + ``Cmd`` (none at all: InvalidArgument);
- ``process.env``: every image variable the spec does not set is added (the spec wins);
- ``process.cwd`` empty or ``/`` → the image's ``WorkingDir``;
- the user, resolved from the image's files in the guest (:mod:`.users`), in this order:
  1. ``process.user.username`` set (containerd's own convention for "resolve this in the
     guest", used for LCOW): that string is resolved, and cleared from the spec;
  2. the image config has a ``User`` and the spec's user is the default root (uid 0, gid 0,
     no other groups, what a host that could not read the image sends, Kata issue #11162):
     the image's ``User`` is resolved;
  3. otherwise the spec's numeric user stands as the host (e.g. ``runAsUser``) chose it.

The root path becomes the storage's mount point.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from guest.agent.errors import InvalidArgument
from guest.image_pull.users import resolve_user

log = logging.getLogger(__name__)


def _env_name(entry: str) -> str:
    return entry.split("=", 1)[0]


def apply_image_config(
    spec: dict[str, Any], image_config: dict[str, Any], rootfs: Path, image: str
) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    out["root"] = {**out.get("root", {}), "path": str(rootfs)}
    config = image_config.get("config") or {}
    process = out.setdefault("process", {})
    if not process.get("args"):
        args = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
        if not args:
            raise InvalidArgument(
                f"image {image} has neither Entrypoint nor Cmd and the spec gives no args"
            )
        process["args"] = args
    env = list(process.get("env") or [])
    present = {_env_name(e) for e in env}
    for entry in config.get("Env") or []:
        if isinstance(entry, str) and _env_name(entry) not in present:
            env.append(entry)
            present.add(_env_name(entry))
    process["env"] = env
    workdir = config.get("WorkingDir") or ""
    if process.get("cwd", "") in ("", "/") and workdir:
        process["cwd"] = workdir
    user = dict(process.get("user") or {})
    wanted = str(user.pop("username", "") or "")
    image_user = str(config.get("User") or "")
    default_root = (
        not user.get("uid") and not user.get("gid") and set(user.get("additionalGids") or []) <= {0}
    )
    source = wanted or (image_user if default_root else "")
    if source:
        resolved = resolve_user(rootfs, source, image)
        user.update(
            uid=resolved.uid, gid=resolved.gid, additionalGids=list(resolved.additional_gids)
        )
        log.info(
            "image %s: user %r resolved in the guest to %d:%d %s",
            image,
            source,
            resolved.uid,
            resolved.gid,
            list(resolved.additional_gids),
        )
    process["user"] = user
    return out


def apply_pause_process(
    spec: dict[str, Any], process: dict[str, Any], rootfs: Path
) -> dict[str, Any]:
    """The sandbox container runs the pause bundle's process instead of the spec's (Kata)."""
    out = copy.deepcopy(spec)
    out["root"] = {**out.get("root", {}), "path": str(rootfs)}
    out["process"] = copy.deepcopy(process)
    return out
