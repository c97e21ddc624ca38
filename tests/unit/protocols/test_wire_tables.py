"""Our compiled .proto descriptors against the upstream wire tables, entity by entity.

The tables in shared/reference/wire-facts (containerd 2.x, Kata agent) are the source of truth:
for every package they describe, each message, enum and service must exist here with exactly the
same fields (name, number, type, label, type name), enum values and methods, and we must define
nothing they do not list. google.protobuf.* entries are checked only for the well-known types our
files actually import; the rest are descriptor.proto, which upstream imports for Go options.

A few upstream facts have no column in the tables (field presence, streaming); they are listed in
UPSTREAM_* below, each with its source, and checked the same way.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

REPO = Path(__file__).resolve().parents[3]
# The repository sits beside shared/ (here and in CI), so this is <repo>/../shared/...
WIRE_FACTS = Path(__file__).resolve().parents[4] / "shared" / "reference" / "wire-facts"
TABLE_FILES = ("containerd-2.x.json", "kata-agent.json")
API = REPO / "protocols" / "api"
WELL_KNOWN = "google.protobuf."

# Real (non-synthetic) oneofs, message -> {oneof name: member fields}.
# Upstream kata oci.proto: `oneof ErrnoRet { uint32 errnoret = 3; }`, so errno 0 is sendable.
UPSTREAM_ONEOFS: dict[str, dict[str, tuple[str, ...]]] = {
    "grpc.LinuxSyscall": {"ErrnoRet": ("errnoret",)},
}
# proto3 `optional` fields, message -> field names. Upstream kata agent.proto declares every
# mem-agent setting optional: an unset field means "leave as is", so 0/false must be sendable.
UPSTREAM_OPTIONAL: dict[str, frozenset[str]] = {
    "grpc.MemAgentMemcgConfig": frozenset({
        "disabled", "swap", "swappiness_max", "period_secs", "period_psi_percent_limit",
        "eviction_psi_percent_limit", "eviction_run_aging_count_min",
    }),
    "grpc.MemAgentCompactConfig": frozenset({
        "disabled", "period_secs", "period_psi_percent_limit", "compact_psi_percent_limit",
        "compact_sec_max", "compact_order", "compact_threshold", "compact_force_times",
    }),
}
# Streaming methods, "service.method" -> (client streaming, server streaming); others are unary.
# Upstream containerd services/events/v1/events.proto: `returns (stream containerd.types.Envelope)`.
UPSTREAM_STREAMING: dict[str, tuple[bool, bool]] = {
    "containerd.services.events.v1.Events.Subscribe": (False, True),
}

FieldFacts = tuple[int, str, str, str]  # number, TYPE_x, LABEL_x, type full name or ""
MethodFacts = tuple[str, str]  # request full name, response full name


@dataclass
class Message:
    fields: dict[str, FieldFacts]
    oneofs: dict[str, tuple[str, ...]]
    optional: frozenset[str]


@dataclass
class Service:
    methods: dict[str, MethodFacts]
    streaming: dict[str, tuple[bool, bool]]


@dataclass
class Tables:
    messages: dict[str, dict[str, FieldFacts]] = field(default_factory=dict)
    enums: dict[str, dict[str, int]] = field(default_factory=dict)
    services: dict[str, dict[str, MethodFacts]] = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)

    def names(self) -> set[str]:
        return set(self.messages) | set(self.enums) | set(self.services)


@dataclass
class Compiled:
    messages: dict[str, Message] = field(default_factory=dict)
    enums: dict[str, dict[str, int]] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    package_of: dict[str, str] = field(default_factory=dict)
    import_errors: list[str] = field(default_factory=list)


def load_tables() -> Tables | None:
    """Both tables merged, or None when shared/ is not beside the repository."""
    if not all((WIRE_FACTS / name).is_file() for name in TABLE_FILES):
        return None
    tables = Tables()
    for name in TABLE_FILES:
        raw: dict[str, dict[str, Any]] = json.loads((WIRE_FACTS / name).read_text())
        sections: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
            ("message", tables.messages, {
                msg: {f: (int(v[0]), str(v[1]), str(v[2]), str(v[3])) for f, v in fields.items()}
                for msg, fields in raw["messages"].items()
            }),
            ("enum", tables.enums, {
                enum: {v: int(n) for v, n in values.items()}
                for enum, values in raw["enums"].items()
            }),
            ("service", tables.services, {
                svc: {m: (str(rr[0]), str(rr[1])) for m, rr in methods.items()}
                for svc, methods in raw["services"].items()
            }),
        ]
        for kind, merged, entries in sections:
            for full_name, facts in entries.items():
                if full_name in merged and merged[full_name] != facts:
                    tables.conflicts.append(f"{kind} {full_name} differs between the tables")
                merged[full_name] = facts
    return tables


def generated_modules() -> list[str]:
    paths = sorted([*API.rglob("*_pb2.py"), *API.rglob("*_pb2_grpc.py")])
    return [".".join(p.relative_to(REPO).with_suffix("").parts) for p in paths]


def _file_closure(roots: list[FileDescriptor]) -> Iterator[FileDescriptor]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        fd = stack.pop()
        if fd.name not in seen:
            seen.add(fd.name)
            stack.extend(fd.dependencies)
            yield fd


def _add_message(out: Compiled, package: str, prefix: str,
                 msg: descriptor_pb2.DescriptorProto) -> None:
    name = f"{prefix}.{msg.name}"
    fields: dict[str, FieldFacts] = {}
    oneofs: dict[str, list[str]] = {}
    optional: set[str] = set()
    for f in msg.field:
        fields[f.name] = (
            f.number,
            descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
            descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
            f.type_name.removeprefix("."),
        )
        if f.proto3_optional:
            optional.add(f.name)
        elif f.HasField("oneof_index"):
            oneofs.setdefault(msg.oneof_decl[f.oneof_index].name, []).append(f.name)
    out.messages[name] = Message(
        fields, {k: tuple(v) for k, v in oneofs.items()}, frozenset(optional))
    out.package_of[name] = package
    for enum in msg.enum_type:
        out.enums[f"{name}.{enum.name}"] = {v.name: v.number for v in enum.value}
        out.package_of[f"{name}.{enum.name}"] = package
    for nested in msg.nested_type:
        _add_message(out, package, name, nested)


@functools.cache
def compiled() -> Compiled:
    """Every entity in our generated modules and in the files they import."""
    out = Compiled()
    roots: list[FileDescriptor] = []
    for module_name in generated_modules():
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # reported by test_generated_modules_import
            out.import_errors.append(f"{module_name}: {type(err).__name__}: {err}")
            continue
        descriptor = getattr(module, "DESCRIPTOR", None)
        if isinstance(descriptor, FileDescriptor):
            roots.append(descriptor)
    for fd in _file_closure(roots):
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        pkg = proto.package
        for msg in proto.message_type:
            _add_message(out, pkg, pkg, msg)
        for enum in proto.enum_type:
            out.enums[f"{pkg}.{enum.name}"] = {v.name: v.number for v in enum.value}
            out.package_of[f"{pkg}.{enum.name}"] = pkg
        for svc in proto.service:
            name = f"{pkg}.{svc.name}"
            out.services[name] = Service(
                {m.name: (m.input_type.removeprefix("."), m.output_type.removeprefix("."))
                 for m in svc.method},
                {m.name: (m.client_streaming, m.server_streaming) for m in svc.method},
            )
            out.package_of[name] = pkg
    return out


TABLES = load_tables()
MISSING = (f"wire tables not found: expected {', '.join(TABLE_FILES)} in {WIRE_FACTS} "
           "(shared/ must sit beside the repository checkout)")


def _in_scope(package_of: dict[str, str], table_names: set[str]) -> set[str]:
    """Our entities in a package the tables describe (well-known types excepted)."""
    packages = {pkg for pkg in set(package_of.values())
                if not f"{pkg}.".startswith(WELL_KNOWN)
                and any(n.startswith(f"{pkg}.") for n in table_names)}
    return {n for n, pkg in package_of.items() if pkg in packages}


def _case_names(kind: str) -> list[str]:
    """Table entries to check plus our entities in the tables' packages (ids for parametrize)."""
    ours = compiled()
    our_kinds: dict[str, Collection[str]] = {
        "message": ours.messages, "enum": ours.enums, "service": ours.services}
    our_names = set(our_kinds[kind])
    if TABLES is None:
        return sorted(our_names)  # each case then fails with MISSING
    table_kinds: dict[str, Collection[str]] = {
        "message": TABLES.messages, "enum": TABLES.enums, "service": TABLES.services}
    table = set(table_kinds[kind])
    checked = {n for n in table if not n.startswith(WELL_KNOWN) or n in our_names}
    our_packages = {n: p for n, p in ours.package_of.items() if n in our_names}
    return sorted(checked | _in_scope(our_packages, TABLES.names()))


def _tables() -> Tables:
    if TABLES is None:
        pytest.fail(MISSING)
    return TABLES


def _presence_mismatches(name: str, msg: Message) -> list[str]:
    problems = []
    want_oneofs = UPSTREAM_ONEOFS.get(name, {})
    if msg.oneofs != want_oneofs:
        problems.append(f"oneofs: have {msg.oneofs}, upstream has {want_oneofs}")
    want_optional = UPSTREAM_OPTIONAL.get(name, frozenset())
    for f in sorted(msg.optional - want_optional):
        problems.append(f"field {f}: proto3 optional here, plain upstream")
    for f in sorted(want_optional - msg.optional):
        problems.append(f"field {f}: plain here, proto3 optional upstream")
    return problems


def test_wire_tables_present_and_consistent() -> None:
    tables = _tables()
    assert not tables.conflicts, "\n".join(tables.conflicts)


def test_generated_modules_import() -> None:
    assert generated_modules(), f"no generated modules under {API}: run `make protos`"
    errors = compiled().import_errors
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", _case_names("message"))
def test_message_matches_table(name: str) -> None:
    tables = _tables()
    msg = compiled().messages.get(name)
    want = tables.messages.get(name)
    assert msg is not None, f"message {name} is in the tables but not in our .proto files"
    assert want is not None, f"message {name} is ours but not in the tables"
    problems = []
    for f in sorted(set(want) | set(msg.fields)):
        if f not in msg.fields:
            problems.append(f"field {f}: missing, table has {want[f]}")
        elif f not in want:
            problems.append(f"field {f}: extra, not in the table: {msg.fields[f]}")
        elif msg.fields[f] != want[f]:
            problems.append(f"field {f}: have {msg.fields[f]}, table has {want[f]}")
    problems += _presence_mismatches(name, msg)
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("name", _case_names("enum"))
def test_enum_matches_table(name: str) -> None:
    tables = _tables()
    values = compiled().enums.get(name)
    want = tables.enums.get(name)
    assert values is not None, f"enum {name} is in the tables but not in our .proto files"
    assert want is not None, f"enum {name} is ours but not in the tables"
    assert values == want, f"{name}: have {values}, table has {want}"


@pytest.mark.parametrize("name", _case_names("service"))
def test_service_matches_table(name: str) -> None:
    tables = _tables()
    svc = compiled().services.get(name)
    want = tables.services.get(name)
    assert svc is not None, f"service {name} is in the tables but not in our .proto files"
    assert want is not None, f"service {name} is ours but not in the tables"
    problems = []
    for m in sorted(set(want) | set(svc.methods)):
        if m not in svc.methods:
            problems.append(f"rpc {m}: missing, table has {want[m]}")
        elif m not in want:
            problems.append(f"rpc {m}: extra, not in the table: {svc.methods[m]}")
        elif svc.methods[m] != want[m]:
            problems.append(f"rpc {m}: have {svc.methods[m]}, table has {want[m]}")
        if m in svc.streaming:
            expected = UPSTREAM_STREAMING.get(f"{name}.{m}", (False, False))
            if svc.streaming[m] != expected:
                problems.append(f"rpc {m}: (client, server) streaming {svc.streaming[m]}, "
                                f"upstream {expected}")
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


def test_upstream_extras_name_real_entities() -> None:
    """The hand-kept presence/streaming lists must not go stale silently."""
    ours = compiled()
    stale = [n for n in [*UPSTREAM_ONEOFS, *UPSTREAM_OPTIONAL] if n not in ours.messages]
    stale += [n for n in UPSTREAM_STREAMING
              if n.rpartition(".")[0] not in ours.services
              or n.rpartition(".")[2] not in ours.services[n.rpartition(".")[0]].methods]
    assert not stale, f"UPSTREAM_* entries naming nothing we define: {stale}"
