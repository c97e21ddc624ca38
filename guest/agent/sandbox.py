"""The agent's domain root: one sandbox (the pod this VM runs) and its containers.

Every AgentService RPC except networking, time and policy lands on one method here. Methods
take plain values (the edge translated the protobuf request) and raise typed errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import shutil
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from guest.agent import beneath, timeline
from guest.agent.containers import Container, Process, SecretUnsealer, validate_id
from guest.agent.errors import (
    AgentError,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    from_os_error,
)
from guest.agent.inotify import Inotify
from guest.agent.namespaces import (
    PidNamespace,
    PodNamespaces,
    create_pod_namespaces,
    start_pid_namespace,
)
from guest.agent.reaper import Reaper
from guest.agent.runc import Runc
from guest.agent.storage import GuestPull, StorageManager, StorageSpec

log = logging.getLogger(__name__)

class SandboxState(enum.Enum):
    EMPTY = "empty"  # before CreateSandbox (containers may still be created, as with Kata)
    READY = "ready"
    DESTROYED = "destroyed"


class AgentPaths(NamedTuple):
    state_dir: Path  # bundles and runc's root
    shared_root: Path  # CopyFile may only write below it (Kata: /run/kata-containers)
    resolv_conf: Path = Path("/etc/resolv.conf")
    cgroup_parent: str = "/coco"  # containers' cgroups are <parent>/<container id>

    @property
    def bundles(self) -> Path:
        return self.state_dir / "containers"

    @property
    def runc_root(self) -> Path:
        return self.state_dir / "runc"

    @property
    def sockets(self) -> Path:
        """Console sockets: short names, whatever the length of the ids."""
        return self.state_dir / "sock"

    @property
    def namespaces(self) -> Path:
        """The pod's IPC and UTS namespaces, pinned as files."""
        return self.state_dir / "ns"


class FileCopy(NamedTuple):
    path: str
    file_size: int
    file_mode: int
    dir_mode: int
    uid: int
    gid: int
    offset: int
    data: bytes


class Sandbox:
    def __init__(
        self,
        reaper: Reaper,
        paths: AgentPaths,
        *,
        runc_binary: str = "runc",
        manage_system: bool,
        secrets: SecretUnsealer | None = None,
        guest_pull: GuestPull | None = None,
        pid_namespace_init: Callable[[], list[str]] | None = None,
    ) -> None:
        """``pid_namespace_init``: the argv of the program that becomes the init of the pod's
        PID namespace when the first container asking to join it (sandbox_pidns) finds none
        (containerd's sandbox API: no pause container); None: that container makes it."""
        self.reaper = reaper
        self.paths = paths
        self.runc = Runc(reaper, binary=runc_binary, root=paths.runc_root)
        if paths.state_dir.resolve().is_relative_to(paths.shared_root.resolve()):
            raise InvalidArgument(
                f"the agent's state dir {paths.state_dir} must not lie beneath the shared root "
                f"{paths.shared_root}: storages may mount anywhere beneath it"
            )
        paths.shared_root.mkdir(parents=True, exist_ok=True)
        self.storage = StorageManager(paths.shared_root, guest_pull)
        self.manage_system = manage_system  # set hostname/DNS: only inside the guest VM
        self.secrets = secrets  # unseals sealed env values/files (guest.attestation), if any
        self.state = SandboxState.EMPTY
        self.sandbox_id = ""
        self.containers: dict[str, Container] = {}
        self._sandbox_storages: list[str] = []
        self._creating: set[str] = set()
        self._pod_namespaces: PodNamespaces | None = None
        # Kata's rule: the first container's PID namespace (the pause container's, under CRI)
        # is the one containers created with sandbox_pidns join.
        self._pid_namespace: Path | None = None
        self._pid_namespace_init = pid_namespace_init
        self._pid_init: PidNamespace | None = None  # the one the agent started, if any
        self._oom_events: asyncio.Queue[str] = asyncio.Queue()
        self._oom_watch = Inotify(self._on_memory_events)
        self.shutdown = asyncio.Event()
        for directory in (paths.bundles, paths.runc_root, paths.sockets):
            directory.mkdir(parents=True, exist_ok=True)

    # -- sandbox ---------------------------------------------------------------------------

    def _require_alive(self, action: str) -> None:
        if self.state is SandboxState.DESTROYED:
            raise FailedPrecondition(f"cannot {action}: the sandbox is destroyed")

    async def create_sandbox(
        self, sandbox_id: str, hostname: str, dns: list[str], storages: list[StorageSpec]
    ) -> None:
        if self.state is not SandboxState.EMPTY:
            raise FailedPrecondition(f"cannot create sandbox in state {self.state.value}")
        # Storages first: a refused one (policy, confinement) leaves nothing behind.
        mounted = await self.storage.add_all(storages)
        timeline.mark("sandbox storages mounted")
        made: PodNamespaces | None = None
        try:
            if self._pod_namespaces is None:
                self._pod_namespaces = made = create_pod_namespaces(self.paths.namespaces,
                                                                    hostname)
            else:  # a container came first (allowed, as with Kata): its namespaces are the pod's
                log.warning("sandbox created after its first container: hostname not applied")
            if self.manage_system:
                if hostname:
                    socket.sethostname(hostname)
                if dns:
                    self.paths.resolv_conf.write_text("".join(f"{line}\n" for line in dns))
        except BaseException as err:
            if made is not None:
                made.release()
                self._pod_namespaces = None
            self.storage.release_all(mounted)
            if isinstance(err, OSError):
                raise from_os_error(err, "configure the sandbox") from err
            raise
        self._sandbox_storages = mounted
        self.sandbox_id = sandbox_id
        self.state = SandboxState.READY

    async def destroy_sandbox(self) -> None:
        if self.state is SandboxState.DESTROYED:
            return
        for container_id in list(self.containers):
            try:
                await self.remove_container(container_id, timeout=None)
            except Exception:
                log.exception("destroy sandbox: removing container %s failed", container_id)
        self.storage.release_all(self._sandbox_storages)
        self._sandbox_storages = []
        self._oom_watch.close()
        if self._pid_init is not None:
            await self._pid_init.stop()
            self._pid_init = None
        if self._pod_namespaces is not None:
            self._pod_namespaces.release()
            self._pod_namespaces = None
        self.state = SandboxState.DESTROYED

    def pod_namespaces(self) -> PodNamespaces:
        """The pod's IPC and UTS namespaces, made on first use (CreateSandbox, or the first
        CreateContainer when that comes first)."""
        if self._pod_namespaces is None:
            self._pod_namespaces = create_pod_namespaces(self.paths.namespaces)
        return self._pod_namespaces

    def _joined_namespaces(self, sandbox_pidns: bool) -> dict[str, Path]:
        joined = dict(self.pod_namespaces().paths)
        if not sandbox_pidns:
            return joined
        # No container made the pod's PID namespace (no pause container: the sandbox API):
        # the agent starts its init, so no workload container's exit ends the namespace.
        if self._pid_namespace is None and self._pid_namespace_init is not None:
            try:
                argv = self._pid_namespace_init()
            except FailedPrecondition as err:
                raise FailedPrecondition(f"cannot make the pod's PID namespace: {err}") from err
            self._pid_init = start_pid_namespace(self.reaper, argv)
            self._pid_namespace = self._pid_init.path
            log.info("pod PID namespace: init %s, pid %d", self._pid_init.program,
                     self._pid_init.init.pid)
        if self._pid_init is not None:
            self._pid_init.check_alive()
        if self._pid_namespace is not None:
            joined["pid"] = self._pid_namespace
        return joined

    # -- containers ------------------------------------------------------------------------

    def container(self, container_id: str) -> Container:
        found = self.containers.get(container_id)
        if found is None:
            raise NotFound(f"container {container_id} not found")
        return found

    def process(self, container_id: str, exec_id: str) -> Process:
        return self.container(container_id).process(exec_id)

    async def create_container(
        self,
        container_id: str,
        spec: dict[str, Any],
        storages: list[StorageSpec],
        *,
        init_exec_id: str = "",
        sandbox_pidns: bool = False,
    ) -> None:
        validate_id("container", container_id)
        self._require_alive("create a container")
        if container_id in self.containers or container_id in self._creating:
            raise AlreadyExists(f"container {container_id} already exists")
        joined = self._joined_namespaces(sandbox_pidns)
        self._creating.add(container_id)
        bundle = self.paths.bundles / container_id
        try:
            async with contextlib.AsyncExitStack() as undo:
                mounted = await self.storage.add_all(storages, container_id)
                timeline.mark("container storages mounted")
                undo.callback(self.storage.release_all, mounted)
                pulled = self.storage.guest_rootfs(mounted)
                if pulled is not None:  # the image's config (or the pause process) applies
                    spec = pulled.apply(spec)
                rootfs = self._container_root(container_id, spec.get("root", {}).get("path", ""))
                undo.callback(shutil.rmtree, bundle, True)
                undo.push_async_callback(self._forget_runc_state, container_id)
                container = await Container.create(
                    container_id,
                    spec,
                    bundle=bundle,
                    rootfs=rootfs,
                    storages=mounted,
                    runc=self.runc,
                    reaper=self.reaper,
                    cgroup_parent=self.paths.cgroup_parent,
                    secrets=self.secrets,
                    pod_namespaces=joined,
                    sockets=self.paths.sockets,
                    on_exit=self._check_oom,
                )
                undo.pop_all()
            container.init_exec_id = init_exec_id
            if self._pid_namespace is None and not self.containers and container.init:
                self._pid_namespace = Path(f"/proc/{container.init.pid}/ns/pid")
            self.containers[container_id] = container
            self._watch_oom(container)
        finally:
            self._creating.discard(container_id)

    def _container_root(self, container_id: str, root_path: str) -> Path:
        """Container roots lie only beneath the shared root: an absolute path there, checked
        like a mount point (no symlink on the way), or a relative one taken under
        ``<shared root>/<container id>/`` (kata's layout, where guest pull mounts the image)."""
        root = self.paths.shared_root
        path = root_path or "rootfs"
        if not os.path.isabs(path):
            path = str(root / container_id / path)
        parts = beneath.parts_beneath(root, path, "container root")
        try:
            with beneath.open_directory(root, parts, what="container root"):
                pass
        except FileNotFoundError as err:
            raise NotFound(f"rootfs {path} does not exist") from err
        return Path(root, *parts)

    async def _forget_runc_state(self, container_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.runc.delete(container_id, force=True)

    async def start_container(self, container_id: str) -> None:
        await self.container(container_id).start()

    async def remove_container(
        self,
        container_id: str,
        timeout: float | None,  # noqa: ASYNC109 - RemoveContainerRequest.timeout
    ) -> None:
        container = self.container(container_id)
        del self.containers[container_id]
        self._oom_watch.unwatch(container_id)
        try:
            await container.destroy(timeout)
        finally:
            self.storage.release_all(container.storages)

    async def exec_process(self, container_id: str, exec_id: str, process: dict[str, Any]) -> None:
        await self.container(container_id).exec(exec_id, process)

    async def signal_process(self, container_id: str, exec_id: str, signum: int) -> None:
        if not 0 < signum < 65:
            raise InvalidArgument(f"invalid signal {signum}")
        await self.process(container_id, exec_id).deliver(signum)

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        return await self.process(container_id, exec_id).wait()

    async def read_stream(self, container_id: str, exec_id: str, stream: str, size: int) -> bytes:
        return await self.process(container_id, exec_id).read(stream, size)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        return await self.process(container_id, exec_id).write_stdin(data)

    def close_stdin(self, container_id: str, exec_id: str) -> None:
        self.process(container_id, exec_id).close_stdin()

    def resize_tty(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        self.process(container_id, exec_id).resize(rows, columns)

    async def pause_container(self, container_id: str) -> None:
        await self.container(container_id).pause()

    async def resume_container(self, container_id: str) -> None:
        await self.container(container_id).resume()

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        await self.container(container_id).update(resources)

    async def stats_container(self, container_id: str) -> dict[str, Any]:
        return await self.container(container_id).stats()

    async def next_oom_event(self) -> str:
        """Wait until some container's cgroup records a new OOM kill; return its id.

        Kills are queued when ``memory.events`` changes (inotify) and, synchronously, when a
        process of the container exits: an OOM kill behind an exit is queued before
        WaitProcess answers, so the host can report the OOM before the exit.
        """
        return await self._oom_events.get()

    def _watch_oom(self, container: Container) -> None:
        events = container.cgroup() / "memory.events"
        try:
            self._oom_watch.watch(container.id, events)
        except AgentError as err:  # no memory controller here: exits still find OOM kills
            log.info("container %s: OOM kills found at exit only (%s)", container.id, err)

    def _on_memory_events(self, container_id: str) -> None:
        container = self.containers.get(container_id)
        if container is not None:
            self._check_oom(container)

    def _check_oom(self, container: Container) -> None:
        count = container.oom_kills()
        if count > container.oom_kills_seen:
            container.oom_kills_seen = count
            self._oom_events.put_nowait(container.id)

    # -- files and time --------------------------------------------------------------------

    def copy_file(self, request: FileCopy) -> None:
        """Write a file, directory or symlink strictly beneath the shared root, never through a
        symlink (:mod:`guest.agent.beneath`); a symlink where the file goes is replaced."""
        root = self.paths.shared_root
        parts = beneath.parts_beneath(root, request.path, "CopyFile target")
        kind = stat.S_IFMT(request.file_mode)
        mode = stat.S_IMODE(request.file_mode)
        name = parts[-1]
        try:
            with beneath.open_directory(
                root, parts[:-1], create_mode=request.dir_mode or 0o755, what="CopyFile target"
            ) as parent:
                if kind == stat.S_IFDIR:
                    _copy_directory(parent, name, mode or 0o755, request)
                elif kind == stat.S_IFLNK:
                    _copy_symlink(parent, name, request)
                else:
                    _copy_regular(parent, name, mode or 0o644, request)
        except OSError as err:
            raise from_os_error(err, f"copy file {request.path}") from err

    @staticmethod
    def set_time(seconds: int, microseconds: int) -> None:
        try:
            time.clock_settime(time.CLOCK_REALTIME, seconds + microseconds / 1e6)
        except OSError as err:
            raise from_os_error(err, "set guest time") from err

    @staticmethod
    def memory_block_size(sys_root: Path = Path("/sys")) -> int:
        try:
            return int((sys_root / "devices/system/memory/block_size_bytes").read_text(), 16)
        except (OSError, ValueError):
            return 0


def _chown(fd: int, request: FileCopy) -> None:
    if request.uid >= 0 and request.gid >= 0:
        os.fchown(fd, request.uid, request.gid)


def _is_symlink(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _copy_regular(parent: int, name: str, mode: int, request: FileCopy) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    if request.offset == 0:
        flags |= os.O_TRUNC
        if _is_symlink(parent, name):  # the first chunk replaces whatever link is there
            os.unlink(name, dir_fd=parent)
    try:
        fd = os.open(name, flags, mode, dir_fd=parent)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PermissionDenied(
                f"CopyFile target: {request.path} is a symlink: refusing to follow it"
            ) from err
        raise
    try:
        os.pwrite(fd, request.data, request.offset)
        os.fchmod(fd, mode)
        _chown(fd, request)
    finally:
        os.close(fd)


def _copy_directory(parent: int, name: str, mode: int, request: FileCopy) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, mode, dir_fd=parent)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent)
    except OSError as err:
        if _is_symlink(parent, name):
            raise PermissionDenied(
                f"CopyFile target: {request.path} is a symlink: refusing to follow it"
            ) from err
        raise
    try:
        os.fchmod(fd, mode)
        _chown(fd, request)
    finally:
        os.close(fd)


def _copy_symlink(parent: int, name: str, request: FileCopy) -> None:
    try:
        target = request.data.decode()
    except UnicodeDecodeError as err:
        raise InvalidArgument(f"CopyFile symlink {request.path}: target is not UTF-8") from err
    with contextlib.suppress(FileNotFoundError):
        existing = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        if stat.S_ISDIR(existing):
            raise InvalidArgument(f"CopyFile symlink {request.path}: a directory is there")
        os.unlink(name, dir_fd=parent)
    os.symlink(target, name, dir_fd=parent)
    if request.uid >= 0 and request.gid >= 0:
        os.chown(name, request.uid, request.gid, dir_fd=parent, follow_symlinks=False)
