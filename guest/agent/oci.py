"""grpc.Spec / grpc.Process (Kata's oci.proto) to OCI runtime-spec JSON, and back for resources.

The proto field names are the Go struct names of runtime-spec (``Version``, ``UIDMappings``,
``OOMScoreAdj``...); JSON wants runtime-spec's json tags. The rule is lowerCamel of the Go name
plus a small table of exceptions. Unset proto3 scalars (zero values) are left out, so runc
applies its defaults; map entries (Annotations, Sysctl) become JSON objects.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

# Go field name -> runtime-spec JSON name, where lowerCamel is not it.
JSON_NAMES: dict[str, str] = {
    "Version": "ociVersion",
    "UIDMappings": "uidMappings",
    "GIDMappings": "gidMappings",
    "UID": "uid",
    "GID": "gid",
    "CPU": "cpu",
    "OOMScoreAdj": "oomScoreAdj",
    "Pagesize": "pageSize",
    "errnoret": "errnoRet",
    "HugepageLimits": "hugepageLimits",
}
# Host-only parts of a spec the agent never forwards to runc.
DROPPED = frozenset({"Hooks", "Solaris", "Windows"})


def json_name(go_name: str) -> str:
    if go_name in JSON_NAMES:
        return JSON_NAMES[go_name]
    return go_name[:1].lower() + go_name[1:]


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_json(value)
    return value


def to_json(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.name in DROPPED:
            continue
        name = json_name(field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[name] = {
                k: _value(field.message_type.fields_by_name["value"], v) for k, v in value.items()
            }
        elif field.is_repeated:
            out[name] = [_value(field, item) for item in value]
        else:
            out[name] = _value(field, value)
    return out


def spec_to_json(spec: Message) -> dict[str, Any]:
    """A grpc.Spec as an OCI config.json document."""
    return to_json(spec)


def process_to_json(process: Message) -> dict[str, Any]:
    """A grpc.Process as the OCI process object runc exec --process reads."""
    return to_json(process)


def resources_to_json(resources: Message) -> dict[str, Any]:
    """grpc.LinuxResources as the JSON runc update --resources reads."""
    return to_json(resources)
