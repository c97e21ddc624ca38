"""The puller against an in-process registry: platforms, auth, redirects, caching, deadlines."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from guest.agent.errors import (
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unimplemented,
)
from guest.image_pull.config import PullConfig, RegistryRule
from guest.image_pull.digest import Digest
from guest.image_pull.puller import ImagePuller, Platform
from guest.image_pull.reference import parse_reference
from guest.image_pull.registry import Cancelled, CancelToken, RegistryClient
from tests.support import oci
from tests.unit.guest.fake_registry import FakeRegistry, serve

AMD64 = Platform("linux", "amd64")


def config(tmp_path: Path, *hosts: str, **extra: object) -> PullConfig:
    rules = tuple(RegistryRule(prefix=h, insecure=True) for h in hosts)
    return PullConfig(work_dir=tmp_path / "images", ca_bundle=None, registries=rules,
                      **extra)  # type: ignore[arg-type]


def small_image(text: str = "hello") -> oci.Image:
    layer = oci.Layer.gzip(oci.TarBuilder().file("hello", f"{text}\n").bytes())
    return oci.Image((layer,), {"Cmd": ["cat", "/hello"]})


async def test_pull_unpacks_and_caches_every_blob_once(tmp_path: Path) -> None:
    with serve(FakeRegistry()) as registry:
        registry.add_image("team/app", "v1", small_image())
        puller = ImagePuller(config(tmp_path, registry.host), AMD64)
        ref = f"{registry.host}/team/app:v1"
        first, second = await asyncio.gather(puller.pull(ref), puller.pull(ref))
        again = await puller.pull(ref)
    assert (first.layers[0] / "hello").read_text() == "hello\n"
    assert first.layers == second.layers == again.layers
    assert sorted(registry.blob_gets()) == sorted(
        [small_image().layers[0].digest, oci.sha256(small_image().config_bytes())])
    assert again.fetched == ()
    assert first.config["config"]["Cmd"] == ["cat", "/hello"]


async def test_zstd_layers_are_pulled(tmp_path: Path) -> None:
    tar = oci.TarBuilder().file("hello", "from zstd\n").bytes()
    blob = await asyncio.to_thread(lambda: subprocess.run(
        ["zstd", "-q", "-c"], input=tar, capture_output=True, check=True).stdout)
    layer = oci.Layer(tar, blob, "application/vnd.oci.image.layer.v1.tar+zstd")
    with serve(FakeRegistry()) as registry:
        registry.add_image("z", "1", oci.Image((layer,), {"Cmd": ["sh"]}))
        image = await ImagePuller(config(tmp_path, registry.host), AMD64).pull(
            f"{registry.host}/z:1")
    assert (image.layers[0] / "hello").read_text() == "from zstd\n"


async def test_index_picks_the_guest_platform_or_says_what_is_offered(tmp_path: Path) -> None:
    with serve(FakeRegistry()) as registry:
        arm, amd = small_image("arm"), small_image("amd")
        registry.add_index("multi", "1", [arm, amd], [
            {"os": "linux", "architecture": "arm64", "variant": "v8"},
            {"os": "linux", "architecture": "amd64"}])
        registry.add_index("armonly", "1", [arm], [{"os": "linux", "architecture": "arm64"}])
        puller = ImagePuller(config(tmp_path, registry.host), AMD64)
        image = await puller.pull(f"{registry.host}/multi:1")
        assert (image.layers[0] / "hello").read_text() == "amd\n"
        with pytest.raises(InvalidArgument, match=r"no manifest for linux/amd64.*linux/arm64"):
            await puller.pull(f"{registry.host}/armonly:1")


async def test_bearer_token_is_fetched_once_and_reused(tmp_path: Path) -> None:
    with serve(FakeRegistry(bearer=True)) as registry:
        registry.add_image("app", "1", small_image())
        puller = ImagePuller(config(tmp_path, registry.host), AMD64)
        await puller.pull(f"{registry.host}/app:1")
    token_calls = [r for r in registry.requests if r.path.startswith("/token")]
    assert len(token_calls) == 1
    assert "scope=repository%3Ax%3Apull" in token_calls[0].path  # the challenge's scope
    served = [r for r in registry.requests if r.path.startswith("/v2/") and "/blobs/" in r.path]
    assert served and all(r.authorization == "Bearer test-token" for r in served)


async def test_basic_auth_needs_configured_credentials(tmp_path: Path) -> None:
    with serve(FakeRegistry(basic=("me", "secret"))) as registry:
        registry.add_image("app", "1", small_image())
        anonymous = ImagePuller(config(tmp_path / "a", registry.host), AMD64)
        with pytest.raises(PermissionDenied, match="Basic credentials"):
            await anonymous.pull(f"{registry.host}/app:1")
        cfg = config(tmp_path / "b", registry.host, credentials={registry.host: ("me", "secret")})
        image = await ImagePuller(cfg, AMD64).pull(f"{registry.host}/app:1")
        assert (image.layers[0] / "hello").exists()


async def test_redirected_blobs_never_carry_the_registry_token(tmp_path: Path) -> None:
    with serve(FakeRegistry()) as storage, serve(FakeRegistry(bearer=True)) as registry:
        image = small_image()
        registry.add_image("app", "1", image)
        storage.blobs.update(image.blobs())
        registry.redirect_blobs_to = storage.host
        cfg = config(tmp_path, registry.host, storage.host)
        await ImagePuller(cfg, AMD64).pull(f"{registry.host}/app:1")
    assert storage.blob_gets() and all(r.authorization is None for r in storage.requests)


def test_redirect_to_plain_http_needs_an_insecure_host(tmp_path: Path) -> None:
    client = RegistryClient(config(tmp_path, "good:1"), CancelToken())
    client._check_redirect("https://reg/v2/x", "http://good:1/blob", "blob")
    with pytest.raises(PermissionDenied, match="plain HTTP evil:2"):
        client._check_redirect("https://reg/v2/x", "http://evil:2/blob", "blob")


async def test_digest_mismatch_names_image_and_digest_and_leaves_no_layer(
    tmp_path: Path,
) -> None:
    with serve(FakeRegistry()) as registry:
        image = small_image()
        registry.add_image("app", "1", image)
        digest = image.layers[0].digest
        blob = bytearray(registry.blobs[digest])
        blob[len(blob) // 2] ^= 0xFF
        registry.blobs[digest] = bytes(blob)
        puller = ImagePuller(config(tmp_path, registry.host), AMD64)
        with pytest.raises(DataLoss) as info:
            await puller.pull(f"{registry.host}/app:1")
    assert f"{registry.host}/app:1" in str(info.value) and digest in str(info.value)
    assert puller.store.layers() == [] and puller.store.staging_entries() == []


async def test_wrong_diff_id_is_refused(tmp_path: Path) -> None:
    layer = small_image().layers[0]
    forged = oci.Layer(oci.TarBuilder().file("other", "x").bytes(), layer.blob, layer.media_type)
    with serve(FakeRegistry()) as registry:
        registry.add_image("app", "1", oci.Image((forged,), {"Cmd": ["sh"]}))
        with pytest.raises(DataLoss, match="uncompressed digest"):
            await ImagePuller(config(tmp_path, registry.host), AMD64).pull(
                f"{registry.host}/app:1")


async def test_refusals_by_name(tmp_path: Path) -> None:
    encrypted = oci.Layer(b"", b"\0" * 8, "application/vnd.oci.image.layer.v1.tar+gzip+encrypted")
    with serve(FakeRegistry()) as registry:
        registry.add_image("enc", "1", oci.Image((encrypted,), {"Cmd": ["sh"]}))
        registry.manifests["old:1"] = (json.dumps({"schemaVersion": 1, "name": "old"}).encode(),
                                       "application/vnd.docker.distribution.manifest.v1+json")
        cfg = config(tmp_path, registry.host)
        blocked = PullConfig(work_dir=tmp_path / "b", ca_bundle=None, registries=(
            RegistryRule(prefix=f"{registry.host}/secret", blocked=True, insecure=True),))
        puller = ImagePuller(cfg, AMD64)
        with pytest.raises(Unimplemented, match="encrypted"):
            await puller.pull(f"{registry.host}/enc:1")
        with pytest.raises(Unimplemented, match="schema 1"):
            await puller.pull(f"{registry.host}/old:1")
        with pytest.raises(NotFound, match="not found"):
            await puller.pull(f"{registry.host}/missing:1")
        with pytest.raises(PermissionDenied, match="blocked"):
            await ImagePuller(blocked, AMD64).pull(f"{registry.host}/secret/app:1")
        with pytest.raises(InvalidArgument, match="invalid"):
            await puller.pull("UPPER/Case")


async def test_a_hanging_registry_hits_the_pull_deadline_and_the_thread_stops(
    tmp_path: Path,
) -> None:
    hang = threading.Event()
    with serve(FakeRegistry(hang=hang)) as registry:
        puller = ImagePuller(config(tmp_path, registry.host, timeout=0.5), AMD64)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"within 0\.5 s"):
            await puller.pull(f"{registry.host}/app:1")
        assert time.monotonic() - started < 3


def test_cancel_token_unblocks_a_transfer_stuck_in_a_read(tmp_path: Path) -> None:
    """The socket timeout is long (30 s): cancel() must end the blocked read itself."""
    hang = threading.Event()
    with serve(FakeRegistry(hang=hang)) as registry:
        client = RegistryClient(config(tmp_path, registry.host, timeout=30.0), CancelToken())
        errors: list[BaseException] = []

        def fetch() -> None:
            try:
                client.fetch_manifest(parse_reference(f"{registry.host}/app:1"), "1")
            except BaseException as err:
                errors.append(err)

        worker = threading.Thread(target=fetch)
        worker.start()
        deadline = time.monotonic() + 5
        while not registry.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        client.token.cancel("test deadline")
        worker.join(5)
        assert not worker.is_alive() and time.monotonic() - started < 2
        assert isinstance(errors[0], Cancelled) and "test deadline" in str(errors[0])


async def test_plain_layers_are_hashed_once_and_still_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An uncompressed layer's diff ID is its blob digest: one SHA-256 pass, and a tampered
    blob or a config naming another diff ID is still refused."""
    import guest.image_pull.unpack as unpack_module

    class NoSecondPass:
        @staticmethod
        def sha256() -> object:
            raise AssertionError("a plain layer was hashed a second time")

    monkeypatch.setattr(unpack_module, "hashlib", NoSecondPass)
    tar = oci.TarBuilder().file("hello", "plain\n").bytes()
    plain = oci.Layer.plain(tar)
    forged = oci.Layer(oci.TarBuilder().file("other", "x").bytes(), tar, oci.LAYER_TAR)
    with serve(FakeRegistry()) as registry:
        registry.add_image("plain", "1", oci.Image((plain,), {"Cmd": ["sh"]}))
        registry.add_image("forged", "1", oci.Image((forged,), {"Cmd": ["sh"]}))
        registry.add_image("tampered", "1", oci.Image((plain,), {"Cmd": ["sh"]}))
        puller = ImagePuller(config(tmp_path, registry.host), AMD64)
        image = await puller.pull(f"{registry.host}/plain:1")
        assert (image.layers[0] / "hello").read_text() == "plain\n"
        assert puller.store.layer_diff_id(Digest.parse(plain.digest)) == plain.diff_id
        other = ImagePuller(config(tmp_path / "2", registry.host), AMD64)
        with pytest.raises(DataLoss, match="uncompressed digest"):
            await other.pull(f"{registry.host}/forged:1")
        registry.blobs[plain.digest] = tar[:-1] + b"\1"
        third = ImagePuller(config(tmp_path / "3", registry.host), AMD64)
        with pytest.raises(DataLoss, match=plain.digest):
            await third.pull(f"{registry.host}/tampered:1")
        assert third.store.layers() == [] and third.store.staging_entries() == []
