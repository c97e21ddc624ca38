"""Real registries for the guest-pull tests: Debian's ``docker-registry`` (distribution 2.8).

:func:`registry_env` makes a pod/peer pair of network namespaces (tests/support/netns.py,
198.18.<subnet>.0/24) and starts, in the peer namespace at 198.18.<subnet>.1:

- a **TLS** registry on :5000, certificate from a test CA (``cryptography``), requiring bearer
  tokens from a token service on :5001 (tests/support/token_server.py): anonymous pulls get a
  pull token, the push user everything;
- a **plain-HTTP** registry on :5002, anonymous, for the "insecure registry" case.

Each registry's access log (who fetched which path, from which address) is parsed by
:meth:`Registry.access_log`; :meth:`Registry.corrupted` flips bytes of a stored blob (same size)
and restores it. Images are pushed with skopeo running in the peer namespace. Everything
(processes, namespaces, files) is removed on exit.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.netns import VethPair, veth_pair
from tests.support.oci import Image, write_oci_archive
from tests.support.pki import TestCA, make_ca

REGISTRY_BIN = Path("/usr/bin/docker-registry")
SKOPEO = Path("/usr/bin/skopeo")
INSTALL = "apt-get install -y docker-registry skopeo (or: make env)"
READY_TIMEOUT = 20.0
REPO = Path(__file__).resolve().parents[2]
ISSUER = "coco-test-issuer"
SERVICE = "coco-test-registry"
PUSH_USER = ("pusher", "push-secret")

_ACCESS = re.compile(r'^(\S+) - \S+ \[[^\]]+\] "(\w+) (\S+) [^"]*" (\d{3}) ')


def require(tool: Path) -> None:
    """Integration tests fail (never skip) when a tool is missing, naming the fix."""
    if not tool.exists():
        raise AssertionError(f"{tool} is missing: {INSTALL}")


@dataclass(frozen=True)
class Access:
    remote: str
    method: str
    path: str
    status: int

    @property
    def blob(self) -> str | None:
        """The digest of a blob GET, else None."""
        match = re.search(r"/blobs/(sha256:[0-9a-f]{64})$", self.path)
        return match.group(1) if match and self.method == "GET" else None


@dataclass
class Registry:
    name: str
    netns: str
    address: str
    port: int
    tls: bool
    storage: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"{self.address}:{self.port}"

    def ref(self, repository: str, tag: str = "latest") -> str:
        return f"{self.host}/{repository}:{tag}"

    def access_log(self) -> list[Access]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            match = _ACCESS.match(line)
            if match:
                remote, method, path, status = match.groups()
                out.append(Access(remote, method, path, int(status)))
        return out

    def blob_fetches(self, since: int = 0) -> list[Access]:
        """Successful blob GETs after the first ``since`` log entries."""
        return [a for a in self.access_log()[since:] if a.blob and a.status in (200, 307)]

    def blob_path(self, digest: str) -> Path:
        hex_ = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"

    @contextlib.contextmanager
    def corrupted(self, digest: str) -> Iterator[None]:
        """The stored blob with flipped bytes in the middle (same size), restored afterwards."""
        path = self.blob_path(digest)
        original = path.read_bytes()
        middle = len(original) // 2
        damaged = bytearray(original)
        for i in range(middle, min(middle + 16, len(damaged))):
            damaged[i] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            yield
        finally:
            path.write_bytes(original)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class RegistryEnv:
    pair: VethPair
    folder: Path
    ca: TestCA
    secure: Registry
    plain: Registry
    token_log: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def peer_ip(self) -> str:
        return self.pair.peer_ip

    def guest_pull_toml(self, work_dir: Path, *, timeout: float = 60,
                        insecure: bool = True) -> str:
        """The guest configuration a test agent needs: the test CA, the plain registry
        marked insecure, a work directory and a pull timeout."""
        registries = (f'[[image.registry_config.registry]]\nlocation = "{self.plain.host}"\n'
                      "insecure = true\n") if insecure else ""
        return (
            "[image]\n"
            f'work_dir = "{work_dir}"\n'
            f"image_pull_timeout = {timeout}\n"
            "registry_connect_timeout = 2\n"
            f"extra_root_certificates = [\"\"\"\n{self.ca.cert_pem}\"\"\"]\n"
            f"{registries}"
        )

    def containerd_hosts(self, config_dir: Path) -> Path:
        """A containerd ``config_path`` directory (``hosts.toml`` per registry) that lets the
        host's containerd pull from both registries: the TLS one against the test CA, the
        plain one over HTTP. CRI pulls on the host too (image metadata)."""
        for reg in (self.secure, self.plain):
            folder = config_dir / reg.host
            folder.mkdir(parents=True, exist_ok=True)
            scheme = "https" if reg.tls else "http"
            ca = f'  ca = "{self.ca.cert_path}"\n' if reg.tls else ""
            (folder / "hosts.toml").write_text(
                f'server = "{scheme}://{reg.host}"\n'
                f'[host."{scheme}://{reg.host}"]\n'
                '  capabilities = ["pull", "resolve"]\n' + ca)
        return config_dir

    def token_requests(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.token_log.read_text().splitlines() if line]

    def push(self, images: list[Image], registry: Registry, repository: str,
             tag: str = "latest") -> str:
        """Push an image (or, with several, an index of platforms); return its reference."""
        archive = self.folder / f"push-{repository.replace('/', '_')}-{tag}.tar"
        write_oci_archive(archive, images, index=len(images) > 1)
        ref = registry.ref(repository, tag)
        argv = ["ip", "netns", "exec", self.pair.peer, str(SKOPEO), "--insecure-policy", "copy",
                "--quiet", "--all", "--preserve-digests"]
        if registry.tls:
            argv += ["--dest-cert-dir", str(self.folder / "certs.d"),
                     "--dest-creds", ":".join(PUSH_USER)]
        else:
            argv += ["--dest-tls-verify=false"]
        argv += [f"oci-archive:{archive}", f"docker://{ref}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        archive.unlink()
        if done.returncode != 0:
            raise AssertionError(f"skopeo push of {ref} failed: {done.stderr.strip()}")
        return ref


def _registry_config(reg: Registry, folder: Path, *, cert: Path | None = None,
                     key: Path | None = None, token_realm: str | None = None,
                     bundle: Path | None = None) -> Path:
    lines = [
        "version: 0.1",
        "log:",
        "  level: info",
        "  formatter: text",
        "  accesslog:",
        "    disabled: false",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {reg.storage}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: {reg.host}",
        f"  secret: coco-test-{reg.name}",
    ]
    if cert is not None and key is not None:
        lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
    if token_realm is not None:
        lines += ["auth:", "  token:", f"    realm: {token_realm}", f"    service: {SERVICE}",
                  f"    issuer: {ISSUER}", f"    rootcertbundle: {bundle}"]
    path = folder / f"{reg.name}.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _wait_for(log: Path, marker: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while marker not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{log.name}: not ready:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)


def _spawn(netns: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ip", "netns", "exec", netns, *argv], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, cwd=REPO)


@contextlib.contextmanager
def registry_env(subnet: int = 77, *,
                 link: Callable[[int], AbstractContextManager[VethPair]] = veth_pair
                 ) -> Iterator[RegistryEnv]:
    """``link`` makes the registries' namespace: by default a pod/peer pair
    (tests/support/netns.py ``veth_pair``); ``host_link`` wires the peer to the host instead,
    so pods on a CNI bridge reach it through the host's routing."""
    require(REGISTRY_BIN)
    require(SKOPEO)
    folder = Path(tempfile.mkdtemp(prefix="coco-registry-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with link(subnet) as pair:
            ca = make_ca(folder / "pki")
            ip = pair.peer_ip
            server = ca.issue("registry", ips=(ip,))
            signing = ca.issue("token-signing", server=False)
            (folder / "certs.d").mkdir()
            shutil.copy(ca.cert_path, folder / "certs.d" / "ca.crt")
            secure = Registry("secure", pair.peer, ip, 5000, True, folder / "secure-data",
                              folder / "secure.log")
            plain = Registry("plain", pair.peer, ip, 5002, False, folder / "plain-data",
                             folder / "plain.log")
            token_log = folder / "token-requests.jsonl"
            token_log.touch()
            token_out = folder / "token-server.log"
            token = _spawn(pair.peer, [
                sys.executable, "-m", "tests.support.token_server",
                "--cert", str(server.cert), "--key", str(server.key),
                "--signing-cert", str(signing.cert), "--signing-key", str(signing.key),
                "--listen", f"{ip}:5001", "--issuer", ISSUER, "--service", SERVICE,
                "--user", ":".join(PUSH_USER), "--log", str(token_log),
            ], token_out)
            processes.append(token)
            for reg, config in (
                (secure, _registry_config(secure, folder, cert=server.cert, key=server.key,
                                          token_realm=f"https://{ip}:5001/token",
                                          bundle=ca.cert_path)),
                (plain, _registry_config(plain, folder)),
            ):
                reg.process = _spawn(pair.peer, [str(REGISTRY_BIN), "serve", str(config)],
                                     reg.log)
                processes.append(reg.process)
            _wait_for(token_out, "token server ready", token)
            for reg in (secure, plain):
                assert reg.process is not None
                _wait_for(reg.log, "listening on", reg.process)
            yield RegistryEnv(pair, folder, ca, secure, plain, token_log, processes)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        shutil.rmtree(folder, ignore_errors=True)
