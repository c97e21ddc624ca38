"""The binary contract's pure parts: flags, runtime options, paths, bootstrap JSON."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from protocols.api.containerd.task.v3 import shim_pb2
from protocols.api.runtimeoptions.v1 import api_pb2
from shim.binary import contract
from shim.binary.contract import Flags, RuntimeOptions, UsageError
from shim.core import wire


def test_go_style_flags() -> None:
    flags = contract.parse_flags([
        "-namespace", "k8s.io", "--address=/run/containerd/containerd.sock",
        "-publish-binary", "/usr/bin/containerd", "-id", "abc", "-debug", "start"])
    assert flags == Flags(action="start", namespace="k8s.io",
                          address="/run/containerd/containerd.sock",
                          publish_binary="/usr/bin/containerd", id="abc", debug=True)
    assert contract.parse_flags(["-debug=false", "delete"]).debug is False
    assert contract.parse_flags(["-h"]).help
    assert contract.parse_flags(["--help"]).help
    with pytest.raises(UsageError, match="not defined: -bogus"):
        contract.parse_flags(["-bogus", "start"])
    with pytest.raises(UsageError, match="needs an argument"):
        contract.parse_flags(["-id"])


def test_daemon_flags_round_trip() -> None:
    flags = Flags(action="serve", namespace="n", address="/a", id="i", bundle="/b",
                  socket="/s", group="g", listen_fd=3, ready_fd=5, protocol="ttrpc",
                  bootstrap_version=2, debug=True)
    assert contract.parse_flags(contract.to_argv(flags)) == flags
    early = replace(flags, early_boot=True, runtime_options=b"\x0a\x01x".hex())
    assert contract.parse_flags(contract.to_argv(early)) == early


def _any(options: api_pb2.Options, type_url: str = "runtimeoptions.v1.Options") -> bytes:
    return any_pb2.Any(type_url=type_url, value=options.SerializeToString()).SerializeToString()


def test_runtime_options_are_decoded_by_hand() -> None:
    body = b'[shim]\nprotocol = "ttrpc"\n'
    data = _any(api_pb2.Options(type_url="x", config_path="/etc/p.toml", config_body=body))
    assert contract.decode_runtime_options(data) == RuntimeOptions("x", "/etc/p.toml", body)
    assert contract.decode_runtime_options(b"") == RuntimeOptions()
    other = _any(api_pb2.Options(config_path="/x"), "types.containerd.io/other.Options")
    assert contract.decode_runtime_options(other) == RuntimeOptions()
    with pytest.raises(wire.WireError):
        contract.decode_runtime_options(b"\x0a\xff")


def test_shim_config(tmp_path: Path) -> None:
    assert contract.load_shim_config(RuntimeOptions()) == contract.ShimConfig()
    body = b'[shim]\nprotocol = "ttrpc"\nbootstrap_version = 2\n[hypervisor]\ntee = "snp"\n'
    config = contract.load_shim_config(RuntimeOptions(config_body=body))
    assert (config.protocol, config.bootstrap_version) == ("ttrpc", 2)
    profile = tmp_path / "p.toml"
    profile.write_text('[shim]\nbootstrap_version = 3\n')
    config = contract.load_shim_config(RuntimeOptions(config_path=str(profile)))
    assert (config.protocol, config.bootstrap_version) == ("auto", 3)
    with pytest.raises(UsageError, match="protocol"):
        contract.load_shim_config(RuntimeOptions(config_body=b'[shim]\nprotocol = "http"\n'))
    with pytest.raises(UsageError, match="bootstrap_version"):
        contract.load_shim_config(RuntimeOptions(config_body=b"[shim]\nbootstrap_version = 4\n"))
    assert config.early_boot
    late = contract.load_shim_config(RuntimeOptions(config_body=b"[shim]\nearly_boot = false\n"))
    assert not late.early_boot
    with pytest.raises(UsageError, match="early_boot must be true or false"):
        contract.load_shim_config(RuntimeOptions(config_body=b'[shim]\nearly_boot = "yes"\n'))


def test_socket_path_follows_containerd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(contract.SOCKET_DIR_ENV, raising=False)
    path = contract.socket_path("/run/containerd/containerd.sock", "k8s.io", "pod1")
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/k8s.io/pod1").hexdigest()
    assert path == Path("/run/containerd/s") / digest
    assert len(str(path)) <= contract.MAX_SOCKET_PATH
    monkeypatch.setenv(contract.SOCKET_DIR_ENV, "/" + "x" * 60)
    with pytest.raises(UsageError, match="longer than 106"):
        contract.socket_path("/a", "n", "g")


def test_grouping_by_sandbox_annotation() -> None:
    spec: dict[str, object] = {"annotations": {contract.SANDBOX_ID_ANNOTATION: "pod"}}
    assert contract.group_id(spec, "ctr") == "pod"
    assert contract.group_id({}, "ctr") == "ctr"


def test_bootstrap_json() -> None:
    assert json.loads(contract.bootstrap_json(3, "grpc", Path("/run/containerd/s/ab"))) == {
        "version": 3, "address": "/run/containerd/s/ab", "protocol": "grpc"}
    assert json.loads(contract.bootstrap_json(2, "ttrpc", "/s/ab")) == {
        "version": 2, "address": "unix:///s/ab", "protocol": "ttrpc"}


def test_containerd_version_parsing() -> None:
    v2 = "containerd github.com/containerd/containerd/v2 2.1.9+unknown \n"
    v1 = "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1\n"
    assert contract.parse_containerd_major(v2) == 2
    assert contract.parse_containerd_major(v1) == 1
    assert contract.parse_containerd_major("garbage") is None
    assert contract.bootstrap_version_for(1) == 2
    assert contract.bootstrap_version_for(2) == 3
    assert contract.bootstrap_version_for(None) == 3


def test_hand_made_delete_response_parses() -> None:
    data = (wire.varint_field(1, 4242) + wire.varint_field(2, 137)
            + wire.message_field(3, wire.timestamp(1_700_000_000, 5)))
    response = shim_pb2.DeleteResponse.FromString(data)
    assert (response.pid, response.exit_status, response.exited_at.seconds,
            response.exited_at.nanos) == (4242, 137, 1_700_000_000, 5)
    assert wire.encode_varint(-1) == b"\xff" * 9 + b"\x01"


def test_auto_protocol() -> None:
    assert contract.protocol_for("auto", 2) == "grpc"  # containerd 1.7
    assert contract.protocol_for("auto", 3) == "ttrpc"  # containerd 2.x (its gRPC watcher)
    assert contract.protocol_for("grpc", 3) == "grpc"
    assert contract.protocol_for("ttrpc", 2) == "ttrpc"


def test_mounts_under_lists_nested_mount_points_deepest_first() -> None:
    from shim.binary.manager import mounts_under

    found = mounts_under(Path("/sys"))
    assert Path("/sys") in found
    assert found[-1] == Path("/sys")  # the directory itself comes last
    depths = [len(p.parts) for p in found]
    assert depths == sorted(depths, reverse=True)
    assert mounts_under(Path("/nonexistent-coco-dir")) == []
