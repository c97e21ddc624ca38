"""Everything the secret proof (tests/e2e/test_secret_proof.py) and `make demo`'s confidential
flow run against, all real:

- the workload owner's side in its own network namespace, routed from the pod network: the
  reference KBS over HTTPS (tests/support/kbs_net.py: a test CA, a fresh random 32-byte
  secret, a policy bound to the pod's initdata digest) and a registry (Debian's
  ``docker-registry``, plain HTTP, marked insecure for the guest in the initdata's
  ``cdh.toml``) holding the app image;
- a private containerd (2.1.9 by default) with the CRI handler ``coco`` on a coco-dev
  profile pinned to this machine (TCG, hybrid vsock), a CNI bridge network in 198.18.0.0/15;
- the hybrid-vsock recorder in front of vhost-device-vsock (``$COCO_VHOST_DEVICE_VSOCK``);
- ``ctr events`` for the whole run and a tcpdump of the pod network.

The app image is imported on the host too, under the registry's reference, only because CRI
wants image metadata before CreateContainer; the guest pulls it from the registry itself.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from protocols.api.cri import api_pb2 as cri
from shim.core.paths import pod_key
from tests import envinfo
from tests.support.capture import capture
from tests.support.containerd import Containerd, coco_processes, private_containerd
from tests.support.cri import (
    CRI_NAMESPACE,
    PAUSE_ENTRYPOINT,
    PAUSE_REF,
    CniNetwork,
    CriClient,
    cri_config,
    pod_config,
)
from tests.support.guest import coco_dev_profile_text, guest_image
from tests.support.images import busybox_oci_archive
from tests.support.kbs_net import KbsService, kbs_service
from tests.support.proof import HostBytes, ctr_events
from tests.support.registry import REGISTRY_BIN, SKOPEO, Registry
from tests.support.vsock_recorder import recordings, write_wrapper

REPO = Path(__file__).resolve().parents[2]
OWNER_SUBNET = 214
POD_SUBNET = "198.18.215.0/24"
REGISTRY_PORT = 5000
INITDATA_ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"
READY_TIMEOUT = 20.0
SHIM_EXIT_GRACE = 30.0
INSTALL = "apt-get install -y docker-registry skopeo tcpdump"


def image_settings(registry: str) -> str:
    """The ``cdh.toml`` ``[image]`` part: pull the owner's registry over plain HTTP."""
    return ("[image]\nimage_pull_timeout = 120\nregistry_connect_timeout = 5\n"
            f'[[image.registry_config.registry]]\nlocation = "{registry}"\ninsecure = true\n')


def initdata_annotation(toml: str) -> str:
    """Standard base64 of gzip of the TOML (the ``cc_init_data`` annotation)."""
    return base64.b64encode(gzip.compress(toml.encode(), mtime=0)).decode()


@dataclass
class ProofEnv:
    base: Path
    cd: Containerd
    client: CriClient
    kbs: KbsService
    registry: Registry
    app_ref: str
    app_digest: str  # manifest digest of the app image in the registry
    records: Path  # the vsock recorder's directory
    run_dir: Path  # the shim's COCO_SHIM_RUN_DIR
    state_dir: Path  # the shim's COCO_SHIM_STATE_DIR
    events_log: Path
    pcap: Path
    requests: list[tuple[str, bytes]] = field(default_factory=list)  # CRI requests as sent

    def run_pod(self, name: str, initdata: str) -> tuple[str, cri.PodSandboxConfig]:
        config = pod_config(name, uuid.uuid4().hex, self.base / "logs" / name,
                            annotations={INITDATA_ANNOTATION: initdata_annotation(initdata)})
        (self.base / "logs" / name).mkdir(parents=True, exist_ok=True)
        self.requests.append((f"CRI PodSandboxConfig {name}", config.SerializeToString()))
        return self.client.run_pod(config), config

    def container(self, name: str, command: list[str],
                  env: dict[str, str] | None = None) -> cri.ContainerConfig:
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=0),
            image=cri.ImageSpec(image=self.app_ref), command=command,
            envs=[cri.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            log_path=f"{name}.log", linux=cri.LinuxContainerConfig())
        self.requests.append((f"CRI ContainerConfig {name}", config.SerializeToString()))
        return config

    def run_to_exit(self, pod_id: str, pod: cri.PodSandboxConfig,
                    config: cri.ContainerConfig, timeout: float = 180) -> str:
        """Create and start a container, wait for its exit, return its log's text lines."""
        cid = self.client.create_container(pod_id, config, pod)
        self.client.start_container(cid)
        deadline = time.monotonic() + timeout
        while self.client.container_status(cid).state != cri.CONTAINER_EXITED:
            if time.monotonic() > deadline:
                raise AssertionError(f"container {config.metadata.name} still running "
                                     f"after {timeout}s")
            time.sleep(0.2)
        log = Path(pod.log_directory) / config.log_path
        # CRI log lines: "<time> stdout F <text>"
        return "\n".join(line.split(" ", 3)[3] for line in
                         log.read_text(errors="replace").splitlines() if line.count(" ") >= 3)

    def end_pod(self, pod_id: str) -> None:
        """StopPodSandbox + RemovePodSandbox (the VM powers off)."""
        self.client.stop_pod(pod_id)
        self.client.remove_pod(pod_id)

    def pod_run_dir(self, pod_id: str) -> Path:
        return self.run_dir / pod_key(CRI_NAMESPACE, pod_id)

    def snapshot_pod(self, host: HostBytes, pod_id: str) -> None:
        """While the pod runs: its run dir, the shim's state dir, containerd's task state
        (bundles with each config.json) and metadata database."""
        host.snapshot(self.pod_run_dir(pod_id), f"pod run dir {pod_id[:12]}")
        host.snapshot(self.state_dir, "shim state dir")
        host.snapshot(self.cd.base / "state" / "io.containerd.runtime.v2.task",
                      "containerd task state (bundles, config.json)")
        host.add_file(self.cd.base / "root" / "io.containerd.metadata.v1.bolt" / "meta.db",
                      "containerd metadata db (snapshot)")

    def host_bytes(self, host: HostBytes) -> HostBytes:
        """The sources that are complete only after the pods are gone."""
        for path in recordings(self.records):
            host.add_file(path, f"vsock recording {path.name}")
        if not recordings(self.records):
            host.described.append("vsock recording: NONE (recorder saw no connection)")
        host.add_file(self.cd.log_path, "containerd log (with the shim's log lines)")
        host.add_file(self.events_log, "containerd events (ctr events)")
        host.add_file(self.pcap, "tcpdump of the pod network")
        host.add_tree(self.base / "logs", "CRI container logs")
        for name, data in self.requests:
            host.add_bytes(name, data)
        return host


def _start_registry(netns: str, ip: str, folder: Path) -> Registry:
    envinfo.require(REGISTRY_BIN, INSTALL)
    envinfo.require(SKOPEO, INSTALL)
    folder.mkdir(parents=True, exist_ok=True)
    reg = Registry("owner", netns, ip, REGISTRY_PORT, False, folder / "data",
                   folder / "registry.log")
    config = folder / "registry.yml"
    config.write_text("\n".join([
        "version: 0.1", "log:", "  level: info", "  formatter: text", "  accesslog:",
        "    disabled: false", "storage:", "  filesystem:", f"    rootdirectory: {reg.storage}",
        "http:", f"  addr: {reg.host}", "  secret: coco-proof"]) + "\n")
    reg.process = subprocess.Popen(["ip", "netns", "exec", netns, str(REGISTRY_BIN), "serve",
                                    str(config)], stdout=reg.log.open("wb"),
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT
    while "listening on" not in reg.log.read_text(errors="replace"):
        if reg.process.poll() is not None or time.monotonic() > deadline:
            reg.stop()
            raise AssertionError(f"registry not ready: {reg.log.read_text(errors='replace')}")
        time.sleep(0.05)
    return reg


def _push(netns: str, archive: Path, ref: str) -> str:
    """skopeo copy into the registry (from the owner's namespace); the manifest digest."""
    digest_file = archive.with_suffix(".digest")
    done = subprocess.run(
        ["ip", "netns", "exec", netns, str(SKOPEO), "--insecure-policy", "copy", "--quiet",
         "--preserve-digests", "--dest-tls-verify=false", "--digestfile", str(digest_file),
         f"oci-archive:{archive}", f"docker://{ref}"],
        capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise AssertionError(f"skopeo push of {ref} failed: {done.stderr.strip()}")
    return digest_file.read_text().strip()


@contextlib.contextmanager
def proof_env(version: str = "2.1.9", *, log_level: str = "debug") -> Iterator[ProofEnv]:
    env = envinfo.load()
    image = guest_image()
    base = Path(tempfile.mkdtemp(prefix="coco-proof-", dir="/tmp"))
    owner_ip = f"198.18.{OWNER_SUBNET}.1"
    registry_host = f"{owner_ip}:{REGISTRY_PORT}"
    tag = uuid.uuid4().hex[:6]
    network = CniNetwork(name=f"coco-proof-{tag}", bridge=f"cocopf{tag}", subnet=POD_SUBNET,
                         data_dir=base / "cni-ipam", default_route=True)
    network.write(base / "cni")
    registry: Registry | None = None
    leftovers: list[int] = []
    try:
        with kbs_service(base / "owner", OWNER_SUBNET,
                         initdata_extra=image_settings(registry_host)) as kbs:
            registry = _start_registry(kbs.netns, owner_ip, base / "registry")
            app_ref = f"{registry_host}/proof/app:latest"
            archive = busybox_oci_archive(base / "app.tar", app_ref)
            app_digest = _push(kbs.netns, archive, app_ref)
            profile = base / "coco-dev.toml"
            profile.write_text(coco_dev_profile_text(env.kernel, image.image))
            records = base / "vsock-records"
            wrapper = write_wrapper(base / "vhost-device-vsock", env.vhost_device_vsock, records)
            run_dir, state_dir = base / "run", base / "state"
            shim_vars = {"COCO_SHIM_CONFIG": str(base / "no-such.toml"),
                         "COCO_SHIM_RUN_DIR": str(run_dir), "COCO_SHIM_SOCKET_DIR": str(base / "s"),
                         "COCO_SHIM_STATE_DIR": str(state_dir),
                         "COCO_VHOST_DEVICE_VSOCK": str(wrapper), "PYTHONPATH": str(REPO)}
            # The handler lets kata's pod annotations through to the shim (as `coco-shim
            # install`'s drop-in does): the initdata annotation rides on them.
            config = cri_config(version, profile=profile, cni_conf_dir=base / "cni",
                                pod_annotations=("io.katacontainers.*",))
            pcap = base / "pod-network.pcap"
            with capture(pcap, "any", expression=("net", POD_SUBNET)), \
                    private_containerd(version, extra_config=config, log_level=log_level,
                                       extra_path=[Path(sys.executable).parent],
                                       env=shim_vars) as cd:
                for ref, path, entrypoint in ((PAUSE_REF, base / "pause.tar", PAUSE_ENTRYPOINT),
                                              (app_ref, archive, None)):
                    if ref == PAUSE_REF:
                        busybox_oci_archive(path, ref, entrypoint=entrypoint)
                    cd.ctr("images", "import", "--platform", "linux/amd64", str(path),
                           namespace=CRI_NAMESPACE)
                ctr = [str(cd.bin_dir / "ctr"), "--address", str(cd.address)]
                with ctr_events(ctr, base / "events.log") as events_log, \
                        CriClient(cd.address) as client:
                    yield ProofEnv(base, cd, client, kbs, registry, app_ref, app_digest,
                                   records, run_dir, state_dir, events_log, pcap)
    finally:
        if registry is not None:
            registry.stop()
        network.remove_bridge()
        # Shims power their VMs off on their own after the last pod is removed; whatever
        # still names this base after the grace is a leak (killed here, and reported).
        deadline = time.monotonic() + SHIM_EXIT_GRACE
        while (leftovers := coco_processes(base)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["umount", "-R", "-l", str(base / "run")], capture_output=True,
                       check=False)
        shutil.rmtree(base, ignore_errors=True)
    if leftovers:
        raise AssertionError(f"processes left behind (killed): {leftovers}")


def sha256_lines(text: str) -> list[str]:
    """The 64-hex-digit words of a container's output (``sha256sum`` prints "<hex>  -")."""
    return [w for w in text.split() if len(w) == 64 and all(c in "0123456789abcdef" for c in w)]
