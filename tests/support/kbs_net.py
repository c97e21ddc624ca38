"""The reference KBS as the workload owner runs it for the proof and the demo: its own network
namespace, routed from the pod network through the host, HTTPS with a certificate from a test
CA (the CA reaches the guest through initdata's ``aa.toml``/``cdh.toml``), a fresh random
32-byte secret per run, and a resource policy bound to the digest of the pod's initdata.

Addressing (benchmarking range only, tests/support/netns.py ``host_link``): the KBS namespace
holds ``peer0`` 198.18.<subnet>.1/24 with a default route via 198.18.<subnet>.2, the host end
of its veth; the host routes 198.18.<subnet>.0/24 there by the connected route, and pods reach
it through their own gateway (a CNI bridge on the host, or a test's veth). The host forwards
IPv4 (``net.ipv4.ip_forward``; checked, never changed here).

Resources (``default/<type>/<tag>``):

- ``default/secret/proof``: the 32 secret bytes;
- ``default/secret/proof-text``: the same secret as hex text (an environment value must be
  text), the target of the sealed env value;
- ``default/sealing/pub``: the JWK that verifies sealed values (``kid`` of the JWS).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from tests.support import kbs as h
from tests.support.netns import host_link
from tests.support.pki import TestCA, make_ca

REPO = Path(__file__).resolve().parents[2]
PORT = 8443
SECRET_PATH = "default/secret/proof"
TEXT_PATH = "default/secret/proof-text"
SEALING_KID = "kbs:///default/sealing/pub"
_RELEASED = re.compile(r"released (\S+) \((\d+) bytes\) to (\S+) evidence with init-data (\S+)")


@dataclass(frozen=True)
class Release:
    path: str
    size: int
    tee: str
    init_data: str


@dataclass
class KbsService:
    netns: str
    ip: str
    url: str
    ca: TestCA
    secret: bytes
    initdata: str  # the TOML document the policy releases the resources to
    initdata_extra: str  # what the caller added to its cdh.toml (e.g. image settings)
    signing_key: ec.EllipticCurvePrivateKey
    log: Path
    resources: Path

    @property
    def initdata_digest(self) -> str:
        return h.digest_of(self.initdata)

    @property
    def secret_sha256(self) -> str:
        return hashlib.sha256(self.secret).hexdigest()

    @property
    def text_sha256(self) -> str:
        """SHA-256 of the sealed env value once unsealed (the secret as hex text)."""
        return hashlib.sha256(self.secret.hex().encode()).hexdigest()

    def other_initdata(self) -> str:
        """A valid initdata for the same KBS that the policy does not release anything to."""
        return h.initdata(self.url, cert=self.ca.cert_pem,
                          extra=self.initdata_extra + "# not the owner's document\n")

    def sealed_env_value(self) -> str:
        """A ``sealed.`` JWS (vault type, kbs provider) naming the text resource."""
        return h.seal(self.signing_key, SEALING_KID, f"kbs:///{TEXT_PATH}")

    def tampered_env_value(self) -> str:
        """A sealed value whose signature's last characters are changed (still well-formed)."""
        sealed = self.sealed_env_value()
        return sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")

    def releases(self) -> list[Release]:
        """What the KBS released, from its log."""
        text = self.log.read_text(errors="replace")
        return [Release(m[1], int(m[2]), m[3], m[4]) for m in _RELEASED.finditer(text)]


@contextlib.contextmanager
def kbs_service(workdir: Path, subnet: int, *, initdata_extra: str = "") -> Iterator[KbsService]:
    """Start the KBS in a fresh namespace routed from the host; remove everything after."""
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    if forward != "1":
        raise AssertionError("the host does not forward IPv4 (net.ipv4.ip_forward = 0): pods "
                             "cannot reach the KBS namespace; sysctl -w net.ipv4.ip_forward=1")
    workdir.mkdir(parents=True, exist_ok=True)
    ip = f"198.18.{subnet}.1"
    ca = make_ca(workdir / "ca")
    issued = ca.issue("kbs", ips=(ip,))
    url = f"https://{ip}:{PORT}"
    initdata = h.initdata(url, cert=ca.cert_pem, extra=initdata_extra)
    secret = os.urandom(32)
    signer = h.signing_key()
    resources = workdir / "resources"
    h.put_resource(resources, SECRET_PATH, secret)
    h.put_resource(resources, TEXT_PATH, secret.hex().encode())
    h.put_resource(resources, "default/sealing/pub", h.verification_jwk(signer))
    policy = workdir / "policy.toml"
    policy.write_text(h.policy({"default/*/*": [h.digest_of(initdata)]}))
    log = workdir / "kbs.log"
    with host_link(subnet) as link, _kbs_process(link.peer, ip, resources, policy, issued.cert,
                                                 issued.key, log):
        yield KbsService(link.peer, ip, url, ca, secret, initdata, initdata_extra, signer, log,
                         resources)


@contextlib.contextmanager
def _kbs_process(netns: str, ip: str, resources: Path, policy: Path, cert: Path, key: Path,
                 log: Path) -> Iterator[None]:
    with log.open("wb") as err:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "kbs", "--listen",
             f"{ip}:{PORT}", "--resources", str(resources), "--policy", str(policy),
             "--tls-cert", str(cert), "--tls-key", str(key)],
            stdout=subprocess.PIPE, stderr=err, cwd=REPO)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # "" if it exits
        if not line.startswith("kbs: listening on https://"):
            raise AssertionError(f"the KBS did not start: {line!r} "
                                 f"{log.read_text(errors='replace')}")
        yield
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
