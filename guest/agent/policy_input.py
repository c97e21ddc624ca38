"""A request as the policy's ``input``: the JSON kata's agent hands its Rego engine.

kata serialises its rust-protobuf request structs with serde, so policies written for kata
(genpolicy's rules.rego, hand-written ones) read exactly this shape:

- every field is present, under its proto name (a Rust keyword gets a trailing ``_``:
  ``type`` → ``type_``), with its default when unset;
- an unset message field is ``null``, a set one an object; a proto3 ``optional`` scalar is
  ``null`` when unset; a oneof is ``{"<field>": value}`` or ``null``;
- enums are their numbers, 64-bit integers are JSON numbers, ``bytes`` are arrays of numbers;
- maps are objects (keys as strings);
- CopyFileRequest is replaced by kata's PolicyCopyFileRequest: no ``data``, plus ``file_type``
  (``Regular`` / ``Directory`` / ``Symlink`` / ``Unknown``) and ``symlink_target``.

The rule evaluated for a request is named after its message (``CreateContainerRequest``).
"""

from __future__ import annotations

import stat
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from guest.agent.errors import InvalidArgument

# Rust keywords rust-protobuf escapes with a trailing underscore (strict and reserved ones).
RUST_KEYWORDS = frozenset(
    {
        "abstract", "as", "async", "await", "become", "box", "break", "const", "continue",
        "crate", "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "if",
        "impl", "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv",
        "pub", "ref", "return", "self", "static", "struct", "super", "trait", "true", "try",
        "type", "typeof", "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
    }
)  # fmt: skip

FILE_TYPES = {stat.S_IFREG: "Regular", stat.S_IFDIR: "Directory", stat.S_IFLNK: "Symlink"}


def rule_name(request: Message) -> str:
    """``data.agent_policy.<this>`` decides the request: its message name."""
    return str(request.DESCRIPTOR.name)


def json_name(field: Any) -> str:
    return f"{field.name}_" if field.name in RUST_KEYWORDS else field.name


def request_input(request: Message) -> dict[str, Any]:
    """The policy input for ``request`` (see the module docstring)."""
    if request.DESCRIPTOR.name == "CopyFileRequest":
        return copy_file_input(request)
    return message_input(request)


def message_input(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    descriptor = message.DESCRIPTOR
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and not _synthetic(oneof):
            continue  # rendered below, as the oneof
        if oneof is not None or (field.has_presence and field.message_type is None):
            # proto3 `optional` scalar: Option<T> in rust-protobuf
            value = _value(message, field) if message.HasField(field.name) else None
        else:
            value = _value(message, field)
        out[json_name(field)] = value
    for oneof in descriptor.oneofs:
        if _synthetic(oneof):
            continue
        chosen = message.WhichOneof(oneof.name)
        out[oneof.name] = (
            None if chosen is None else {chosen: _value(message, descriptor.fields_by_name[chosen])}
        )
    return out


def _synthetic(oneof: Any) -> bool:
    return bool(getattr(oneof, "is_synthetic", False)) or (
        len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"
    )


def _value(message: Message, field: Any) -> Any:
    raw = getattr(message, field.name)
    if field.is_repeated:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            return {str(k): _scalar_or_message(v, value_field) for k, v in raw.items()}
        return [_scalar_or_message(v, field) for v in raw]
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_input(raw) if message.HasField(field.name) else None
    return _scalar_or_message(raw, field)


def _scalar_or_message(value: Any, field: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_input(value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return list(value)
    return value  # enums are already their numbers; ints, floats, bools, strings as they are


def copy_file_input(request: Any) -> dict[str, Any]:
    """kata's PolicyCopyFileRequest: the request without its data, its kind spelled out."""
    file_type = FILE_TYPES.get(stat.S_IFMT(request.file_mode), "Unknown")
    target: str | None = None
    if file_type == "Symlink":
        try:
            target = bytes(request.data).decode()
        except UnicodeDecodeError as err:
            raise InvalidArgument(f"CopyFile {request.path}: symlink target is not UTF-8") from err
    return {
        "path": request.path,
        "file_type": file_type,
        "symlink_target": target,
        "file_size": request.file_size,
        "file_mode": request.file_mode,
        "dir_mode": request.dir_mode,
        "uid": request.uid,
        "gid": request.gid,
        "offset": request.offset,
    }


__all__ = ["copy_file_input", "message_input", "request_input", "rule_name"]
