"""The boot script of a pod VM: an ordered list of steps inside one AsyncExitStack.

Each step does one thing and pushes its undo, so a failure (or cancellation) at step N undoes
steps N-1..1 and a failed Create leaves no QEMU, helper, socket, mount, directory, tap, qdisc or
filter behind. Everything the host gains is written to the crash record (:class:`ShimState`)
the moment it exists, so ``delete`` can reap a daemon killed at any step. A new step (build an
initdata disk, size the VM from the pod's limits, …) is one more method and one more line in
:meth:`BootScript.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from hypervisor.cmdline import VirtioNetTap
from hypervisor.errors import ConfigError, InvariantError, QemuError
from hypervisor.initdata import resolve_initdata
from hypervisor.probe import resolve_accelerator, which_vhost_device_vsock
from hypervisor.profile import RuntimeProfile
from hypervisor.vm import LaunchOptions, VirtualMachine, launch_vm
from protocols.initdata import ANNOTATION as INITDATA_ANNOTATION
from protocols.initdata import Initdata, InitdataError
from shim.core import cgroup, failed_boot, paths, trace
from shim.core.config import RuntimeOptions
from shim.core.crash_record import ShimState
from shim.core.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from shim.core.timeouts import TIMEOUTS, Timeouts
from shim.network.tcfilter import (
    PodNetworking,
    WiredNetwork,
    dns_of,
    guest_requests,
    netns_of,
)
from shim.pod.admission import BootSlots, HeldSlot, Priority, SlotHold
from shim.pod.agent import Agent, Dial, dial_agent
from shim.pod.guest_spec import annotations_of
from shim.pod.mounts import remove_tree
from shim.pod.profile import (
    AnnotationPolicy,
    PodAnnotations,
    pod_annotations,
    runtime_profile,
)
from shim.pod.rootfs import RootfsStrategy, rootfs_for
from shim.pod.sizing import HostSize, VmSize, size_vm
from shim.pod.vm import BootClock, PodConfig, PodVm

log = logging.getLogger(__name__)

Launch = Callable[[RuntimeProfile, LaunchOptions], Awaitable[VirtualMachine]]


def default_networking() -> PodNetworking:
    from shim.network.helper import HelperNetworking

    return HelperNetworking()


@dataclass
class BootEnv:
    """The outside world a boot touches: real by default, fakes in unit tests."""

    networking: PodNetworking = field(default_factory=default_networking)
    profile: Callable[[RuntimeOptions], RuntimeProfile] = runtime_profile
    accelerator: Callable[[RuntimeProfile, Path], Awaitable[str]] = field(
        default=lambda profile, cache: resolve_accelerator(profile, cache=cache))
    vhost_device_vsock: Callable[[], Path | None] = which_vhost_device_vsock
    launch: Launch = launch_vm
    dial: Dial = dial_agent
    timeouts: Timeouts = TIMEOUTS
    host_size: Callable[[], HostSize] = HostSize.probe
    cgroup_root: Callable[[], Path | None] = cgroup.unified_mount
    # Node-wide boot slots from the profile's [runtime] boot_slots (None: no limit).
    admission: Callable[[int | None], BootSlots | None] = BootSlots.for_node
    # The daemon's CPU priority, lowered while its boot waits for a slot.
    priority: Callable[[], Priority] = Priority


class VmBooter:
    """The real :class:`~shim.pod.vm.Booter`: QEMU with the profile's TEE options, the guest
    agent over vsock."""

    def __init__(self, env: BootEnv | None = None) -> None:
        self.env = env or BootEnv()

    async def boot(self, config: PodConfig, clock: BootClock | None = None) -> PodVm:
        return await BootScript(config, self.env, clock or BootClock()).run()


class BootScript:
    """One boot. Steps run in :meth:`run`'s order; each sets what later steps use."""

    profile: RuntimeProfile
    annotations: PodAnnotations
    initdata: Initdata | None = None
    size: VmSize
    rootfs: RootfsStrategy
    netns: Path | None
    accel: str
    pod_dir: Path
    wired: WiredNetwork | None = None
    hold: SlotHold | None = None  # the node-wide boot slot, from the launch to a usable pod
    vm: VirtualMachine
    agent: Agent

    def __init__(self, config: PodConfig, env: BootEnv, clock: BootClock) -> None:
        self.config = config
        self.env = env
        self.clock = clock
        self.record = ShimState.of(config.namespace, config.sandbox_id)
        self.undo = AsyncExitStack()
        self.started = time.monotonic()

    async def run(self) -> PodVm:
        step = trace.mark  # each step's end on the boot trace (bench/run.py's timeline)
        step("boot: begin")
        async with self.undo:
            self.read_profile()
            async with self.admission() as admitted:  # a slot, waited for from here on
                self.check_annotations()
                self.resolve_initdata()
                self.size_vm()
                self.choose_rootfs()
                self.find_network()
                await self.resolve_accelerator()
                step("boot: decided (profile, annotations, initdata, size, accelerator)")
                self.make_run_dir()
                await self.join_pod_cgroup()
                step("boot: run dir and pod cgroup")
                await self.prepare_rootfs()
                await self.wire_network()
                step("boot: rootfs share and network")
                await admitted()  # held from here to the pod usable: the CPU-bound part
                step("boot: boot slot held")
            await self.launch_vm()
            await self.dial_agent()
            await self.set_policy()
            await self.configure_guest_network()
            await self.create_sandbox()
            return PodVm(self.config.sandbox_id, self.vm, self.agent, self.rootfs,
                         self.undo.pop_all(), AnnotationPolicy.of(self.profile),
                         size=self.size, boot_slot=self.hold)
        raise AssertionError("unreachable")  # pragma: no cover

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    @contextlib.asynccontextmanager
    async def admission(self) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """A node-wide boot slot (:mod:`shim.pod.admission`), from QEMU's launch until the pod
        is usable (a :class:`SlotHold` the undo stack, then the pod, owns). The wait starts at
        once, beside the boot's first steps, the daemon at the lowest CPU priority until it
        holds a slot: in a burst, the pods that wait do their pre-boot work (network wiring,
        …) on the CPU the boots in a slot leave; a pod that finds a slot free does its own at
        its normal priority. The caller awaits the yielded function before QEMU's launch. The
        wait has its own bound (``boot_slot_wait``); the boot's clock stops while the caller
        awaits the slot and the dial's starts after it, so a burst's waiting is charged to
        neither. Cancelled or failed before the slot is handed over, nothing is held."""
        slots = self.env.admission(self.profile.boot_slots)
        if slots is None:
            async def no_limit() -> None:
                return None

            yield no_limit
            return
        name = f"pod {self.config.sandbox_id}"
        bound = self.env.timeouts.boot_slot_wait
        priority = self.env.priority()

        async def take() -> HeldSlot:
            try:
                async with asyncio.timeout(bound):
                    held = await slots.wait(name)
            except TimeoutError as err:
                raise DeadlineExceeded(
                    f"{name}: no boot slot free in {bound:g} s (all {slots.slots} held by "
                    f"other boots: {'; '.join(slots.holders()) or 'holders unknown'})"
                ) from err
            priority.restore()  # the boot holding a slot gets the CPU (QEMU inherits this)
            return held

        async def admitted() -> None:
            prepared = self._elapsed()
            if not waiting.done():
                with self.clock.stopped():
                    await asyncio.shield(waiting)
            hold = SlotHold(waiting.result(), name)  # raises what the wait raised
            # The undo stack owns it now: a failed boot (later: the pod's teardown) frees it.
            self.undo.callback(hold.release, "boot undone")
            self.hold = hold
            log.info("%s: pre-boot work %.3f s, then %.3f s more for a boot slot", name,
                     prepared, self._elapsed() - prepared)

        waiting: asyncio.Future[HeldSlot]
        free = slots.try_take(name)
        if free is None:
            priority.lower()
            waiting = asyncio.create_task(take(), name=f"{name}: boot slot")
        else:  # a slot free now: no waiting, no lowered priority
            waiting = asyncio.get_running_loop().create_future()
            waiting.set_result(free)
        try:
            yield admitted
        finally:
            priority.restore()
            if not waiting.done():
                waiting.cancel()
            await asyncio.wait({waiting})
            if (self.hold is None and not waiting.cancelled()
                    and waiting.exception() is None):
                waiting.result().release()  # taken but never handed to the undo stack

    # --- decide (nothing made yet) ------------------------------------------------------------

    def read_profile(self) -> None:
        """The runtime profile, from the one config loader."""
        self.profile = self.env.profile(self.config.options)

    def check_annotations(self) -> None:
        """Only annotations on the profile's allow-list, each well formed."""
        self.annotations = pod_annotations(self.config.spec, self.profile)

    def resolve_initdata(self) -> None:
        """The pod's initdata (its annotation if allow-listed, else the profile's default
        file), validated before anything boots: a bad one is InvalidArgument naming why."""
        try:
            self.initdata = resolve_initdata(self.profile, self.annotations.raw)
        except InitdataError as err:
            where = (f" (annotation {INITDATA_ANNOTATION})"
                     if INITDATA_ANNOTATION in self.annotations.raw else "")
            raise InvalidArgument(f"pod {self.config.sandbox_id}: {err}{where}") from err

    def size_vm(self) -> None:
        """vCPUs and memory from the pod's limits (shim/pod/sizing.py); the profile the VM
        launches with carries them, so the QEMU argv and the measurement agree."""
        self.size = size_vm(self.profile, annotations_of(self.config.spec),
                            self.env.host_size())
        profile = self.profile
        self.profile = dataclasses.replace(
            profile, vcpus=self.size.vcpus, memory_mib=self.size.memory_mib,
            max_vcpus=None if profile.max_vcpus is None else max(profile.max_vcpus,
                                                                 self.size.vcpus),
            max_memory_mib=None if profile.max_memory_mib is None else max(
                profile.max_memory_mib, self.size.memory_mib))
        log.info("pod %s: VM sized %d vCPUs / %d MiB (base %d / %d MiB + pod limits %d / %d "
                 "MiB)", self.config.sandbox_id, self.size.vcpus, self.size.memory_mib,
                 self.size.base_vcpus, self.size.base_memory_mib, self.size.limits.vcpus,
                 self.size.limits.memory_mib)

    def choose_rootfs(self) -> None:
        """The rootfs strategy the profile calls for (confidential ones refuse host sharing)."""
        self.pod_dir = paths.pod_run_dir(self.config.namespace, self.config.sandbox_id)
        self.rootfs = rootfs_for(self.profile, self.pod_dir)

    def find_network(self) -> None:
        """The pod's network namespace, if the spec names one (CNI, ctr --with-ns)."""
        self.netns = netns_of(self.config.spec, self.config.sandbox_id)

    async def resolve_accelerator(self) -> None:
        """``auto`` means KVM when a probe boot works here (cached per host boot), else TCG."""
        self.accel = await self.env.accelerator(self.profile,
                                                paths.run_root() / "kvm-probe.json")

    # --- make (each step recorded and undone) -------------------------------------------------

    def make_run_dir(self) -> None:
        """The pod's run directory: sockets, logs, the share; recorded before it exists."""
        self.record.add_dir(self.pod_dir)
        paths.private_root(self.pod_dir.parent)
        try:
            self.pod_dir.mkdir(mode=0o700)
        except FileExistsError as err:
            raise FailedPrecondition(
                f"pod {self.config.sandbox_id}: {self.pod_dir} exists (a VM of this pod is "
                "running or was not cleaned up)") from err
        self.undo.callback(remove_tree, self.pod_dir)
        # Unwound before the run directory goes: a failed boot's log tails are kept.
        self.undo.enter_context(failed_boot.kept_on_failure(
            self.config.namespace, self.config.sandbox_id, self.pod_dir / "logs"))

    async def join_pod_cgroup(self) -> None:
        """The pod's host cgroup (the sandbox's cgroupsPath, cgroup v2), made where missing
        (each directory recorded first) and joined by this daemon, so that everything it
        spawns for the pod (netns helper, vhost-device-vsock, QEMU) starts inside it and the
        kubelet's pod-level limits and accounting cover the VM (kata's sandbox_cgroup_only).
        The daemon leaves it again when the pod is torn down, before the directories go."""
        linux = self.config.spec.get("linux")
        raw = linux.get("cgroupsPath") if isinstance(linux, dict) else None
        if not isinstance(raw, str) or not raw:
            return
        try:
            relative = cgroup.relative_path(raw)
        except cgroup.CgroupError as err:
            raise InvalidArgument(f"pod {self.config.sandbox_id}: linux.cgroupsPath: {err}"
                                  ) from err
        root = self.env.cgroup_root()
        if root is None:
            log.warning("pod %s: no cgroup v2 hierarchy on this host: the VM stays outside "
                        "the pod's cgroup %s", self.config.sandbox_id, raw)
            return
        home = cgroup.own_cgroup()
        try:
            pod_cgroup = cgroup.PodCgroup.create(root, relative, self.record.add_cgroup)
        except OSError as err:
            raise Unavailable(f"pod {self.config.sandbox_id}: cgroup {root / relative}: "
                              f"{err.strerror}") from err
        self.undo.push_async_callback(self._leave_cgroup, pod_cgroup, root, home)
        try:
            pod_cgroup.add(os.getpid())
        except OSError as err:
            raise Unavailable(f"pod {self.config.sandbox_id}: joining cgroup "
                              f"{pod_cgroup.path}: {err.strerror}") from err
        log.info("pod %s: in cgroup %s", self.config.sandbox_id, pod_cgroup.path)

    async def _leave_cgroup(self, pod_cgroup: cgroup.PodCgroup, root: Path,
                            home: PurePosixPath | None) -> None:
        try:  # back where containerd started the daemon (the root if that is unknown)
            cgroup.move(root / (home or PurePosixPath("/")).relative_to("/"), os.getpid())
        except OSError as err:
            log.warning("pod %s: leaving cgroup %s: %s", self.config.sandbox_id,
                        pod_cgroup.path, err)
        problems = await asyncio.to_thread(pod_cgroup.remove, self.env.timeouts.cgroup_empty)
        for problem in problems:
            log.warning("pod %s: cgroup %s", self.config.sandbox_id, problem)

    async def prepare_rootfs(self) -> None:
        await self.rootfs.open()
        self.undo.push_async_callback(self.rootfs.close)

    async def wire_network(self) -> None:
        """A tap per veth of the pod netns, mirrored both ways (recorded for delete)."""
        if self.netns is None:
            return
        wired = await self.env.networking.setup(self.netns)
        self.wired = wired
        self.undo.push_async_callback(self._unwire, wired)
        self.record.add_network(wired.network.to_json())

    async def _unwire(self, wired: WiredNetwork) -> None:
        await self.env.networking.teardown(wired)
        self.record.clear_network()

    async def launch_vm(self) -> None:
        """QEMU (and vhost-device-vsock), each pid recorded as soon as it exists."""
        wired = self.wired
        nics = tuple(VirtioNetTap(id=f"net{index}", tap_fd=fd, mac=endpoint.mac)
                     for index, (endpoint, fd) in enumerate(zip(
                         wired.network.endpoints, wired.tap_fds, strict=True))) if wired else ()
        try:
            self.vm = await self.env.launch(self.profile, LaunchOptions(
                run_root=self.pod_dir, name="vm", accel=self.accel,
                vhost_device_vsock=self.env.vhost_device_vsock(),
                log_dir=self.pod_dir / "logs", shares=self.rootfs.vm_shares(), nics=nics,
                extra_kernel_params=trace.kernel_params(
                    self.annotations.kernel_params, measured=self.profile.confidential),
                initdata=self.initdata, timeouts=self.env.timeouts.vm, on_spawn=self.record.add_pid,
                on_step=lambda name: trace.mark(f"launch: {name}"),
                on_console_line=trace.guest_line if trace.enabled() else None))
        except (QemuError, InvariantError, ConfigError, OSError) as err:
            raise Unavailable(f"pod {self.config.sandbox_id}: VM did not start: {err}") from err
        finally:
            if wired is not None:
                # QEMU holds the taps now (or failed): they live exactly as long as it does.
                wired.close_fds()
        self.undo.push_async_callback(self.vm.aclose)
        log.info("pod %s: QEMU %d running (%s) after %.3f s", self.config.sandbox_id,
                 self.vm.pid or 0, self.accel, self._elapsed())

    async def dial_agent(self) -> None:
        """Until the agent answers Health.Check (or the VM exits first)."""
        if self.vm.channel is None:
            raise Unavailable(f"pod {self.config.sandbox_id}: the VM has no vsock channel")
        exited: asyncio.Future[object] = asyncio.ensure_future(self.vm.wait())
        try:
            self.agent = await self.env.dial(self.vm.channel, self.profile.dial_timeout,
                                             exited, self.env.timeouts)
        finally:
            exited.cancel()
            await asyncio.wait({exited})
        self.undo.push_async_callback(self.agent.close)
        log.info("pod %s: agent answered after %.3f s", self.config.sandbox_id,
                 self._elapsed())
        if self.hold is not None:  # the rest of the pod's start, inside its slot, bounded
            self.hold.bound(self.env.timeouts.boot_slot_hold)

    async def set_policy(self) -> None:
        """The policy annotation, after Check and before CreateSandbox; the guest's policy in
        force decides (its denial is PermissionDenied with the agent's message)."""
        if self.annotations.policy is not None:
            await self.agent.set_policy(self.annotations.policy)

    async def configure_guest_network(self) -> None:
        """Interfaces (found by MAC in the guest), then routes, then permanent neighbours."""
        if self.wired is None:
            return
        requests = guest_requests(self.wired.network)
        for interface in requests.interfaces:
            await self.agent.update_interface(interface)
        if requests.routes:
            await self.agent.update_routes(requests.routes)
        if requests.neighbors:
            await self.agent.add_arp_neighbors(requests.neighbors)

    async def create_sandbox(self) -> None:
        hostname = self.config.spec.get("hostname")
        await self.agent.create_sandbox(
            self.config.sandbox_id, hostname if isinstance(hostname, str) else "",
            dns_of(self.config.spec), self.rootfs.sandbox_storages())
        log.info("pod %s: sandbox created after %.3f s", self.config.sandbox_id,
                 self._elapsed())
