"""The reference KBS (kbs/) and the guest's attestation agent + data hub (guest.attestation),
end to end over loopback HTTP in one process: trustee's protocol, errors and policy."""

from __future__ import annotations

import http.client
import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guest.attestation import config
from guest.attestation.attesters import SampleAttester
from guest.attestation.cdh import DataHub
from guest.attestation.client import KbsClient
from guest.attestation.components import GuestComponents
from guest.attestation.errors import (
    AttestationError,
    ConfigError,
    KbsError,
    KbsUnreachable,
    SealedSecretError,
)
from guest.attestation.server import ResourceServer
from guest.tee import Tee
from kbs.core import ConfigError as PolicyError
from kbs.core import Kbs, Policy
from kbs.server import KbsHttpServer
from protocols.kbs import ResourceUri
from tests.support import kbs as h

SECRET = b"\x00top secret\xff" * 3


class RunningKbs:
    def __init__(self, tmp: Path, resources: dict[str, list[str]]) -> None:
        self.resources = tmp / "resources"
        self.resources.mkdir()
        self.kbs = Kbs(Policy.parse(h.policy(resources)), self.resources)
        self.server = KbsHttpServer(("127.0.0.1", 0), self.kbs)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread: threading.Thread | None = None

    def __enter__(self) -> RunningKbs:
        self.thread = self.server.serve_in_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        assert self.thread is not None
        self.thread.join()
        self.server.server_close()


@pytest.fixture
def good_initdata() -> str:
    return h.initdata("http://placeholder")


@pytest.fixture
def kbs(tmp_path: Path, good_initdata: str) -> Iterator[RunningKbs]:
    digest = h.digest_of(good_initdata)
    with RunningKbs(tmp_path, {"default/secret/one": [digest],
                               "default/sealing/*": [digest]}) as running:
        h.put_resource(running.resources, "default/secret/one", SECRET)
        yield running


def client(kbs: RunningKbs, initdata: str | None, attester: Any = None) -> KbsClient:
    return KbsClient(kbs.url, attester or SampleAttester(), initdata_toml=initdata, timeout=5)


def post(url: str, path: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(url + "/kbs/v0" + path, json.dumps(body).encode(),
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_auth_attest_resource(kbs: RunningKbs, good_initdata: str) -> None:
    c = client(kbs, good_initdata)
    assert c.resource(ResourceUri.from_path("default/secret/one")) == SECRET
    token = c.attest()
    assert token.count(".") == 2


def test_version_mismatch_is_a_401_attestation_error(kbs: RunningKbs) -> None:
    status, body = post(kbs.url, "/auth", {"version": "0.3.0", "tee": "sample",
                                           "extra-params": {}})
    assert status == 401
    assert body["type"].endswith("/errors/AttestationError")
    assert "Version Mismatch: expect =0.4.0 while the request is 0.3.0" in body["detail"]


def test_initdata_mismatch_is_403_policy_deny(kbs: RunningKbs) -> None:
    other = h.initdata("http://elsewhere")
    with pytest.raises(KbsError) as caught:
        client(kbs, other).resource(ResourceUri.from_path("default/secret/one"))
    err = caught.value
    assert (err.status, err.name, err.denied) == (403, "PolicyDeny", True)
    assert "released only to init-data sha384:" in str(err)
    assert h.digest_of(other) in str(err)


def test_no_initdata_and_unknown_resource_are_denied(kbs: RunningKbs,
                                                      good_initdata: str) -> None:
    with pytest.raises(KbsError, match="this evidence has no init-data"):
        client(kbs, None).resource(ResourceUri.from_path("default/secret/one"))
    with pytest.raises(KbsError, match="no rule releases default/secret/two"):
        client(kbs, good_initdata).resource(ResourceUri.from_path("default/secret/two"))


def test_missing_resource_is_404(kbs: RunningKbs, good_initdata: str) -> None:
    with pytest.raises(KbsError) as caught:
        client(kbs, good_initdata).resource(ResourceUri.from_path("default/sealing/absent"))
    assert caught.value.status == 404


def test_resource_without_token_is_401_token_not_found(kbs: RunningKbs) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", kbs.server.server_address[1],
                                            timeout=5)
    connection.request("GET", "/kbs/v0/resource/default/secret/one")
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == 401
    assert body["type"].endswith("/errors/TokenNotFound")


def test_attest_without_cookie_and_with_wrong_nonce(kbs: RunningKbs) -> None:
    status, body = post(kbs.url, "/attest", {})
    assert (status, body["detail"]) == (401, "RCAR handshake Attest failed: cookie not found")


class LyingAttester(SampleAttester):
    def evidence(self, report_data: bytes) -> dict[str, Any]:
        return super().evidence(b"\0" * len(report_data))


def test_evidence_not_binding_the_key_is_refused(kbs: RunningKbs, good_initdata: str) -> None:
    with pytest.raises(KbsError, match="REPORT_DATA is different from that in Sample Quote"):
        client(kbs, good_initdata, LyingAttester()).attest()


def test_expired_session_reattests_once(kbs: RunningKbs, good_initdata: str) -> None:
    c = client(kbs, good_initdata)
    uri = ResourceUri.from_path("default/secret/one")
    assert c.resource(uri) == SECRET
    first = c.attest()
    kbs.kbs._sessions.clear()  # the KBS forgot every session (restart, timeout)
    assert c.resource(uri) == SECRET
    assert c.attest() != first


def test_unreachable_kbs_is_named() -> None:
    c = KbsClient("http://127.0.0.1:9", SampleAttester(), timeout=2)
    with pytest.raises(KbsUnreachable, match=r"cannot reach http://127.0.0.1:9"):
        c.attest()


def test_policy_file_errors() -> None:
    with pytest.raises(PolicyError, match="bad digest"):
        Policy.parse('[resources."a/b/c"]\ninit_data = ["sha384:12"]\n')
    with pytest.raises(PolicyError, match="unknown keys: extra"):
        Policy.parse("extra = 1\n")
    with pytest.raises(PolicyError, match="TEE names"):
        Policy.parse('tees = ["tpm2"]\n')


# -- sealed secrets and the data hub ------------------------------------------------------


@pytest.fixture
def hub(kbs: RunningKbs, good_initdata: str) -> tuple[DataHub, Any]:
    key = h.signing_key()
    h.put_resource(kbs.resources, "default/sealing/pub", h.verification_jwk(key))
    c = client(kbs, good_initdata)
    return DataHub(c.resource), key


def test_sealed_env_value_is_unsealed(hub: tuple[DataHub, Any]) -> None:
    data_hub, key = hub
    sealed = h.seal(key, "kbs:///default/sealing/pub", "kbs:///default/secret/one")
    assert data_hub.unseal(sealed) == SECRET
    spec = {"process": {"env": ["A=1", f"B={sealed}"]}}
    with pytest.raises(SealedSecretError, match="env B: the unsealed value is not UTF-8"):
        data_hub.unseal_spec(spec, Path("/nonexistent"))


def test_sealed_env_text(kbs: RunningKbs, hub: tuple[DataHub, Any], tmp_path: Path) -> None:
    data_hub, key = hub
    h.put_resource(kbs.resources, "default/sealing/text", b"s3cr3t value")
    sealed = h.seal(key, "kbs:///default/sealing/pub", "kbs:///default/sealing/text")
    spec: dict[str, Any] = {"process": {"env": ["PATH=/bin", f"TOKEN={sealed}"]}, "mounts": []}
    out = data_hub.unseal_spec(spec, tmp_path / "secrets")
    assert out["process"]["env"] == ["PATH=/bin", "TOKEN=s3cr3t value"]
    assert spec["process"]["env"][1] == f"TOKEN={sealed}"  # the input is not modified
    unchanged = {"process": {"env": ["A=1"]}}
    assert data_hub.unseal_spec(unchanged, tmp_path / "none") is unchanged


@pytest.mark.parametrize("offset", [10, 120, -5])  # header, payload, signature
def test_tampered_sealed_value_is_refused(hub: tuple[DataHub, Any], offset: int) -> None:
    data_hub, key = hub
    sealed = h.seal(key, "kbs:///default/sealing/pub", "kbs:///default/secret/one")
    chars = list(sealed)
    chars[offset] = "A" if chars[offset] != "A" else "B"
    with pytest.raises(SealedSecretError):
        data_hub.unseal("".join(chars))


def test_sealed_with_another_key_or_type_is_refused(hub: tuple[DataHub, Any]) -> None:
    data_hub, _ = hub
    stranger = h.seal(h.signing_key(), "kbs:///default/sealing/pub",
                      "kbs:///default/secret/one")
    with pytest.raises(SealedSecretError, match="signature does not verify"):
        data_hub.unseal(stranger)
    key = hub[1]
    envelope = h.seal(key, "kbs:///default/sealing/pub", "kbs:///default/secret/one",
                      kind="envelope")
    with pytest.raises(SealedSecretError, match="type 'envelope' is not supported"):
        data_hub.unseal(envelope)
    with pytest.raises(SealedSecretError, match="3 parts"):
        data_hub.unseal("sealed.abc.def")


def test_local_signing_key_and_traversal(tmp_path: Path, hub: tuple[DataHub, Any]) -> None:
    data_hub, key = hub
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "mykey").write_bytes(h.verification_jwk(key))
    local = DataHub(data_hub._get, signing_keys=keys)
    assert local.unseal(h.seal(key, "mykey", "kbs:///default/secret/one")) == SECRET
    with pytest.raises(SealedSecretError, match="escapes"):
        local.unseal(h.seal(key, "../etc/passwd", "kbs:///default/secret/one"))


def test_sealed_mounted_file_and_secret_volume(kbs: RunningKbs, hub: tuple[DataHub, Any],
                                               tmp_path: Path) -> None:
    data_hub, key = hub
    h.put_resource(kbs.resources, "default/sealing/text", b"file secret")
    sealed = h.seal(key, "kbs:///default/sealing/pub", "kbs:///default/sealing/text")
    single = tmp_path / "single"
    single.write_text(sealed)
    volume = tmp_path / "volume"
    (volume / "..2026_data").mkdir(parents=True)
    (volume / "..2026_data" / "password").write_text(sealed)
    (volume / "..2026_data" / "plain").write_text("not sealed")
    (volume / "..data").symlink_to("..2026_data")
    (volume / "password").symlink_to("..data/password")
    (volume / "plain").symlink_to("..data/plain")
    spec: dict[str, Any] = {"process": {"env": []}, "mounts": [
        {"destination": "/etc/one", "type": "bind", "source": str(single), "options": ["ro"]},
        {"destination": "/secrets", "type": "bind", "source": str(volume),
         "options": ["rbind"]},
        {"destination": "/proc", "type": "proc", "source": "proc"},
    ]}
    out = data_hub.unseal_spec(spec, tmp_path / "unsealed")
    one, vol, proc = out["mounts"]
    assert Path(one["source"]).read_bytes() == b"file secret"
    assert Path(vol["source"], "password").read_bytes() == b"file secret"
    assert Path(vol["source"], "plain").read_text() == "not sealed"
    assert proc == spec["mounts"][2]
    assert single.read_text() == sealed  # the host's copy stays sealed
    assert (tmp_path / "unsealed").stat().st_mode & 0o777 == 0o700


def test_registry_auth(kbs: RunningKbs, good_initdata: str) -> None:
    auths = {"auths": {"registry.test:5000": {"auth": "dXNlcjpwYXNz"}}}
    h.put_resource(kbs.resources, "default/sealing/creds", json.dumps(auths).encode())
    h.put_resource(kbs.resources, "default/sealing/ca", b"-----BEGIN CERTIFICATE-----\nX\n")
    settings = config.parse(None, (
        '[kbc]\nurl = "http://x"\n[image]\n'
        'authenticated_registry_credentials_uri = "kbs:///default/sealing/creds"\n'
        'extra_root_certificates = ["kbs:///default/sealing/ca"]\n'))
    data_hub = DataHub(client(kbs, good_initdata).resource, settings.image)
    auth = data_hub.registry_auth("registry.test:5000")
    assert auth is not None
    assert (auth.username, auth.password) == ("user", "pass")
    assert auth.ca_pems == ("-----BEGIN CERTIFICATE-----\nX\n",)
    other = data_hub.registry_auth("elsewhere.test")
    assert other is not None and other.username is None
    assert DataHub(None).registry_auth("x") is None


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"cdh.toml kbc.url must be an http"):
        config.parse(None, '[kbc]\nurl = "ftp://x"\n')
    with pytest.raises(ConfigError, match=r"kbc.name 'offline_fs_kbc' is not supported"):
        config.parse(None, '[kbc]\nname = "offline_fs_kbc"\nurl = "http://x"\n')
    with pytest.raises(ConfigError, match=r"aa.toml is not valid TOML"):
        config.parse("[[", None)
    with pytest.raises(ConfigError, match=r"must be a PEM certificate"):
        config.parse('[token_configs.kbs]\nurl = "https://x"\ncert = "nope"\n', None)
    with pytest.raises(ConfigError, match=r"no KBS is configured"):
        DataHub(None).resource("kbs:///a/b/c")


def test_resource_endpoint(kbs: RunningKbs, tmp_path: Path) -> None:
    toml = h.initdata(kbs.url)
    kbs.kbs.policy.resources["default/secret/one"] = frozenset({h.digest_of(toml)})
    components = GuestComponents.start(h.write_initdata_dir(tmp_path / "initdata", toml),
                                       tee=Tee.SAMPLE, address=("127.0.0.1", 0))
    try:
        assert components.endpoint is not None
        base = f"http://127.0.0.1:{components.endpoint.port}"
        with urllib.request.urlopen(base + "/cdh/resource/default/secret/one",
                                    timeout=5) as response:
            assert response.read() == SECRET
        for path, status in (("/cdh/resource/default/secret/two", 403),
                             ("/cdh/resource/a/../b", 400), ("/aa/token", 404)):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(base + path, timeout=5)
            assert caught.value.code == status, path
    finally:
        components.close()


def test_endpoint_refuses_a_non_loopback_address() -> None:
    with pytest.raises(ValueError, match="loopback only"):
        ResourceServer(DataHub(None), ("0.0.0.0", 8006))


def test_unseal_without_kbs_is_a_clear_error() -> None:
    with pytest.raises(AttestationError, match=r"no KBS is configured"):
        DataHub(None).unseal(h.seal(h.signing_key(), "kbs:///a/b/c", "kbs:///a/b/d"))
