"""A thin typed wrapper over an OCI runtime's command line: runc (1.1) or crun (1.8).

Only what both accept is used: ``--root``, ``--log`` with ``--log-format json``, ``create``/
``exec --detach`` with ``--pid-file`` and ``--console-socket``, ``start``, ``kill [--all]``,
``delete --force``, ``pause``, ``resume``, ``update --resources FILE`` and ``state``. crun has
no ``events``: on cgroup v2 the agent reads stats from the cgroup files
(:mod:`guest.agent.cgroups`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from guest.agent import timeline
from guest.agent.errors import (
    AgentError,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    RuntimeFailure,
)
from guest.agent.reaper import Reaper

log = logging.getLogger(__name__)

CONSOLE_TIMEOUT = 30.0  # runc sends the pty master right after creating the container

# runc's own error texts, most specific first.
_MESSAGE_ERRORS: tuple[tuple[str, type[AgentError]], ...] = (
    ("does not exist", NotFound),
    ("no such file or directory", NotFound),
    ("already exists", AlreadyExists),
    ("not running", FailedPrecondition),
    ("cannot start a container that has stopped", FailedPrecondition),
    ("cannot start an already running container", FailedPrecondition),
    ("is not paused", FailedPrecondition),
    ("is paused", FailedPrecondition),
)


def error_for(what: str, message: str) -> AgentError:
    lowered = message.lower()
    for needle, kind in _MESSAGE_ERRORS:
        if needle in lowered:
            return kind(f"{what}: {message}")
    return RuntimeFailure(f"{what}: {message}")


def last_log_error(log_file: Path) -> str:
    """The last error runc wrote to its JSON log (what `runc create` failed with)."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", ""))
    return ""


class Stdio(NamedTuple):
    """fds handed to the process (pipes); None for a terminal (console socket instead)."""

    stdin: int
    stdout: int
    stderr: int


class Runc:
    def __init__(self, reaper: Reaper, *, binary: str = "runc", root: Path) -> None:
        self._reaper = reaper
        self.binary = binary
        self.root = root

    def _argv(self, log_file: Path | None, *args: str) -> list[str]:
        argv = [self.binary, "--root", str(self.root)]
        if log_file is not None:
            argv += ["--log", str(log_file), "--log-format", "json"]
        return [*argv, *args]

    async def _call(self, what: str, *args: str, input: bytes | None = None) -> bytes:
        timeline.mark(f"runtime {args[0]}: spawning")
        done = await self._reaper.run(self._argv(None, *args), input=input)
        timeline.mark(f"runtime {args[0]}: exited")
        if done.code != 0:
            message = done.stderr.decode(errors="replace").strip() or f"exit status {done.code}"
            raise error_for(what, message)
        return done.stdout

    async def _spawn_detached(
        self,
        what: str,
        args: Sequence[str],
        log_file: Path,
        stdio: Stdio | None,
        console_socket: Path | None,
    ) -> int | None:
        """Run a create/exec that leaves a process behind; return the pty master fd if any."""
        listener: socket.socket | None = None
        if console_socket is not None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(console_socket))
            listener.listen(1)
            listener.settimeout(CONSOLE_TIMEOUT)
            args = [*args[:1], "--console-socket", str(console_socket), *args[1:]]
        master: asyncio.Future[int] | None = None
        try:
            timeline.mark(f"runtime {args[0]}: spawning")
            spawned = self._reaper.spawn(
                self._argv(log_file, *args),
                stdin=stdio.stdin if stdio else subprocess.DEVNULL,
                stdout=stdio.stdout if stdio else subprocess.DEVNULL,
                stderr=stdio.stderr if stdio else subprocess.DEVNULL,
            )
            timeline.mark(f"runtime {args[0]}: spawned")
            if listener is not None:
                master = asyncio.ensure_future(asyncio.to_thread(_receive_fd, listener))
            code = await spawned.exited
            timeline.mark(f"runtime {args[0]}: exited")
            if code != 0:
                if master is not None:
                    listener_close(listener)
                    await asyncio.gather(master, return_exceptions=True)
                message = last_log_error(log_file) or f"runc exit status {code}"
                raise error_for(what, message)
            if master is None:
                return None
            try:
                return await master
            except TimeoutError as err:
                raise DeadlineExceeded(f"{what}: runc sent no console") from err
        finally:
            if listener is not None:
                listener_close(listener)
                if console_socket is not None:
                    _unlink(console_socket)
            if master is not None and not master.done():  # cancelled: nobody takes the pty
                master.add_done_callback(_discard_fd)

    async def create(
        self,
        container_id: str,
        bundle: Path,
        pid_file: Path,
        *,
        stdio: Stdio | None,
        console_socket: Path | None = None,
    ) -> int | None:
        return await self._spawn_detached(
            f"create {container_id}",
            ["create", "--bundle", str(bundle), "--pid-file", str(pid_file), container_id],
            bundle / "runc.log",
            stdio,
            console_socket,
        )

    async def exec(
        self,
        container_id: str,
        process_file: Path,
        pid_file: Path,
        log_file: Path,
        *,
        stdio: Stdio | None,
        console_socket: Path | None = None,
    ) -> int | None:
        return await self._spawn_detached(
            f"exec in {container_id}",
            [
                "exec",
                "--detach",
                "--process",
                str(process_file),
                "--pid-file",
                str(pid_file),
                container_id,
            ],
            log_file,
            stdio,
            console_socket,
        )

    async def start(self, container_id: str) -> None:
        await self._call(f"start {container_id}", "start", container_id)

    async def kill(self, container_id: str, signal: int, *, all_processes: bool = False) -> None:
        args = ["kill", *(["--all"] if all_processes else []), container_id, str(signal)]
        await self._call(f"kill {container_id}", *args)

    async def delete(self, container_id: str, *, force: bool = True) -> None:
        args = ["delete", *(["--force"] if force else []), container_id]
        await self._call(f"delete {container_id}", *args)

    async def pause(self, container_id: str) -> None:
        await self._call(f"pause {container_id}", "pause", container_id)

    async def resume(self, container_id: str) -> None:
        await self._call(f"resume {container_id}", "resume", container_id)

    async def update(self, container_id: str, resources: dict[str, Any], scratch: Path) -> None:
        """``scratch``: where the resources file is written (crun cannot read it from stdin)."""
        _write(scratch, json.dumps(resources))
        try:
            await self._call(
                f"update {container_id}", "update", "--resources", str(scratch), container_id
            )
        finally:
            _unlink(scratch)

    async def state(self, container_id: str) -> dict[str, Any]:
        out = await self._call(f"state {container_id}", "state", container_id)
        result: dict[str, Any] = json.loads(out)
        return result

    async def stats(self, container_id: str) -> dict[str, Any]:
        out = await self._call(f"stats {container_id}", "events", "--stats", container_id)
        event: dict[str, Any] = json.loads(out)
        data: dict[str, Any] = event.get("data", {})
        return data


def pin_read_only(binary: str) -> bool:
    """Bind-mount the OCI runtime's binary onto itself read-only, unless its filesystem is.

    crun (and runc) guard against CVE-2019-5736 (a container overwriting the runtime through
    ``/proc/<pid>/exe``) by copying themselves into a sealed memfd and re-executing that,
    on every invocation, unless the binary they run from is on a read-only mount, which
    makes that write fail anyway (runc's ``cloned_binary.c``, copied into crun). Under TCG
    the copy and the second exec (crun's dynamic loading again: libsystemd, libgcrypt, ...)
    cost every create, start, kill and delete tens of milliseconds. A read-only bind mount of
    the binary in the agent's mount namespace keeps the protection and drops the copy.
    False (and the runtime keeps copying itself) if the mount cannot be made.
    """
    from guest.agent import mounts

    path = shutil.which(binary)
    if path is None:
        log.warning("runtime %s not found: not pinned read-only", binary)
        return False
    path = os.path.realpath(path)
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return True  # the root image is read-only already (the device form)
        mounts.mount(path, path, "", mounts.MS_BIND)
        mounts.mount(path, path, "", mounts.MS_REMOUNT | mounts.MS_BIND | mounts.MS_RDONLY)
    except (AgentError, OSError) as err:
        log.warning("runtime %s not pinned read-only (it re-executes itself instead): %s",
                    path, err)
        return False
    return True


def listener_close(listener: socket.socket | None) -> None:
    """Close the console listener; shutdown first wakes a thread blocked in accept()."""
    if listener is not None:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()


def _discard_fd(future: asyncio.Future[int]) -> None:
    if not future.cancelled() and future.exception() is None:
        os.close(future.result())


def _receive_fd(listener: socket.socket) -> int:
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(CONSOLE_TIMEOUT)
        _msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 1)
    if not fds:
        raise RuntimeFailure("runc's console socket message carried no fd")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)
