"""OCI runtime-spec JSON ↔ Kata's ``grpc.Spec`` family (oci.proto), both directions.

Kata's oci.proto names fields after runtime-spec's Go struct fields (``Version``,
``UIDMappings``, ``OOMScoreAdj``…) while config.json uses the json tags. The rule is lowerCamel
of the Go name plus a small table of exceptions, so one table serves both directions. JSON keys
with no proto field (newer runtime-spec additions) are reported, not guessed at.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

# Go field name -> runtime-spec JSON name, where lowerCamel of the Go name is not it.
JSON_NAMES: Mapping[str, str] = {
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

# Integer field types and the range each can hold.
_INTS: Mapping[int, tuple[int, int]] = {
    **dict.fromkeys((FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32,
                     FieldDescriptor.TYPE_SFIXED32), (-(1 << 31), (1 << 31) - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64,
                     FieldDescriptor.TYPE_SFIXED64), (-(1 << 63), (1 << 63) - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32),
                    (0, (1 << 32) - 1)),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64),
                    (0, (1 << 64) - 1)),
}


class SpecError(ValueError):
    """The JSON does not fit the proto: names the JSON path and what was wrong."""


def json_name(go_name: str) -> str:
    return JSON_NAMES.get(go_name) or go_name[:1].lower() + go_name[1:]


def _map_value(field: FieldDescriptor) -> FieldDescriptor:
    entry = field.message_type
    assert entry is not None
    value: FieldDescriptor = entry.fields_by_name["value"]
    return value


def _fields_by_json(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    return {json_name(f.name): f for f in descriptor.fields}


def _is_map(field: FieldDescriptor) -> bool:
    """A map field: repeated, of its message's generated entry type. The entry's options say
    map_entry, but reading options imports descriptor_pb2 (≈ 0.45 s of a TCG boot, at the
    guest's first CreateContainer), so the entry's shape is checked instead: it has options,
    is nested in the same message, and its fields are exactly key = 1 and value = 2."""
    entry = field.message_type
    if entry is None or not field.is_repeated or not entry.has_options:
        return False
    return (entry.containing_type == field.containing_type
            and {f.name: f.number for f in entry.fields} == {"key": 1, "value": 2})


def to_json(message: Message, *, drop: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A proto message as runtime-spec JSON; unset (zero) scalars are left out."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.name in drop:
            continue
        name = json_name(field.name)
        if _is_map(field):
            value_field = _map_value(field)
            out[name] = {k: to_json(v) if value_field.message_type else v
                         for k, v in value.items()}
        elif field.is_repeated:
            out[name] = [to_json(v) if field.message_type else v for v in value]
        else:
            out[name] = to_json(value) if field.message_type else value
    return out


def from_json(doc: Mapping[str, Any], cls: type[M], *, path: str = "",
              unknown: list[str] | None = None) -> M:
    """Build ``cls`` from runtime-spec JSON. Keys the proto lacks go to ``unknown`` (JSON paths);
    a value of the wrong shape raises :class:`SpecError` naming its path."""
    message = cls()
    _fill(message, doc, path or cls.DESCRIPTOR.name, unknown if unknown is not None else [])
    return message


def _fill(message: Message, doc: Mapping[str, Any], path: str, unknown: list[str]) -> None:
    if not isinstance(doc, Mapping):
        raise SpecError(f"{path}: expected an object, got {type(doc).__name__}")
    descriptor = cast(Descriptor, message.DESCRIPTOR)
    fields = _fields_by_json(descriptor)
    for key, value in doc.items():
        where = f"{path}.{key}"
        field = fields.get(key)
        if field is None:
            unknown.append(where)
            continue
        if value is None:
            continue
        target = getattr(message, field.name)
        if _is_map(field):
            if not isinstance(value, Mapping):
                raise SpecError(f"{where}: expected an object, got {type(value).__name__}")
            value_field = _map_value(field)
            for k, v in value.items():
                if value_field.message_type is not None:
                    _fill(target[k], v, f"{where}.{k}", unknown)
                else:
                    target[k] = _scalar(value_field, v, f"{where}.{k}")
        elif field.is_repeated:
            if not isinstance(value, list):
                raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
            for i, item in enumerate(value):
                if field.message_type is not None:
                    _fill(target.add(), item, f"{where}[{i}]", unknown)
                else:
                    target.append(_scalar(field, item, f"{where}[{i}]"))
        elif field.message_type is not None:
            _fill(target, value, where, unknown)
        else:
            setattr(message, field.name, _scalar(field, value, where))


def _scalar(field: FieldDescriptor, value: Any, where: str) -> Any:
    if field.type == FieldDescriptor.TYPE_BOOL:
        if isinstance(value, bool):
            return value
    elif field.type in _INTS:
        low, high = _INTS[field.type]
        if isinstance(value, int) and not isinstance(value, bool):
            if not low <= value <= high:
                raise SpecError(f"{where}: {value} is out of range for proto field "
                                f"{field.full_name} ({low}..{high})")
            return value
    elif field.type == FieldDescriptor.TYPE_STRING:
        if isinstance(value, str):
            return value
    elif field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif field.type == FieldDescriptor.TYPE_BYTES and isinstance(value, str):
        return value.encode()
    raise SpecError(f"{where}: {value!r} does not fit proto field {field.full_name}")
