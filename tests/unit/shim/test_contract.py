"""The binary contract's pure parts: flags, runtime options, the one config chain, paths,
bootstrap JSON."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from protocols.api.containerd.task.v3 import shim_pb2
from protocols.api.runtimeoptions.v1 import api_pb2
from shim.binary import bootstrap
from shim.binary.flags import Flags, UsageError, parse_flags, to_argv
from shim.core import bundle, config, paths, wire
from shim.core.config import RuntimeOptions, ShimConfig, config_source, shim_config
from shim.core.errors import InvalidArgument


def test_go_style_flags() -> None:
    flags = parse_flags([
        "-namespace", "k8s.io", "--address=/run/containerd/containerd.sock",
        "-publish-binary", "/usr/bin/containerd", "-id", "abc", "-debug", "start"])
    assert flags == Flags(action="start", namespace="k8s.io",
                          address="/run/containerd/containerd.sock",
                          publish_binary="/usr/bin/containerd", id="abc", debug=True)
    assert parse_flags(["-debug=false", "delete"]).debug is False
    assert parse_flags(["-h"]).help
    assert parse_flags(["--help"]).help
    with pytest.raises(UsageError, match="not defined: -bogus"):
        parse_flags(["-bogus", "start"])
    with pytest.raises(UsageError, match="needs an argument"):
        parse_flags(["-id"])


def test_daemon_flags_round_trip() -> None:
    flags = Flags(action="serve", namespace="n", address="/a", id="i", bundle="/b",
                  socket="/s", group="g", listen_fd=3, protocol="ttrpc",
                  bootstrap_version=2, debug=True)
    assert parse_flags(to_argv(flags)) == flags
    early = flags._replace(early_boot=True, runtime_options_fd=7)
    assert parse_flags(to_argv(early)) == early


def _any(options: api_pb2.Options, type_url: str = "runtimeoptions.v1.Options") -> bytes:
    return any_pb2.Any(type_url=type_url, value=options.SerializeToString()).SerializeToString()


def test_runtime_options_are_decoded_by_hand() -> None:
    body = b'[shim]\nprotocol = "ttrpc"\n'
    data = _any(api_pb2.Options(type_url="x", config_path="/etc/p.toml", config_body=body))
    assert config.decode_runtime_options(data) == RuntimeOptions("x", "/etc/p.toml", body)
    assert config.decode_runtime_options(b"") == RuntimeOptions()
    other = _any(api_pb2.Options(config_path="/x"), "types.containerd.io/other.Options")
    assert config.decode_runtime_options(other) == RuntimeOptions()
    with pytest.raises(InvalidArgument, match="runtime options"):
        config.decode_runtime_options(b"\x0a\xff")
    with pytest.raises(InvalidArgument, match="runtime options"):
        config.decode_runtime_options(_any(api_pb2.Options(config_path="x"))[:-1])


def _shim(options: RuntimeOptions, environ: dict[str, str] | None = None) -> ShimConfig:
    return shim_config(config_source(options, environ or {}))


def test_shim_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    assert _shim(RuntimeOptions()) == ShimConfig()
    body = b'[shim]\nprotocol = "ttrpc"\nbootstrap_version = 2\n[hypervisor]\ntee = "snp"\n'
    found = _shim(RuntimeOptions(config_body=body))
    assert (found.protocol, found.bootstrap_version) == ("ttrpc", 2)
    profile = tmp_path / "p.toml"
    profile.write_text('[shim]\nbootstrap_version = 3\n')
    found = _shim(RuntimeOptions(config_path=str(profile)))
    assert (found.protocol, found.bootstrap_version) == ("auto", 3)
    with pytest.raises(InvalidArgument, match="protocol"):
        _shim(RuntimeOptions(config_body=b'[shim]\nprotocol = "http"\n'))
    with pytest.raises(InvalidArgument, match="bootstrap_version"):
        _shim(RuntimeOptions(config_body=b"[shim]\nbootstrap_version = 4\n"))
    assert found.early_boot
    late = _shim(RuntimeOptions(config_body=b"[shim]\nearly_boot = false\n"))
    assert not late.early_boot
    with pytest.raises(InvalidArgument, match="early_boot must be true or false"):
        _shim(RuntimeOptions(config_body=b'[shim]\nearly_boot = "yes"\n'))
    with pytest.raises(InvalidArgument, match="unknown key 'extra'"):
        _shim(RuntimeOptions(config_body=b"[shim]\nextra = 1\n"))
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        _shim(RuntimeOptions(config_body=b"[shim\n"))
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        _shim(RuntimeOptions(config_body=b"\xff"))


def test_starts_shim_config_is_cached_by_text_and_bad_text_never_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.STATE_DIR_ENV, str(tmp_path))
    parsed: list[str] = []

    def counting(found: config.ConfigSource) -> ShimConfig:
        parsed.append(found.source)
        return shim_config(found)

    monkeypatch.setattr(bootstrap, "shim_config", counting)
    grpc = config.ConfigSource('[shim]\nprotocol = "grpc"\nbootstrap_version = 2\n', "a")
    want = ShimConfig(protocol="grpc", bootstrap_version=2, early_boot=True)
    assert bootstrap.cached_shim_config(grpc) == want
    assert bootstrap.cached_shim_config(grpc._replace(source="b")) == want
    assert parsed == ["a"]  # the same text: parsed once
    bad = config.ConfigSource('[shim]\nprotocol = "udp"\n', "bad")
    for _ in range(2):
        with pytest.raises(InvalidArgument, match="protocol must be"):
            bootstrap.cached_shim_config(bad)
    assert parsed == ["a", "bad", "bad"]
    assert bootstrap.cached_shim_config(config.ConfigSource(None, "none")) == ShimConfig()
    del parsed[-1]
    # A damaged cache is parsed around (and repaired), never believed.
    cache = tmp_path / bootstrap.SHIM_CONFIG_CACHE
    entries = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: ["udp", 2, True] for key in entries}))
    assert bootstrap.cached_shim_config(grpc) == want
    assert parsed == ["a", "bad", "bad", "a"]
    cache.write_text("{not json")
    assert bootstrap.cached_shim_config(grpc) == want
    for n in range(bootstrap.SHIM_CONFIG_CACHE_ENTRIES + 5):  # bounded: the newest are kept
        bootstrap.cached_shim_config(config.ConfigSource(f"# {n}\n", str(n)))
    assert len(json.loads(cache.read_text())) == bootstrap.SHIM_CONFIG_CACHE_ENTRIES


def test_one_fallback_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Options body → options path → $COCO_SHIM_CONFIG → the default file."""
    default, env, path = (tmp_path / name for name in ("default.toml", "env.toml", "p.toml"))
    for file in (default, env, path):
        file.write_text(f"# {file.name}\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG", default)
    environ = {config.CONFIG_ENV: str(env)}
    assert config_source(RuntimeOptions(config_body=b"# body\n"), environ).source == \
        config.BODY_SOURCE
    assert config_source(RuntimeOptions(config_path=str(path)), environ).source == str(path)
    found = config_source(RuntimeOptions(), environ)
    assert (found.source, found.text, found.base_dir) == (str(env), "# env.toml\n", tmp_path)
    assert config_source(RuntimeOptions(), {}).source == str(default)
    default.unlink()  # the default may be absent: defaults apply
    assert config_source(RuntimeOptions(), {}).text is None
    env.unlink()  # a file named explicitly must be readable
    with pytest.raises(InvalidArgument, match=f"runtime config {env}: cannot read"):
        config_source(RuntimeOptions(), environ)


def test_a_config_path_that_is_no_regular_file_is_refused_without_reading(
        tmp_path: Path) -> None:
    """A FIFO nobody writes, a device that never ends, a directory, an oversized file: each is
    refused by name at once (before this, a FIFO or /dev/zero made `start` read forever)."""
    fifo = tmp_path / "profile.fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (config.MAX_CONFIG_BYTES + 1))
    for path, reason in ((fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                         (tmp_path, "not a regular file"),
                         (big, f"{config.MAX_CONFIG_BYTES + 1} bytes, more than")):
        with pytest.raises(InvalidArgument, match=f"runtime config {path}: {reason}"):
            config_source(RuntimeOptions(config_path=str(path)), {})
    exact = tmp_path / "exact.toml"
    exact.write_bytes(b"#" * config.MAX_CONFIG_BYTES)
    assert config_source(RuntimeOptions(config_path=str(exact)), {}).text == \
        "#" * config.MAX_CONFIG_BYTES


def test_socket_path_follows_containerd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(paths.SOCKET_DIR_ENV, raising=False)
    path = bootstrap.socket_path("/run/containerd/containerd.sock", "k8s.io", "pod1")
    digest = hashlib.sha256(b"/run/containerd/containerd.sock/k8s.io/pod1").hexdigest()
    assert path == Path("/run/containerd/s") / digest
    assert len(str(path)) <= bootstrap.MAX_SOCKET_PATH
    monkeypatch.setenv(paths.SOCKET_DIR_ENV, "/" + "x" * 60)
    with pytest.raises(InvalidArgument, match="longer than 106"):
        bootstrap.socket_path("/a", "n", "g")


def test_grouping_by_sandbox_annotation() -> None:
    spec: dict[str, object] = {"annotations": {bundle.SANDBOX_ID_ANNOTATION: "pod"}}
    assert bundle.group_id(spec, "ctr") == "pod"
    assert bundle.group_id({}, "ctr") == "ctr"


def test_bootstrap_json() -> None:
    assert json.loads(bootstrap.bootstrap_json(3, "grpc", Path("/run/containerd/s/ab"))) == {
        "version": 3, "address": "/run/containerd/s/ab", "protocol": "grpc"}
    assert json.loads(bootstrap.bootstrap_json(2, "ttrpc", "/s/ab")) == {
        "version": 2, "address": "unix:///s/ab", "protocol": "ttrpc"}


def test_containerd_version_parsing() -> None:
    v2 = "containerd github.com/containerd/containerd/v2 2.1.9+unknown \n"
    v1 = "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1\n"
    assert bootstrap.parse_containerd_major(v2) == 2
    assert bootstrap.parse_containerd_major(v1) == 1
    assert bootstrap.parse_containerd_major("garbage") is None
    assert bootstrap.bootstrap_version_for(1) == 2
    assert bootstrap.bootstrap_version_for(2) == 3
    assert bootstrap.bootstrap_version_for(None) == 3


def test_hand_made_delete_response_parses() -> None:
    data = (wire.varint_field(1, 4242) + wire.varint_field(2, 137)
            + wire.message_field(3, wire.timestamp(1_700_000_000, 5)))
    response = shim_pb2.DeleteResponse.FromString(data)
    assert (response.pid, response.exit_status, response.exited_at.seconds,
            response.exited_at.nanos) == (4242, 137, 1_700_000_000, 5)
    assert wire.encode_varint(-1) == b"\xff" * 9 + b"\x01"


def test_auto_protocol() -> None:
    assert bootstrap.protocol_for("auto", 2) == "grpc"  # containerd 1.7
    assert bootstrap.protocol_for("auto", 3) == "ttrpc"  # containerd 2.x (its gRPC watcher)
    assert bootstrap.protocol_for("grpc", 3) == "grpc"
    assert bootstrap.protocol_for("ttrpc", 2) == "ttrpc"


def test_mounts_under_lists_nested_mount_points_deepest_first() -> None:
    from shim.pod.mounts import mounts_under

    found = mounts_under(Path("/sys"))
    assert Path("/sys") in found
    assert found[-1] == Path("/sys")  # the directory itself comes last
    depths = [len(p.parts) for p in found]
    assert depths == sorted(depths, reverse=True)
    assert mounts_under(Path("/nonexistent-coco-dir")) == []


# Found by `make fuzz`'s structured run: tomllib recurses once per nesting level, so a config
# body of a few thousand `[` (or `{a=`) escaped start and the daemon as a RecursionError.
@pytest.mark.parametrize("nested", ["a = " + "[" * 5000 + "]" * 5000,
                                    "a = " + "{b = " * 3000 + "1" + "}" * 3000],
                         ids=["arrays", "inline-tables"])
def test_deeply_nested_config_body_is_invalid_argument(nested: str) -> None:
    data = _any(api_pb2.Options(config_body=nested.encode()))
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        shim_config(config_source(config.decode_runtime_options(data), {}))


def test_state_records_and_pod_run_dirs_are_separate_private_trees(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fix 9: a namespace named like a pod key (or "vm") cannot share a directory with pods."""
    from shim.core.crash_record import ShimState

    monkeypatch.delenv(paths.STATE_DIR_ENV, raising=False)
    monkeypatch.delenv(paths.RUN_ROOT_ENV, raising=False)
    key = paths.pod_key("default", "pod")
    assert paths.state_root() != paths.run_root()
    assert not paths.state_dir(key, "x").is_relative_to(paths.run_root())
    assert not paths.pod_run_dir("default", "pod").is_relative_to(paths.state_root())
    root = tmp_path / "state"
    root.mkdir(mode=0o755)
    ShimState(root / key / "c1").add_dir(tmp_path / "pods" / key)
    assert root.stat().st_mode & 0o777 == 0o700
    assert (root / key / "c1").stat().st_mode & 0o777 == 0o700
