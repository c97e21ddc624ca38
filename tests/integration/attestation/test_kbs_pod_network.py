"""The proof's KBS (tests/support/kbs_net.py) is reachable from a pod network through the host's
routing, over TLS from a test CA handed to the guest side in initdata; the secret it releases
never crosses the pod's wire in plaintext (tcpdump of the pod's veth, scanned).

The "pod" here is a network namespace wired to the host the way a CNI bridge's pod is (a veth
whose host end is its gateway), running the guest's attestation agent and data hub as real
processes: the CRI e2e proof (tests/e2e/test_secret_proof.py) runs the same KBS for a pod VM.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import kbs as h
from tests.support.capture import capture, packet_count
from tests.support.kbs_net import SECRET_PATH, KbsService, kbs_service
from tests.support.netns import sh
from tests.support.secret_scan import Source, scan

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]
POD_SUBNET = 78
KBS_SUBNET = 79
FETCH = ("import hashlib, sys, urllib.request\n"
         "try:\n"
         "    body = urllib.request.urlopen('http://127.0.0.1:8006/cdh/resource/" + SECRET_PATH
         + "', timeout=30).read()\n"
         "except urllib.error.HTTPError as err:\n"
         "    print('HTTP', err.code, err.read().decode()); sys.exit(1)\n"
         "print(hashlib.sha256(body).hexdigest())\n")


@dataclass
class PodNet:
    netns: str
    ip: str


@pytest.fixture(scope="module")
def pod() -> Iterator[PodNet]:
    tag = uuid.uuid4().hex[:6]
    netns, host_end = f"coco-ppod-{tag}", f"ppod{tag}h"
    gateway, ip = f"198.18.{POD_SUBNET}.1", f"198.18.{POD_SUBNET}.2"
    try:
        sh("ip", "netns", "add", netns)
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", netns)
        sh("ip", "addr", "add", f"{gateway}/24", "dev", host_end)
        sh("ip", "link", "set", host_end, "up")
        sh("ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        for dev in ("eth0", "lo"):
            sh("ip", "-n", netns, "link", "set", dev, "up")
        sh("ip", "-n", netns, "route", "add", "default", "via", gateway)
        yield PodNet(netns, ip)
    finally:
        sh("ip", "link", "del", host_end, check=False)
        sh("ip", "netns", "del", netns, check=False)


@pytest.fixture(scope="module")
def kbs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KbsService]:
    with kbs_service(tmp_path_factory.mktemp(f"kbs-pod-{os.getpid()}"), KBS_SUBNET) as service:
        yield service


def endpoint_fetch(pod: PodNet, initdata: Path) -> subprocess.CompletedProcess[bytes]:
    """The data hub's endpoint in the pod namespace, and a client there printing the SHA-256
    of what it got (the way the e2e proof's container does)."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", pod.netns, sys.executable, "-m", "guest.attestation",
         "--initdata-dir", str(initdata), "--tee", "sample", "serve"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        assert server.stdout is not None
        line = server.stdout.readline().decode()
        assert line.startswith("serving on 127.0.0.1:8006"), \
            line + (server.stderr.read().decode() if server.stderr else "")
        return subprocess.run(["ip", "netns", "exec", pod.netns, sys.executable, "-c", FETCH],
                              capture_output=True, timeout=60, check=False)
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_secret_released_through_the_pod_network_and_never_plain_on_its_wire(
        pod: PodNet, kbs: KbsService, tmp_path: Path) -> None:
    initdata = h.write_initdata_dir(tmp_path / "initdata", kbs.initdata)
    pcap = tmp_path / "pod.pcap"
    with capture(pcap, "eth0", pod.netns):
        done = endpoint_fetch(pod, initdata)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert done.stdout.decode().strip() == kbs.secret_sha256
    assert packet_count(pcap) > 10  # the TLS exchange crossed the captured wire
    assert scan(kbs.secret, [Source.file(pcap, "pod veth capture")]) == []
    released = [r for r in kbs.releases() if r.path == SECRET_PATH]
    assert released and released[-1].tee == "sample"
    assert released[-1].init_data == kbs.initdata_digest
    assert hashlib.sha256(kbs.secret).hexdigest() == kbs.secret_sha256


def test_other_initdata_gets_a_403_in_the_clients_output(
        pod: PodNet, kbs: KbsService, tmp_path: Path) -> None:
    initdata = h.write_initdata_dir(tmp_path / "initdata", kbs.other_initdata())
    done = endpoint_fetch(pod, initdata)
    assert done.returncode == 1
    out = done.stdout.decode()
    assert out.startswith("HTTP 403"), out
    assert "PolicyDeny" in out or "denied" in out.lower(), out
    assert scan(kbs.secret, [Source.of("client output", done.stdout + done.stderr)]) == []


def test_sealed_value_unsealed_and_tampered_refused(
        pod: PodNet, kbs: KbsService, tmp_path: Path) -> None:
    initdata = h.write_initdata_dir(tmp_path / "initdata", kbs.initdata)

    def unseal(value: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ip", "netns", "exec", pod.netns, sys.executable, "-m", "guest.attestation",
             "--initdata-dir", str(initdata), "--tee", "sample", "unseal", value],
            capture_output=True, timeout=60, cwd=REPO, check=False)

    good = unseal(kbs.sealed_env_value())
    assert good.returncode == 0, good.stderr.decode()
    assert hashlib.sha256(good.stdout).hexdigest() == kbs.text_sha256
    bad = unseal(kbs.tampered_env_value())
    assert bad.returncode == 1
    assert b"sealed secret refused" in bad.stderr
