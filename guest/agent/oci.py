"""grpc.Spec / grpc.Process (Kata's oci.proto) to the OCI runtime-spec JSON runc reads.

The name mapping (Go field names ↔ runtime-spec json tags) is shared with the host side in
:mod:`protocols.ocispec`; what is guest-specific is which parts of a spec never reach runc.
Unset proto3 scalars (zero values) are left out, so runc applies its defaults.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from protocols.ocispec import json_name, to_json

# Host-only parts of a spec the agent never forwards to runc.
DROPPED = frozenset({"Hooks", "Solaris", "Windows"})

__all__ = ["json_name", "process_to_json", "resources_to_json", "spec_to_json"]


def spec_to_json(spec: Message) -> dict[str, Any]:
    """A grpc.Spec as an OCI config.json document."""
    return to_json(spec, drop=DROPPED)


def process_to_json(process: Message) -> dict[str, Any]:
    """A grpc.Process as the OCI process object runc exec --process reads."""
    return to_json(process)


def resources_to_json(resources: Message) -> dict[str, Any]:
    """grpc.LinuxResources as the JSON runc update --resources reads."""
    return to_json(resources)
