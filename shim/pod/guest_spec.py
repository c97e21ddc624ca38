"""OCI config.json (host) → Kata ``grpc.Spec`` (guest): the one place a spec is made fit for
the pod VM, and every shape it must have is checked (InvalidArgument naming the field).

What only makes sense on the host is cleared: hooks, namespace paths (and the network
namespace: the VM is the pod's network boundary), device cgroup rules and host devices,
CPU/memory node pinning, and ``net.*`` sysctls (runc in the guest refuses network sysctls
outside a network namespace of their own; CRI adds two to every pod).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from google.protobuf.message import Message

from protocols.api.kata import oci_pb2
from protocols.ocispec import SpecError, from_json
from shim.core.errors import InvalidArgument

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

INITDATA_ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"
POLICY_ANNOTATION = "io.katacontainers.config.agent.policy"
# What the host gave the VM itself (kata removes both from the spec the guest receives): the
# guest must not learn them from a host-written spec, only from initdata and SetPolicy.
HOST_ONLY_ANNOTATIONS = frozenset({INITDATA_ANNOTATION, POLICY_ANNOTATION})


def spec_mounts(spec: Mapping[str, object]) -> list[Mapping[str, Any]]:
    """The spec's ``mounts``, each an object."""
    raw = spec.get("mounts") or []
    if not isinstance(raw, list):
        raise InvalidArgument("config.json: mounts must be a list")
    for index, entry in enumerate(raw):
        if not isinstance(entry, Mapping):
            raise InvalidArgument(f"config.json: mounts[{index}] must be an object")
    return raw


def annotations_of(spec: Mapping[str, object]) -> dict[str, str]:
    raw = spec.get("annotations") or {}
    if not isinstance(raw, Mapping):
        raise InvalidArgument("config.json: annotations must be an object")
    return {str(k): str(v) for k, v in raw.items()}


def for_guest_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    """The annotations the guest may see (initdata and the policy removed)."""
    return {k: v for k, v in annotations.items() if k not in HOST_ONLY_ANNOTATIONS}


def without_network_sysctls(spec: dict[str, object]) -> dict[str, object]:
    """``spec`` minus its ``net.*`` sysctls (the input is not modified)."""
    linux = spec.get("linux")
    if not isinstance(linux, dict) or not isinstance(linux.get("sysctl"), dict):
        return spec
    sysctl: dict[str, object] = linux["sysctl"]
    dropped = sorted(key for key in sysctl if key.startswith("net."))
    if not dropped:
        return spec
    log.info("network sysctls dropped (the pod VM's network is shared): %s", ", ".join(dropped))
    kept = {key: value for key, value in sysctl.items() if not key.startswith("net.")}
    return {**spec, "linux": {**linux, "sysctl": kept}}


def with_pod_sysctls(spec: dict[str, object],
                     pod_spec: Mapping[str, object]) -> dict[str, object]:
    """``spec`` plus the pod's sysctls it does not set itself (not the ``net.*`` ones).

    With a pause container (CRI ``podsandbox`` mode) the pod's sysctls are in the pause
    container's spec and apply to the pod's IPC and UTS namespaces, which every container of
    the pod joins in the guest. A pod made through the sandbox API has no pause container: its
    containers carry the pod's sysctls instead, so the OCI runtime applies them to those same
    shared namespaces (again, with the same values) as each container starts.
    """
    pod_linux = pod_spec.get("linux")
    pod_sysctl = pod_linux.get("sysctl") if isinstance(pod_linux, dict) else None
    if not isinstance(pod_sysctl, dict):
        return spec
    wanted = {k: v for k, v in pod_sysctl.items() if not str(k).startswith("net.")}
    if not wanted:
        return spec
    linux = spec.get("linux")
    linux = dict(linux) if isinstance(linux, dict) else {}
    own = linux.get("sysctl")
    linux["sysctl"] = {**wanted, **(own if isinstance(own, dict) else {})}
    return {**spec, "linux": linux}


def joins_pod_pid_namespace(spec: Mapping[str, object]) -> bool:
    """The spec joins an existing PID namespace: CRI names the pod's for every container of a
    pod with a shared process namespace. In the guest that is the pod's PID namespace (Kata's
    ``sandbox_pidns``); the host path itself is cleared by :func:`for_guest`."""
    linux = spec.get("linux")
    namespaces = linux.get("namespaces") if isinstance(linux, Mapping) else None
    return isinstance(namespaces, list) and any(
        isinstance(ns, Mapping) and ns.get("type") == "pid" and bool(ns.get("path"))
        for ns in namespaces)


def _object(doc: Mapping[str, Any], key: str, where: str) -> dict[str, Any] | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidArgument(f"config.json: {where} must be an object")
    return value


def _namespaces(linux: dict[str, Any]) -> list[dict[str, Any]]:
    raw = linux.get("namespaces") or []
    if not isinstance(raw, list):
        raise InvalidArgument("config.json: linux.namespaces must be a list")
    kept = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("type"), str):
            raise InvalidArgument(f"config.json: linux.namespaces[{index}] must be an object "
                                  "with a string type")
        if entry["type"] != "network":
            kept.append({"type": entry["type"]})
    return kept


def for_guest(spec: Mapping[str, object], root_path: str,
              mounts: Sequence[Mapping[str, Any]]) -> oci_pb2.Spec:
    """The container's grpc.Spec: root at ``root_path``, ``mounts`` (sources already guest
    paths), host-only parts cleared (hooks, host namespaces and devices, the initdata and
    policy annotations)."""
    doc: dict[str, Any] = json.loads(json.dumps(without_network_sysctls(dict(spec))))
    doc.pop("hooks", None)
    if isinstance(doc.get("annotations"), dict):
        doc["annotations"] = for_guest_annotations(doc["annotations"])
    doc["root"] = {**(_object(doc, "root", "root") or {}), "path": root_path}
    doc["mounts"] = [dict(m) for m in mounts]
    linux = _object(doc, "linux", "linux")
    if linux is not None:
        linux["namespaces"] = _namespaces(linux)
        linux.pop("devices", None)
        resources = _object(linux, "resources", "linux.resources")
        if resources is not None:
            resources.pop("devices", None)
            cpu = _object(resources, "cpu", "linux.resources.cpu")
            if cpu is not None:
                cpu.pop("cpus", None)
                cpu.pop("mems", None)
    unknown: list[str] = []
    converted = convert(doc, oci_pb2.Spec, "config.json", unknown)
    if unknown:
        log.info("config.json fields the agent protocol cannot carry, dropped: %s",
                 ", ".join(unknown))
    return converted


def convert(doc: object, cls: type[M], what: str, unknown: list[str] | None = None) -> M:
    """Runtime-spec JSON → ``cls``; a wrong shape is InvalidArgument naming ``what`` and the
    field."""
    if not isinstance(doc, Mapping):
        raise InvalidArgument(f"{what}: expected an object, got {type(doc).__name__}")
    try:
        return from_json(doc, cls, unknown=unknown)
    except SpecError as err:
        raise InvalidArgument(f"{what}: {err}") from err


def process(doc: Mapping[str, object], what: str) -> oci_pb2.Process:
    """An exec's process (ExecProcessRequest.spec JSON) → grpc.Process."""
    return convert(doc, oci_pb2.Process, what)


def resources(doc: Mapping[str, object], what: str) -> oci_pb2.LinuxResources:
    """Update's resources JSON → grpc.LinuxResources."""
    return convert(doc, oci_pb2.LinuxResources, what)
