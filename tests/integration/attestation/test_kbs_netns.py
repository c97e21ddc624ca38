"""The reference KBS as its own process in a network namespace (HTTPS on 198.18.x.1) and the
guest's attestation agent + data hub as a real client process in a second namespace: auth →
attest → resource, an initdata the KBS does not expect → 403, sealed values, the loopback-only
resource endpoint."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import kbs as h
from tests.support.netns import VethPair, veth_pair

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]
PORT = 8080
WAIT = 20.0


def tls_pair(ip: str, directory: Path) -> tuple[Path, Path, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coco reference kbs")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    (directory / "cert.pem").write_text(pem)
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return directory / "cert.pem", directory / "key.pem", pem


@dataclass
class Setup:
    net: VethPair
    url: str
    cert_pem: str
    resources: Path
    good: Path  # initdata dir the KBS policy expects
    bad: Path  # another initdata
    secret: bytes
    signing_key: ec.EllipticCurvePrivateKey


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, *argv]


def guest_cli(s: Setup, initdata: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        in_ns(s.net.pod, "-m", "guest.attestation", "--initdata-dir", str(initdata),
              "--tee", "sample", *args),
        capture_output=True, timeout=60, cwd=REPO, check=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp(f"kbs-netns-{os.getpid()}")
    with veth_pair(subnet=77) as net:
        url = f"https://{net.peer_ip}:{PORT}"
        cert, key, pem = tls_pair(net.peer_ip, tmp)
        good_toml = h.initdata(url, cert=pem)
        bad_toml = h.initdata(url, cert=pem, extra="# another document\n")
        good = h.write_initdata_dir(tmp / "good", good_toml)
        bad = h.write_initdata_dir(tmp / "bad", bad_toml)
        resources = tmp / "resources"
        secret = os.urandom(32)
        signer = h.signing_key()
        h.put_resource(resources, "default/secret/one", secret)
        h.put_resource(resources, "default/secret/text", secret.hex().encode())
        h.put_resource(resources, "default/sealing/pub", h.verification_jwk(signer))
        policy = tmp / "policy.toml"
        policy.write_text(h.policy({"default/*/*": [h.digest_of(good_toml)]}))
        kbs = subprocess.Popen(
            in_ns(net.peer, "-m", "kbs", "--listen", f"{net.peer_ip}:{PORT}", "--resources",
                  str(resources), "--policy", str(policy), "--tls-cert", str(cert),
                  "--tls-key", str(key)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        try:
            assert kbs.stdout is not None
            line = kbs.stdout.readline().decode()
            assert line.startswith("kbs: listening on https://"), kbs.stderr.read() if \
                kbs.stderr else line
            yield Setup(net, url, pem, resources, good, bad, secret, signer)
        finally:
            kbs.terminate()
            kbs.wait(timeout=10)


def test_auth_attest_resource_over_https(setup: Setup) -> None:
    done = guest_cli(setup, setup.good, "resource", "kbs:///default/secret/one")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == setup.secret
    assert b"attested to https://198.18.77.1:8080 as sample" in done.stderr


def test_guest_side_on_the_guest_images_python(setup: Setup, tmp_path: Path) -> None:
    """The guest runs bookworm's python3.11 -S with Debian's python3-cryptography 38 and
    rfc8785 vendored from the venv (guest/image/build.py): the same client, that way."""
    import rfc8785

    vendored = tmp_path / "vendored"
    shutil.copytree(Path(rfc8785.__file__).parent, vendored / "rfc8785")
    debian_python = Path("/usr/bin/python3.11")
    assert Path("/usr/lib/python3/dist-packages/cryptography").is_dir(), (
        "python3-cryptography missing: apt-get install python3-cryptography (make env)")
    done = subprocess.run(
        ["ip", "netns", "exec", setup.net.pod, "env",
         f"PYTHONPATH={REPO}:/usr/lib/python3/dist-packages:{vendored}",
         str(debian_python), "-S", "-m", "guest.attestation", "--initdata-dir",
         str(setup.good), "--tee", "sample", "resource", "kbs:///default/secret/one"],
        capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == setup.secret


def test_initdata_mismatch_is_a_clear_403(setup: Setup) -> None:
    done = guest_cli(setup, setup.bad, "resource", "kbs:///default/secret/one")
    assert done.returncode == 3
    assert setup.secret not in done.stdout + done.stderr
    err = done.stderr.decode()
    assert "KBS resource failed: HTTP 403 PolicyDeny: Access denied by policy" in err
    assert "released only to init-data sha384:" in err


def test_sealed_value_unsealed_and_tampered_refused(setup: Setup) -> None:
    sealed = h.seal(setup.signing_key, "kbs:///default/sealing/pub",
                    "kbs:///default/secret/text")
    done = guest_cli(setup, setup.good, "unseal", sealed)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == setup.secret.hex().encode()
    tampered = sealed[:-6] + ("AAAAAA" if not sealed.endswith("AAAAAA") else "BBBBBB")
    refused = guest_cli(setup, setup.good, "unseal", tampered)
    assert refused.returncode == 1
    assert b"sealed secret refused" in refused.stderr
    assert setup.secret.hex().encode() not in refused.stdout


def test_wrong_kbs_certificate_is_refused(setup: Setup, tmp_path: Path) -> None:
    _, _, other_pem = tls_pair(setup.net.peer_ip, tmp_path)
    toml = h.initdata(setup.url, cert=other_pem)
    done = guest_cli(setup, h.write_initdata_dir(tmp_path / "init", toml), "resource",
                     "kbs:///default/secret/one")
    assert done.returncode == 1
    assert b"CERTIFICATE_VERIFY_FAILED" in done.stderr


def test_resource_endpoint_is_loopback_only(setup: Setup) -> None:
    server = subprocess.Popen(
        in_ns(setup.net.pod, "-m", "guest.attestation", "--initdata-dir", str(setup.good),
              "--tee", "sample", "serve"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().decode().startswith("serving on 127.0.0.1:8006")
        fetch = ("import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen("
                 "'http://127.0.0.1:8006/cdh/resource/default/secret/one', timeout=20).read())")
        got = subprocess.run(in_ns(setup.net.pod, "-c", fetch), capture_output=True,
                             timeout=60, check=False)
        assert got.returncode == 0, got.stderr.decode()
        assert got.stdout == setup.secret
        probe = ("import socket, sys; s = socket.socket(); s.settimeout(5)\n"
                 f"sys.exit(s.connect_ex(('{setup.net.pod_ip}', 8006)))")
        deadline = time.monotonic() + WAIT
        refused = subprocess.run(in_ns(setup.net.peer, "-c", probe), capture_output=True,
                                 timeout=deadline - time.monotonic(), check=False)
        assert refused.returncode != 0  # from the KBS's side of the wire: nothing listens
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_kbs_refuses_a_bad_policy_file(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('[resources."a/b/c"]\ninit_data = ["md5:00"]\n')
    done = subprocess.run([sys.executable, "-m", "kbs", "--listen", "127.0.0.1:0",
                           "--resources", str(tmp_path), "--policy", str(policy)],
                          capture_output=True, timeout=30, cwd=REPO, check=False)
    assert done.returncode == 2
    assert b"bad digest 'md5:00'" in done.stderr
