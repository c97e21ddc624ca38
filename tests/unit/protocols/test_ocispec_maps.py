"""protocols.ocispec tells map fields without reading descriptor options (which would import
descriptor_pb2 in the guest): the shape test agrees with the options on every message."""

from __future__ import annotations

import subprocess
import sys

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from protocols import ocispec
from protocols.api.containerd.task.v2 import shim_pb2
from protocols.api.kata import agent_pb2, oci_pb2


def _fields(descriptor: Descriptor, seen: set[str]) -> list[FieldDescriptor]:
    if descriptor.full_name in seen:
        return []
    seen.add(descriptor.full_name)
    out = list(descriptor.fields)
    for field in descriptor.fields:
        if field.message_type is not None:
            out += _fields(field.message_type, seen)
    return out


def test_shape_test_agrees_with_the_map_entry_option() -> None:
    seen: set[str] = set()
    fields = [f for module in (oci_pb2, agent_pb2, shim_pb2)
              for message in module.DESCRIPTOR.message_types_by_name.values()
              for f in _fields(message, seen)]
    maps = [f for f in fields if f.message_type is not None
            and f.message_type.GetOptions().map_entry]
    assert len(maps) >= 5  # annotations, sysctls, labels...
    assert [f.full_name for f in fields if ocispec._is_map(f)] == [f.full_name for f in maps]


def test_converting_a_spec_leaves_descriptor_pb2_unimported() -> None:
    code = ("import sys; from protocols.api.kata import oci_pb2; from protocols import ocispec; "
            "s = oci_pb2.Spec(Annotations={'a': 'b'}); ocispec.to_json(s); "
            "ocispec.from_json({'annotations': {'x': 'y'}}, oci_pb2.Spec); "
            "print('google.protobuf.descriptor_pb2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
