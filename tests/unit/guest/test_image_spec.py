"""Image references, the pull configuration, digests, user resolution and the image config
applied to the container's spec."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from guest.agent.errors import DataLoss, InvalidArgument, NotFound
from guest.image_pull.config import guest_pull_config, load_pull_config, read_pull_config
from guest.image_pull.digest import Digest, VerifyingReader
from guest.image_pull.imagespec import apply_image_config, apply_pause_process
from guest.image_pull.pause import is_sandbox, prepare_pause_rootfs
from guest.image_pull.puller import image_pull_metadata
from guest.image_pull.reference import parse_reference
from guest.image_pull.users import read_in_root, resolve_user

# -- references ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), [
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("docker.io/team/app:1.0", "docker.io", "team/app", "1.0", None),
    ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
    ("198.18.0.1:5000/busybox:latest", "198.18.0.1:5000", "busybox", "latest", None),
    ("localhost/a/b", "localhost", "a/b", "latest", None),
    ("quay.io/x/y@sha256:" + "a" * 64, "quay.io", "x/y", None, "sha256:" + "a" * 64),
    ("reg.test:443/x:t@sha256:" + "b" * 64, "reg.test:443", "x", "t", "sha256:" + "b" * 64),
])
def test_references_normalise_like_containerd(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry, repository, tag, digest)
    assert ref.endpoint == ("registry-1.docker.io" if registry == "docker.io" else registry)


@pytest.mark.parametrize("text", ["", " busybox", "Busybox", "a//b", "x:", "x@sha256:short",
                                  "host:port/x", "a:b:c"])
def test_bad_references_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_reference(text)


# -- configuration ---------------------------------------------------------------------------

CDH_TOML = '''
socket = "unix:///run/confidential-containers/cdh.sock"
[kbc]
name = "cc_kbc"
url = "http://kbs.test"

[image]
max_concurrent_layer_downloads_per_image = 5
work_dir = "/run/pull"
image_pull_timeout = 90
extra_root_certificates = ["-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----"]

[[image.registry_config.registry]]
location = "reg.test:5000"
insecure = true

[[image.registry_config.registry]]
prefix = "reg.test:5000/banned"
blocked = true
'''


def test_cdh_toml_image_section_is_read_and_other_tables_ignored() -> None:
    config = load_pull_config(CDH_TOML)
    assert config.concurrency == 5 and config.timeout == 90.0
    assert str(config.work_dir) == "/run/pull"
    assert len(config.extra_root_certificates) == 1
    assert config.is_insecure("reg.test:5000") and not config.is_insecure("reg.test")
    banned = config.rule_for("reg.test:5000/banned/app")
    assert banned is not None and banned.blocked
    allowed = config.rule_for("reg.test:5000/bannedx")
    assert allowed is not None and not allowed.blocked  # prefix needs a / boundary
    assert config.rule_for("other.test/x") is None


@pytest.mark.parametrize(("snippet", "message"), [
    ('image_security_policy_uri = "kbs:///x"', "signature policies"),
    ('sigstore_config_uri = "kbs:///x"', "sigstore"),
    ("[image.image_pull_proxy]\nhttps_proxy = 'http://p'", "proxy"),
    ("unknown_key = 1", "unknown key"),
    ("image_pull_timeout = -1", "positive"),
    ("max_concurrent_layer_downloads_per_image = 0", "1..64"),
    ('work_dir = "relative"', "absolute"),
    ('authenticated_registry_credentials_uri = "kbs:///default/cred/x"', "needs the KBS"),
    ('authenticated_registry_credentials_uri = "http://x"', "file:/// or kbs:///"),
    ('extra_root_certificates = ["kbs:///default/ca/x"]', "needs the KBS"),
    ("[[image.registry_config.registry]]\nlocation = 'a'\n"
     "[[image.registry_config.registry.mirror]]\nlocation = 'b'", "mirrors"),
    ("[[image.registry_config.registry]]\nprefix = 'a'\nlocation = 'b'", "remapping"),
    ("extra_root_certificates = ['not a pem']", "PEM"),
])
def test_unsupported_or_bad_settings_are_refused_by_name(snippet: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        load_pull_config(f"[image]\n{snippet}\n")


def test_credentials_file_and_missing_config_file(tmp_path: Path) -> None:
    auth = tmp_path / "auth.json"
    token = base64.b64encode(b"me:pa:ss").decode()
    auth.write_text(json.dumps({"auths": {"https://reg.test": {"auth": token}}}))
    config = load_pull_config(
        f'[image]\nauthenticated_registry_credentials_uri = "file://{auth}"\n')
    assert config.credentials == {"reg.test": ("me", "pa:ss")}
    assert read_pull_config(tmp_path / "absent.toml").timeout == 1200.0
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        load_pull_config("[image")


def test_kbs_uris_are_fetched_with_the_given_resource_getter() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    auths = {"auths": {"reg.test": {"username": "u", "password": "p"}}}
    resources = {"kbs:///default/ca/reg": pem.encode(),
                 "kbs:///default/cred/reg": json.dumps(auths).encode()}
    text = ('[image]\nextra_root_certificates = ["kbs:///default/ca/reg"]\n'
            'authenticated_registry_credentials_uri = "kbs:///default/cred/reg"\n')
    config = load_pull_config(text, resource=resources.__getitem__)
    assert config.extra_root_certificates == (pem,)
    assert config.credentials == {"reg.test": ("u", "p")}
    with pytest.raises(InvalidArgument, match="fetching kbs:///default/ca/reg failed"):
        empty: dict[str, bytes] = {}
        load_pull_config(text, resource=empty.__getitem__)


def test_initdata_cdh_toml_wins_when_it_has_an_image_table(tmp_path: Path) -> None:
    baked = tmp_path / "image-pull.toml"
    baked.write_text("[image]\nimage_pull_timeout = 77\n")
    assert guest_pull_config(None, baked).timeout == 77.0
    assert guest_pull_config('[kbc]\nname = "cc_kbc"\n', baked).timeout == 77.0
    assert guest_pull_config(CDH_TOML, baked).timeout == 90.0
    with pytest.raises(InvalidArgument, match=r"initdata cdh\.toml"):
        guest_pull_config("[image]\nsigstore_config_uri = 'kbs:///x'\n", baked)


def test_driver_option_metadata() -> None:
    option = "image_guest_pull=" + json.dumps({"metadata": {"a": "b"}})
    assert image_pull_metadata(("other=1", option)) == {"a": "b"}
    with pytest.raises(InvalidArgument, match="driver option"):
        image_pull_metadata(("image_guest_pull=not json",))
    with pytest.raises(InvalidArgument, match="without"):
        image_pull_metadata(())


# -- digests ---------------------------------------------------------------------------------


def test_verifying_reader_checks_size_and_digest() -> None:
    data = b"x" * 1000
    good = VerifyingReader(io.BytesIO(data), Digest.of(data), 1000, "blob")
    assert good.read(10_000) == data
    good.verify()
    with pytest.raises(DataLoss, match="content has digest"):
        bad = VerifyingReader(io.BytesIO(b"y" * 1000), Digest.of(data), 1000, "blob")
        bad.drain()
        bad.verify()
    with pytest.raises(DataLoss, match="got 500 bytes"):
        short = VerifyingReader(io.BytesIO(data[:500]), Digest.of(data), 1000, "blob")
        short.drain()
        short.verify()
    long = VerifyingReader(io.BytesIO(data + b"more"), Digest.of(data), 1000, "blob")
    long.drain()
    with pytest.raises(DataLoss, match="longer than"):
        long.verify()
    with pytest.raises(InvalidArgument):
        Digest.parse("md5:abc")


# -- users and the image config ----------------------------------------------------------------

PASSWD = "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\nnogroup:x:1500:1500::/:\n"
GROUP = "root:x:0:\napp:x:1001:\nextra:x:2000:app,other\nwheel:x:10:root\n"


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    return root


@pytest.mark.parametrize(("user", "expected"), [
    ("app", (1000, 1001, (1001, 2000))),
    ("1000", (1000, 1001, (1001, 2000))),
    ("4242", (4242, 0, (0,))),  # unknown uid: gid 0, as containerd does
    ("app:extra", (1000, 2000, (2000,))),
    ("app:77", (1000, 77, (77, 2000))),
    ("5:wheel", (5, 10, (10,))),
    ("root", (0, 0, (0, 10))),
])
def test_users_resolve_like_containerd(rootfs: Path, user: str,
                                       expected: tuple[int, int, tuple[int, ...]]) -> None:
    resolved = resolve_user(rootfs, user, "img")
    assert (resolved.uid, resolved.gid, resolved.additional_gids) == expected


def test_unknown_names_are_errors(rootfs: Path) -> None:
    with pytest.raises(NotFound, match="user 'ghost'"):
        resolve_user(rootfs, "ghost", "img")
    with pytest.raises(NotFound, match="group 'ghosts'"):
        resolve_user(rootfs, "app:ghosts", "img")
    with pytest.raises(InvalidArgument):
        resolve_user(rootfs, "a:b:c", "img")


def test_passwd_symlinks_stay_inside_the_rootfs(tmp_path: Path, rootfs: Path) -> None:
    outside = tmp_path / "host-passwd"
    outside.write_text("app:x:0:0::/:/bin/sh\n")  # would make "app" root if followed
    (rootfs / "etc/passwd").unlink()
    (rootfs / "etc/passwd").symlink_to(outside)  # absolute: resolved inside the rootfs
    assert read_in_root(rootfs, "/etc/passwd") is None
    (rootfs / "etc/passwd").unlink()
    (rootfs / "etc/passwd").symlink_to("../../../../../../" + str(outside).lstrip("/"))
    assert read_in_root(rootfs, "/etc/passwd") is None
    (rootfs / "etc/real").write_text(PASSWD)
    (rootfs / "etc/passwd").unlink()
    (rootfs / "etc/passwd").symlink_to("/etc/real")
    assert resolve_user(rootfs, "app", "img").uid == 1000
    os.mkfifo(rootfs / "etc/group.fifo")
    assert read_in_root(rootfs, "/etc/group.fifo") is None


def base_spec(**process: Any) -> dict[str, Any]:
    return {"root": {"path": "/ignored"},
            "process": {"args": [], "env": [], "cwd": "/", "user": {"uid": 0, "gid": 0},
                        **process}}


IMAGE = {"config": {"Entrypoint": ["/entry"], "Cmd": ["arg"], "Env": ["PATH=/bin", "A=image"],
                    "WorkingDir": "/work", "User": "app"}}


def test_image_config_fills_what_the_spec_leaves(rootfs: Path) -> None:
    out = apply_image_config(base_spec(env=["A=spec"]), IMAGE, rootfs, "img")
    process = out["process"]
    assert out["root"]["path"] == str(rootfs)
    assert process["args"] == ["/entry", "arg"]
    assert process["env"] == ["A=spec", "PATH=/bin"]
    assert process["cwd"] == "/work"
    assert process["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [1001, 2000]}


def test_the_spec_wins_where_it_says_something(rootfs: Path) -> None:
    spec = base_spec(args=["sh"], cwd="/srv", user={"uid": 3000, "gid": 3000})
    process = apply_image_config(spec, IMAGE, rootfs, "img")["process"]
    assert process["args"] == ["sh"] and process["cwd"] == "/srv"
    assert process["user"] == {"uid": 3000, "gid": 3000}  # e.g. runAsUser from the host


def test_username_in_the_spec_is_resolved_in_the_guest(rootfs: Path) -> None:
    spec = base_spec(args=["sh"], user={"uid": 0, "gid": 0, "username": "app:extra"})
    process = apply_image_config(spec, {"config": {}}, rootfs, "img")["process"]
    assert process["user"] == {"uid": 1000, "gid": 2000, "additionalGids": [2000]}


def test_no_command_at_all_is_an_error(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match="neither Entrypoint nor Cmd"):
        apply_image_config(base_spec(), {"config": {}}, rootfs, "img")


def test_pause_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "pause_bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "rootfs/pause").write_bytes(b"\x7fELF")
    process = {"args": ["/pause", "-P"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
    (bundle / "config.json").write_text(json.dumps({"process": process}))
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    assert prepare_pause_rootfs(rootfs, bundle) == process
    assert (rootfs / "pause").read_bytes() == b"\x7fELF"
    spec = apply_pause_process(base_spec(args=["/never"]), process, rootfs)
    assert spec["process"] == process and spec["root"]["path"] == str(rootfs)
    assert is_sandbox({"io.kubernetes.cri.container-type": "sandbox"})
    assert is_sandbox({"io.kubernetes.cri-o.ContainerType": "sandbox"})
    assert not is_sandbox({"io.kubernetes.cri.container-type": "container"})
