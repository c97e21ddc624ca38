"""The real pod sandbox: one QEMU VM per pod (hypervisor/) and its guest agent (Kata protocol).

Start is an ordered script inside an AsyncExitStack (STYLE habit 8): profile → annotation
check → run dir + shared dir → wire the pod netns (taps, :mod:`shim.network.tcfilter`) → launch QEMU
with the tap fds → dial the agent (Health.Check) → SetPolicy → interfaces, routes and ARP
neighbours to the guest → CreateSandbox; a failure at any step undoes the earlier ones, so a
failed Create leaves no QEMU, helper, socket, mount, directory, tap, qdisc or filter behind.

Rootfs strategy (pluggable, :class:`RootfsShare`): the development profile exports one host
directory per pod over virtio-9p (tag ``kataShared``); each container's rootfs (the snapshot
containerd prepared) is mounted under it and the agent sees it at
``/run/kata-containers/shared/containers/<id>/rootfs``. Confidential profiles refuse host
sharing: their rootfs must come from inside the guest (guest pull, not implemented yet).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal as signals
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path, PurePosixPath
from typing import Any

from hypervisor.cmdline import NinePShare, VirtioNetTap
from hypervisor.config import load_profile, parse_profile
from hypervisor.errors import ConfigError, ExitReason, InvariantError, QemuError
from hypervisor.probe import probe_kvm, which_vhost_device_vsock
from hypervisor.profile import RuntimeProfile
from hypervisor.vm import LaunchOptions, QemuVm, launch_vm
from protocols.api.kata import agent_pb2, oci_pb2
from protocols.ocispec import SpecError, from_json
from shim.binary.contract import RuntimeOptions
from shim.binary.manager import ShimState, mounts_under
from shim.core.errors import FailedPrecondition, InvalidArgument, ShimError, Unavailable
from shim.network.tcfilter import PodNetworking, WiredNetwork, dns_of, guest_requests, netns_of
from shim.pod import metrics
from shim.pod.agent import AgentClient
from shim.pod.sandbox import ContainerConfig, ContainerStats, ExecConfig, Mount, SandboxConfig

log = logging.getLogger(__name__)

CONFIG_ENV = "COCO_SHIM_CONFIG"
DEFAULT_CONFIG = Path("/etc/coco-shim/configuration.toml")
RUN_ROOT_ENV = "COCO_SHIM_RUN_DIR"
DEFAULT_RUN_ROOT = Path("/run/coco-shim")
SHARE_TAG = "kataShared"
GUEST_SHARED = PurePosixPath("/run/kata-containers/shared/containers")
KATA_ANNOTATIONS = "io.katacontainers."
POLICY_ANNOTATION = "io.katacontainers.config.agent.policy"
KERNEL_PARAMS_ANNOTATION = "io.katacontainers.config.hypervisor.kernel_params"
VM_KILLED_STATUS = 128 + signals.SIGKILL  # every process of a pod whose VM died: 137
READ_CHUNK = 1 << 20  # kata: max data chunk 1 MiB


def run_root() -> Path:
    return Path(os.environ.get(RUN_ROOT_ENV) or DEFAULT_RUN_ROOT)


def pod_key(namespace: str, sandbox_id: str) -> str:
    """A short name for a pod: CRI sandbox ids are 64 characters, and the vsock/QMP sockets
    under the pod's run directory must fit a unix socket path (107 bytes)."""
    return hashlib.sha256(f"{namespace}/{sandbox_id}".encode()).hexdigest()[:16]


def pod_run_dir(namespace: str, sandbox_id: str) -> Path:
    """The pod VM's run directory."""
    return run_root() / pod_key(namespace, sandbox_id)


def load_pod_profile(options: RuntimeOptions) -> RuntimeProfile:
    """The runtime profile: CRI/ctr runtime options (body, then path), else $COCO_SHIM_CONFIG,
    else /etc/coco-shim/configuration.toml. Any problem is InvalidArgument naming the file."""
    try:
        if options.config_body:
            return parse_profile(options.config_body.decode(), "<runtime options config_body>")
        path = options.config_path or os.environ.get(CONFIG_ENV) or str(DEFAULT_CONFIG)
        return load_profile(path)
    except ConfigError as err:
        raise InvalidArgument(f"runtime profile: {err}") from err


def annotations_of(spec: Mapping[str, object]) -> dict[str, str]:
    raw = spec.get("annotations") or {}
    if not isinstance(raw, Mapping):
        raise InvalidArgument("config.json: annotations must be an object")
    return {str(k): str(v) for k, v in raw.items()}


def check_annotations(annotations: Mapping[str, str], profile: RuntimeProfile) -> None:
    """Kata-style annotations change the VM: only those on the profile's allow-list pass."""
    allowed = set(profile.enable_annotations)
    for key in sorted(annotations):
        if key.startswith(KATA_ANNOTATIONS) and key not in allowed:
            raise InvalidArgument(
                f"annotation {key} is not allowed by runtime profile {profile.source} "
                f"(enable_annotations: {', '.join(sorted(allowed)) or 'none'})")


async def decide_accelerator(profile: RuntimeProfile) -> str:
    """``auto`` means KVM when a real probe boot works here, else TCG; cached per boot."""
    if profile.accel != "auto":
        return profile.accel
    cache = run_root() / "kvm-probe.json"
    stat = profile.qemu.stat()
    key = f"{profile.qemu}:{stat.st_mtime_ns}:{_boot_id()}"
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(cache.read_text())
        if record.get("key") == key:
            return str(record["accel"])
    usable = _kvm_device() and (await probe_kvm(profile.qemu,
                                                              qemu_root=profile.qemu_root)).ok
    accel = "kvm" if usable else "tcg"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "accel": accel}))
    log.info("accelerator auto → %s", accel)
    return accel


def _kvm_device() -> bool:
    return Path("/dev/kvm").exists()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {err.decode(errors='replace').strip()}")


async def mount(mnt: Mount, target: Path) -> None:
    fstype = "none" if mnt.type in ("bind", "rbind", "") else mnt.type
    options = list(mnt.options)
    if mnt.type in ("bind", "rbind") and not {"bind", "rbind"} & set(options):
        options.append("rbind")
    argv = ["mount", "-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    await _run(*argv, mnt.source, str(target))


def _is_mount(target: Path) -> bool:
    # os.path.ismount() misses a file bind-mounted from the same filesystem (same st_dev, as
    # CRI's resolv.conf/hostname/hosts usually are): mountinfo knows every mount point.
    return os.path.ismount(target) or target.resolve() in mounts_under(target)


def _bind_target(container_id: str, source: Path, host: Path) -> None:
    """Create the file or directory a host bind mount is mounted onto."""
    if not source.is_absolute() or not source.exists():
        raise InvalidArgument(f"container {container_id}: bind mount source {source} does not "
                              "exist on the host")
    if source.is_dir():
        host.mkdir()
    else:
        host.touch()


async def unmount(target: Path) -> None:
    """Unmount ``target`` and everything below it; lazily if busy. Idempotent."""
    if not _is_mount(target):
        return
    try:
        await _run("umount", "-R", str(target))
    except OSError:
        await _run("umount", "-R", "-l", str(target))


class RootfsShare:
    """Host → guest rootfs over one virtio-9p export per pod (development profile)."""

    def __init__(self, host_dir: Path) -> None:
        self.host_dir = host_dir

    def device(self) -> NinePShare:
        return NinePShare(id="share0", tag=SHARE_TAG, path=self.host_dir)

    def sandbox_storage(self) -> agent_pb2.Storage:
        return agent_pb2.Storage(driver="9p", source=SHARE_TAG, fstype="9p",
                                 options=["trans=virtio", "version=9p2000.L", "msize=262144",
                                          "cache=mmap"],
                                 mount_point=str(GUEST_SHARED))

    async def add(self, container_id: str, bundle: Path, rootfs: Sequence[Mount],
                  spec_mounts: list[dict[str, Any]]) -> str:
        """Mount the container's rootfs (and host bind mounts) under the share; returns the
        guest rootfs path and rewrites bind sources in ``spec_mounts`` to guest paths."""
        base = self.host_dir / container_id
        target = base / "rootfs"
        target.mkdir(parents=True, exist_ok=False)
        try:
            if len(rootfs) > 1:
                raise InvalidArgument(f"container {container_id}: {len(rootfs)} rootfs mounts "
                                      "given, only one is supported")
            if rootfs:
                await mount(rootfs[0], target)
            else:  # containerd left the rootfs in the bundle (e.g. ctr run --rootfs)
                await mount(Mount(type="bind", source=str(bundle / "rootfs")), target)
            for index, entry in enumerate(spec_mounts):
                if entry.get("type") not in ("bind", "rbind") and "bind" not in (
                        entry.get("options") or []) and "rbind" not in (entry.get("options") or []):
                    continue
                source = Path(str(entry.get("source", "")))
                name = f"mount-{index}-{source.name or 'root'}"
                host = base / name
                _bind_target(container_id, source, host)
                await mount(Mount(type="bind", source=str(source),
                                  options=("rbind",)), host)
                entry["source"] = str(GUEST_SHARED / container_id / name)
        except BaseException:
            await self.remove(container_id)
            raise
        return str(GUEST_SHARED / container_id / "rootfs")

    async def remove(self, container_id: str) -> None:
        base = self.host_dir / container_id
        if not base.exists():
            return
        for child in sorted(base.iterdir()):
            await unmount(child)
        shutil.rmtree(base, ignore_errors=True)

    async def close(self) -> None:
        if self.host_dir.exists():
            for child in sorted(self.host_dir.iterdir()):
                await self.remove(child.name)
        shutil.rmtree(self.host_dir, ignore_errors=True)


def guest_spec(spec: Mapping[str, Any], root_path: str) -> oci_pb2.Spec:
    """OCI config.json → grpc.Spec, with what only makes sense on the host cleared: hooks,
    namespace paths (and the network namespace: the VM is the pod's network), device cgroup
    rules and host devices, CPU/memory node pinning."""
    doc = json.loads(json.dumps(spec))  # deep copy, JSON types only
    doc.pop("hooks", None)
    doc["root"] = {**(doc.get("root") or {}), "path": root_path}
    linux = doc.get("linux")
    if isinstance(linux, dict):
        linux["namespaces"] = [{"type": ns.get("type")} for ns in linux.get("namespaces") or []
                               if ns.get("type") != "network"]
        linux.pop("devices", None)
        resources = linux.get("resources")
        if isinstance(resources, dict):
            resources.pop("devices", None)
            cpu = resources.get("cpu")
            if isinstance(cpu, dict):
                cpu.pop("cpus", None)
                cpu.pop("mems", None)
    unknown: list[str] = []
    try:
        converted = from_json(doc, oci_pb2.Spec, unknown=unknown)
    except SpecError as err:
        raise InvalidArgument(f"config.json: {err}") from err
    if unknown:
        log.info("config.json fields the agent protocol cannot carry, dropped: %s",
                 ", ".join(unknown))
    return converted


def default_networking() -> PodNetworking:
    from shim.network.helper import HelperNetworking

    return HelperNetworking()


async def configure_guest_network(agent: AgentClient, wired: WiredNetwork) -> None:
    """Interfaces (found by MAC in the guest), then routes, then permanent neighbours."""
    requests = guest_requests(wired.network)
    for request in requests.interfaces:
        await agent.call("UpdateInterface", request, limit=30)
    if requests.routes is not None:
        await agent.call("UpdateRoutes", requests.routes, limit=30)
    if requests.neighbors is not None:
        await agent.call("AddARPNeighbors", requests.neighbors, limit=30)


class VmSandboxFactory:
    """``SandboxFactory`` for real pods: boots the VM and brings its agent to CreateSandbox."""

    def __init__(self, networking: PodNetworking | None = None) -> None:
        self.networking = networking or default_networking()

    async def create_sandbox(self, config: SandboxConfig) -> VmSandbox:
        profile = load_pod_profile(config.options)
        annotations = annotations_of(config.spec)
        check_annotations(annotations, profile)
        netns = netns_of(config.spec, config.sandbox_id)
        if profile.tee.confidential:
            raise FailedPrecondition(
                f"runtime profile {profile.source} is confidential ({profile.tee.value}): it "
                "refuses host filesystem sharing, and guest image pull is not implemented yet")
        accel = await decide_accelerator(profile)
        vhost = which_vhost_device_vsock()
        pod_dir = pod_run_dir(config.namespace, config.sandbox_id)
        try:
            pod_dir.mkdir(parents=True, mode=0o700)
        except FileExistsError as err:
            raise FailedPrecondition(f"pod {config.sandbox_id}: {pod_dir} exists (a VM of this "
                                     "pod is running or was not cleaned up)") from err
        async with AsyncExitStack() as stack:
            stack.callback(shutil.rmtree, pod_dir, True)
            share = RootfsShare(pod_dir / "shared")
            share.host_dir.mkdir(mode=0o700)
            stack.push_async_callback(share.close)
            extra = annotations.get(KERNEL_PARAMS_ANNOTATION, "") if (
                KERNEL_PARAMS_ANNOTATION in profile.enable_annotations) else ""
            # If this daemon dies, `delete` reaps what it started.
            state = ShimState.of(config.namespace, config.sandbox_id)
            wired: WiredNetwork | None = None
            if netns is not None:
                wired = await self.networking.setup(netns)
                stack.push_async_callback(self._unwire, wired, state)
                state.add_network(wired.network.to_json())
            nics = tuple(VirtioNetTap(id=f"net{index}", tap_fd=fd, mac=endpoint.mac)
                         for index, (endpoint, fd) in enumerate(zip(
                             wired.network.endpoints, wired.tap_fds, strict=True))
                         ) if wired is not None else ()
            started = time.monotonic()
            try:
                vm = await launch_vm(profile, LaunchOptions(
                    run_root=pod_dir, name="vm", accel=accel, vhost_device_vsock=vhost,
                    log_dir=pod_dir / "logs", shares=(share.device(),), nics=nics,
                    extra_kernel_params=extra))
            except (QemuError, InvariantError, ConfigError, OSError) as err:
                raise Unavailable(f"pod {config.sandbox_id}: VM did not start: {err}") from err
            finally:
                if wired is not None:
                    # QEMU holds the taps now (or failed): they live exactly as long as it does.
                    wired.close_fds()
            stack.push_async_callback(vm.aclose)
            state.add_dir(pod_dir)
            for pid in (vm.pid, *vm.helper_pids):
                if pid:
                    state.add_pid(pid)
            log.info("pod %s: QEMU %d running (%s) after %.3f s", config.sandbox_id, vm.pid or 0,
                     accel, time.monotonic() - started)
            sandbox = VmSandbox(config.sandbox_id, vm, share, pod_dir, state)
            await sandbox.connect(profile.dial_timeout)
            log.info("pod %s: agent answered after %.3f s", config.sandbox_id,
                     time.monotonic() - started)
            stack.push_async_callback(sandbox.close_agent)
            policy = annotations.get(POLICY_ANNOTATION)
            if policy is not None:
                await sandbox.agent.call("SetPolicy", agent_pb2.SetPolicyRequest(
                    policy=base64.b64decode(policy).decode()), limit=30)
            if wired is not None:
                await configure_guest_network(sandbox.agent, wired)
            hostname = config.spec.get("hostname")
            await sandbox.agent.call("CreateSandbox", agent_pb2.CreateSandboxRequest(
                hostname=str(hostname) if isinstance(hostname, str) else "",
                dns=dns_of(config.spec), sandbox_id=config.sandbox_id,
                storages=[share.sandbox_storage()]),
                limit=60)
            log.info("pod %s: sandbox created after %.3f s", config.sandbox_id,
                     time.monotonic() - started)
            sandbox.adopt(stack.pop_all())
            return sandbox
        raise AssertionError("unreachable")  # pragma: no cover

    async def _unwire(self, wired: WiredNetwork, state: ShimState) -> None:
        await self.networking.teardown(wired)
        state.clear_network()


class VmSandbox:
    """One running pod VM (``PodSandbox``): each method is one Kata agent RPC."""

    def __init__(self, sandbox_id: str, vm: QemuVm, share: RootfsShare, pod_dir: Path,
                 state: ShimState | None = None) -> None:
        self.sandbox_id = sandbox_id
        self.vm = vm
        self.share = share
        self.pod_dir = pod_dir
        self.state = state
        self._agent: AgentClient | None = None
        self._cleanup = AsyncExitStack()
        self._exit_reason: ExitReason | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._shutdown_lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        return self.vm.pid or 0

    @property
    def agent(self) -> AgentClient:
        if self._agent is None:
            raise Unavailable(f"pod {self.sandbox_id}: agent not connected")
        return self._agent

    async def connect(self, dial_timeout: float) -> None:
        exited: asyncio.Future[object] = asyncio.ensure_future(self.vm.wait())
        try:
            self._agent = await AgentClient.dial(
                hybrid_socket=self.vm.channel.hybrid_socket if self.vm.channel else None,
                guest_cid=self.vm.channel.guest_cid if self.vm.channel else 0,
                dial_timeout=dial_timeout, exited=exited)
        finally:
            exited.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await exited

    async def close_agent(self) -> None:
        if self._agent is not None:
            await self._agent.close()

    def adopt(self, cleanup: AsyncExitStack) -> None:
        """Take over the start script's rollback stack and watch the VM from now on."""
        self._cleanup = cleanup
        self._watcher = asyncio.get_running_loop().create_task(self._watch_vm())

    async def _watch_vm(self) -> None:
        reason = await self.vm.wait()
        self._exit_reason = reason
        log.warning("pod %s: VM exited (%s); its processes are reported killed",
                    self.sandbox_id, reason)
        await self.close_agent()  # every pending agent call fails now

    def _vm_gone(self) -> bool:
        return self._exit_reason is not None

    # --- containers -------------------------------------------------------------------------

    async def create_container(self, config: ContainerConfig) -> None:
        spec = dict(config.spec)
        raw_mounts = spec.get("mounts") or []
        if not isinstance(raw_mounts, list):
            raise InvalidArgument("config.json: mounts must be a list")
        mounts = [dict(m) for m in raw_mounts if isinstance(m, Mapping)]
        root_path = await self.share.add(config.container_id, config.bundle, config.rootfs,
                                         mounts)
        try:
            spec["mounts"] = mounts
            request = agent_pb2.CreateContainerRequest(
                container_id=config.container_id, exec_id=config.container_id,
                OCI=guest_spec(spec, root_path))
            await self.agent.call("CreateContainer", request, limit=60)
        except BaseException:
            await self.share.remove(config.container_id)
            raise

    async def start_container(self, container_id: str) -> None:
        await self.agent.call("StartContainer",
                              agent_pb2.StartContainerRequest(container_id=container_id))

    async def exec_process(self, config: ExecConfig) -> None:
        try:
            process = from_json(config.process, oci_pb2.Process)
        except SpecError as err:
            raise InvalidArgument(f"exec {config.exec_id}: {err}") from err
        await self.agent.call("ExecProcess", agent_pb2.ExecProcessRequest(
            container_id=config.container_id, exec_id=config.exec_id, process=process))

    async def signal_process(self, container_id: str, exec_id: str, signal: int) -> None:
        await self.agent.call("SignalProcess", agent_pb2.SignalProcessRequest(
            container_id=container_id, exec_id=exec_id, signal=signal))

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        try:
            reply = await self.agent.call("WaitProcess", agent_pb2.WaitProcessRequest(
                container_id=container_id, exec_id=exec_id), agent_pb2.WaitProcessResponse)
        except Unavailable:
            if self._watcher is not None:
                # The connection drops as the VM dies: give the watcher a moment to see it.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await asyncio.shield(self._watcher)
            if self._vm_gone():
                return VM_KILLED_STATUS
            raise
        return int(reply.status)

    async def read_stdout(self, container_id: str, exec_id: str, size: int) -> bytes:
        return await self._read("ReadStdout", container_id, exec_id, size)

    async def read_stderr(self, container_id: str, exec_id: str, size: int) -> bytes:
        return await self._read("ReadStderr", container_id, exec_id, size)

    async def _read(self, method: str, container_id: str, exec_id: str, size: int) -> bytes:
        try:
            return await self.agent.read_stream(method, container_id, exec_id,
                                                min(size, READ_CHUNK))
        except Unavailable:
            if self._vm_gone() or self._agent is None:
                return b""
            raise

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        reply = await self.agent.call("WriteStdin", agent_pb2.WriteStreamRequest(
            container_id=container_id, exec_id=exec_id, data=data[:READ_CHUNK]),
            agent_pb2.WriteStreamResponse)
        return int(reply.len)

    async def close_stdin(self, container_id: str, exec_id: str) -> None:
        await self.agent.call("CloseStdin", agent_pb2.CloseStdinRequest(
            container_id=container_id, exec_id=exec_id))

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int,
                             columns: int) -> None:
        await self.agent.call("TtyWinResize", agent_pb2.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, row=rows, column=columns))

    async def pause_container(self, container_id: str) -> None:
        await self.agent.call("PauseContainer",
                              agent_pb2.PauseContainerRequest(container_id=container_id))

    async def resume_container(self, container_id: str) -> None:
        await self.agent.call("ResumeContainer",
                              agent_pb2.ResumeContainerRequest(container_id=container_id))

    async def stats_container(self, container_id: str) -> ContainerStats:
        reply = await self.agent.call("StatsContainer", agent_pb2.StatsContainerRequest(
            container_id=container_id), agent_pb2.StatsContainerResponse)
        return ContainerStats(type_url=metrics.TYPE_URL,
                              value=metrics.to_cgroup2_metrics(reply).SerializeToString())

    async def update_container(self, container_id: str,
                               resources: Mapping[str, object]) -> None:
        try:
            converted = from_json(dict(resources), oci_pb2.LinuxResources)
        except SpecError as err:
            raise InvalidArgument(f"update {container_id}: {err}") from err
        await self.agent.call("UpdateContainer", agent_pb2.UpdateContainerRequest(
            container_id=container_id, resources=converted))

    async def remove_container(self, container_id: str) -> None:
        try:
            if not self._vm_gone():
                await self.agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(
                    container_id=container_id))
        finally:
            await self.share.remove(container_id)

    async def release_container(self, container_id: str) -> None:
        await self.share.remove(container_id)

    async def get_oom_event(self) -> str:
        reply = await self.agent.call("GetOOMEvent", agent_pb2.GetOOMEventRequest(),
                                      agent_pb2.OOMEvent)
        return reply.container_id

    async def shutdown(self) -> None:
        """DestroySandbox, then stop the VM (graceful, then forceful). Idempotent."""
        async with self._shutdown_lock:
            started = time.monotonic()
            if not self._vm_gone() and self._agent is not None:
                with contextlib.suppress(ShimError):
                    await self._agent.call("DestroySandbox", agent_pb2.DestroySandboxRequest(),
                                           limit=10)
            destroyed = time.monotonic()
            with contextlib.suppress(QemuError):
                await self.vm.stop()
            if self._watcher is not None:
                await self._watcher
            stopped = time.monotonic()
            await self._cleanup.aclose()
            log.info("pod %s: down (DestroySandbox %.3f s, VM stop %.3f s, cleanup %.3f s)",
                     self.sandbox_id, destroyed - started, stopped - destroyed,
                     time.monotonic() - stopped)


__all__ = ["VmSandbox", "VmSandboxFactory", "guest_spec"]
