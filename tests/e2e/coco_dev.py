"""Reusable e2e environment: coco-dev CRI pods whose images the guest pulls from a real
registry reachable on the pod network.

:func:`coco_dev_cri` starts, for one containerd version and CRI mode (``podsandbox`` on
2.1.9 or 1.7.24, ``shim`` sandboxer on 2.1.9):

- the registries of tests/support/registry.py (TLS + bearer token on :5000, plain HTTP on
  :5002) in their own netns at 198.18.<REGISTRY_SUBNET>.1, wired to the host
  (``host_link``) so pods on the CNI bridge (POD_SUBNET, host forwarding, no masquerade)
  reach them with their own IP — the registry's access log shows who fetched what;
- a private containerd whose CRI pulls from them too (``hosts.toml``: CRI pulls image
  metadata on the host), handler ``coco`` on the coco-dev profile pinned to this machine
  (tests/support/guest.py ``coco_dev_profile_text``), kata's pod annotations passed on;
- in podsandbox mode a second handler, ``coco-mismatch``: the same profile whose guest is told
  a mismatching "evidence field" (``coco.agent.dev_evidence_field``, honoured only without a
  TEE), for the initdata refusal test;
- the test images pushed (``refs``: busybox, layered (whiteouts, opaque dir, zstd), a named
  user, all on the plain registry).

:meth:`CocoDevCri.initdata` writes an initdata document whose ``cdh.toml`` lets the guest
reach the registries (test CA, plain registry insecure), optionally with a ``policy.rego``
and more ``[data]`` files (e.g. ``aa.toml``/``[kbc]`` for a KBS: start one in
``registries.pair.peer`` and it is reachable from pods at ``registries.peer_ip``).
:meth:`CocoDevCri.run_pod` runs a pod with an initdata document (and/or a policy annotation).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from guest.image.build import BuildResult
from protocols.api.cri import api_pb2 as cri
from shim.core.paths import pod_key
from shim.pod.mounts import mounts_under
from tests import envinfo
from tests.e2e.conftest import SHIM_EXIT_GRACE, describe, shim_env
from tests.support import oci
from tests.support.containerd import Containerd, coco_processes, private_containerd
from tests.support.cri import (
    CRI_NAMESPACE,
    CniNetwork,
    CriClient,
    container_config,
    cri_config,
    pod_config,
)
from tests.support.guest import coco_dev_profile_text
from tests.support.netns import host_link
from tests.support.registry import RegistryEnv, registry_env

POD_SUBNET: Final = "198.18.210.0/24"
REGISTRY_SUBNET: Final = 211
INITDATA_ANNOTATION: Final = "io.katacontainers.config.hypervisor.cc_init_data"
POLICY_ANNOTATION: Final = "io.katacontainers.config.agent.policy"
HANDLER: Final = "coco"
MISMATCH_HANDLER: Final = "coco-mismatch"
MISMATCH_FIELD: Final = "5a" * 48  # what the mismatching guest takes for its evidence field
MODES: Final = [("2.1.9", "podsandbox"), ("1.7.24", "podsandbox"), ("2.1.9", "shim")]
LOG_WAIT: Final = 60.0


def initdata_annotation(toml: str) -> str:
    """The ``cc_init_data`` annotation value: standard base64 of gzip of the TOML."""
    return base64.b64encode(gzip.compress(toml.encode(), mtime=0)).decode()


def policy_annotation(rego: str) -> str:
    return base64.b64encode(rego.encode()).decode()


@dataclass
class CocoDevCri:
    cd: Containerd
    base: Path
    client: CriClient
    version: str
    sandboxer: str
    run_dir: Path  # the shim's COCO_SHIM_RUN_DIR
    registries: RegistryEnv
    refs: dict[str, str]
    network: CniNetwork
    pods: list[str] = field(default_factory=list)
    configs: dict[str, cri.PodSandboxConfig] = field(default_factory=dict)  # by pod id

    # --- initdata ---------------------------------------------------------------------------

    def cdh_image_toml(self, *, timeout: float = 120) -> str:
        """cdh.toml's ``[image]``: the test CA, the plain registry insecure, bounded waits."""
        return ("[image]\n"
                f"image_pull_timeout = {timeout}\n"
                "registry_connect_timeout = 3\n"
                f'extra_root_certificates = ["""\n{self.registries.ca.cert_pem}"""]\n'
                "[[image.registry_config.registry]]\n"
                f'location = "{self.registries.plain.host}"\n'
                "insecure = true\n")

    def initdata(self, *, policy: str | None = None, data: Mapping[str, str] | None = None,
                 cdh_extra: str = "", algorithm: str = "sha384") -> str:
        """An initdata TOML document: ``cdh.toml`` (registry access, plus ``cdh_extra``, e.g.
        a ``[kbc]`` table), ``policy.rego`` if given, and any other ``data`` files."""
        files = {"cdh.toml": self.cdh_image_toml() + cdh_extra, **(data or {})}
        if policy is not None:
            files["policy.rego"] = policy
        lines = ['version = "0.1.0"', f'algorithm = "{algorithm}"', "[data]"]
        lines += [f"{json.dumps(name)} = {json.dumps(body)}" for name, body in files.items()]
        return "\n".join(lines) + "\n"

    # --- pods and containers ----------------------------------------------------------------

    def pod_config(self, name: str, *, initdata: str | None = None, policy: str | None = None,
                   annotations: Mapping[str, str] | None = None,
                   resources: cri.LinuxContainerResources | None = None,
                   ) -> cri.PodSandboxConfig:
        extra = dict(annotations or {})
        if initdata is not None:
            extra[INITDATA_ANNOTATION] = initdata_annotation(initdata)
        if policy is not None:
            extra[POLICY_ANNOTATION] = policy_annotation(policy)
        logs = self.base / "logs" / name
        logs.mkdir(parents=True, exist_ok=True)
        return pod_config(name, uuid.uuid4().hex, logs, annotations=extra, resources=resources)

    def run_pod(self, name: str, *, initdata: str | None = None, policy: str | None = None,
                annotations: Mapping[str, str] | None = None, handler: str = HANDLER,
                resources: cri.LinuxContainerResources | None = None) -> str:
        """``resources``: the pod's summed limits (a CPU quota sizes its VM, shim/pod/sizing)."""
        config = self.pod_config(name, initdata=initdata, policy=policy,
                                 annotations=annotations, resources=resources)
        pod = self.client.run_pod(config, handler)
        self.pods.append(pod)
        self.configs[pod] = config
        return pod

    def create(self, pod: str, name: str, image: str, command: list[str] | None = None) -> str:
        """CreateContainer of ``image`` (``command`` None: the image's entrypoint/cmd)."""
        config = container_config(name, image, command or [])
        return self.client.create_container(pod, config, self.configs[pod])

    def start(self, pod: str, name: str, image: str, command: list[str] | None = None) -> str:
        container = self.create(pod, name, image, command)
        self.client.start_container(container)
        return container

    def logs(self, pod: str, name: str, *, until: str = "", wait: float = LOG_WAIT) -> str:
        """The container's stdout/stderr lines (CRI log format stripped); waits for
        ``until`` to appear, or for the container's log to exist at all."""
        path = Path(self.configs[pod].log_directory) / f"{name}.log"
        deadline = time.monotonic() + wait
        while True:
            text = ""
            if path.exists():
                text = "\n".join(line.split(" ", 3)[3] for line in
                                 path.read_text(errors="replace").splitlines()
                                 if line.count(" ") >= 3)
                if until in text:
                    return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: {until!r} not logged in {wait} s: {text!r}")
            time.sleep(0.1)

    def wait_exit(self, container: str, wait: float = LOG_WAIT) -> int:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            status = self.client.container_status(container)
            if status.state == cri.CONTAINER_EXITED:
                return int(status.exit_code)
            time.sleep(0.1)
        raise AssertionError(f"container {container} still running after {wait} s")

    def remove_pod(self, pod: str) -> None:
        self.client.stop_pod(pod)
        self.client.remove_pod(pod)
        if pod in self.pods:
            self.pods.remove(pod)
        self.configs.pop(pod, None)

    # --- what the host sees -----------------------------------------------------------------

    def pod_ip(self, pod: str) -> str:
        return str(self.client.pod_status(pod).network.ip)

    def pod_dir(self, pod: str) -> Path:
        """The shim's run directory of the pod (its VM's sockets, logs, initdata disk)."""
        return self.run_dir / pod_key(CRI_NAMESPACE, pod)

    def qemu_argv(self, pod: str) -> list[str]:
        """The argv of the pod's QEMU (found by its run directory)."""
        needle = str(self.pod_dir(pod)).encode()
        for pid in coco_processes(self.base):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"qemu-system" in argv[0] and any(needle in a for a in argv):
                return [a.decode() for a in argv if a]
        raise AssertionError(f"no QEMU of pod {pod} runs")

    def qemus(self) -> list[int]:
        found = []
        for pid in coco_processes(self.base):
            with contextlib.suppress(OSError):
                if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
        return found

    def shim_log(self) -> str:
        return self.cd.log_path.read_text(errors="replace")


def _push_images(registries: RegistryEnv) -> dict[str, str]:
    plain = registries.plain
    return {
        "busybox": registries.push([oci.busybox()], plain, "coco/busybox"),
        "layered": registries.push([oci.layered()], plain, "coco/layered"),
        "named": registries.push([oci.named_user()], plain, "coco/named"),
    }


@contextlib.contextmanager
def coco_dev_cri(version: str, sandboxer: str, guest_image: BuildResult, *,
                 extra_handlers: Mapping[str, Path] | None = None) -> Iterator[CocoDevCri]:
    """The environment described in the module docstring; everything removed on exit, and
    no process, pod run directory or mount may be left behind by the shim.
    ``extra_handlers`` (podsandbox mode only): more CRI handlers, name → profile file."""
    env = envinfo.load()
    base = Path(tempfile.mkdtemp(prefix="coco-dev-", dir="/tmp"))
    profile = base / "coco-dev.toml"
    profile.write_text(coco_dev_profile_text(env.kernel, guest_image.image))
    mismatch = base / "coco-dev-mismatch.toml"
    mismatch.write_text(coco_dev_profile_text(
        env.kernel, guest_image.image, kernel_params=f"coco.agent.dev_evidence_field="
        f"{MISMATCH_FIELD}"))
    tag = uuid.uuid4().hex[:6]
    network = CniNetwork(name=f"coco-dev-{tag}", bridge=f"cocodev{tag}", subnet=POD_SUBNET,
                         data_dir=base / "cni-ipam", default_route=True)
    network.write(base / "cni")
    run_dir = base / "run"
    shim_mode = sandboxer == "shim"
    shim_vars = {**shim_env(base, profile),
                 "COCO_SHIM_CONFIG": str(profile if shim_mode else base / "no-such.toml"),
                 "COCO_SHIM_RUN_DIR": str(run_dir)}
    extra_path = [Path(sys.executable).parent, env.vhost_device_vsock.parent]
    try:
        with registry_env(REGISTRY_SUBNET, link=host_link) as registries:
            refs = _push_images(registries)
            hosts = registries.containerd_hosts(base / "certs.d")
            config = cri_config(version, profile=None if shim_mode else profile,
                                cni_conf_dir=base / "cni", sandboxer=sandboxer,
                                registry_config_path=hosts,
                                pod_annotations=("io.katacontainers.*",))
            if not shim_mode:
                handlers = {MISMATCH_HANDLER: mismatch, **(extra_handlers or {})}
                config += "".join(_handler(version, name, path)
                                  for name, path in handlers.items())
            elif extra_handlers:
                raise ValueError("extra handlers need podsandbox mode (2.1.9's shim "
                                 "sandboxer takes no handler options)")
            with private_containerd(version, extra_config=config, extra_path=extra_path,
                                    env=shim_vars) as cd:
                _import_pause(cd, base)
                with CriClient(cd.address) as client:
                    for ref in refs.values():
                        client.pull_image(ref)
                    yield CocoDevCri(cd, base, client, version, sandboxer, run_dir,
                                     registries, refs, network)
            deadline = time.monotonic() + SHIM_EXIT_GRACE
            while (leftovers := coco_processes(base)) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not leftovers, f"processes left behind: {describe(leftovers)}"
            pods = [p for p in run_dir.iterdir() if p.is_dir()] if run_dir.exists() else []
            assert not pods, f"pod run directories left behind: {pods}"
    finally:
        for pid in coco_processes(base):
            os.kill(pid, 9)
        network.remove_bridge()
        for target in mounts_under(run_dir):
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _handler(version: str, name: str, profile: Path) -> str:
    """One more CRI handler on our runtime with its own profile (podsandbox mode)."""
    if version.startswith("1."):
        table = f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{name}]'
        return (f'{table}\n  runtime_type = "io.containerd.coco.v2"\n'
                '  pod_annotations = ["io.katacontainers.*"]\n'
                f'{table[:-1]}.options]\n  ConfigPath = "{profile}"\n')
    table = f"[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.{name}]"
    return (f"{table}\n  runtime_type = 'io.containerd.coco.v2'\n  sandboxer = 'podsandbox'\n"
            "  pod_annotations = ['io.katacontainers.*']\n"
            f"{table[:-1]}.options]\n  ConfigPath = '{profile}'\n")


def _import_pause(cd: Containerd, base: Path) -> None:
    """The pinned pause image (podsandbox mode): imported, never pulled; in the guest the
    sandbox container runs the guest's own pause bundle anyway."""
    from tests.support.cri import PAUSE_ENTRYPOINT, PAUSE_REF
    from tests.support.images import busybox_oci_archive

    archive = busybox_oci_archive(base / "pause.tar", PAUSE_REF, entrypoint=PAUSE_ENTRYPOINT)
    cd.ctr("images", "import", "--platform", "linux/amd64", str(archive),
           namespace=CRI_NAMESPACE)


def blob_digests(image: oci.Image) -> set[str]:
    return {layer.digest for layer in image.layers}


DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
