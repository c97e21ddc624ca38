"""Paths the host names, resolved beneath a root one component at a time, never through a symlink.

The host chooses CopyFile targets and storage mount points. A lexical check (``normpath`` then
"is it under the root?") is not enough: a symlink planted beneath the root (by an earlier
CopyFile, or inside a share the host controls) would send the write or the mount elsewhere.
So every component is opened with ``O_NOFOLLOW`` relative to the previous one's descriptor;
a symlink anywhere on the way is refused (PermissionDenied naming it). Callers then act on the
final directory descriptor (``*at`` calls, or ``/proc/self/fd/N`` as a mount target), so the
path is not looked up a second time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from guest.agent.errors import InvalidArgument, PermissionDenied, from_os_error

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def parts_beneath(root: Path, path: str, what: str) -> tuple[str, ...]:
    """The components of ``path`` below ``root``; refused if it is not strictly beneath it."""
    if not os.path.isabs(path):
        raise PermissionDenied(f"{what} must be an absolute path beneath {root}: {path!r}")
    normal = PurePosixPath(os.path.normpath(path))
    try:
        parts = normal.relative_to(PurePosixPath(root)).parts
    except ValueError:
        raise PermissionDenied(f"{what} must be beneath {root}: {path}") from None
    if not parts:
        raise PermissionDenied(f"{what} must be beneath {root}, not the root itself: {path}")
    return parts


def _refuse_non_directory(
    dir_fd: int, name: str, shown: str, what: str, err: OSError
) -> Exception:
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return from_os_error(err, f"{what}: {shown}")
    if stat.S_ISLNK(mode):
        return PermissionDenied(f"{what}: {shown} is a symlink: refusing to follow it")
    return InvalidArgument(f"{what}: {shown} is not a directory")


@contextlib.contextmanager
def open_directory(
    root: Path, parts: tuple[str, ...], *, create_mode: int | None = None, what: str = "path"
) -> Iterator[int]:
    """An O_PATH descriptor of root/parts (closed on exit), every component checked not to be a
    symlink; missing directories are created with ``create_mode`` when it is given."""
    fd = os.open(root, _DIR_FLAGS & ~os.O_NOFOLLOW)  # the root itself is the agent's own path
    try:
        walked = PurePosixPath(root)
        for name in parts:
            walked = walked / name
            try:
                next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if create_mode is None:
                    raise
                with contextlib.suppress(FileExistsError):  # raced: checked again just below
                    os.mkdir(name, create_mode, dir_fd=fd)
                try:
                    next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as err:
                    raise _refuse_non_directory(fd, name, str(walked), what, err) from err
            except OSError as err:
                if err.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise _refuse_non_directory(fd, name, str(walked), what, err) from err
                raise
            os.close(fd)
            fd = next_fd
        yield fd
    finally:
        os.close(fd)


def fd_path(fd: int) -> str:
    """A path naming exactly the object behind ``fd`` (for mount(2), which takes paths)."""
    return f"/proc/self/fd/{fd}"


__all__ = ["fd_path", "open_directory", "parts_beneath"]
