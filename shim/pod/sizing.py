"""The pod VM's size from the pod's limits (kata's ``static_sandbox_resource_mgmt``).

A TEE cannot hotplug CPUs or memory, and this shim hotplugs on no profile, so the VM is sized
once, at boot, from what the pod asks for. containerd puts the pod's summed container limits
(``PodSandboxConfig.linux.resources``, filled by the kubelet) on the sandbox as annotations; the
names are the same on containerd 1.7 and 2.x (``internal/cri/annotations``), and the sandbox
API path (``shim.daemon.sandbox_service.pod_spec``) writes the same ones from the pod config:

    vCPUs  = base vCPUs + ceil(cpu-quota / cpu-period)       (no quota or period: + 0)
    memory = base MiB + ceil(memory bytes / MiB)             (no memory limit: + 0)

Base = the profile's ``vcpus``/``memory_mib`` (or, on non-confidential profiles that allow-list
them, the ``default_vcpus``/``default_memory`` annotations). A pod without limits gets the
base. vCPUs above the profile's maximum (``sandbox_max_vcpus``, default the host's CPUs) are cut
to it, as kata does (the pod's CFS quota still bounds it); memory above
``sandbox_max_memory_mib`` (default the host's memory) is refused: a smaller VM would let the
guest OOM-kill a container below its limit. ``cpu-shares`` does not size anything.

Memory accounting (``packaging/kubernetes``): the host charges the pod cgroup guest RAM +
the VMM's own footprint, so the RuntimeClass ``overhead.podFixed.memory`` must be at least the
base memory + the measured footprint (``bench/overhead.py``); then guest RAM + overhead stays
within the pod's limit + overhead, and the pod cannot OOM-kill its own VM at its limit.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from hypervisor.profile import SIZE_ANNOTATIONS, RuntimeProfile
from shim.core.bundle import (
    SANDBOX_CPU_PERIOD,
    SANDBOX_CPU_QUOTA,
    SANDBOX_CPU_SHARES,
    SANDBOX_MEMORY,
)
from shim.core.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

DEFAULT_VCPUS_ANNOTATION, DEFAULT_MEMORY_ANNOTATION = SIZE_ANNOTATIONS
MIB: Final = 1 << 20
MIN_MEMORY_MIB: Final = 64  # what hypervisor.profile.check_invariants accepts


@dataclass(frozen=True)
class PodLimits:
    """The pod's summed limits, in whole vCPUs and MiB (0: no limit)."""

    vcpus: int = 0
    memory_mib: int = 0


@dataclass(frozen=True)
class HostSize:
    """The default maxima: this host's CPUs and memory."""

    cpus: int
    memory_mib: int

    @classmethod
    def probe(cls, meminfo: Path = Path("/proc/meminfo")) -> HostSize:
        memory_kib = 0
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
        return cls(cpus=os.cpu_count() or 1, memory_mib=memory_kib // 1024)


@dataclass(frozen=True)
class VmSize:
    """What the pod VM boots with, and why."""

    vcpus: int
    memory_mib: int
    base_vcpus: int
    base_memory_mib: int
    limits: PodLimits

    @property
    def workload_memory_mib(self) -> int:
        """Memory the pod's containers were promised: their limits, or the whole VM."""
        return self.limits.memory_mib or self.memory_mib

    def check_update(self, container_id: str, vcpus: int, memory_mib: int) -> None:
        """An update asking for more than the VM was booted with is refused (no hotplug)."""
        if vcpus > self.vcpus:
            raise FailedPrecondition(
                f"update {container_id}: CPU limit {vcpus} vCPUs exceeds the pod VM's "
                f"{self.vcpus} vCPUs, fixed at boot (no CPU hotplug; recreate the pod with "
                "a higher limit)")
        if memory_mib > self.workload_memory_mib:
            raise FailedPrecondition(
                f"update {container_id}: memory limit {memory_mib} MiB exceeds the "
                f"{self.workload_memory_mib} MiB the pod VM was sized for at boot (no memory "
                "hotplug; recreate the pod with a higher limit)")


def _int(annotations: Mapping[str, str], key: str) -> int:
    raw = annotations.get(key, "")
    if raw == "":
        return 0
    try:
        return int(raw)
    except ValueError as err:
        raise InvalidArgument(f"annotation {key}: not an integer: {raw!r}") from err


def cpu_vcpus(quota: int, period: int) -> int:
    """CFS quota/period → whole vCPUs, rounded up (no quota or period: 0)."""
    if quota <= 0 or period <= 0:
        return 0
    return math.ceil(quota / period)


def memory_mib(limit_bytes: int) -> int:
    """A memory limit in bytes → whole MiB, rounded up (none: 0)."""
    return math.ceil(limit_bytes / MIB) if limit_bytes > 0 else 0


def pod_limits(annotations: Mapping[str, str]) -> PodLimits:
    """The pod's limits from containerd's sandbox annotations."""
    _int(annotations, SANDBOX_CPU_SHARES)  # well formed, though it sizes nothing
    return PodLimits(
        vcpus=cpu_vcpus(_int(annotations, SANDBOX_CPU_QUOTA),
                        _int(annotations, SANDBOX_CPU_PERIOD)),
        memory_mib=memory_mib(_int(annotations, SANDBOX_MEMORY)))


def _base(profile: RuntimeProfile, annotations: Mapping[str, str]) -> tuple[int, int]:
    vcpus, memory = profile.vcpus, profile.memory_mib
    allowed = set(profile.enable_annotations)
    if DEFAULT_VCPUS_ANNOTATION in annotations and DEFAULT_VCPUS_ANNOTATION in allowed:
        vcpus = _int(annotations, DEFAULT_VCPUS_ANNOTATION)
        if vcpus < 1:
            raise InvalidArgument(f"annotation {DEFAULT_VCPUS_ANNOTATION}: must be >= 1, "
                                  f"got {vcpus}")
    if DEFAULT_MEMORY_ANNOTATION in annotations and DEFAULT_MEMORY_ANNOTATION in allowed:
        memory = _int(annotations, DEFAULT_MEMORY_ANNOTATION)
        if memory < MIN_MEMORY_MIB:
            raise InvalidArgument(f"annotation {DEFAULT_MEMORY_ANNOTATION}: must be >= "
                                  f"{MIN_MEMORY_MIB} (MiB), got {memory}")
    return vcpus, memory


def size_vm(profile: RuntimeProfile, annotations: Mapping[str, str],
            host: HostSize) -> VmSize:
    """The pod VM's vCPUs and memory (see the module's rule)."""
    base_vcpus, base_memory = _base(profile, annotations)
    limits = pod_limits(annotations) if profile.static_sizing else PodLimits()
    max_vcpus = profile.sandbox_max_vcpus or host.cpus
    max_memory = profile.sandbox_max_memory_mib or host.memory_mib
    vcpus = base_vcpus + limits.vcpus
    if vcpus > max_vcpus:
        log.warning("pod VM: %d vCPUs (base %d + limit %d) cut to the maximum %d", vcpus,
                    base_vcpus, limits.vcpus, max_vcpus)
        vcpus = max_vcpus
    memory = base_memory + limits.memory_mib
    if memory > max_memory:
        raise InvalidArgument(
            f"pod VM memory {memory} MiB (base {base_memory} + pod limit {limits.memory_mib}) "
            f"exceeds the maximum {max_memory} MiB (runtime.sandbox_max_memory_mib of "
            f"{profile.source}, else this host's memory)")
    return VmSize(vcpus=vcpus, memory_mib=memory, base_vcpus=base_vcpus,
                  base_memory_mib=base_memory, limits=limits)


def _field(doc: object, key: str) -> int:
    value = doc.get(key) if isinstance(doc, Mapping) else None
    return value if isinstance(value, int) else 0


def update_limits(resources: Mapping[str, object]) -> tuple[int, int]:
    """An Update's runtime-spec resources → (whole vCPUs, MiB) it asks for (0: none)."""
    cpu, memory = resources.get("cpu"), resources.get("memory")
    return (cpu_vcpus(_field(cpu, "quota"), _field(cpu, "period")),
            memory_mib(_field(memory, "limit")))


def check_update(size: VmSize | None, container_id: str,
                 resources: Mapping[str, object]) -> None:
    """Refuse an Update's resources beyond what the pod VM was booted with (``size`` None: a
    VM whose size is unknown, a fake booter's)."""
    if size is not None:
        size.check_update(container_id, *update_limits(resources))
