"""A pod VM as the pod holds it: what it is made from (:class:`PodConfig`), the seam that boots
it (:class:`Booter`), and one booted VM (:class:`PodVm`: its hypervisor process, its agent, its
rootfs strategy and the boot script's undo stack, which tears everything down in reverse)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from hypervisor.errors import QemuError
from shim.core import trace
from shim.core.config import RuntimeOptions
from shim.core.errors import RpcError
from shim.pod import guest_spec
from shim.pod.mounts import Mount

if TYPE_CHECKING:  # types only: the daemon serves before the boot machinery is loaded
    from hypervisor.vm import VirtualMachine
    from shim.pod.admission import SlotHold
    from shim.pod.agent import Agent
    from shim.pod.profile import AnnotationPolicy
    from shim.pod.rootfs import RootfsStrategy
    from shim.pod.sizing import VmSize

log = logging.getLogger(__name__)

VM_KILLED_STATUS: Final = 128 + signal.SIGKILL  # every process of a pod whose VM died: 137


@dataclass(frozen=True)
class PodConfig:
    """What a pod VM is made from: known at its first Create, or at CreateSandbox."""

    sandbox_id: str
    namespace: str
    bundle: Path
    spec: Mapping[str, object]  # annotations, hostname, network namespace, mounts (DNS)
    options: RuntimeOptions = field(default_factory=RuntimeOptions)

    def same_pod(self, other: PodConfig) -> bool:
        """Made from the same bundle and runtime options (an early boot Create may adopt)."""
        return (self.sandbox_id, self.bundle, self.options) == (
            other.sandbox_id, other.bundle, other.options)


class BootClock:
    """A boot's own deadline (``Timeouts.boot``, owned by the pod), which stops while the boot
    waits for a node-wide boot slot (shim/pod/admission.py): waiting in a burst is not the
    boot being slow, and the wait has its own bound."""

    def __init__(self, deadline: asyncio.Timeout | None = None) -> None:
        self._deadline = deadline

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """The deadline moves later by the time spent inside."""
        deadline = self._deadline
        when = None if deadline is None else deadline.when()
        if deadline is None or when is None:
            yield
            return
        loop = asyncio.get_running_loop()
        left = when - loop.time()
        deadline.reschedule(None)
        try:
            yield
        finally:
            deadline.reschedule(loop.time() + left)


class Booter(Protocol):
    """Boots pod VMs: :class:`shim.pod.boot.VmBooter` (QEMU + agent), fakes in tests."""

    async def boot(self, config: PodConfig, clock: BootClock | None = None) -> PodVm:
        """Bring a VM up to CreateSandbox; on failure or cancellation nothing is left.
        ``clock``: the boot's deadline, stopped while the boot waits for a slot."""
        ...


@dataclass
class PodVm:
    """One booted pod VM; ``exited`` is set once it is gone (died, or stopped)."""

    sandbox_id: str
    vm: VirtualMachine
    agent: Agent
    rootfs: RootfsStrategy
    undo: AsyncExitStack
    annotations: AnnotationPolicy
    size: VmSize | None = None  # what it booted with (None: a fake booter's VM)
    # The node-wide boot slot its boot still holds (None: no admission, or given back).
    boot_slot: SlotHold | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    failing: bool = False  # Pod.fail is stopping it
    _teardown_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _torn_down: bool = False

    @property
    def pid(self) -> int:
        """The host pid that stands for the pod's processes (the hypervisor), as Kata says."""
        return self.vm.pid or 0

    async def start_container(self, container_id: str) -> None:
        """StartContainer. The pod's first (started or refused) ends its boot: the pod is
        usable and its boot slot goes back to the node (:mod:`shim.pod.admission`)."""
        try:
            await self.agent.start_container(container_id)
        finally:
            self.started()

    def started(self) -> None:
        """The pod's boot is over: its boot slot (if it still holds one) goes back. Idempotent."""
        slot, self.boot_slot = self.boot_slot, None
        if slot is not None:
            slot.release("first container started")

    async def create_container(self, container_id: str, bundle: Path,
                               spec: Mapping[str, object], rootfs: Sequence[Mount]) -> None:
        """Host side (the rootfs strategy), then CreateContainer with the guest's spec; the
        host side is undone if the agent refuses. Every container is held to the profile's
        annotation allow-list, not only the one that booted the VM."""
        self.annotations.check(spec, f"container {container_id}")
        prepared = await self.rootfs.add(container_id, bundle, spec, rootfs)
        try:
            oci = guest_spec.for_guest(spec, prepared.root_path, prepared.mounts)
            await self.agent.create_container(
                container_id, oci, prepared.storages,
                sandbox_pidns=guest_spec.joins_pod_pid_namespace(spec))
        except BaseException:
            await self.rootfs.remove(container_id)
            raise

    async def remove_container(self, container_id: str, *, in_guest: bool) -> None:
        """RemoveContainer in the guest (unless ``in_guest`` is false: the pod ends with this
        container and DestroySandbox takes it down), then its host side."""
        try:
            if in_guest:
                await self.agent.remove_container(container_id)
        finally:
            await self.rootfs.remove(container_id)

    async def destroy(self, *, vm_gone: bool) -> None:
        """DestroySandbox (while the VM lives), stop the VM (graceful, then forceful), undo
        the boot (agent, network, rootfs, run directory). Idempotent."""
        async with self._teardown_lock:
            if self._torn_down:
                return
            started = time.monotonic()
            if not vm_gone:
                try:
                    await self.agent.destroy_sandbox()
                except RpcError as err:
                    log.info("pod %s: DestroySandbox: %s", self.sandbox_id, err)
            destroyed = time.monotonic()
            with contextlib.suppress(QemuError):
                await self.vm.stop()
            stopped = time.monotonic()
            trace.mark("teardown: VM stopped")
            try:
                await self.undo.aclose()
            finally:
                self._torn_down = True
            trace.mark("teardown: host side undone")
            log.info("pod %s: down (DestroySandbox %.3f s, VM stop %.3f s, cleanup %.3f s)",
                     self.sandbox_id, destroyed - started, stopped - destroyed,
                     time.monotonic() - stopped)
