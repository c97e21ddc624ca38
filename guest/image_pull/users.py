"""Users and groups resolved from the image's own ``/etc/passwd`` and ``/etc/group``, in the guest.

containerd's rules (``WithUser`` + ``WithAdditionalGIDs``), applied to the pulled rootfs:

- ``name``: the passwd entry of that name (missing: an error); its uid and gid;
- ``uid``: that uid; the gid of its passwd entry, or 0 when it has none;
- ``user:group``: each side a name (looked up; missing: an error) or a number (used as is);
- supplementary groups: every group listing the user's name as a member (the user's primary
  group first, as containerd ensures).

Files are read with symlinks resolved *inside* the rootfs (an absolute link target starts at
the rootfs, ``..`` stops at it): an image's ``/etc/passwd -> /proc/1/environ`` reads nothing of
the guest.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import NamedTuple

from guest.agent.errors import InvalidArgument, NotFound

MAX_FILE = 4 << 20
MAX_LINKS = 40


class ResolvedUser(NamedTuple):
    uid: int
    gid: int
    additional_gids: tuple[int, ...]


def read_in_root(root: Path, path: str) -> bytes | None:
    """The content of ``path`` inside ``root`` (symlinks confined to root), or None."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            info = os.lstat(candidate)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(info.st_mode):
            hops += 1
            if hops > MAX_LINKS:
                raise InvalidArgument(f"too many symlinks resolving {path} in the image")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    final = root.joinpath(*resolved)
    try:
        fd = os.open(final, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, MAX_FILE)
    finally:
        os.close(fd)


class _Passwd(NamedTuple):
    name: str
    uid: int
    gid: int


class _Group(NamedTuple):
    name: str
    gid: int
    members: tuple[str, ...]


def _records(data: bytes | None, fields: int) -> list[list[str]]:
    out = []
    for line in (data or b"").decode("utf-8", "replace").splitlines():
        if not line or line.startswith("#"):
            continue
        cols = line.split(":")
        if len(cols) >= fields:
            out.append(cols)
    return out


def _passwd(root: Path) -> list[_Passwd]:
    out = []
    for cols in _records(read_in_root(root, "/etc/passwd"), 4):
        if cols[2].isdigit() and cols[3].isdigit():
            out.append(_Passwd(cols[0], int(cols[2]), int(cols[3])))
    return out


def _groups(root: Path) -> list[_Group]:
    out = []
    for cols in _records(read_in_root(root, "/etc/group"), 3):
        if cols[2].isdigit():
            members = tuple(m for m in (cols[3].split(",") if len(cols) > 3 else []) if m)
            out.append(_Group(cols[0], int(cols[2]), members))
    return out


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) < 2**32 else None


def resolve_user(root: Path, user: str, image: str) -> ResolvedUser:
    """Resolve an image ``User`` string (or a host-given name) inside ``root``."""
    if user.count(":") > 1 or not user or user.startswith(":") or user.endswith(":"):
        raise InvalidArgument(f"image {image}: invalid user {user!r}")
    user_part, _, group_part = user.partition(":")
    users = _passwd(root)
    uid = _number(user_part)
    entry: _Passwd | None
    if uid is None:
        entry = next((u for u in users if u.name == user_part), None)
        if entry is None:
            raise NotFound(f"image {image}: user {user_part!r} is not in its /etc/passwd")
        uid, gid = entry.uid, entry.gid
    else:
        entry = next((u for u in users if u.uid == uid), None)
        gid = entry.gid if entry is not None else 0
    groups = _groups(root)
    if group_part:
        number = _number(group_part)
        if number is None:
            found = next((g for g in groups if g.name == group_part), None)
            if found is None:
                raise NotFound(f"image {image}: group {group_part!r} is not in its /etc/group")
            number = found.gid
        gid = number
    name = entry.name if entry is not None else None
    extra = [g.gid for g in groups if name is not None and g.name != name and name in g.members]
    additional = tuple(dict.fromkeys([gid, *extra]))
    return ResolvedUser(uid=uid, gid=gid, additional_gids=additional)
